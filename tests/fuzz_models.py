"""Random models for fuzzing the pass, and the harness that checks them on real ranks.

One generator serves both the test suite (:func:`model_spec`, a hypothesis strategy) and
``benchmarks/fuzz_pass.py`` (:func:`random_spec`, a ``random.Random``): both call
:func:`generate` with a different source of choices.

A model is data: a *spec* (JSON-able dict) holding a DAG of op nodes,
``{"input": {...}, "nodes": [{"op", "in": [indices], "shape", ...attrs}], "outputs": [indices]}``.
Node 0 is the input. Shapes are tracked in the generator, with ``"B"`` (batch) and ``"T"``
(sequence) symbolic, so every spec is a valid model at any batch and sequence length; ints are
feature sizes (never 3 or 5, the example batch and length, so no size matches by accident).
:class:`SpecModel` interprets a spec in ``forward`` with plain Python, so
``torch.fx.symbolic_trace`` traces it. Every value nobody consumes is an output.

Vocabulary (what the planner claims): linears with and without bias (and one module called
twice: tied weights), embeddings and a head tied to them (``F.linear`` or a shared
``nn.Parameter``), pointwise unary/binary ops and constants, learnable scalars and vectors
(multiplied or added, broadcast over any dims), residual and parallel branches, reshapes to
heads and back (literal sizes, ``-1``, ``flatten``), transposes and permutes, ``unsqueeze``,
matmuls (``q @ k.transpose``, ``p @ v``) and SDPA (causal or not), softmax over any dim, norms
(LayerNorm with/without affine and bias, RMSNorm, per-head norms over head_dim), reductions
(sum/mean/amax) over any dim with or without keepdim, ``cat``, ``split``/``chunk``/``unbind``
with their pieces used. Macros (MLP, gated MLP, attention with separate or fused q/k/v,
parallel attention+MLP) make sure many models contain the patterns the planner splits.

The check (:func:`check_example`, run inside each rank): the model built with a fixed seed in
float64, a deepcopy as the reference, ``tpshard.parallelize`` of the other copy; forward,
backward of ``sum(out * fixed random weights)``, then outputs, the input gradient, every
parameter gradient (each rank's local gradient against ``plan.params[name].shard(ref_grad)``),
parameters after one SGD step, and a second forward at another batch and sequence length are
compared with ``|a - b| <= 1e-10 * max(1, max|ref|)``. A ``PlanError`` is a refusal; any other
exception an error. :func:`run_examples` runs many examples in one launch per world size and
survives a launch that dies or hangs (results stream to per-rank files; the launch resumes
after the example that broke it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DT = torch.float64
B, T = "B", "T"
BATCH, SEQ = 3, 5          # first forward
BATCH2, SEQ2 = 4, 7        # second forward (after the step): shapes are symbolic
TOL = 1e-10

# ---------------------------------------------------------------------------------------------
# Sources of choices: hypothesis or random.Random, behind one small interface.


class RandomDraw:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def bool(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


class HypothesisDraw:
    def __init__(self, draw: Callable) -> None:
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, seq: Sequence) -> Any:
        return self.draw(self.st.sampled_from(list(seq)))

    def bool(self, p: float = 0.5) -> bool:
        # Shrinks towards False (the simpler model).
        return self.draw(self.st.integers(0, 99)) >= round(100 * (1 - p))


# ---------------------------------------------------------------------------------------------
# The generator.

_ACTS = ["relu", "gelu", "silu", "tanh", "sigmoid"]


def _is_int(s: Any) -> bool:
    return isinstance(s, int)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast shape of a and b (symbolic dims must match exactly), or None."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


class _Gen:
    def __init__(self, d: Any) -> None:
        self.d = d
        self.nodes: list[dict] = []
        self.linears: dict[tuple[int, int], list[str]] = {}  # (in, out) -> module names, for ties
        self.embedding: str | None = None

    # -- bookkeeping ------------------------------------------------------------------------
    def add(self, op: str, ins: Sequence[int], shape: Any, **attrs: Any) -> int:
        self.nodes.append({"op": op, "in": list(ins), "shape": _jsonable(shape), **attrs})
        return len(self.nodes) - 1

    def shape(self, i: int) -> tuple:
        return tuple(self.nodes[i]["shape"])

    def values(self) -> list[int]:
        """Float tensor values (not the ids input, not a split's tuple)."""
        return [i for i, n in enumerate(self.nodes)
                if n["op"] not in ("split",) and not (n["op"] == "input" and n["kind"] == "ids")]

    def pick(self, pred: Callable[[tuple], bool] = lambda s: True) -> int | None:
        """A value satisfying pred, preferring recent ones."""
        cands = [i for i in self.values() if pred(self.shape(i))]
        if not cands:
            return None
        if self.d.bool(0.6):
            return cands[-1 - self.d.int(0, min(2, len(cands) - 1))]
        return self.d.choice(cands)

    # -- primitive ops ----------------------------------------------------------------------
    def linear(self, x: int, out: int | None = None, bias: bool | None = None, tie: bool = True) -> int:
        s = self.shape(x)
        fin = s[-1]
        if out is None:
            out = self.d.choice(_widths(fin))
        tied = self.linears.get((fin, out), [])
        if tie and tied and self.d.bool(0.15):
            mod = self.d.choice(tied)
            bias = next(n["bias"] for n in self.nodes if n.get("mod") == mod)
        else:
            mod = f"lin{len(self.nodes)}"
            bias = self.d.bool(0.7) if bias is None else bias
            self.linears.setdefault((fin, out), []).append(mod)
        return self.add("linear", [x], s[:-1] + (out,), mod=mod, fin=fin, out=out, bias=bias)

    def act(self, x: int, fn: str | None = None) -> int:
        return self.add("act", [x], self.shape(x), fn=fn or self.d.choice(_ACTS))

    def scale(self, x: int, c: float | None = None) -> int:
        return self.add("scale", [x], self.shape(x), c=c if c is not None else self.d.choice([0.5, 2.0, -1.5, 0.25]))

    def param(self, x: int, how: str | None = None) -> int:
        """x * p or x + p with a learnable p broadcast over some dims (a scalar, a vector, ...)."""
        s = self.shape(x)
        how = how or self.d.choice(["mul", "mul", "add"])
        kind = self.d.choice(["scalar", "vector", "vector", "any"])
        if kind == "scalar":
            ps: tuple = ()
        elif kind == "vector" and _is_int(s[-1]):
            ps = (s[-1],)
        else:
            ps = tuple(v if _is_int(v) and self.d.bool(0.5) else 1 for v in s)
            while ps and ps[0] == 1:
                ps = ps[1:]
        return self.add("param", [x], s, how=how, pshape=list(ps), mod=f"p{len(self.nodes)}")

    def binary(self, a: int, b: int, fn: str | None = None) -> int | None:
        out = _broadcast(self.shape(a), self.shape(b))
        if out is None:
            return None
        return self.add("binary", [a, b], out, fn=fn or self.d.choice(["add", "add", "sub", "mul"]))

    def norm(self, x: int, kind: str | None = None) -> int:
        s = self.shape(x)
        kind = kind or self.d.choice(["layernorm", "layernorm", "rmsnorm", "layernorm_noaffine", "layernorm_nobias",
                                      "rmsnorm_noaffine"])
        return self.add("norm", [x], s, kind=kind, dim=s[-1], mod=f"norm{len(self.nodes)}")

    def softmax(self, x: int, dim: int | None = None) -> int:
        s = self.shape(x)
        dim = dim if dim is not None else self.d.int(-len(s), len(s) - 1)
        return self.add("softmax", [x], s, dim=dim)

    def reduce(self, x: int, fn: str | None = None, dim: int | None = None, keepdim: bool | None = None) -> int | None:
        s = self.shape(x)
        if len(s) < 2 and not keepdim:
            keepdim = True
        dim = dim if dim is not None else self.d.int(-len(s), len(s) - 1)
        keepdim = self.d.bool(0.7) if keepdim is None else keepdim
        fn = fn or self.d.choice(["sum", "mean", "mean", "amax"])
        dd = dim % len(s)
        out = s[:dd] + ((1,) if keepdim else ()) + s[dd + 1:]
        return self.add("reduce", [x], out, fn=fn, dim=dim, keepdim=keepdim)

    def to_heads(self, x: int, heads: int) -> int:
        """(B, T, H*Dh) -> (B, T, H, Dh) by view/reshape with literal sizes (Dh sometimes -1)."""
        s = self.shape(x)
        dh = s[-1] // heads
        after_linear = self.nodes[x]["op"] == "linear"
        return self.add("view", [x], (B, T, heads, dh),
                        target=[B, T, heads, -1 if self.d.bool(0.3) else dh],
                        method="view" if after_linear and self.d.bool(0.5) else "reshape")

    def merge_heads(self, x: int) -> int:
        """(B, T, H, Dh) -> (B, T, H*Dh): reshape with a literal, with -1, or flatten(2)."""
        s = self.shape(x)
        style = self.d.choice(["literal", "minus1", "flatten", "contiguous_view"])
        target = [B, T, -1] if style == "minus1" else [B, T, s[2] * s[3]]
        return self.add("view", [x], (B, T, s[2] * s[3]), target=target,
                        method={"flatten": "flatten", "contiguous_view": "contiguous_view"}.get(style, "reshape"))

    def transpose(self, x: int, a: int | None = None, b: int | None = None) -> int | None:
        s = self.shape(x)
        if len(s) < 2:
            return None
        if a is None:
            a, b = self.d.int(0, len(s) - 1), self.d.int(0, len(s) - 1)
            if a == b:
                b = (a + 1) % len(s)
        out = list(s)
        out[a % len(s)], out[b % len(s)] = out[b % len(s)], out[a % len(s)]
        return self.add("transpose", [x], tuple(out), dims=[a, b])

    def permute(self, x: int, perm: list[int] | None = None) -> int:
        s = self.shape(x)
        if perm is None:
            perm = list(range(len(s)))
            for i in range(len(perm) - 1, 0, -1):  # Fisher-Yates from the draw
                j = self.d.int(0, i)
                perm[i], perm[j] = perm[j], perm[i]
        return self.add("permute", [x], tuple(s[p] for p in perm), perm=perm)

    def unsqueeze(self, x: int, dim: int | None = None) -> int:
        s = self.shape(x)
        dim = dim if dim is not None else self.d.int(0, len(s))
        return self.add("unsqueeze", [x], s[:dim] + (1,) + s[dim:], dim=dim)

    def matmul_t(self, a: int, b: int) -> int | None:
        """a @ b.transpose(-2, -1)."""
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-1]:
            return None
        return self.add("matmul_t", [a, b], sa[:-1] + (sb[-2],))

    def matmul(self, a: int, b: int) -> int | None:
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            return None
        return self.add("matmul", [a, b], sa[:-1] + (sb[-1],))

    def sdpa(self, q: int, k: int, v: int, causal: bool | None = None) -> int:
        sq, sv = self.shape(q), self.shape(v)
        causal = self.d.bool(0.5) if causal is None else causal
        return self.add("sdpa", [q, k, v], sq[:-1] + (sv[-1],), causal=causal)

    def cat(self, xs: list[int], dim: int) -> int:
        s = list(self.shape(xs[0]))
        s[dim] = sum(self.shape(x)[dim] for x in xs)
        return self.add("cat", xs, tuple(s), dim=dim - len(s) if self.d.bool(0.5) else dim)

    def split(self, x: int, dim: int, method: str, arg: Any) -> list[int]:
        """split/chunk/unbind along dim; returns the item nodes (all of them)."""
        s = self.shape(x)
        size = s[dim]
        if method == "split":
            sizes = arg
        elif method == "chunk":
            sizes = [size // arg] * arg
        else:
            sizes = [1] * size
        shapes = [s[:dim] + (n,) + s[dim + 1:] if method != "unbind" else s[:dim] + s[dim + 1:] for n in sizes]
        sp = self.add("split", [x], [list(t) for t in shapes], method=method, dim=dim, arg=arg)
        return [self.add("item", [sp], shapes[i], index=i) for i in range(len(sizes))]

    # -- macros -----------------------------------------------------------------------------
    def mlp(self, x: int, out: int) -> int:
        fin = self.shape(x)[-1]
        hidden = self.d.choice([4 * fin, 2 * fin, 16, 32, 24, 4 * fin])
        h = self.linear(x, hidden, tie=False)
        pre = h
        if self.d.bool(0.3):  # gated (SwiGLU-style): act(gate) * up
            g = self.linear(x, hidden, tie=False)
            h = self.binary(self.act(g, self.d.choice(["silu", "gelu"])), h, "mul")
        else:
            h = self.act(h)
        if self.d.bool(0.25):  # a learnable scale inside the split MLP
            h = self.param(h, "mul")
        y = self.linear(h, out, tie=False)
        if self.d.bool(0.15):  # the column output, gathered, consumed by a reduction
            y = self.binary(y, self.reduce(pre, self.d.choice(["mean", "sum"]), -1, True), "add")
        return y

    def attention(self, x: int, out: int) -> int:
        heads = self.d.choice([4, 4, 2, 8, 1, 3])
        dh = self.d.choice([2, 4, 4, 6])
        inner = heads * dh
        style = self.d.choice(["separate", "separate", "fused_split", "fused_chunk", "fused_view"])
        if style == "separate":
            q, k, v = (self.linear(x, inner, tie=False) for _ in range(3))
        elif style in ("fused_split", "fused_chunk"):
            f = self.linear(x, 3 * inner, tie=False)
            if style == "fused_split":
                q, k, v = self.split(f, 2, "split", [inner] * 3)
            else:
                q, k, v = self.split(f, 2, "chunk", 3)
        else:
            f = self.linear(x, 3 * inner, tie=False)
            if self.d.bool(0.5):  # (b, t, 3, h, dh) -> (3, b, h, t, dh)
                v5 = self.add("view", [f], (B, T, 3, heads, dh), target=[B, T, 3, heads, dh], method="view")
                p = self.permute(v5, [2, 0, 3, 1, 4])
            else:                 # (b, t, h, 3, dh) -> (3, b, h, t, dh)
                v5 = self.add("view", [f], (B, T, heads, 3, dh), target=[B, T, heads, 3, dh], method="view")
                p = self.permute(v5, [3, 0, 2, 1, 4])
            q, k, v = self.split(p, 0, "unbind", None)
        if style != "fused_view":
            q, k, v = (self.transpose(self.to_heads(t, heads), 1, 2) for t in (q, k, v))
        if self.d.bool(0.3):  # per-head norms on q and k, over head_dim
            kind = self.d.choice(["rmsnorm", "layernorm", "rmsnorm"])
            q, k = self.norm(q, kind), self.norm(k, kind)
        if self.d.bool(0.5):
            o = self.sdpa(q, k, v)
        else:
            s = self.scale(self.matmul_t(q, k), 1 / math.sqrt(dh))
            o = self.matmul(self.softmax(s, -1), v)
        o = self.merge_heads(self.transpose(o, 1, 2))
        return self.linear(o, out, tie=False)

    def block(self, x: int) -> int:
        s = self.shape(x)
        seq = len(s) == 3 and s[:2] == (B, T)
        kinds = ["mlp", "mlp", "attn", "attn", "parallel", "random"] if seq else ["mlp", "mlp", "random"]
        kind = self.d.choice(kinds)
        if kind == "random":
            for _ in range(self.d.int(1, 3)):
                y = self.random_op()
                if y is not None and self.shape(y) == s:
                    x = y
            return x
        h = self.norm(x, self.d.choice(["layernorm", "rmsnorm"])) if self.d.bool(0.5) else x
        out = s[-1] if self.d.bool(0.85) else self.d.choice(_widths(s[-1]))
        if kind == "mlp":
            y = self.mlp(h, out)
        elif kind == "attn":
            y = self.attention(h, out)
        else:
            y = self.binary(self.attention(h, out), self.mlp(h, out), "add")
        if self.shape(y) == s and self.d.bool(0.7):
            y = self.binary(x, y, "add")
        return y

    def random_op(self) -> int | None:
        """One primitive op on random existing values (None when the pick does not apply)."""
        kind = self.d.choice(["linear", "linear", "act", "scale", "param", "binary", "binary", "norm", "softmax",
                              "reduce", "reduce", "transpose", "unsqueeze", "cat", "split", "heads", "matmul",
                              "permute"])
        if kind == "linear":
            x = self.pick(lambda s: _is_int(s[-1]))
            return None if x is None else self.linear(x)
        if kind in ("act", "scale", "param", "softmax", "reduce", "transpose", "unsqueeze", "permute"):
            x = self.pick(lambda s: len(s) <= 4)
            if x is None:
                return None
            return getattr(self, kind)(x)
        if kind == "norm":
            x = self.pick(lambda s: _is_int(s[-1]) and s[-1] > 1)
            return None if x is None else self.norm(x)
        if kind == "binary":
            a = self.pick()
            b = self.pick(lambda s: _broadcast(self.shape(a), s) is not None)
            return self.binary(a, b)
        if kind == "cat":
            a = self.pick(lambda s: any(_is_int(v) and v > 1 for v in s))
            if a is None:
                return None
            s = self.shape(a)
            dims = [i for i, v in enumerate(s) if _is_int(v) and v > 1]
            dim = self.d.choice(dims)
            others = [i for i in self.values()
                      if len(self.shape(i)) == len(s) and all(u == v for j, (u, v) in enumerate(zip(self.shape(i), s))
                                                              if j != dim) and _is_int(self.shape(i)[dim])]
            return self.cat([a, self.d.choice(others)], dim)
        if kind == "split":
            a = self.pick(lambda s: any(_is_int(v) and v > 1 for v in s))
            if a is None:
                return None
            s = self.shape(a)
            dim = self.d.choice([i for i, v in enumerate(s) if _is_int(v) and v > 1])
            size = s[dim]
            divs = [n for n in (2, 3, 4) if size % n == 0]
            if divs and self.d.bool(0.5):
                items = self.split(a, dim, "chunk", self.d.choice(divs))
            else:
                cut = self.d.int(1, size - 1)
                items = self.split(a, dim, "split", [cut, size - cut])
            # Use the pieces: recombine some (a gather of split values), leave others as outputs.
            if len(items) >= 2 and self.d.bool(0.5):
                r = self.binary(self.act(items[0]), items[1], "mul")
                if r is not None:
                    return r
            return items[-1]
        if kind == "heads":
            x = self.pick(lambda s: len(s) == 3 and s[:2] == (B, T) and _is_int(s[2]))
            if x is None:
                return None
            f = self.shape(x)[-1]
            hs = [h for h in (2, 4, 8, 3) if f % h == 0 and f // h > 1]
            if not hs:
                return None
            y = self.to_heads(x, self.d.choice(hs))
            if self.d.bool(0.5):
                y = self.transpose(y, 1, 2)
                if self.d.bool(0.5):
                    y = self.softmax(y, self.d.int(-4, 3))
                y = self.transpose(y, 1, 2)
            return self.merge_heads(y)
        if kind == "matmul":
            a = self.pick(lambda s: len(s) >= 2)
            if a is None:
                return None
            sa = self.shape(a)
            b = self.pick(lambda s: len(s) == len(sa) and s[:-2] == sa[:-2] and s[-1] == sa[-1])
            return self.matmul_t(a, b) if b is not None else None
        return None


def _widths(fin: Any) -> list[int]:
    base = [8, 16, 12, 24, 32, 6, 10]
    if _is_int(fin):
        base += [2 * fin, 4 * fin]
    return base


def _jsonable(shape: Any) -> Any:
    if isinstance(shape, tuple):
        return list(shape)
    return shape


def generate(d: Any) -> dict:
    """A random valid model spec from the choices ``d`` makes (RandomDraw or HypothesisDraw)."""
    g = _Gen(d)
    kind = d.choice(["float3", "float3", "float3", "ids", "ids", "float2"])
    dim = d.choice([8, 16, 8, 12, 16, 24, 6, 10])
    if kind == "ids":
        vocab = d.choice([16, 32, 12, 10])
        g.add("input", [], (B, T), kind="ids", vocab=vocab)
        g.embedding = f"emb{len(g.nodes)}"
        x = g.add("embedding", [0], (B, T, dim), mod=g.embedding, vocab=vocab, dim=dim)
    else:
        x = g.add("input", [], (B, T, dim) if kind == "float3" else (B, dim), kind=kind)
    for _ in range(d.int(1, 3)):
        x = g.block(x)
        if d.bool(0.3):
            g.random_op()
    if g.embedding is not None and g.shape(x)[-1] == dim and d.bool(0.5):
        vocab = g.nodes[1]["vocab"]
        x = g.add("tied_head", [x], g.shape(x)[:-1] + (vocab,), mod=g.embedding,
                  functional=d.bool(0.5), head=f"head{len(g.nodes)}")
    elif d.bool(0.4) and _is_int(g.shape(x)[-1]):
        x = g.linear(x, d.choice([8, 16, 10, 12]))
    used = {i for n in g.nodes for i in n["in"]}
    outputs = [i for i in g.values() if i not in used and g.nodes[i]["op"] != "input"]
    return {"input": dict(g.nodes[0]), "nodes": g.nodes, "outputs": outputs}


def mlp_spec(dim: int = 8, hidden: int = 32) -> dict:
    """A fixed model that every planner splits: x -> Linear -> GELU -> Linear (+ x)."""
    g = _Gen(RandomDraw(random.Random(0)))
    x = g.add("input", [], (B, T, dim), kind="float3")
    h = g.act(g.linear(x, hidden, bias=True, tie=False), "gelu")
    y = g.binary(x, g.linear(h, dim, bias=True, tie=False), "add")
    return {"input": dict(g.nodes[0]), "nodes": g.nodes, "outputs": [y]}


def random_spec(seed: Any) -> dict:
    return generate(RandomDraw(random.Random(seed)))


def model_spec():
    """The hypothesis strategy: random model specs (shrinking towards simpler models)."""
    from hypothesis import strategies as st

    @st.composite
    def _spec(draw):
        return generate(HypothesisDraw(draw))

    return _spec()


# ---------------------------------------------------------------------------------------------
# The model: a spec interpreted in forward (traceable by torch.fx.symbolic_trace).


def _norm_module(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, dtype=DT)
    if kind == "layernorm_noaffine":
        return nn.LayerNorm(dim, elementwise_affine=False, dtype=DT)
    if kind == "layernorm_nobias":
        return nn.LayerNorm(dim, bias=False, dtype=DT)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, dtype=DT)
    if kind == "rmsnorm_noaffine":
        return nn.RMSNorm(dim, elementwise_affine=False, dtype=DT)
    raise ValueError(kind)


class SpecModel(nn.Module):
    """A spec as a module. Parameters get random (never trivial) values from ``seed``."""

    def __init__(self, spec: dict, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(tuple(s), generator=g, dtype=DT)  # noqa: E731
        for n in spec["nodes"]:
            op, mod = n["op"], n.get("mod")
            if op == "linear" and not hasattr(self, mod):
                lin = nn.Linear(n["fin"], n["out"], bias=n["bias"], dtype=DT)
                with torch.no_grad():
                    lin.weight.copy_(rnd(n["out"], n["fin"]) / math.sqrt(n["fin"]))
                    if n["bias"]:
                        lin.bias.copy_(0.5 * rnd(n["out"]) + 0.2)
                setattr(self, mod, lin)
            elif op == "embedding":
                emb = nn.Embedding(n["vocab"], n["dim"], dtype=DT)
                with torch.no_grad():
                    emb.weight.copy_(rnd(n["vocab"], n["dim"]))
                setattr(self, mod, emb)
            elif op == "tied_head" and not n["functional"]:
                emb = getattr(self, mod)
                head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, dtype=DT)
                head.weight = emb.weight
                setattr(self, n["head"], head)
            elif op == "norm":
                m = _norm_module(n["kind"], n["dim"])
                with torch.no_grad():
                    if getattr(m, "weight", None) is not None:
                        m.weight.copy_(1 + 0.3 * rnd(n["dim"]))
                    if getattr(m, "bias", None) is not None:
                        m.bias.copy_(0.3 * rnd(n["dim"]))
                setattr(self, mod, m)
            elif op == "param":
                base = 1.0 if n["how"] == "mul" else 0.0
                self.register_parameter(mod, nn.Parameter(base + 0.5 * rnd(*n["pshape"])))

    def forward(self, x: torch.Tensor) -> Any:
        spec = self.spec
        b = x.size(0)
        t = x.size(1) if len(spec["input"]["shape"]) > 1 and spec["input"]["shape"][1] == T else None
        sizes = {B: b, T: t}
        vals: list[Any] = []
        for n in spec["nodes"]:
            op = n["op"]
            a = [vals[i] for i in n["in"]]
            if op == "input":
                v = x
            elif op in ("linear", "embedding"):
                v = getattr(self, n["mod"])(a[0])
            elif op == "tied_head":
                v = F.linear(a[0], getattr(self, n["mod"]).weight) if n["functional"] else getattr(self, n["head"])(a[0])
            elif op == "act":
                v = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
                     "sigmoid": torch.sigmoid}[n["fn"]](a[0])
            elif op == "scale":
                v = a[0] * n["c"]
            elif op == "param":
                p = getattr(self, n["mod"])
                v = a[0] * p if n["how"] == "mul" else a[0] + p
            elif op == "binary":
                v = {"add": lambda u, w: u + w, "sub": lambda u, w: u - w, "mul": lambda u, w: u * w}[n["fn"]](*a)
            elif op == "norm":
                v = getattr(self, n["mod"])(a[0])
            elif op == "softmax":
                v = torch.softmax(a[0], dim=n["dim"])
            elif op == "reduce":
                v = getattr(a[0], n["fn"])(n["dim"], keepdim=n["keepdim"])
            elif op == "view":
                target = [sizes.get(s, s) for s in n["target"]]
                if n["method"] == "view":
                    v = a[0].view(*target)
                elif n["method"] == "reshape":
                    v = a[0].reshape(*target)
                elif n["method"] == "contiguous_view":
                    v = a[0].contiguous().view(*target)
                else:
                    v = a[0].flatten(2)
            elif op == "transpose":
                v = a[0].transpose(*n["dims"])
            elif op == "permute":
                v = a[0].permute(*n["perm"])
            elif op == "unsqueeze":
                v = a[0].unsqueeze(n["dim"])
            elif op == "matmul_t":
                v = a[0] @ a[1].transpose(-2, -1)
            elif op == "matmul":
                v = torch.matmul(a[0], a[1])
            elif op == "sdpa":
                v = F.scaled_dot_product_attention(a[0], a[1], a[2], is_causal=n["causal"])
            elif op == "cat":
                v = torch.cat(a, dim=n["dim"])
            elif op == "split":
                if n["method"] == "split":
                    v = a[0].split(n["arg"], dim=n["dim"])
                elif n["method"] == "chunk":
                    v = a[0].chunk(n["arg"], dim=n["dim"])
                else:
                    v = a[0].unbind(n["dim"])
            elif op == "item":
                v = a[0][n["index"]]
            else:
                raise ValueError(f"unknown op {op!r}")
            vals.append(v)
        outs = [vals[i] for i in spec["outputs"]]
        return outs[0] if len(outs) == 1 else tuple(outs)


