"""Mixture-of-experts models sharded with no hand-written plan (tpshard.compiler.moe).

Hugging Face Mixtral (its eager loop and its batched bmm form), Qwen2-MoE (a shared expert
with a sigmoid gate), Qwen3-MoE, and a hand-written loop MoE (a ModuleList of experts, top-2
routing, index_add_, a shared expert), float64 on real gloo ranks: outputs, every gradient
(router and experts), an SGD step, each rank's parameter fraction, and the collectives per
MoE layer counted at dispatch, as CommDebugMode counts them (without its module tracker).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tpshard
from tpshard import checkpoint, models
from tpshard.verify.launch import run_ranks

from _dist import comm_counts, rel_error, step_errors

tf = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

RTOL = 1e-10
# Hugging Face's routers compute their softmax in float32 (router_logits.float()) even in a
# float64 model, so the gradients that flow through the routing weights carry float32 rounding
# of partial sums added in another order; a missing or doubled all-reduce is an O(1) error.
RTOL_ROUTED_GRADS = 1e-6
DT = torch.float64


class Expert(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopExperts(nn.Module):
    """A loop over experts: tokens selected with a boolean mask, results added with index_add_."""

    def __init__(self, d: int, h: int, n: int, bias: bool = False) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(n))
        if bias:  # a bias after the down projection: the shards' outputs do not add up
            for e in self.experts:
                e.w2.bias = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


class HandMoE(nn.Module):
    """Router (linear, softmax, top-2), routed experts and a shared expert, in a residual block."""

    def __init__(self, d: int = 16, h: int = 24, n: int = 4, bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, n, bias=False)
        self.experts = LoopExperts(d, h, n, bias)
        self.shared = Expert(d, h)
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hs = self.norm(x).reshape(-1, d)
        probs = torch.softmax(self.router(hs), dim=-1)
        w, idx = torch.topk(probs, 2, dim=-1)
        y = self.experts(hs, idx, w / w.sum(-1, keepdim=True)) + self.shared(hs)
        return self.head(x + y.reshape(b, t, d))


def hf_model(name: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64, num_experts_per_tok=2)
    if name.startswith("mixtral"):
        impl = "batched_mm" if name == "mixtral_bmm" else "eager"
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                                       experts_implementation=impl, **common))
    elif name == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                                         shared_expert_intermediate_size=40, num_experts=4,
                                                         experts_implementation="eager", **common))
    else:
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                                         num_experts=8, head_dim=8, experts_implementation="eager",
                                                         **common))
    model = model.to(DT).eval()
    models.randomize_(model)
    return model


class Collectives(TorchDispatchMode):
    """The c10d collectives dispatched, as CommDebugMode counts them, without its module tracker
    (whose parent stack loses its place in Hugging Face's experts, which call a shared
    activation module)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def get_comm_counts(self) -> dict:
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace in ("c10d", "_c10d_functional"):
            self.counts[func.overloadpacket] = self.counts.get(func.overloadpacket, 0) + 1
        return func(*args, **(kwargs or {}))


# name -> backward all-reduces per layer: (attention: its input [, q_norm, k_norm], MoE: one for
# the gradients of the tokens, the routing weights [and the shared expert's gate] together)
HF = {"mixtral": (1, 1), "mixtral_bmm": (1, 1), "qwen2_moe": (1, 1), "qwen3_moe": (3, 1)}


def _step(sharded: nn.Module, ref: nn.Module, run, plan, rank: int, world: int) -> dict:
    """One training step of both: output, every gradient, parameters after SGD; the collectives."""
    errors, fwd, bwd = step_errors(sharded, ref, run, plan, rank, world, counter=Collectives)
    errors["second forward"] = rel_error(run(sharded).detach(), run(ref).detach())
    local = sum(p.numel() for p in sharded.parameters())
    full = sum(p.numel() for p in ref.parameters())
    return {"errors": errors, "fraction": local / full, "fwd": comm_counts(fwd), "bwd": comm_counts(bwd),
            "styles": {k: m.style for k, m in plan.modules.items()}, "explain": plan.explain()}


def _hf_case(name: str, rank: int, world: int) -> dict:
    model = hf_model(name)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    sharded = tpshard.parallelize(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False})
    return _step(sharded, ref, lambda m: m(ids, use_cache=False).logits, sharded.tpshard_plan, rank, world)


