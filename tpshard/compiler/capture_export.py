"""Capture through ``torch.export`` (non-strict), for model code symbolic tracing cannot follow.

The batch and sequence dims of every tensor input are declared dynamic (``Dim.AUTO``), so the
sharded module also runs at other batch sizes and sequence lengths the original accepts; when
export cannot keep them dynamic it falls back to static shapes and says so in ``Captured.note``.
The graph is the training IR: ``aten.linear`` stays whole, every node carries its
``nn_module_stack``, and parameters are ``get_attr`` nodes under their original names.

A Hugging Face model called the default way (``use_cache`` not passed, ``config.use_cache``
true) would return a ``DynamicCache``, which ``torch.export`` cannot hold (no pytree
registration). The cache is then handled explicitly: export runs with ``config.use_cache``
off (restored afterwards), so the graph returns ``past_key_values=None``; the note says so.
A model that returns a cache anyway gets an error that says what to pass.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from tpshard.compiler.captured import Captured
from tpshard.compiler.ir_aten import describe_aten

__all__ = ["capture_export"]


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    from torch.export import Dim

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return {d: Dim.AUTO for d in range(min(v.dim(), 2))}  # batch, sequence
        return None

    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    shapes = {names[i]: spec(a) for i, a in enumerate(args)}
    shapes.update({k: spec(v) for k, v in kwargs.items()})
    return shapes


_CACHE_HINT = ("pass example_kwargs={'use_cache': False} (and call the sharded model with use_cache=False), "
               "or use parallelize(..., inplace=True), which keeps generate() and its KV cache working")


@contextlib.contextmanager
def _cache_off(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[bool]:
    """``config.use_cache`` off while exporting a default call (no ``use_cache`` given); yields
    whether it was switched."""
    config = getattr(model, "config", None)
    switch = ("use_cache" not in kwargs and getattr(config, "use_cache", False) is True
              and "use_cache" in inspect.signature(model.forward).parameters)
    if not switch:
        yield False
        return
    config.use_cache = False
    try:
        yield True
    finally:
        config.use_cache = True


def capture_export(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any]) -> Captured:
    """Export ``model`` on the example inputs and describe the graph (see tpshard.compiler.ir_aten)."""
    with _cache_off(model, example_kwargs) as switched:
        try:
            captured = _export(model, example_inputs, example_kwargs)
        except RuntimeError as e:
            if "Cache" in str(e) and "pytree" in str(e):
                raise RuntimeError(f"{type(model).__name__} returns a KV cache object ({str(e).split(',')[0]}), "
                                   f"which torch.export cannot capture; {_CACHE_HINT}") from e
            raise
    if switched:
        captured.note = "; ".join(filter(None, [captured.note, (
            "use_cache: the model's default call returns a KV cache, which a graph cannot hold; captured with "
            "config.use_cache=False, so the sharded model returns past_key_values=None (for generate() with a "
            "cache, use inplace=True)")]))
    return captured


def _export(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any]) -> Captured:
    note = ""
    try:
        ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs), strict=False,
                                 dynamic_shapes=_dynamic_shapes(model, example_inputs, example_kwargs))
    except Exception as e:  # noqa: BLE001 - retry static; the second failure is the one reported
        ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs), strict=False)
        note = f"static shapes: export could not keep batch/sequence dynamic ({type(e).__name__})"
    gm = ep.module()
    captured = Captured(gm, describe_aten(gm), "export", model, tuple(example_inputs), dict(example_kwargs))
    captured.note = note
    return captured
