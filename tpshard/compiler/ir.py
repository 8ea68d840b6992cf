"""A capture-independent description of a traced graph: what each node *means*.

The analysis reads :class:`Op` records, never raw FX targets, so the same sharding rules serve
a ``torch.fx.symbolic_trace`` graph (``call_module`` leaves, ``call_method`` views) and a
``torch.export`` graph (aten ops). Each capture flavour has one ``describe_*`` function here.

An Op has a ``kind`` from a small vocabulary and ``attrs`` that the kind's rule needs:

==============  ===============================================================
kind            attrs
==============  ===============================================================
input           (placeholders, parameters, buffers, constants: replicated)
output          --
linear          weight, bias (parameter qualified names; bias may be None),
                transposed (weight stored (in, out), as HF's Conv1D)
embedding       weight, padding_idx
pointwise       linear_in (set of tensor positions through which the op is linear)
view            shape_arg: where the target shape lives (for the rewriter)
dims            map: output dim -> input dim (None for a new dim); slices: dims cut
expand          shape_arg
split           dim, sizes (piece sizes along dim)
item            index (one element of a tuple-valued node)
cat             dim
matmul          --
sdpa            --
softmax         dim
reduce          dims (reduced), keepdim
norm            ndims (trailing dims normalized), has_params
size            dim (None: the whole size tuple)
opaque          why (a module or function tpshard does not model)
==============  ===============================================================

Example::

    >>> import torch, torch.fx as fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> [op.kind for op in describe_fx(gm)]
    ['input', 'linear', 'pointwise', 'output']
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tpshard.compiler.ir_ops import conv_linear, einsum_linear, is_pointwise_conv

__all__ = ["Op", "describe_fx", "shape_of", "owner", "plan_key"]


@dataclass
class Op:
    """One graph node, described for the sharding rules."""

    node: fx.Node
    kind: str
    tensors: list[fx.Node] = field(default_factory=list)  # tensor-valued inputs, in order
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # qualified path of the module this op belongs to ("" = root)

    @property
    def name(self) -> str:
        return self.node.name


def plan_key(op: Op) -> str:
    """The plan's name for a linear/embedding use: its module path, or path:node for F.linear."""
    if "key" in op.attrs:
        return op.attrs["key"]
    if op.node.op == "call_module":
        return op.module
    return f"{op.module}:{op.node.name}" if op.module else op.node.name


def shape_of(node: Any) -> Any:
    """The traced shape of a node: a tuple, a list of tuples (tuple outputs) or None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(_hint(s) for s in val.shape)
        if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
            return [tuple(_hint(s) for s in v.shape) for v in val]
        return None
    if hasattr(meta, "shape"):
        return tuple(_hint(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return [tuple(_hint(s) for s in m.shape) if hasattr(m, "shape") else None for m in meta]
    return None


def _hint(s: Any) -> int:
    """A concrete size: symbolic sizes (dynamic batch and sequence dims) give their example value."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else int(s)


def owner(qualname: str) -> str:
    """The module path that owns a parameter: "h.0.attn.c_attn.weight" -> "h.0.attn.c_attn"."""
    return qualname.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------
# Vocabulary tables (symbolic-trace level).

_UNARY_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)

_UNARY_FUNCS: set[Any] = {
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.elu, F.softplus, F.mish,
    F.hardswish, F.dropout, F.relu6, F.selu,
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.sin, torch.cos, torch.erf, torch.square, torch.reciprocal,
    operator.neg, torch.clone, torch.detach, torch.nn.functional.dropout, math.sqrt,
}

_UNARY_METHODS = {
    "relu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "sin", "cos", "erf",
    "square", "reciprocal", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16",
    "to", "type", "type_as", "pow", "clamp", "clamp_min", "clamp_max", "softplus", "sigmoid_",
    "relu_", "requires_grad_", "cpu", "cuda",
}

