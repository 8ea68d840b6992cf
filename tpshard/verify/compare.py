"""Comparing the sharded model's values with the original's: tolerances, nested outputs, tensors.

:func:`compare` measures one tensor against its reference (``tol = atol + rtol * max|reference|``,
with the per-dtype defaults of :data:`DEFAULT_TOLERANCES`); :func:`flatten` names the leaves of
a nested output. :func:`_comparisons` compares everything one training step returned by every
rank with the reference step: parameters (shards reassembled through the Plan), outputs (split
outputs gathered with their layout), input and parameter gradients, parameters after the step
and the second forward. Replicated values are compared on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from tpshard import layout
from tpshard.plan import Plan
from tpshard.verify.model import _Job

__all__ = ["DEFAULT_TOLERANCES", "parse_dtype", "default_tolerance", "flatten", "map_tensors", "Comparison",
           "compare"]

# ---------------------------------------------------------------------------------------------
# Tolerances.

#: dtype -> (rtol, atol); a tensor passes when ``max|got - ref| <= atol + rtol * max|ref|``.
#:
#: - float64: exact up to reassociation, 1e-10 (sharding measures ~1e-15).
#: - float32, bfloat16, float16: relative to each tensor's magnitude, from the worst relative
#:   error over every compared tensor (outputs, input and parameter gradients, parameters after
#:   the step, second forward) of mlp, gpt, llama, HF GPT-2 and HF Llama at world sizes 2 and 4,
#:   seeds 0-4, on CPU ranks (``python3 benchmarks/gpu_check.py --device cpu --seeds 5``):
#:   float32 1.6e-6 -> 1e-4 (margin 65); bfloat16 4.1e-2 -> 0.2 (margin 5); float16 5.9e-3
#:   (reference models, seeds 0-1) -> 3e-2 (margin 5). bfloat16 keeps 8 significant bits, so
#:   two valid summation orders differ by several units in the last place; the bugs sharding
#:   makes (a missing all-reduce, a wrong layout, a bias added twice per rank) are O(1).
#: - ``atol`` is only a floor for tensors whose reference is all zeros.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-15),
    torch.float32: (1e-4, 1e-9),
    torch.bfloat16: (2e-1, 1e-6),
    torch.float16: (3e-2, 1e-6),
}

_DTYPES = {"float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
           "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or a name ("float32", "bf16", ...) -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"verify needs a floating dtype, not {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[name]


def default_tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """The default ``(rtol, atol)`` for ``dtype`` (see :data:`DEFAULT_TOLERANCES`).

    Example::

        >>> default_tolerance(torch.float64)
        (1e-10, 1e-15)
    """
    return DEFAULT_TOLERANCES[parse_dtype(dtype)]


# ---------------------------------------------------------------------------------------------
# Nested structures.


def flatten(obj: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """The leaves of a nested output, each with a name that says where it sits.

    Tensors and other non-container values are leaves; tuples, lists, namedtuples, mappings
    (``ModelOutput`` included) and dataclasses are walked.

    Example::

        >>> [n for n, _ in flatten({"logits": torch.ones(1), "aux": (torch.ones(1), None)})]
        ["output['logits']", "output['aux'][0]", "output['aux'][1]"]
    """
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        items: Iterator[tuple[str, Any]] = ((f"[{k!r}]", v) for k, v in obj.items())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = ((f".{k}", getattr(obj, k)) for k in obj._fields)
    elif isinstance(obj, (tuple, list)):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return [(prefix, obj)]
    return [leaf for suffix, v in items for leaf in flatten(v, prefix + suffix)]


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)`` (tuples, lists, dicts rebuilt)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    return obj


def _to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


# ---------------------------------------------------------------------------------------------
# Comparison of two tensors.


@dataclass
class Comparison:
    """One compared tensor: its worst absolute and relative error and whether it passed.

    ``max_rel`` is ``max_abs / max|reference|``; it passes when ``max_abs <= atol + rtol *
    max|reference|``. ``note`` says how a sharded value was reassembled, or why it failed.
    """

    name: str
    kind: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""


def compare(name: str, kind: str, got: Any, ref: Any, rtol: float, atol: float) -> Comparison:
    """Compare ``got`` with the reference ``ref`` (tensors, or other values for equality).

    Example::

        >>> c = compare("output", "output", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-12]), 1e-10, 0)
        >>> c.passed, c.max_abs < 1e-11
        (True, True)
    """
    if not isinstance(ref, Tensor) or not isinstance(got, Tensor):
        same = type(got) is type(ref) and _equal_values(got, ref)
        return Comparison(name, kind, 0.0 if same else math.inf, 0.0 if same else math.inf, rtol, atol, same,
                          "" if same else f"{_short(got)} != {_short(ref)}")
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(name, kind, math.inf, math.inf, rtol, atol, False,
                          f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not (ref.is_floating_point() or ref.is_complex()):
        rtol = atol = 0.0  # integers and booleans must be equal
    a = got.detach().to("cpu", torch.float64)
    b = ref.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    same_nonfinite = (a == b) | (torch.isnan(a) & torch.isnan(b))
    scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
    if bool((~finite & ~same_nonfinite).any()):
        return Comparison(name, kind, math.inf, math.inf, rtol, atol, False, "non-finite values differ")
    err = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return Comparison(name, kind, err, rel, rtol, atol, err <= atol + rtol * scale)


def _equal_values(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _worst(comps: Sequence[Comparison], note: str = "") -> Comparison:
    """The failing (or largest-error) comparison of several, e.g. one per rank."""
    worst = max(comps, key=lambda c: (not c.passed, c.max_abs))
    if note and not worst.note:
        worst = dataclasses.replace(worst, note=note)
    return worst


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


def _compare_tree(kind: str, ranks: list[Any], ref: Any, job: _Job, rtol: float, atol: float,
                  prefix: str = "output") -> list[Comparison]:
    """Compare a nested output of every rank with the reference, leaf by leaf."""
    ref_leaves = flatten(ref, prefix)
    rank_leaves = [flatten(r, prefix) for r in ranks]
    names = [n for n, _ in ref_leaves]
    label = "" if kind == "output" else f"{kind} "
    if any([n for n, _ in leaves] != names for leaves in rank_leaves):
        got = [n for n, _ in rank_leaves[0]]
        return [Comparison(f"{label}{prefix}", kind, math.inf, math.inf, rtol, atol, False,
                           f"structure differs: leaves {got} vs reference {names}")]
    comps = []
    for i, (name, r) in enumerate(ref_leaves):
        values = [leaves[i][1] for leaves in rank_leaves]
        where = (_output_layout(tuple(values[0].shape), job.output_shapes.get(name), job.plan, len(ranks))
                 if isinstance(values[0], Tensor) else None)
        if where is not None:
            full = layout.unshard(values, where[0], where[1])
            comps.append(dataclasses.replace(compare(label + name, kind, full, r, rtol, atol),
                                             note=f"split along dim {where[0]}: gathered"))
        else:
            comps.append(_worst([compare(label + name, kind, v, r, rtol, atol) for v in values]))
    return comps


def _compare_params(kind: str, ranks: list[dict[str, Tensor | None]], ref: dict[str, Tensor | None],
                    plan: Plan, rtol: float, atol: float) -> list[Comparison]:
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
            comps.append(Comparison(label, kind, math.inf, math.inf, rtol, atol, False, f"no value on {missing}"))
            continue
        shard = plan.params.get(name)
        if shard is None or shard.replicated:
            comps.append(_worst([compare(label, kind, s, expect, rtol, atol) for s in shards]))
            continue
        try:
            full = shard.unshard(shards)
        except (ValueError, RuntimeError) as e:
            comps.append(Comparison(label, kind, math.inf, math.inf, rtol, atol, False, f"cannot reassemble: {e}"))
            continue
        comps.append(compare(label, kind, full, expect, rtol, atol))
    return comps


def _comparisons(ranks: list[dict], ref: dict, job: _Job, rtol: float, atol: float, notes: list[str]
                 ) -> list[Comparison]:
    comps = _compare_params("param", [r["params0"] for r in ranks], ref["params0"], job.plan, rtol, atol)
    comps += _compare_tree("output", [r["output"] for r in ranks], ref["output"], job, rtol, atol)
    if job.backward and "no_backward" in ref:
        notes.append(f"no backward: {ref['no_backward']}")
    elif job.backward:
        names = list(ref["input_grads"])
        for name in names:
            grads = [r["input_grads"].get(name) for r in ranks]
            if ref["input_grads"][name] is None and all(g is None for g in grads):
                continue
            if ref["input_grads"][name] is None or any(g is None for g in grads):
                comps.append(Comparison(f"grad {name}", "input grad", math.inf, math.inf, rtol, atol, False,
                                        "a gradient is missing on one side"))
                continue
            comps.append(_worst([compare(f"grad {name}", "input grad", g, ref["input_grads"][name], rtol, atol)
                                 for g in grads]))
        comps += _compare_params("grad", [r["grads"] for r in ranks], ref["grads"], job.plan, rtol, atol)
        missing = [n for n, g in ref["grads"].items() if g is not None and n not in ranks[0]["grads"]]
        comps += [Comparison(f"grad {n}", "grad", math.inf, math.inf, rtol, atol, False,
                             "parameter missing from the sharded model") for n in missing]
        if job.optimizer_step:
            comps += _compare_params("step", [r["params"] for r in ranks], ref["params"], job.plan, rtol, atol)
    comps += _compare_tree("second forward", [r["second"] for r in ranks], ref["second"], job, rtol, atol)
    return comps
