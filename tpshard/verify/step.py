"""One training step compared: everything the ranks returned against the reference step.

:func:`_comparisons` compares parameters (shards reassembled through the Plan), outputs (split
outputs gathered with their layout), input and parameter gradients, parameters after the step
and the second forward, each against its own tolerance (:class:`~tpshard.verify.compare.Tolerances`).
Replicated values are compared on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from torch import Tensor

from tpshard import layout
from tpshard.plan import Plan
from tpshard.verify.compare import Comparison, Tolerances, _worst, compare, flatten
from tpshard.verify.model import _Job

__all__ = ["_comparisons"]

# ---------------------------------------------------------------------------------------------
# Whole-step comparisons: every rank against the reference.


def _output_layout(local: Sequence[int], full: Sequence[int] | None, plan: Plan, world: int
                   ) -> tuple[int, tuple[int, ...] | None] | None:
    """(dim, segments) when a model output is left split (a ``column_no_gather`` head), else None."""
    if full is None or tuple(local) == tuple(full) or len(local) != len(full):
        return None
    dims = [d for d, (a, b) in enumerate(zip(local, full)) if a != b]
    if len(dims) != 1 or local[dims[0]] * world != full[dims[0]]:
        return None
    d = dims[0]
    heads = [m.segments for m in plan.modules.values()
             if m.style == "column_no_gather" and m.segments and sum(m.segments) == full[d]]
    return d, heads[0] if heads else None


def _compare_tree(kind: str, ranks: list[Any], ref: Any, job: _Job, tols: Tolerances,
                  prefix: str = "output") -> list[Comparison]:
    """Compare a nested output of every rank with the reference, leaf by leaf."""
    ref_leaves = flatten(ref, prefix)
    rank_leaves = [flatten(r, prefix) for r in ranks]
    names = [n for n, _ in ref_leaves]
    label = "" if kind == "output" else f"{kind} "
    if any([n for n, _ in leaves] != names for leaves in rank_leaves):
        got = [n for n, _ in rank_leaves[0]]
        return [_missing(f"{label}{prefix}", kind, f"structure differs: leaves {got} vs reference {names}")]
    comps = []
    for i, (name, r) in enumerate(ref_leaves):
        values = [leaves[i][1] for leaves in rank_leaves]
        where = (_output_layout(tuple(values[0].shape), job.output_shapes.get(name), job.plan, len(ranks))
                 if isinstance(values[0], Tensor) else None)
        if where is not None:
            full = layout.unshard(values, where[0], where[1])
            comps.append(dataclasses.replace(compare(label + name, kind, full, r, **tols(label + name, r)),
                                             note=f"split along dim {where[0]}: gathered"))
        else:
            comps.append(_worst([compare(label + name, kind, v, r, **tols(label + name, r)) for v in values]))
    return comps


def _compare_params(kind: str, ranks: list[dict[str, Tensor | None]], ref: dict[str, Tensor | None],
                    plan: Plan, tols: Tolerances) -> list[Comparison]:
    """Reassemble every parameter's shards through the Plan and compare with the reference."""
    comps = []
    for name in ranks[0]:
        label = f"{kind} {name}"
        shards = [r.get(name) for r in ranks]
        expect = ref.get(name)
        if all(s is None for s in shards) and expect is None:
            continue
        if any(s is None for s in shards) or expect is None:
            missing = "the reference" if expect is None else f"rank {[s is None for s in shards].index(True)}"
            comps.append(_missing(label, kind, f"no value on {missing}"))
            continue
        shard = plan.params.get(name)
        if shard is None or shard.replicated:
            comps.append(_worst([compare(label, kind, s, expect, **tols(label, expect)) for s in shards]))
            continue
        try:
            full = shard.unshard(shards)
        except (ValueError, RuntimeError) as e:
            comps.append(_missing(label, kind, f"cannot reassemble: {e}"))
            continue
        comps.append(compare(label, kind, full, expect, **tols(label, expect)))
    return comps


def _comparisons(ranks: list[dict], ref: dict, job: _Job, tols: Tolerances, notes: list[str]
                 ) -> list[Comparison]:
    """Every rank's step against the reference step ``ref`` (float64), each tensor to its
    tolerance in ``tols``."""
    comps = _compare_params("param", [r["params0"] for r in ranks], ref["params0"], job.plan, tols)
    comps += _compare_tree("output", [r["output"] for r in ranks], ref["output"], job, tols)
    if job.backward and "no_backward" in ref:
        notes.append(f"no backward: {ref['no_backward']}")
    elif job.backward:
        names = list(ref["input_grads"])
        for name in names:
            grads = [r["input_grads"].get(name) for r in ranks]
            if ref["input_grads"][name] is None and all(g is None for g in grads):
                continue
            if ref["input_grads"][name] is None or any(g is None for g in grads):
                comps.append(_missing(f"grad {name}", "input grad", "a gradient is missing on one side"))
                continue
            expect = ref["input_grads"][name]
            comps.append(_worst([compare(f"grad {name}", "input grad", g, expect, **tols(f"grad {name}", expect))
                                 for g in grads]))
        comps += _compare_params("grad", [r["grads"] for r in ranks], ref["grads"], job.plan, tols)
        missing = [n for n, g in ref["grads"].items() if g is not None and n not in ranks[0]["grads"]]
        comps += [_missing(f"grad {n}", "grad", "parameter missing from the sharded model") for n in missing]
        if job.optimizer_step:
            comps += _compare_params("step", [r["params"] for r in ranks], ref["params"], job.plan, tols)
    comps += _compare_tree("second forward", [r["second"] for r in ranks], ref["second"], job, tols)
    return comps


def _missing(name: str, kind: str, note: str) -> Comparison:
    """A comparison that cannot be made (a value missing or not reassembled): a failure."""
    return Comparison(name, kind, math.inf, math.inf, 0.0, 0.0, False, note, 0.0, "")
