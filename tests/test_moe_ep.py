"""Expert parallelism (``expert_parallel=True``, tpshard.compiler.moe_ep): whole experts per rank.

Hugging Face Mixtral (eager loop and batched bmm), Qwen2-MoE (a shared expert) and a
hand-written MoE with stacked experts, float64 on real gloo ranks: outputs, every gradient
(router and experts), an SGD step, each rank's parameter fraction and the collectives per MoE
layer (one all-reduce each way, as expert tensor parallelism), planned once and applied from
the plan's JSON. The check fails when non-local tokens keep their weight; a world size that
does not divide the expert count is an error naming the ones that do; a ModuleList of experts
keeps expert tensor parallelism with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpshard
from tpshard import checkpoint, models
from tpshard.compiler import moe_ep
from tpshard.verify.launch import run_ranks

from test_moe import DT, HF, RTOL, RTOL_ROUTED_GRADS, HandMoE, _step, hf_model, tf

KW = {"use_cache": False}


class StackedExperts(nn.Module):
    """A loop over experts whose weights are stacked (leading dim E); E read from the weights."""

    def __init__(self, d: int, h: int, n: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(n, h, d))
        self.up = nn.Parameter(torch.randn(n, h, d))
        self.down = nn.Parameter(torch.randn(n, d, h))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.gate.shape[0]):
            tok, slot = torch.where(idx == e)
            xe = x[tok]
            h = F.silu(xe @ self.gate[e].t()) * (xe @ self.up[e].t())
            out.index_add_(0, tok, (h @ self.down[e].t()) * w[tok, slot, None])
        return out


class StackedMoE(HandMoE):
    def __init__(self, d: int = 16, h: int = 24, n: int = 4) -> None:
        super().__init__(d, h, n)
        self.experts = StackedExperts(d, h, n)


def _stacked() -> nn.Module:
    torch.manual_seed(0)
    model = StackedMoE().to(DT)
    models.randomize_(model)
    return model


def _case(name: str, rank: int, world: int) -> dict:
    if name == "stacked":
        model, args, kwargs = _stacked(), (torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=DT),), {}
        run = lambda m: m(*args)  # noqa: E731
    else:
        model, args, kwargs = hf_model(name), (torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1)),), KW
        run = lambda m: m(*args, **KW).logits  # noqa: E731
    ref = copy.deepcopy(model)
    plan = tpshard.plan(model, world, example_inputs=args, example_kwargs=kwargs, expert_parallel=True)
    again = tpshard.Plan.from_json(plan.to_json())
    assert again == plan
    sharded = tpshard.parallelize(model, world, example_inputs=args, example_kwargs=kwargs, plan=again)
    out = _step(sharded, ref, run, again, rank, world)
    out["specs"] = {k: m.expert_parallel for k, m in again.modules.items() if m.kind == "experts"}
    return out


def _body(rank: int, world: int, names: list[str]) -> list[dict]:
    return [_case(name, rank, world) for name in names]


CASES = ["stacked", "mixtral", "mixtral_bmm", "qwen2_moe"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_models_equal_the_original(world: int) -> None:
    results = run_ranks(_body, world, CASES, timeout=580)
    for rank_results in results:
        for name, r in zip(CASES, rank_results):
            bad = {k: v for k, v in r["errors"].items()
                   if not v <= (RTOL if name == "stacked" or k in ("output", "second forward") else RTOL_ROUTED_GRADS)}
            assert not bad, f"{name} world {world}: {bad}"
    for name, r in zip(CASES, results[0]):
        experts = [k for k, s in r["styles"].items() if k.endswith("experts")]
        assert experts and all(r["styles"][k] == "expert_parallel" for k in experts), (name, r["explain"])
        assert all(s["per_rank"] == 4 // world for s in r["specs"].values()), r["specs"]
        assert "expert parallel: experts [0:" in r["explain"], r["explain"]
        assert r["fraction"] <= 1 / world + 0.1, (name, r["fraction"], r["explain"])
        if name == "stacked":  # routed + shared experts: one all-reduce each way; the head's copy and gather
            assert r["fwd"] == {"all_reduce": 1, "all_gather": 1}, (name, r["fwd"], r["explain"])
            assert r["bwd"] == {"all_reduce": 2}, (name, r["bwd"], r["explain"])
        else:  # the embedding, then per layer attention 1 + MoE 1 forward; lm_head gathers its output
            assert r["fwd"] == {"all_reduce": 1 + 2 * 2, "all_gather": 1}, (name, r["fwd"], r["explain"])
            assert r["bwd"] == {"all_reduce": 2 * sum(HF[name]) + 1}, (name, r["bwd"], r["explain"])


def _unmasked(args: tuple, spec: dict, rank: int) -> tuple:
    """A wrong remapping: tokens routed to other ranks' experts keep their weight (index 0)."""
    n, i = spec["per_rank"], spec["ids"]
    idx = args[i]
    mine = (idx >= rank * n) & (idx < (rank + 1) * n)
    out = list(args)
    out[i] = torch.where(mine, idx - rank * n, torch.zeros_like(idx))
    return tuple(out)


