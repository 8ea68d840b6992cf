"""Grouped-query attention with fewer kv heads than ranks: kv heads replicated per rank.

Query heads split contiguously; rank r holds only kv head r // (W/K); the ranks holding one
kv head all-reduce its projection's gradient in a subgroup. Checked in float64 on real gloo
ranks against a deep copy: outputs, every gradient, an SGD step, a second forward at other
sizes, the collectives (CommDebugMode) against the plan's counts — and the gradient check is
shown to fail with the subgroup all-reduce removed from the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

import tpshard
from tpshard import models
from tpshard.comm import OfflineGroup
from tpshard.models.registry import build
from tpshard.plan import GRAD_REPLICAS, GRAD_WHOLE, ParamShard, Plan
from tpshard.subgroups import replica_group, replica_ranks
from tpshard.models.llama import LlamaBlock, LlamaConfig, rotary_tables
from tpshard.verify.launch import run_ranks

from _dist import step_errors, training_step_errors

DT = torch.float64
TOL = 1e-10
# Qwen3RMSNorm computes in float32 (it upcasts its input). With replicated kv heads each replica's
# *partial* gradient of k (from its own query heads) passes back through k_norm's float32 casts
# before the subgroup sum, so Qwen3's gradients carry float32 rounding (~5e-8 measured); with that
# norm computing in float64 instead the same run agrees to 2e-15.
TOL_FLOAT32_NORM = 1e-6


def _llama(n_head: int, n_kv_head: int, hidden: int = 64, layers: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    model, (idx,) = build("llama", dtype=DT, n_head=n_head, n_kv_head=n_kv_head, hidden_size=hidden,
                          n_layer=layers, batch=3, seq=8, seed=0)
    models.randomize_(model)
    return model, idx


def _hf(kind: str, kv: int) -> torch.nn.Module:
    tf = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    common = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                  hidden_size=32, intermediate_size=64, num_key_value_heads=kv)
    if kind == "qwen3":  # per-head k_norm on the replicated kv heads
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common))
    elif kind == "qwen2":  # k/v projections with biases: the bias rows are replicated too
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    model = model.double().eval()
    models.randomize_(model)
    return model


# -- the plan (no ranks) -----------------------------------------------------------------------

def test_plan_replicates_kv_heads_and_fraction() -> None:
    """8 query heads, 2 kv heads, 4 ranks: each rank holds one kv head; 0.261 of the parameters
    per rank instead of 0.285 with k/v kept whole."""
    model, idx = _llama(8, 2, hidden=64, layers=2)
    p = tpshard.plan(model, 4, example_inputs=(idx,))
    k = p.params["layers.0.self_attn.k_proj.weight"]
    assert (k.dim, k.replicas, k.local_shape(4)) == (0, 2, (8, 64))
    assert p.grads["layers.0.self_attn.k_proj.weight"] == GRAD_REPLICAS
    assert p.modules["layers.0.self_attn.v_proj"].reason.startswith("kv heads replicated 2-fold")
    assert p.modules["layers.0.self_attn.k_proj"].collectives == {"bwd all_reduce": 1}
    # The shape literals: kv heads 2 -> 1, repeat_kv's n_rep 4 -> 2, the heads 8 -> 2.
    shapes = {(e.node, e.dim): e.size for e in p.edits if e.kind == "shape"}
    assert shapes[("view_1", 2)] == 1 and shapes[("expand", 1)] == 1 and shapes[("expand", 2)] == 2
    assert shapes[("reshape", 1)] == 2
    assert not [e for e in p.edits if e.kind == "scatter"]
    per_rank, full = p.param_counts()
    assert round(per_rank / full, 3) == 0.287
    kept = tpshard.compiler.make_plan(*_captured(model, idx), 4, kv_replicas=False)  # the old layout
    assert round(kept.param_counts()[0] / full, 3) == 0.325
    assert "kv heads replicated 2-fold" in p.explain()
    assert Plan.from_json(p.to_json()) == p and '"format_version": 2' in p.to_json()


def _captured(model: torch.nn.Module, idx: torch.Tensor) -> tuple:
    c = tpshard.compiler.capture(model, (idx,))
    return c.gm, c.ops


def test_fraction_of_the_issue() -> None:
    """The issue's example, a Llama with 8 heads and 2 kv heads at 4 ranks: the parameters each
    rank's module holds, counted on the modules themselves, against k/v kept whole."""
    model, (idx,) = build("llama", n_head=8, n_kv_head=2, hidden_size=256, intermediate_size=512, n_layer=2,
                          vocab_size=256, batch=2, seq=8)
    full = sum(p.numel() for p in model.parameters())
    kept = tpshard.compiler.make_plan(*_captured(model, idx), 4, kv_replicas=False)
    local = []
    for r in range(4):
        m = tpshard.parallelize(model, 4, example_inputs=(idx,), group=OfflineGroup(r, 4))
        local.append(sum(p.numel() for p in m.parameters()))
    fractions = [n / full for n in local]
    kept_m = tpshard.parallelize(model, 4, example_inputs=(idx,), group=OfflineGroup(0, 4), plan=kept)
    kept_fraction = sum(p.numel() for p in kept_m.parameters()) / full
    assert [round(f, 3) for f in fractions] == [0.264] * 4 and round(kept_fraction, 3) == 0.290, (
        fractions, kept_fraction)
    per_rank, whole = m.tpshard_plan.param_counts()  # the plan's own count agrees (the rotary buffers aside)
    assert (per_rank - 2 * 64 * 32, whole - 2 * 64 * 32) == (local[0], full)


