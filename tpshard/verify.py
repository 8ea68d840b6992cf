"""The equivalence harness: run the original and the sharded model on real ranks and compare.

:func:`verify` runs one training step of the sharded model on ``world_size`` real
``torch.distributed`` ranks (gloo on CPU; on CUDA, NCCL when every rank has its own GPU, gloo
over CUDA tensors when ranks share one) and the same step of the original model in the calling
process, then compares, by name:

- the outputs (any nesting of tuples, lists, dicts, dataclasses, ``ModelOutput``);
- the gradients of the floating-point inputs;
- every parameter gradient (each rank's shards reassembled through the Plan);
- every parameter after one optimizer step (SGD, lr 0.1, momentum 0.9: linear in the
  gradients, so a step error is exactly ``lr`` times the gradient error; Adam would turn a
  rounding-level difference of a near-zero gradient into an ``lr``-sized one);
- the outputs of a second forward with fresh inputs (same shapes, new values; integer inputs
  redrawn within the example's range).

Replicated values (outputs, input gradients, replicated parameters) are compared on every rank.
On a mismatch, the per-module outputs recorded by forward hooks on both models are compared in
execution order (sharded outputs reassembled: column slices gathered with their layout, row and
vocabulary partial sums added up, plus the row bias) and the first module that differs is named.
Collectives are counted with torch's ``CommDebugMode``, per kind, with bytes, forward and
backward.

Tolerances (``tol = atol + rtol * max|reference|`` per tensor) default per dtype
(:data:`DEFAULT_TOLERANCES`): float64 is exact to 1e-10 relative; float32 (1e-4) and
bfloat16 (0.2) are relative to each tensor's magnitude and come from measurements of what
sharding does to the reference models (the reduction order changes), with margin.

Dropout active in training mode cannot match (the ranks and the original draw different masks),
so :func:`verify` puts such a model in eval mode and says so in ``report.notes``; with
``keep_dropout=True`` it keeps training mode and names dropout as the reason of any mismatch.

Example::

    >>> import torch, tpshard
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    >>> report = tpshard.verify(mlp, 2, example_inputs=(torch.randn(3, 8),))  # doctest: +SKIP
    >>> report.ok, report.first_divergence  # doctest: +SKIP
    (True, None)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import math
import os
import pickle
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tpshard import layout
from tpshard.plan import Plan, PlanError

__all__ = [
    "verify",
    "VerifyReport",
    "Comparison",
    "DEFAULT_TOLERANCES",
    "default_tolerance",
    "resolve_model",
    "active_dropout",
    "flatten",
    "compare",
]

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
# The report.


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
            "tolerance": ({"rtol": self.comparisons[0].rtol, "atol": self.comparisons[0].atol}
                          if self.comparisons else {}),
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


def _rows(comps: Sequence[Comparison], header: str = "check") -> list[str]:
    rows = [(header, "max abs", "max rel", "tolerance", "pass", "")]
    for c in comps:
        tol = f"rtol {c.rtol:.0e} atol {c.atol:.0e}"
        rows.append((c.name, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", tol, "ok" if c.passed else "FAIL", c.note))
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


# ---------------------------------------------------------------------------------------------
# Collective counting: CommDebugMode, plus the bytes each collective moves.

_KIND_NAMES = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
               "_allgather_base_": "all_gather", "allgather_": "all_gather",
               "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
               "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
               "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
               "broadcast_": "broadcast", "broadcast": "broadcast", "alltoall_": "all_to_all",
               "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all"}


def _counter() -> Any:
    """A ``CommDebugMode`` that also records, per collective kind, the bytes of the largest
    tensor each call hands over (the all-reduced buffer, the gathered output, the
    reduce-scattered input): ``.summary()`` -> ``{"all_reduce": {"count": n, "bytes": b}}``."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._pytree import tree_leaves

    class _Counter(CommDebugMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            before = sum(self.comm_counts.values())
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if sum(self.comm_counts.values()) > before:
                tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, Tensor)]
                sizes = [t.numel() * t.element_size() for t in tensors]
                self.bytes[_kind(func._overloadpacket)] += max(sizes, default=0)
            return out

        def summary(self) -> dict[str, dict[str, int]]:
            counts: dict[str, int] = defaultdict(int)
            for packet, n in self.get_comm_counts().items():
                counts[_kind(packet)] += n
            return {k: {"count": n, "bytes": int(self.bytes.get(k, 0))} for k, n in sorted(counts.items())}

    return _Counter()


def _kind(packet: Any) -> str:
    name = getattr(packet, "__name__", str(packet)).split(".")[-1]
    return _KIND_NAMES.get(name, name)


# ---------------------------------------------------------------------------------------------
# Models: objects, factories, built-in names; dropout.


