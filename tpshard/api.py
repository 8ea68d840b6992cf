"""The public entry points: :func:`plan` (pure analysis) and :func:`parallelize`."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tpshard import comm
from tpshard.compiler import Captured, apply_inplace, capture, capture_for_plan, plan_captured, plan_inplace, rewrite, sequence_parallel
from tpshard.models.meta import on_meta, to_meta
from tpshard.plan import Plan, PlanError

__all__ = ["plan", "parallelize"]


def _plan_captured(c: Captured, world_size: int, overrides: dict[str, str] | None, inplace: bool = False,
                   seq: bool = False, kv_replicas: bool | None = None, ep: bool = False) -> Plan:
    # Replicated kv heads need the graph: an in-place plan keeps them whole.
    kv = not inplace if kv_replicas is None else kv_replicas
    if ep and inplace:
        raise PlanError("expert_parallel=True needs the graph (each rank's experts module is called with "
                        "remapped routing); it cannot be applied in place")
    p = plan_captured(c, world_size, overrides, kv_replicas=kv, expert_parallel=ep)
    if seq:
        if inplace:
            raise PlanError("sequence_parallel=True needs the graph (reduce-scatters and gathers between "
                            "modules); it cannot be applied in place")
        return sequence_parallel(p, c.gm, c.ops)
    return plan_inplace(c.model, c, p) if inplace else p


def plan(model: nn.Module, world_size: int, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
         overrides: dict[str, str] | None = None, inplace: bool = False, sequence_parallel: bool = False,
         expert_parallel: bool = False) -> Plan:
    """Plan how to split ``model`` over ``world_size`` ranks. Pure analysis: no process group,
    no weights copied, the model untouched (a model on the meta device stays there).

    ``overrides`` maps module paths (fnmatch patterns) to styles: "column", "row", "vocab",
    "embed_dim", "replicate", or "column_no_gather" (an output head left split for
    :func:`tpshard.vocab_parallel_cross_entropy`). An override that cannot hold is an error.

    ``inplace=True`` plans for ``parallelize(..., inplace=True)``: a plan the eager model cannot
    express is refused with the node that needs the graph, and the module attributes to divide
    (head counts, widths) are found and recorded in ``Plan.attribute_changes``.

    ``sequence_parallel=True`` splits the residual stream between blocks along the sequence
    dim (norms, residual adds and dropout run on sequence shards; each all-reduce becomes a
    reduce-scatter and an all-gather); inputs and outputs stay replicated. ``Plan.sequence``
    says where the sequence dim is and why (see :mod:`tpshard.compiler.sequence`).

    ``expert_parallel=True`` gives each rank whole routed experts (rank r: experts
    ``[r*E/W, (r+1)*E/W)``) instead of every expert's hidden dim; the tokens are replicated, so
    no all-to-all: each rank runs its experts with the routing remapped, the partial sums reduced
    by the layer's all-reduce (see :mod:`tpshard.compiler.moe_ep`). A world size that does not
    divide an expert count is an error; experts it cannot split so keep expert TP (the reason
    in the plan).

    Example::

        >>> import torch, tpshard
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> p = tpshard.plan(mlp, 2)
        >>> [(m.path, m.style) for m in p.modules.values()]
        [('0', 'column'), ('2', 'row')]
    """
    if any(p.is_meta for p in model.parameters()) and any(not b.is_meta for b in model.buffers()):
        # Built under empty_weights(): meta parameters beside real buffers. Planning needs
        # shapes only, so capture with everything on the meta device.
        with on_meta(model):
            return _plan_captured(capture(model, to_meta(example_inputs), to_meta(example_kwargs or {})),
                                  world_size, overrides, inplace, sequence_parallel, ep=expert_parallel)
    return _plan_captured(capture(model, example_inputs, example_kwargs), world_size, overrides, inplace,
                          sequence_parallel, ep=expert_parallel)


def parallelize(model: nn.Module, world_size: int | None = None, *, example_inputs: tuple = (),
                example_kwargs: dict | None = None, group: Any = None, plan: Plan | None = None,
                overrides: dict[str, str] | None = None, inplace: bool = False,
                sequence_parallel: bool = False, expert_parallel: bool = False) -> nn.Module:
    """This rank's tensor-parallel version of ``model``.

    Runs inside an initialized torch.distributed job (e.g. under ``torchrun``); the rank comes
    from ``group`` (default: the TP group of :func:`tpshard.init_parallelism`, else WORLD). Called
    with the same replicated inputs on every rank, the result returns what ``model`` returns.
    The original is not mutated; parameter names are the original qualified names, with local
    shapes. Pass ``group=tpshard.OfflineGroup(rank, world_size)`` to build one rank's module
    without a job (for inspection; it cannot run collectives).

    ``inplace=True`` applies the plan to ``model`` itself instead of building a graph: parallel
    layers are swapped in at their paths and the attributes holding head counts are divided,
    so every method keeps working (e.g. Hugging Face ``generate()``); a plan that needs the
    graph is refused with the node that needs it (see :mod:`tpshard.compiler.inplace`). The
    attributes are the plan's (``plan(..., inplace=True)``); a plan made for the graph gets
    them found first. ``sequence_parallel=True``, ``expert_parallel=True``: as in :func:`plan` (a
    given ``plan=`` decides).

    Example (world size 1 needs no job)::

        >>> import torch, tpshard
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(tpshard.parallelize(mlp, 1)(x), mlp(x))
        True
    """
    g = comm.resolve_group(group)
    if world_size is None:
        world_size = plan.world_size if plan is not None else g.size
    if g.size != world_size:
        if group is None and g.size == 1:
            raise RuntimeError(
                f"parallelize(world_size={world_size}) needs a running torch.distributed job with "
                f"{world_size} ranks, and none is initialized. Launch the script with "
                f"`torchrun --nproc-per-node {world_size} script.py` and call "
                "torch.distributed.init_process_group() first (or tpshard.init_parallelism). To build "
                "one rank's module without a job, pass group=tpshard.OfflineGroup(rank, world_size)."
            )
        raise RuntimeError(f"world_size={world_size} but the tensor-parallel group has {g.size} ranks")
    if plan is not None and overrides:
        raise PlanError("parallelize: pass either plan= or overrides=, not both. A given plan is applied as it "
                        f"is (it was made with overrides {plan.overrides or {}}); to change styles, make it "
                        "again with tpshard.plan(model, world_size, overrides=...)")
    c = capture(model, example_inputs, example_kwargs) if plan is None else \
        capture_for_plan(model, example_inputs, example_kwargs, plan)
    if plan is None:
        plan = _plan_captured(c, world_size, overrides, inplace and sequence_parallel, sequence_parallel,
                              kv_replicas=not inplace, ep=expert_parallel)
    elif plan.world_size != world_size:
        raise PlanError(f"the plan is for world size {plan.world_size}, not {world_size}")
    if inplace:
        if any(m.style == "expert_parallel" for m in plan.modules.values()):
            raise PlanError("the plan has expert-parallel experts, which need the graph (remapped routing); "
                            "parallelize it without inplace=True")
        if plan.attribute_changes is None:  # made for the graph: find them (plan time, before applying)
            plan = plan_inplace(model, c, plan)
        return apply_inplace(model, c, plan, g)
    return rewrite(c, plan, g)
