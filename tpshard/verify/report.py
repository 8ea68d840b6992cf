"""What :func:`tpshard.verify` found: :class:`VerifyReport`, its table and its JSON summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from tpshard.plan import Plan
from tpshard.verify.compare import Comparison

__all__ = ["VerifyReport"]


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` only when every comparison passed.

    ``print(report)`` shows a table: each compared tensor, its max abs / rel error, the
    tolerance and pass/FAIL; then the collectives, the notes and, on a mismatch, the per-module
    comparison that names ``first_divergence``.
    """

    model: str
    world_size: int
    device: str
    dtype: str
    backend: str
    comparisons: list[Comparison] = field(default_factory=list)
    modules: list[Comparison] = field(default_factory=list)  # per-module outputs (on a mismatch)
    first_divergence: str | None = None
    divergence: str = ""
    collectives: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None
    seconds: float = 0.0
    tolerance: dict[str, Any] = field(default_factory=dict)  # how tolerances were set

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    def max_rel(self, kind: str | None = None) -> float:
        """The largest relative error over the comparisons (of one ``kind``: output, input grad,
        grad, step, second forward)."""
        rels = [c.max_rel for c in self.comparisons if kind is None or c.kind == kind]
        return max(rels, default=0.0)

    def tolerance_used(self, kind: str | None = None) -> float:
        """The largest ``max_abs / tol`` over the comparisons (of one ``kind``): how much of its
        tolerance the worst tensor used (below 1 passes)."""
        used = [_used(c) for c in self.comparisons if kind is None or c.kind == kind]
        return max(used, default=0.0)

    def collective_counts(self, phase: str = "forward") -> dict[str, int]:
        """``{"all_reduce": 5, ...}`` for ``phase`` "forward" or "backward"."""
        return {k: v["count"] for k, v in self.collectives.get(phase, {}).items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no plan, no per-tensor rows beyond the failures)."""
        kinds = sorted({c.kind for c in self.comparisons})
        return {
            "model": self.model, "world_size": self.world_size, "device": self.device, "dtype": self.dtype,
            "backend": self.backend, "ok": self.ok, "checks": len(self.comparisons),
            "failed": [c.name for c in self.failures],
            "max_rel": {k: _finite(self.max_rel(k)) for k in kinds},
            "tolerance_used": {k: _finite(self.tolerance_used(k)) for k in kinds},
            "tolerance": self.tolerance,
            "first_divergence": self.first_divergence, "collectives": self.collectives,
            "notes": self.notes, "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        """The report as text (what ``print(report)`` shows)."""
        verdict = "EQUIVALENT" if self.ok else "NOT EQUIVALENT"
        passed = sum(c.passed for c in self.comparisons)
        lines = [f"tpshard verify {self.model}: world size {self.world_size}, {self.device}, {self.dtype}, "
                 f"{self.backend} -> {verdict} ({passed} of {len(self.comparisons)} checks pass, "
                 f"{self.seconds:.1f} s)"]
        lines += _rows(self.comparisons)
        lines.append("collectives per rank: " + _format_collectives(self.collectives))
        lines += [f"note: {n}" for n in self.notes]
        if not self.ok:
            if self.modules:
                lines.append("per-module forward outputs, in execution order:")
                first = next((i for i, c in enumerate(self.modules) if not c.passed), len(self.modules))
                shown = self.modules[:first + 4]  # up to the first divergence, and a few after
                lines += ["  " + r for r in _rows(shown, "module")]
                if len(self.modules) > len(shown):
                    lines.append(f"  ... {len(self.modules) - len(shown)} more modules")
            where = self.first_divergence or "no single module"
            lines.append(f"first divergence: {where}" + (f" ({self.divergence})" if self.divergence else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _used(c: Comparison) -> float:
    if c.max_abs == 0:
        return 0.0
    return c.max_abs / c.tol if c.tol > 0 else math.inf


def _rows(comps: Sequence[Comparison], header: str = "check") -> list[str]:
    rows = [(header, "max abs", "max rel", "tolerance", "pass", "basis")]
    for c in comps:
        tol = f"{c.tol:.2e}" if math.isfinite(c.tol) else f"rtol {c.rtol:.0e} atol {c.atol:.0e}"
        note = "; ".join(x for x in (c.basis, c.note) if x)
        rows.append((c.name, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", tol, "ok" if c.passed else "FAIL", note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows]


def _format_collectives(coll: dict[str, dict[str, dict[str, int]]]) -> str:
    parts = []
    for phase in ("forward", "backward"):
        kinds = coll.get(phase, {})
        body = ", ".join(f"{k} x{v['count']} ({_bytes(v['bytes'])})" for k, v in sorted(kinds.items())) or "none"
        parts.append(f"{phase}: {body}")
    return "; ".join(parts)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
