"""Planning without ranks: styles, layouts, JSON, explain, overrides, errors, the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpshard
from tpshard import models
from tpshard.compiler import make_plan
from tpshard.plan import GRAD_REPLICAS, Plan, PlanError


def _styles(plan: Plan) -> dict[str, str]:
    return {k: m.style for k, m in plan.modules.items() if m.kind != "module"}


def test_gpt_plan_styles_and_fused_layout() -> None:
    model, args = models.build("gpt")
    plan = tpshard.plan(model, 2, example_inputs=args)
    s = _styles(plan)
    assert s["wte"] == s["wpe"] == "vocab"
    for i in range(2):
        assert s[f"h.{i}.attn.c_attn"] == "column" and s[f"h.{i}.attn.c_proj"] == "row"
        assert s[f"h.{i}.mlp.c_fc"] == "column" and s[f"h.{i}.mlp.c_proj"] == "row"
    assert s["lm_head"] == "column"
    # c_attn's output is split three ways by size: each rank owns its heads of q, of k and of v.
    e = model.config.n_embd
    assert plan.params["h.0.attn.c_attn.weight"].segments == (e, e, e)
    assert plan.params["h.0.attn.c_attn.bias"].segments == (e, e, e)
    assert plan.params["h.0.attn.c_proj.weight"].dim == 1
    assert plan.params["h.0.attn.c_proj.bias"].dim is None  # added once, after the reduce
    assert plan.params["h.0.ln_1.weight"].dim is None
    # The head count in the view and the split sizes are divided by the world size.
    shapes = {e_.node: e_ for e_ in plan.edits if e_.kind in ("shape", "split_sizes")}
    assert shapes["split"].sizes == [e // 2] * 3
    assert shapes["view"].size == model.config.n_head // 2
    assert plan.ties == {"lm_head.weight": "wte.weight"}


@pytest.mark.parametrize("layout_kind", ["3hd", "h3d", "sizes"])
def test_fused_qkv_layouts_are_read_from_the_graph(layout_kind: str) -> None:
    """(3, heads, hd) is strided, (heads, 3, hd) contiguous, a split by sizes per segment."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.out = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            y = self.qkv(x)
            if layout_kind == "3hd":
                q, k, v = y.view(b, t, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            elif layout_kind == "h3d":
                q, k, v = y.view(b, t, 4, 3, 4).permute(3, 0, 2, 1, 4).unbind(0)
            else:
                q, k, v = y.split([16, 16, 16], dim=-1)
                q, k, v = q.view(b, t, 4, 4).transpose(1, 2), k.view(b, t, 4, 4).transpose(1, 2), \
                    v.view(b, t, 4, 4).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(o.transpose(1, 2).reshape(b, t, 16))

    plan = tpshard.plan(Attn(), 2, example_inputs=(torch.randn(2, 5, 16),))
    assert _styles(plan) == {"qkv": "column", "out": "row"}
    expected = {"3hd": (16, 16, 16), "h3d": None, "sizes": (16, 16, 16)}[layout_kind]
    assert plan.params["qkv.weight"].segments == expected


def test_llama_plan_gqa_and_swiglu() -> None:
    model, args = models.build("llama")
    plan = tpshard.plan(model, 2, example_inputs=args)
    s = _styles(plan)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert s[f"layers.0.self_attn.{p}"] == "column"
    assert s["layers.0.self_attn.o_proj"] == "row"
    assert s["layers.0.mlp.gate_proj"] == s["layers.0.mlp.up_proj"] == "column"
    assert s["layers.0.mlp.down_proj"] == "row"
    assert s["embed_tokens"] == "vocab" and s["lm_head"] == "column"
    assert plan.collective_counts() == {"bwd all_reduce": 5, "fwd all_gather": 1, "fwd all_reduce": 5}


def test_gqa_with_fewer_kv_heads_than_ranks_replicates_kv_heads_and_says_so() -> None:
    model, args = models.build("llama", n_head=4, n_kv_head=2)
    plan = tpshard.plan(model, 4, example_inputs=args)
    kp = plan.modules["layers.0.self_attn.k_proj"]
    assert kp.style == "column" and kp.reason.startswith("kv heads replicated 2-fold"), kp.reason
    assert plan.params["layers.0.self_attn.k_proj.weight"].replicas == 2
    assert plan.grads["layers.0.self_attn.k_proj.weight"] == GRAD_REPLICAS
    assert plan.modules["layers.0.self_attn.q_proj"].style == "column"
    # In-place plans keep k/v whole and say why (tests/test_kv_replicas.py covers the rest).
    kept = make_plan(*_gm_ops(model, args), 4, kv_replicas=False).modules["layers.0.self_attn.k_proj"]
    assert kept.style == "replicate" and kept.reason.startswith("kept whole because")
    assert "not divisible by the world size 4" in kept.reason


def _gm_ops(model: torch.nn.Module, args: tuple) -> tuple:
    from tpshard.compiler import capture

    c = capture(model, args)
    return c.gm, c.ops


def test_json_round_trip_is_exact() -> None:
    model, args = models.build("gpt")
    plan = tpshard.plan(model, 4, example_inputs=args)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_explain_table() -> None:
    model, args = models.build("gpt")
    text = tpshard.plan(model, 2, example_inputs=args).explain()
    header = text.splitlines()[0].split()
    assert header == ["module", "style", "split", "params/rank", "collectives", "why"]
    assert "h.0.attn.c_attn" in text and "dim 0 [32, 32, 32]" in text
    assert "fwd all_reduce x1" in text and "world size 2:" in text


def test_world_size_not_dividing_heads_is_refused_at_plan_time() -> None:
    model, args = models.build("gpt")  # 4 heads
    with pytest.raises(PlanError) as e:
        tpshard.plan(model, 8, example_inputs=args)
    msg = str(e.value)
    assert "h.0.attn.c_attn" in msg and "not divisible by the world size 8" in msg and "[1, 2, 4]" in msg


def test_world_size_not_dividing_mlp_hidden_is_refused() -> None:
    mlp = models.mlp(16, (24,), 16)
    with pytest.raises(PlanError) as e:
        tpshard.plan(mlp, 5)
    msg = str(e.value)
    assert "'0'" in msg or "0:" in msg
    assert "24" in msg and "world size 5" in msg and "[1, 2, 3, 4, 6, 8, 12, 24]" in msg


def test_a_lone_output_head_that_does_not_divide_is_kept_whole() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = tpshard.plan(mlp, 2)
    assert _styles(plan) == {"0": "column", "2": "row", "4": "replicate"}
    assert "not divisible" in plan.modules["4"].reason


def test_untraceable_model_names_module_and_operation() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a tensor value
                return self.lin(x)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Inner())
    with pytest.raises(tpshard.CaptureError) as e:
        tpshard.plan(model, 2)
    msg = str(e.value)
    assert "'1'" in msg and "Inner" in msg and "if x.sum() > 0" in msg and "example_inputs" in msg
    # With inputs, the torch.export fallback is tried too; its failure is reported beside.
    with pytest.raises(tpshard.CaptureError) as e:
        tpshard.plan(model, 2, example_inputs=(torch.randn(2, 4),))
    assert "'1'" in str(e.value) and "torch.export failed too" in str(e.value)


