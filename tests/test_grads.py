"""Gradient placements: a replicated value whose gradient each rank computes only in part.

Models written for the two silent-wrong-gradient classes (forward equal, gradient wrong):
a replicated parameter or activation meeting split values whole (per-head norm weights, a
learnable scale inside a split MLP, a value broadcast along the split dim), and a gathered
column output beside a replicated reduction of the same value. On real gloo ranks, float64:
outputs, the input gradient, every parameter gradient, an SGD step and a second forward, to
1e-10; the collectives issued equal the plan's count, and the plan names every parameter whose
gradient is synchronized.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpshard
from tpshard.compiler import analysis as A
from tpshard.plan import GRAD_ALL_GATHER, GRAD_ALL_REDUCE, GRAD_LOCAL, GRAD_WHOLE
from tpshard.verify.launch import run_ranks

from _dist import training_step_errors

RTOL = 1e-10


class GatherThenReduce(nn.Module):
    """The issue's model: h is split for fc2 and gathered, h.mean(-1) needs it whole."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h)) + h.mean(-1, keepdim=True)


class ScaledMLP(nn.Module):
    """A learnable scalar and a learnable per-row vector multiply split values."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.gain = nn.Parameter(torch.randn(1, 1))  # broadcasts along the split features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)) * self.scale * self.gain)


class HeadNormAttention(nn.Module):
    """q/k RMS-normalized per head with explicit weights (as Qwen3's q_norm/k_norm lower)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_w = nn.Parameter(1 + 0.3 * torch.randn(d // heads))
        self.k_w = nn.Parameter(1 + 0.3 * torch.randn(d // heads))

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self._rms(self.q(x).view(b, t, self.heads, -1), self.q_w).transpose(1, 2)
        k = self._rms(self.k(x).view(b, t, self.heads, -1), self.k_w).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class BroadcastBias(nn.Module):
    """A replicated activation (computed from the input) broadcast along split features."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up, self.down, self.gate = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x) + self.gate(x)))


class NormModulesOnHeads(nn.Module):
    """nn.RMSNorm modules over head_dim on split heads, and a LayerNorm (functional, with
    weights as graph tensors) over head_dim on the split attention output."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_norm, self.k_norm = nn.RMSNorm(d // heads), nn.RMSNorm(d // heads)
        self.out_w = nn.Parameter(1 + 0.3 * torch.randn(d // heads))
        self.out_b = nn.Parameter(0.3 * torch.randn(d // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_norm(self.q(x).view(b, t, self.heads, -1)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(b, t, self.heads, -1)).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        y = F.layer_norm(y, (d // self.heads,), self.out_w, self.out_b)
        return self.o(y.reshape(b, t, d))


class SlicedAndWhole(nn.Module):
    """alpha scales split features (sliced there) and is also used whole: it stays replicated,
    its slices' gradients gathered in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.alpha = nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)) * self.alpha) + self.alpha.square().mean()


CASES = {
    "gather_then_reduce": (GatherThenReduce, (3, 16)),
    "scaled_mlp": (ScaledMLP, (3, 5, 16)),
    "head_norm_attention": (HeadNormAttention, (3, 6, 16)),
    "broadcast_bias": (BroadcastBias, (3, 16)),
    "norm_modules_on_heads": (NormModulesOnHeads, (3, 6, 16)),
    "sliced_vector": (lambda: _SlicedVector(), (3, 16)),
    "sliced_and_whole": (SlicedAndWhole, (3, 16)),
}


def _check(name: str, rank: int, world: int) -> dict:
    cls, shape = CASES[name]
    torch.manual_seed(0)
    errors, sharded, _, issued = training_step_errors(cls(), shape, rank, world)
    plan = sharded.tpshard_plan
    planned = sum(plan.collective_counts().values())
    split = [m.path for m in plan.modules.values() if m.style not in ("replicate",)]
    return {"errors": errors, "issued": issued, "planned": planned,
            "grads": dict(plan.grads), "split": split}


def _body(rank: int, world: int) -> list[dict]:
    return [_check(name, rank, world) for name in CASES]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 4])
def test_partial_gradients_are_reduced(world: int) -> None:
    results = run_ranks(_body, world, timeout=180)
    for rank_results in results:
        for name, r in zip(CASES, rank_results):
            bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
            assert not bad, f"{name} world {world}: {bad}"
    r = dict(zip(CASES, results[0]))
    for name, res in r.items():
        assert res["split"], f"{name}: nothing was split, so the test proves nothing"
        assert res["issued"] == res["planned"], f"{name}: issued {res['issued']}, plan counts {res['planned']}"
    # Each parameter's gradient placement, as the plan states it.
    assert r["scaled_mlp"]["grads"]["scale"] == GRAD_ALL_REDUCE
    assert r["scaled_mlp"]["grads"]["gain"] == GRAD_ALL_REDUCE
    assert r["scaled_mlp"]["grads"]["up.weight"] == GRAD_LOCAL
    assert r["head_norm_attention"]["grads"]["q_w"] == GRAD_ALL_REDUCE
    assert r["head_norm_attention"]["grads"]["k_w"] == GRAD_ALL_REDUCE
    assert r["gather_then_reduce"]["grads"]["fc1.weight"] == GRAD_WHOLE
    assert set(r["head_norm_attention"]["split"]) >= {"q", "k", "v", "o"}
    norms = r["norm_modules_on_heads"]
    assert set(norms["split"]) >= {"q", "k", "v", "o"}, norms["split"]
    for name in ("q_norm.weight", "k_norm.weight", "out_w", "out_b"):
        assert norms["grads"][name] == GRAD_ALL_REDUCE, name
    assert r["sliced_vector"]["grads"]["alpha"] == GRAD_LOCAL  # stored as its shard
    assert r["sliced_and_whole"]["grads"]["alpha"] == GRAD_ALL_GATHER


def test_partial_gradient_rule() -> None:
    """The rule by itself: split output, replicated input taken whole -> partial gradient."""
    from tpshard.compiler.ir import Op

    class FakeNode:
        def format_node(self) -> str:
            return "%add"

    op = Op(FakeNode(), "pointwise", [], {"fn": "add"})  # type: ignore[arg-type]
    s = A.Split(1, 0)
    assert A.partial_grad_inputs(op, [s, A.REPLICATED], [A.SAME, A.SAME], s) == [1]
    assert A.partial_grad_inputs(op, [s, A.REPLICATED], [A.SAME, A.Split(1, 0)], s) == []  # sliced: gathered back
    assert A.partial_grad_inputs(op, [A.REPLICATED, A.REPLICATED], [A.SAME, A.SAME], A.REPLICATED) == []
    assert A.partial_grad_inputs(op, [A.Partial(), A.REPLICATED], [A.SAME, A.REPLICATED], A.Partial()) == []


def test_plan_lists_gradient_reductions() -> None:
    torch.manual_seed(0)
    p = tpshard.plan(HeadNormAttention(), 2, example_inputs=(torch.randn(2, 4, 16),))
    assert p.grads["q_w"] == GRAD_ALL_REDUCE and p.grads["o.weight"] == GRAD_LOCAL
    assert "gradients synchronized in backward: q_w" in p.explain()
    assert tpshard.Plan.from_json(p.to_json()) == p
    sliced = tpshard.plan(_SlicedVector(), 2, example_inputs=(torch.randn(2, 16),))
    assert sliced.params["alpha"].dim == 0 and sliced.grads["alpha"] == GRAD_LOCAL
    assert sliced.modules["<root>"].style == "sliced"
    assert sliced.collective_counts() == {"bwd all_reduce": 1, "fwd all_reduce": 1}


class _SlicedVector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.alpha = nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)) * self.alpha)
