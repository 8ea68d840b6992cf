"""Smoke tests of the benchmarks (never timed): the hand-written Megatron-style models and the
DTensor plan of ``benchmarks/compare_tp.py`` equal the reference models on 2 gloo ranks in
float64, ``compare_tp.py --smoke`` runs end to end, and ``gpu_compute.py --cpu-smoke`` runs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from tpshard import models
from tpshard.verify.launch import run_ranks

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_tp  # noqa: E402
import gpu_compute  # noqa: E402
import handwritten  # noqa: E402

RTOL = 1e-10

MODELS = [
    ("gpt", dict(n_embd=32, n_head=4, n_layer=2, vocab_size=64, block_size=16)),  # tied head
    ("llama", dict(hidden_size=32, intermediate_size=64, n_head=4, n_kv_head=2, n_layer=2,
                   vocab_size=64, max_seq=16)),  # grouped-query attention
    ("llama", dict(hidden_size=32, intermediate_size=64, n_head=4, n_kv_head=4, n_layer=1,
                   vocab_size=64, max_seq=16, tie_weights=True)),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _equal_to_reference(rank: int, world: int, name: str, config: dict) -> dict[str, float]:
    """Hand-written (c) and DTensor (b) modules against the reference: logits, then the logits
    after one SGD step on a cross-entropy loss (which checks every gradient and the ties)."""
    from torch.distributed.device_mesh import init_device_mesh

    ref, (ids,) = models.build(name, dtype=torch.float64, batch=3, seq=12, **config)
    targets = torch.randint(0, config["vocab_size"], ids.shape, generator=torch.Generator().manual_seed(1))
    variants = {
        "handwritten": handwritten.build_handwritten(ref),
        "dtensor": compare_tp.build_dtensor(copy.deepcopy(ref), init_device_mesh("cpu", (world,))),
        "reference": copy.deepcopy(ref),
    }
    errors: dict[str, float] = {}
    outs: dict[str, list[torch.Tensor]] = {}
    for v, m in variants.items():
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        first = m(ids)
        torch.nn.functional.cross_entropy(first.flatten(0, 1), targets.flatten()).backward()
        opt.step()
        outs[v] = [first.detach(), m(ids).detach()]
    for v in ("handwritten", "dtensor"):
        errors[f"{v} logits"] = _rel(outs[v][0], outs["reference"][0])
        errors[f"{v} logits after a step"] = _rel(outs[v][1], outs["reference"][1])
    return errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,config", MODELS, ids=["gpt-tied", "llama-gqa", "llama-tied"])
def test_handwritten_and_dtensor_equal_reference(name: str, config: dict) -> None:
    for rank, errors in enumerate(run_ranks(_equal_to_reference, 2, name, config, timeout=100)):
        bad = {k: e for k, e in errors.items() if not e <= RTOL}
        assert not bad, f"rank {rank}: {bad}"


def test_handwritten_one_rank_equals_reference() -> None:
    ref, (ids,) = models.build("llama", dtype=torch.float64)
    assert _rel(handwritten.build_handwritten(ref)(ids), ref(ids)) <= RTOL
    with pytest.raises(TypeError, match="no hand-written"):
        handwritten.build_handwritten(torch.nn.Linear(2, 2))


def test_rank_major_qkv_gives_each_rank_its_heads() -> None:
    lin = torch.nn.Linear(2, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).unsqueeze(1).expand(12, 2))
    compare_tp._rank_major_qkv(lin, 2)
    # [q0 q1 | k0 k1 | v0 v1] (2 rows each) -> [q0 k0 v0 | q1 k1 v1]
    assert lin.weight[:, 0].tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]


@pytest.mark.timeout(60)
def test_compare_tp_smoke_runs_end_to_end(capsys: pytest.CaptureFixture) -> None:
    result = compare_tp.main(["--smoke"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("{") and '"tpshard_vs_dtensor"' in lines[-1]
    assert isinstance(result["tpshard_vs_dtensor"], float) and isinstance(result["tpshard_vs_handwritten"], float)
    assert [(c["case"], c["world_size"]) for c in result["cases"]] == [("gpt_tiny", 2), ("llama_tiny", 2)]
    for case in result["cases"]:
        # The benchmark asserted equal losses; the three variants all report.
        assert set(case["train"]["median_ms"]) == {"tpshard", "dtensor", "handwritten"}
        assert case["losses_checked"]["tpshard"] == pytest.approx(case["losses_checked"]["reference"], rel=1e-4)
        comms = case["collectives"]
        # Megatron's optimum: per block one all-reduce each for attention and MLP, each direction;
        # the embedding one forward, the head one all-gather forward and one all-reduce backward.
        n_layer = compare_tp.CASES[case["case"]]["config"]["n_layer"]
        assert comms["tpshard"]["train"] == {"all_gather": 1, "all_reduce": 4 * n_layer + 2, "total": 4 * n_layer + 3}
        assert comms["tpshard"] == comms["handwritten"]
        for kind in ("train", "infer"):
            assert comms["tpshard"][kind]["total"] <= comms["dtensor"][kind]["total"]
        assert case["param_bytes_per_rank"]["tpshard"][0] <= case["param_bytes_per_rank"]["dtensor"][0]
    assert result["targets"]["collectives a <= b (every case)"]


@pytest.mark.timeout(60)
def test_gpu_compute_cpu_smoke() -> None:
    result = gpu_compute.main(["--cpu-smoke", "--seqs", "16", "--worlds", "2,4", "--iters", "1"])
    (row,) = result["seqs"]
    assert set(row["worlds"]) == {"2", "4"}
    assert all(e <= 1e-5 for e in row["check_rel_error"].values())


def test_skip_collectives_refuses_gathers() -> None:
    import tpshard

    ref, (ids,) = models.build("gpt")
    gm = tpshard.parallelize(ref, 2, example_inputs=(ids,), group=tpshard.OfflineGroup(0, 2))
    with pytest.raises(ValueError, match="changes shapes"):
        gpu_compute.skip_collectives(gm)  # the head's logits are all-gathered
