"""Helpers shared by the multi-rank test files (test_comm.py, test_layers_*.py, test_cross_entropy.py).

Rank bodies collect mismatches in a ``Checker`` instead of raising, so every rank runs the
same collectives and a wrong value on one rank never leaves another rank waiting. A ``Suite``
runs a file's checks once per world size (one ``run_ranks`` launch) and caches the results
for the tests that report them. Imported by the test modules in the pytest process, so
forked ranks inherit it (and everything it imports).
"""

from __future__ import annotations

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