def resolve_model(spec: str, *, dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, tuple, dict]:
    """A built-in reference model name (``mlp``, ``gpt``, ``llama``) or ``package.module:callable``
    -> ``(model, example_args, example_kwargs)``. The callable returns a model, ``(model, args)``
    or ``(model, args, kwargs)``. Raises ValueError saying what is wrong.

    Example::

        >>> model, args, kwargs = resolve_model("mlp")
        >>> type(model).__name__, args[0].shape
        ('Sequential', torch.Size([4, 16]))
    """
    from tpshard import models

    dtype = parse_dtype(dtype)
    if ":" not in spec:
        if spec not in models.REFERENCE_MODELS:
            raise ValueError(f"unknown model {spec!r}: use a built-in reference model "
                             f"{sorted(models.REFERENCE_MODELS)} or package.module:callable")
        model, args = models.build(spec, dtype=dtype)
        return model, tuple(args), {}
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m` (and `tpshard plan`): modules of this directory
        sys.path.insert(0, os.getcwd())
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the model factory {spec!r}: {e}; pass an importable "
                         "package.module:callable") from e
    made = factory()
    if isinstance(made, nn.Module):
        return made, (), {}
    if isinstance(made, tuple) and made and isinstance(made[0], nn.Module) and len(made) <= 3:
        args = made[1] if len(made) > 1 else ()
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        return made[0], args, dict(made[2]) if len(made) > 2 else {}
    raise ValueError(f"{spec!r} returned {type(made).__name__}; expected a model, (model, example_args) "
                     "or (model, example_args, example_kwargs)")


_DROPOUT_FUNCTIONS: dict[Any, tuple[str, str]] = {
    f: ("p", "training") for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                   F.feature_alpha_dropout)
}
_DROPOUT_FUNCTIONS.update({f: ("p", "train") for f in (
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
    torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default,  # torch.export graphs
    torch.ops.aten.feature_dropout.default, torch.ops.aten.alpha_dropout.default)})


def active_dropout(model: nn.Module, gm: fx.GraphModule | None = None) -> list[str]:
    """Where ``model`` draws random dropout masks: dropout modules with ``p > 0`` in training
    mode, and (in a captured graph ``gm``) functional dropout calls with ``p > 0`` and training on.

    Example::

        >>> active_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
        ['1 (Dropout, p=0.1)']
    """
    found = [f"{name or '<root>'} ({type(m).__name__}, p={m.p})" for name, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if gm is None:
        return found
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
            continue
        p, training = _dropout_args(node)
        if p > 0 and training:
            found.append(f"{node.name} ({getattr(node.target, '__name__', node.target)}, p={p})")
    return found


def _dropout_args(node: fx.Node) -> tuple[float, bool]:
    p_name, train_name = _DROPOUT_FUNCTIONS[node.target]
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        p, training = bound.arguments[p_name], bound.arguments[train_name]
    except (TypeError, ValueError, KeyError):  # builtins: (input, p, train)
        p = node.kwargs.get(p_name, node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get(train_name, node.args[2] if len(node.args) > 2 else True)
    if isinstance(p, fx.Node) or isinstance(training, fx.Node):
        return 1.0, True  # decided at run time: assume it is active
    return float(p), bool(training)


@dataclass
class _Source:
    """How a rank gets the model: the object itself (fork: inherited; spawn: pickled), or a
    factory / built-in name that a spawned rank rebuilds, then fills with the parent's values."""

    model: nn.Module | None = None
    spec: str | None = None
    values: dict[str, Tensor] | None = None
    modes: dict[str, bool] | None = None

    def materialize(self, dtype: torch.dtype) -> nn.Module:
        if self.model is not None:
            return self.model
        assert self.spec is not None and self.values is not None and self.modes is not None
        model = resolve_model(self.spec, dtype=dtype)[0].to("cpu", dtype)
        with torch.no_grad():
            for name, t in _named_tensors(model).items():
                t.copy_(self.values[name])
        for name, m in model.named_modules():
            m.training = self.modes.get(name, m.training)
        return model


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _source_for(work: nn.Module, spec: str | None, spawn: bool) -> _Source:
    if not spawn:
        return _Source(model=work)
    if spec is not None:
        values = {k: v.detach().cpu() for k, v in _named_tensors(work).items()}
        return _Source(spec=spec, values=values, modes={n: m.training for n, m in work.named_modules()})
    try:
        pickle.dumps(work)
        for m in work.modules():
            _check_importable_in_child(type(m))
    except Exception as e:
        raise ValueError(
            f"verify: the model ({type(work).__module__}.{type(work).__qualname__}) cannot be sent to "
            f"spawned ranks: {type(e).__name__}: {e}. CUDA ranks are spawned, and a class defined inside a "
            "function (or under `if __name__ == '__main__':`) cannot be found there. Define the class at "
            "module level, pass an importable factory 'package.module:callable' instead of the model, or "
            "verify on device='cpu' (forked ranks inherit it)"
        ) from e
    return _Source(model=work)


def _check_importable_in_child(cls: type) -> None:
    """A spawned rank re-runs only the top level of ``__main__``: a class the script defines in
    a block (``if __name__ == "__main__":``) pickles here but is missing there."""
    if cls.__module__ != "__main__":
        return
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError) as e:
        raise pickle.PicklingError(f"class {cls.__qualname__} lives in an interactive __main__") from e
    if lines and lines[0][:1].isspace():
        raise pickle.PicklingError(f"class {cls.__qualname__} is defined inside a block of the main script")


# ---------------------------------------------------------------------------------------------
# Inputs: dtype/device conversion, gradients, fresh values.


def _convert(obj: Any, dtype: torch.dtype | None = None, device: Any = None) -> Any:
    def conv(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    return map_tensors(obj, conv)


def _with_grad(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().clone().requires_grad_(True) if t.is_floating_point() else t)


def _fresh(obj: Any, gen: torch.Generator) -> Any:
    """New values of the same shapes: floats from N(mean, std) of the example, integers within
    the example's [min, max]; booleans and non-finite tensors kept."""

    def draw(t: Tensor) -> Tensor:
        if t.numel() == 0:
            return t.clone()
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                return t.clone()
            f = t.double()
            std = float(f.std()) if t.numel() > 1 else 0.0
            std = std if std > 0 else max(float(f.abs().max()), 1.0)
            new = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + float(f.mean())
            return new.to(t.dtype)
        if t.dtype == torch.bool or t.is_complex():
            return t.clone()
        lo, hi = int(t.min()), int(t.max())
        return torch.randint(lo, hi + 1, t.shape, generator=gen, dtype=t.dtype)

    return map_tensors(obj, draw)


def _loss_weight(index: int, shape: Sequence[int]) -> Tensor:
    """Random weights for the ``index``-th floating output: the loss ``mean(out * w)`` gives
    every output element its own gradient, so every backward path counts."""
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)


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


def _output_shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return {}
    shapes = {}
    for name, node in flatten(out.args[0]):
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            continue
        try:  # plain ints: a symbolic size (torch.export's dynamic dims) must not travel to the ranks
            shapes[name] = tuple(int(d) for d in meta.shape)
        except (TypeError, ValueError, RuntimeError):
            continue
    return shapes


# ---------------------------------------------------------------------------------------------
# One training step, the same for the ranks and the reference.


@dataclass
class _Job:
    source: _Source
    dtype: torch.dtype
    device: str
    plan: Plan
    args: tuple
    kwargs: dict
    fresh_args: tuple
    fresh_kwargs: dict
    output_shapes: dict[str, tuple[int, ...]]
    backward: bool
    optimizer_step: bool
    localize: bool
    seed: int = 0
    tamper: Callable[[int, int, nn.Module], None] | None = None


class _Recorder:
    """Forward hooks that keep each called module's output, in call order.

    ``tag(module)`` says how to read a sharded output: ("full",), ("slice", dim, segments),
    ("partial", bias) or ("auto",) (decided by shape against the reference)."""

    def __init__(self, root: nn.Module, paths: Sequence[str], tag: Callable[[nn.Module], tuple]) -> None:
        self.records: list[tuple[str, str, tuple, list[tuple[str, Any]]]] = []
        self._calls: dict[str, int] = defaultdict(int)
        self._handles = []
        seen: set[int] = set()
        for path in paths:
            try:
                mod = root.get_submodule(path)
            except AttributeError:
                continue
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            self._handles.append(mod.register_forward_hook(self._hook(path, tag(mod))))

    def _hook(self, path: str, tag: tuple) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._calls[path] += 1
            n = self._calls[path]
            key = path if n == 1 else f"{path}#{n}"
            self.records.append((key, path, tag, _to_cpu(flatten(output, ""))))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


_PROBED: list[tuple[str, Tensor]] = []  # filled by _probe nodes during one forward, in a rank


def _probe(value: Any, key: str) -> None:
    """Graph node inserted by :class:`_Probes`: keep a copy of ``value``."""
    if isinstance(value, Tensor):
        _PROBED.append((key, value.detach().to("cpu", copy=True)))


class _Probes:
    """Module outputs of a graph without ``call_module`` nodes (a ``torch.export`` capture).

    A module's output is the one node of its ``nn_module_stack`` span used outside the span.
    It is read where it is computed; the Plan's edits on that node say how to reassemble it: a
    ``reduce`` edit makes it a partial sum (plus the edit's biases), a ``gather`` edit a slice.
    Probe nodes are inserted for the first forward and removed by :meth:`close`."""

    def __init__(self, gm: fx.GraphModule, plan: Plan) -> None:
        self.gm = gm
        self._tags: dict[str, tuple] = {}
        self._nodes: list[fx.Node] = []
        _PROBED.clear()
        edits = {(e.kind, e.node): e for e in plan.edits}
        # Reversed: probes inserted after the same node end up in execution (inner first) order.
        for path, node in reversed(self._outputs(gm.graph)):
            tag = self._tag(gm, edits, node.name, path)
            if tag is None:
                continue
            self._tags[path] = tag
            with gm.graph.inserting_after(node):
                self._nodes.append(gm.graph.call_function(_probe, (node, path)))
        gm.recompile()
        self.records: list[tuple[str, str, tuple, list[tuple[str, Any]]]] = []

    @staticmethod
    def _outputs(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
        spans: dict[str, set[fx.Node]] = defaultdict(set)
        for n in graph.nodes:
            for path, *_ in (n.meta.get("nn_module_stack") or {}).values():
                if isinstance(path, str) and path:
                    spans[path].add(n)
        outs = []
        for path, span in spans.items():
            leaving = [n for n in span if any(_escapes(u, span) for u in n.users)]
            if len(leaving) == 1:
                outs.append((path, leaving[0]))
        order = {n: i for i, n in enumerate(graph.nodes)}
        return sorted(outs, key=lambda pn: (order[pn[1]], -pn[0].count(".")))

    @staticmethod
    def _tag(gm: fx.GraphModule, edits: dict[tuple[str, str], Any], name: str, path: str) -> tuple | None:
        """How to read the local value of node ``name`` (the output of module ``path``); None
        when the Plan's edits leave it unreadable on its own (then it is not compared)."""
        kinds = {k for k, n in edits if n == name}
        if kinds & {"skip_add"} or not kinds <= {"drop_bias", "reduce", "gather", "scatter", "copy", "shape",
                                                 "split_sizes", "vocab_lookup"}:
            return None
        if "drop_bias" in kinds:  # computed without its bias, which a later reduce edit adds
            owned = [b for e in edits.values() if e.kind == "reduce" for b in e.biases
                     if not b.startswith("%") and b.rpartition(".")[0] == path]
            return ("partial", _tensor_sum(gm, owned)) if len(owned) == 1 else None
        if "reduce" in kinds:
            biases = edits["reduce", name].biases
            return None if any(b.startswith("%") for b in biases) else ("partial", _tensor_sum(gm, biases))
        if "gather" in kinds:
            e = edits["gather", name]
            return ("slice", e.dim, tuple(e.segments) if e.segments else None)
        if kinds & {"scatter", "copy"}:
            return ("full",)
        return ("auto",)

    def close(self) -> None:
        self.records = [(key, key, self._tags[key], [("", t)]) for key, t in _PROBED]
        _PROBED.clear()
        for n in self._nodes:
            self.gm.graph.erase_node(n)
        self.gm.recompile()


def _escapes(user: fx.Node, span: set[fx.Node]) -> bool:
    """Whether a value used by ``user`` leaves ``span`` (a module's nodes). Nodes the rewriter
    inserted (collectives, bias adds: no module stack) are looked through."""
    if user in span:
        return False
    if user.op == "output" or user.meta.get("nn_module_stack"):
        return True
    return any(_escapes(u, span) for u in user.users)


def _tensor_sum(gm: nn.Module, names: Sequence[str]) -> Tensor | None:
    """The sum of the named parameters/buffers of ``gm`` (float64, CPU), or None for none."""
    # A copy: the optimizer step later changes the parameter in place.
    values = [(gm.get_parameter(b) if _is_parameter(gm, b) else _attr(gm, b)).detach().to("cpu", torch.float64,
                                                                                         copy=True) for b in names]
    return sum(values[1:], values[0]) if values else None


def _is_parameter(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _attr(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sharded_tag(module: nn.Module) -> tuple:
    from tpshard import layers

    if isinstance(module, layers.ColumnParallelLinear) and not module.gather_output:
        return ("slice", -1, tuple(module.segments) if module.segments else None)
    if isinstance(module, layers.RowParallelLinear) and not module.reduce_output:
        return ("partial", None if module.bias is None else module.bias.detach().cpu().clone())
    if isinstance(module, layers.VocabParallelEmbedding) and not module.reduce_output:
        return ("partial", None)
    if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear, layers.ParallelEmbedding,
                           layers.VocabParallelEmbedding)):
        return ("full",)
    return ("auto",)


def _run_step(module: nn.Module, job: _Job, device: Any, recorder: _Recorder | None, count: bool,
              split: Callable[[str, Tensor], tuple[int, tuple[int, ...] | None] | None]) -> dict[str, Any]:
    """Forward (counted, recorded), weighted-sum backward, one SGD step, a second forward."""
    args = _convert(job.args, device=device)
    kwargs = _convert(job.kwargs, device=device)
    if job.backward:
        args, kwargs = _with_grad(args), _with_grad(kwargs)
    # The parameters as the forward sees them: a shard that differs is named before any output.
    params0 = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters(remove_duplicate=False)}
    fwd = _counter() if count else contextlib.nullcontext()
    torch.manual_seed(job.seed)
    with fwd, warnings.catch_warnings():
        # CommDebugMode's module tracker hooks every module; outputs like ModelOutput make torch warn.
        warnings.filterwarnings("ignore", message="For backward hooks to be called")
        out = module(*args, **kwargs)
    if recorder is not None:
        recorder.close()
    result: dict[str, Any] = {"params0": params0, "output": _to_cpu(out), "collectives": {}}
    if count:
        result["collectives"]["forward"] = fwd.summary()
    if job.backward:
        result.update(_backward(module, job, out, args, kwargs, device, count, split))
    fresh_args, fresh_kwargs = _convert(job.fresh_args, device=device), _convert(job.fresh_kwargs, device=device)
    with torch.no_grad():
        result["second"] = _to_cpu(module(*fresh_args, **fresh_kwargs))
    return result


def _backward(module: nn.Module, job: _Job, out: Any, args: Any, kwargs: Any, device: Any, count: bool,
              split: Callable[[str, Tensor], tuple[int, tuple[int, ...] | None] | None]) -> dict[str, Any]:
    acc = torch.float64 if job.dtype == torch.float64 else torch.float32
    terms = []
    for i, (name, t) in enumerate(n for n in flatten(out) if _differentiable(n[1])):
        where = split(name, t)
        w = _loss_weight(i, job.output_shapes[name] if where is not None else tuple(t.shape))
        n = max(w.numel(), 1)
        if where is not None:  # this rank holds a slice of the output: weight the same slice
            w = layout.shard(w, where[0], _rank(), job.plan.world_size, where[1])
        # A mean, as training losses are: the SGD step moves parameters a little, so the second
        # forward runs a model as well-conditioned as the first (a sum made the step large).
        terms.append((t.to(acc) * w.to(device=t.device, dtype=acc)).sum() / n)
    result: dict[str, Any] = {}
    if not terms:
        return {"no_backward": "the model returns no floating-point tensor that needs a gradient"}
    bwd = _counter() if count else contextlib.nullcontext()
    with bwd, warnings.catch_warnings():
        # CommDebugMode's module tracker hooks every module; inputs without grad make torch warn.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.stack(terms).sum().backward()
    if count:
        result["backward_collectives"] = bwd.summary()
    result["input_grads"] = {n: (None if t.grad is None else t.grad.detach().cpu().clone())
                             for n, t in flatten(args, "input") + flatten(kwargs, "input")
                             if isinstance(t, Tensor) and t.requires_grad}
    # Every name, tied aliases included: each is compared (a tie the rewrite lost shows up).
    params = dict(module.named_parameters(remove_duplicate=False))
    result["grads"] = {n: (None if p.grad is None else p.grad.detach().cpu().clone()) for n, p in params.items()}
    if job.optimizer_step:
        trainable = [p for p in module.parameters() if p.requires_grad]
        if trainable:
            torch.optim.SGD(trainable, lr=0.1, momentum=0.9).step()
        result["params"] = {n: p.detach().cpu().clone() for n, p in params.items()}
    return result


def _differentiable(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point() and v.requires_grad


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank_device(device: str) -> torch.device:
    if device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _rank_main(rank: int, world_size: int, job: _Job) -> dict[str, Any]:
    """Body of one rank: build the sharded module, run the step, return everything on the CPU."""
    from tpshard.api import parallelize

    device = _rank_device(job.device)
    model = job.source.materialize(job.dtype).to(device)
    args, kwargs = _convert(job.args, device=device), _convert(job.kwargs, device=device)
    sharded = parallelize(model, world_size, example_inputs=args, example_kwargs=kwargs, plan=job.plan)
    if job.tamper is not None:
        job.tamper(rank, world_size, sharded)
    recorder: _Recorder | _Probes | None = None
    if job.localize and getattr(sharded, "tpshard_plan", job.plan).capture == "export":
        recorder = _Probes(sharded, job.plan)  # no call_module nodes: read module outputs off the graph
    elif job.localize:
        paths = [n.target for n in sharded.graph.nodes if n.op == "call_module"]
        recorder = _Recorder(sharded, paths, _sharded_tag)

    def split(name: str, t: Tensor) -> tuple[int, tuple[int, ...] | None] | None:
        return _output_layout(tuple(t.shape), job.output_shapes.get(name), job.plan, world_size)

    result = _run_step(sharded, job, device, recorder, True, split)
    result["modules"] = recorder.records if recorder is not None else []
    return result


# ---------------------------------------------------------------------------------------------
# The parent: comparisons and localization.


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


def _candidate_layouts(size: int, plan: Plan) -> list[tuple[int, ...] | None]:
    found: list[tuple[int, ...] | None] = [None]
    for m in plan.modules.values():
        if m.segments and sum(m.segments) == size and len(m.segments) > 1 and m.segments not in found:
            found.append(tuple(m.segments))
    return found


def _module_comparison(key: str, tag: tuple, values: list[Any], ref: Any, plan: Plan,
                       rtol: float, atol: float) -> Comparison:
    """Reassemble one module output from the ranks' values as ``tag`` says, and compare."""
    world = len(values)
    if not isinstance(ref, Tensor) or not all(isinstance(v, Tensor) for v in values):
        return _worst([compare(key, "module", v, ref, rtol, atol) for v in values])
    if tag[0] == "slice":
        try:
            full = layout.unshard(values, tag[1], tag[2])
        except (ValueError, RuntimeError) as e:
            return Comparison(key, "module", math.inf, math.inf, rtol, atol, False, f"cannot gather: {e}")
        return dataclasses.replace(compare(key, "module", full, ref, rtol, atol), note="column slices gathered")
    if tag[0] == "partial":
        total = torch.stack([v.double() for v in values]).sum(0)
        if tag[1] is not None:
            total = total + tag[1].double()
        return dataclasses.replace(compare(key, "module", total.to(ref.dtype), ref, rtol, atol),
                                   note="partial sums added" + (" + bias" if tag[1] is not None else ""))
    if tag[0] == "full" or all(tuple(v.shape) == tuple(ref.shape) for v in values):
        whole = _worst([compare(key, "module", v, ref, rtol, atol) for v in values])
        if whole.passed or tag[0] == "full":
            return whole
        total = torch.stack([v.double() for v in values]).sum(0).to(ref.dtype)
        summed = compare(key, "module", total, ref, rtol, atol)
        return dataclasses.replace(summed, note="partial sums added") if summed.passed else whole
    dims = [d for d in range(ref.dim()) if values[0].dim() == ref.dim() and values[0].shape[d] * world == ref.shape[d]
            and all(values[0].shape[e] == ref.shape[e] for e in range(ref.dim()) if e != d)]
    if not dims:
        return compare(key, "module", values[0], ref, rtol, atol)
    tries = [dataclasses.replace(compare(key, "module", layout.unshard(values, dims[0], segs), ref, rtol, atol),
                                 note=f"split along dim {dims[0]}" + (f" {list(segs)}" if segs else "") + ": gathered")
             for segs in _candidate_layouts(ref.shape[dims[0]], plan)]
    return next((c for c in tries if c.passed), tries[0])


def _localize(rank_records: list[list], ref_records: list, plan: Plan, rtol: float, atol: float
              ) -> tuple[list[Comparison], str | None, str]:
    """Per-module forward outputs in execution order; the first module that differs."""
    ref_by_key = {key: leaves for key, _, _, leaves in ref_records}
    comps: list[Comparison] = []
    first: str | None = None
    detail = ""
    for i, (key, path, tag, leaves) in enumerate(rank_records[0]):
        if key not in ref_by_key:
            continue
        ref_leaves = ref_by_key[key]
        if len(leaves) == 1 and len(ref_leaves) != 1:  # a graph value vs e.g. (tensor, None): its tensor
            ref_leaves = [leaf for leaf in ref_leaves if isinstance(leaf[1], Tensor)]
        if any(len(r[i][3]) != len(ref_leaves) for r in rank_records):
            continue  # not comparable as recorded (not evidence of a difference)
        parts = [_module_comparison(key + name, tag, [r[i][3][j][1] for r in rank_records], ref, plan, rtol, atol)
                 for j, (name, ref) in enumerate(ref_leaves)]
        c = _worst(parts) if parts else Comparison(key, "module", 0.0, 0.0, rtol, atol, True)
        comps.append(c)
        if not c.passed and first is None:
            first = path
            detail = (f"forward output of {path!r}" + (f" (call {key.rpartition('#')[2]})" if "#" in key else "")
                      + f" differs: max rel error {c.max_rel:.2e}" + (f", {c.note}" if c.note else ""))
    return comps, first, detail


def _fallback_divergence(report: VerifyReport, order: list[str]) -> tuple[str | None, str]:
    """When every forward module output matches: the module of the first parameter that differs
    before the step (forward order), else of the first gradient that differs in backward order
    (the module executed last in the forward)."""
    position = {p: i for i, p in enumerate(order)}

    def owner(param: str) -> str:
        return param.rpartition(".")[0] or param

    def failed(kind: str) -> list[str]:
        return [c.name.split(" ", 1)[1] for c in report.failures if c.kind == kind]

    if failed("param"):
        param = min(failed("param"), key=lambda p: position.get(owner(p), len(order)))
        return owner(param), (f"the parameter {param!r} differs from the original before any step: its shards do "
                              "not reassemble to the original through the Plan")
    if failed("grad") or failed("step"):
        param = max(failed("grad") or failed("step"), key=lambda p: position.get(owner(p), -1))
        return owner(param), f"every forward output matches; the gradient of {param!r} differs"
    return None, ""


# ---------------------------------------------------------------------------------------------
# verify.


def verify(model: nn.Module | str, world_size: int, *, example_inputs: Any = (), example_kwargs: dict | None = None,
           device: str = "cpu", dtype: torch.dtype | str = torch.float64, plan: Plan | None = None,
           backward: bool = True, optimizer_step: bool = True, rtol: float | None = None,
           atol: float | None = None, timeout: float = 300.0, keep_dropout: bool = False) -> VerifyReport:
    """Run ``model`` sharded over ``world_size`` real ranks and the original, and compare.

    Args:
        model: an ``nn.Module`` (never modified; its class may be local to a function when the
            ranks are forked, i.e. on CPU), a built-in reference model name ("mlp", "gpt",
            "llama") or ``"package.module:callable"`` returning a model, ``(model, args)`` or
            ``(model, args, kwargs)``.
        world_size: number of ranks.
        example_inputs, example_kwargs: the inputs (default: the factory's, else inferred as
            :func:`tpshard.plan` does). Floating tensors are cast to ``dtype``.
        device: "cpu" or "cuda" (NCCL with one GPU per rank, gloo over CUDA tensors otherwise).
        dtype: the floating dtype both models run in.
        plan: a Plan to apply as given (default: the planner's); it is not validated, so a
            hand-edited plan is verified as it is.
        backward, optimizer_step: also compare input/parameter gradients, and parameters after
            one SGD step (lr 0.1, momentum 0.9).
        rtol, atol: tolerances (default :func:`default_tolerance` of ``dtype``).
        timeout: seconds for the ranks; a hung or dead rank fails the call within it.
        keep_dropout: keep dropout active in training mode (default: switch to eval, with a note).
    Returns:
        a :class:`VerifyReport`; ``report.ok`` only when every comparison passes.
    Raises:
        tpshard.launch.RankError (a rank raised; its traceback is in the message),
        tpshard.launch.RankTimeout (a rank hung or died), ValueError / PlanError / CaptureError
        (the model, inputs or plan cannot be used as given; the message says why).

    Example::

        >>> import torch, tpshard
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> tpshard.verify(mlp, 2, example_inputs=(torch.randn(3, 8),)).ok  # doctest: +SKIP
        True
    """
    return _verify(model, world_size, example_inputs=example_inputs, example_kwargs=example_kwargs, device=device,
                   dtype=dtype, plan=plan, backward=backward, optimizer_step=optimizer_step, rtol=rtol, atol=atol,
                   timeout=timeout, keep_dropout=keep_dropout)


def _prepare(model: nn.Module | str, dtype: torch.dtype, example_inputs: Any, example_kwargs: dict | None
             ) -> tuple[str, str | None, nn.Module, tuple, dict]:
    """(label, spec, private float copy of the model on the CPU, args, kwargs)."""
    spec = None
    if isinstance(model, str):
        spec = model
        work, args, kwargs = resolve_model(model, dtype=dtype)
        label = model
    elif isinstance(model, nn.Module):
        work, args, kwargs = copy.deepcopy(model), (), {}
        label = type(model).__name__
    else:
        raise TypeError(f"verify takes an nn.Module or 'package.module:callable', not {type(model).__name__}")
    if any(t.is_meta for t in _named_tensors(work).values()):
        raise ValueError(f"{label} has tensors on the meta device; verify needs real weights (build the model "
                         "on the CPU, or load its weights first)")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if example_inputs or example_kwargs:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    work = work.to("cpu", dtype)
    return label, spec, work, _convert(tuple(args), dtype, "cpu"), _convert(dict(kwargs), dtype, "cpu")


def _verify(model: nn.Module | str, world_size: int, *, example_inputs: Any = (), example_kwargs: dict | None = None,
            device: str = "cpu", dtype: torch.dtype | str = torch.float64, plan: Plan | None = None,
            backward: bool = True, optimizer_step: bool = True, rtol: float | None = None,
            atol: float | None = None, timeout: float = 300.0, keep_dropout: bool = False,
            localize: bool = True, start_method: str | None = None,
            _tamper: Callable[[int, int, nn.Module], None] | None = None) -> VerifyReport:
    """:func:`verify`, plus the knobs tests need: ``_tamper(rank, world_size, sharded)`` runs
    in each rank right after parallelize (a module-level function when ranks are spawned), to
    inject a fault; ``start_method`` picks fork/spawn; ``localize`` records module outputs."""
    from tpshard.capture import capture
    from tpshard.launch import run_ranks
    from tpshard.planner import make_plan

    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    default_rtol, default_atol = default_tolerance(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol

    # Phase 1: a private copy of the model in `dtype`, its inputs, dropout, the plan.
    label, spec, work, args, kwargs = _prepare(model, dtype, example_inputs, example_kwargs)
    notes: list[str] = []
    c = capture(work, args, kwargs)
    dropout = active_dropout(work, c.gm)
    if dropout and not keep_dropout:
        work.eval()
        notes.append(f"dropout active in training mode ({', '.join(dropout)}): the model was put in eval mode, "
                     "since ranks and the original draw different masks (keep_dropout=True keeps it)")
        c = capture(work, c.example_inputs, c.example_kwargs)
        dropout = active_dropout(work, c.gm)
    elif dropout:
        notes.append(f"dropout active in training mode ({', '.join(dropout)}): the sharded and original models "
                     "draw different random masks, so their outputs are not expected to match")
    args, kwargs = tuple(c.example_inputs), dict(c.example_kwargs)
    if plan is None:
        plan = make_plan(c.gm, c.ops, world_size, None, c.kind)
    elif plan.world_size != world_size:
        raise PlanError(f"the plan is for world size {plan.world_size}, not {world_size}; plan again for {world_size}")
    gen = torch.Generator().manual_seed(1234)
    job = _Job(source=_Source(), dtype=dtype, device=device, plan=plan, args=args, kwargs=kwargs,
               fresh_args=_fresh(args, gen), fresh_kwargs=_fresh(kwargs, gen), output_shapes=_output_shapes(c.gm),
               backward=backward, optimizer_step=optimizer_step and backward, localize=localize, tamper=_tamper)

    # Phase 2: the sharded model on real ranks (fork on CPU: ranks inherit the model).
    spawn = (start_method or ("spawn" if device.startswith("cuda") else "fork")) == "spawn"
    job.source = _source_for(work, spec, spawn)
    backend = "nccl" if device.startswith("cuda") and torch.cuda.device_count() >= world_size else "gloo"
    ranks = run_ranks(_rank_main, world_size, job, timeout=timeout, device=device,
                      start_method="spawn" if spawn else "fork")

    # Phase 3: the original, after the ranks (no OpenMP state is forked), hooked at the same modules.
    ref_device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
    work.to(ref_device)
    paths = list(dict.fromkeys(rec[1] for rec in ranks[0]["modules"]))
    recorder = _Recorder(work, paths, lambda m: ("full",)) if localize else None
    rng_devices = [ref_device.index or 0] if ref_device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # the caller's random state is left as it was
        ref = _run_step(work, job, ref_device, recorder, False, lambda name, t: None)

    # Phase 4: compare, then localize a mismatch.
    report = VerifyReport(model=label, world_size=world_size, device=device, dtype=str(dtype).removeprefix("torch."),
                          backend=backend, notes=notes, plan=plan)
    report.comparisons = _comparisons(ranks, ref, job, rtol, atol, report.notes)
    report.collectives = {"forward": ranks[0]["collectives"].get("forward", {}),
                          "backward": ranks[0].get("backward_collectives", {})}
    if not report.ok and localize:
        ref_records = recorder.records if recorder is not None else []
        report.modules, report.first_divergence, report.divergence = _localize(
            [r["modules"] for r in ranks], ref_records, plan, rtol, atol)
        if report.first_divergence is None:
            report.first_divergence, report.divergence = _fallback_divergence(report, paths)
        if report.first_divergence is None and report.modules:
            report.divergence = ("every module output matches; the difference arises in functional code "
                                 f"after {report.modules[-1].name!r} or in the second forward")
        if dropout:
            report.divergence = "dropout is active in training mode; " + (report.divergence or "outputs differ")
    report.seconds = time.perf_counter() - t0
    return report


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
