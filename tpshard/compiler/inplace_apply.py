"""In-place mode, apply time: a Plan made by :func:`tpshard.compiler.inplace.plan_inplace`
applied to the original module object. Parallel layers are swapped in at the planned paths
(the style -> layer table of :mod:`tpshard.compiler.styles`, shared with the rewriter), their
collectives inside them, and the Plan's attribute changes are set. Nothing is decided here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpshard import comm
from tpshard.compiler.captured import Captured
from tpshard.compiler.inplace import _check_expressible
from tpshard.compiler.ir import Op
from tpshard.compiler.ir import plan_key as _key
from tpshard.compiler.styles import parallel_layer
from tpshard.plan import Plan, PlanError

__all__ = ["apply_inplace"]


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
