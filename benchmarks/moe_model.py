"""A mixture-of-experts language model for ``benchmarks/compare_tp.py``, and its hand-written
expert-tensor-parallel rank module built from tpshard's layers.

The reference (:class:`MoELM`): token embedding, ``n_layer`` residual MoE blocks (RMSNorm, a
router ``Linear(d, E)`` with softmax and top-k, ``E`` SwiGLU experts in a loop that selects each
expert's tokens and adds their results with ``index_add_``, a shared SwiGLU expert beside them),
a final norm and the head.

The hand-written rank module (:class:`HandwrittenMoELM`), what an engineer writes by hand with
Megatron's expert tensor parallelism:

==============================  ============================================================
reference module                hand-written rank module
==============================  ============================================================
``embed``                       ``VocabParallelEmbedding`` (one forward all-reduce)
``router``                      replicated (every rank routes alike)
each expert's ``w1``, ``w3``    ``ColumnParallelLinear`` (no copy, no gather)
each expert's ``w2``            ``RowParallelLinear`` (no reduce)
the shared expert               the same
the MoE block                   the tokens and the routing weights each through ``mp_copy``
                                (two backward all-reduces), routed and shared partial sums
                                added, then ONE ``mp_reduce``
``lm_head``                     ``ColumnParallelLinear(gather_output=True)``
==============================  ============================================================

Example (one rank: every collective is the identity)::

    >>> import torch
    >>> ref, (ids,) = build_moe(dtype=torch.float64)
    >>> torch.allclose(HandwrittenMoELM(ref)(ids), ref(ids))
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

__all__ = ["MoELM", "HandwrittenMoELM", "build_moe"]


class Expert(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopExperts(nn.Module):
    def __init__(self, d: int, h: int, n: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(n))

    def forward(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


class MoEBlock(nn.Module):
    def __init__(self, d: int, h: int, n: int, k: int, shared: int) -> None:
        super().__init__()
        self.k = k
        self.norm = nn.RMSNorm(d)
        self.router = nn.Linear(d, n, bias=False)
        self.experts = LoopExperts(d, h, n)
        self.shared = Expert(d, shared)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.norm(x).reshape(-1, x.shape[-1])
        w, idx = torch.topk(torch.softmax(self.router(h), dim=-1), self.k, dim=-1)
        return h, idx, w / w.sum(-1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        h, idx, w = self.route(x)
        return x + (self.experts(h, idx, w) + self.shared(h)).view_as(x)


class MoELM(nn.Module):
    def __init__(self, vocab_size: int = 64, d: int = 32, hidden: int = 48, experts: int = 4, top_k: int = 2,
                 shared: int = 64, n_layer: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.blocks = nn.ModuleList(MoEBlock(d, hidden, experts, top_k, shared) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))


def build_moe(dtype: torch.dtype = torch.float32, device: Any = "cpu", batch: int = 2, seq: int = 8,
              **config: Any) -> tuple[MoELM, tuple[Tensor]]:
    """A randomized :class:`MoELM` and example ids ``(batch, seq)``."""
    torch.manual_seed(0)
    model = MoELM(**config).to(dtype=dtype, device=device)
    models.randomize_(model)
    vocab = model.embed.num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return model, (ids,)


def _col(lin: nn.Linear, g: comm.Group) -> ColumnParallelLinear:
    return ColumnParallelLinear.from_module(lin, group=g, copy_input=False, gather_output=False)


def _row(lin: nn.Linear, g: comm.Group) -> RowParallelLinear:
    return RowParallelLinear.from_module(lin, group=g, input_is_parallel=True, reduce_output=False)


class _TPExpert(nn.Module):
    def __init__(self, ref: Expert, g: comm.Group) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = _col(ref.w1, g), _col(ref.w3, g), _row(ref.w2, g)

    def forward(self, x: Tensor) -> Tensor:  # x copied into the region; the output a partial sum
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _TPBlock(nn.Module):
    def __init__(self, ref: MoEBlock, g: comm.Group) -> None:
        super().__init__()
        self.g, self.k = g, ref.k
        self.norm, self.router = copy.deepcopy(ref.norm), copy.deepcopy(ref.router)
        self.experts = nn.ModuleList(_TPExpert(e, g) for e in ref.experts.experts)
        self.shared = _TPExpert(ref.shared, g)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x).reshape(-1, x.shape[-1])
        w, idx = torch.topk(torch.softmax(self.router(h), dim=-1), self.k, dim=-1)
        w = comm.mp_copy(w / w.sum(-1, keepdim=True), self.g)
        h = comm.mp_copy(h, self.g)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(h[tok]) * w[tok, slot, None])
        return x + comm.mp_reduce(out + self.shared(h), self.g).view_as(x)


class HandwrittenMoELM(nn.Module):
    """This rank's hand-written expert-tensor-parallel copy of a :class:`MoELM`."""

    def __init__(self, ref: MoELM, group: Any = None) -> None:
        super().__init__()
        g = comm.resolve_group(group)
        self.embed = VocabParallelEmbedding.from_module(ref.embed, group=g, reduce_output=True)
        self.blocks = nn.ModuleList(_TPBlock(b, g) for b in ref.blocks)
        self.norm = copy.deepcopy(ref.norm)
        self.lm_head = ColumnParallelLinear.from_module(ref.lm_head, group=g, gather_output=True)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))
