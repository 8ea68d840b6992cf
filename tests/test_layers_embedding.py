"""Tests for tpshard.layers' ParallelEmbedding and VocabParallelEmbedding against nn.Embedding.

Embedding-dim and vocab splits, padding_idx (and which rank owns the padding row),
scale_grad_by_freq, max_norm, sparse grads and reduce_output=False partials. The rank checks
run in one launch per world size (1, 2, 4); each does its collectives first, then compares
and returns its mismatches. float64, batch > 1.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

from tpshard import comm, layout
from tpshard.comm import OfflineGroup
from tpshard.layers import ParallelEmbedding, VocabParallelEmbedding

from _dist import DT, WORLDS, Checker, Suite, comm_counts, expected_counts, gen, ref_embedding


def _grad(t: torch.Tensor) -> torch.Tensor:
    g = t.grad
    assert g is not None
    return g.to_dense() if g.is_sparse else g


def _embedding_checks(rank: int, world: int, ck: Checker) -> None:
    g = gen(2)
    W = world
    V, D = 12, 2 * W
    ids = torch.cat([torch.randperm(V, generator=g), torch.randperm(V, generator=g)]).reshape(3, 8)

    # ParallelEmbedding (embedding-dim split), with and without a padding row.
    for kw in ({}, {"padding_idx": 7}, {"padding_idx": -2, "scale_grad_by_freq": True}, {"sparse": True}):
        ck.prefix = f"ParallelEmbedding {kw}: "
        ref = ref_embedding(g, V, D, **kw)
        layer = ParallelEmbedding.from_module(ref)
        G = torch.randn(3, 8, D, generator=g, dtype=DT)
        y_ref = ref(ids)
        (y_ref * G).sum().backward()
        with CommDebugMode() as m:
            y = layer(ids)
        fwd = comm_counts(m)
        with CommDebugMode() as m:
            (y * G).sum().backward()
        bwd = comm_counts(m)
        full = layer.gather_weight()
        ck.close("output", y, y_ref)
        ck.close("weight grad", _grad(layer.weight), layout.shard(_grad(ref.weight), 1, rank, W))
        if ref.padding_idx is not None:
            ck.true("pad row grad is zero", bool((_grad(layer.weight)[ref.padding_idx] == 0).all()))
        ck.close("gather_weight", full, ref.weight.detach())
        ck.equal("fwd counts", fwd, expected_counts(W, all_gather=1))
        ck.equal("bwd counts", bwd, {})

    # VocabParallelEmbedding: ids hit every rank's range; the padding row (id 7) lives on one
    # rank; scale_grad_by_freq, max_norm and sparse are exact; reduce_output=False gives partials.
    variants: list[dict[str, Any]] = [
        {}, {"padding_idx": 7}, {"padding_idx": 7, "scale_grad_by_freq": True},
        {"max_norm": 1.0}, {"max_norm": 1.5, "norm_type": 1.0, "padding_idx": 0}, {"sparse": True, "padding_idx": 3},
    ]
    for kw in variants:
        ck.prefix = f"VocabParallelEmbedding {kw}: "
        ref = ref_embedding(g, V, D, scale=3.0, **kw)
        layer = VocabParallelEmbedding.from_module(ref)
        G = torch.randn(3, 8, D, generator=g, dtype=DT)
        y_ref = ref(ids)
        (y_ref * G).sum().backward()
        with CommDebugMode() as m:
            y = layer(ids)
        fwd = comm_counts(m)
        with CommDebugMode() as m:
            (y * G).sum().backward()
        bwd = comm_counts(m)
        full = layer.gather_weight()
        ck.close("output", y, y_ref)
        ck.close("weight grad", _grad(layer.weight), layout.shard(_grad(ref.weight), 0, rank, W))
        ck.close("weight (after max_norm renorm)", layer.weight, layout.shard(ref.weight.detach(), 0, rank, W))
        ck.close("gather_weight", full, ref.weight.detach())
        if ref.padding_idx is not None:
            ck.true("reference pad grad is zero", bool((_grad(ref.weight)[ref.padding_idx] == 0).all()))
            if layer.local_padding_idx is not None:
                ck.true("pad row grad is zero", bool((_grad(layer.weight)[layer.local_padding_idx] == 0).all()))
            owner = ref.padding_idx // (V // W)
            ck.equal("padding owner", layer.local_padding_idx, ref.padding_idx % (V // W) if rank == owner else None)
        ck.equal("fwd counts", fwd, expected_counts(W, all_reduce=1))
        ck.equal("bwd counts", bwd, {})

    ck.prefix = "VocabParallelEmbedding reduce_output=False: "
    ref = ref_embedding(g, V, D)
    layer = VocabParallelEmbedding.from_module(ref, reduce_output=False)
    with CommDebugMode() as m:
        partial = layer(ids)
    ck.equal("fwd counts", comm_counts(m), {})
    ck.close("sum of partials", comm.mp_reduce(partial), ref(ids).detach())
    lo, hi = rank * V // W, (rank + 1) * V // W
    mine = ((ids >= lo) & (ids < hi)).unsqueeze(-1)
    ck.close("partial is zero off-range", partial.masked_fill(mine, 0.0), torch.zeros_like(partial))

    # Fresh init zeroes the padding row, on the rank owning it.
    ck.prefix = "VocabParallelEmbedding fresh padding: "
    torch.manual_seed(5)
    fresh = VocabParallelEmbedding(V, D, padding_idx=7)
    full = fresh.gather_weight()
    ck.true("pad row zero", bool((full[7] == 0).all()) and bool((full.abs().sum(1) > 0).sum() == V - 1))


SUITE = Suite(("embedding", _embedding_checks))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_embeddings(world: int) -> None:
    """ParallelEmbedding and VocabParallelEmbedding vs nn.Embedding incl. padding_idx."""
    SUITE.report(world, "embedding")


def test_max_norm_refused_for_split_embedding_dim() -> None:
    with pytest.raises(ValueError, match="max_norm=1.0 cannot work with world size 2.*partial norm"):
        ParallelEmbedding(8, 4, max_norm=1.0, group=OfflineGroup(0, 2))
    with pytest.raises(ValueError, match="max_norm"):
        ParallelEmbedding.from_module(nn.Embedding(8, 4, max_norm=1.0), group=OfflineGroup(1, 2))
    ParallelEmbedding(8, 4, max_norm=1.0)  # one rank: exact, allowed
    VocabParallelEmbedding(8, 4, max_norm=1.0, group=OfflineGroup(0, 2))  # whole rows: exact

