"""Tests for tpshard.layers against nn.Linear / nn.Embedding / F.cross_entropy.

Every multi-rank check runs inside a few launches (one per world size 1, 2, 4, plus one per
world size for the hypothesis examples): a check does all its collectives first, then
compares, and returns its mismatches, so a wrong value on one rank never leaves another rank
waiting. Local shards are compared with ``layout.shard`` of the reference's values and grads.
float64, batch > 1, non-zero biases.
"""

from __future__ import annotations

import copy
import doctest
import time
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

# Imported here, not in the ranks: forked ranks inherit it (importing it in a rank costs ~1 s).
from torch.distributed.tensor.debug import CommDebugMode

from tpshard import comm, layers, layout
from tpshard.comm import OfflineGroup
from tpshard.launch import run_ranks
from tpshard.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

DT = torch.float64
WORLDS = [1, 2, 4]


# ---------------------------------------------------------------------------------------------
# Helpers (the same as in test_comm.py; kept here so this file stands alone).


def comm_counts(mode: CommDebugMode) -> dict[str, int]:
    """Collective counts by kind ("all_reduce", "all_gather", "reduce_scatter").

    ``get_comm_counts()`` keys are c10d ops (``torch.ops.c10d.allreduce_``,
    ``torch.ops.c10d._allgather_base_``, ...); classifying by name keeps the tests valid if
    comm.py switches to another variant of the same collective.
    """
    out: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        name = str(op).replace("_", "")
        kind = ("all_reduce" if "allreduce" in name else "all_gather" if "allgather" in name
                else "reduce_scatter" if "reducescatter" in name else str(op))
        if n:
            out[kind] = out.get(kind, 0) + n
    return out


