"""In-place mode: apply a Plan to the original module object, so every method keeps working.

``tpshard.parallelize(model, n, inplace=True)`` swaps parallel layers in at the planned module
paths (collectives inside the layers: column layers copy their input, row layers and
vocabulary embeddings reduce their output) and divides the module attributes that hold head
counts or widths. No graph is kept, so ``generate()`` with its KV cache, ``save_pretrained`` and
other methods run the sharded model as they ran the original.

Two halves, at two times:

- plan time, :func:`plan_inplace` (``tpshard.plan(..., inplace=True)``): the Plan is checked to
  be one the eager model can express, and the attributes to divide are found by the analysis,
  not by a list of names (:mod:`tpshard.compiler.attribute_search`), and recorded in
  ``Plan.attribute_changes``: printed by ``explain()``, in the JSON;
- apply time, :func:`apply_inplace`: swaps the layers in (the style -> layer table of
  :mod:`tpshard.compiler.styles`, shared with the rewriter) and applies the Plan's attribute
  changes. It decides nothing.

A Plan that needs graph surgery the eager model cannot express — a local slice of a replicated
value, a gather that is not a column layer's output, a partial sum not made by a layer, a layer
used through a functional call — is refused with the node that needs the graph.

Cost of staying eager: consumers of one replicated activation each copy it, so q/k/v and
gate/up issue one backward all-reduce each instead of one shared; partial sums that the graph
mode adds before one all-reduce (token + position embeddings) are reduced one by one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import torch
import torch.nn as nn
import torch.nn.functional as F

from tpshard import comm
from tpshard.compiler.attribute_search import _module_or_none, find_attribute_changes
from tpshard.compiler.captured import Captured
from tpshard.compiler.ir import Op
from tpshard.compiler.ir import plan_key as _key
from tpshard.compiler.styles import SPLIT_STYLES, parallel_layer
from tpshard.plan import Plan, PlanError

__all__ = ["plan_inplace", "apply_inplace"]


def _layer_ops(captured: Captured, plan: Plan) -> list[Op]:
    return [op for op in captured.ops if op.kind in ("linear", "embedding")
            and plan.modules.get(_key(op)) is not None and plan.modules[_key(op)].style in SPLIT_STYLES]


def _check_expressible(model: nn.Module, captured: Captured, plan: Plan) -> dict[str, Op]:
    """The planned layers are modules, and every edit is one a layer can do by itself."""
    by_name = {op.name: op for op in captured.ops}
    layer_ops = _layer_ops(captured, plan)
    for op in layer_ops:
        path = _key(op)
        module = _module_or_none(model, path)
        weight = getattr(module, "weight", None)
        if module is None or weight is None or weight is not _param_or_none(model, op.attrs["weight"]):
            raise PlanError(f"in-place mode: node {op.name!r} uses {op.attrs['weight']!r} through a functional call, "
                            f"not as the weight of a module at {path!r}; use the graph mode (inplace=False)")
    column_nodes = {op.name for op in layer_ops if plan.modules[_key(op)].style.startswith("column")}
    for e in plan.edits:
        if e.kind == "scatter":
            raise PlanError(f"in-place mode cannot slice the replicated value {e.node!r} for {e.users}: that needs "
                            "the graph (inplace=False), or a world size that divides the kv heads")
        if e.kind == "gather" and e.node not in column_nodes:
            raise PlanError(f"in-place mode: the gathered value {e.node!r} is not a column layer's output; "
                            "use the graph mode (inplace=False)")
        if e.kind == "reduce":
            bad = _non_layer_partial(by_name[e.node], by_name)
            if bad is not None:
                raise PlanError(f"in-place mode: node {bad!r} makes a partial sum outside a layer; "
                                "use the graph mode (inplace=False)")
    return {op.name: op for op in layer_ops}


def _non_layer_partial(op: Op, by_name: dict[str, Op]) -> str | None:
    """A matmul upstream of the reduced value ``op`` (not past a layer, norm or softmax): a
    partial sum no layer can reduce by itself."""
    stop = ("linear", "embedding", "input", "norm", "softmax")
    producers = nx.DiGraph()  # value -> its producers, through ops that may pass a partial sum on
    for o in by_name.values():
        if o.kind not in stop:
            producers.add_edges_from((o.name, t.name) for t in o.tensors if t.name in by_name)
    if op.kind == "matmul":
        return op.name
    if op.name not in producers:
        return None
    return next((n for n in nx.descendants(producers, op.name) if by_name[n].kind == "matmul"), None)


def _param_or_none(model: nn.Module, name: str) -> Any:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def plan_inplace(model: nn.Module, captured: Captured, plan: Plan) -> Plan:
    """``plan`` for in-place mode (plan time): refused with the node that needs the graph when
    the eager model cannot express it, else a copy with ``attribute_changes`` recorded (none
    at world size 1)."""
    layer_ops = list(_check_expressible(model, captured, plan).values())
    changes = find_attribute_changes(model, captured, plan, layer_ops) if plan.world_size > 1 else []
    return dataclasses.replace(plan, attribute_changes=changes)


# ---------------------------------------------------------------------------------------------
# Applying the plan to the model.


def _linear_like(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else F.linear(x, weight)


def _swap_class(module: nn.Module, style: str, transposed: bool, group: comm.Group, gather: bool,
                segments: Any) -> None:
    """A linear-like module that is not nn.Linear (e.g. HF's Conv1D) keeps its class's code,
    wrapped with the collectives, in a subclass made for it (names and state_dict unchanged)."""
    cls = type(module)
    original = cls.forward
    if style.startswith("column"):
        def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            y = original(self, comm.mp_copy(x, group), *args, **kwargs)
            return comm.mp_gather(y, -1, group, segments) if gather else y
    else:
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            y = comm.mp_reduce(_linear_like(x, self.weight, transposed), group)  # bias added once, after
            return y if self.bias is None else y + self.bias
    module.__class__ = type(f"TP{style.title().replace('_', '')}{cls.__name__}", (cls,), {"forward": forward})


def _replacement(module: nn.Module, op: Op, plan: Plan, group: comm.Group, gathered: set[str]) -> nn.Module:
    mp = plan.modules[_key(op)]
    style = mp.style
    gather = op.name in gathered
    if isinstance(module, (nn.Linear, nn.Embedding)):  # the layer runs its own collectives
        return parallel_layer(module, style, mp.segments, group, in_graph=False, gather_output=gather)
    if op.kind == "embedding":
        raise PlanError(f"in-place mode: {_key(op)!r} ({type(module).__name__}) is not an nn.Embedding")
    for name in (op.attrs["weight"], op.attrs.get("bias")):
        if name:
            attr = name.rpartition(".")[2]
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(plan.params[name].shard(old.detach(), group.rank, group.size).clone(),
                                               requires_grad=old.requires_grad))
    _swap_class(module, style, op.attrs.get("transposed", False), group, gather, mp.segments)
    return module


def apply_inplace(model: nn.Module, captured: Captured, plan: Plan, group: Any = None) -> nn.Module:
    """Apply ``plan`` (made by :func:`plan_inplace`) to ``model`` itself: the layers and the
    Plan's attribute changes (see module docstring); returns ``model``."""
    g = comm.resolve_group(group)
    if plan.world_size != g.size:
        raise PlanError(f"the plan is for world size {plan.world_size}, but the group has {g.size} ranks")
    if plan.attribute_changes is None:
        raise PlanError("in-place mode applies the plan's attribute changes, and this plan has none recorded (it "
                        "was made for the graph); make it with tpshard.plan(model, world_size, inplace=True)")
    by_name = _check_expressible(model, captured, plan)
    layer_ops = list(by_name.values())
    gathered = {e.node for e in plan.edits if e.kind == "gather"}
    holders = [(name.rpartition(".")[0], name.rpartition(".")[2], p)
               for name, p in model.named_parameters(remove_duplicate=False)]
    new_params: dict[int, nn.Parameter] = {}
    for op in layer_ops:
        path = _key(op)
        old = model.get_submodule(path)
        originals = {n: p for n, p in old.named_parameters(recurse=False)}
        new = _replacement(old, op, plan, g, gathered)
        for n, p in originals.items():  # ties: one original tensor stays one Parameter
            if id(p) in new_params:
                setattr(new, n, new_params[id(p)])
            else:
                new_params[id(p)] = getattr(new, n)
        if new is not old:
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    for owner, attr, p in holders:  # other holders of a replaced tensor (e.g. BERT's decoder bias tie)
        if id(p) in new_params:
            setattr(model.get_submodule(owner) if owner else model, attr, new_params[id(p)])
    for c in plan.attribute_changes:
        setattr(model.get_submodule(c.module) if c.module else model, c.attribute, c.new)
    model.tpshard_plan = plan
    # (module, attribute, new value) for each change: a view of plan.attribute_changes, kept for callers
    model.tpshard_attribute_changes = [(c.module, c.attribute, c.new) for c in plan.attribute_changes]
    return model
