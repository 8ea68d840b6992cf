"""Tests for tpshard.comm (region functions, groups) and tpshard.verify.launch (run_ranks).

Multi-rank checks run on real gloo ranks through ``run_ranks``. Each launch runs many checks;
a check first does all its collectives, then compares, and returns its mismatches (so a wrong
value on one rank cannot leave another rank waiting in a collective). float64, batch > 1.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Callable

import pytest
import torch
import torch.distributed as dist

# Imported here, not in the ranks: forked ranks inherit it (importing it in a rank costs ~1 s).
from torch.distributed.tensor.debug import CommDebugMode

from tpshard import comm, layout
from tpshard.verify.launch import RankError, RankTimeout, run_ranks

from _dist import DT, Checker, comm_counts, gen

# ---------------------------------------------------------------------------------------------
# Helpers for the rank bodies (Checker, comm_counts, gen: shared, in _dist.py).


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def _expected_index(segments: tuple[int, ...], rank: int, world: int) -> list[int]:
    """Rank's indices under a segment layout, computed independently of tpshard.layout."""
    idx, start = [], 0
    for s in segments:
        c = s // world
        idx += list(range(start + rank * c, start + (rank + 1) * c))
        start += s
    return idx


def _assert_ok(results: list[list[str]]) -> None:
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Region functions on 2 and 4 ranks.


def _region_body(rank: int, world: int) -> list[str]:
    ck = Checker()
    g = gen(0)
    B, T = 3, 2
    W = world

    # mp_copy: forward identity (x unchanged), backward all-reduce of rank-dependent grads.
    x = _randn(g, B, T, 4).requires_grad_()
    x_before = x.detach().clone()
    G = _randn(g, B, T, 4)
    with CommDebugMode() as m:
        y = comm.mp_copy(x)
    ck.equal("copy fwd counts", comm_counts(m), {})
    ck.close("copy fwd", y, x_before)
    with CommDebugMode() as m:
        (y * G * (rank + 1)).sum().backward()
    ck.equal("copy bwd counts", comm_counts(m), {"all_reduce": 1})
    ck.close("copy bwd", x.grad, G * sum(r + 1 for r in range(W)))
    ck.close("copy input unchanged", x, x_before)

    # mp_reduce: forward all-reduce out of place (the seed marked its input dirty and reduced
    # in place, which autograd refuses on a leaf); backward identity.
    base = _randn(g, B, T, 4)
    x = (base * (rank + 1)).requires_grad_()  # a leaf that requires grad
    x_before = x.detach().clone()
    with CommDebugMode() as m:
        y = comm.mp_reduce(x)
    ck.equal("reduce fwd counts", comm_counts(m), {"all_reduce": 1})
    ck.close("reduce fwd", y, base * sum(r + 1 for r in range(W)))
    ck.close("reduce input unchanged", x, x_before)
    ck.true("reduce returns a new tensor", y.data_ptr() != x.data_ptr())
    G = _randn(g, B, T, 4)
    with CommDebugMode() as m:
        (y * G).sum().backward()
    ck.equal("reduce bwd counts", comm_counts(m), {})
    ck.close("reduce bwd", x.grad, G)
    # A non-leaf input used again after the reduce: its value must still be the local one.
    a = _randn(g, B, 4).requires_grad_()
    h = a * (rank + 1)
    z = comm.mp_reduce(h) + h
    z.sum().backward()
    ck.close("reduce non-leaf reuse fwd", z, a.detach() * (sum(r + 1 for r in range(W)) + rank + 1))
    ck.close("reduce non-leaf reuse bwd", a.grad, torch.full_like(a, 2.0 * (rank + 1)))

    # mp_scatter / mp_gather with contiguous and non-contiguous (unequal) segment layouts,
    # along the last dim and along a middle dim.
    for segs in (None, (W,) * 3, (W, 3 * W, 2 * W)):
        F_ = 6 * W if segs is None else sum(segs)
        full_segs = segs or (F_,)
        idx = torch.tensor(_expected_index(full_segs, rank, W))
        for dim in (-1, 1):
            tag = f"segs={segs} dim={dim}"
            shape = [B, T, 5]
            shape[dim] = F_
            X = _randn(g, *shape)
            Gfull = _randn(g, *shape)
            # scatter: keep own slice; backward all-gathers the slices' grads into the full grad.
            x = X.clone().requires_grad_()
            with CommDebugMode() as m:
                y = comm.mp_scatter(x, dim, segments=segs)
            ck.equal(f"scatter fwd counts {tag}", comm_counts(m), {})
            ck.close(f"scatter fwd {tag}", y, X.index_select(dim, idx))
            with CommDebugMode() as m:
                (y * Gfull.index_select(dim, idx)).sum().backward()
            ck.equal(f"scatter bwd counts {tag}", comm_counts(m), {"all_gather": 1})
            ck.close(f"scatter bwd {tag}", x.grad, Gfull)
            ck.close(f"scatter input unchanged {tag}", x, X)
            # gather: assemble the full tensor in original order; backward keeps own slice.
            x = X.index_select(dim, idx).clone().requires_grad_()
            x_before = x.detach().clone()
            with CommDebugMode() as m:
                y = comm.mp_gather(x, dim, segments=segs)
            ck.equal(f"gather fwd counts {tag}", comm_counts(m), {"all_gather": 1})
            ck.close(f"gather fwd {tag}", y, X)
            with CommDebugMode() as m:
                (y * Gfull).sum().backward()
            ck.equal(f"gather bwd counts {tag}", comm_counts(m), {})
            ck.close(f"gather bwd {tag}", x.grad, Gfull.index_select(dim, idx))
            ck.close(f"gather input unchanged {tag}", x, x_before)
            # the layout module agrees with the independent index computation
            ck.close(f"layout.shard {tag}", layout.shard(X, dim, rank, W, segs), X.index_select(dim, idx))

    # Sequence-parallel pair: all-gather along dim 1 (bwd reduce-scatter) and its mirror.
    S = 2 * W
    X = _randn(g, B, S, 4)
    Gfull = _randn(g, B, S, 4)
    own = slice(rank * 2, rank * 2 + 2)
    x = X[:, own].clone().requires_grad_()
    with CommDebugMode() as m:
        y = comm.mp_all_gather_seq(x, 1)
    ck.equal("all_gather_seq fwd counts", comm_counts(m), {"all_gather": 1})
    ck.close("all_gather_seq fwd", y, X)
    with CommDebugMode() as m:
        (y * Gfull * (rank + 1)).sum().backward()  # rank-dependent downstream
    ck.equal("all_gather_seq bwd counts", comm_counts(m), {"reduce_scatter": 1})
    ck.close("all_gather_seq bwd", x.grad, Gfull[:, own] * sum(r + 1 for r in range(W)))

    x = (X * (rank + 1)).requires_grad_()
    x_before = x.detach().clone()
    with CommDebugMode() as m:
        y = comm.mp_reduce_scatter_seq(x, 1)
    ck.equal("reduce_scatter_seq fwd counts", comm_counts(m), {"reduce_scatter": 1})
    ck.close("reduce_scatter_seq fwd", y, X[:, own] * sum(r + 1 for r in range(W)))
    with CommDebugMode() as m:
        (y * Gfull[:, own]).sum().backward()
    ck.equal("reduce_scatter_seq bwd counts", comm_counts(m), {"all_gather": 1})
    ck.close("reduce_scatter_seq bwd", x.grad, Gfull)
    ck.close("reduce_scatter_seq input unchanged", x, x_before)

    # Groups: None, the process group, and a Group all mean the same here.
    ck.equal("resolve None size", comm.resolve_group(None).size, W)
    ck.equal("resolve rank", comm.resolve_group(dist.group.WORLD).rank, rank)
    grp = comm.resolve_group(dist.group.WORLD)
    ck.true("resolve Group is identity", comm.resolve_group(grp) is grp)
    v = torch.full((2,), float(rank), dtype=DT)
    ck.close("reduce with explicit group", comm.mp_reduce(v, grp), torch.full((2,), float(sum(range(W))), dtype=DT))
    return ck.failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_region_functions(world: int) -> None:
    _assert_ok(run_ranks(_region_body, world, timeout=60))