class Checker:
    """Collects mismatches instead of raising, so every rank runs the same collectives."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.failures: list[str] = []

    def close(self, what: str, actual: Any, expected: Any, tol: float = 1e-10) -> None:
        try:
            torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
        except AssertionError as e:
            self.failures.append(f"{self.prefix}{what}: {e}")

    def equal(self, what: str, actual: Any, expected: Any) -> None:
        if actual != expected:
            self.failures.append(f"{self.prefix}{what}: {actual!r} != {expected!r}")

    def true(self, what: str, cond: bool) -> None:
        if not cond:
            self.failures.append(f"{self.prefix}{what}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(g: torch.Generator, fin: int, fout: int, bias: bool = True) -> nn.Linear:
    """An nn.Linear with random weights and a clearly non-zero bias (same on every rank)."""
    lin = nn.Linear(fin, fout, bias=bias, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(fout, fin, generator=g, dtype=DT))
        if bias:
            lin.bias.copy_(torch.randn(fout, generator=g, dtype=DT) + 2.0)
    return lin


def _embedding(g: torch.Generator, num: int, dim: int, scale: float = 1.0, **kw: Any) -> nn.Embedding:
    emb = nn.Embedding(num, dim, dtype=DT, **kw)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(num, dim, generator=g, dtype=DT) * scale)
    return emb


def _counts(world: int, **expected: int) -> dict[str, int]:
    """Expected collective counts: none at all on one rank."""
    return {k: v for k, v in expected.items() if v} if world > 1 else {}


def _grad(t: torch.Tensor) -> torch.Tensor:
    g = t.grad
    assert g is not None
    return g.to_dense() if g.is_sparse else g


# ---------------------------------------------------------------------------------------------
# Per-layer checks (each runs on every rank of a launch).


def _column_check(rank: int, world: int, ck: Checker, g: torch.Generator, fin: int, fout: int,
                  segs: tuple[int, ...] | None, stride: int, bias: bool, gather_output: bool,
                  batch: tuple[int, ...] = (3, 2)) -> None:
    """ColumnParallelLinear.from_module(nn.Linear(fin, fout)) on this rank vs the reference."""
    layout_segs = segs if segs is not None else layout.strided(fout, stride)
    ref = _linear(g, fin, fout, bias)
    layer = ColumnParallelLinear.from_module(ref, stride=stride, segments=segs, gather_output=gather_output)
    x = torch.randn(*batch, fin, generator=g, dtype=DT)
    G = torch.randn(*batch, fout, generator=g, dtype=DT)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * G).sum().backward()
    with CommDebugMode() as m:
        y = layer(xt)
    fwd = comm_counts(m)
    G_here = G if gather_output else layout.shard(G, -1, rank, world, layout_segs)
    with CommDebugMode() as m:
        (y * G_here).sum().backward()
    bwd = comm_counts(m)
    full_w, full_b = layer.gather_weight(), layer.gather_bias()
    # ---- compare (all collectives are done)
    ck.close("output", y, y_ref if gather_output else layout.shard(y_ref.detach(), -1, rank, world, layout_segs))
    ck.close("input grad", xt.grad, xr.grad)
    ck.close("weight grad", layer.weight.grad, layout.shard(ref.weight.grad, 0, rank, world, layout_segs))
    if bias:
        ck.close("bias grad", layer.bias.grad, layout.shard(ref.bias.grad, 0, rank, world, layout_segs))
        ck.close("gather_bias", full_b, ref.bias.detach())
    else:
        ck.true("no bias", layer.bias is None and full_b is None)
    ck.close("weight shard", layer.weight, layout.shard(ref.weight.detach(), 0, rank, world, layout_segs))
    ck.close("gather_weight", full_w, ref.weight.detach())
    ck.equal("fwd counts", fwd, _counts(world, all_gather=int(gather_output)))
    ck.equal("bwd counts", bwd, _counts(world, all_reduce=1))


def _row_check(rank: int, world: int, ck: Checker, g: torch.Generator, fin: int, fout: int,
               segs: tuple[int, ...] | None, stride: int, bias: bool, input_is_parallel: bool,
               batch: tuple[int, ...] = (3, 2)) -> None:
    """RowParallelLinear.from_module(nn.Linear(fin, fout)) on this rank vs the reference."""
    layout_segs = segs if segs is not None else layout.strided(fin, stride)
    ref = _linear(g, fin, fout, bias)
    layer = RowParallelLinear.from_module(ref, stride=stride, segments=segs, input_is_parallel=input_is_parallel)
    x = torch.randn(*batch, fin, generator=g, dtype=DT)
    G = torch.randn(*batch, fout, generator=g, dtype=DT)
    xr = x.clone().requires_grad_()
    xt = (layout.shard(x, -1, rank, world, layout_segs) if input_is_parallel else x).clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * G).sum().backward()
    with CommDebugMode() as m:
        y = layer(xt)
    fwd = comm_counts(m)
    with CommDebugMode() as m:
        (y * G).sum().backward()
    bwd = comm_counts(m)
    full_w = layer.gather_weight()
    ck.close("output", y, y_ref)
    x_grad = layout.shard(xr.grad, -1, rank, world, layout_segs) if input_is_parallel else xr.grad
    ck.close("input grad", xt.grad, x_grad)
    ck.close("weight grad", layer.weight.grad, layout.shard(ref.weight.grad, 1, rank, world, layout_segs))
    if bias:
        ck.close("bias grad", layer.bias.grad, ref.bias.grad)
        ck.close("gather_bias", layer.gather_bias(), ref.bias.detach())
    ck.close("gather_weight", full_w, ref.weight.detach())
    ck.equal("fwd counts", fwd, _counts(world, all_reduce=1))
    ck.equal("bwd counts", bwd, _counts(world, all_gather=int(not input_is_parallel)))


def _linear_checks(rank: int, world: int, ck: Checker) -> None:
    g = _gen(1)
    W = world
    # contiguous, the seed's stride=3 (fused q/k/v), and unequal segments (q=2k=2v widths).
    layouts = [(2 * W, None, 1), (6 * W, None, 3), (4 * W, (2 * W, W, W), 1), (16 * W, (8 * W, 4 * W, 4 * W), 1)]
    for size, segs, stride in layouts:
        for bias in (True, False):
            for flag in (True, False):
                ck.prefix = f"column size={size} segs={segs} stride={stride} bias={bias} gather_output={flag}: "
                _column_check(rank, world, ck, g, 5, size, segs, stride, bias, flag)
                ck.prefix = f"row size={size} segs={segs} stride={stride} bias={bias} input_is_parallel={flag}: "
                _row_check(rank, world, ck, g, size, 3, segs, stride, bias, flag)

    # Row with reduce_output=False: the partial sum carries no bias; reduce + bias once is exact.
    ck.prefix = "row reduce_output=False: "
    ref = _linear(g, 4 * W, 3)
    layer = RowParallelLinear.from_module(ref, reduce_output=False)
    x = torch.randn(3, 2, 4 * W, generator=g, dtype=DT)
    with CommDebugMode() as m:
        partial = layer(x)
    ck.equal("fwd counts", comm_counts(m), {})
    ck.close("partial + bias once", comm.mp_reduce(partial) + layer.bias, ref(x))
    ck.close("partial has no bias", partial, F.linear(layout.shard(x, -1, rank, W), layer.weight))

    # Column without copy_input: the input grad is this rank's partial (the rewriter reduces it).
    ck.prefix = "column copy_input=False: "
    ref = _linear(g, 4, 2 * W)
    layer = ColumnParallelLinear.from_module(ref, copy_input=False, gather_output=False)
    x = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    with CommDebugMode() as m:
        layer(x).sum().backward()
    ck.equal("fwd+bwd counts", comm_counts(m), {})
    ck.close("local input grad", x.grad, layer.weight.sum(0).detach().expand(3, 4))

    # Fused q/k/v with unequal widths: the local output is [q_r | k_r | v_r] and each part is
    # rank r's heads of the reference's q, k, v.
    ck.prefix = "fused qkv: "
    q, kv = 4 * W, 2 * W
    ref = _linear(g, 6, q + 2 * kv)
    layer = ColumnParallelLinear.from_module(ref, segments=(q, kv, kv), gather_output=False)
    x = torch.randn(2, 3, 6, generator=g, dtype=DT)
    full = ref(x).detach()
    lq, lk, lv = layer(x).split(list(layout.local_segments(q + 2 * kv, W, (q, kv, kv))), dim=-1)
    ref_q, ref_k, ref_v = full.split([q, kv, kv], dim=-1)
    ck.close("q", lq, ref_q.chunk(W, -1)[rank])
    ck.close("k", lk, ref_k.chunk(W, -1)[rank])
    ck.close("v", lv, ref_v.chunk(W, -1)[rank])
    ref = _linear(g, 6, 3 * 2 * W)
    ck.close("stride=3 equals three equal segments", ColumnParallelLinear.from_module(ref, stride=3).weight,
             ColumnParallelLinear.from_module(ref, segments=(2 * W,) * 3).weight, tol=0)
    ck.close("stride=3 is rank r's block of each third", ColumnParallelLinear.from_module(ref, stride=3).weight,
             torch.cat([t.chunk(W)[rank] for t in ref.weight.detach().chunk(3)]), tol=0)


def _embedding_checks(rank: int, world: int, ck: Checker) -> None:
    g = _gen(2)
    W = world
    V, D = 12, 2 * W
    ids = torch.cat([torch.randperm(V, generator=g), torch.randperm(V, generator=g)]).reshape(3, 8)

    # ParallelEmbedding (embedding-dim split), with and without a padding row.
    for kw in ({}, {"padding_idx": 7}, {"padding_idx": -2, "scale_grad_by_freq": True}, {"sparse": True}):
        ck.prefix = f"ParallelEmbedding {kw}: "
        ref = _embedding(g, V, D, **kw)
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
        ck.equal("fwd counts", fwd, _counts(W, all_gather=1))
        ck.equal("bwd counts", bwd, {})

    # VocabParallelEmbedding: ids hit every rank's range; the padding row (id 7) lives on one
    # rank; scale_grad_by_freq, max_norm and sparse are exact; reduce_output=False gives partials.
    variants: list[dict[str, Any]] = [
        {}, {"padding_idx": 7}, {"padding_idx": 7, "scale_grad_by_freq": True},
        {"max_norm": 1.0}, {"max_norm": 1.5, "norm_type": 1.0, "padding_idx": 0}, {"sparse": True, "padding_idx": 3},
    ]
    for kw in variants:
        ck.prefix = f"VocabParallelEmbedding {kw}: "
        ref = _embedding(g, V, D, scale=3.0, **kw)
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
        ck.equal("fwd counts", fwd, _counts(W, all_reduce=1))
        ck.equal("bwd counts", bwd, {})

    ck.prefix = "VocabParallelEmbedding reduce_output=False: "
    ref = _embedding(g, V, D)
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


def _cross_entropy_checks(rank: int, world: int, ck: Checker) -> None:
    g = _gen(3)
    W = world
    V = 4 * W + 4 * (W == 1)  # >= 8 classes, divisible by the world size
    for shape in ((6,), (3, 4)):
        logits = torch.randn(*shape, V, generator=g, dtype=DT) * 3
        target = torch.randint(0, V, shape, generator=g)
        target.view(-1)[1] = -100
        target.view(-1)[-1] = -100
        for ignore_index in (-100, 2):
            for ls in (0.0, 0.1):
                for reduction in ("mean", "sum", "none"):
                    ck.prefix = f"ce shape={shape} ignore={ignore_index} ls={ls} {reduction}: "
                    tgt = target if ignore_index == -100 else target.masked_fill(target == -100, 2)
                    full = logits.clone().requires_grad_()
                    ref = F.cross_entropy(full.flatten(0, -2), tgt.flatten(), ignore_index=ignore_index,
                                          reduction=reduction, label_smoothing=ls)
                    up = torch.randn(ref.shape, generator=g, dtype=DT)
                    (ref * up).sum().backward()
                    local = layout.shard(logits, -1, rank, W).clone().requires_grad_()
                    with CommDebugMode() as m:
                        loss = vocab_parallel_cross_entropy(local, tgt, ignore_index=ignore_index,
                                                            reduction=reduction, label_smoothing=ls)
                    fwd = comm_counts(m)
                    with CommDebugMode() as m:
                        (loss * up).sum().backward()
                    bwd = comm_counts(m)
                    ck.close("loss", loss, ref.detach())
                    ck.close("grad", local.grad, layout.shard(full.grad, -1, rank, W))
                    ck.equal("fwd counts", fwd, _counts(W, all_reduce=2))
                    ck.equal("bwd counts", bwd, {})
    # Numerically stable: huge logits on one rank's slice only.
    ck.prefix = "ce stability: "
    logits = torch.randn(4, V, generator=g, dtype=DT)
    logits[:, -1] += 1000.0
    target = torch.tensor([0, V - 1, 1, V - 2])
    local = layout.shard(logits, -1, rank, W).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target)
    loss.backward()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, target)
    ref.backward()
    ck.close("loss", loss, ref.detach())
    ck.true("finite grad", bool(torch.isfinite(local.grad).all()))
    ck.close("grad", local.grad, layout.shard(full.grad, -1, rank, W))


def _seed_example_checks(rank: int, world: int, ck: Checker) -> None:
    """The seed docstring: embedding -> column(gather_output=False) -> row(input_is_parallel)."""
    g = _gen(4)
    W = world
    vocab, fin, fout = 16, 4 * W, 6 * W
    ck.prefix = "seed example from_module: "
    ref = nn.Sequential(_embedding(g, vocab, fin), _linear(g, fin, fout), _linear(g, fout, fout))
    tp = nn.Sequential(
        ParallelEmbedding.from_module(ref[0]),
        ColumnParallelLinear.from_module(ref[1], gather_output=False),
        RowParallelLinear.from_module(ref[2], input_is_parallel=True),
    )
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    G = torch.randn(3, 5, fout, generator=g, dtype=DT)
    y_ref = ref(ids)
    (y_ref * G).sum().backward()
    with CommDebugMode() as m:
        y = tp(ids)
    fwd = comm_counts(m)
    with CommDebugMode() as m:
        (y * G).sum().backward()
    bwd = comm_counts(m)
    ck.close("output", y, y_ref)
    ck.close("embedding grad", tp[0].weight.grad, layout.shard(ref[0].weight.grad, 1, rank, W))
    ck.close("column weight grad", tp[1].weight.grad, layout.shard(ref[1].weight.grad, 0, rank, W))
    ck.close("column bias grad", tp[1].bias.grad, layout.shard(ref[1].bias.grad, 0, rank, W))
    ck.close("row weight grad", tp[2].weight.grad, layout.shard(ref[2].weight.grad, 1, rank, W))
    ck.close("row bias grad", tp[2].bias.grad, ref[2].bias.grad)
    ck.equal("fwd counts", fwd, _counts(W, all_gather=1, all_reduce=1))
    ck.equal("bwd counts", bwd, _counts(W, all_reduce=1))

    # Fresh init: seeding identically, each rank's weights are its shard of the weights a
    # one-rank layer gets, and the global RNG advances the same way.
    ck.prefix = "seed example fresh init: "
    torch.manual_seed(1234)
    tp = nn.Sequential(
        ParallelEmbedding(vocab, fin),
        ColumnParallelLinear(fin, fout, gather_output=False),
        RowParallelLinear(fout, fout, input_is_parallel=True),
    ).to(DT)
    after_tp = torch.rand(3)
    torch.manual_seed(1234)
    one = comm.OfflineGroup(0, 1)
    ref = nn.Sequential(
        ParallelEmbedding(vocab, fin, group=one),
        ColumnParallelLinear(fin, fout, group=one),
        RowParallelLinear(fout, fout, group=one),
    ).to(DT)
    after_one = torch.rand(3)
    gathered = [tp[0].gather_weight(), tp[1].gather_weight(), tp[2].gather_weight()]
    y = tp(ids)
    ck.close("rng advanced equally", after_tp, after_one, tol=0)
    ck.close("embedding shard", tp[0].weight, layout.shard(ref[0].weight.detach(), 1, rank, W), tol=0)
    ck.close("column shard", tp[1].weight, layout.shard(ref[1].weight.detach(), 0, rank, W), tol=0)
    ck.close("row shard", tp[2].weight, layout.shard(ref[2].weight.detach(), 1, rank, W), tol=0)
    for i in range(3):
        ck.close(f"gather_weight {i}", gathered[i], ref[i].weight.detach(), tol=0)
    ck.close("biases start at zero", tp[1].bias, torch.zeros_like(tp[1].bias), tol=0)
    ck.close("fresh output", y, ref(ids).detach())

    # Fresh init of fused layouts and vocab rows, per layer.
    ck.prefix = "fresh init layouts: "
    for make in (
        lambda grp: ColumnParallelLinear(3, 3 * 2 * W, stride=3, group=grp, init_type="orthogonal", dtype=DT),
        lambda grp: ColumnParallelLinear(3, 4 * W, segments=(2 * W, W, W), group=grp, dtype=DT),
        lambda grp: RowParallelLinear(4 * W, 3, segments=(2 * W, W, W), group=grp, init_type="kaiming_uniform",
                                      dtype=DT),
        lambda grp: VocabParallelEmbedding(4 * W, 3, padding_idx=1, group=grp, dtype=DT),
    ):
        torch.manual_seed(99)
        layer = make(None)
        torch.manual_seed(99)
        single = make(one)
        dim = 1 if isinstance(layer, RowParallelLinear) else 0
        segs = getattr(layer, "segments", None)
        expected = layout.shard(single.weight.detach(), dim, rank, W, segs)
        ck.close(f"{type(layer).__name__}", layer.weight, expected, tol=0)


def _layers_suite(rank: int, world: int) -> dict[str, list[str]]:
    results = {}
    for name, check in (
        ("linear", _linear_checks),
        ("embedding", _embedding_checks),
        ("cross_entropy", _cross_entropy_checks),
        ("seed_example", _seed_example_checks),
    ):
        ck = Checker()
        check(rank, world, ck)
        results[name] = ck.failures
    return results


_suite_cache: dict[int, list[dict[str, list[str]]]] = {}


def _suite(world: int) -> list[dict[str, list[str]]]:
    """Run all layer checks on ``world`` ranks once (cached for the tests that report them)."""
    if world not in _suite_cache:
        _suite_cache[world] = run_ranks(_layers_suite, world, timeout=60)
    return _suite_cache[world]


def _report(world: int, name: str) -> None:
    failures = [f"rank {r}: {f}" for r, res in enumerate(_suite(world)) for f in res[name]]
    assert not failures, "\n".join(failures[:30])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_linear_layers(world: int) -> None:
    """Column and row forward/backward, layouts, flags, gather_weight, collective counts."""
    _report(world, "linear")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_embeddings(world: int) -> None:
    """ParallelEmbedding and VocabParallelEmbedding vs nn.Embedding incl. padding_idx."""
    _report(world, "embedding")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy(world: int) -> None:
    _report(world, "cross_entropy")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_seed_docstring_example(world: int) -> None:
    """The seed's Embedding -> Column -> Row example, via from_module and via fresh init."""
    _report(world, "seed_example")


