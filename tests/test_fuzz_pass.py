"""Property: random models over the planner's op vocabulary (DAGs: residual and parallel
branches, heads, attention, norms, reductions, splits, ties; see tests/fuzz_models.py), sharded
at world sizes 2 and 4 on real gloo ranks, equal the original in float64 — outputs, the input
gradient, every parameter gradient, a step, a second forward — or are refused with a message
that names the node. Specs are drawn by hypothesis in this process; each world size checks all
of them in one launch. ``benchmarks/fuzz_pass.py`` runs thousands with the same generator.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import fuzz_models as fm

N_W2, N_W4 = 40, 20   # examples per world size (the first N_W4 of the N_W2 also run at 4)
MIN_SHARDED = 0.4     # a fuzzer whose models all stay whole proves nothing


def _draw_specs(n: int) -> list[dict]:
    """n specs from the hypothesis strategy (derandomized: the same specs every run)."""
    specs: list[dict] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fm.model_spec())
    def collect(spec: dict) -> None:
        specs.append(spec)

    collect()
    return specs[:n]


_SPECS: list[dict] = []


def _specs() -> list[dict]:
    if not _SPECS:
        _SPECS.extend(_draw_specs(N_W2))
    return _SPECS


def _summary(specs: list[dict], results: list[dict], world: int) -> str:
    lines = []
    bad = [(len(s["nodes"]), i) for i, (s, r) in enumerate(zip(specs, results)) if r["status"] in ("mismatch", "error")]
    for _, i in sorted(bad)[:3]:
        r = results[i]
        what = r["failures"][:4] if r["status"] == "mismatch" else f"{r.get('stage')}: {(r.get('reason') or '')[-600:]}"
        lines.append(f"example {i} at world {world}: {r['status']} {what}\n{fm.to_python(specs[i])}")
    return "\n\n".join(lines)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_random_models_equal_original_or_refuse(world: int) -> None:
    specs = _specs()[: N_W2 if world == 2 else N_W4]
    assert len(specs) == (N_W2 if world == 2 else N_W4)
    results = fm.run_examples(specs, world, per_example_s=4.0)
    count = {k: sum(r["status"] == k for r in results) for k in ("ok", "refused", "mismatch", "error")}
    sharded = sum(bool(r.get("sharded")) for r in results)
    for r in results:
        if r["status"] == "refused":
            assert r["names_node"], f"the refusal names no node or module: {r['reason']}"
    assert count["mismatch"] == 0 and count["error"] == 0, (
        f"world {world}: {count}, {sharded} sharded of {len(specs)}\n" + _summary(specs, results, world))
    assert sharded >= MIN_SHARDED * len(specs), f"only {sharded} of {len(specs)} examples were sharded: {count}"


@pytest.mark.timeout(120)
def test_the_check_sees_a_wrong_shard_and_a_wrong_gradient() -> None:
    """The harness can fail: a 1e-6-relative error in one parameter shard, or in one gradient,
    on one rank, is a mismatch; the same model without it passes."""
    spec = fm.mlp_spec()
    clean, param, grad = fm.run_examples([spec, spec, spec], 2, defect=[None, "param", "grad"])
    assert clean["status"] == "ok" and clean["sharded"], clean
    assert param["status"] == "mismatch", param
    assert any(f[1].startswith("output") for f in param["failures"]), param["failures"]
    assert grad["status"] == "mismatch", grad
    assert {f[1] for f in grad["failures"]} & {"grad lin1.weight", "grad lin1.bias"}, grad["failures"]
    assert not any(f[1].startswith("output") for f in grad["failures"]), grad["failures"]


def test_generated_models_are_valid_and_varied() -> None:
    """Every spec builds, traces and runs at two batch/sequence sizes; the vocabulary shows up."""
    import torch

    specs = [fm.random_spec(i) for i in range(30)]
    ops = set()
    for i, spec in enumerate(specs):
        m = fm.SpecModel(spec, i)
        gm = torch.fx.symbolic_trace(m)
        for b, t in ((fm.BATCH, fm.SEQ), (fm.BATCH2, fm.SEQ2)):
            out = gm(fm.make_inputs(spec, i, b, t))
            assert len(out if isinstance(out, tuple) else (out,)) == len(spec["outputs"])
        ops |= {n["op"] for n in spec["nodes"]}
    assert ops >= {"linear", "embedding", "act", "param", "binary", "norm", "softmax", "reduce", "view",
                   "transpose", "matmul", "matmul_t", "sdpa", "split", "item"}, ops


# ---------------------------------------------------------------------------------------------
# The mismatch classes the fuzzer found, each as the minimal model its shrinker gave (fail
# today; each must equal the original once the planner is fixed).

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


class ScaleTimesColumn(nn.Module):
    """A replicated learnable scalar multiplies a split value: its gradient is partial per rank
    (the same for ``fc2(gelu(fc1(x)) * alpha)`` and per-head norm weights)."""

    fin = 24

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 24, bias=False)
        self.alpha = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.fc(x) * self.alpha


class ReductionOfGatheredColumn(nn.Module):
    """A column output also consumed by a reduction: outputs right, fc1 and input gradients wrong."""

    fin = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32, bias=False)
        self.fc2 = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h) + h.sum(-1, keepdim=True)


class OneHeadAttention(nn.Module):
    """One head (or a head count the world size does not divide): head_dim is split, q @ k^T is
    an all-reduced partial sum, which then multiplies the split v; its gradient is partial, so
    the q, k and input gradients are wrong."""

    fin = 12

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(12, 4, bias=False) for _ in range(3))

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self.q(x).view(b, t, 1, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 1, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 1, 4).transpose(1, 2)
        return (q @ k.transpose(-2, -1)) @ v


class ReplicatedScoresTimesColumn(nn.Module):
    """The same class without heads: replicated x @ x^T times a split v; the input gradient
    through the scores is partial."""

    fin = 8

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return (x @ x.transpose(-2, -1)) @ self.v(x)


class RowOutputPlusItself(nn.Module):
    """``y + y`` of a row-parallel output: the partial sums add, and the bias deferred past the
    add is added once instead of twice (outputs wrong)."""

    fin = 16

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64, bias=False)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        y = self.fc2(self.fc1(x))
        return y + y


REPRODUCERS = [ScaleTimesColumn, ReductionOfGatheredColumn, OneHeadAttention, ReplicatedScoresTimesColumn,
               RowOutputPlusItself]


def _reproducers_body(rank: int, world: int) -> list[dict]:
    out = []
    for i, cls in enumerate(REPRODUCERS):
        torch.manual_seed(i)
        model = cls().double()
        with torch.no_grad():  # random values, biases included
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, dtype=torch.float64) / max(1, p.shape[-1] if p.dim() else 1) ** 0.5)
        x = torch.randn(fm.BATCH, fm.SEQ, cls.fin, dtype=torch.float64)
        x2 = torch.randn(fm.BATCH2, fm.SEQ2, cls.fin, dtype=torch.float64)
        out.append(fm.check_model(model, x, x2, rank, world, seed=i))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_found_mismatch_classes(world: int) -> None:
    from tpshard.verify.launch import run_ranks

    per_rank = run_ranks(_reproducers_body, world, timeout=100)
    bad = {}
    for i, cls in enumerate(REPRODUCERS):
        r = fm.merge_ranks([res[i] for res in per_rank])
        assert r["status"] != "refused" and r["sharded"], (cls.__name__, r)
        if r["status"] != "ok":
            bad[cls.__name__] = r.get("reason") or sorted({f[1] for f in r["failures"]})
    assert not bad, f"world {world}: " + "; ".join(f"{k}: {v}" for k, v in bad.items())
