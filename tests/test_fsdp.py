"""Tensor parallel composes with FSDP2: ``fully_shard`` on the "dp" dim of a 2-D (dp, tp) mesh
over a tpshard-sharded model. Four gloo ranks (2-way data parallel x 2-way tensor parallel),
three AdamW steps, each data-parallel rank on its half of the global batch; the losses and the
parameters after every step equal the unsharded model trained on the whole batch, in float64."""

from __future__ import annotations

import copy

import pytest
import torch

import tpshard
from tpshard import models
from tpshard.verify.launch import run_ranks

STEPS = 3
RTOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _body(rank: int, world: int, name: str, sequence_parallel: bool = False) -> dict:
    from torch.distributed.fsdp import fully_shard

    mesh = tpshard.init_parallelism(2)
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    torch.manual_seed(0)
    model, (ids,) = models.build(name, dtype=torch.float64, batch=4)
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, 2, example_inputs=(ids,), sequence_parallel=sequence_parallel)
    plan = sharded.tpshard_plan
    fully_shard(sharded, mesh=mesh["dp"])
    # eps bounds Adam's amplification of rounding noise: the key bias's gradient is exactly zero
    # in exact arithmetic (softmax ignores a per-row constant), so its elements are ~1e-17 of
    # noise that m / (sqrt(v) + eps) would turn into a full lr-sized step with the default 1e-8.
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-4)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-4)
    gen = torch.Generator().manual_seed(5)
    errors: dict[str, float] = {}
    vocab = ref.lm_head.out_features
    for step in range(STEPS):
        batch = torch.randint(0, vocab, (4, 8), generator=gen)
        target = torch.randint(0, vocab, (4, 8), generator=gen)
        local = slice(2 * dp, 2 * dp + 2)  # this data-parallel rank's half of the global batch
        logits = sharded(batch[local])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[local].flatten())
        loss.backward()  # FSDP averages the gradients over dp: the global batch's mean loss
        opt.step()
        opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(batch).flatten(0, 1), target.flatten())
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss, group=mesh["dp"].get_group())
        errors[f"loss {step}"] = _rel(global_loss / 2, ref_loss.detach())
    ref_params = dict(ref.named_parameters())
    for pname, p in sharded.named_parameters():  # DTensors over dp holding this tp rank's shard
        full_tp_shard = p.full_tensor().detach()
        expect = plan.params[pname].shard(ref_params[pname].detach(), tp, 2)
        errors[f"param {pname}"] = _rel(full_tp_shard, expect)
    return {"errors": errors, "split": sum(not s.replicated for s in plan.params.values())}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,sequence_parallel", [("gpt", False), ("llama", True)])
def test_fsdp2_on_the_dp_dim_of_a_tp_sharded_model(name: str, sequence_parallel: bool) -> None:
    results = run_ranks(_body, 4, name, sequence_parallel, timeout=280)
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
        assert not bad, f"rank {rank}: {bad}"
        assert r["split"] > 0
