"""Scoped, thread-isolated hooks at named hook points.

A hook point gets a dispatcher on its module while at least one thread holds
an intervention there (reference-counted: the first scope installs it, the
last one out removes it), so a forward with no interventions runs on hook-free
modules. A dispatcher does nothing unless the *calling thread's* context holds
an intervention for it; interventions are pushed and popped by context
managers (``finally`` always pops). Several threads can therefore share one
model and run differently-hooked forwards at the same time: each sees only
its own interventions. Tuple-vs-tensor module outputs are unwrapped here and
nowhere else.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .families import Family, decoder_layers, first_path, hook_names, parse_hook_name

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
    """The hook points of one model; a point has a dispatcher on its module while some scope intervenes there."""

    def __init__(self, model: nn.Module, family: Family, n_layers: int, n_heads: int):
        self._id = next(_manager_ids)
        self.points: dict[str, HookPoint] = {}
        layers = decoder_layers(model, family)
        for name in hook_names(n_layers):
            layer_idx, kind = parse_hook_name(name)
            block = layers[layer_idx]
            attn = getattr(block, family.attn)
            if kind == "hook_resid_pre":
                point = HookPoint(name, block, reads_input=True)
            elif kind == "hook_resid_post":
                point = HookPoint(name, block, reads_input=False)
            elif kind == "hook_attn_out":
                module = first_path(block, (family.attn_out,), "attention output") if family.attn_out else attn
                point = HookPoint(name, module, reads_input=False)
            elif kind == "ln2.hook_normalized":  # the MLP's input: the normalised residual stream it reads
                point = HookPoint(name, getattr(block, family.mlp), reads_input=True)
            elif kind == "hook_mlp_out":
                module = first_path(block, (family.mlp_out,), "MLP output") if family.mlp_out else getattr(block, family.mlp)
                point = HookPoint(name, module, reads_input=False)
            else:  # attn.hook_z
                point = HookPoint(name, getattr(attn, family.out_proj), reads_input=True, n_heads=n_heads)
            self.points[name] = point
        # Dispatchers on all 150 points of a 30-layer model sent every module call down torch's slow
        # hooked path: ~0.55 ms of Python per forward, ~2% of a SmolLM2-135M decode step on a CPU,
        # steered or not. Only points some scope is using have one now.
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._removed = False

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
                    raise ValueError(
                        f"intervention at {point.name} returned shape {tuple(new.shape)}, expected {tuple(view.shape)}"
                    )
                view, changed = new.to(act.dtype), True
        if not changed:
            return None
        return view.reshape(shape)

    def _install(self, point: HookPoint) -> torch.utils.hooks.RemovableHandle:
        # prepended: other hooks on the module (e.g. transformers' output_hidden_states recorders)
        # see the intervened activation, as when dispatchers were installed at load time
        if point.reads_input:

            # ``kwargs=None``: a forward in another thread can meet this hook in the instant between
            # torch registering it and marking it with_kwargs; that thread has no fns here anyway.
            def pre_hook(
                module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
            ) -> tuple[tuple[Any, ...], dict[str, Any] | None] | None:
                fns = self._fns(point.name)
                if not fns:
                    return None
                if args:
                    new = self._apply(point, args[0], fns)
                    return None if new is None else ((new, *args[1:]), kwargs)
                assert kwargs is not None  # None only in the race above, where this thread has no fns
                new = self._apply(point, kwargs["hidden_states"], fns)
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

        def post_hook(module: nn.Module, args: tuple[Any, ...], output: object) -> object:
            fns = self._fns(point.name)
            if not fns:
                return None
            new = self._apply(point, _unwrap(output), fns)
            return None if new is None else _rewrap(output, new)

        return point.module.register_forward_hook(post_hook, prepend=True)

    @contextlib.contextmanager
    def intervene(self, name: str, fn: ActFn) -> Generator[None]:
        """Run ``fn`` at hook point ``name`` for forwards made by this thread inside the block."""
        point = self.check(name)
        self._acquire(point)
        try:
            token = _ACTIVE.set((*_ACTIVE.get(), (self._id, name, fn)))
            try:
                yield
            finally:
                _ACTIVE.reset(token)
        finally:
            self._release(name)

    def _acquire(self, point: HookPoint) -> None:
        with self._lock:
            if self._removed:
                raise RuntimeError("this hook manager was removed from its model")
            users = self._users.get(point.name, 0)
            if users == 0:
                self._handles[point.name] = self._install(point)
            self._users[point.name] = users + 1

    def _release(self, name: str) -> None:
        # under the lock: a new scope must not install a second dispatcher before this one is off
        with self._lock:
            users = self._users[name] - 1
            if users:
                self._users[name] = users
                return
            del self._users[name]
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def installed(self) -> list[str]:
        """Hook points that have a dispatcher on their module right now (some thread is intervening there)."""
        with self._lock:
            return list(self._handles)

    def remove(self) -> None:
        """Take the dispatchers off the model (the manager is unusable afterwards)."""
        with self._lock:
            self._removed = True
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()


@contextlib.contextmanager
def interventions(manager: HookManager, pairs: Sequence[tuple[str, ActFn]]) -> Generator[None]:
    """Several interventions at once (applied in order at each hook point)."""
    with contextlib.ExitStack() as stack:
        for name, fn in pairs:
            stack.enter_context(manager.intervene(name, fn))
        yield
