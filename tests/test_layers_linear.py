"""Tests for tpshard.layers' ColumnParallelLinear and RowParallelLinear against nn.Linear.

Column and row layers (contiguous, strided and unequal fused segments, every flag), the seed
docstring's Embedding -> Column -> Row example, fresh init, and hypothesis-drawn layouts.
The rank checks run in one launch per world size (1, 2, 4), plus one per world size for the
hypothesis examples: a check does all its collectives first, then compares, and returns its
mismatches, so a wrong value on one rank never leaves another rank waiting. Local shards are
compared with ``layout.shard`` of the reference's values and grads. float64, batch > 1,
non-zero biases.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

from tpshard import comm, layers, layout
from tpshard.comm import OfflineGroup
from tpshard.verify.launch import run_ranks
from tpshard.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding

from _dist import (
    DT,
    WORLDS,
    Checker,
    Suite,
    comm_counts,
    expected_counts,
    gen,
    ref_embedding,
    ref_linear,
)


# ---------------------------------------------------------------------------------------------
# Per-layer checks (each runs on every rank of a launch).


def _column_check(rank: int, world: int, ck: Checker, g: torch.Generator, fin: int, fout: int,
                  segs: tuple[int, ...] | None, stride: int, bias: bool, gather_output: bool,
                  batch: tuple[int, ...] = (3, 2)) -> None:
    """ColumnParallelLinear.from_module(nn.Linear(fin, fout)) on this rank vs the reference."""
    layout_segs = segs if segs is not None else layout.strided(fout, stride)
    ref = ref_linear(g, fin, fout, bias)
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
    ck.equal("fwd counts", fwd, expected_counts(world, all_gather=int(gather_output)))
    ck.equal("bwd counts", bwd, expected_counts(world, all_reduce=1))


def _row_check(rank: int, world: int, ck: Checker, g: torch.Generator, fin: int, fout: int,
               segs: tuple[int, ...] | None, stride: int, bias: bool, input_is_parallel: bool,
               batch: tuple[int, ...] = (3, 2)) -> None:
    """RowParallelLinear.from_module(nn.Linear(fin, fout)) on this rank vs the reference."""
    layout_segs = segs if segs is not None else layout.strided(fin, stride)
    ref = ref_linear(g, fin, fout, bias)
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
    ck.equal("fwd counts", fwd, expected_counts(world, all_reduce=1))
    ck.equal("bwd counts", bwd, expected_counts(world, all_gather=int(not input_is_parallel)))


def _linear_checks(rank: int, world: int, ck: Checker) -> None:
    g = gen(1)
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
    ref = ref_linear(g, 4 * W, 3)
    layer = RowParallelLinear.from_module(ref, reduce_output=False)
    x = torch.randn(3, 2, 4 * W, generator=g, dtype=DT)
    with CommDebugMode() as m:
        partial = layer(x)
    ck.equal("fwd counts", comm_counts(m), {})
    ck.close("partial + bias once", comm.mp_reduce(partial) + layer.bias, ref(x))
    ck.close("partial has no bias", partial, F.linear(layout.shard(x, -1, rank, W), layer.weight))

    # Column without copy_input: the input grad is this rank's partial (the rewriter reduces it).
    ck.prefix = "column copy_input=False: "
    ref = ref_linear(g, 4, 2 * W)
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
    ref = ref_linear(g, 6, q + 2 * kv)
    layer = ColumnParallelLinear.from_module(ref, segments=(q, kv, kv), gather_output=False)
    x = torch.randn(2, 3, 6, generator=g, dtype=DT)
    full = ref(x).detach()
    lq, lk, lv = layer(x).split(list(layout.local_segments(q + 2 * kv, W, (q, kv, kv))), dim=-1)
    ref_q, ref_k, ref_v = full.split([q, kv, kv], dim=-1)
    ck.close("q", lq, ref_q.chunk(W, -1)[rank])
    ck.close("k", lk, ref_k.chunk(W, -1)[rank])
    ck.close("v", lv, ref_v.chunk(W, -1)[rank])
    ref = ref_linear(g, 6, 3 * 2 * W)
    ck.close("stride=3 equals three equal segments", ColumnParallelLinear.from_module(ref, stride=3).weight,
             ColumnParallelLinear.from_module(ref, segments=(2 * W,) * 3).weight, tol=0)
    ck.close("stride=3 is rank r's block of each third", ColumnParallelLinear.from_module(ref, stride=3).weight,
             torch.cat([t.chunk(W)[rank] for t in ref.weight.detach().chunk(3)]), tol=0)


def _seed_example_checks(rank: int, world: int, ck: Checker) -> None:
    """The seed docstring: embedding -> column(gather_output=False) -> row(input_is_parallel)."""
    g = gen(4)
    W = world
    vocab, fin, fout = 16, 4 * W, 6 * W
    ck.prefix = "seed example from_module: "
    ref = nn.Sequential(ref_embedding(g, vocab, fin), ref_linear(g, fin, fout), ref_linear(g, fout, fout))
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
    ck.equal("fwd counts", fwd, expected_counts(W, all_gather=1, all_reduce=1))
    ck.equal("bwd counts", bwd, expected_counts(W, all_reduce=1))

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


SUITE = Suite(("linear", _linear_checks), ("seed_example", _seed_example_checks))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_linear_layers(world: int) -> None:
    """Column and row forward/backward, layouts, flags, gather_weight, collective counts."""
    SUITE.report(world, "linear")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_seed_docstring_example(world: int) -> None:
    """The seed's Embedding -> Column -> Row example, via from_module and via fresh init."""
    SUITE.report(world, "seed_example")


def test_seed_row_bias_defect_is_caught() -> None:
    """The seed's row layer (bias in every rank's product AND after the reduce) must fail."""

    class SeedRow(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = comm.mp_reduce(F.linear(x, self.weight, self.bias), self.group)
            return y + self.bias

    ck = Checker()
    g = gen(0)
    ref = ref_linear(g, 4, 3)
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
        g = gen(ex["seed"])
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
# Fresh init (offline, no ranks needed).


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

