"""Helpers shared by the multi-rank test files (test_comm.py, test_layers_*.py, test_cross_entropy.py).

Rank bodies collect mismatches in a ``Checker`` instead of raising, so every rank runs the
same collectives and a wrong value on one rank never leaves another rank waiting. A ``Suite``
runs a file's checks once per world size (one ``run_ranks`` launch) and caches the results
for the tests that report them. Imported by the test modules in the pytest process, so
forked ranks inherit it (and everything it imports).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

# Imported here, not in the ranks: forked ranks inherit it (importing it in a rank costs ~1 s).
from torch.distributed.tensor.debug import CommDebugMode

from tpshard.verify.launch import run_ranks

DT = torch.float64
WORLDS = [1, 2, 4]  # world sizes the layer suites run on


def comm_counts(mode: CommDebugMode) -> dict[str, int]:
    """Collective counts by kind ("all_reduce", "all_gather", "reduce_scatter").

    ``get_comm_counts()`` keys are c10d ops (``torch.ops.c10d.allreduce_``,
    ``torch.ops.c10d._allgather_base_``, ``torch.ops.c10d._reduce_scatter_base_``, ...);
    classifying by name keeps the tests valid if comm.py switches to another variant.
    """
    out: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        name = str(op).replace("_", "")
        if "allreduce" in name:
            kind = "all_reduce"
        elif "allgather" in name:
            kind = "all_gather"
        elif "reducescatter" in name:
            kind = "reduce_scatter"
        else:
            kind = str(op)
        if n:
            out[kind] = out.get(kind, 0) + n
    return out


class Checker:
    """Collects mismatches instead of raising, so every rank runs the same collectives."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.failures: list[str] = []

    def close(self, what: str, actual: Any, expected: Any, tol: float = 1e-10) -> None:
        try:
            torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
        except AssertionError as e:
            self.failures.append(f"{self.prefix}{what}: {e}")

    def equal(self, what: str, actual: Any, expected: Any) -> None:
        if actual != expected:
            self.failures.append(f"{self.prefix}{what}: {actual!r} != {expected!r}")

    def true(self, what: str, cond: bool) -> None:
        if not cond:
            self.failures.append(f"{self.prefix}{what}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_counts(world: int, **expected: int) -> dict[str, int]:
    """Expected collective counts: none at all on one rank."""
    return {k: v for k, v in expected.items() if v} if world > 1 else {}


# ---------------------------------------------------------------------------------------------
# Reference modules (the same values on every rank).


def ref_linear(g: torch.Generator, fin: int, fout: int, bias: bool = True) -> nn.Linear:
    """An nn.Linear with random weights and a clearly non-zero bias (same on every rank)."""
    lin = nn.Linear(fin, fout, bias=bias, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(fout, fin, generator=g, dtype=DT))
        if bias:
            lin.bias.copy_(torch.randn(fout, generator=g, dtype=DT) + 2.0)
    return lin


def ref_embedding(g: torch.Generator, num: int, dim: int, scale: float = 1.0, **kw: Any) -> nn.Embedding:
    emb = nn.Embedding(num, dim, dtype=DT, **kw)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(num, dim, generator=g, dtype=DT) * scale)
    return emb


# ---------------------------------------------------------------------------------------------
# Suites: a file's rank checks, run once per world size.

Check = Callable[[int, int, Checker], None]  # check(rank, world, ck)


def run_checks(rank: int, world: int, checks: tuple[tuple[str, Check], ...]) -> dict[str, list[str]]:
    """Rank body: run each named check with a fresh Checker; return the failures by name."""
    results = {}
    for name, check in checks:
        ck = Checker()
        check(rank, world, ck)
        results[name] = ck.failures
    return results


class Suite:
    """Named checks (module-level functions) run together in one launch per world size."""

    def __init__(self, *checks: tuple[str, Check]) -> None:
        self.checks = checks
        self._cache: dict[int, list[dict[str, list[str]]]] = {}

    def report(self, world: int, name: str) -> None:
        """Assert check ``name`` passed on ``world`` ranks (the launch runs once, on first use)."""
        if world not in self._cache:
            self._cache[world] = run_ranks(run_checks, world, self.checks, timeout=60)
        failures = [f"rank {r}: {f}" for r, res in enumerate(self._cache[world]) for f in res[name]]
        assert not failures, "\n".join(failures[:30])


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def randomize_(model: nn.Module) -> None:
    """No all-equal values: a zero bias or a unit norm weight hides a wrong shard."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def step_errors(sharded: nn.Module, ref: nn.Module, run: Callable[[nn.Module], torch.Tensor], plan: Any,
                rank: int, world: int, rel: Callable[[torch.Tensor, torch.Tensor], float] = rel_error,
                counter: Callable[[], Any] = CommDebugMode) -> tuple[dict[str, float], Any, Any]:
    """One training step of ``sharded`` against ``ref`` (a deep copy of the original), both
    called as ``run(model)`` (a tensor: the output, or its logits): the output, every parameter
    gradient and every parameter after an SGD step, each against the plan's shard of the
    reference's. Returns (errors, the forward's counter, the backward's counter)."""
    with counter() as fwd:
        out = run(sharded)
    ref_out = run(ref)
    w = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    with counter() as bwd:
        (out * w).sum().backward()
    (ref_out * w).sum().backward()
    errors = {"output": rel(out.detach(), ref_out.detach())}
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for name, p in sharded.named_parameters():
        errors[f"grad {name}"] = rel(p.grad, plan.params[name].shard(ref_params[name].grad, rank, world))
    torch.optim.SGD(sharded.parameters(), lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for name, p in sharded.named_parameters():
        errors[f"step {name}"] = rel(p.detach(), plan.params[name].shard(ref_params[name].detach(), rank, world))
    return errors, fwd, bwd


def training_step_errors(model: nn.Module, shape: tuple, rank: int, world: int) -> tuple[dict, Any, Any, int]:
    """Shard ``model`` (float64, randomized) and compare one training step with a deep copy:
    output, input gradient, every parameter gradient (through the plan), parameters after an
    SGD step, and a second forward at batch 5. Returns (errors, sharded, reference, collectives
    issued in the forward and backward)."""
    import tpshard  # (imported by the caller's ranks anyway)

    model = model.to(DT)
    randomize_(model)
    ref = copy.deepcopy(model)
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    sharded = tpshard.parallelize(model, world, example_inputs=(x,))
    plan = sharded.tpshard_plan
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with CommDebugMode() as mode:
        out = sharded(xs)
        w = torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
        (out * w).sum().backward()
    ref_out = ref(xr)
    (ref_out * w).sum().backward()
    errors = {"output": rel_error(out, ref_out), "grad input": rel_error(xs.grad, xr.grad)}
    ref_params = dict(ref.named_parameters())
    for pname, p in sharded.named_parameters():
        errors[f"grad {pname}"] = rel_error(p.grad, plan.params[pname].shard(ref_params[pname].grad, rank, world))
    torch.optim.SGD(sharded.parameters(), lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for pname, p in sharded.named_parameters():
        expect = plan.params[pname].shard(ref_params[pname].detach(), rank, world)
        errors[f"step {pname}"] = rel_error(p.detach(), expect)
    x2 = torch.randn((5, *shape[1:]), dtype=DT, generator=torch.Generator().manual_seed(3))
    errors["second forward"] = rel_error(sharded(x2), ref(x2))
    return errors, sharded, ref, mode.get_total_counts()
