"""Tests for the equivalence harness: tpshard.verify, tpshard.testing and `tpshard verify`.

Pure pieces (tolerances, comparisons, nested outputs, fresh inputs, dropout detection, model
specs, the report, the reassembly of module outputs, the CLI's usage errors) run in-process.
Each multi-rank test launches real gloo ranks once (fork: ranks inherit the models defined
here) with a time limit; faults are injected with ``_verify(..., _tamper=...)``, which runs
in each rank right after parallelize (a defect in the collectives: every all-reduce scaled by
``1 + delta``, ``tpshard.testing._scale_all_reduce``). The tolerances are tested from both
sides: near-zero outputs of correct models pass, defects above the dtype's noise fail.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpshard
from tpshard import models
from tpshard.verify import cli as verify_cli
from tpshard.verify.launch import RankError, RankTimeout
from tpshard.testing import _scale_all_reduce, assert_equivalent
from tpshard.verify import (
    DEFAULT_TOLERANCES,
    Comparison,
    Tolerances,
    VerifyReport,
    active_dropout,
    compare,
    default_tolerance,
    flatten,
    noise_tolerance,
    resolve_model,
    verify,
)
from tpshard.verify.compare import _keep_overflow, _RoundingModel
from tpshard.verify.harness import _verify
from tpshard.verify.localize import _module_comparison
from tpshard.verify.model import _source_for
from tpshard.verify.ranks import _fresh

# ---------------------------------------------------------------------------------------------
# Models and factories (factories are named as f"{__name__}:name", as MODEL on the CLI).


class TwoBlock(nn.Module):
    """Two MLP blocks with a residual and a norm: column/row pairs, replicated modules between."""

    def __init__(self, dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.up1, self.down1 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.up2, self.down2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(x + self.down1(F.gelu(self.up1(x))))
        y = x + self.down2(F.gelu(self.up2(x)))
        return {"out": y, "aux": (x.sum(-1), None)}


def dropout_factory() -> tuple[nn.Module, tuple]:
    """An MLP with dropout, in training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8)).train()
    return model, (torch.randn(3, 8),)


def kwargs_factory() -> tuple[nn.Module, tuple, dict]:
    return TwoBlock(), (), {"x": torch.randn(2, 8)}


class NearZero(nn.Module):
    """Outputs that are ~0 while what they add up is ~1, in ``branches`` independent copies
    (each with its own weights: many seeds in one launch): a LayerNorm output summed over
    features (per row, and in total: a scalar), and a row-parallel block's output minus its
    own mean, summed (it cancels exactly in exact arithmetic)."""

    def __init__(self, branches: int = 8, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(branches))
        self.down = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(branches))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, (up, down, norm) in enumerate(zip(self.up, self.down, self.norm)):
            h = x + down(F.gelu(up(x)))
            n = norm(h)
            out[f"ln_sum{i}"] = n.sum(-1)
            out[f"ln_total{i}"] = n.sum()
            out[f"centered{i}"] = (h - h.mean(-1, keepdim=True)).sum(-1)
        return out


