"""Replicated kv heads: grouped-query attention with fewer kv heads than ranks, exactly.

The planner's regions leave a k/v projection whose kv heads ``K`` the world size ``W`` does not
divide kept whole, each rank slicing the repeated heads its queries use (a ``scatter`` edit after
``repeat_kv``). Where ``W`` is a multiple of ``K`` and ``H`` (query heads) of ``W``, this pass
replaces that with replication, before the Plan is written:

- query heads are split contiguously, rank ``r`` holding ``[r*H/W, (r+1)*H/W)``; query head
  ``h`` uses kv head ``h // (H/K)``, so rank ``r`` uses only kv head ``r // R`` with
  ``R = W/K`` replicas of each kv head;
- the projection's weight (and bias) rows on rank ``r`` are that head's:
  ``ParamShard(dim=0, replicas=R)``;
- the shape literals follow: the kv-head count of the view after the projection becomes 1
  (``K*R/W``), the ``expand`` of ``repeat_kv`` to ``(B, 1, (H/W)/1, T, hd)`` and its reshape
  to ``H/W`` heads; the scatter is gone;
- gradients: each replica's weight gradient comes from its own query heads only, so the ``R``
  ranks holding a head all-reduce it in a subgroup (a ``replica_grad`` edit,
  ``GRAD_REPLICAS``); the projection's input takes the usual column copy, whose all-reduce over
  all ranks sums each replica's part once — exact. A norm's (or a multiplied parameter's)
  gradient on the replicated heads is summed over all ranks the same way (copy edits).

Anything on the k/v path this pass does not follow keeps the projection whole, with the reason.
The pass decides only; it changes the planner's state and the edit list, never the graph.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from tpshard.compiler import analysis as A
from tpshard.compiler.ir import Op, shape_of
from tpshard.plan import Edit

__all__ = ["replicate_kv_heads", "KEPT_WHOLE_PREFIX"]

#: The planner's reason for a k/v projection kept whole beside split query heads.
KEPT_WHOLE_PREFIX = "kept whole, sliced where it meets the split heads"


class _NotExact(Exception):
    """Replication cannot follow this path exactly: the message says why."""


def replicate_kv_heads(pl: Any, edits: list[Edit], grads: set[fx.Node], enabled: bool = True) -> list[Edit]:
    """Replicate the kv heads of every k/v projection the planner kept whole beside split
    heads, where that is exact; the edit list after (see the module docstring).

    ``pl`` is the planner (state, reasons, ops; ``pl.replicas`` records param -> replicas).
    ``grads``: the nodes a gradient reaches. ``enabled`` False (in-place plans) keeps them whole.
    """
    W = pl.world_size
    scatters = {e.node: e for e in edits if e.kind == "scatter"}
    for op in pl.ops:
        # A projection kept whole (not by an override) whose output reaches a slice of split heads.
        if op.kind != "linear" or pl.state.styles.get(op.name) != "replicate" or pl.override(op) == "replicate" \
                or not _reaches_scatter(pl, op, scatters):
            continue
        if not enabled:
            why = "replicated kv heads need the graph (in-place mode keeps them whole)"
        else:
            try:
                edits = _replicate(pl, op, edits, scatters, grads, W)
                continue
            except _NotExact as e:
                why = str(e)
        pl.reasons[op.name] = f"kept whole because {why}; " + pl.reasons.get(op.name, "kept whole")
    return edits


def _reaches_scatter(pl: Any, lin: Op, scatters: dict[str, Edit]) -> bool:
    """Does the projection's output reach a scatter (a slice of split heads) before any contraction?"""
    stop = ("linear", "sdpa", "matmul", "output", "embedding")
    return any(n.name in scatters for n in pl.reachable(lin.node, lambda o: o.kind not in stop))


