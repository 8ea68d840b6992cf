"""Models without their weights: built with parameters on the meta device
(:func:`empty_weights`) and looked at there (:func:`on_meta`, :func:`to_meta`), for planning,
sharding and loading checkpoints without the memory of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["empty_weights", "on_meta", "to_meta"]


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


def to_meta(value: Any) -> Any:
    """``value`` (any nesting of tuples, lists and dicts) with every tensor on the meta device.

    Example::

        >>> to_meta({"ids": torch.zeros(2, 3)})["ids"].is_meta
        True
    """
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value)
