"""Sharding rules for ops that move data without computing: reshapes, transposes and
indexing, expand, split/chunk, tuple items, concatenation, and sizes.

Each rule maps an op's input placements to (output placement, what each input must be);
see :mod:`tpshard.compiler.placement`. A reshape that factors a split dim chooses which factor carries
the split (the heads, not the 3 of a fused q/k/v) through the Decider, which can backtrack.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from tpshard import layout
from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.placement import (REPLICATED, SAME, Decider, Fail, Partial, Split, SplitSize, check_segments,
                               need_replicated, opaque)

__all__ = ["view_groups", "SHAPE_RULES"]


def view_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (the blocks a reshape maps)."""
    groups = []
    i = j = 0
    ni, no = len(in_shape), len(out_shape)
    while i < ni or j < no:
        gi, go = [], []
        pi = po = 1
        while True:
            if pi == po and gi and go:
                # absorb trailing size-1 dims into the current block
                while i < ni and in_shape[i] == 1 and (j >= no or out_shape[j] != 1):
                    gi.append(i); i += 1
                while j < no and out_shape[j] == 1 and (i >= ni or in_shape[i] != 1):
                    go.append(j); j += 1
                break
            if (pi <= po and i < ni) or j >= no:
                if i >= ni:
                    break
                pi *= in_shape[i]; gi.append(i); i += 1
            else:
                po *= out_shape[j]; go.append(j); j += 1
        groups.append((gi, go))
        if pi != po:
            break
    return groups


def _periodic(flat: list[int], outer: int) -> list[int] | None:
    if outer <= 0 or len(flat) % outer:
        return None
    k = len(flat) // outer
    pat = flat[:k]
    return pat if pat * outer == flat else None