def test_seed_row_bias_defect_is_caught() -> None:
    """The seed's row layer (bias in every rank's product AND after the reduce) must fail."""

    class SeedRow(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = comm.mp_reduce(F.linear(x, self.weight, self.bias), self.group)
            return y + self.bias

    ck = Checker()
    g = _gen(0)
    ref = _linear(g, 4, 3)
    x = torch.randn(2, 3, 4, generator=g, dtype=DT)
    ck.close("seed row", SeedRow.from_module(ref)(x), ref(x))
    assert ck.failures, "the double-bias defect went unnoticed"
    torch.testing.assert_close(RowParallelLinear.from_module(ref)(x), ref(x))


# ---------------------------------------------------------------------------------------------
# Hypothesis: sizes, layouts, flags. Examples are drawn in this process and checked inside
# one launch per world size.


@st.composite
def _linear_examples(draw: Any) -> dict[str, Any]:
    use_stride = draw(st.booleans())
    if use_stride:
        stride = draw(st.integers(1, 3))
        parts = [draw(st.integers(1, 2))] * stride
    else:
        stride = 1
        parts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return {
        "kind": draw(st.sampled_from(["column", "row"])),
        "other": draw(st.integers(1, 5)),
        "parts": parts,
        "stride": stride,
        "bias": draw(st.booleans()),
        "flag": draw(st.booleans()),
        "batch": tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _draw(strategy: st.SearchStrategy, n: int) -> list[Any]:
    drawn: list[Any] = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


def _hypothesis_body(rank: int, world: int, examples: list[dict[str, Any]]) -> list[str]:
    failures = []
    for ex in examples:
        ck = Checker(f"{ex}: ")
        g = _gen(ex["seed"])
        sizes = tuple(p * world for p in ex["parts"])  # every segment splits over the world
        size, stride = sum(sizes), ex["stride"]
        segs = None if stride > 1 else sizes  # the stride argument, or explicit segments
        if ex["kind"] == "column":
            _column_check(rank, world, ck, g, ex["other"], size, segs, stride, ex["bias"], ex["flag"], ex["batch"])
        else:
            _row_check(rank, world, ck, g, size, ex["other"], segs, stride, ex["bias"], ex["flag"], ex["batch"])
        failures += ck.failures
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_linear_layers_property(world: int) -> None:
    examples = _draw(_linear_examples(), 25)
    # the draw covers both kinds, the stride argument and multi-segment layouts
    assert len(examples) >= 10
    assert {e["kind"] for e in examples} == {"column", "row"}
    assert any(e["stride"] > 1 for e in examples) and any(e["stride"] == 1 and len(e["parts"]) > 1 for e in examples)
    results = run_ranks(_hypothesis_body, world, examples, timeout=60)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, "\n".join(failures[:20])


@settings(max_examples=15, deadline=None, database=None)
@given(
    world=st.sampled_from([1, 2, 4]),
    parts=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    fin=st.integers(1, 4),
    bias=st.booleans(),
)
def test_offline_shards_tile_the_module(world: int, parts: list[int], fin: int, bias: bool) -> None:
    """from_module on every rank of an offline group: the shards reassemble the module exactly."""
    segs = tuple(p * world for p in parts)
    lin = nn.Linear(fin, sum(segs), bias=bias, dtype=DT)
    cols = [ColumnParallelLinear.from_module(lin, segments=segs, group=OfflineGroup(r, world)) for r in range(world)]
    torch.testing.assert_close(layout.unshard([c.weight.detach() for c in cols], 0, segs), lin.weight.detach())
    if bias:
        torch.testing.assert_close(layout.unshard([c.bias.detach() for c in cols], 0, segs), lin.bias.detach())
    lin_t = nn.Linear(sum(segs), fin, bias=bias, dtype=DT)
    rows = [RowParallelLinear.from_module(lin_t, segments=segs, group=OfflineGroup(r, world)) for r in range(world)]
    torch.testing.assert_close(layout.unshard([r.weight.detach() for r in rows], 1, segs), lin_t.weight.detach())


# ---------------------------------------------------------------------------------------------
# Offline checks (no ranks needed): errors, from_module semantics, init, meta.


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda g: ColumnParallelLinear(4, 6, group=g),
         ["ColumnParallelLinear out_features=6", "world size 4", "[1, 2, 3, 6]"]),
        (lambda g: ColumnParallelLinear(4, 16, segments=(8, 4, 4), group=OfflineGroup(0, 8)),
         ["ColumnParallelLinear out_features=16", "segments [8, 4, 4]", "world size 8", "[1, 2, 4]"]),
        (lambda g: RowParallelLinear(10, 4, group=g),
         ["RowParallelLinear in_features=10", "world size 4", "[1, 2, 5, 10]"]),
        (lambda g: RowParallelLinear(18, 4, stride=3, group=g),
         ["RowParallelLinear in_features=18", "segments [6, 6, 6]", "[1, 2, 3, 6]"]),
        (lambda g: ParallelEmbedding(10, 6, group=g),
         ["ParallelEmbedding embedding_dim=6", "world size 4", "[1, 2, 3, 6]"]),
        (lambda g: VocabParallelEmbedding(50, 8, group=g),
         ["VocabParallelEmbedding num_embeddings=50", "world size 4", "[1, 2, 5, 10, 25, 50]"]),
    ],
)
def test_indivisible_sizes_name_the_argument(make: Callable, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make(OfflineGroup(0, 4))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_layout_argument_errors() -> None:
    with pytest.raises(ValueError, match="ColumnParallelLinear out_features=10: stride 3"):
        ColumnParallelLinear(4, 10, stride=3)
    with pytest.raises(ValueError, match="not both"):
        ColumnParallelLinear(4, 12, stride=3, segments=(4, 4, 4))
    with pytest.raises(ValueError, match="RowParallelLinear in_features=12: segments"):
        RowParallelLinear(12, 4, segments=(4, 4))
    with pytest.raises(ValueError, match="contiguous"):
        VocabParallelEmbedding.from_module(nn.Embedding(8, 2), stride=2)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        ColumnParallelLinear.from_module(nn.Embedding(8, 2))


def test_unknown_init_type() -> None:
    for make in (
        lambda: ColumnParallelLinear(4, 4, init_type="glorot"),
        lambda: RowParallelLinear(4, 4, init_type="glorot", device="meta"),
        lambda: ParallelEmbedding(4, 4, init_type="glorot"),
        lambda: VocabParallelEmbedding(4, 4, init_type="glorot"),
    ):
        with pytest.raises(ValueError, match="unknown init_type 'glorot'.*xavier_normal"):
            make()
    for name in layers.INIT_FUNCTIONS:
        assert ColumnParallelLinear(4, 4, init_type=name).weight.isfinite().all()


def test_max_norm_refused_for_split_embedding_dim() -> None:
    with pytest.raises(ValueError, match="max_norm=1.0 cannot work with world size 2.*partial norm"):
        ParallelEmbedding(8, 4, max_norm=1.0, group=OfflineGroup(0, 2))
    with pytest.raises(ValueError, match="max_norm"):
        ParallelEmbedding.from_module(nn.Embedding(8, 4, max_norm=1.0), group=OfflineGroup(1, 2))
    ParallelEmbedding(8, 4, max_norm=1.0)  # one rank: exact, allowed
    VocabParallelEmbedding(8, 4, max_norm=1.0, group=OfflineGroup(0, 2))  # whole rows: exact


def test_from_module_copies_exactly_and_owns_its_storage() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 8, dtype=DT)
    lin.weight.requires_grad_(False)
    layer = ColumnParallelLinear.from_module(lin, group=OfflineGroup(1, 2))
    torch.testing.assert_close(layer.weight, lin.weight[4:], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias[4:], rtol=0, atol=0)
    assert layer.weight.dtype == DT and not layer.weight.requires_grad and layer.bias.requires_grad
    before = layer.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
    row = RowParallelLinear.from_module(lin, group=OfflineGroup(0, 2))
    assert row.weight.is_contiguous() and row.bias.data_ptr() != lin.bias.data_ptr()
    emb = nn.Embedding(8, 4, padding_idx=3, dtype=torch.float16)
    v = VocabParallelEmbedding.from_module(emb, group=OfflineGroup(0, 2))
    assert v.weight.dtype == torch.float16 and v.local_padding_idx == 3
    v1 = VocabParallelEmbedding.from_module(emb, group=OfflineGroup(1, 2))
    assert v1.local_padding_idx is None and v1.padding_idx == 3
    # deep copies share the (uncopyable) group
    assert copy.deepcopy(layer).group is layer.group


