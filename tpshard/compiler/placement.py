"""Placements: where each value lives across the ranks, and the vocabulary of the rules.

- ``REPLICATED`` (R): every rank holds the whole value;
- :class:`Split` S(d): rank r holds its part of dim ``d``, laid out as the segments of a
  :class:`Layouts` variable (see :mod:`tpshard.layout`);
- :class:`Partial` P: every rank holds a partial sum; one all-reduce gives the value, then the
  pending replicated terms are added once;
- :class:`SplitSize`: a Python int that is the size of a split dim (only shape arguments,
  which the rewriter replaces, may consume it).

A rule (see :mod:`tpshard.compiler.analysis`) maps an op's input placements to its output placement
and what each input must be: ``SAME``, ``REPLICATED`` or a ``Split``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from tpshard import layout
from tpshard.compiler.ir import Op

__all__ = ["REPLICATED", "SAME", "Split", "Partial", "SplitSize", "Layouts", "Fail", "Decider", "check_segments",
           "replicated_output", "need_replicated", "opaque"]


REPLICATED = None


@dataclass(frozen=True)
class Split:
    dim: int
    var: int  # layout variable (Layouts)


@dataclass(frozen=True)
class Partial:
    # Replicated terms to add once after the reduce: row-bias parameter names, and "%node" for
    # a replicated value that was added to the partial sum (so P + R + P needs one reduce).
    biases: frozenset = frozenset()


@dataclass(frozen=True)
class SplitSize:
    pass


class Fail(Exception):
    """The op cannot take the placement its inputs have. ``divisibility``: only a size is off."""

    def __init__(self, op: Op, reason: str, divisibility: bool = False) -> None:
        super().__init__(f"{op.node.format_node()}: {reason}")
        self.op = op
        self.reason = reason
        self.divisibility = divisibility


class Layouts:
    """Union-find over layout variables; a variable is free (None) or pinned to segments."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.value: dict[int, tuple[int, ...] | None] = {}
        self.size: dict[int, int] = {}

    def copy(self) -> "Layouts":
        c = Layouts()
        c.parent, c.value, c.size = dict(self.parent), dict(self.value), dict(self.size)
        return c

    def new(self, size: int, value: Sequence[int] | None = None) -> int:
        v = len(self.parent)
        self.parent[v] = v
        self.size[v] = size
        self.value[v] = tuple(value) if value is not None else None
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def get(self, v: int) -> tuple[int, ...] | None:
        return self.value[self.find(v)]

    def pin(self, v: int, value: Sequence[int]) -> bool:
        """Pin ``v``; False when it is already pinned to something else."""
        r = self.find(v)
        value = tuple(value)
        if self.value[r] is None:
            self.value[r] = value
            return True
        return self.value[r] == value

    def unify(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        va, vb = self.value[ra], self.value[rb]
        if va is not None and vb is not None and va != vb:
            return False
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        self.value[ra] = va if va is not None else vb
        return True


class Decider(Protocol):
    """What the rules may ask of the planner while propagating."""

    world_size: int
    layouts: Layouts

    def linear_style(self, op: Op) -> str | None:
        """"column", "row", "replicate", or None while undecided."""

    def make_row(self, op: Op, var: int) -> None:
        """A split value reached an undecided linear's input: it becomes row-parallel."""

    def embedding_style(self, op: Op) -> str | None:
        """"vocab", "embed_dim", "replicate" or None."""

    def column_var(self, op: Op) -> int:
        """The layout variable of a column-parallel linear's output features."""

    def choose(self, op: Op, candidates: list[Any]) -> Any:
        """Pick one of several valid options (the planner may backtrack)."""


# What each input must be: SAME (take it as it is), R (replicated), or a Split.
SAME = "same"


def check_segments(d: Decider, op: Op, segments: Sequence[int], what: str) -> None:
    """Fail (a divisibility failure) naming ``what`` unless every segment splits over the world."""
    try:
        layout.check_divisible(sum(segments), segments, d.world_size, what)
    except ValueError as e:
        raise Fail(op, str(e), divisibility=True) from None


def replicated_output(op: Op) -> Any:
    if op.kind == "split":
        return [REPLICATED] * len(op.attrs["sizes"])
    return REPLICATED


def need_replicated(op: Op, ins: list[Any]) -> list[Any]:
    """Every partial input reduced; a split input cannot be made replicated here."""
    for i, p in enumerate(ins):
        if isinstance(p, Split):
            raise Fail(op, f"input {i} is split on dim {p.dim} but this op needs the whole tensor")
        if isinstance(p, SplitSize):
            raise Fail(op, "uses the size of a split dim")
    return [REPLICATED] * len(ins)


def opaque(op: Op, ins: list[Any], d: Decider) -> tuple[Any, list[Any]]:
    if any(isinstance(p, Split) for p in ins):
        raise Fail(op, f"{op.attrs.get('why', op.kind)} is not understood on a split input")
    return replicated_output(op), need_replicated(op, ins)
