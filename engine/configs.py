"""Command-line flags derived from a settings dataclass, so that each option is written once: the field, its type,
its default and its attribute docstring (the house style) become ``--field-name``, its parser, its default and its
help; ``from_args`` builds the config back from the parsed arguments and commands pass it whole.

Types handled: ``int``, ``float``, ``str``, ``bool`` (``--x`` / ``--no-x``), ``X | None`` (as X; an empty value or
none given keeps ``None`` when that is the default) and ``tuple[str, ...]`` (comma-separated). Fields of other types
(nested configs) are left to the command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string right after it in the class body), joined on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, [*body[1:], None], strict=True):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                  help: dict[str, str] | None = None, flags: dict[str, str] | None = None) -> list[str]:
    """Add a flag per field of the dataclass ``cls`` (but ``skip``); returns the fields added. ``help`` overrides a
    field's docstring, ``flags`` its flag (``{"hook_name": "--hook"}``). A field without a default is a required
    flag."""
    hints = typing.get_type_hints(cls)
    docs = {**field_docs(cls), **(help or {})}
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, _ = _base(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        name = (flags or {}).get(f.name, flag(f.name))
        text = docs.get(f.name, "")
        said = "default" in text  # the help says its default itself
        if kind is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text if said else f"{text} (default: {'on' if default else 'off'})".strip())
        elif kind in (int, float, str):
            shown = "none" if default is None else default
            parser.add_argument(name, dest=f.name, type=kind, default=default, metavar=f.name.upper(), required=required,
                                help=text if said or required else f"{text} (default: {shown})".strip())
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[:1] == (str,):
            parser.add_argument(name, dest=f.name, type=_comma_list, default=default, metavar="A,B,...",
                                help=text if said else f"{text} (default: {','.join(default or ()) or 'none'})".strip())
        else:
            continue  # a nested config: the command adds what it exposes of it
        added.append(f.name)
    return added


def from_args(cls: type[C], args: argparse.Namespace, *, skip: tuple[str, ...] = (), **extra: Any) -> C:
    """``cls`` built from the parsed flags ``add_arguments`` added (fields absent from ``args``, or in ``skip``,
    keep their defaults); ``extra`` sets fields the command computes itself."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)  # pyright: ignore[reportArgumentType]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**{**values, **extra})