def _view(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if isinstance(x, Partial):
        if not x.biases:
            return x, [SAME]  # a reshape is linear
        return REPLICATED, [REPLICATED]
    if not isinstance(x, Split):
        return opaque(op, ins, d)
    in_shape, out_shape = shape_of(op.tensors[0]), shape_of(op.node)
    group = next(((gi, go) for gi, go in view_groups(in_shape, out_shape) if x.dim in gi), None)
    if group is None or not group[1]:
        raise Fail(op, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} does not keep split dim {x.dim}")
    gi, go = group
    if len(gi) == 1 and len(go) == 1:  # the split dim itself passes unchanged (e.g. (B*T, F) -> (B, T, F))
        return Split(go[0], x.var), [SAME]
    a = gi[0]
    inner_in = math.prod(in_shape[x.dim + 1: gi[-1] + 1])
    outer_in = math.prod(in_shape[a: x.dim])
    n = d.world_size
    layout_in = d.layouts.get(x.var)

    def candidate(j: int, flat: list[int]) -> tuple[int, list[int]] | None:
        outer_j = math.prod(out_shape[go[0]: j])
        inner_j = math.prod(out_shape[j + 1: go[-1] + 1])
        pat = _periodic(flat, outer_j)
        if pat is None or any(s % inner_j for s in pat):
            return None
        local = [s // inner_j for s in pat]
        if sum(local) != out_shape[j]:
            return None
        return (j, local)

    if layout_in is not None:
        flat = [s * inner_in for s in layout_in] * outer_in
        found = [c for c in (candidate(j, flat) for j in go) if c is not None]
        for j, local in found:
            if all(s % n == 0 for s in local):
                return Split(j, d.layouts.new(out_shape[j], local)), [SAME]
        if found:
            j, local = found[0]
            check_segments(d, op, local, f"dim {j} of the reshape to {tuple(out_shape)}")
        raise Fail(op, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} cannot carry the split of dim {x.dim} "
                       f"(layout {list(layout_in)})")
    # A free layout: choose which output dim carries the split, and pin the input layout to match.
    options: list[Any] = []
    skipped = [j for j in go if out_shape[j] % n and out_shape[j] > 1]
    for j in go:
        if out_shape[j] % n or out_shape[j] == 1:
            continue
        outer_j = math.prod(out_shape[go[0]: j])
        inner_j = math.prod(out_shape[j + 1: go[-1] + 1])
        flat = [out_shape[j] * inner_j] * outer_j
        pat = _periodic(flat, outer_in)
        if pat is None or any(s % inner_in for s in pat):
            continue
        seg_in = [s // inner_in for s in pat]
        if any(s % n for s in seg_in):
            continue
        options.append((j, seg_in))
    if skipped:  # tried last: the dim a split would naturally fall on, whose size is off
        options.append(None)
    if not options:
        raise Fail(op, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} cannot carry the split of dim {x.dim}")
    choice = d.choose(op, options)
    if choice is None:
        j = skipped[0]
        valid = layout.valid_world_sizes([out_shape[j]])
        raise Fail(op, f"dim {j} (size {out_shape[j]}) of the reshape to {tuple(out_shape)} is not divisible by "
                       f"the world size {n}; world sizes that divide it: {valid}", divisibility=True)
    j, seg_in = choice
    d.layouts.pin(x.var, seg_in)
    return Split(j, d.layouts.new(out_shape[j], (out_shape[j],))), [SAME]


def _dims(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins[:1]
    if isinstance(x, Partial):
        if not x.biases and not op.attrs["slices"]:
            return x, [SAME]
        return REPLICATED, [REPLICATED]
    if not isinstance(x, Split):
        return opaque(op, ins, d)
    if x.dim in op.attrs["slices"]:
        raise Fail(op, f"indexes or slices the split dim {x.dim}")
    mapping = op.attrs["map"]
    if x.dim not in mapping:
        raise Fail(op, f"drops the split dim {x.dim}")
    return Split(mapping.index(x.dim), x.var), [SAME] * len(ins)


def _expand(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, need_replicated(op, ins)
    extra = len(shape_of(op.node)) - len(shape_of(op.tensors[0]))
    return Split(x.dim + extra, x.var), [SAME]


def _split(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    sizes = op.attrs["sizes"]
    if not isinstance(x, Split):
        return [REPLICATED] * len(sizes), need_replicated(op, ins)
    if x.dim != op.attrs["dim"]:
        # unbind removes its dim: a split dim after it moves down by one
        moved = x.dim - 1 if op.attrs["unbind"] and x.dim > op.attrs["dim"] else x.dim
        return [Split(moved, x.var)] * len(sizes), [SAME]
    if op.attrs["unbind"]:
        raise Fail(op, "unbinds the split dim")
    # Splitting the split dim into pieces: each piece must own whole segments of the layout.
    layout_in = d.layouts.get(x.var)
    if layout_in is None:
        check_segments(d, op, sizes, f"the pieces {sizes} of the split")
        d.layouts.pin(x.var, sizes)
        layout_in = tuple(sizes)
    out = []
    segs = list(layout_in)
    for size in sizes:
        piece = []
        while segs and sum(piece) < size:
            piece.append(segs.pop(0))
        if sum(piece) != size:
            raise Fail(op, f"pieces {sizes} do not align with the layout {list(layout_in)} of the split dim")
        out.append(Split(x.dim, d.layouts.new(size, piece)))
    return out, [SAME]


def _item(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if isinstance(x, list):
        return x[op.attrs["index"]], [SAME]
    if isinstance(x, Split):
        raise Fail(op, "takes an element of a split value")
    return REPLICATED, [SAME]


def _cat(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    nd = len(shape_of(op.node))
    dim = op.attrs["dim"] % (nd if op.kind == "cat" else nd)
    splits = [p for p in ins if isinstance(p, Split)]
    if not splits:
        return REPLICATED, need_replicated(op, ins)
    s0 = splits[0]
    if op.kind == "stack":
        out_dim = s0.dim + (1 if s0.dim >= dim else 0)
    else:
        out_dim = s0.dim
        if s0.dim == dim:
            raise Fail(op, "concatenates along the split dim")
    needs = []
    for p in ins:
        if isinstance(p, Split):
            if p.dim != s0.dim or not d.layouts.unify(p.var, s0.var):
                raise Fail(op, "inputs are split differently")
            needs.append(SAME)
        else:
            needs.append(Split(s0.dim, s0.var))
    return Split(out_dim, s0.var), needs


def _size(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if isinstance(x, Split) and op.attrs["dim"] is not None:
        nd = len(shape_of(op.tensors[0]))
        return (SplitSize() if op.attrs["dim"] % nd == x.dim else REPLICATED), [SAME]
    if isinstance(x, Split):
        return [SplitSize() if i == x.dim else REPLICATED for i in range(len(shape_of(op.tensors[0])))], [SAME]
    return REPLICATED, [SAME]


SHAPE_RULES = {
    "view": _view,
    "dims": _dims,
    "expand": _expand,
    "split": _split,
    "item": _item,
    "cat": _cat,
    "stack": _cat,
    "size": _size,
}
