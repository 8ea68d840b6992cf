"""Tests for tpshard.layers.vocab_parallel_cross_entropy against F.cross_entropy.

Logits split over the vocab: ignore_index, label smoothing, every reduction, numerical
stability, argument errors and low precision. The rank checks run in one launch per world
size (1, 2, 4); each does its collectives first, then compares and returns its mismatches.
float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

from tpshard import layout
from tpshard.layers import vocab_parallel_cross_entropy

from _dist import DT, WORLDS, Checker, Suite, comm_counts, expected_counts, gen


def _cross_entropy_checks(rank: int, world: int, ck: Checker) -> None:
    g = gen(3)
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
                    ck.equal("fwd counts", fwd, expected_counts(W, all_reduce=2))
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


SUITE = Suite(("cross_entropy", _cross_entropy_checks))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy(world: int) -> None:
    SUITE.report(world, "cross_entropy")


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