def test_kept_whole_where_replication_is_not_exact() -> None:
    # 3 kv heads over 2 ranks: rank 0's 3 query heads use kv heads 0 and 1 (not a multiple).
    model, idx = _llama(6, 3, hidden=48, layers=1)
    p = tpshard.plan(model, 2, example_inputs=(idx,))
    m = p.modules["layers.0.self_attn.k_proj"]
    assert m.style == "replicate" and m.reason.startswith("kept whole because the world size 2 is not a multiple "
                                                          "of its 3 kv heads"), m.reason
    assert p.params["layers.0.self_attn.k_proj.weight"].replicas == 1
    assert "kept whole because" in p.explain()
    # In-place plans keep them whole too, and say so (then refuse: the slices need the graph).
    model, idx = _llama(8, 2)
    with pytest.raises(tpshard.PlanError, match="kv heads"):
        tpshard.plan(model, 4, example_inputs=(idx,), inplace=True)
    kept = tpshard.compiler.make_plan(*_captured(model, idx), 4, kv_replicas=False)
    assert kept.modules["layers.0.self_attn.k_proj"].reason.startswith("kept whole because replicated kv heads "
                                                                       "need the graph")
    assert kept.grads["layers.0.self_attn.k_proj.weight"] == GRAD_WHOLE


def test_param_shard_replicas_round_trip_and_old_plans() -> None:
    s = ParamShard(shape=(8, 3), dim=0, replicas=2)
    full = torch.arange(24.0).view(8, 3)
    shards = [s.shard(full, r, 4) for r in range(4)]
    assert torch.equal(shards[0], shards[1]) and torch.equal(shards[2], full[4:])
    assert torch.equal(s.unshard(shards), full) and s.local_shape(4) == (4, 3)
    p = Plan(world_size=4, params={"k": s, "q": ParamShard(shape=(8, 3), dim=0)})
    assert Plan.from_json(p.to_json()) == p
    d = p.to_dict()
    assert d["format_version"] == 2 and "replicas" not in d["params"]["q"]
    old = {"world_size": 2, "modules": {}, "edits": [],
           "params": {"w": {"shape": [4, 2], "dim": 0, "segments": None}}}  # written before replicas
    assert Plan.from_dict(old).params["w"].replicas == 1
    assert Plan(world_size=2, params={"w": ParamShard((4, 2), 0)}).to_dict()["format_version"] == 1
    with pytest.raises(ValueError, match="does not divide"):
        ParamShard(shape=(8,), dim=0, replicas=3).local_shape(4)