def near_zero_factory(seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    return NearZero(), (torch.randn(3, 16) * 3,)


def not_a_model() -> int:
    return 3


# ---------------------------------------------------------------------------------------------
# Tolerances and comparisons.


def test_default_tolerances_per_dtype() -> None:
    # The unit roundoff of each dtype (half its machine epsilon) and the margin over the noise.
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        spec = default_tolerance(dtype)
        assert spec.unit_roundoff == torch.finfo(dtype).eps / 2 and spec.margin >= 2
    assert default_tolerance("float64") == DEFAULT_TOLERANCES[torch.float64]
    assert [default_tolerance(d).margin for d in ("float64", "fp32", "bf16", "half")] == [32, 16, 4, 4]
    with pytest.raises(ValueError, match="unknown dtype"):
        default_tolerance("float8")
    with pytest.raises(ValueError, match="floating"):
        default_tolerance(torch.int64)


def test_noise_tolerance_is_the_largest_noise_term_times_the_margin() -> None:
    u64, u16 = 2.0 ** -53, 2.0 ** -8
    # float64: no run in a wider dtype; a near-zero sum gets the rounding of what it added up.
    tol, basis = noise_tolerance(torch.float64, 1e-16, sensitivity=8.0)
    assert tol == 32 * u64 * 8.0 and basis.startswith("32 x u*sensitivity")
    # An ordinary tensor: its own magnitude can dominate (e.g. parameters copied exactly).
    tol, basis = noise_tolerance(torch.float64, 3.0, sensitivity=1.0)
    assert tol == 32 * u64 * 3.0 and "magnitude" in basis
    assert tol < 1e-10 * 3.0  # float64 stays far inside 1e-10 relative for ordinary tensors
    # Low precision: the unsharded model's own error in the dtype, when larger.
    tol, basis = noise_tolerance("bfloat16", 1.0, run=0.01, sensitivity=2.0)
    assert tol == 4 * 0.01 and basis == "4 x run 1.0e-02"
    tol, _ = noise_tolerance("bfloat16", 1.0, run=0.001, sensitivity=2.0)
    assert tol == 4 * u16 * 2.0
    assert noise_tolerance("float32", 0.0, run=0.0)[0] == 0.0  # exact stays exact
    assert noise_tolerance("float32", 1.0, margin=2)[0] == 2 * 2.0 ** -24
    assert noise_tolerance("float32", 1.0, run=1e-7)[0] == 16 * 1e-7
    with pytest.raises(ValueError, match="finite"):
        noise_tolerance("float32", 1.0, run=math.inf)


def _step(out: torch.Tensor, grad: torch.Tensor) -> dict:
    """A step dict as _run_step returns it (one parameter, one output, one module record)."""
    return {"params0": {"w": torch.ones(2, dtype=torch.float64)}, "output": {"y": out}, "input_grads": {},
            "grads": {"w": grad}, "params": {"w": torch.ones(2, dtype=torch.float64) - 0.1 * grad},
            "second": out * 2, "modules": [("lin", "lin", ("full",), [("", out)])]}


def test_tolerances_derive_per_tensor_from_the_reference_runs() -> None:
    truth = _step(torch.tensor([1e-17, -2e-17], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64))
    run = _step(torch.tensor([3e-3, -1e-3]), torch.tensor([0.5, 0.2505]))  # bfloat16-sized errors
    d = 2.0 ** -30
    drawn = _step(truth["output"]["y"] + torch.tensor([4 * d, -d], dtype=torch.float64),
                  truth["grads"]["w"] * (1 + d))
    tols = Tolerances.derive(torch.bfloat16, truth, [run], [drawn], delta=d)
    names = set(tols.table)
    assert names == {"param w", "output['y']", "grad w", "step w", "second forward output", "module lin"}
    u, m = 2.0 ** -8, 4
    assert tols("output['y']")["tol"] == pytest.approx(m * max(3e-3, u * 4))  # u*sensitivity > run 3e-3
    assert tols("grad w")["tol"] == pytest.approx(m * u * 0.5)  # its own rounding > run 5e-4
    assert tols("param w")["tol"] == m * u * 1.0  # an exact copy: its own rounding only
    assert tols.modules()("lin")["tol"] == tols("output['y']")["tol"]
    # float64: no run; the sensitivity carries the near-zero output.
    tols64 = Tolerances.derive(torch.float64, truth, [], [drawn], delta=d)
    assert tols64("output['y']")["tol"] == pytest.approx(32 * 2.0 ** -53 * 4)
    assert tols64("not measured", torch.tensor([2.0]))["tol"] == 32 * 2.0 ** -53 * 2
    fixed = Tolerances.fixed(torch.float32, 1e-3, 1e-9)
    assert fixed("output['y']") == {"rtol": 1e-3, "atol": 1e-9}
    c = compare("output['y']", "output", truth["output"]["y"] + 1e-9, truth["output"]["y"], **tols64("output['y']"))
    assert not c.passed and c.tol == tols64("output['y']")["tol"] and "sensitivity" in c.basis


def test_overflow_of_the_unsharded_model_is_the_reference() -> None:
    truth = _step(torch.tensor([7e4, 1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    run = _step(torch.tensor([math.inf, 1.0], dtype=torch.float16), torch.ones(2, dtype=torch.float16))
    _keep_overflow(truth, run)
    assert truth["output"]["y"].tolist() == [math.inf, 1.0] and truth["output"]["y"].dtype == torch.float64


def test_rounding_model_perturbs_results_not_views_copies_or_random_state() -> None:
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(8, 8)
    state = torch.get_rng_state()
    d = 2.0 ** -20
    with _RoundingModel(seed=0, delta=d):
        y = x * 3  # a result: every element off by up to one relative unit
        v = y.view(64)  # a view: no arithmetic
        c = y.clone()  # an exact copy
        z = x.clone()
        z.add_(1.0)  # in place: perturbed in place
        ln = F.layer_norm(x, (8,)).sum(-1)  # ~0, from terms ~1
    with _RoundingModel(seed=1):  # the default delta survives a float32 part of a float64 model
        cast = (x.to(torch.float32) * 3).to(torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    moved = ((cast - x * 3).abs() / (x * 3).abs())[x != 0] / 2.0 ** -16
    assert 0.1 < float(moved.max()) < 2.1  # about one unit of delta each, not a float32 unit / delta
    rel = (y / (x * 3) - 1)[x != 0].abs()
    assert rel.max() <= d * (1 + 1e-6) and rel.max() > d / 2 and rel.min() < d / 2
    assert v.data_ptr() == y.data_ptr() and torch.equal(c, y)
    assert not torch.equal(z, x + 1) and torch.allclose(z, x + 1, rtol=2 * d, atol=0)
    exact = F.layer_norm(x, (8,)).sum(-1)
    assert exact.abs().max() < 1e-14 and ((ln - exact).abs().max() / d) > 0.3  # the features' rounding


def test_compare_relative_to_magnitude() -> None:
    ref = torch.tensor([100.0, 1.0], dtype=torch.float64)
    ok = compare("t", "output", ref + torch.tensor([5e-9, 5e-9], dtype=torch.float64), ref, 1e-10, 0.0)
    assert ok.passed and ok.max_rel == pytest.approx(5e-11)
    bad = compare("t", "output", ref + torch.tensor([0.0, 2e-8], dtype=torch.float64), ref, 1e-10, 0.0)
    assert not bad.passed and bad.max_abs == pytest.approx(2e-8)
    assert "shape" in compare("t", "output", torch.ones(3), torch.ones(2), 1, 1).note
    nan = torch.tensor([float("nan"), 1.0])
    assert compare("t", "output", nan, nan.clone(), 0, 0).passed  # NaN where the reference has NaN
    assert not compare("t", "output", torch.tensor([0.0, 1.0]), nan, 1, 1).passed
    assert not compare("t", "output", torch.tensor([1, 2]), torch.tensor([1, 3]), 1.0, 1.0).passed  # ints exact
    assert compare("t", "output", None, None, 0, 0).passed and not compare("t", "output", 1, 2, 0, 0).passed
    assert compare("z", "grad", torch.zeros(2), torch.zeros(2), 1e-10, 1e-15).passed  # atol floor


def test_flatten_names_every_leaf() -> None:
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        loss: torch.Tensor | None = None

    Pair = collections.namedtuple("Pair", "a b")
    leaves = flatten({"x": (torch.ones(1), [torch.zeros(1)]), "o": Out(torch.ones(2)), "p": Pair(1, torch.ones(1))})
    assert [n for n, _ in leaves] == ["output['x'][0]", "output['x'][1][0]", "output['o'].logits",
                                      "output['o'].loss", "output['p'].a", "output['p'].b"]


def test_fresh_inputs_keep_shapes_and_ranges() -> None:
    ids = torch.randint(3, 9, (4, 5), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    new_ids, new_x, new_mask = _fresh((ids, x, mask), torch.Generator().manual_seed(1))
    assert new_ids.shape == ids.shape and new_ids.dtype == ids.dtype
    assert int(new_ids.min()) >= 3 and int(new_ids.max()) <= 8 and not torch.equal(new_ids, ids)
    assert new_x.dtype == torch.float64 and new_x.shape == x.shape and not torch.allclose(new_x, x)
    assert torch.equal(new_mask, mask)


def test_active_dropout_modules_and_functional() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.lin(x), p=0.2, training=self.training)

    model, _ = dropout_factory()
    assert active_dropout(model) == ["2 (Dropout, p=0.5)"]
    assert active_dropout(model.eval()) == []
    f = Functional().train()
    gm = torch.fx.symbolic_trace(f)
    assert any("dropout" in s and "p=0.2" in s for s in active_dropout(f, gm))
    assert active_dropout(f.eval(), torch.fx.symbolic_trace(f)) == []


def test_resolve_model_specs() -> None:
    model, args, kwargs = resolve_model("mlp", dtype="float64")
    assert isinstance(model, nn.Sequential) and args[0].dtype == torch.float64 and kwargs == {}
    model, args, kwargs = resolve_model(f"{__name__}:kwargs_factory")
    assert isinstance(model, TwoBlock) and args == () and set(kwargs) == {"x"}
    with pytest.raises(ValueError, match="built-in reference model"):
        resolve_model("nosuchmodel")
    with pytest.raises(ValueError, match="cannot load"):
        resolve_model("no_such_package.mod:fn")
    with pytest.raises(ValueError, match="expected a model"):
        resolve_model(f"{__name__}:not_a_model")


def test_spawned_ranks_refuse_a_local_class_clearly() -> None:
    class Local(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="factory 'package.module:callable'.*device='cpu'"):
        _source_for(Local(), None, spawn=True)
    assert _source_for(Local(), None, spawn=False).model is not None  # fork inherits it
    src = _source_for(models.build("mlp")[0], "mlp", spawn=True)  # a factory: rebuilt, then filled
    assert src.model is None and src.spec == "mlp" and "0.weight" in src.values


def test_module_outputs_are_reassembled_as_the_rank_holds_them() -> None:
    ref = torch.arange(24, dtype=torch.float64).reshape(2, 12)
    # A fused column output (3 segments of 4) split over 2 ranks.
    segs = (4, 4, 4)
    shards = [tpshard.layout.shard(ref, -1, r, 2, segs) for r in range(2)]
    assert _module_comparison("qkv", ("slice", -1, segs), shards, ref, tpshard.Plan(2), 0, 0).passed
    assert not _module_comparison("qkv", ("slice", -1, None), shards, ref, tpshard.Plan(2), 0, 0).passed
    # A row output: partial sums without the bias.
    bias = torch.ones(12, dtype=torch.float64)
    parts = [(ref - bias) * 0.25, (ref - bias) * 0.75]
    c = _module_comparison("row", ("partial", bias), parts, ref, tpshard.Plan(2), 1e-12, 0)
    assert c.passed and "bias" in c.note
    # A replicated module on a split value: found by shape; fused layouts come from the plan.
    plan = tpshard.Plan(2, modules={"qkv": tpshard.ModulePlan("qkv", "linear", "column", segments=segs)})
    c = _module_comparison("act", ("auto",), shards, ref, plan, 0, 0)
    assert c.passed and "[4, 4, 4]" in c.note
    assert _module_comparison("norm", ("auto",), [ref, ref], ref, plan, 0, 0).passed
    assert not _module_comparison("norm", ("auto",), [ref, ref + 1], ref, plan, 0, 0).passed


def test_report_table_and_summary() -> None:
    good = Comparison("output", "output", 1e-16, 1e-17, 1e-10, 1e-15, True)
    bad = Comparison("grad w", "grad", 0.5, 0.25, 1e-10, 1e-15, False)
    report = VerifyReport("M", 2, "cpu", "float64", "gloo", [good, bad],
                          modules=[Comparison("lin", "module", 0.5, 0.25, 1e-10, 1e-15, False)],
                          first_divergence="lin", divergence="forward output of 'lin' differs",
                          collectives={"forward": {"all_reduce": {"count": 2, "bytes": 2048}}})
    assert not report.ok and report.failures == [bad] and report.max_rel("grad") == 0.25
    text = str(report)
    assert "NOT EQUIVALENT (1 of 2 checks pass" in text and "FAIL" in text
    assert "all_reduce x2 (2.0 KiB)" in text and "first divergence: lin" in text
    d = report.to_dict()
    assert d["failed"] == ["grad w"] and d["collectives"]["forward"]["all_reduce"]["count"] == 2
    assert not VerifyReport("M", 2, "cpu", "float64", "gloo").ok  # nothing compared is no pass


# ---------------------------------------------------------------------------------------------
# The CLI, through a parser built here (cli.py adds the same subcommand).


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tpshard")
    verify_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.fn(ns)


@pytest.mark.parametrize("argv, message", [
    (["verify", "nosuchmodel", "-n", "2"], "built-in reference model"),
    (["verify", "mlp", "-n", "0"], "at least 1"),
    (["verify", "mlp", "-n", "2", "--dtype", "int8"], "unknown dtype"),
    (["verify", "gpt", "-n", "3"], "divisible"),  # the plan refuses before any rank starts
])
def test_cli_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert _cli(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cli_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert _cli(["verify", "mlp", "-n", "2", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_equivalent_model_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert _cli(["verify", "mlp", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "column" in out and "row" in out  # the plan
    assert "EQUIVALENT" in out and "NOT EQUIVALENT" not in out and "grad 0.weight" in out


@pytest.mark.timeout(60)
def test_cli_kept_dropout_is_not_equivalent_and_says_why(capsys: pytest.CaptureFixture) -> None:
    assert _cli(["verify", f"{__name__}:dropout_factory", "-n", "2", "--keep-dropout", "--no-step"]) == 1
    out = capsys.readouterr().out
    assert "NOT EQUIVALENT" in out and "dropout is active in training mode" in out


# ---------------------------------------------------------------------------------------------
# Equivalent models pass.


@pytest.mark.timeout(60)
def test_gpt_with_dropout_in_training_mode_passes_in_eval() -> None:
    model, args = models.build("gpt", dtype=torch.float64, batch=3, dropout=0.1)
    model.train()
    report = verify(model, 2, example_inputs=args, timeout=50)
    assert report.ok, report
    assert model.training and model.h[0].attn.attn_dropout.training  # the caller's model untouched
    assert any("put in eval mode" in n for n in report.notes)
    kinds = {c.kind for c in report.comparisons}
    assert kinds == {"param", "output", "grad", "step", "second forward"}  # integer ids: no input grad
    assert report.max_rel() < 1e-12
    # Megatron's minimum: per block one all-reduce for attention and one for the MLP, each way;
    # the embeddings add one forward all-reduce, the tied head one all-gather forward.
    assert report.collective_counts("forward") == {"all_reduce": 5, "all_gather": 1}
    assert report.collective_counts("backward") == {"all_reduce": 5}
    assert report.collectives["forward"]["all_gather"]["bytes"] == 3 * 8 * 64 * 8  # (B, T, vocab) float64


@pytest.mark.timeout(60)
def test_llama_float32_passes_with_default_tolerance() -> None:
    report = assert_equivalent("llama", 2, dtype="float32", timeout=50)
    assert report.dtype == "float32" and report.tolerance["derived"]
    assert 0 < report.tolerance_used() < 1 and 0 < report.max_rel() < 1e-4
    assert all(math.isfinite(c.tol) and c.basis for c in report.comparisons)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_near_zero_outputs_pass(dtype: str, capsys: pytest.CaptureFixture) -> None:
    # 8 branches x 3 near-zero outputs (24 tensors, 8 of them scalars), each with its own weights.
    assert _cli(["verify", f"{__name__}:near_zero_factory", "-n", "2", "--dtype", dtype, "--timeout", "100"]) == 0
    out = capsys.readouterr().out
    assert "-> EQUIVALENT" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_near_zero_outputs_pass_for_more_seeds(dtype: str) -> None:
    hard = 0
    for seed in range(1, 4):
        model, args = near_zero_factory(seed)
        report = verify(model, 2, example_inputs=args, dtype=dtype, timeout=90)
        assert report.ok, report
        near_zero = [c for c in report.comparisons if c.kind == "output" and "ln_" in c.name]
        hard += sum(c.max_rel > 1e-3 for c in near_zero)  # a tolerance relative to the output would fail
    assert hard > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, dtype, world", [
    ("gpt", "bfloat16", 2), ("llama", "bfloat16", 2), ("gpt", "float32", 2),
    *(pytest.param(name, dtype, 4, marks=pytest.mark.slow)
      for name, dtype in [("gpt", "bfloat16"), ("llama", "bfloat16"), ("gpt", "float32"), ("llama", "float32")]),
])
def test_correct_models_pass_in_low_precision(name: str, dtype: str, world: int) -> None:
    report = assert_equivalent(name, world, dtype=dtype, timeout=100)
    assert report.tolerance_used() < 0.75  # with room to spare (measured: README, Verify)


@pytest.mark.timeout(60)
def test_fixed_tolerances_replace_the_derived_ones(capsys: pytest.CaptureFixture) -> None:
    assert _cli(["verify", "mlp", "-n", "2", "--rtol", "1e-9", "--atol", "1e-12"]) == 0
    out = capsys.readouterr().out
    assert "rtol 1e-09 atol 1e-12" in out and "x u*" not in out
    report = verify("mlp", 2, dtype="float32", rtol=0.0, atol=0.0, optimizer_step=False)
    assert report.tolerance == {"derived": False, "rtol": 0.0, "atol": 0.0} and not report.ok


# ---------------------------------------------------------------------------------------------
# Broken sharded models fail and name the module.


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype, delta", [("bfloat16", 0.1), ("float32", 1e-3), ("float64", 1e-7)])
def test_a_defect_in_the_collectives_is_caught(dtype: str, delta: float) -> None:
    # Every all-reduce result times 1 + delta, injected in the ranks from outside tpshard.
    report = _verify("gpt", 2, dtype=dtype, timeout=100, _tamper=functools.partial(_scale_all_reduce, delta))
    assert not report.ok, report
    assert report.tolerance_used() > 1.5  # well beyond the tolerance, not at its edge
    assert report.first_divergence is not None


@pytest.mark.timeout(60)
def test_hand_edited_plan_fails_and_names_the_row() -> None:
    model, args = models.build("gpt", dtype=torch.float64, batch=2)
    plan = tpshard.plan(model, 2, example_inputs=args)
    plan.modules["h.0.attn.c_proj"].segments = (16, 16)  # the row keeps the wrong input features
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, 2, example_inputs=args, plan=plan, timeout=50)
    text = str(info.value)
    assert "at 'h.0.attn.c_proj'" in text and "first divergence: h.0.attn.c_proj" in text
    assert "FAIL" in text and "h.0.attn.c_attn" in text  # the module table, passing up to the row


def _tamper_shard(rank: int, world: int, sharded: nn.Module) -> None:
    if rank == 1:
        with torch.no_grad():
            sharded.get_parameter("up2.weight")[0, 0] += 0.5


@pytest.mark.timeout(60)
def test_tampered_weight_shard_of_a_local_class_is_named() -> None:
    class Local(TwoBlock):  # defined here: forked ranks inherit it
        pass

    torch.manual_seed(0)
    report = _verify(Local(), 2, example_inputs=(torch.randn(3, 8),), _tamper=_tamper_shard, timeout=50)
    assert not report.ok
    assert report.first_divergence == "up2"
    assert {c.name for c in report.failures} >= {"param up2.weight", "output['out']"}
    assert not any(c.name.startswith("output['aux']") for c in report.failures)  # before up2: equal
    assert [m.name for m in report.modules if not m.passed][0] == "up2"


class ShapeBranch(TwoBlock):
    """Python control flow on a shape: symbolic tracing fails, torch.export captures it."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if x.shape[0] > 1:
            x = x * 2
        return super().forward(x)


@pytest.mark.timeout(60)
def test_export_captured_model_is_localized_from_the_graph() -> None:
    torch.manual_seed(0)
    report = _verify(ShapeBranch(), 2, example_inputs=(torch.randn(3, 8),), _tamper=_tamper_shard, timeout=50)
    assert report.plan.capture == "export"  # no call_module nodes: module outputs read off the graph
    assert not report.ok and report.first_divergence == "up2"
    passed = [m.name for m in report.modules if m.passed]
    assert "up1" in passed and "norm" in passed  # a column slice and a replicated module before it


def _tamper_gradient(rank: int, world: int, sharded: nn.Module) -> None:
    if rank == 0:
        sharded.get_parameter("down1.weight").register_hook(lambda g: g * 1.5)


@pytest.mark.timeout(60)
def test_backward_only_fault_is_named_by_its_gradient() -> None:
    torch.manual_seed(0)
    report = _verify(TwoBlock(), 2, example_inputs=(torch.randn(3, 8),), _tamper=_tamper_gradient,
                     optimizer_step=False, timeout=50)
    assert not report.ok and all(c.passed for c in report.comparisons if c.kind in ("output", "param"))
    assert report.first_divergence == "down1" and "gradient of 'down1.weight'" in report.divergence


# ---------------------------------------------------------------------------------------------
# Robustness: a raising rank, a hanging rank.


def _raise_on_rank_1(rank: int, world: int, sharded: nn.Module) -> None:
    if rank == 1:
        raise ValueError("injected fault on rank 1")


def _hang_on_rank_1(rank: int, world: int, sharded: nn.Module) -> None:
    if rank == 1:
        time.sleep(120)


@pytest.mark.timeout(60)
def test_raising_rank_fails_with_its_traceback() -> None:
    with pytest.raises(RankError) as info:
        _verify("mlp", 2, _tamper=_raise_on_rank_1, timeout=30)
    assert info.value.rank == 1 and "injected fault on rank 1" in str(info.value)
    assert "_raise_on_rank_1" in str(info.value)  # the traceback


@pytest.mark.timeout(60)
def test_hanging_rank_fails_within_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises((RankTimeout, RankError)) as info:
        _verify("mlp", 2, _tamper=_hang_on_rank_1, timeout=6)
    assert time.monotonic() - start < 6 + 10
    assert "time" in str(info.value).lower()


# ---------------------------------------------------------------------------------------------
# Spawned ranks (the CUDA start method) rebuild a factory's model and copy its values.


@pytest.mark.timeout(120)
def test_spawned_ranks_rebuild_a_factory_model() -> None:
    report = _verify("mlp", 2, start_method="spawn", timeout=100)
    assert report.ok, report


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): ranks share the GPU(s) (gloo over CUDA tensors, or NCCL).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name, dtype", [("gpt", "float32"), ("llama", "bfloat16")])
def test_gpu_reference_models(name: str, dtype: str) -> None:
    report = verify(name, 2, device="cuda", dtype=dtype, timeout=150)
    assert report.ok, report
    assert report.backend == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(180)
def test_gpu_cli_and_localization() -> None:
    assert _cli(["verify", "gpt", "-n", "2", "--device", "cuda", "--dtype", "float32"]) == 0
    model, args = models.build("gpt", dtype=torch.float32, batch=2)
    plan = tpshard.plan(model, 2, example_inputs=args)
    plan.modules["h.1.mlp.c_proj"].segments = (64, 64)
    report = verify(model, 2, example_inputs=args, plan=plan, device="cuda", dtype="float32", timeout=150)
    assert not report.ok and report.first_divergence == "h.1.mlp.c_proj"


# ---------------------------------------------------------------------------------------------
# Hugging Face MoE: grouped_mm has no float64 kernel; the router rounds in float32.


def _mixtral() -> nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    model = tf.MixtralForCausalLM(cfg)
    model.config._experts_implementation = "grouped_mm"  # the default from_pretrained picks
    models.randomize_(model)
    return model


@pytest.mark.timeout(200)
def test_hf_mixtral_verifies_and_a_defect_is_still_caught() -> None:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = {"use_cache": False}
    report = _verify(_mixtral(), 2, example_inputs=(ids,), example_kwargs=kw, timeout=150)
    assert report.ok, report
    assert any("grouped_mm" in n for n in report.notes) and any("coarser dtype" in n for n in report.notes)
    # The float32 router widens the noise to float32's; a 1e-3 defect is still far outside it.
    bad = _verify(_mixtral(), 2, example_inputs=(ids,), example_kwargs=kw, timeout=150,
                  _tamper=functools.partial(_scale_all_reduce, 1e-3))
    assert not bad.ok and bad.tolerance_used() > 1.5, bad