def make_inputs(spec: dict, seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    inp = spec["input"]
    shape = [{B: batch, T: seq}.get(s, s) for s in inp["shape"]]
    if inp["kind"] == "ids":
        return torch.randint(0, inp["vocab"], shape, generator=g)
    return torch.randn(*shape, generator=g, dtype=DT)


# ---------------------------------------------------------------------------------------------
# Python source of a spec (for reproducers).


def to_python(spec: dict, name: str = "Repro") -> str:
    """A stand-alone nn.Module definition equivalent to ``spec`` (parameter values aside)."""
    init, body = [], []
    made: set[str] = set()
    v = lambda i: "x" if i == 0 else f"v{i}"  # noqa: E731
    for i, n in enumerate(spec["nodes"]):
        op, a = n["op"], [v(j) for j in n["in"]]
        mod = n.get("mod")
        if op == "input":
            continue
        if op == "linear":
            if mod not in made:
                init.append(f"self.{mod} = nn.Linear({n['fin']}, {n['out']}, bias={n['bias']})")
                made.add(mod)
            e = f"self.{mod}({a[0]})"
        elif op == "embedding":
            init.append(f"self.{mod} = nn.Embedding({n['vocab']}, {n['dim']})")
            e = f"self.{mod}({a[0]})"
        elif op == "tied_head":
            if n["functional"]:
                e = f"F.linear({a[0]}, self.{mod}.weight)"
            else:
                fin = spec["nodes"][n["in"][0]]["shape"][-1]
                init.append(f"self.{n['head']} = nn.Linear({fin}, {n['shape'][-1]}, bias=False)")
                init.append(f"self.{n['head']}.weight = self.{mod}.weight")
                e = f"self.{n['head']}({a[0]})"
        elif op == "act":
            e = {"relu": "torch.relu", "gelu": "F.gelu", "silu": "F.silu", "tanh": "torch.tanh",
                 "sigmoid": "torch.sigmoid"}[n["fn"]] + f"({a[0]})"
        elif op == "scale":
            e = f"{a[0]} * {n['c']!r}"
        elif op == "param":
            base = "torch.ones" if n["how"] == "mul" else "torch.zeros"
            init.append(f"self.{mod} = nn.Parameter({base}({tuple(n['pshape'])}))")
            e = f"{a[0]} {'*' if n['how'] == 'mul' else '+'} self.{mod}"
        elif op == "binary":
            e = f"{a[0]} {dict(add='+', sub='-', mul='*')[n['fn']]} {a[1]}"
        elif op == "norm":
            ctor = {"layernorm": "nn.LayerNorm({d})", "layernorm_noaffine": "nn.LayerNorm({d}, elementwise_affine=False)",
                    "layernorm_nobias": "nn.LayerNorm({d}, bias=False)", "rmsnorm": "nn.RMSNorm({d})",
                    "rmsnorm_noaffine": "nn.RMSNorm({d}, elementwise_affine=False)"}[n["kind"]]
            init.append(f"self.{mod} = " + ctor.format(d=n["dim"]))
            e = f"self.{mod}({a[0]})"
        elif op == "softmax":
            e = f"{a[0]}.softmax({n['dim']})"
        elif op == "reduce":
            e = f"{a[0]}.{n['fn']}({n['dim']}, keepdim={n['keepdim']})"
        elif op == "view":
            tgt = ", ".join({B: "b", T: "t"}.get(s, str(s)) for s in n["target"])
            e = {"view": f"{a[0]}.view({tgt})", "reshape": f"{a[0]}.reshape({tgt})",
                 "contiguous_view": f"{a[0]}.contiguous().view({tgt})", "flatten": f"{a[0]}.flatten(2)"}[n["method"]]
        elif op == "transpose":
            e = f"{a[0]}.transpose({n['dims'][0]}, {n['dims'][1]})"
        elif op == "permute":
            e = f"{a[0]}.permute({', '.join(map(str, n['perm']))})"
        elif op == "unsqueeze":
            e = f"{a[0]}.unsqueeze({n['dim']})"
        elif op == "matmul_t":
            e = f"{a[0]} @ {a[1]}.transpose(-2, -1)"
        elif op == "matmul":
            e = f"{a[0]} @ {a[1]}"
        elif op == "sdpa":
            e = f"F.scaled_dot_product_attention({', '.join(a)}, is_causal={n['causal']})"
        elif op == "cat":
            e = f"torch.cat([{', '.join(a)}], dim={n['dim']})"
        elif op == "split":
            e = {"split": f"{a[0]}.split({n['arg']}, dim={n['dim']})", "chunk": f"{a[0]}.chunk({n['arg']}, dim={n['dim']})",
                 "unbind": f"{a[0]}.unbind({n['dim']})"}[n["method"]]
        elif op == "item":
            e = f"{a[0]}[{n['index']}]"
        else:
            e = f"?{op}"
        shape = f"  # {tuple(n['shape'])}" if op != "split" else ""
        body.append(f"{v(i)} = {e}{shape}".replace("'B'", "B").replace("'T'", "T"))
    inp = spec["input"]
    uses_t = any(n["op"] == "view" and T in n["target"] for n in spec["nodes"])
    head = ["b, t = x.shape[0], x.shape[1]" if uses_t else "b = x.shape[0]"] \
        if any(n["op"] == "view" and n["method"] != "flatten" for n in spec["nodes"]) else []
    outs = ", ".join(v(i) for i in spec["outputs"])
    lines = [f"class {name}(nn.Module):  # input {inp['kind']} {tuple(inp['shape'])}".replace("'", ""),
             "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {s}" for s in init] or ["        pass"]
    lines += ["    def forward(self, x):"] + [f"        {s}" for s in head + body] + [f"        return {outs}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The check, inside each rank.


def _err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, the allowed error for reference b)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    tol = TOL * max(1.0, scale)
    if a.shape != b.shape:
        return math.inf, tol
    return float((a - b).abs().max()) if a.numel() else 0.0, tol


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _node_names(model: nn.Module) -> set[str]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return set()
    return {n.name for n in gm.graph.nodes} | {n for n, _ in model.named_modules() if n}


def check_example(spec: dict, rank: int, world: int, seed: int, defect: str | None = None) -> dict:
    """Shard one spec on this rank and compare against the unsharded copy (see module doc)."""
    torch.manual_seed(seed)
    return check_model(SpecModel(spec, seed), make_inputs(spec, seed), make_inputs(spec, seed + 1, BATCH2, SEQ2),
                       rank, world, seed, defect)


def check_model(model: nn.Module, x: torch.Tensor, x2: torch.Tensor, rank: int, world: int, seed: int = 0,
                defect: str | None = None) -> dict:
    """Shard ``model`` on this rank and compare against its unsharded copy: outputs on ``x``,
    input and parameter gradients, a step, outputs on ``x2`` (see module doc)."""
    import tpshard

    t0 = time.perf_counter()
    res: dict[str, Any] = {"status": "ok", "sharded": False, "failures": []}
    ref = copy.deepcopy(model)
    try:
        sharded = tpshard.parallelize(model, world, example_inputs=(x,))
    except tpshard.PlanError as e:
        msg = str(e)
        names = _node_names(ref)
        quoted = set(re.findall(r"'([^']+)'", msg)) | set(re.findall(r"\b\w+\b", msg))
        return {"status": "refused", "reason": msg, "names_node": bool(names & quoted),
                "seconds": time.perf_counter() - t0}
    except Exception:
        return {"status": "error", "stage": "parallelize", "reason": traceback.format_exc(limit=-3)[-1500:],
                "seconds": time.perf_counter() - t0}
    plan = sharded.tpshard_plan
    res["sharded"] = any(m.style != "replicate" for m in plan.modules.values())
    res["styles"] = {k: m.style for k, m in plan.modules.items()}
    fails = res["failures"]

    def close(what: str, a: Any, b: Any) -> None:
        if a is None or b is None:  # no gradient on one side: the other must be zero
            other = b if a is None else a
            if other is not None and other.abs().any():
                fails.append([what, f"gradient {'missing' if a is None else 'unexpected'}"])
            return
        a, b = a.detach(), b.detach()
        if a.shape != b.shape:
            fails.append([what, f"shape {tuple(a.shape)} != {tuple(b.shape)}"])
            return
        e, tol = _err(a, b)
        if not e <= tol:
            fails.append([what, e, e / (tol / TOL)])  # absolute error, and relative to max(1, max|ref|)

    stage = "forward"
    try:
        split = [n for n, p in sharded.named_parameters() if plan.params[n].dim is not None]
        if defect == "param":  # a wrong shard on the last rank: the check must see it
            name = (split or [n for n, _ in sharded.named_parameters()])[0]
            if rank == world - 1:
                with torch.no_grad():
                    p = sharded.get_parameter(name)
                    p.view(-1)[0] += 1e-6 * float(p.abs().max())
        floating = x.is_floating_point()
        xs = x.clone().requires_grad_(floating)
        xr = x.clone().requires_grad_(floating)
        out, ref_out = _as_tuple(sharded(xs)), _as_tuple(ref(xr))
        if len(out) != len(ref_out):
            fails.append(["outputs", f"{len(out)} outputs, expected {len(ref_out)}"])
            raise _Stop
        for i, (o, r) in enumerate(zip(out, ref_out)):
            close(f"output {i}", o, r)
        stage = "backward"
        g = torch.Generator().manual_seed(20_000 + seed)
        weights = [torch.randn(r.shape, generator=g, dtype=DT) for r in ref_out]
        loss = sum(((o * w).sum() for o, w in zip(out, weights)), torch.zeros((), dtype=DT))
        ref_loss = sum(((r * w).sum() for r, w in zip(ref_out, weights)), torch.zeros((), dtype=DT))
        if loss.requires_grad:  # (a model whose outputs need no gradient has no backward to check)
            loss.backward()
        if ref_loss.requires_grad:
            ref_loss.backward()
        if floating:
            close("input grad", xs.grad, xr.grad)
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        names = [n for n, _ in sharded.named_parameters()]
        missing = {n for n, _ in ref.named_parameters()} - set(names) - set(plan.ties)
        if missing:
            fails.append(["parameters", f"missing in the sharded model: {sorted(missing)}"])
        if defect == "grad":
            name = (split or names)[0]
            if rank == world - 1:
                gr = sharded.get_parameter(name).grad
                gr.view(-1)[0] += 1e-6 * float(gr.abs().max())
        for n, p in sharded.named_parameters():
            shard = plan.params[n]
            rg = ref_params[n].grad
            close(f"grad {n}", p.grad, shard.shard(rg, rank, world) if rg is not None else None)
        stage = "step"
        if list(ref.parameters()):  # (a model may have no parameters at all)
            torch.optim.SGD(sharded.parameters(), lr=0.1).step()
            torch.optim.SGD(ref.parameters(), lr=0.1).step()
        for n, p in sharded.named_parameters():
            close(f"step {n}", p, plan.params[n].shard(ref_params[n].detach(), rank, world))
        stage = "second forward"
        with torch.no_grad():
            for i, (o, r) in enumerate(zip(_as_tuple(sharded(x2)), _as_tuple(ref(x2)))):
                close(f"second forward {i}", o, r)
    except _Stop:
        pass
    except Exception:
        res.update(status="error", stage=stage, reason=traceback.format_exc(limit=-3)[-1500:])
    if fails and res["status"] == "ok":
        res["status"] = "mismatch"
    res["seconds"] = time.perf_counter() - t0
    return res


class _Stop(Exception):
    pass


def _rank_body(rank: int, world: int, jobs: list[tuple[int, dict, int, str | None]], outdir: str) -> None:
    """Check each (index, spec, seed, defect); one JSON line per example, flushed (survives a crash)."""
    path = os.path.join(outdir, f"rank{rank}.jsonl")
    with open(path, "a") as f:
        for idx, spec, seed, defect in jobs:
            f.write(json.dumps({"start": idx}) + "\n")
            f.flush()
            r = check_example(spec, rank, world, seed, defect)
            f.write(json.dumps({"index": idx, **r}, default=str) + "\n")
            f.flush()


def _read(outdir: str, world: int) -> tuple[list[dict[int, dict]], list[int | None]]:
    done: list[dict[int, dict]] = []
    started: list[int | None] = []
    for r in range(world):
        d: dict[int, dict] = {}
        last = None
        path = os.path.join(outdir, f"rank{r}.jsonl")
        if os.path.exists(path):
            for line in open(path):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "start" in rec:
                    last = rec["start"]
                else:
                    d[rec["index"]] = rec
        done.append(d)
        started.append(last)
    return done, started


def merge_ranks(per_rank: list[dict]) -> dict:
    """One example's result from every rank's: the worst status; failures tagged by rank."""
    order = {"error": 3, "mismatch": 2, "refused": 1, "ok": 0}
    worst = max(per_rank, key=lambda r: order[r["status"]])
    out = {k: v for k, v in worst.items() if k not in ("failures", "index")}
    fails = []
    for r, res in enumerate(per_rank):
        fails += [[f"rank {r}", *f] for f in res.get("failures", [])]
    out["failures"] = fails
    out["sharded"] = per_rank[0].get("sharded", False)
    out["seconds"] = max(r.get("seconds", 0.0) for r in per_rank)
    return out


def run_examples(specs: list[dict], world: int, *, seed: int = 0, defect: str | list | None = None,
                 per_example_s: float = 6.0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Check every spec on ``world`` ranks, in as few launches as possible; one result each.

    Example ``i`` is built with seed ``seed + i``. ``defect`` ("param", "grad"; one for all or a
    list, one per spec) injects a wrong shard or gradient on the last rank, to show the check
    fails. A launch that dies or hangs marks the example it was on as an error and resumes
    after it.
    """
    defects = defect if isinstance(defect, list) else [defect] * len(specs)
    from tpshard.verify.launch import RankError, RankTimeout, run_ranks

    outdir = tempfile.mkdtemp(prefix="tpshard-fuzz-")
    results: dict[int, dict] = {}
    try:
        remaining = list(range(len(specs)))
        while remaining:
            jobs = [(i, specs[i], seed + i, defects[i]) for i in remaining]
            failure = None
            try:
                run_ranks(_rank_body, world, jobs, outdir, timeout=20 + per_example_s * len(jobs))
            except (RankError, RankTimeout) as e:
                failure = str(e)[-1500:]
            done, started = _read(outdir, world)
            for i in remaining:
                if all(i in d for d in done):
                    results[i] = merge_ranks([d[i] for d in done])
            remaining = [i for i in remaining if i not in results]
            if failure is not None and remaining:
                stuck = [s for s in started if s is not None and s in remaining]
                bad = min(stuck) if stuck else remaining[0]
                results[bad] = {"status": "error", "stage": "launch", "reason": failure, "sharded": False,
                                "failures": [], "seconds": 0.0}
                remaining.remove(bad)
                if progress:
                    progress(f"world {world}: launch failed at example {bad}; resuming")
                for r in range(world):  # a fresh log for the next launch
                    p = os.path.join(outdir, f"rank{r}.jsonl")
                    if os.path.exists(p):
                        os.remove(p)
            elif failure is None and remaining:
                raise RuntimeError(f"launch finished without results for examples {remaining[:5]}")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    return [results[i] for i in range(len(specs))]


# ---------------------------------------------------------------------------------------------
# Shrinking a failing spec (for reproducers): smaller specs that keep the failure's signature.


def signature(result: dict) -> tuple[bool, bool]:
    """(outputs wrong, gradients wrong): the class of a mismatch, for shrinking."""
    what = [f[1] for f in result.get("failures", [])]
    return (any(w.startswith("output") for w in what),
            any(w.startswith(("grad", "input grad")) for w in what))


def _prune(spec: dict, outputs: list[int]) -> dict:
    """Keep node 0 and the ancestors of ``outputs``; renumber."""
    nodes = spec["nodes"]
    keep, stack = {0}, list(outputs)
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(nodes[i]["in"])
    order = sorted(keep)
    new = {old: k for k, old in enumerate(order)}
    out_nodes = []
    for old in order:
        n = dict(nodes[old])
        n["in"] = [new[j] for j in n["in"]]
        out_nodes.append(n)
    outs = list(dict.fromkeys(new[i] for i in outputs))
    return {"input": dict(spec["input"]), "nodes": out_nodes, "outputs": outs}


def shrink_candidates(spec: dict) -> list[dict]:
    """One-step simplifications: drop an output, bypass a node by a same-shaped input, or
    make a linear bias-free / a norm plain / a parameter a scalar."""
    nodes, outs = spec["nodes"], spec["outputs"]
    cands = []
    if len(outs) > 1:
        for o in outs:
            cands.append(_prune(spec, [p for p in outs if p != o]))
    for i, n in enumerate(nodes):
        if n["op"] in ("input", "split", "item", "embedding"):
            continue
        for j in dict.fromkeys(n["in"]):
            if nodes[j]["op"] == "split" or (nodes[j]["op"] == "input" and nodes[j]["kind"] == "ids"):
                continue
            sink = all(i not in m["in"] for m in nodes)  # only an output: any shape will do
            if sink or list(nodes[j]["shape"]) == list(n["shape"]):
                s = copy.deepcopy(spec)
                for m in s["nodes"]:
                    m["in"] = [j if k == i else k for k in m["in"]]
                cands.append(_prune(s, [j if k == i else k for k in outs]))
    inp = nodes[0]
    if inp["kind"] != "ids":  # start later: a node shaped like the input replaces it
        for i, n in enumerate(nodes[1:], 1):
            if list(n["shape"]) == list(inp["shape"]) and n["op"] not in ("item",):
                s = copy.deepcopy(spec)
                for m in s["nodes"]:
                    m["in"] = [0 if k == i else k for k in m["in"]]
                if i in outs:
                    continue
                cands.append(_prune(s, outs))
    for i, n in enumerate(nodes):
        alt = None
        if n["op"] == "linear" and n["bias"] and all(m.get("mod") != n["mod"] for m in nodes[:i]):
            alt = {"bias": False}
        elif n["op"] == "norm" and n["kind"] not in ("layernorm_noaffine", "rmsnorm_noaffine"):
            alt = {"kind": "rmsnorm_noaffine" if n["kind"].startswith("rms") else "layernorm_noaffine"}
        elif n["op"] == "param" and n["pshape"]:
            alt = {"pshape": []}
        if alt:
            s = copy.deepcopy(spec)
            s["nodes"][i].update(alt)
            if "bias" in alt:
                for m in s["nodes"]:
                    if m.get("mod") == n["mod"]:
                        m["bias"] = False
            cands.append(s)
    return cands


def _size(spec: dict) -> tuple[int, int]:
    return (len(spec["nodes"]), sum(1 for n in spec["nodes"] if n.get("bias") or n["op"] in ("norm", "param")))


def shrink(spec: dict, world: int, result: dict, *, seed: int = 0, rounds: int = 30,
           progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Greedy shrinking on real ranks: each round checks every one-step simplification in one
    launch and keeps the smallest that fails with the same :func:`signature`."""
    want = signature(result)
    for _ in range(rounds):
        cands = sorted(shrink_candidates(spec), key=_size)
        if not cands:
            break
        res = run_examples(cands, world, seed=seed)
        hit = next(((c, r) for c, r in zip(cands, res) if r["status"] == "mismatch" and signature(r) == want), None)
        if hit is None or _size(hit[0]) >= _size(spec):
            break
        spec, result = hit
        if progress:
            progress(f"shrunk to {len(spec['nodes'])} nodes")
    return spec, result