def _broken_body(rank: int, world: int) -> dict:
    errors = {}
    for name in ("stacked", "mixtral"):
        model = _stacked() if name == "stacked" else hf_model(name, layers=1)
        x = (torch.randn(3, 5, 16, dtype=DT),) if name == "stacked" else (torch.randint(0, 64, (3, 8)),)
        kwargs = {} if name == "stacked" else KW
        want = model(*x, **kwargs)
        sharded = tpshard.parallelize(model, world, example_inputs=x, example_kwargs=kwargs, expert_parallel=True)
        good = sharded(*x, **kwargs)
        moe_ep.remap, saved = _unmasked, moe_ep.remap
        try:
            bad = sharded(*x, **kwargs)
        finally:
            moe_ep.remap = saved
        pick = (lambda o: o) if name == "stacked" else (lambda o: o.logits)
        rel = lambda a, b: float((pick(a) - pick(b)).abs().max() / pick(b).abs().max())  # noqa: E731
        errors[name] = (rel(good, want), rel(bad, want))
    return errors


@pytest.mark.timeout(180)
def test_the_check_fails_when_other_ranks_tokens_keep_their_weight() -> None:
    # (Mixtral's logits move less: its experts' output joins a residual stream; the parity
    # tests' output tolerance, RTOL = 1e-10, is still exceeded by far.)
    for r in run_ranks(_broken_body, 2, timeout=160):
        for name, (good, bad) in r.items():
            assert good <= RTOL and bad > (1e-3 if name == "stacked" else 1e-6), (name, good, bad)


def test_a_world_size_that_does_not_divide_the_experts_is_an_error() -> None:
    model = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                                                   num_local_experts=6, num_experts_per_tok=2,
                                                   experts_implementation="eager")).to(DT)
    args = (torch.randint(0, 64, (2, 8)),)
    with pytest.raises(tpshard.PlanError) as e:
        tpshard.plan(model, 4, example_inputs=args, example_kwargs=KW, expert_parallel=True)
    msg = str(e.value)
    assert "model.layers.0.mlp.experts" in msg and "6 experts" in msg and "[1, 2, 3, 6]" in msg, msg
    assert tpshard.plan(model, 4, example_inputs=args, example_kwargs=KW).modules[
        "model.layers.0.mlp.experts"].style == "expert_tp"  # expert TP still splits it
    assert tpshard.plan(model, 2, example_inputs=args, example_kwargs=KW, expert_parallel=True).modules[
        "model.layers.0.mlp.experts"].style == "expert_parallel"


def test_a_modulelist_of_experts_keeps_expert_tp_with_the_reason() -> None:
    torch.manual_seed(0)
    model = HandMoE().to(DT)
    plan = tpshard.plan(model, 2, example_inputs=(torch.randn(3, 5, 16, dtype=DT),), expert_parallel=True)
    experts = plan.modules["experts"]
    assert experts.style == "expert_tp" and not experts.expert_parallel, experts
    assert experts.reason.startswith("expert parallel refused:") and "ModuleList" in experts.reason, experts.reason


def test_inplace_is_refused() -> None:
    model = _stacked()
    x = (torch.randn(3, 5, 16, dtype=DT),)
    with pytest.raises(tpshard.PlanError, match="needs the graph"):
        tpshard.plan(model, 2, example_inputs=x, expert_parallel=True, inplace=True)
    plan = tpshard.plan(model, 2, example_inputs=x, expert_parallel=True)
    with pytest.raises(tpshard.PlanError, match="expert-parallel"):
        tpshard.parallelize(model, 2, example_inputs=x, plan=plan, inplace=True,
                            group=tpshard.OfflineGroup(0, 2))


def test_a_checkpoint_holds_each_ranks_experts(tmp_path) -> None:  # noqa: ANN001
    real = _stacked()
    x = torch.randn(3, 5, 16, dtype=DT)
    plan = tpshard.plan(real, 2, example_inputs=(x,), expert_parallel=True)
    checkpoint.save_sharded(lambda: (StackedMoE().to(DT), (x,)), tmp_path / "ckpt", 2, weights=real.state_dict(),
                            plan=plan, progress=False)
    state = real.state_dict()
    for rank in range(2):
        module = tpshard.load_sharded(lambda: (StackedMoE().to(DT), (x,)), tmp_path / "ckpt", rank=rank)
        assert module.tpshard_plan.modules["experts"].style == "expert_parallel"
        assert module.get_parameter("experts.gate").shape == (2, 24, 16)
        torch.testing.assert_close(module.get_parameter("experts.down").detach(), state["experts.down"][2 * rank:2 * rank + 2],
                                   rtol=0, atol=0)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.detach(), plan.params[name].shard(state[name], rank, 2), rtol=0, atol=0)