# Binary (n-ary) pointwise ops and the positions through which each is linear: a partial sum
# may pass through a position that is linear (P + P = P; P * constant = P).
_BINARY_FUNCS: dict[Any, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    operator.iadd: "add", operator.imul: "mul", torch.where: "where", torch.pow: "pow",
    operator.pow: "pow", torch.maximum: "max", torch.minimum: "min", torch.masked_fill: "masked_fill",
    operator.floordiv: "floordiv", operator.eq: "eq", operator.ne: "ne", operator.lt: "lt",
    operator.gt: "gt", operator.le: "le", operator.ge: "ge", torch.eq: "eq",
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "where", "eq", "ne", "lt", "gt",
                   "le", "ge", "add_", "mul_", "maximum", "minimum", "pow"}

_VIEW_METHODS = {"view", "reshape"}
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm, nn.GroupNorm)


def _is_tensor_node(a: Any) -> bool:
    if not isinstance(a, fx.Node):
        return False
    s = shape_of(a)
    return isinstance(s, tuple)


def _tensor_args(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) if _is_tensor_node(n) else None)
    return out


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _ndim(node: fx.Node) -> int:
    s = shape_of(node)
    return len(s) if isinstance(s, tuple) else 0


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else d


def _dims_for_index(node: fx.Node, index: Any) -> Op | None:
    """getitem on a tensor: map output dims to input dims; dims that get sliced are 'slices'."""
    src = node.args[0]
    ndim = _ndim(src)
    idx = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) and _is_tensor_node(i) for i in idx):
        return None  # advanced indexing with a tensor: not modeled
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    mapping: list[int | None] = []
    slices: list[int] = []
    d = 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(ndim - n_real):
                mapping.append(d)
                d += 1
        elif i is None:
            mapping.append(None)
        elif isinstance(i, (slice, list)):  # a list of indices keeps the dim, cut (Falcon's [-2])
            if isinstance(i, list) or not (i.start in (None, 0) and i.stop is None and i.step in (None, 1)):
                slices.append(d)
            mapping.append(d)
            d += 1
        else:  # an integer (or an int-valued node): the dim disappears
            slices.append(d)
            d += 1
    while d < ndim:
        mapping.append(d)
        d += 1
    return Op(node, "dims", [src], {"map": mapping, "slices": slices})


def _dims_op(node: fx.Node, kind: str, src: fx.Node, args: tuple) -> Op | None:
    ndim = _ndim(src)
    if kind in ("transpose", "swapaxes"):
        a, b = (_norm_dim(int(x), ndim) for x in args[:2])
        m: list[int | None] = list(range(ndim))
        m[a], m[b] = m[b], m[a]
        return Op(node, "dims", [src], {"map": m, "slices": []})
    if kind == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return Op(node, "dims", [src], {"map": [_norm_dim(int(x), ndim) for x in dims], "slices": []})
    if kind == "t":
        return Op(node, "dims", [src], {"map": list(reversed(range(ndim))), "slices": []})
    if kind in ("view_as_complex", "view_as_real"):  # (..., n, 2) real <-> (..., n) complex
        return Op(node, "dims", [src], {"map": list(range(ndim - 1)) if kind == "view_as_complex"
                                        else [*range(ndim), None], "slices": []})
    if kind == "unsqueeze":
        d = _norm_dim(int(args[0]), ndim + 1)
        m = list(range(ndim))
        m.insert(d, None)
        return Op(node, "dims", [src], {"map": m, "slices": []})
    return None


def describe_fx(gm: fx.GraphModule) -> list[Op]:
    """Describe every node of a symbolically traced (torch-level) graph, in graph order."""
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    for node in gm.graph.nodes:
        op = _describe_node(node, modules)
        if not op.module:
            op.module = module_of(node)
        ops.append(op)
    return ops