def test_parallelize_without_a_job_explains_torchrun() -> None:
    mlp = models.mlp()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        tpshard.parallelize(mlp, 2)


def test_inputs_are_inferred_or_asked_for() -> None:
    model, _ = models.build("gpt")
    tpshard.plan(model, 2)  # ids inferred from the first nn.Embedding

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + y

    with pytest.raises(tpshard.CaptureError, match="pass example_inputs"):
        tpshard.plan(TwoInputs(), 2)


def test_overrides_are_applied_and_validated() -> None:
    model, args = models.build("gpt")
    p = tpshard.plan(model, 2, example_inputs=args, overrides={"h.*.mlp.c_fc": "replicate"})
    s = _styles(p)
    assert s["h.0.mlp.c_fc"] == "replicate" and s["h.1.mlp.c_fc"] == "replicate"
    assert s["h.0.attn.c_attn"] == "column"
    with pytest.raises(PlanError, match="matches no linear"):
        tpshard.plan(model, 2, example_inputs=args, overrides={"h.*.ln_1": "column"})
    with pytest.raises(PlanError, match="lm_head"):
        tpshard.plan(model, 2, example_inputs=args, overrides={"lm_head": "row"})
    with pytest.raises(PlanError, match="unknown style"):
        tpshard.plan(model, 2, example_inputs=args, overrides={"lm_head": "diagonal"})
    p = tpshard.plan(model, 2, example_inputs=args, overrides={"wte": "embed_dim", "lm_head": "replicate"})
    assert _styles(p)["wte"] == "embed_dim"


def test_meta_model_is_planned_and_rewritten_without_memory() -> None:
    model, args = models.build("llama", device="meta", hidden_size=256, intermediate_size=512, n_head=8, n_kv_head=4)
    plan = tpshard.plan(model, 4, example_inputs=args)
    rank1 = tpshard.parallelize(model, 4, example_inputs=args, plan=plan, group=tpshard.OfflineGroup(1, 4))
    assert all(p.is_meta for p in rank1.parameters())
    assert rank1.get_parameter("layers.0.self_attn.q_proj.weight").shape == (64, 256)
    assert rank1.get_parameter("layers.0.mlp.down_proj.weight").shape == (256, 128)
    # state_dict keys are the original's (local shapes)
    assert set(rank1.state_dict()) == set(model.state_dict())


def test_original_is_not_mutated_and_names_are_kept() -> None:
    model, args = models.build("gpt", dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rank0 = tpshard.parallelize(model, 2, example_inputs=args, group=tpshard.OfflineGroup(0, 2))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(rank0.state_dict()) == set(model.state_dict())
    assert rank0.get_parameter("lm_head.weight") is rank0.get_parameter("wte.weight")
    w = model.get_parameter("h.0.mlp.c_fc.weight")
    assert torch.equal(rank0.get_parameter("h.0.mlp.c_fc.weight"), w[: w.shape[0] // 2])


def test_overrides_are_recorded_in_the_plan_and_cannot_be_passed_twice() -> None:
    model, args = models.build("gpt")
    p = tpshard.plan(model, 2, example_inputs=args, overrides={"lm_head": "column_no_gather"})
    assert p.overrides == {"lm_head": "column_no_gather"}
    assert Plan.from_json(p.to_json()).overrides == p.overrides
    assert "overrides: lm_head=column_no_gather" in p.explain()
    assert tpshard.plan(model, 2, example_inputs=args).overrides == {}
    with pytest.raises(PlanError, match="either plan= or overrides="):
        tpshard.parallelize(model, 2, example_inputs=args, plan=p, overrides={"lm_head": "replicate"},
                            group=tpshard.OfflineGroup(0, 2))