def test_replica_groups_offline() -> None:
    assert replica_ranks(4, 2, 1) == [0, 1] and replica_ranks(4, 2, 2) == [2, 3]
    g = replica_group(OfflineGroup(2, 4), 2)
    assert (g.rank, g.size) == (0, 2)
    whole = OfflineGroup(1, 2)
    assert replica_group(whole, 2) is whole


def test_export_names_replication_unsupported() -> None:
    model, idx = _llama(8, 2)
    ex = tpshard.plan(model, 4, example_inputs=(idx,)).to_hf_tp_plan(strict=False)
    assert any("kv heads replicated 2-fold" in u for u in ex.unsupported)


def test_offline_rank_modules_hold_their_kv_head() -> None:
    model, idx = _llama(8, 2)
    for r in range(4):
        m = tpshard.parallelize(model, 4, example_inputs=(idx,), group=OfflineGroup(r, 4))
        k = m.get_submodule("layers.0.self_attn.k_proj")
        head = r // 2
        assert torch.equal(k.weight, model.layers[0].self_attn.k_proj.weight[head * 8:(head + 1) * 8])


# -- real ranks ---------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-4))


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _step(model: torch.nn.Module, ids: torch.Tensor, ids2: torch.Tensor, kw: dict, rank: int, world: int,
          plan: Plan | None = None, sequence_parallel: bool = False) -> dict:
    """One training step of the sharded model against a deep copy: errors and collectives."""
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=(ids,), example_kwargs=kw, plan=plan,
                                  sequence_parallel=sequence_parallel)
    plan = sharded.tpshard_plan
    errors, fwd, bwd = step_errors(sharded, ref, lambda m: _logits(m(ids, **kw)), plan, rank, world, rel=_rel)
    errors["second forward"] = _rel(_logits(sharded(ids2, **kw)), _logits(ref(ids2, **kw)))
    counts = plan.collective_counts()
    return {"errors": errors, "fwd": fwd.get_total_counts(), "bwd": bwd.get_total_counts(),
            "bwd_all_reduce": bwd.get_comm_counts().get(torch.ops.c10d.allreduce_, 0),
            "plan_bwd_all_reduce": counts.get("bwd all_reduce", 0),
            "plan_total": sum(counts.values()),
            "replicas": {n: s.replicas for n, s in plan.params.items() if s.replicas > 1},
            "sequence": bool(plan.sequence)}


def _without_replica_grads(plan: Plan) -> Plan:
    return dataclasses.replace(plan, edits=[e for e in plan.edits if e.kind != "replica_grad"])


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    if name == "llama-h8-kv2":
        model, _ = _llama(8, 2)
    elif name == "llama-h4-kv1":
        model, _ = _llama(4, 1, hidden=32)
    else:
        kind, kv = name.split("-kv")
        model = _hf(kind.removeprefix("hf-"), int(kv))
    kw = {} if name.startswith("llama") else {"use_cache": False}
    ids = torch.randint(0, 64, (3, 8), generator=g)
    ids2 = torch.randint(0, 64, (2, 4 if name.startswith("llama") else 5), generator=g)
    return model, ids, ids2, kw


def _body(rank: int, world: int, names: list[str], broken: bool, seq: bool) -> dict:
    out = {}
    for name in names:
        model, ids, ids2, kw = _case(name)
        if seq:  # a sequence length the world size divides
            ids2 = ids2[:, :4]
        out[name] = _step(model, ids, ids2, kw, rank, world, sequence_parallel=seq)
        if broken:  # the same step with the subgroup all-reduce taken out of the plan: must fail
            model, ids, ids2, kw = _case(name)
            plan = tpshard.plan(model, world, example_inputs=(ids,), example_kwargs=kw)
            out[name + " (no subgroup reduce)"] = _step(model, ids, ids2, kw, rank, world,
                                                        plan=_without_replica_grads(plan))
    return out


