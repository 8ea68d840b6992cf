"""Capture through ``torch.export`` (non-strict), for model code symbolic tracing cannot follow.

The batch and sequence dims of every tensor input are declared dynamic (``Dim.AUTO``), so the
sharded module also runs at other batch sizes and sequence lengths the original accepts; when
export cannot keep them dynamic it falls back to static shapes and says so in ``Captured.note``.
The graph is the training IR: ``aten.linear`` stays whole, every node carries its
``nn_module_stack``, and parameters are ``get_attr`` nodes under their original names.
"""

from __future__ import annotations

import inspect
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


def capture_export(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any]) -> Captured:
    """Export ``model`` on the example inputs and describe the graph (see tpshard.compiler.ir_aten)."""
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
