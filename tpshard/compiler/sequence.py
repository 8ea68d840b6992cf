"""Sequence parallelism: a post-pass over the default Plan's edits.

Between blocks the residual stream is replicated in the default plan: every rank holds it
whole and runs the norms, residual adds and dropout on all of it. This pass splits it along
the sequence dim instead (the same placement algebra, S(seq)):

- each all-reduce of a partial sum whose value has the sequence dim (a row linear's output, a
  vocabulary embedding's lookup) becomes a reduce-scatter along it (``reduce_scatter``);
- the ops fed only by such values (pointwise ops, norms and reductions over other dims)
  run on sequence shards — the *sequence region*; a replicated parameter they use whole (a
  norm weight) gets each rank's share of its gradient, so it takes a ``copy`` (bwd all-reduce,
  the gradient-placement rule of :mod:`tpshard.compiler.analysis` on the sequence dim), and a
  replicated value with a sequence extent is sliced (``scatter``);
- a region value entering a column linear (the default plan's ``copy``) is all-gathered along
  the sequence (``all_gather_seq``: fwd all-gather, bwd reduce-scatter); entering any other op
  that needs it whole (the model output, a size read aside) it is all-gathered with a
  backward slice (``gather_seq``); the size of a region value reads the full size (``seq_size``).

Bytes moved equal the default plan's: an all-reduce is a reduce-scatter plus an all-gather.
Everything the pass cannot prove runs on sequence shards stays replicated (gathered first),
so the result is exact; :attr:`Plan.sequence` says where the sequence dim is and why.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

import torch
import torch.fx as fx

from tpshard.compiler.ir import Op, plan_key, shape_of
from tpshard.plan import GRAD_ALL_REDUCE, GRAD_REPLICAS, Edit, Plan, PlanError

__all__ = ["sequence_parallel", "full_size"]

_REGION_KINDS = ("pointwise", "norm", "reduce", "dims")
_CHECKS = ("_assert_tensor_metadata",)  # export's dtype/device assertions: any shard passes


def full_size(size: Any, seq: int | None, world: int) -> Any:
    """A region value's size as the original graph read it: the sequence dim ``seq`` of the
    torch.Size ``size`` (or the int ``size`` itself when ``seq`` is None) times ``world``."""
    if seq is None:
        return size * world
    s = list(size)
    s[seq] = s[seq] * world
    return torch.Size(s)


def _find_seq(ops: list[Op]) -> tuple[int, int, str]:
    """(dim, length, why) of the sequence in the model's first input."""
    for op in ops:
        n = op.node
        if n.op != "placeholder":
            continue
        shape = shape_of(n)
        meta = n.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if dtype is None and isinstance(n.meta.get("val"), torch.Tensor):
            dtype = n.meta["val"].dtype
        if not isinstance(shape, tuple) or dtype is None:
            continue
        if not dtype.is_floating_point and len(shape) == 2:
            return 1, shape[1], f"input {n.name!r} holds token ids of shape (batch, seq) = {shape}: dim 1"
        if dtype.is_floating_point and len(shape) == 3:
            return 1, shape[1], f"input {n.name!r} has shape (batch, seq, features) = {shape}: dim 1"
    raise PlanError("sequence_parallel: cannot find the sequence dim: no input of shape (batch, seq) token ids "
                    "or (batch, seq, features); inputs: "
                    + ", ".join(op.node.format_node() for op in ops if op.node.op == "placeholder"))


