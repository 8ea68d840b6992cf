"""Models without their weights: built with parameters on the meta device
(:func:`empty_weights`), looked at there (:func:`on_meta`, :func:`plan_model`), and resolved
from what the checkpoint functions take as a model (a module or a zero-argument factory) with
the example inputs to capture it with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from tpshard.plan import Plan
from tpshard.checkpoint.safetensors_io import CheckpointError

__all__ = ["empty_weights", "on_meta", "unpack_model", "plan_model"]

ModelLike = Union[nn.Module, Callable[[], Any]]


def _meta_parameter(param: nn.Parameter) -> nn.Parameter:
    meta = param.detach().to("meta")
    try:
        new = type(param)(meta, requires_grad=param.requires_grad)
    except TypeError:
        new = nn.Parameter(meta, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


def _skip_on_meta(init: Callable) -> Callable:
    def init_unless_meta(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor  # nothing to fill; skipping also spares torch's slow first meta kernels
        return init(tensor, *args, **kwargs)

    return init_unless_meta


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """``torch.nn.init`` functions return meta tensors untouched (as Hugging Face's no_init_weights)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(nn.init, n))]
    originals = {n: getattr(nn.init, n) for n in names}
    for n, fn in originals.items():
        setattr(nn.init, n, _skip_on_meta(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(nn.init, n, fn)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build models with their parameters on the meta device and their buffers real.

    Inside the block every parameter a module registers is replaced by a meta tensor of the
    same shape, dtype and ``requires_grad`` (initializers then run on meta: no memory, no
    time), while buffers are computed as usual. Non-persistent buffers — rotary cos/sin
    tables, causal masks — are not in checkpoints, so a model built entirely on the meta
    device would lose them; built here, it keeps them and :func:`load_sharded` fills only the
    parameters. Tied parameters stay tied, and ``torch.nn.init`` functions skip meta tensors.
    (The approach of accelerate's ``init_empty_weights``.) A module that fills a parameter's
    tensor *before* registering it (``nn.Parameter(torch.randn(n))``) still allocates it briefly.

    Example::

        >>> from tpshard import models
        >>> with empty_weights():
        ...     model = models.Llama()
        >>> model.lm_head.weight.is_meta, model.cos.is_meta
        (True, False)
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = _meta_parameter(param)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with _no_meta_init():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def on_meta(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily hold every parameter and buffer of ``model`` on the meta device.

    Capture and planning need only shapes; a model built under :func:`empty_weights` mixes
    meta parameters with real buffers, which shape propagation rejects. Ties are kept, and the
    original tensors are put back on exit.

    Example::

        >>> lin = torch.nn.Linear(2, 2)
        >>> with on_meta(lin):
        ...     lin.weight.is_meta
        True
        >>> lin.weight.is_meta
        False
    """
    swapped: list[tuple[dict, str, Any]] = []
    replacement: dict[int, Any] = {}
    for mod in model.modules():
        for store, make in ((mod._parameters, _meta_parameter), (mod._buffers, lambda t: t.to("meta"))):
            for key, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                if id(t) not in replacement:
                    replacement[id(t)] = make(t)
                swapped.append((store, key, t))
                store[key] = replacement[id(t)]
    try:
        yield model
    finally:
        for store, key, t in reversed(swapped):
            store[key] = t


def _to_meta(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value)


def unpack_model(made: Any, where: str) -> tuple[nn.Module, tuple, dict]:
    """(model, example_args, example_kwargs) from what a model factory returned: a model,
    ``(model, example_args)`` or ``(model, example_args, example_kwargs)``."""
    if isinstance(made, nn.Module):
        return made, (), {}
    if isinstance(made, tuple) and 1 <= len(made) <= 3 and isinstance(made[0], nn.Module):
        args = tuple(made[1]) if len(made) > 1 else ()
        kwargs = dict(made[2]) if len(made) > 2 else {}
        return made[0], args, kwargs
    raise CheckpointError(f"{where} returned {type(made).__name__}; expected a model, (model, example_args) "
                          "or (model, example_args, example_kwargs)")


def _factory_spec(factory: Any) -> str | None:
    """``module:qualname`` of a module-level factory (what the CLI can import again), else None."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def _resolve_model(model: ModelLike, example_inputs: tuple | None, example_kwargs: dict | None,
                   recorded: dict | None = None) -> tuple[nn.Module, tuple, dict]:
    """The model (a factory runs under :func:`empty_weights`) and the example inputs to capture
    it with: given ones first, then the factory's, then those recorded in a manifest."""
    if isinstance(model, nn.Module):
        module, args, kwargs = model, (), {}
    elif callable(model):
        with empty_weights():
            made = model()
        module, args, kwargs = unpack_model(made, f"the model factory {model!r}")
    else:
        raise TypeError(f"model must be an nn.Module or a zero-argument factory, not {type(model).__name__}")
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
               overrides: dict[str, str] | None = None) -> Plan:
    """:func:`tpshard.plan` on a meta view of ``model`` (for models built under :func:`empty_weights`,
    whose real buffers and meta parameters do not mix in shape propagation).

    Example::

        >>> from tpshard import models
        >>> with empty_weights():
        ...     model, args = models.build("llama")
        >>> plan_model(model, 2, example_inputs=args).modules["lm_head"].style
        'column'
    """
    from tpshard.api import plan

    with on_meta(model):
        return plan(model, world_size, example_inputs=_to_meta(tuple(example_inputs)),
                    example_kwargs=_to_meta(dict(example_kwargs or {})), overrides=overrides)