def _check(results: list[dict], names: list[str], world: int) -> None:
    for rank, res in enumerate(results):
        for name in names:
            r = res[name]
            tol = TOL_FLOAT32_NORM if "qwen3" in name else TOL
            bad = {k: v for k, v in r["errors"].items() if not v <= tol}
            assert not bad, f"{name} rank {rank} world {world}: {bad}"
            assert r["replicas"], f"{name}: no kv heads replicated"
            assert r["bwd_all_reduce"] == r["plan_bwd_all_reduce"], (name, r)
            assert r["fwd"] + r["bwd"] == r["plan_total"], (name, r)
            broken = res.get(name + " (no subgroup reduce)")
            if broken is not None:  # the check can fail: without the subgroup reduce, k/v grads are wrong
                wrong = {k for k, v in broken["errors"].items() if v > 1e-3}
                assert wrong and all("k_proj" in k or "v_proj" in k or k == "second forward" or k.startswith("step")
                                     for k in wrong), (name, wrong)
                assert any(k.startswith("grad") and "k_proj" in k for k in wrong), (name, wrong)


@pytest.mark.timeout(400)
def test_reference_llama_w4_kv2_and_hf_on_real_ranks() -> None:
    names = ["llama-h8-kv2", "hf-llama-kv2", "hf-qwen3-kv2", "hf-qwen2-kv2"]
    results = run_ranks(_body, 4, names, True, False, timeout=380)
    _check(results, names, 4)
    r = results[0]["llama-h8-kv2"]
    # per layer: k and v one subgroup all-reduce each, on top of the usual one per block each way
    assert r["plan_bwd_all_reduce"] == 2 * 2 + 2 * 2 + 1, r
    assert "model.layers.0.self_attn.k_proj.bias" in results[0]["hf-qwen2-kv2"]["replicas"]


@pytest.mark.timeout(200)
def test_reference_llama_w2_kv1_on_real_ranks() -> None:
    names = ["llama-h4-kv1", "hf-llama-kv1"]
    results = run_ranks(_body, 2, names, True, False, timeout=180)
    _check(results, names, 2)


@pytest.mark.timeout(300)
def test_sequence_parallel_with_replicated_kv_heads() -> None:
    names = ["llama-h8-kv2", "hf-llama-kv2"]
    results = run_ranks(_body, 4, names, False, True, timeout=280)
    _check(results, names, 4)
    assert all(r[n]["sequence"] for r in results for n in names)


class _Block(torch.nn.Module):
    """One Llama block (8 heads, 2 kv heads) on a float input, so the input gradient — the sum,
    over all ranks, of each replica's part through k_proj/v_proj — is compared directly."""

    def __init__(self) -> None:
        super().__init__()
        cfg = LlamaConfig(hidden_size=64, intermediate_size=64, n_head=8, n_kv_head=2)
        self.block = LlamaBlock(cfg)
        cos, sin = rotary_tables(cfg.head_dim, 16)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        return self.block(x, self.cos.narrow(0, 0, T), self.sin.narrow(0, 0, T))


def _block_body(rank: int, world: int) -> tuple[dict, dict, int, int]:
    torch.manual_seed(0)
    errors, sharded, _, issued = training_step_errors(_Block(), (3, 8, 64), rank, world)
    plan = sharded.tpshard_plan
    reps = {n: s.replicas for n, s in plan.params.items() if s.replicas > 1}
    return errors, reps, issued, sum(plan.collective_counts().values())


@pytest.mark.timeout(120)
def test_input_gradient_through_replicated_kv_heads_is_exact() -> None:
    """Each replica's input-gradient part comes from its own query heads only, so the column copy's
    all-reduce over all ranks adds every kv head's contribution exactly once."""
    for errors, reps, issued, planned in run_ranks(_block_body, 4, timeout=100):
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad and errors["grad input"] <= TOL, bad
        assert reps == {"block.self_attn.k_proj.weight": 2, "block.self_attn.v_proj.weight": 2}
        assert issued == planned