def _replicate(pl: Any, lin: Op, edits: list[Edit], scatters: dict[str, Edit], grads: set[fx.Node],
               W: int) -> list[Edit]:
    """The edits with ``lin``'s kv heads replicated (the planner's state updated), or _NotExact."""
    ops, index = pl.ops, pl.index
    weight, bias = lin.attrs["weight"], lin.attrs.get("bias")
    for name in (weight, bias):
        if name and (pl.canon.get(name, name) != name or any(c == name for a, c in pl.canon.items() if a != c)):
            raise _NotExact(f"its parameter {name!r} is tied")
    if sum(o.kind == "linear" and o.attrs.get("weight") == weight for o in ops) != 1:
        raise _NotExact(f"its weight {weight!r} is used more than once")
    if lin.attrs.get("transposed") or lin.attrs.get("conv") or lin.attrs.get("out_dim", -1) % len(shape_of(lin.node)) \
            != len(shape_of(lin.node)) - 1:
        raise _NotExact("its output features are not the last dim of a plain linear")

    if isinstance(pl.state.place.get(lin.tensors[0]), A.Split):
        raise _NotExact("its input is split")

    # The path from the projection to the scatters after repeat_kv, in graph order.
    path: dict[fx.Node, None] = {}
    terminals: list[fx.Node] = []
    stack = [lin.node]
    while stack:
        n = stack.pop()
        for u in n.users:
            uop = ops[index[u]]
            if uop.kind in ("size", "item", "input") or u in path:  # sizes (checked below), asserts
                continue
            if uop.kind in ("linear", "sdpa", "matmul", "output", "opaque", "embedding", "softmax"):
                raise _NotExact(f"its output reaches {uop.kind} node {u.name!r} before the repeat to the query heads")
            path[u] = None
            if u.name in scatters:
                terminals.append(u)
            else:
                stack.append(u)
    if not terminals:
        raise _NotExact("no repeat to the query heads was found after it")
    t0 = terminals[0]
    e0 = scatters[t0.name]
    H, hd = shape_of(t0)[e0.dim], shape_of(t0)[-1]
    F = shape_of(lin.node)[-1]
    if F % hd:
        raise _NotExact(f"its {F} output features are not whole heads of {hd}")
    K = F // hd
    if H % W:
        raise _NotExact(f"the {H} query heads are not divisible by the world size {W}")
    if W % K or H % K:
        raise _NotExact(f"the world size {W} is not a multiple of its {K} kv heads (a rank's query heads would "
                        "use parts of two kv heads)")
    R = W // K
    k_local = K * R // W  # == 1: one kv head per rank
    q_local = H // W

    state: dict[fx.Node, tuple] = {lin.node: ("feat", len(shape_of(lin.node)) - 1)}
    new_edits: list[Edit] = []
    order = sorted(path, key=lambda n: index[n])
    for n in order:
        op = ops[index[n]]
        on = [t for t in op.tensors if t in state]
        if len(on) < sum(t in path for t in op.tensors):
            raise _NotExact(f"node {n.name!r} takes a value of the path before it is computed")
        states = {state[t] for t in on}
        if len(states) != 1:
            raise _NotExact(f"node {n.name!r} joins the kv heads laid out differently")
        kind, d = next(iter(states))
        out = shape_of(n)
        src = shape_of(on[0])
        if out is None or src is None:
            raise _NotExact(f"node {n.name!r} has no known shape")
        if kind == "heads":
            raise _NotExact(f"node {n.name!r} uses the repeated heads beside attention")
        if op.kind == "pointwise":
            if len(out) != len(src):
                raise _NotExact(f"pointwise node {n.name!r} broadcasts the kv heads to another rank")
            for t in op.tensors:
                if t in state:
                    continue
                ts = shape_of(t)
                pos = d - (len(out) - len(ts)) if ts is not None else -1
                if ts is not None and 0 <= pos < len(ts) and ts[pos] != 1:
                    raise _NotExact(f"node {n.name!r} combines the kv heads with {t.name!r}, which has them too")
                if t in grads:
                    if t.op == "get_attr" and t.target in pl.param_shapes:  # a k-norm weight: partial per rank
                        new_edits.append(Edit(kind="copy", node=t.name, users=[n.name]))
                    else:
                        raise _NotExact(f"node {n.name!r} combines the kv heads with {t.name!r}, which carries a "
                                        "gradient")
            state[n] = (kind, d)
        elif op.kind == "norm":
            if d >= len(out) - op.attrs["ndims"]:
                raise _NotExact(f"norm {n.name!r} normalizes over the kv heads")
            if any(t not in state and t in grads for t in op.tensors):
                raise _NotExact(f"norm {n.name!r} takes a parameter as a graph value")
            if op.attrs.get("has_params"):
                new_edits.append(Edit(kind="copy_params", node=n.name))
            state[n] = (kind, d)
        elif op.kind == "reduce":
            dims = [x % len(src) for x in op.attrs["dims"]]
            if d in dims or not op.attrs["keepdim"]:
                raise _NotExact(f"reduction {n.name!r} is over the kv heads or drops dims")
            state[n] = (kind, d)
        elif op.kind == "dims":
            if kind == "feat" or d in [x % len(src) for x in op.attrs["slices"]] or d not in op.attrs["map"]:
                raise _NotExact(f"node {n.name!r} cuts or drops the kv heads")
            state[n] = (kind, op.attrs["map"].index(d))
        elif op.kind == "cat":
            if len(on) != len(op.tensors) or op.attrs["dim"] % len(out) == d:
                raise _NotExact(f"cat {n.name!r} joins values off the path or along the kv heads")
            state[n] = (kind, d)
        elif op.kind == "view" and kind == "feat":
            if len(out) != len(src) + 1 or tuple(out[:-2]) != tuple(src[:-1]) or out[-2:] != (K, hd):
                raise _NotExact(f"view {n.name!r} does not split the features into ({K}, {hd}) heads")
            new_edits.append(Edit(kind="shape", node=n.name, dim=len(out) - 2, size=k_local))
            state[n] = ("kv", len(out) - 2)
        elif op.kind == "expand" and kind == "kv":
            if (len(out) != len(src) or d + 1 >= len(out) or src[d + 1] != 1 or out[d] != K or out[d + 1] != H // K
                    or any(a != b for i, (a, b) in enumerate(zip(src, out)) if i != d + 1 and b != -1)):
                raise _NotExact(f"expand {n.name!r} is not repeat_kv's (B, {K}, {H // K}, T, hd)")
            new_edits.append(Edit(kind="shape", node=n.name, dim=d, size=k_local))
            new_edits.append(Edit(kind="shape", node=n.name, dim=d + 1, size=q_local // k_local))
            state[n] = ("rep", d)
        elif op.kind == "view" and kind == "rep":
            if (len(out) != len(src) - 1 or out[d] != H or tuple(out[:d]) != tuple(src[:d])
                    or tuple(out[d + 1:]) != tuple(src[d + 2:])):
                raise _NotExact(f"reshape {n.name!r} does not merge the repeated kv heads into {H} heads")
            new_edits.append(Edit(kind="shape", node=n.name, dim=d, size=q_local))
            state[n] = ("heads", d)
        else:
            raise _NotExact(f"{op.kind} node {n.name!r} on the k/v path is not one the replicated layout follows")
        _check_sizes(n, *state[n], ops, index)
        if n.name in scatters:
            e = scatters[n.name]
            if state[n] != ("heads", e.dim % len(out)) or e.segments is not None or e.reduced:
                raise _NotExact(f"the slice {n.name!r} is not of the query heads' contiguous layout")
            if any(u.name not in e.users for u in n.users):
                raise _NotExact(f"the repeated heads {n.name!r} have users besides attention")

    # Commit: the projection is split by kv heads with R replicas; its input enters through a copy.
    x = lin.tensors[0]
    gone = {t.name for t in terminals}
    out_edits = [e for e in edits if not (e.kind == "scatter" and e.node in gone)]
    copy = next((e for e in out_edits if e.kind == "copy" and e.node == x.name), None)
    if copy is None:
        out_edits.append(Edit(kind="copy", node=x.name, users=[lin.name]))
    elif lin.name not in copy.users:
        copy.users.append(lin.name)
    merged: dict[str, Edit] = {}  # copies of one parameter for several users: one copy
    for e in new_edits:
        if e.kind == "copy":
            if e.node in merged:
                merged[e.node].users.extend(u for u in e.users if u not in merged[e.node].users)
                continue
            merged[e.node] = e
        out_edits.append(e)
    out_edits.append(Edit(kind="replica_grad", node=lin.name, size=R))
    pl.state.styles[lin.name] = "column"
    for name in (weight, bias):
        if name:
            pl.state.params[name] = (0, pl.state.layouts.new(F, (F,)))
            pl.replicas[name] = R
    pl.reasons[lin.name] = (f"kv heads replicated {R}-fold: {K} kv head{'s' if K > 1 else ''} over {W} ranks, rank r holds kv head "
                            f"r // {R} (the one its {q_local} query head{'s' if q_local > 1 else ''} use{'' if q_local > 1 else 's'}); its gradient all-reduced among "
                            f"the {R} ranks that hold it")
    return out_edits


def _check_sizes(n: fx.Node, kind: str, d: int, ops: list[Op], index: dict) -> None:
    """Sizes read from the path must not be of the kv-head (or fused feature) dim, which is local."""
    special = {d} if kind in ("kv", "feat") else {d, d + 1}
    ndim = len(shape_of(n))
    for u in n.users:
        uop = ops[index[u]]
        if uop.kind != "size":
            continue
        dim = uop.attrs.get("dim")
        if dim is not None and dim % ndim in special:
            raise _NotExact(f"size {u.name!r} reads the kv-head dim")
        if dim is None:
            for v in u.users:
                vop = ops[index[v]]
                idx = vop.attrs.get("index")
                if vop.kind != "item" or not isinstance(idx, int) or idx % ndim in special:
                    raise _NotExact(f"size {u.name!r} is read whole or at the kv-head dim")
