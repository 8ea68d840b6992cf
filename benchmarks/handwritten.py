"""Hand-written Megatron-style tensor-parallel GPT and Llama, built directly from tpshard's layers.

The baseline (c) of ``benchmarks/compare_tp.py``: what an engineer writes by hand with
Megatron's recipe, using :mod:`tpshard.layers` and :mod:`tpshard.comm` directly (no tracing, no
plan). Each class copies its rank's shards out of a reference model from
:mod:`tpshard.models`, so it computes the same function as the reference (and as
``tpshard.parallelize`` of it) with the same per-op decomposition (same linears, explicit
attention for GPT, SDPA for Llama, same norms and dropouts):

==============================  ============================================================
reference module                hand-written rank module
==============================  ============================================================
``wte`` / ``embed_tokens``      ``VocabParallelEmbedding`` (one forward all-reduce)
``wpe`` (GPT positions)         replicated ``nn.Embedding`` (Megatron keeps it whole)
``attn.c_attn`` (fused q/k/v)   ``ColumnParallelLinear(segments=(C, C, C))``: rank r holds
                                ``[q_r | k_r | v_r]``; heads ``n_head // world`` locally
``q_proj, k_proj, v_proj``      three ``ColumnParallelLinear`` behind ONE ``mp_copy`` (one
                                backward all-reduce for the three, as Megatron's fused qkv)
``gate_proj, up_proj``          two ``ColumnParallelLinear`` behind one ``mp_copy``
``c_proj`` / ``o_proj`` /       ``RowParallelLinear(input_is_parallel=True)``: one forward
``down_proj``                   all-reduce, the bias added once after it
``lm_head``                     ``ColumnParallelLinear(gather_output=True)`` (tied to the
                                vocabulary-split ``wte`` when the reference ties them)
norms                           replicated copies
==============================  ============================================================

Collectives per training step: one all-reduce per attention block and one per MLP in each
direction, one for the embedding, one all-gather for the logits (and one backward
all-reduce for the head's input) -- Megatron's optimum.

Example (one rank: the group is a one-rank world and every collective is the identity)::

    >>> import torch
    >>> from tpshard import models
    >>> ref, (ids,) = models.build("gpt", dtype=torch.float64)
    >>> tp = MegatronGPT(ref)
    >>> torch.allclose(tp(ids), ref(ids))
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpshard import comm, models
from tpshard.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = ["MegatronGPT", "MegatronLlama", "MegatronLlamaBlock", "build_handwritten"]


def _check_divides(world: int, **sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if v % world}
    if bad:
        raise ValueError(f"world size {world} must divide {bad}")


# ---------------------------------------------------------------------------------------------
# GPT


class _GPTAttention(nn.Module):
    """Rank's causal self-attention over ``n_head // world`` local heads (explicit softmax)."""

    def __init__(self, ref: models.CausalSelfAttention, group: comm.Group) -> None:
        super().__init__()
        world = group.size
        _check_divides(world, n_head=ref.n_head)
        self.group = group
        self.n_head = ref.n_head // world  # local heads
        self.head_dim = ref.head_dim
        self.local_embd = ref.n_embd // world
        self.scale = ref.scale
        C = ref.n_embd
        # Fused q/k/v: rank r owns rows [q_r | k_r | v_r] (segments of C each, split evenly).
        self.c_attn = ColumnParallelLinear.from_module(
            ref.c_attn, segments=(C, C, C), group=group, gather_output=False, copy_input=True)
        self.c_proj = RowParallelLinear.from_module(
            ref.c_proj, group=group, input_is_parallel=True, reduce_output=True)
        self.attn_dropout = copy.deepcopy(ref.attn_dropout)
        self.resid_dropout = copy.deepcopy(ref.resid_dropout)
        self.register_buffer("bias", ref.bias.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.size()  # x: (B, T, C) replicated
        q, k, v = self.c_attn(x).split(self.local_embd, dim=2)  # each (B, T, C / world)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        mask = self.bias[:, :, :T, :T]
        att = att.masked_fill(mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, h, T, d)
        y = y.transpose(1, 2).contiguous().view(B, T, self.local_embd)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) replicated