def sequence_parallel(plan: Plan, gm: fx.GraphModule, ops: list[Op]) -> Plan:
    """The sequence-parallel version of the default ``plan`` of ``gm`` (see module docstring)."""
    n = plan.world_size
    out = _copy.deepcopy(plan)
    if n == 1:
        out.sequence = {"dim": None, "why": "one rank: nothing to split"}
        return out
    seq, length, why = _find_seq(ops)
    if length % n:
        raise PlanError(f"sequence_parallel: the sequence length {length} of the example input ({why}) is not "
                        f"divisible by the world size {n}; use a multiple of {n}")
    by_name = {op.name: op for op in ops}
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    edits = out.edits
    skip_add = {e.node: e.dim for e in edits if e.kind == "skip_add"}
    on_edge: dict[tuple[str, str], list[Edit]] = {}
    for e in edits:
        for u in e.users:
            on_edge.setdefault((e.node, u), []).append(e)

    # Values computed from the inputs alone (no linear or embedding above them): replicated.
    # ``grad``: values a gradient can flow to (parameters, float inputs, and what uses them).
    const: set[str] = set()
    grad: set[str] = set()
    for op in ops:
        nd = op.node
        ins = nd.all_input_nodes
        if nd.op in ("placeholder", "get_attr"):
            const.add(op.name)
            if nd.op == "get_attr" and nd.target in params:
                grad.add(op.name)
            val = nd.meta.get("tensor_meta") or nd.meta.get("val")
            if nd.op == "placeholder" and getattr(val, "dtype", torch.int64).is_floating_point:
                grad.add(op.name)
            continue
        if op.kind not in ("linear", "embedding", "opaque") and nd.op != "call_module" \
                and all(t.name in const for t in ins):
            const.add(op.name)
        if nd.op == "call_module" or any(t.name in grad for t in ins):
            grad.add(op.name)

    # Phase 1: seeds — partial sums reduced with the sequence at ``seq``.
    seqpos: dict[str, int] = {}  # value (as its users see it) on sequence shards -> its seq dim
    seeds: list[Edit] = []
    skipped: list[str] = []
    for e in edits:
        if e.kind != "reduce":
            continue
        shape = shape_of(by_name[e.node].node)
        if isinstance(shape, tuple) and len(shape) > seq and shape[seq] == length:
            seeds.append(e)
            seqpos[e.node] = seq
        else:
            skipped.append(e.node)
    if not seeds:
        raise PlanError("sequence_parallel: no all-reduced value has the sequence dim "
                        f"({why}); the all-reduced nodes are " + (", ".join(skipped) or "none"))

    def edge_seq(t: fx.Node, user: fx.Node) -> int | None:
        """The seq dim of ``t`` as ``user`` takes it, when on sequence shards."""
        if t.name not in seqpos:
            return None
        if any(e.kind == "reduce" for e in on_edge.get((t.name, user.name), ())):
            return seqpos[t.name]
        if t.name in skip_add or any(e.kind == "reduce" and e.node == t.name for e in seeds):
            return None  # a partial sum before its reduce
        return seqpos[t.name]

    # Phase 2: the region — ops fed by sequence shards whose work is independent along seq.
    region: list[Op] = []
    extra: list[Edit] = []
    for op in ops:
        if op.kind not in _REGION_KINDS or op.name in skip_add or op.name in seqpos:
            continue
        nd = op.node
        oshape = shape_of(nd)
        if not isinstance(oshape, tuple):
            continue
        ins = [(t, edge_seq(t, nd)) for t in op.tensors]
        sharded = [(t, s) for t, s in ins if s is not None]
        if not sharded:
            continue
        t0, s0 = sharded[0]
        pos = s0 + len(oshape) - len(shape_of(t0))  # broadcasting aligns the trailing dims
        if any(s + len(oshape) - len(shape_of(t)) != pos for t, s in sharded):
            continue
        if op.kind == "norm" and pos >= len(oshape) - op.attrs.get("ndims", 1):
            continue
        if op.kind == "dims":  # transposes, unsqueezes, slices: seq must stay whole and single
            if len(sharded) != 1 or s0 in op.attrs.get("slices", ()) or list(op.attrs["map"]).count(s0) != 1:
                continue
            pos = list(op.attrs["map"]).index(s0)
        if op.kind == "reduce":
            dims = [d % len(shape_of(t0)) for d in op.attrs.get("dims") or range(len(shape_of(t0)))]
            if s0 in dims:
                continue
            pos = s0 if op.attrs.get("keepdim") else s0 - sum(d < s0 for d in dims)
        others = [t for t, s in ins if s is None]
        if any(t.name not in const for t in others):
            continue
        plan_edits: list[Edit] = []
        for t in others:
            tshape = shape_of(t)
            k = pos - (len(oshape) - len(tshape))
            if k >= 0 and tshape[k] != 1:
                plan_edits.append(Edit(kind="scatter", node=t.name, users=[op.name], dim=k))
            elif t.name in grad:  # broadcast along seq: each rank's share of its gradient
                plan_edits.append(Edit(kind="copy", node=t.name, users=[op.name]))
        if op.kind == "norm" and op.attrs.get("has_params") and nd.op == "call_module":
            plan_edits.append(Edit(kind="copy_params", node=op.name))
        extra.extend(plan_edits)
        seqpos[op.name] = pos
        region.append(op)
    region_names = {op.name for op in region}

    # Phase 3: rewrite the edits. Seeds reduce-scatter; every edge out of the region gathers.
    new: list[Edit] = []
    seed_names = {e.node for e in seeds}
    for e in edits:
        if e.kind == "reduce" and e.node in seed_names:
            new.append(Edit(kind="reduce_scatter", node=e.node, users=list(e.users), dim=seqpos[e.node],
                            biases=list(e.biases)))
            for b in e.biases:  # a replicated addend joins the reduce-scattered sum on shards
                if b.startswith("%"):
                    term, _, add = b[1:].partition("@")
                    if term not in seqpos or edge_seq(by_name[term].node, by_name[add].node) is None:
                        tshape = shape_of(by_name[term].node)
                        k = seqpos[e.node] - (len(shape_of(by_name[e.node].node)) - len(tshape))
                        if k >= 0 and tshape[k] != 1:
                            extra.append(Edit(kind="scatter", node=term, users=[add], dim=k))
        elif e.kind == "copy" and e.node in seqpos and all(u not in region_names for u in e.users):
            new.append(Edit(kind="all_gather_seq", node=e.node, users=list(e.users), dim=seqpos[e.node]))
        else:
            new.append(e)
    gathered = {(e.node, u) for e in new if e.kind == "all_gather_seq" for u in e.users}
    bias_edges = {(b[1:].partition("@")[0], b[1:].partition("@")[2])
                  for e in new if e.kind == "reduce_scatter" for b in e.biases if b.startswith("%")}
    ag_nodes = {e.node for e in new if e.kind == "all_gather_seq"}
    whole: dict[str, Edit] = {}
    for name, s in seqpos.items():
        node = by_name[name].node
        for u in node.users:
            if u.name in region_names or (name, u.name) in gathered or (name, u.name) in bias_edges:
                continue
            if edge_seq(node, u) is None:
                continue
            uop = by_name.get(u.name)
            if u.op == "call_function" and not u.users and getattr(u.target, "__name__", "").split(".")[0] in _CHECKS:
                continue
            if uop is not None and uop.kind == "size":
                d = uop.attrs.get("dim")
                nd_ = len(shape_of(node))
                if d is None:
                    extra.append(Edit(kind="seq_size", node=u.name, dim=s, size=n))
                elif d % nd_ == s:
                    extra.append(Edit(kind="seq_size", node=u.name, dim=None, size=n))
                continue
            kind = "whole_seq" if name in ag_nodes else "gather_seq"
            e = whole.setdefault(name, Edit(kind=kind, node=name, dim=s))
            e.users.append(u.name)
    new.extend(whole.values())
    merged: dict[tuple, Edit] = {}
    for e in extra:  # one copy per parameter node, its users merged with the default plan's
        key = (e.kind, e.node, e.dim)
        if key in merged:
            merged[key].users.extend(u for u in e.users if u not in merged[key].users)
            continue
        existing = next((x for x in new if (x.kind, x.node, x.dim) == key), None)
        if existing is not None:
            existing.users.extend(u for u in e.users if u not in existing.users)
            merged[key] = existing
        else:
            merged[key] = e
            new.append(e)
    out.edits = new
    _recount(out, plan, by_name, ops, region)
    out.sequence = {
        "dim": seq, "why": why,
        "region": sorted(region_names, key=lambda x: [o.name for o in ops].index(x)),
        "reduce_scattered": [e.node for e in seeds],
        "kept_all_reduce": skipped,
    }
    line = (f"sequence parallel: dim {seq} ({why}); {len(seeds)} all-reduces become reduce-scatters, "
            f"{len(region_names)} ops run on sequence shards")
    if skipped:
        line += "; all-reduced whole (no sequence dim): " + ", ".join(skipped)
    out.notes.append(line)
    return out


