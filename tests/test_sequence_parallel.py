"""Sequence parallelism (``sequence_parallel=True``): the residual stream between blocks is split
along the sequence dim; each row linear's all-reduce becomes a reduce-scatter and each column
linear's input is all-gathered first.

On real gloo ranks, float64, the reference GPT and Llama and Hugging Face Llama: outputs, every
gradient, an SGD step and a second forward with another batch and sequence length equal the
original's; the collectives issued are the plan's, with reduce-scatters and all-gathers in place
of the all-reduces; norm weights used on sequence shards get their gradients all-reduced.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import tpshard
from tpshard import models
from tpshard.plan import GRAD_ALL_REDUCE, PlanError
from tpshard.verify.launch import run_ranks

from _dist import comm_counts, step_errors

RTOL = 1e-10
DT = torch.float64
N_LAYER = 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-4))


def _hf_llama() -> torch.nn.Module:
    import transformers as tf
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                               vocab_size=64, num_hidden_layers=N_LAYER, num_attention_heads=4,
                                               max_position_embeddings=64))
    model = model.double().eval()
    models.randomize_(model)
    return model


def _build(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    if name == "hf_llama":
        ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
        return _hf_llama(), (ids,), {"use_cache": False}
    model, inputs = models.build(name, dtype=DT, batch=3, n_layer=N_LAYER)
    return model, inputs, {}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _check(name: str, rank: int, world: int) -> dict:
    model, inputs, kw = _build(name)
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=inputs, example_kwargs=kw, sequence_parallel=True)
    plan = sharded.tpshard_plan
    errors, fwd, bwd = step_errors(sharded, ref, lambda m: _logits(m(*inputs, **kw)), plan, rank, world, rel=_rel)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    # Another batch size and sequence length (any multiple of the world size).
    vocab = ref_params[next(iter(ref_params))].shape[0] if name == "hf_llama" else 64
    ids2 = torch.randint(0, min(vocab, 64), (2, 4 * world), generator=torch.Generator().manual_seed(3))
    errors["second forward"] = _rel(_logits(sharded(ids2, **kw)), _logits(ref(ids2, **kw)))
    try:
        sharded(torch.zeros(2, 4 * world + 1, dtype=torch.long), **kw)
        odd = "no error"
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        odd = str(e)
    return {"errors": errors, "fwd": comm_counts(fwd), "bwd": comm_counts(bwd), "plan": plan.collective_counts(),
            "grads": dict(plan.grads), "sequence": dict(plan.sequence), "odd": odd}


def _body(rank: int, world: int, names: list[str]) -> list[dict]:
    return [_check(n, rank, world) for n in names]


NAMES = ["gpt", "llama", "hf_llama"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_original(world: int) -> None:
    pytest.importorskip("transformers")
    results = run_ranks(_body, world, NAMES, timeout=380)
    for rank, rank_results in enumerate(results):
        for name, r in zip(NAMES, rank_results):
            bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
            assert not bad, f"{name} world {world} rank {rank}: {bad}"
            assert "multiple of the world size" in r["odd"], r["odd"]
    for name, r in zip(NAMES, results[0]):
        # Per block: reduce-scatter + all-gather in place of each all-reduce (2 blocks x 2, plus the
        # embedding's reduce-scatter and the final norm's all-gather); forward, no all-reduce at all.
        blocks = 2 * N_LAYER
        assert r["fwd"] == {"reduce_scatter": blocks + 1, "all_gather": blocks + 2}, (name, r["fwd"])
        # Backward: each all-gather's reduce-scatter and back; norm weights' gradients all-reduced.
        norms = 2 * N_LAYER + 1
        assert r["bwd"].get("reduce_scatter") == blocks + 1, (name, r["bwd"])
        assert r["bwd"].get("all_gather") == blocks + 1, (name, r["bwd"])
        # (2 kv heads over 4 ranks: replicated, k's and v's gradients all-reduced in a subgroup)
        kv_replicated = 2 * N_LAYER if world == 4 and name != "gpt" else 0
        assert r["bwd"].get("all_reduce", 0) >= norms + kv_replicated, (name, r["bwd"])
        planned = {k.split()[1]: 0 for k in r["plan"]}
        for k, v in r["plan"].items():
            planned[k.split()[1]] += v
        issued = {k: r["fwd"].get(k, 0) + r["bwd"].get(k, 0) for k in planned}
        assert issued == planned, (name, issued, r["plan"])
        assert r["sequence"]["dim"] == 1 and "seq" in r["sequence"]["why"]
        norm_grads = [k for k in r["grads"] if "norm" in k or ".ln_" in k or k.startswith("ln_f")]
        assert norm_grads and all(r["grads"][k] == GRAD_ALL_REDUCE for k in norm_grads), r["grads"]


def test_default_plan_unchanged() -> None:
    model, inputs = models.build("llama", dtype=DT, batch=3)
    default = tpshard.plan(model, 2, example_inputs=inputs)
    assert "sequence" not in default.to_dict() and default.sequence == {}
    assert all(e.kind in ("reduce", "copy", "gather", "shape", "skip_add") for e in default.edits)
    sp = tpshard.plan(model, 2, example_inputs=inputs, sequence_parallel=True)
    assert tpshard.Plan.from_json(sp.to_json()) == sp
    assert "sequence parallel: dim 1" in sp.explain()
    kinds = {e.kind for e in sp.edits}
    assert {"reduce_scatter", "all_gather_seq"} <= kinds and "reduce" not in kinds
    # Bytes moved are the same: every all-reduce is a reduce-scatter plus an all-gather.
    c, d = sp.collective_counts(), default.collective_counts()
    assert c["fwd reduce_scatter"] == d["fwd all_reduce"]


def test_sequence_not_divisible_names_the_input() -> None:
    model, inputs = models.build("gpt", dtype=DT, batch=3, seq=6)
    with pytest.raises(PlanError, match="sequence length 6.*'idx'.*world size 4"):
        tpshard.plan(model, 4, example_inputs=inputs, sequence_parallel=True)
    with pytest.raises(PlanError, match="in place"):
        tpshard.plan(model, 2, example_inputs=inputs, sequence_parallel=True, inplace=True)


def test_cli_plan_sequence_parallel(capsys: pytest.CaptureFixture) -> None:
    from tpshard import cli
    assert cli.main(["plan", "llama", "--world-size", "2", "--sequence-parallel"]) == 0
    out = capsys.readouterr().out
    assert "fwd reduce_scatter" in out and "sequence parallel: dim 1" in out
