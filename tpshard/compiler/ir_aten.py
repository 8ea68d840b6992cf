"""Describe a ``torch.export`` graph (aten ops) in the planner's vocabulary (see :mod:`tpshard.compiler.ir`).

An exported graph has no ``call_module`` layers: parameters are ``get_attr`` nodes and every
layer is an aten op. Linear-like ops are recognized by a parameter operand:

- ``aten.linear(x, W, b)``: W is (out, in);
- ``aten.addmm(b, x, W)``, ``aten.mm(x, W)``, ``aten.matmul(x, W)``: W is (in, out) — Hugging
  Face's GPT-2 ``Conv1D`` — so the split dims flip (``transposed``).

Each op's module is the innermost entry of the node's ``nn_module_stack``, so plans name the
original modules (``transformer.h.0.attn.c_attn``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from tpshard.compiler.ir import Op, _dims_op, _norm_dim, module_of, shape_of
from tpshard.compiler.ir_ops import conv_linear, einsum_linear

__all__ = ["describe_aten"]

aten = torch.ops.aten

_TYPE_LIKE = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
              aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_NO_VALUE = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
             aten.sym_constrain_range_for_size.default}


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", None)


def _is_param(n: Any, params: set[str]) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr" and n.target in params


def _tensor(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(shape_of(a), tuple)


def _tensors(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) if _tensor(n) else None)
    return out


def _ndim(n: fx.Node) -> int:
    s = shape_of(n)
    return len(s) if isinstance(s, tuple) else 0


def describe_aten(gm: fx.GraphModule) -> list[Op]:
    """Describe every node of an exported (aten-level) graph, in graph order."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    ops = []
    for node in gm.graph.nodes:
        op = _describe(node, params)
        op.module = op.module or module_of(node)
        ops.append(op)
    # A layer's plan key is the module it ran in; module:node where a module runs several.
    layers = [op for op in ops if op.kind in ("linear", "embedding")]
    counts: dict[str, int] = {}
    for op in layers:
        counts[op.module] = counts.get(op.module, 0) + 1
    for op in layers:
        op.attrs["key"] = (op.module if counts[op.module] == 1 else f"{op.module}:{op.node.name}") if op.module \
            else op.node.name  # (at the root, as symbolic tracing names it)
    return ops