# ---------------------------------------------------------------------------------------------
# One rank, no process group: every region function is the identity.


def test_world_size_one_without_process_group() -> None:
    assert not dist.is_initialized()
    assert comm.get_world_size() == 1 and comm.get_rank() == 0
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    G = torch.randn(3, 4, dtype=DT)
    fns: list[Callable] = [
        comm.mp_copy, comm.mp_reduce,
        lambda t: comm.mp_scatter(t, -1), lambda t: comm.mp_gather(t, -1, segments=(2, 2)),
        lambda t: comm.mp_all_gather_seq(t, 0), lambda t: comm.mp_reduce_scatter_seq(t, 0),
    ]
    for fn in fns:
        x.grad = None
        with CommDebugMode() as m:
            y = fn(x)
            (y * G).sum().backward()
        assert comm_counts(m) == {}
        torch.testing.assert_close(y, x)
        torch.testing.assert_close(x.grad, G)


def test_offline_group_refuses_to_communicate() -> None:
    g = comm.OfflineGroup(rank=1, world_size=2)
    assert (g.rank, g.size, g.can_communicate) == (1, 2, False)
    x = torch.arange(8.0, dtype=DT).reshape(2, 4)
    for fn in (lambda: comm.mp_reduce(x, g), lambda: comm.mp_gather(x, -1, g),
               lambda: comm.mp_all_gather_seq(x, 0, g), lambda: comm.mp_reduce_scatter_seq(x, 0, g)):
        with pytest.raises(RuntimeError, match="needs a running process group"):
            fn()
    # Local work is fine: scatter keeps rank 1's slice without communicating.
    torch.testing.assert_close(comm.mp_scatter(x, -1, g), x[:, 2:])
    # copy's forward is local; its backward would all-reduce and must refuse.
    xg = x.clone().requires_grad_()
    y = comm.mp_copy(xg, g)
    with pytest.raises(RuntimeError, match="needs a running process group"):
        y.sum().backward()
    with pytest.raises(ValueError, match="outside a world of size 2"):
        comm.OfflineGroup(rank=2, world_size=2)
    one = comm.OfflineGroup(0, 1)
    torch.testing.assert_close(comm.mp_reduce(x, one), x)