class _GPTMLP(nn.Module):
    def __init__(self, ref: models.GPTMLP, group: comm.Group) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear.from_module(ref.c_fc, group=group, gather_output=False)
        self.gelu = copy.deepcopy(ref.gelu)
        self.c_proj = RowParallelLinear.from_module(ref.c_proj, group=group, input_is_parallel=True)
        self.dropout = copy.deepcopy(ref.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class _GPTBlock(nn.Module):
    def __init__(self, ref: models.Block, group: comm.Group) -> None:
        super().__init__()
        self.ln_1 = copy.deepcopy(ref.ln_1)
        self.attn = _GPTAttention(ref.attn, group)
        self.ln_2 = copy.deepcopy(ref.ln_2)
        self.mlp = _GPTMLP(ref.mlp, group)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class MegatronGPT(nn.Module):
    """This rank's hand-written tensor-parallel copy of a :class:`tpshard.models.GPT`.

    ``forward(idx (B, T))`` -> full logits ``(B, T, vocab)`` on every rank, equal to
    ``ref(idx)``. Parameters are exact copies of this rank's shards of ``ref``'s.
    """

    def __init__(self, ref: models.GPT, group: Any = None) -> None:
        super().__init__()
        g = comm.resolve_group(group)
        cfg = ref.config
        _check_divides(g.size, vocab_size=cfg.vocab_size, n_embd=cfg.n_embd, n_head=cfg.n_head)
        self.config = cfg
        self.wte = VocabParallelEmbedding.from_module(ref.wte, group=g, reduce_output=True)
        self.wpe = copy.deepcopy(ref.wpe)  # positions: replicated
        self.drop = copy.deepcopy(ref.drop)
        self.h = nn.ModuleList(_GPTBlock(b, g) for b in ref.h)
        self.ln_f = copy.deepcopy(ref.ln_f)
        self.lm_head = ColumnParallelLinear.from_module(ref.lm_head, group=g, gather_output=True)
        if ref.lm_head.weight is ref.wte.weight:
            # Both split the vocabulary in contiguous blocks: the same rows on this rank.
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) replicated
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, V) gathered


# ---------------------------------------------------------------------------------------------
# Llama