def _hand_case(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = HandMoE().to(DT)
    models.randomize_(model)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    sharded = tpshard.parallelize(model, world, example_inputs=(x,))
    return _step(sharded, ref, lambda m: m(x), sharded.tpshard_plan, rank, world)


def _body(rank: int, world: int, names: list[str]) -> list[dict]:
    return [(_hand_case if name == "hand" else _hf_case)(name, rank, world) for name in names]


CASES = ["hand", *HF]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_moe_models_equal_the_original_with_experts_split(world: int) -> None:
    results = run_ranks(_body, world, CASES, timeout=580)
    for rank_results in results:
        for name, r in zip(CASES, rank_results):
            bad = {k: v for k, v in r["errors"].items()
                   if not v <= (RTOL if name == "hand" or k in ("output", "second forward") else RTOL_ROUTED_GRADS)}
            assert not bad, f"{name} world {world}: {bad}"
    for name, r in zip(CASES, results[0]):
        experts = [k for k, s in r["styles"].items() if k.endswith("experts")]
        assert experts and all(r["styles"][k] == "expert_tp" for k in experts), (name, r["explain"])
        assert r["fraction"] <= 1 / world + 0.1, (name, r["fraction"], r["explain"])
        if name == "hand":  # routed + shared experts: one all-reduce each way; the head's copy and gather
            assert r["fwd"] == {"all_reduce": 1, "all_gather": 1}, (name, r["fwd"], r["explain"])
            assert r["bwd"] == {"all_reduce": 2}, (name, r["bwd"], r["explain"])
        else:  # the embedding, then per layer attention 1 + MoE 1 forward; lm_head gathers its output
            assert r["fwd"] == {"all_reduce": 1 + 2 * 2, "all_gather": 1}, (name, r["fwd"], r["explain"])
            assert r["bwd"] == {"all_reduce": 2 * sum(HF[name]) + 1}, (name, r["bwd"], r["explain"])


def _broken_case(rank: int, world: int) -> dict:
    """The hand-written MoE with its plan's one forward all-reduce removed: the check must fail."""
    torch.manual_seed(0)
    model = HandMoE().to(DT)
    models.randomize_(model)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    plan = tpshard.plan(model, world, example_inputs=(x,))
    reduce = next(e for e in plan.edits if e.kind == "reduce")
    plan.edits = [e for e in plan.edits if e is not reduce]
    sharded = tpshard.parallelize(model, world, example_inputs=(x,), plan=plan)
    out = {"output": rel_error(sharded(x).detach(), ref(x).detach())}
    # ... and with the joint copy (one backward all-reduce of the tokens' and routing weights'
    # gradients) removed, the router's and the norm's gradients are wrong
    plan = tpshard.plan(model, world, example_inputs=(x,))
    assert sum(e.joint is not None for e in plan.edits) == 2
    plan.edits = [e for e in plan.edits if e.joint is None]
    sharded = tpshard.parallelize(model, world, example_inputs=(x,), plan=plan)
    sharded(x).sum().backward()
    ref(x).sum().backward()
    for name in ("router.weight", "norm.weight"):
        out[name] = rel_error(sharded.get_parameter(name).grad, ref.get_parameter(name).grad)
    return out


def _sequence_case(rank: int, world: int) -> dict:
    """The hand-written MoE with sequence parallelism: norms on sequence shards, the MoE's
    partial sum reduce-scattered."""
    torch.manual_seed(0)
    model = HandMoE().to(DT)
    models.randomize_(model)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    sharded = tpshard.parallelize(model, world, example_inputs=(x,), sequence_parallel=True)
    return _step(sharded, ref, lambda m: m(x), sharded.tpshard_plan, rank, world)


def _misc_body(rank: int, world: int) -> dict:
    return {"broken": _broken_case(rank, world), "sequence": _sequence_case(rank, world)}


@pytest.mark.timeout(180)
def test_the_parity_check_fails_without_the_experts_all_reduce_and_sequence_parallel_holds() -> None:
    results = run_ranks(_misc_body, 2, timeout=160)
    assert all(v > 1e-3 for r in results for v in r["broken"].values()), [r["broken"] for r in results]
    for r in results:
        bad = {k: v for k, v in r["sequence"]["errors"].items() if not v <= RTOL}
        assert not bad, bad
    assert results[0]["sequence"]["styles"]["experts"] == "expert_tp"


def test_experts_that_do_not_add_up_are_kept_whole_with_the_reason() -> None:
    torch.manual_seed(0)
    model = HandMoE(bias=True).to(DT)
    x = torch.randn(3, 5, 16, dtype=DT)
    plan = tpshard.plan(model, 2, example_inputs=(x,))
    experts = plan.modules["experts"]
    assert experts.kind == "experts" and experts.style == "replicate", plan.explain()
    assert "kept whole" in experts.reason and "bias" in experts.reason, experts.reason
    assert all(plan.params[name].replicated for name in experts.params)
    assert plan.modules["shared.w1"].style == "column"  # the rest of the block is still split


def test_plan_names_the_recognized_form_and_round_trips() -> None:
    for name, form in (("mixtral", "loop over experts"), ("mixtral_bmm", "batched expert weights (bmm)")):
        model = hf_model(name, layers=1)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        plan = tpshard.plan(model, 4, example_inputs=(ids,), example_kwargs={"use_cache": False})
        experts = plan.modules["model.layers.0.mlp.experts"]
        assert experts.style == "expert_tp" and form in experts.reason, experts.reason
        assert plan.params["model.layers.0.mlp.experts.gate_up_proj"].segments == (48, 48)
        assert plan.params["model.layers.0.mlp.experts.down_proj"].dim == 2
        assert plan.modules["model.layers.0.mlp.gate"].style == "replicate"  # every rank routes alike
        assert type(plan).from_json(plan.to_json()) == plan
    # Hugging Face's default on CPU, grouped_mm, runs in float32 only: the split is found in float32
    model = tf.MixtralForCausalLM(hf_model("mixtral", layers=1).config)
    model.config._experts_implementation = "grouped_mm"
    plan = tpshard.plan(model, 2, example_inputs=(torch.randint(0, 64, (2, 8)),), example_kwargs={"use_cache": False})
    experts = plan.modules["model.layers.0.mlp.experts"]
    assert experts.style == "expert_tp" and "_grouped_mm" in experts.reason, experts.reason


def test_a_model_on_the_meta_device_gets_the_same_plan() -> None:
    """On meta nothing runs: the experts are captured by their structure, the call read from the
    graph, the split found on random CPU values (what checkpoint sharding plans with)."""
    torch.manual_seed(0)
    hand = HandMoE().to(DT)
    x = torch.randn(3, 5, 16, dtype=DT)
    cases = [(hand, HandMoE().to(DT).to("meta"), (x,), {}),
             (hf_model("mixtral", layers=1), None, (torch.randint(0, 64, (2, 8)),), {"use_cache": False})]
    for real, meta, args, kwargs in cases:
        if meta is None:
            with torch.device("meta"):
                meta = type(real)(real.config).to(DT)
        want = tpshard.plan(real, 2, example_inputs=args, example_kwargs=kwargs)
        got = tpshard.plan(meta, 2, example_inputs=tuple(a.to("meta") for a in args), example_kwargs=kwargs)
        assert got.params == want.params
        assert {k: m.style for k, m in got.modules.items()} == {k: m.style for k, m in want.modules.items()}
        assert got.edits == want.edits


def test_a_hidden_size_the_world_does_not_divide_keeps_the_experts_whole() -> None:
    torch.manual_seed(0)
    model = HandMoE(h=6).to(DT)  # 6 does not split over 4 ranks
    plan = tpshard.plan(model, 4, example_inputs=(torch.randn(3, 5, 16, dtype=DT),),
                        overrides={"shared.*": "replicate"})  # (a dense MLP of 6 is an error; see the planner)
    assert plan.modules["experts"].style == "replicate" and "kept whole" in plan.modules["experts"].reason


def test_a_checkpoint_holds_each_ranks_expert_shards(tmp_path) -> None:  # noqa: ANN001
    """Sharded offline (planned on the meta device), each rank's file loads as that rank's experts."""
    torch.manual_seed(0)
    real = HandMoE().to(DT)
    models.randomize_(real)
    x = torch.randn(3, 5, 16, dtype=DT)

    def factory() -> tuple:
        return HandMoE().to(DT), (x,)

    checkpoint.save_sharded(factory, tmp_path / "ckpt", 2, weights=real.state_dict(), progress=False)
    want = tpshard.plan(real, 2, example_inputs=(x,))
    state = real.state_dict()
    for rank in range(2):
        module = tpshard.load_sharded(factory, tmp_path / "ckpt", rank=rank)
        assert module.tpshard_plan.modules["experts"].style == "expert_tp"
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.detach(), want.params[name].shard(state[name], rank, 2), rtol=0, atol=0)