def test_from_module_on_meta_is_instant() -> None:
    """A 7B-shaped (Llama) model on the meta device goes through from_module at once."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        emb = nn.Embedding(32000, 4096)
        attn = [nn.Linear(4096, 4096, bias=False) for _ in range(4)]
        gate_up = [nn.Linear(4096, 11008, bias=False) for _ in range(2)]
        down = nn.Linear(11008, 4096, bias=False)
    g = OfflineGroup(3, 8)
    out = [VocabParallelEmbedding.from_module(emb, group=g)]
    for _ in range(32):
        out += [ColumnParallelLinear.from_module(m, group=g, gather_output=False) for m in attn[:3]]
        out.append(RowParallelLinear.from_module(attn[3], group=g, input_is_parallel=True))
        out += [ColumnParallelLinear.from_module(m, group=g, gather_output=False) for m in gate_up]
        out.append(RowParallelLinear.from_module(down, group=g, input_is_parallel=True))
    assert time.perf_counter() - t0 < 5.0
    assert all(p.is_meta for m in out for p in m.parameters())
    assert out[0].weight.shape == (4000, 4096)
    assert out[1].weight.shape == (512, 4096) and out[4].weight.shape == (4096, 512)
    assert out[-1].weight.shape == (4096, 1376)
    assert out[1].gather_weight().shape == (4096, 4096)  # meta: no communication
    fresh = ColumnParallelLinear(4096, 4096, device="meta", group=g)
    assert fresh.weight.is_meta


def test_fresh_init_offline_shards_tile_the_one_rank_weight() -> None:
    for make, dim in (
        (lambda grp: ColumnParallelLinear(5, 12, stride=3, group=grp, dtype=DT), 0),
        (lambda grp: RowParallelLinear(16, 3, segments=(8, 4, 4), group=grp, dtype=DT), 1),
        (lambda grp: ParallelEmbedding(7, 8, padding_idx=2, group=grp, dtype=DT), 1),
        (lambda grp: VocabParallelEmbedding(8, 3, padding_idx=6, group=grp, dtype=DT), 0),
    ):
        torch.manual_seed(7)
        single = make(OfflineGroup(0, 1))
        segs = getattr(single, "segments", None)
        shards = []
        for r in range(4):
            torch.manual_seed(7)
            shards.append(make(OfflineGroup(r, 4)).weight.detach())
        torch.testing.assert_close(layout.unshard(shards, dim, segs), single.weight.detach(), rtol=0, atol=0)
    emb = ParallelEmbedding(7, 8, padding_idx=2)
    assert (emb.weight[2] == 0).all() and (emb.weight[3] != 0).any()
    col = ColumnParallelLinear(4, 6)
    assert (col.bias == 0).all()
    w = col.weight.detach().clone()
    col.reset_parameters()
    assert not torch.equal(w, col.weight)


def test_offline_layer_refuses_to_communicate() -> None:
    col = ColumnParallelLinear(4, 6, group=OfflineGroup(0, 2))
    with pytest.raises(RuntimeError, match="needs a running process group"):
        col(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="needs a running process group"):
        col.gather_weight()
    with pytest.raises(RuntimeError, match="needs a running process group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), group=OfflineGroup(0, 2))


def test_extra_repr_shows_global_and_local_sizes() -> None:
    s = repr(ColumnParallelLinear(4, 16, segments=(8, 4, 4), group=OfflineGroup(1, 2), device="meta"))
    for w in ("in_features=4", "out_features=16 (local 8)", "segments=(8, 4, 4)", "gather_output=True",
              "rank=1", "world_size=2"):
        assert w in s, s
    s = repr(RowParallelLinear(8, 3, input_is_parallel=True, group=OfflineGroup(0, 2), device="meta"))
    assert "in_features=8 (local 4)" in s and "input_is_parallel=True" in s
    s = repr(VocabParallelEmbedding(8, 3, padding_idx=1, group=OfflineGroup(1, 2), device="meta"))
    assert "8 (local 4..7)" in s and "padding_idx=1" in s
    assert "4 (local 2)" in repr(ParallelEmbedding(8, 4, group=OfflineGroup(1, 2), device="meta"))


def test_cross_entropy_argument_errors_and_low_precision() -> None:
    with pytest.raises(ValueError, match="reduction='avg'"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="does not match"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    t = torch.tensor([0, 5, -100, 2])
    out = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.cross_entropy(x.float(), t, label_smoothing=0.1), rtol=1e-2, atol=1e-2)


def test_docstring_examples() -> None:
    result = doctest.testmod(layers, optionflags=doctest.ELLIPSIS, extraglobs={"torch": torch, "nn": nn, "F": F})
    assert result.attempted > 5 and result.failed == 0
