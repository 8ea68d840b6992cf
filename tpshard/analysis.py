"""Sharding propagation: the placement of every value, one op at a time.

A value's placement is one of

- ``REPLICATED`` (R): every rank holds the whole value;
- :class:`Split` S(d): rank r holds its part of dim ``d``, laid out as the segments of a
  :class:`Layouts` variable (see :mod:`tpshard.layout`);
- :class:`Partial` P: every rank holds a partial sum; one all-reduce gives the value, then
  the pending row biases are added once;
- :class:`SplitSize`: a Python int that is the size of a split dim (only shape arguments,
  which the rewriter replaces, may consume it).

:func:`transfer` is the rule table: from an op's input placements it gives the output
placement and what each input must be (an input that is P where R is needed gets an
all-reduce; R where S is needed gets a local slice, free when it needs no gradient; S where
R is needed is a failure except at the graph's output, where it is gathered).
Rules never mutate the graph; decisions they need (a linear reached by a split value becomes
row-parallel; a free layout gets pinned) go through the ``Decider`` callbacks, so the planner
owns every choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from tpshard import layout
from tpshard.ir import Op, shape_of

__all__ = ["REPLICATED", "Split", "Partial", "SplitSize", "Layouts", "Fail", "Decider", "transfer", "view_groups",
           "check_segments"]


REPLICATED = None


@dataclass(frozen=True)
class Split:
    dim: int
    var: int  # layout variable (Layouts)


@dataclass(frozen=True)
class Partial:
    # Replicated terms to add once after the reduce: row-bias parameter names, and "%node" for
    # a replicated value that was added to the partial sum (so P + R + P needs one reduce).
    biases: frozenset = frozenset()


@dataclass(frozen=True)
class SplitSize:
    pass


class Fail(Exception):
    """The op cannot take the placement its inputs have. ``divisibility``: only a size is off."""

    def __init__(self, op: Op, reason: str, divisibility: bool = False) -> None:
        super().__init__(f"{op.node.format_node()}: {reason}")
        self.op = op
        self.reason = reason
        self.divisibility = divisibility


class Layouts:
    """Union-find over layout variables; a variable is free (None) or pinned to segments."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.value: dict[int, tuple[int, ...] | None] = {}
        self.size: dict[int, int] = {}

    def copy(self) -> "Layouts":
        c = Layouts()
        c.parent, c.value, c.size = dict(self.parent), dict(self.value), dict(self.size)
        return c

    def new(self, size: int, value: Sequence[int] | None = None) -> int:
        v = len(self.parent)
        self.parent[v] = v
        self.size[v] = size
        self.value[v] = tuple(value) if value is not None else None
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def get(self, v: int) -> tuple[int, ...] | None:
        return self.value[self.find(v)]

    def pin(self, v: int, value: Sequence[int]) -> bool:
        """Pin ``v``; False when it is already pinned to something else."""
        r = self.find(v)
        value = tuple(value)
        if self.value[r] is None:
            self.value[r] = value
            return True
        return self.value[r] == value

    def unify(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        va, vb = self.value[ra], self.value[rb]
        if va is not None and vb is not None and va != vb:
            return False
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        self.value[ra] = va if va is not None else vb
        return True


class Decider(Protocol):
    """What the rules may ask of the planner while propagating."""

    world_size: int
    layouts: Layouts

    def linear_style(self, op: Op) -> str | None:
        """"column", "row", "replicate", or None while undecided."""

    def make_row(self, op: Op, var: int) -> None:
        """A split value reached an undecided linear's input: it becomes row-parallel."""

    def embedding_style(self, op: Op) -> str | None:
        """"vocab", "embed_dim", "replicate" or None."""

    def column_var(self, op: Op) -> int:
        """The layout variable of a column-parallel linear's output features."""

    def choose(self, op: Op, candidates: list[Any]) -> Any:
        """Pick one of several valid options (the planner may backtrack)."""


# What each input must be: SAME (take it as it is), R (replicated), or a Split.
SAME = "same"


def check_segments(d: Decider, op: Op, segments: Sequence[int], what: str) -> None:
    """Fail (a divisibility failure) naming ``what`` unless every segment splits over the world."""
    try:
        layout.check_divisible(sum(segments), segments, d.world_size, what)
    except ValueError as e:
        raise Fail(op, str(e), divisibility=True) from None


def transfer(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    """The output placement of ``op`` and the required placement of each input (see module doc)."""
    if not any(p is not REPLICATED for p in ins) and op.kind not in ("linear", "embedding"):
        return (_replicated_output(op), [SAME] * len(ins))
    rule = _RULES.get(op.kind, _opaque)
    return rule(op, ins, d)


def _replicated_output(op: Op) -> Any:
    if op.kind == "split":
        return [REPLICATED] * len(op.attrs["sizes"])
    return REPLICATED


def _need_r(op: Op, ins: list[Any]) -> list[Any]:
    """Every partial input reduced; a split input cannot be made replicated here."""
    for i, p in enumerate(ins):
        if isinstance(p, Split):
            raise Fail(op, f"input {i} is split on dim {p.dim} but this op needs the whole tensor")
        if isinstance(p, SplitSize):
            raise Fail(op, "uses the size of a split dim")
    return [REPLICATED] * len(ins)


def _opaque(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    if any(isinstance(p, Split) for p in ins):
        raise Fail(op, f"{op.attrs.get('why', op.kind)} is not understood on a split input")
    return _replicated_output(op), _need_r(op, ins)


def _output(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    # Split outputs are gathered, partial ones reduced: the module returns what the original does.
    return None, [REPLICATED if not isinstance(p, SplitSize) else SAME for p in ins]


def _linear(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    style = d.linear_style(op)
    in_nd = len(shape_of(op.tensors[0]))
    if isinstance(x, Split):
        if x.dim != in_nd - 1:
            raise Fail(op, f"input split on dim {x.dim}, not on the features this linear contracts")
        if style is None:
            d.make_row(op, x.var)
            style = "row"
        if style != "row":
            raise Fail(op, f"a split value reaches the input of a linear planned as {style}")
        return Partial(frozenset([op.attrs["bias"]]) if op.attrs["bias"] else frozenset()), [SAME]
    if style == "row":
        raise Fail(op, "planned as row-parallel but its input is not split on the features")
    if style == "column":
        out_nd = len(shape_of(op.node))
        return Split(out_nd - 1, d.column_var(op)), [REPLICATED]
    return REPLICATED, [REPLICATED]


def _embedding(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    if isinstance(ins[0], Split):
        raise Fail(op, "embedding ids are split")
    style = d.embedding_style(op)
    if style == "vocab":
        return Partial(), [REPLICATED]
    return REPLICATED, [REPLICATED]


def _aligned(shape_out: tuple, shape_in: tuple, dim_out: int) -> int | None:
    """The input dim that broadcasts to output dim ``dim_out`` (right-aligned), or None."""
    k = dim_out - (len(shape_out) - len(shape_in))
    return k if 0 <= k < len(shape_in) else None


# Ops a partial sum passes through unreduced (a dropout does not: each rank would draw its own mask).
_PASS_PARTIAL_UNARY = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as",
                       "Identity"}


def _pointwise(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    out_shape = shape_of(op.node)
    splits = [(i, p) for i, p in enumerate(ins) if isinstance(p, Split)]
    partials = [i for i, p in enumerate(ins) if isinstance(p, Partial)]
    linear_in = op.attrs.get("linear_in", set())
    if partials and not splits:
        fn = op.attrs.get("fn")
        tensors_are_partial = len(partials) == len(ins)
        if fn in ("add",) and tensors_are_partial and linear_in == set(range(len(ins))):
            return Partial(frozenset().union(*(ins[i].biases for i in partials))), [SAME] * len(ins)
        if fn == "add" and len(ins) == 2 and linear_in == {0, 1}:
            (i,) = partials
            r = op.tensors[1 - i]
            if ins[1 - i] is REPLICATED and shape_of(r) is not None:
                return Partial(ins[i].biases | {f"%{r.name}"}), [SAME, SAME]
        if len(ins) == 1 and fn in _PASS_PARTIAL_UNARY and _same_dtype(op.node, op.tensors[0]):
            return ins[0], [SAME]  # (a cast that rounds would round each partial: reduce first)
        if fn in ("mul", "div", "neg") and linear_in == {0} and len(ins) == 1 and not ins[0].biases:
            return ins[0], [SAME]  # scaled by a number
        return REPLICATED, _need_r(op, ins)
    if not splits:
        return REPLICATED, _need_r(op, ins)
    # The split output dim, from the first split input; every other input must agree.
    i0, p0 = splits[0]
    sh0 = shape_of(op.tensors[i0])
    dim_out = p0.dim + (len(out_shape) - len(sh0))
    needs: list[Any] = []
    for i, p in enumerate(ins):
        shp = shape_of(op.tensors[i])
        k = _aligned(out_shape, shp, dim_out)
        if isinstance(p, Split):
            if k != p.dim:
                raise Fail(op, f"inputs are split on different dims ({p0.dim} and {p.dim})")
            if not d.layouts.unify(p.var, p0.var):
                raise Fail(op, "inputs are split with different layouts")
            needs.append(SAME)
        elif k is None or shp[k] == 1:
            needs.append(REPLICATED if isinstance(p, Partial) else SAME)  # broadcasts along the split
        else:
            needs.append(Split(k, p0.var))  # replicated or partial: this rank's slice of it
    return Split(dim_out, p0.var), needs


def _same_dtype(a: Any, b: Any) -> bool:
    def dtype(n: Any) -> Any:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "dtype"):
            return meta.dtype
        val = n.meta.get("val")
        return getattr(val, "dtype", None)
    da, db = dtype(a), dtype(b)
    return da is not None and da == db


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
        return _opaque(op, ins, d)
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
        return _opaque(op, ins, d)
    if x.dim in op.attrs["slices"]:
        raise Fail(op, f"indexes or slices the split dim {x.dim}")
    mapping = op.attrs["map"]
    if x.dim not in mapping:
        raise Fail(op, f"drops the split dim {x.dim}")
    return Split(mapping.index(x.dim), x.var), [SAME] * len(ins)


def _expand(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, _need_r(op, ins)
    extra = len(shape_of(op.node)) - len(shape_of(op.tensors[0]))
    return Split(x.dim + extra, x.var), [SAME]


def _split(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    sizes = op.attrs["sizes"]
    if not isinstance(x, Split):
        return [REPLICATED] * len(sizes), _need_r(op, ins)
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
        return REPLICATED, _need_r(op, ins)
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


def _matmul(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    if len(ins) != 2:
        return _opaque(op, ins, d)
    a, b = ins
    sa, sb, so = shape_of(op.tensors[0]), shape_of(op.tensors[1]), shape_of(op.node)
    if len(sa) < 2 or len(sb) < 2:
        return _opaque(op, ins, d)
    if isinstance(a, Partial) or isinstance(b, Partial):
        # A partial operand is reduced first (a product is not linear in both operands at once).
        fixed = [REPLICATED if isinstance(p, Partial) else p for p in ins]
        out, needs = _matmul(op, fixed, d) if any(isinstance(p, Split) for p in fixed) else (REPLICATED, [SAME] * 2)
        return out, [REPLICATED if isinstance(p, Partial) and n == SAME else n for p, n in zip(ins, needs)]
    na, nb, no = len(sa), len(sb), len(so)
    # Classify each split: batch dim (aligned to output), m (a's rows), n (b's cols), k (contraction).
    def role(p: Split | None, which: str) -> tuple[str, int] | None:
        if not isinstance(p, Split):
            return None
        nd = na if which == "a" else nb
        if p.dim == nd - 2:
            return ("m", no - 2) if which == "a" else ("k", -1)
        if p.dim == nd - 1:
            return ("k", -1) if which == "a" else ("n", no - 1)
        return ("batch", p.dim + (no - nd))
    ra, rb = role(a, "a"), role(b, "b")
    ref = a if ra else b
    r = ra or rb
    kind, out_dim = r
    if ra and rb:
        if ra != rb or not d.layouts.unify(a.var, b.var):
            raise Fail(op, f"operands split on incompatible dims ({ra[0]} and {rb[0]})")
        return (Partial() if kind == "k" else Split(out_dim, ref.var)), [SAME, SAME]
    other_shape, other_nd = (sb, nb) if ra else (sa, na)
    if kind == "batch":
        k = out_dim - (no - other_nd)
        if k < 0 or k >= other_nd - 2 or other_shape[k] == 1:
            need = SAME
        else:
            need = Split(k, ref.var)
        return Split(out_dim, ref.var), ([SAME, need] if ra else [need, SAME])
    if kind == "k":
        need = Split(other_nd - 2, ref.var) if ra else Split(other_nd - 1, ref.var)
        return Partial(), ([SAME, need] if ra else [need, SAME])
    return Split(out_dim, ref.var), [SAME, SAME]  # m or n: the other operand stays whole


def _sdpa(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    q, k, v = ins[:3]
    shapes = [shape_of(t) for t in op.tensors]
    heads_dim = [len(s) - 3 for s in shapes[:3]]
    splits = [p for p in (q, k, v) if isinstance(p, Split)]
    if not splits:
        return REPLICATED, _need_r(op, ins)
    ref = splits[0]
    needs: list[Any] = []
    for i, p in enumerate((q, k, v)):
        if isinstance(p, Split):
            if p.dim != heads_dim[i]:
                raise Fail(op, f"attention operand {'qkv'[i]} is split on dim {p.dim}, not on the heads")
            if shapes[i][heads_dim[i]] == shapes[0][heads_dim[0]]:
                if not d.layouts.unify(p.var, ref.var):
                    raise Fail(op, "q, k and v split with different layouts")
            else:  # grouped-query: both sides must be contiguous head blocks
                for v_ in (p.var, ref.var):
                    if d.layouts.get(v_) is None:
                        d.layouts.pin(v_, (d.layouts.size[d.layouts.find(v_)],))
                if len(d.layouts.get(p.var)) != 1 or len(d.layouts.get(ref.var)) != 1:
                    raise Fail(op, "grouped-query attention needs contiguous head blocks")
            needs.append(SAME)
        else:
            needs.append(Split(heads_dim[i], ref.var) if shapes[i][heads_dim[i]] == shapes[0][heads_dim[0]]
                         else Split(heads_dim[i], d.layouts.new(shapes[i][heads_dim[i]], (shapes[i][heads_dim[i]],))))
    if len(ins) > 3:  # the mask broadcasts along the heads, or is sliced like q
        m = ins[3]
        ms = shapes[3]
        k_ = len(ms) - 3
        if isinstance(m, Split):
            if m.dim != k_ or not d.layouts.unify(m.var, ref.var):
                raise Fail(op, "the attention mask is split differently from the heads")
            needs.append(SAME)
        elif k_ < 0 or ms[k_] == 1:
            needs.append(REPLICATED)
        else:
            needs.append(Split(k_, ref.var))
    out_nd = len(shape_of(op.node))
    return Split(out_nd - 3, q.var if isinstance(q, Split) else ref.var), needs


def _softmax(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, _need_r(op, ins)
    nd = len(shape_of(op.node))
    if op.attrs["dim"] is None or op.attrs["dim"] % nd == x.dim:
        raise Fail(op, "softmax over the split dim")
    return x, [SAME]


def _reduce(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, _need_r(op, ins)
    dims = op.attrs["dims"]
    if x.dim in dims:
        raise Fail(op, f"reduces over the split dim {x.dim}")
    shift = 0 if op.attrs["keepdim"] else sum(1 for k in dims if k < x.dim)
    return Split(x.dim - shift, x.var), [SAME]


def _norm(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, _need_r(op, ins)
    nd = len(shape_of(op.node))
    if x.dim >= nd - op.attrs["ndims"]:
        raise Fail(op, f"normalizes over the split dim {x.dim}")
    if op.attrs["has_params"]:
        raise Fail(op, "a norm with replicated parameters on a split value would get partial gradients")
    return x, [SAME]


def _size(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if isinstance(x, Split) and op.attrs["dim"] is not None:
        nd = len(shape_of(op.tensors[0]))
        return (SplitSize() if op.attrs["dim"] % nd == x.dim else REPLICATED), [SAME]
    if isinstance(x, Split):
        return [SplitSize() if i == x.dim else REPLICATED for i in range(len(shape_of(op.tensors[0])))], [SAME]
    return REPLICATED, [SAME]


_RULES = {
    "output": _output,
    "linear": _linear,
    "embedding": _embedding,
    "pointwise": _pointwise,
    "view": _view,
    "dims": _dims,
    "expand": _expand,
    "split": _split,
    "item": _item,
    "cat": _cat,
    "stack": _cat,
    "matmul": _matmul,
    "sdpa": _sdpa,
    "softmax": _softmax,
    "reduce": _reduce,
    "norm": _norm,
    "size": _size,
}