def _describe(node: fx.Node, params: set[str]) -> Op:
    if node.op in ("placeholder", "get_attr"):
        return Op(node, "input", attrs={"param": node.target if node.op == "get_attr" else None})
    if node.op == "output":
        return Op(node, "output", _tensors(node.args))
    if node.op == "call_module":  # export's input guards
        return Op(node, "opaque", _tensors((node.args, node.kwargs)), {"why": f"module {node.target!r}"})
    if node.op != "call_function":
        return Op(node, "opaque", _tensors((node.args, node.kwargs)), {"why": f"{node.op} {node.target}"})
    t = node.target
    a = node.args
    if t is operator.getitem:
        if isinstance(shape_of(a[0]), list):
            return Op(node, "item", [a[0]], {"index": a[1]})
        return Op(node, "input")
    if t in _NO_VALUE or not isinstance(t, torch._ops.OpOverload):
        return Op(node, "input")
    p = _packet(t)
    # -- linear-like ---------------------------------------------------------------------------
    if p is aten.linear and _is_param(a[1], params):
        b = a[2] if len(a) > 2 else None
        if b is None or _is_param(b, params):
            return Op(node, "linear", [a[0]], {"weight": a[1].target, "bias": b.target if b is not None else None,
                                               "transposed": False})
    if p is aten.addmm and _is_param(a[2], params) and _is_param(a[0], params) and len(a) == 3 and not node.kwargs:
        return Op(node, "linear", [a[1]], {"weight": a[2].target, "bias": a[0].target, "transposed": True})
    if p in (aten.mm, aten.matmul) and _is_param(a[1], params) and _ndim(a[1]) == 2:
        return Op(node, "linear", [a[0]], {"weight": a[1].target, "bias": None, "transposed": True})
    if p in (aten.bmm, aten.matmul) and _is_param(a[1], params) and _ndim(a[1]) == 3 and _ndim(a[0]) == 3:
        found = einsum_linear("bnd,bdk->bnk", list(a[:2]), lambda o: o.target if _is_param(o, params) else None,
                              _ndim)  # bmm(x, W): one (in, out) weight per batch
        if found is not None:
            return Op(node, "linear", [found[0]], found[1])
    if p is aten.einsum:
        found = einsum_linear(a[0], list(a[1]), lambda o: o.target if _is_param(o, params) else None, _ndim)
        if found is not None:
            return Op(node, "linear", [found[0]], found[1])
    if p in (aten.conv1d, aten.conv2d, aten.conv3d) and _is_param(a[1], params) and _pointwise_conv(node, a):
        b = a[2] if len(a) > 2 else None
        if b is None or _is_param(b, params):
            return Op(node, "linear", [a[0]], conv_linear(a[1].target, b.target if b is not None else None))
    if p is aten.embedding and _is_param(a[0], params):
        pad = a[2] if len(a) > 2 else -1
        return Op(node, "embedding", [a[1]], {"weight": a[0].target, "padding_idx": None if pad == -1 else pad})
    # -- shapes ----------------------------------------------------------------------------------
    if t in _VIEWS:
        return Op(node, "view", [a[0]], {"shape_arg": ("tuple", 1)})
    if p is aten.flatten:  # the merged dim follows the input: no literal to rewrite
        return Op(node, "view", [a[0]], {"shape_arg": None})
    if p is aten.unflatten:  # unflatten(x, dim, sizes): the split factor's literal is divided
        return Op(node, "view", [a[0]], {"shape_arg": ("unflatten", 1, 2)})
    if p in (aten.view_as_complex, aten.view_as_real):
        return _dims_op(node, p.__name__, a[0], ())
    if p is aten.type_as:  # the other operand gives only a dtype: no value, no gradient flows to it
        return Op(node, "pointwise", [a[0]], {"fn": "type_as", "linear_in": {0}})
    if p is aten.expand or p is getattr(aten, "broadcast_to", None):
        return Op(node, "expand", [a[0]], {"shape_arg": ("tuple", 1)})
    if p in (aten.transpose, aten.permute, aten.t, aten.unsqueeze, aten.squeeze, aten.slice, aten.select,
             aten.narrow):
        return _dims(node, p, a)
    if p in (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind):
        return _split(node, p, a)
    if p in (aten.cat, aten.stack):
        return Op(node, "cat" if p is aten.cat else "stack", list(a[0]), {"dim": a[1] if len(a) > 1 else 0})
    if p is aten.index and _constant_index(a):  # x[:, :, [-2]]: the dim stays, cut
        d = next(i for i, ix in enumerate(a[1]) if ix is not None)
        return Op(node, "dims", [a[0]], {"map": list(range(_ndim(a[0]))), "slices": [d]})
    if p is aten.sym_size:
        return Op(node, "size", [a[0]], {"dim": a[1]})
    # -- compute ---------------------------------------------------------------------------------
    if p in (aten.matmul, aten.bmm, aten.mm):
        return Op(node, "matmul", _tensors(a))
    if p is aten.scaled_dot_product_attention:
        mask = a[3] if len(a) > 3 else node.kwargs.get("attn_mask")
        ins = list(a[:3]) + ([mask] if isinstance(mask, fx.Node) else [])
        return Op(node, "sdpa", ins, {"has_mask": isinstance(mask, fx.Node)})
    if p in (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax):
        return Op(node, "softmax", [a[0]], {"dim": a[1]})
    if p is aten.layer_norm:  # (input, normalized_shape, weight, bias, ...): params are graph tensors
        params = [x for x in a[2:4] if isinstance(x, fx.Node)]
        return Op(node, "norm", [a[0], *params], {"ndims": len(a[1]), "has_params": bool(params)})
    if p is getattr(aten, "rms_norm", None):  # (input, normalized_shape, weight, eps)
        params = [x for x in a[2:3] if isinstance(x, fx.Node)]
        return Op(node, "norm", [a[0], *params], {"ndims": len(a[1]), "has_params": bool(params)})
    if p in (aten.mean, aten.sum, aten.amax, aten.amin, aten.logsumexp) and len(a) > 1:
        nd = _ndim(a[0])
        dims = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
        keep = a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)
        return Op(node, "reduce", [a[0]], {"dims": [_norm_dim(int(d), nd) for d in dims], "keepdim": bool(keep)})
    if t in _TYPE_LIKE:
        return Op(node, "pointwise", [a[0]], {"fn": "to", "linear_in": {0}})
    if p is aten.dropout:
        return Op(node, "pointwise", [a[0]], {"fn": "Dropout", "linear_in": set()})
    if torch.Tag.pointwise in t.tags:
        ins = _tensors(a)
        name = p.__name__
        if name in ("add", "sub") and len(ins) == 2:
            linear_in = {0, 1}
        elif name in ("mul", "div", "neg") and len(ins) == 1 and _tensor(a[0]):
            linear_in = {0}
        else:
            linear_in = set()
        fn = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}.get(name, name)
        return Op(node, "pointwise", ins, {"fn": fn, "linear_in": linear_in})
    if not _tensors((a, node.kwargs)):
        return Op(node, "input")
    return Op(node, "opaque", _tensors((a, node.kwargs)), {"why": f"aten op {t}"})


