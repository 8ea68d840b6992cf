"""The model a checkpoint is for: resolved from what the checkpoint functions take (a module,
a factory or a MODEL name), planned on the meta device, its example inputs recorded in the
manifest so that :func:`tpshard.checkpoint.reshard` can capture it again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tpshard.api import plan
from tpshard.models.meta import empty_weights, on_meta, to_meta  # noqa: F401  (empty_weights: the doctest)
from tpshard.models.resolve import ModelLike, resolve_model
from tpshard.plan import Plan

__all__ = ["plan_model"]


def _factory_spec(factory: Any) -> str | None:
    """``module:qualname`` of a module-level factory (what the CLI can import again), else None."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def _resolve_model(model: ModelLike, example_inputs: tuple | None, example_kwargs: dict | None,
                   recorded: dict | None = None, trust_pickle: bool = False) -> tuple[nn.Module, tuple, dict]:
    """The model (see :func:`tpshard.models.resolve_model`; a factory runs under
    :func:`empty_weights`) and the example inputs to capture it with: given ones first, then
    the factory's, then those recorded in a manifest."""
    module, args, kwargs = resolve_model(model, empty=True, trust_pickle=trust_pickle)
    if example_inputs is not None:
        args = tuple(example_inputs)
    if example_kwargs is not None:
        kwargs = dict(example_kwargs)
    if not args and not kwargs and recorded:
        args, kwargs = _inputs_from_record(recorded)
    return module, args, kwargs


def _record_inputs(args: tuple, kwargs: dict) -> dict | None:
    """Shapes and dtypes of the example inputs, when they are tensors and plain values (JSON);
    None when there are none (capture infers them) or they cannot be written as JSON."""
    if not args and not kwargs:
        return None
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        raise TypeError
    try:
        return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in kwargs.items()}}
    except TypeError:
        return None


def _inputs_from_record(rec: dict) -> tuple[tuple, dict]:
    def one(d: dict) -> Any:
        if "tensor" in d:
            return torch.zeros(d["tensor"], dtype=getattr(torch, d["dtype"]), device="meta")
        return d["value"]
    return tuple(one(a) for a in rec.get("args", [])), {k: one(v) for k, v in rec.get("kwargs", {}).items()}


def plan_model(model: nn.Module, world_size: int, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
               overrides: dict[str, str] | None = None, sequence_parallel: bool = False,
               expert_parallel: bool = False) -> Plan:
    """:func:`tpshard.plan` on a meta view of ``model`` (for models built under :func:`empty_weights`,
    whose real buffers and meta parameters do not mix in shape propagation).

    Example::

        >>> from tpshard import models
        >>> with empty_weights():
        ...     model, args = models.build("llama")
        >>> plan_model(model, 2, example_inputs=args).modules["lm_head"].style
        'column'
    """
    with on_meta(model):
        return plan(model, world_size, example_inputs=to_meta(tuple(example_inputs)),
                    example_kwargs=to_meta(dict(example_kwargs or {})), overrides=overrides,
                    sequence_parallel=sequence_parallel, expert_parallel=expert_parallel)