def module_of(node: fx.Node) -> str:
    """The innermost module a node was traced in (from ``nn_module_stack``), or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def _describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    op = node.op
    if op in ("placeholder", "get_attr"):
        return Op(node, "input", attrs={"param": node.target if op == "get_attr" else None})
    if op == "output":
        return Op(node, "output", _tensor_args(node.args))
    if op == "call_module":
        return _describe_module(node, modules[node.target])
    if op == "call_method":
        return _describe_method(node)
    return _describe_function(node)


def _describe_module(node: fx.Node, mod: nn.Module) -> Op:
    path = node.target
    src = node.args[0] if node.args else None
    if isinstance(mod, nn.Linear):
        bias = f"{path}.bias" if mod.bias is not None else None
        return Op(node, "linear", [src], {"weight": f"{path}.weight", "bias": bias, "transposed": False}, path)
    if is_pointwise_conv(mod):
        return Op(node, "linear", [src], conv_linear(f"{path}.weight", f"{path}.bias" if mod.bias is not None else None),
                  path)
    if isinstance(mod, nn.Embedding):
        return Op(node, "embedding", [src], {"weight": f"{path}.weight", "padding_idx": mod.padding_idx}, path)
    if isinstance(mod, _UNARY_MODULES):
        return Op(node, "pointwise", [src], {"fn": type(mod).__name__, "linear_in": set()}, path)
    if isinstance(mod, nn.Softmax | nn.LogSoftmax):
        return Op(node, "softmax", [src], {"dim": mod.dim}, path)
    if isinstance(mod, _NORM_MODULES):
        if isinstance(mod, nn.GroupNorm):
            ndims = _ndim(src) - 1
        else:
            ndims = len(mod.normalized_shape)
        has_params = any(True for _ in mod.parameters(recurse=False))
        return Op(node, "norm", [src], {"ndims": ndims, "has_params": has_params}, path)
    if isinstance(mod, nn.Flatten):
        return Op(node, "view", [src], {"shape_arg": None}, path)
    return Op(node, "opaque", _tensor_args((node.args, node.kwargs)),
              {"why": f"module {path!r} of type {type(mod).__name__}"}, path)


def _describe_method(node: fx.Node) -> Op:
    name = node.target
    src = node.args[0]
    rest = node.args[1:]
    if name in _VIEW_METHODS:
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            where = ("tuple", 1)
        elif "size" in node.kwargs or "shape" in node.kwargs:
            where = ("kw", "size" if "size" in node.kwargs else "shape")
        else:
            where = ("varargs", 1)
        return Op(node, "view", [src], {"shape_arg": where})
    if name in ("flatten", "unflatten", "view_as", "reshape_as"):
        return Op(node, "view", _tensor_args(node.args)[:1], {"shape_arg": ("unflatten", 1, 2) if name == "unflatten"
                                                                   and len(node.args) == 3 else None})
    if name in ("transpose", "permute", "t", "unsqueeze", "swapaxes"):
        return _dims_op(node, name, src, rest) or _opaque(node, f"method .{name}()")
    if name == "squeeze":
        return _squeeze(node, src, rest)
    if name == "narrow":
        d = _norm_dim(int(_arg(node, 1, "dim")), _ndim(src))
        return Op(node, "dims", [src], {"map": list(range(_ndim(src))), "slices": [d]})
    if name in ("expand",):
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            where = ("tuple", 1)
        else:
            where = ("varargs", 1)
        return Op(node, "expand", [src], {"shape_arg": where})
    if name in ("split", "chunk", "unbind", "tensor_split"):
        return _split(node, name, src, rest, node.kwargs)
    if name == "size":
        dim = _arg(node, 1, "dim")
        return Op(node, "size", [src], {"dim": dim})
    if name == "dim":
        return Op(node, "input")
    if name in ("softmax", "log_softmax"):
        return Op(node, "softmax", [src], {"dim": _arg(node, 1, "dim")})
    if name in ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp"):
        return _reduce(node, src, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
    if name in _UNARY_METHODS:
        ins = [src] + ([] if name == "type_as" else _tensor_args(rest))  # type_as: the other gives a dtype only
        linear_in = {0} if name in ("contiguous", "clone", "float", "double", "half", "bfloat16", "to",
                                     "type", "type_as", "cpu", "cuda") else set()
        return Op(node, "pointwise", ins, {"fn": name, "linear_in": linear_in})
    if name in _BINARY_METHODS:
        return _binary(node, name.rstrip("_"), [src, *rest])
    if name in ("matmul", "bmm", "mm"):
        return Op(node, "matmul", _tensor_args(node.args))
    if name in ("masked_fill_",):
        return _binary(node, "masked_fill", [src, *rest])
    return _opaque(node, f"method .{name}()")


def _describe_function(node: fx.Node) -> Op:
    fn = node.target
    args = node.args
    if fn is operator.getitem:
        src = args[0]
        s = shape_of(src)
        if isinstance(s, list) or (isinstance(src, fx.Node) and s is None and isinstance(args[1], int)):
            return Op(node, "item", [src], {"index": args[1]})
        if isinstance(s, tuple):
            return _dims_for_index(node, args[1]) or _opaque(node, "indexing with a tensor")
        return Op(node, "input")  # indexing a size tuple etc.: a plain value
    if fn is getattr:
        if args[1] == "shape":
            return Op(node, "size", [args[0]], {"dim": None})
        return Op(node, "input")
    if fn is F.linear:
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if isinstance(w, fx.Node) and w.op == "get_attr" and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
            return Op(node, "linear", [args[0]],
                      {"weight": w.target, "bias": b.target if b is not None else None, "transposed": False},
                      owner(w.target))
        return _opaque(node, "F.linear with a computed weight")
    if fn is F.embedding:
        w = args[1] if len(args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return Op(node, "embedding", [args[0]], {"weight": w.target, "padding_idx": _arg(node, 2, "padding_idx")},
                      owner(w.target))
        return _opaque(node, "F.embedding with a computed weight")
    if fn in (torch.matmul, operator.matmul, torch.mm) and len(args) == 2 and _param_name(args[1]) \
            and _ndim(args[1]) == 2:  # x @ W, W stored (in, out)
        return Op(node, "linear", [args[0]], {"weight": args[1].target, "bias": None, "transposed": True},
                  owner(args[1].target))
    if fn in (torch.matmul, operator.matmul, torch.bmm) and len(args) == 2 and _param_name(args[1]) \
            and _ndim(args[1]) == 3 and _ndim(args[0]) == 3:  # bmm(x, W): one (in, out) weight per batch
        found = einsum_linear("bnd,bdk->bnk", list(args), _param_name, _ndim)
        if found is not None:
            return Op(node, "linear", [found[0]], found[1], owner(found[1]["weight"]))
    if fn in (torch.matmul, operator.matmul, torch.bmm, torch.mm):
        return Op(node, "matmul", _tensor_args(args))
    if fn is torch.einsum and args:
        ops_ = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        found = einsum_linear(args[0], ops_, _param_name, _ndim)
        if found is not None:
            return Op(node, "linear", [found[0]], found[1], owner(found[1]["weight"]))
    if fn is F.scaled_dot_product_attention:
        q, k, v = args[:3]
        mask = _arg(node, 3, "attn_mask")
        ins = [q, k, v] + ([mask] if isinstance(mask, fx.Node) else [])
        return Op(node, "sdpa", ins, {"has_mask": isinstance(mask, fx.Node)})
    if fn in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax):
        return Op(node, "softmax", [args[0]], {"dim": _arg(node, 1, "dim")})
    if fn in (torch.cat, torch.concat, torch.stack):
        tensors = list(args[0])
        dim = _arg(node, 1, "dim", 0)
        return Op(node, "cat" if fn is not torch.stack else "stack", tensors, {"dim": dim})
    if fn in (torch.split, torch.chunk, torch.unbind, torch.tensor_split):
        name = {torch.split: "split", torch.chunk: "chunk", torch.unbind: "unbind", torch.tensor_split: "tensor_split"}[fn]
        return _split(node, name, args[0], args[1:], node.kwargs)
    if fn is torch.broadcast_to:  # the shape: a literal, or the size tuple of a (local) tensor
        return Op(node, "expand", [args[0]], {"shape_arg": ("tuple", 1)})
    if fn in (torch.reshape,):
        return Op(node, "view", [args[0]], {"shape_arg": ("tuple", 1)})
    if fn in (torch.flatten, torch.unflatten):
        unflat = fn is torch.unflatten and len(args) == 3
        return Op(node, "view", [args[0]], {"shape_arg": ("unflatten", 1, 2) if unflat else None})
    if fn in (torch.transpose, torch.permute, torch.t, torch.unsqueeze, torch.swapaxes, torch.view_as_complex,
              torch.view_as_real):
        return _dims_op(node, fn.__name__, args[0], args[1:]) or _opaque(node, fn.__name__)
    if fn is torch.squeeze:
        return _squeeze(node, args[0], args[1:])
    if fn in (torch.sum, torch.mean, torch.amax, torch.amin, torch.logsumexp):
        return _reduce(node, args[0], _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
    if fn is F.layer_norm or fn is getattr(F, "rms_norm", None):
        shape = _arg(node, 1, "normalized_shape")
        w = _arg(node, 2, "weight")
        b = _arg(node, 3, "bias") if fn is F.layer_norm else None
        params = [x for x in (w, b) if isinstance(x, fx.Node)]  # graph tensors: their gradients follow the rules
        return Op(node, "norm", [args[0], *params], {"ndims": len(shape), "has_params": bool(params)})
    if fn in _UNARY_FUNCS:
        ins = _tensor_args(args)
        return Op(node, "pointwise", ins, {"fn": getattr(fn, "__name__", str(fn)),
                                          "linear_in": {0} if fn in (operator.neg, torch.neg, torch.clone) else set()})
    if fn in _BINARY_FUNCS:
        return _binary(node, _BINARY_FUNCS[fn], list(args))
    if fn in (torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.tril,
              torch.triu, torch.ones_like, torch.zeros_like, torch.full_like, torch.finfo):
        if fn in (torch.ones_like, torch.zeros_like, torch.full_like) and _tensor_args(args):
            return Op(node, "pointwise", _tensor_args(args)[:1], {"fn": fn.__name__, "linear_in": set()})
        return Op(node, "input")
    if not _tensor_args((args, node.kwargs)) or shape_of(node) is None:
        return Op(node, "input")  # arithmetic on Python numbers and sizes
    return _opaque(node, f"function {getattr(fn, '__qualname__', fn)}")


def _param_name(a: Any) -> str | None:
    return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None


def _opaque(node: fx.Node, why: str) -> Op:
    return Op(node, "opaque", _tensor_args((node.args, node.kwargs)), {"why": why})


def _binary(node: fx.Node, fn: str, args: list) -> Op:
    tensors = [a for a in args if _is_tensor_node(a)]
    positions = [i for i, a in enumerate(args) if _is_tensor_node(a)]
    # Positions (among tensor inputs) through which a partial sum may flow unreduced.
    if fn in ("add", "sub") and len(tensors) == 2:
        linear_in = {0, 1}
    elif len(tensors) == 1 and (fn == "mul" or (fn == "div" and positions[0] == 0)):
        linear_in = {0}  # scaled by a Python number
    else:
        linear_in = set()
    return Op(node, "pointwise", tensors, {"fn": fn, "linear_in": linear_in})


def _squeeze(node: fx.Node, src: fx.Node, rest: tuple) -> Op:
    ndim = _ndim(src)
    in_shape = shape_of(src)
    dims = rest[0] if rest else node.kwargs.get("dim")
    if dims is None:
        gone = {i for i, s in enumerate(in_shape) if s == 1}
    else:
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        gone = {_norm_dim(int(d), ndim) for d in dims if in_shape[_norm_dim(int(d), ndim)] == 1}
    return Op(node, "dims", [src], {"map": [d for d in range(ndim) if d not in gone], "slices": []})


def _split(node: fx.Node, name: str, src: fx.Node, rest: tuple, kwargs: dict) -> Op:
    ndim = _ndim(src)
    shapes = shape_of(node)
    dim = rest[1] if len(rest) > 1 else kwargs.get("dim", 0)
    if name == "unbind":
        dim = rest[0] if rest else kwargs.get("dim", 0)
    dim = _norm_dim(int(dim), ndim)
    if not isinstance(shapes, list):
        return _opaque(node, f"{name} with unknown output shapes")
    sizes = [s[dim] if name != "unbind" else 1 for s in shapes]
    return Op(node, "split", [src], {"dim": dim, "sizes": sizes, "method": name, "unbind": name == "unbind"})


def _reduce(node: fx.Node, src: fx.Node, dim: Any, keepdim: bool) -> Op:
    ndim = _ndim(src)
    if dim is None:
        dims = list(range(ndim))
    else:
        dims = [_norm_dim(int(d), ndim) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    return Op(node, "reduce", [src], {"dims": dims, "keepdim": bool(keepdim)})
