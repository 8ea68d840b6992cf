"""Sharding propagation: the placement of every value, one op at a time.

Placements (R, S(d), P, and split sizes) are defined in :mod:`tpshard.compiler.placement`.
:func:`transfer` is the rule table: from an op's input placements it gives the output
placement and what each input must be (an input that is P where R is needed gets an
all-reduce; R where S is needed gets a local slice, free when it needs no gradient; S where
R is needed is a failure except at the graph's output, where it is gathered). This module
holds the rules of ops that compute (linear, embedding, pointwise, matmul, attention, softmax,
reductions, norms); :mod:`tpshard.compiler.rules_shape` those that move data (reshapes, transposes,
splits, concatenation).

Rules never mutate the graph; decisions they need (a linear reached by a split value becomes
row-parallel; a free layout gets pinned) go through the ``Decider`` callbacks, so the planner
owns every choice.
"""

from __future__ import annotations

from typing import Any

from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.placement import (REPLICATED, SAME, Decider, Fail, Layouts, Partial, Split, SplitSize,  # noqa: F401
                               check_segments, need_replicated, opaque, replicated_output)
from tpshard.compiler.rules_shape import SHAPE_RULES, view_groups  # noqa: F401

__all__ = ["REPLICATED", "SAME", "Split", "Partial", "SplitSize", "Layouts", "Fail", "Decider", "transfer",
           "partial_grad_inputs", "partial_grad_params", "view_groups", "check_segments"]


