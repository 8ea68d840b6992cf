"""The Plan's styles, and the parallel layer that implements each split style.

One table serves both ways of applying a Plan. In a graph (:mod:`tpshard.compiler.rewrite`) the
collectives are explicit nodes, so a layer runs without its own: no input copy, no output
gather, no reduce. In place (:mod:`tpshard.compiler.inplace_apply`) there is no graph to hold them, so
each layer runs its own (the layers' defaults), a column layer gathering its output where the
Plan gathers it.

Example::

    >>> import torch
    >>> from tpshard.comm import OfflineGroup
    >>> layer = parallel_layer(torch.nn.Linear(4, 8), "column", None, OfflineGroup(0, 2), in_graph=True)
    >>> type(layer).__name__, layer.weight.shape, layer.gather_output
    ('ColumnParallelLinear', torch.Size([4, 4]), False)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn as nn

from tpshard.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding

__all__ = ["STYLES", "SPLIT_STYLES", "LAYERS", "parallel_layer"]


class _Layer(NamedTuple):
    cls: type[nn.Module]
    segments: bool            # takes the Plan's layout of the split features (fused q/k/v, gate/up)
    in_graph: dict[str, Any]  # options that leave the collectives to the graph's nodes
    in_place: dict[str, Any]  # options when the layer runs its own collectives


#: split style -> the layer that implements it.
LAYERS: dict[str, _Layer] = {
    "column": _Layer(ColumnParallelLinear, True, {"copy_input": False, "gather_output": False}, {}),
    "column_no_gather": _Layer(ColumnParallelLinear, True, {"copy_input": False, "gather_output": False}, {}),
    "row": _Layer(RowParallelLinear, True, {"input_is_parallel": True, "reduce_output": False},
                  {"input_is_parallel": True}),
    "vocab": _Layer(VocabParallelEmbedding, False, {"reduce_output": False}, {}),
    "embed_dim": _Layer(ParallelEmbedding, False, {}, {}),  # gathers its own output in both modes
}
#: The styles that split a module's parameters; "replicate" keeps a module whole.
SPLIT_STYLES = frozenset(LAYERS)
#: Every style a Plan (or an override) may name; "expert_tp" splits a routed experts region
#: (tpshard.compiler.moe) along every expert's hidden dim, its own code run on the shards;
#: "expert_parallel" gives each rank whole experts (tpshard.compiler.moe_ep).
STYLES = SPLIT_STYLES | {"replicate", "expert_tp", "expert_parallel"}


def parallel_layer(module: nn.Module, style: str, segments: Any, group: Any, *, in_graph: bool,
                   gather_output: bool = False) -> nn.Module:
    """This rank's layer of ``style`` for ``module`` (an ``nn.Linear`` or ``nn.Embedding``).

    ``in_graph``: the collectives are graph nodes (the rewriter); otherwise the layer runs its
    own, and a column layer gathers its output when ``gather_output``.
    """
    layer = LAYERS[style]
    options = dict(layer.in_graph if in_graph else layer.in_place)
    if not in_graph and layer.cls is ColumnParallelLinear:
        options["gather_output"] = gather_output
    if layer.segments:
        options["segments"] = segments
    return layer.cls.from_module(module, group=group, **options)