def _recount(out: Plan, default: Plan, by_name: dict[str, Op], ops: list[Op], region: list[Op]) -> None:
    """Collective counts and gradient sources of the sequence-parallel edits."""
    owner_of = {op.name: plan_key(op) for op in ops if op.kind in ("linear", "embedding")}

    def producer(name: str) -> str | None:
        stack, seen = [by_name[name]], set()
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            key = owner_of.get(op.name)
            if key in out.modules and out.modules[key].style not in ("replicate",):
                return key
            stack.extend(by_name[t.name] for t in op.tensors if t.name in by_name)
        return None

    def bump(key: str | None, what: str, by: int = 1) -> None:
        if key is None or key not in out.modules:
            return
        c = out.modules[key].collectives
        c[what] = c.get(what, 0) + by
        if c[what] == 0:
            del c[what]

    old = {(e.kind, e.node): e for e in default.edits}
    for e in out.edits:
        if e.kind == "reduce_scatter":
            key = producer(e.node)
            bump(key, "fwd all_reduce", -1)
            bump(key, "fwd reduce_scatter")
            bump(key, "bwd all_gather")
            for b in e.biases:  # a row bias added on shards: its gradient is all-reduced
                if not b.startswith("%"):
                    bump(key, "bwd all_reduce")
                    _grad_reduced(out, b)
        elif e.kind == "all_gather_seq":
            key = owner_of.get(e.users[0])
            bump(key, "bwd all_reduce", -1)
            bump(key, "fwd all_gather")
            bump(key, "bwd reduce_scatter")
        elif e.kind == "gather_seq":
            bump(producer(e.node), "fwd all_gather")
        elif e.kind in ("copy", "copy_params") and (e.kind, e.node) not in old:
            owner = by_name[e.node]
            target = owner.node.target if owner.node.op == "get_attr" else None
            row = next((k for k, m in out.modules.items() if target in m.params), None) if target else owner.module
            bump(row if row in out.modules else producer(e.node), "bwd all_reduce")
            names = [target] if target else [k for k in out.params if k.startswith(owner.module + ".")]
            for p in names:
                _grad_reduced(out, p)
    synced = [f"{k} ({v})" for k, v in out.grads.items() if v in (GRAD_ALL_REDUCE, GRAD_REPLICAS)]
    out.notes = [x for x in out.notes if not x.startswith("gradients synchronized in backward: ")]
    if synced:
        out.notes.append("gradients synchronized in backward: " + ", ".join(synced))


def _grad_reduced(plan: Plan, name: str) -> None:
    """``name`` (and the names tied to it) get their gradient all-reduced in backward."""
    canon = plan.ties.get(name, name)
    for p in plan.grads:
        if p == canon or plan.ties.get(p) == canon:
            plan.grads[p] = GRAD_ALL_REDUCE