def _stacked_factory() -> tuple:
    return _stacked(), (torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=DT),), {}


def test_the_cli_plans_shards_and_reshards_with_expert_parallel(tmp_path, capsys) -> None:  # noqa: ANN001
    from tpshard import cli
    spec = "test_moe_ep:_stacked_factory"
    assert cli.main(["plan", spec, "-n", "2", "--expert-parallel"]) == 0
    out = capsys.readouterr().out
    assert "expert_parallel" in out and "expert parallel: experts [0:2] [2:4] per rank" in out, out
    assert cli.main(["plan", spec, "-n", "2"]) == 0 and "expert_tp" in capsys.readouterr().out
    assert cli.main(["shard", spec, "-n", "2", "--expert-parallel", "--out", str(tmp_path / "ckpt")]) == 0
    state = _stacked().state_dict()
    module = tpshard.load_sharded(_stacked_factory, tmp_path / "ckpt", rank=1)
    assert module.tpshard_plan.modules["experts"].style == "expert_parallel"
    assert torch.equal(module.get_parameter("experts.up"), state["experts.up"][2:])
    # resharded to 4 ranks: still whole experts per rank
    assert cli.main(["reshard", str(tmp_path / "ckpt"), "-n", "4", "--out", str(tmp_path / "ckpt4")]) == 0
    module = tpshard.load_sharded(_stacked_factory, tmp_path / "ckpt4", rank=3)
    assert module.tpshard_plan.modules["experts"].expert_parallel["per_rank"] == 1
    assert torch.equal(module.get_parameter("experts.down"), state["experts.down"][3:])


def _sequence_body(rank: int, world: int) -> dict:
    """Sequence parallelism with expert parallelism: the experts' partial sum reduce-scattered."""
    model = _stacked()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    sharded = tpshard.parallelize(model, world, example_inputs=(x,), sequence_parallel=True, expert_parallel=True)
    return _step(sharded, ref, lambda m: m(x), sharded.tpshard_plan, rank, world)


@pytest.mark.timeout(180)
def test_sequence_parallel_with_expert_parallel() -> None:
    results = run_ranks(_sequence_body, 2, timeout=160)
    for r in results:
        bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
        assert not bad, bad
    assert results[0]["styles"]["experts"] == "expert_parallel"


def test_a_model_on_the_meta_device_gets_the_same_plan() -> None:
    real = hf_model("mixtral", layers=1)
    with torch.device("meta"):
        meta = type(real)(real.config).to(DT)
    args = (torch.randint(0, 64, (2, 8)),)
    want = tpshard.plan(real, 2, example_inputs=args, example_kwargs=KW, expert_parallel=True)
    got = tpshard.plan(meta, 2, example_inputs=tuple(a.to("meta") for a in args), example_kwargs=KW,
                       expert_parallel=True)
    assert got == want
    assert got.modules["model.layers.0.mlp.experts"].style == "expert_parallel"


def test_plan_rows_grads_blocks_and_the_override() -> None:
    from tpshard.plan import GRAD_LOCAL
    model = hf_model("qwen3_moe", layers=4)  # 8 experts; 4 blocks, planned once and stamped
    plan = tpshard.plan(model, 4, example_inputs=(torch.randint(0, 64, (2, 8)),), example_kwargs=KW,
                        expert_parallel=True)
    assert plan.blocks["planned_once"]
    for layer in range(4):
        experts = plan.modules[f"model.layers.{layer}.mlp.experts"]
        assert experts.style == "expert_parallel" and experts.expert_parallel["per_rank"] == 2
        assert experts.reason.startswith("expert parallel: experts [0:2] [2:4] [4:6] [6:8] per rank"), experts.reason
        assert experts.collectives == {"fwd all_reduce": 1, "bwd all_reduce": 1}, experts.collectives
        for name in experts.params:
            assert plan.params[name].dim == 0 and plan.grads[name] == GRAD_LOCAL, (name, plan.params[name])
        assert plan.modules[f"model.layers.{layer}.mlp.gate"].style == "replicate"  # every rank routes alike
    assert tpshard.Plan.from_json(plan.to_json()) == plan
    # the style as an override, without the option; refused with the reason where it cannot hold
    x = (torch.randn(3, 5, 16, dtype=DT),)
    assert tpshard.plan(_stacked(), 2, example_inputs=x, overrides={"experts": "expert_parallel"}).modules[
        "experts"].style == "expert_parallel"
    with pytest.raises(tpshard.PlanError, match="cannot be honored: the experts are a ModuleList"):
        tpshard.plan(HandMoE().to(DT), 2, example_inputs=x, overrides={"experts": "expert_parallel"})
    # expert_tp as an override keeps expert TP for that layer
    assert tpshard.plan(_stacked(), 2, example_inputs=x, overrides={"experts": "expert_tp"},
                        expert_parallel=True).modules["experts"].style == "expert_tp"
