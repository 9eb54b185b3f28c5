"""torch's AdamW without ``torch._dynamo``, and DeepSpeed's ZeRO without compiling at import.

A worker's set-up spent two thirds of its CPU time importing ``torch._dynamo`` and
``torch._inductor``, neither of which farm uses (docs/benchmarks.md): every worker pays it at every
start, and again at every restart after a failure. Two things pulled them in:

- torch.optim wraps ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and
  ``load_state_dict`` (``torch._disable_dynamo``) and ``step`` (``_use_grad_for_differentiable``) in
  functions that import ``torch._dynamo`` on their first call and otherwise, outside
  ``torch.compile``, do nothing. :class:`AdamW` calls the functions they wrap (their
  ``__wrapped__``, as ``functools.wraps`` records it) with the grad mode the step wrapper sets, so
  the math and the state are torch's own, bit for bit (tests/unit/test_optim.py). Under
  ``torch.compile`` it defers to torch's wrappers.
- ZeRO imports DeepSpeed's Muon optimizer on every first reduction to ask whether the optimizer is
  one, and that module decorates three functions with ``torch.compile`` at import, which imports
  dynamo and inductor's config. :func:`defer_deepspeed_compile` makes DeepSpeed's ``compile()``
  decorator compile on a function's first call instead, which is when torch compiles anyway.

Should a torch or DeepSpeed release change these, the unwrapping finds nothing to unwrap and the
imports come back: slower, never different (tests/unit/test_optim.py notices).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

_ADD_PARAM_GROUP = inspect.unwrap(torch.optim.Optimizer.add_param_group)
_ZERO_GRAD = inspect.unwrap(torch.optim.Optimizer.zero_grad)
_STATE_DICT = inspect.unwrap(torch.optim.Optimizer.state_dict)
_LOAD_STATE_DICT = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
_ADAM_STEP = inspect.unwrap(torch.optim.Adam.step)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, bit for bit, without importing ``torch._dynamo``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if _compiling():
            return super().add_param_group(param_group)
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if _compiling():
            return super().zero_grad(set_to_none)
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if _compiling():
            return super().state_dict()
        return _STATE_DICT(self)  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _compiling():
            return super().load_state_dict(state_dict)
        _LOAD_STATE_DICT(self, state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if _compiling():
            return super().step(closure)
        previous = torch.is_grad_enabled()
        try:  # what the step wrapper does, less its graph breaks: the grad mode the optimizer asks for
            torch.set_grad_enabled(self.defaults["differentiable"])
            return _ADAM_STEP(self, closure)  # type: ignore[no-any-return]
        finally:
            torch.set_grad_enabled(previous)


def _compile_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn))
        return compiled[0](*args, **kwargs)

    return call


def _deferred_compile() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return _compile_on_first_call


def defer_deepspeed_compile(deepspeed: Any) -> None:
    """DeepSpeed's ``@compiler.compile()`` decorations compile on first call, not at import."""
    import importlib

    compiler = importlib.import_module("deepspeed.runtime.compiler")
    if getattr(compiler, "compile", None) is _deferred_compile or not hasattr(torch, "compile"):
        return
    compiler.compile = _deferred_compile  # type: ignore[attr-defined]
