"""Scoped, thread-isolated hooks at named hook points.

Each hook point gets one dispatcher installed on its module when the model is
loaded. A dispatcher does nothing unless the *calling thread's* context holds
an intervention for it; interventions are pushed and popped by context
managers (``finally`` always pops). Several threads can therefore share one
model and run differently-hooked forwards at the same time: each sees only
its own interventions. Tuple-vs-tensor module outputs are unwrapped here and
nowhere else.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from .families import Family, first_path, get_path, hook_names, parse_hook_name

ActFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""An intervention: receives the activation, returns a replacement or None to leave it."""

_ACTIVE: ContextVar[tuple[tuple[int, str, ActFn], ...]] = ContextVar("saescope_interventions", default=())
_manager_ids = itertools.count()


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early once the wanted activations are captured."""


@dataclass(frozen=True)
class HookPoint:
    """Where a named hook point lives: the module, and whether it reads its input or output."""

    name: str
    module: nn.Module
    reads_input: bool
    n_heads: int = 0
    """For ``attn.hook_z``: heads to split the flat projection input into (0 = no reshape)."""


def _unwrap(value: object) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[return-value]


def _rewrap(original: object, new: torch.Tensor) -> object:
    return (new, *original[1:]) if isinstance(original, tuple) else new


class HookManager:
    """The hook points of one model, with a dispatcher on each."""

    def __init__(self, model: nn.Module, family: Family, n_layers: int, n_heads: int):
        self._id = next(_manager_ids)
        self.points: dict[str, HookPoint] = {}
        layers = first_path(model, family.layers, "decoder blocks")
        for name in hook_names(n_layers):
            layer_idx, kind = parse_hook_name(name)
            block = layers[layer_idx]
            attn = getattr(block, family.attn)
            if kind == "hook_resid_pre":
                point = HookPoint(name, block, reads_input=True)
            elif kind == "hook_resid_post":
                point = HookPoint(name, block, reads_input=False)
            elif kind == "hook_attn_out":
                module = get_path(block, family.attn_out) if family.attn_out else attn
                point = HookPoint(name, module, reads_input=False)
            elif kind == "hook_mlp_out":
                module = get_path(block, family.mlp_out) if family.mlp_out else getattr(block, family.mlp)
                point = HookPoint(name, module, reads_input=False)
            else:  # attn.hook_z
                point = HookPoint(name, getattr(attn, family.out_proj), reads_input=True, n_heads=n_heads)
            self.points[name] = point
        self._handles = [self._install(p) for p in self.points.values()]

    def names(self) -> list[str]:
        """Hook point names in forward order."""
        return list(self.points)

    def check(self, name: str) -> HookPoint:
        """The hook point called ``name``, or a ValueError listing the valid names."""
        point = self.points.get(name)
        if point is None:
            names = self.names()
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            raise ValueError(f"unknown hook point {name!r} for this model; valid names: {shown}")
        return point

    def _fns(self, name: str) -> list[ActFn]:
        return [fn for owner, hook, fn in _ACTIVE.get() if owner == self._id and hook == name]

    def _apply(self, point: HookPoint, act: torch.Tensor, fns: list[ActFn]) -> torch.Tensor | None:
        shape = act.shape
        view = act.unflatten(-1, (point.n_heads, -1)) if point.n_heads else act
        changed = False
        for fn in fns:
            new = fn(view)
            if new is not None:
                if new.shape != view.shape:
                    raise ValueError(f"intervention at {point.name} returned shape {tuple(new.shape)}, expected {tuple(view.shape)}")
                view, changed = new.to(act.dtype), True
        if not changed:
            return None
        return view.reshape(shape)

    def _install(self, point: HookPoint) -> torch.utils.hooks.RemovableHandle:
        if point.reads_input:

            def pre_hook(module, args, kwargs):
                fns = self._fns(point.name)
                if not fns:
                    return None
                if args:
                    new = self._apply(point, args[0], fns)
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = self._apply(point, kwargs["hidden_states"], fns)
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(module, args, output):
            fns = self._fns(point.name)
            if not fns:
                return None
            new = self._apply(point, _unwrap(output), fns)
            return None if new is None else _rewrap(output, new)

        return point.module.register_forward_hook(post_hook)

    @contextlib.contextmanager
    def intervene(self, name: str, fn: ActFn) -> Iterator[None]:
        """Run ``fn`` at hook point ``name`` for forwards made by this thread inside the block."""
        self.check(name)
        token = _ACTIVE.set((*_ACTIVE.get(), (self._id, name, fn)))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def remove(self) -> None:
        """Take the dispatchers off the model (the manager is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def interventions(manager: HookManager, pairs: Sequence[tuple[str, ActFn]]) -> Iterator[None]:
    """Several interventions at once (applied in order at each hook point)."""
    with contextlib.ExitStack() as stack:
        for name, fn in pairs:
            stack.enter_context(manager.intervene(name, fn))
        yield