class _LlamaAttention(nn.Module):
    """Rank's attention: local q heads ``n_head // world`` and kv heads ``n_kv_head // world``.

    ``collectives=False`` leaves out the entry copy and the exit all-reduce (compute only)."""

    def __init__(self, ref: models.LlamaAttention, group: comm.Group, collectives: bool = True) -> None:
        super().__init__()
        world = group.size
        _check_divides(world, n_head=ref.n_head, n_kv_head=ref.n_kv_head)
        self.group = group
        self.collectives = collectives
        self.n_head = ref.n_head // world
        self.n_kv_head = ref.n_kv_head // world
        self.head_dim = ref.head_dim
        self.n_rep = ref.n_rep
        col = dict(group=group, gather_output=False, copy_input=False)  # one shared mp_copy
        self.q_proj = ColumnParallelLinear.from_module(ref.q_proj, **col)
        self.k_proj = ColumnParallelLinear.from_module(ref.k_proj, **col)
        self.v_proj = ColumnParallelLinear.from_module(ref.v_proj, **col)
        self.o_proj = RowParallelLinear.from_module(ref.o_proj, group=group, input_is_parallel=True,
                                                    reduce_output=collectives)

    def _repeat_kv(self, x: Tensor, B: int, T: int) -> Tensor:
        if self.n_rep == 1:
            return x
        x = x[:, :, None, :, :].expand(B, self.n_kv_head, self.n_rep, T, self.head_dim)
        return x.reshape(B, self.n_head, T, self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.size()
        if self.collectives:
            x = comm.mp_copy(x, self.group)  # backward: one all-reduce for q, k and v together
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q = models.apply_rotary(q, cos, sin)
        k = models.apply_rotary(k, cos, sin)
        k = self._repeat_kv(k, B, T)
        v = self._repeat_kv(v, B, T)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return _row_out(self.o_proj(y), self.o_proj, self.collectives)  # (B, T, hidden) replicated


def _row_out(y: Tensor, row: RowParallelLinear, collectives: bool) -> Tensor:
    """A row layer built with ``reduce_output=False`` returns its partial sum without the bias."""
    return y + row.bias if not collectives and row.bias is not None else y


class _LlamaMLP(nn.Module):
    def __init__(self, ref: models.LlamaMLP, group: comm.Group, collectives: bool = True) -> None:
        super().__init__()
        self.group = group
        self.collectives = collectives
        col = dict(group=group, gather_output=False, copy_input=False)  # one shared mp_copy
        self.gate_proj = ColumnParallelLinear.from_module(ref.gate_proj, **col)
        self.up_proj = ColumnParallelLinear.from_module(ref.up_proj, **col)
        self.down_proj = RowParallelLinear.from_module(ref.down_proj, group=group, input_is_parallel=True,
                                                       reduce_output=collectives)

    def forward(self, x: Tensor) -> Tensor:
        if self.collectives:
            x = comm.mp_copy(x, self.group)
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return _row_out(y, self.down_proj, self.collectives)


class MegatronLlamaBlock(nn.Module):
    """This rank's hand-sharded :class:`tpshard.models.LlamaBlock` (``forward(x, cos, sin)``).

    ``collectives=False`` builds the compute-only shard (no copy, no all-reduce: the output is
    this rank's partial sums plus the residual), as ``benchmarks/gpu_compute.py`` times it.
    """

    def __init__(self, ref: models.LlamaBlock, group: Any = None, collectives: bool = True) -> None:
        super().__init__()
        group = comm.resolve_group(group)
        self.input_layernorm = copy.deepcopy(ref.input_layernorm)
        self.self_attn = _LlamaAttention(ref.self_attn, group, collectives)
        self.post_attention_layernorm = copy.deepcopy(ref.post_attention_layernorm)
        self.mlp = _LlamaMLP(ref.mlp, group, collectives)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class MegatronLlama(nn.Module):
    """This rank's hand-written tensor-parallel copy of a :class:`tpshard.models.Llama`.

    ``forward(idx (B, T))`` -> full logits ``(B, T, vocab)``, equal to ``ref(idx)``.
    """

    def __init__(self, ref: models.Llama, group: Any = None) -> None:
        super().__init__()
        g = comm.resolve_group(group)
        cfg = ref.config
        _check_divides(g.size, vocab_size=cfg.vocab_size, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                       intermediate_size=cfg.intermediate_size)
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding.from_module(ref.embed_tokens, group=g, reduce_output=True)
        self.layers = nn.ModuleList(MegatronLlamaBlock(b, g) for b in ref.layers)
        self.norm = copy.deepcopy(ref.norm)
        self.lm_head = ColumnParallelLinear.from_module(ref.lm_head, group=g, gather_output=True)
        if ref.lm_head.weight is ref.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("cos", ref.cos.detach().clone(), persistent=False)
        self.register_buffer("sin", ref.sin.detach().clone(), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.embed_tokens(idx)  # (B, T, hidden) replicated
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.lm_head(x)  # (B, T, V) gathered


def build_handwritten(ref: nn.Module, group: Any = None) -> nn.Module:
    """The hand-written rank module for a reference GPT or Llama (see the module docstring)."""
    if isinstance(ref, models.GPT):
        return MegatronGPT(ref, group)
    if isinstance(ref, models.Llama):
        return MegatronLlama(ref, group)
    raise TypeError(f"no hand-written tensor-parallel version of {type(ref).__name__}; "
                    "use a tpshard.models.GPT or Llama")