def _constant_index(a: tuple) -> bool:
    """One 1-D constant index tensor (a lifted literal list), the other dims whole."""
    idx = [ix for ix in a[1] if ix is not None] if len(a) > 1 and isinstance(a[1], (list, tuple)) else []
    if len(idx) != 1 or not isinstance(idx[0], fx.Node) or _ndim(idx[0]) != 1:
        return False
    n = idx[0]
    if n.target is aten.lift_fresh_copy.default:
        n = n.args[0]
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _pointwise_conv(node: fx.Node, a: tuple) -> bool:
    """conv(x, W, b, stride=1, padding=0, dilation=1, groups=1) with a 1x1 kernel."""
    w = shape_of(a[1])
    rest = list(a[3:]) + [None] * 4
    stride, padding, _, groups = rest[:4]
    ones = lambda v, k: v is None or all(x == k for x in (v if isinstance(v, (list, tuple)) else [v]))  # noqa: E731
    return all(s == 1 for s in w[2:]) and ones(stride, 1) and ones(padding, 0) and groups in (None, 1)


def _dims(node: fx.Node, p: Any, a: tuple) -> Op:
    src = a[0]
    nd = _ndim(src)
    m: list[int | None] = list(range(nd))
    slices: list[int] = []
    if p is aten.transpose:
        i, j = _norm_dim(a[1], nd), _norm_dim(a[2], nd)
        m[i], m[j] = m[j], m[i]
    elif p is aten.permute:
        m = [_norm_dim(d, nd) for d in a[1]]
    elif p is aten.t:
        m = list(reversed(m))
    elif p is aten.unsqueeze:
        m.insert(_norm_dim(a[1], nd + 1), None)
    elif p is aten.squeeze:
        shape = shape_of(src)
        dims = a[1] if len(a) > 1 else [i for i, s in enumerate(shape) if s == 1]
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        gone = {_norm_dim(d, nd) for d in dims if shape[_norm_dim(d, nd)] == 1}
        m = [d for d in m if d not in gone]
    elif p is aten.slice:
        d = _norm_dim(a[1] if len(a) > 1 else 0, nd)
        start = a[2] if len(a) > 2 else None
        end = a[3] if len(a) > 3 else None
        step = a[4] if len(a) > 4 else 1
        full = start in (None, 0) and (end is None or (isinstance(end, int) and end >= shape_of(src)[d])) and step == 1
        if not full:
            slices.append(d)
    elif p is aten.select:
        d = _norm_dim(a[1], nd)
        slices.append(d)
        m.remove(d)
    elif p is aten.narrow:
        slices.append(_norm_dim(a[1], nd))
    return Op(node, "dims", [src], {"map": m, "slices": slices})


def _split(node: fx.Node, p: Any, a: tuple) -> Op:
    src = a[0]
    nd = _ndim(src)
    shapes = shape_of(node)
    if p is aten.unbind:
        dim = _norm_dim(a[1] if len(a) > 1 else 0, nd)
        return Op(node, "split", [src], {"dim": dim, "sizes": [1] * len(shapes), "method": "unbind", "unbind": True})
    dim = _norm_dim(a[2] if len(a) > 2 else node.kwargs.get("dim", 0), nd)
    sizes = [s[dim] for s in shapes]
    method = "split" if p in (aten.split, aten.split_with_sizes) else "chunk"
    return Op(node, "split", [src], {"dim": dim, "sizes": sizes, "method": method, "unbind": False})
