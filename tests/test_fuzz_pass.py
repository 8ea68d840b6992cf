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
