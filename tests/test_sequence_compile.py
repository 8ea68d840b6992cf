"""``torch.compile`` of a sequence-parallel model: one graph (``fullgraph=True``: a graph break is
an error), forward and backward equal the original's on real gloo ranks, float64."""

from __future__ import annotations

import copy

import pytest
import torch

import tpshard
from tpshard import models
from tpshard.verify.launch import run_ranks

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-4))


def _body(rank: int, world: int, name: str) -> dict:
    model, (ids,) = models.build(name, dtype=DT, batch=2, n_layer=1)
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=(ids,), sequence_parallel=True)
    plan = sharded.tpshard_plan
    compiled = torch.compile(sharded, fullgraph=True, backend="aot_eager")
    out, ref_out = compiled(ids), ref(ids)
    w = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    errors = {"output": _rel(out, ref_out)}
    refp = dict(ref.named_parameters(remove_duplicate=False))
    for pname, p in sharded.named_parameters():
        errors[f"grad {pname}"] = _rel(p.grad, plan.params[pname].shard(refp[pname].grad, rank, world))
    return errors


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["llama"])
def test_compiled_sequence_parallel_has_no_graph_breaks(name: str) -> None:
    results = run_ranks(_body, 2, name, timeout=380)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"