def test_init_parallelism_needs_a_running_job() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed to be initialized"):
        comm.init_parallelism(2)


# ---------------------------------------------------------------------------------------------
# init_parallelism on 4 ranks: a 2 x 2 ("dp", "tp") mesh whose "tp" dim becomes the default.
# It sets a module-level default group with no way to undo it, so it leaks into everything
# later in the same process: it runs in a launch of its own (forked ranks; the pytest process
# itself never calls it).


def _init_parallelism_body(rank: int, world: int) -> list[str]:
    from tpshard.layers import ColumnParallelLinear

    ck = Checker()
    try:
        comm.init_parallelism(3)
        ck.failures.append("init_parallelism(3) on 4 ranks did not raise")
    except ValueError as e:
        ck.true(f"message lists valid sizes: {e}", "[1, 2, 4]" in str(e))
    mesh = comm.init_parallelism(2)
    tp = comm.resolve_group(None)
    ck.equal("tp size", tp.size, 2)
    ck.equal("tp rank", tp.rank, rank % 2)  # mesh [[0, 1], [2, 3]]: tp groups {0,1}, {2,3}
    ck.equal("mesh tp dim resolves", comm.resolve_group(mesh["tp"]).size, 2)
    try:
        comm.resolve_group(mesh)
        ck.failures.append("a 2-D mesh was accepted as a group")
    except ValueError as e:
        ck.true("2-D mesh message", 'mesh["tp"]' in str(e))
    # Reductions stay inside the tp group.
    v = torch.full((2,), float(rank), dtype=DT)
    ck.close("reduce in tp group", comm.mp_reduce(v), torch.full((2,), 1.0 if rank < 2 else 5.0, dtype=DT))
    # Layers use the tp group by default: 2-way split, exact output.
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 8, dtype=DT)
    layer = ColumnParallelLinear.from_module(ref)
    ck.equal("layer world size", layer.world_size, 2)
    ck.equal("layer local weight rows", layer.weight.shape[0], 4)
    x = torch.randn(3, 4, dtype=DT)
    ck.close("layer output", layer(x), ref(x))
    ck.true("default group persists in the process", comm._default_group is tp)
    return ck.failures


@pytest.mark.timeout(120)
def test_init_parallelism_on_four_ranks() -> None:
    _assert_ok(run_ranks(_init_parallelism_body, 4, timeout=60))
    assert comm._default_group is None  # the parent process was not touched


# ---------------------------------------------------------------------------------------------
# run_ranks surfaces failures.


def _raising_body(rank: int, world: int, peer_in_collective: bool) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    if peer_in_collective:
        dist.barrier()  # waits for a rank that will never come; it must be killed
    else:
        time.sleep(60)


def _sleeping_body(rank: int, world: int) -> int:
    if rank == 1:
        time.sleep(60)
    return rank


def _unmatched_collective_body(rank: int, world: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(60)


def _check_raising_rank(peer_in_collective: bool) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_raising_body, 2, peer_in_collective, timeout=30)
    assert time.monotonic() - t0 < 20
    assert info.value.rank == 1, str(info.value)
    assert "boom from rank 1" in str(info.value)
    assert "ValueError" in info.value.traceback
    assert not multiprocessing.active_children()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peer_in_collective", [False, True])
def test_run_ranks_surfaces_a_raising_rank(peer_in_collective: bool) -> None:
    """The root cause is reported, also when the peer's pending collective fails as a result."""
    _check_raising_rank(peer_in_collective)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body", [_sleeping_body, _unmatched_collective_body])
def test_run_ranks_times_out_on_a_hanging_rank(body: Callable) -> None:
    # timeout=4 s: the collectives' own timeout is max(5, 0.8 * 4) = 5 s, so run_ranks's own
    # deadline fires first and reports RankTimeout.
    t0 = time.monotonic()
    with pytest.raises(RankTimeout, match="did not finish"):
        run_ranks(body, 2, timeout=4)
    elapsed = time.monotonic() - t0
    assert 3.5 < elapsed < 15, elapsed
    assert not multiprocessing.active_children()