def transfer(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    """The output placement of ``op`` and the required placement of each input (see module doc)."""
    if not any(p is not REPLICATED for p in ins) and op.kind not in ("linear", "embedding", "experts"):
        return (replicated_output(op), [SAME] * len(ins))
    rule = _RULES.get(op.kind, opaque)
    return rule(op, ins, d)


def partial_grad_inputs(op: Op, ins: list[Any], needs: list[Any], out: Any) -> list[int]:
    """The inputs whose gradient each rank computes only in part (a partial sum over the ranks).

    Gradient placement, the mirror image of the forward rules: an op whose output is split
    sends back to each rank only its slice of the output's gradient. An input that is split
    too gets back its own slice (exact); an input sliced from a replicated value (need
    ``Split``) is gathered in backward by the slice's mirror image (exact); but a replicated
    input taken whole (need ``SAME``/``R``: a per-head norm weight, a broadcast learnable
    scale, a value broadcast along the split dim, the whole operand of a matmul, an attention
    mask) gets each rank's contribution only. Summed over the ranks it is the true gradient:
    one all-reduce in backward (a copy edit: forward identity), exactly like a column
    linear's input. A partial output passes the gradient back whole (the reduce's mirror
    image is the identity), and its replicated addend joins after the reduce, so only split
    outputs make partial gradients (a partial input reduced on the way in counts as
    replicated). Invariant, by induction over the graph in reverse: every
    replicated value's gradient is whole on every rank once these inputs are reduced.
    """
    if isinstance(out, Partial) and (op.kind == "experts" or _scales_partial(op, ins)):
        # Experts split along their hidden dim, or a partial sum times a per-token scale (a
        # shared expert's gate): the replicated operands' gradients are each rank's share.
        return [i for i, p in enumerate(ins) if p is REPLICATED]
    if not _has_split(out) or op.kind == "output":
        return []
    # A partial input that must be whole is reduced on this edge first, then taken whole: the
    # copy follows the reduce (scores q @ k^T over split head_dim, then times a split v).
    return [i for i, (p, need) in enumerate(zip(ins, needs))
            if (p is REPLICATED and (need == SAME or need is REPLICATED))
            or (isinstance(p, Partial) and need is REPLICATED)]


def partial_grad_params(op: Op, out: Any) -> bool:
    """Do the parameters a module holds itself (not graph tensors) get partial gradients here?

    Only a norm module keeps its parameters replicated on a split value (a split linear or
    embedding shards its parameters; any other module on a split value is refused).
    """
    return op.kind == "norm" and op.node.op == "call_module" and op.attrs.get("has_params", False) \
        and _has_split(out)


def _scales_partial(op: Op, ins: list[Any]) -> bool:
    """A partial sum (no pending terms) times a replicated per-token scale (last dim 1, as a
    shared expert's sigmoid gate): stays partial, the scale's gradient all-reduced in backward
    (a collective of 1/d the size of reducing the product first)."""
    if op.kind != "pointwise" or op.attrs.get("fn") != "mul" or len(ins) != 2:
        return False
    kinds = [isinstance(p, Partial) and not p.biases for p in ins]
    if sorted(kinds) != [False, True] or ins[kinds.index(False)] is not REPLICATED:
        return False
    scale, value = shape_of(op.tensors[kinds.index(False)]), shape_of(op.tensors[kinds.index(True)])
    return (isinstance(scale, tuple) and isinstance(value, tuple) and len(scale) == len(value) and scale[-1] == 1
            and value[-1] > 1 and value == shape_of(op.node))


def _experts(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    """A routed experts region (tpshard.compiler.moe): split along the experts' hidden dim, it
    takes its inputs whole and returns a partial sum."""
    if any(isinstance(p, Split) for p in ins):
        raise Fail(op, "the experts' tokens or routing are split")
    if d.linear_style(op) in ("expert_tp", "expert_parallel"):
        return Partial(), [REPLICATED] * len(ins)
    return REPLICATED, need_replicated(op, ins)


def _has_split(p: Any) -> bool:
    if isinstance(p, (list, tuple)):
        return any(_has_split(x) for x in p)
    return isinstance(p, Split)


def _output(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    # Split outputs are gathered, partial ones reduced: the module returns what the original does.
    return None, [REPLICATED if not isinstance(p, SplitSize) else SAME for p in ins]


def _linear(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    style = d.linear_style(op)
    in_nd = len(shape_of(op.tensors[0]))
    out_nd = len(shape_of(op.node))
    # in_dim / out_dim: the contracted input dim and the output dim a column split splits (the
    # features; the channels of a 1x1 convolution; a label of an einsum with a parameter).
    if isinstance(x, Split):
        if x.dim != op.attrs.get("in_dim", -1) % in_nd:
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
        return Split(op.attrs.get("out_dim", -1) % out_nd, d.column_var(op)), [REPLICATED]
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
        # Partial sums that are only added share one reduce; a replicated term joins after it
        # ("%node@add": the value of node as the add sees it). A sum that is reduced for another
        # consumer anyway (the residual stream before a norm) joins as that reduced value, so
        # the next partial is reduced alone, as Megatron does, instead of carrying both.
        reduced = getattr(d, "reduced", frozenset())
        if fn == "add" and len(ins) == 2 and linear_in == {0, 1}:
            whole = [k for k in range(2) if ins[k] is REPLICATED or op.tensors[k].name in reduced]
            if len(whole) == 2:
                return REPLICATED, [REPLICATED, REPLICATED]
            if len(whole) == 1 and shape_of(op.tensors[whole[0]]) is not None:
                i = 1 - whole[0]
                term = f"%{op.tensors[whole[0]].name}@{op.name}"
                return Partial(ins[i].biases | {term}), [SAME if k == i else REPLICATED for k in range(2)]
        # Partial sums added share one reduce, and their deferred terms are added once after it;
        # a term in two addends (y + y) would be added once instead of twice: reduce first.
        terms = [t for i in partials for t in ins[i].biases]
        if fn in ("add",) and tensors_are_partial and linear_in == set(range(len(ins))) \
                and len(terms) == len(set(terms)):
            return Partial(frozenset(terms)), [SAME] * len(ins)
        if len(ins) == 1 and fn in _PASS_PARTIAL_UNARY and _same_dtype(op.node, op.tensors[0]):
            return ins[0], [SAME]  # (a cast that rounds would round each partial: reduce first)
        if fn in ("mul", "div", "neg") and linear_in == {0} and len(ins) == 1 and not ins[0].biases:
            return ins[0], [SAME]  # scaled by a number
        if _scales_partial(op, ins) and not any(t.name in reduced for t in op.tensors):
            return Partial(), [SAME, SAME]  # scaled per token (see partial_grad_inputs), unless reduced anyway
        return REPLICATED, need_replicated(op, ins)
    if not splits:
        return REPLICATED, need_replicated(op, ins)
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


def _matmul(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    if len(ins) != 2:
        return opaque(op, ins, d)
    a, b = ins
    sa, sb, so = shape_of(op.tensors[0]), shape_of(op.tensors[1]), shape_of(op.node)
    if len(sa) < 2 or len(sb) < 2:
        return opaque(op, ins, d)
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
        return REPLICATED, need_replicated(op, ins)
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
        return REPLICATED, need_replicated(op, ins)
    nd = len(shape_of(op.node))
    if op.attrs["dim"] is None or op.attrs["dim"] % nd == x.dim:
        raise Fail(op, "softmax over the split dim")
    return x, [SAME]


def _reduce(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    (x,) = ins
    if not isinstance(x, Split):
        return REPLICATED, need_replicated(op, ins)
    dims = op.attrs["dims"]
    if x.dim in dims:
        raise Fail(op, f"reduces over the split dim {x.dim}")
    shift = 0 if op.attrs["keepdim"] else sum(1 for k in dims if k < x.dim)
    return Split(x.dim - shift, x.var), [SAME]


def _norm(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    # ins: the input, then the weight/bias when they are graph tensors (functional or aten norms).
    x = ins[0]
    if not isinstance(x, Split):
        return REPLICATED, need_replicated(op, ins)
    nd = len(shape_of(op.node))
    if x.dim >= nd - op.attrs["ndims"]:
        raise Fail(op, f"normalizes over the split dim {x.dim}")
    if any(p is not REPLICATED for p in ins[1:]):
        raise Fail(op, "the norm's weight or bias is not replicated")
    # The parameters span the normalized dims only, so they broadcast along the split: each rank
    # computes its share of their gradients (partial_grad_inputs gives graph tensors a copy; a
    # norm module's own parameters are copied by the replay's copy_params edit).
    return x, [SAME] * len(ins)


_RULES = {
    "output": _output,
    "linear": _linear,
    "embedding": _embedding,
    "pointwise": _pointwise,
    "matmul": _matmul,
    "sdpa": _sdpa,
    "softmax": _softmax,
    "reduce": _reduce,
    "norm": _norm,
    "experts": _experts,
    **SHAPE_RULES,
}
