"""Comparing the sharded model's values with the original's: tolerances, nested outputs, tensors.

:func:`compare` measures one tensor against its reference (``tol = atol + rtol * max|reference|``,
with the per-dtype defaults of :data:`DEFAULT_TOLERANCES`); :func:`flatten` names the leaves of
a nested output; :class:`Tolerances` gives each compared tensor its tolerance. The step's
comparisons, tensor by tensor, are in :mod:`tpshard.verify.step`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


__all__ = ["DEFAULT_TOLERANCES", "DtypeTolerance", "parse_dtype", "default_tolerance", "noise_tolerance", "flatten",
           "map_tensors", "Comparison", "compare", "Tolerances"]

# ---------------------------------------------------------------------------------------------
# Tolerances: each compared tensor against the rounding noise of the unsharded computation.
#
# The sharded model and the original compute the same function in a different order (split
# reductions, partial sums added by a collective), so they differ by rounding. How much depends
# on the computation, not only on the dtype: a LayerNorm output summed over features is ~0, yet
# its rounding error is that of the features it summed. So every compared tensor gets its own
# tolerance, from the noise the *unsharded* model makes there:
#
#   error = max |sharded - truth|,        truth = the unsharded model run in float64
#   noise = max(run, u * sensitivity, u * magnitude)
#   pass iff error <= margin * noise
#
# - ``truth``: the original, run in float64 from the tested dtype's values (weights and inputs
#   rounded to the dtype, then widened), i.e. the exact function the low-precision models
#   approximate. For float64 it is the original itself.
# - ``run``: the error the original makes when run in the tested dtype, ``max|ref_dtype -
#   truth|``: the dtype's real noise floor, accumulation order and kernels included. For
#   float64, which has no wider dtype to compare with, the float32 run's error times
#   u64/u32 = 2^-29 (rounding errors scale with the unit roundoff); it sees what the
#   rounding model below misses, the rounding inside a kernel (a LayerNorm's mean shifts all
#   outputs of a row alike, so their sum errs by the row's width times that rounding).
# - ``sensitivity``: how far the tensor moves when every floating result of every operation of
#   the float64 run (forward, backward, optimizer step) is rounded at random (Monte Carlo
#   arithmetic, :class:`_RoundingModel`: ``r -> r * (1 + d * s)``, ``s`` uniform in [-1, 1],
#   ``d`` = 2^-16; the change divided by ``d``, the largest over a few draws). ``u *
#   sensitivity`` is the error of rounding every result to the dtype: it carries the
#   magnitudes that entered the tensor (the features a near-zero sum added up), and as a
#   second, independent estimate it keeps a tensor whose run happened to err little from
#   getting a tolerance below its noise.
# - ``magnitude``: ``max|truth|``: nothing is more accurate than its own rounding.
# - ``u``: the dtype's unit roundoff (half its machine epsilon).
# - ``margin``: the sharded model rounds differently, not less: its partial sums are rounded
#   before the all-reduce and its reductions run in another order. Measured in noise units
#   (``error / noise``) on CPU ranks (``python3 benchmarks/gpu_check.py --device cpu --seeds 2``,
#   mlp, gpt, llama, HF GPT-2 and Llama at 2 and 4 ranks; near-zero outputs in
#   tests/test_verify.py, 10-20 seeds), correct sharded models reach 1.8 / 1.6 / 1.4 (models)
#   and 5.8 / 2.9 / 2.0 (near-zero) in float64 / float32 / bfloat16, while every all-reduce
#   scaled by 1 + delta (1e-7 / 1e-3 / 0.1) reaches at least 1.6e8 / 3.0e3 / 6.0. float64 and
#   float32 take 4x the worst correct value, rounded up to a power of two (32, 16); bfloat16's 8
#   bits leave a 10% defect only 6 units away, so its margin, 4, sits between the two sides.
#   float16 (one rounding per result, float32 accumulation, like bfloat16) takes the same
#   (mlp, gpt, llama at 2 ranks: correct 1.0; a 10% defect 34, a 1% one 3.1 for llama).
#
# ``rtol``/``atol`` given to :func:`tpshard.verify` replace all of this with a fixed
# ``atol + rtol * max|truth|``.


@dataclass(frozen=True)
class DtypeTolerance:
    """How a dtype's tolerances are derived: ``unit_roundoff`` (half the machine epsilon) and
    the ``margin`` over the noise of the unsharded computation (see the comment above)."""

    unit_roundoff: float
    margin: float


#: dtype -> :class:`DtypeTolerance`: a tensor passes when ``max|sharded - truth| <= margin *
#: noise`` (see :func:`noise_tolerance`).
DEFAULT_TOLERANCES: dict[torch.dtype, DtypeTolerance] = {
    torch.float64: DtypeTolerance(2.0 ** -53, 32.0),
    torch.float32: DtypeTolerance(2.0 ** -24, 16.0),
    torch.bfloat16: DtypeTolerance(2.0 ** -8, 4.0),
    torch.float16: DtypeTolerance(2.0 ** -11, 4.0),
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


def default_tolerance(dtype: torch.dtype | str) -> DtypeTolerance:
    """The unit roundoff and noise margin of ``dtype`` (see :data:`DEFAULT_TOLERANCES`).

    Example::

        >>> default_tolerance(torch.float64)
        DtypeTolerance(unit_roundoff=1.1102230246251565e-16, margin=32.0)
    """
    dtype = parse_dtype(dtype)
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"no tolerance for {dtype}; use one of {sorted(str(d) for d in DEFAULT_TOLERANCES)}")
    return DEFAULT_TOLERANCES[dtype]


def noise_tolerance(dtype: torch.dtype | str, magnitude: float, *, run: float | None = None,
                    sensitivity: float = 0.0, margin: float | None = None,
                    unit_roundoff: float | None = None) -> tuple[float, str]:
    """The absolute tolerance of one compared tensor, and its basis in words.

    ``tol = margin * max(run, u * sensitivity, u * magnitude)`` with ``u`` the unit roundoff
    of ``dtype``: ``run`` is the unsharded model's own error in ``dtype`` against float64
    (None for float64), ``sensitivity`` the tensor's change per relative unit of rounding
    applied to every operation, ``magnitude`` its own ``max|truth|``. The basis names the
    largest term. ``unit_roundoff`` replaces the dtype's where the computation rounds coarser
    somewhere (a float32 softmax inside a float64 model).

    Example (a sum of features that is ~0 while the features are ~1)::

        >>> tol, why = noise_tolerance(torch.float64, 1e-16, sensitivity=8.0)
        >>> tol == 32 * 8.0 * 2.0 ** -53, why
        (True, '32 x u*sensitivity 8.9e-16')
    """
    dtype = parse_dtype(dtype)
    spec = default_tolerance(dtype)
    m = spec.margin if margin is None else margin
    u = spec.unit_roundoff if unit_roundoff is None else max(unit_roundoff, spec.unit_roundoff)
    terms = {"u*sensitivity": u * sensitivity, "u*magnitude": u * magnitude}
    if run is not None:
        terms = {"run": run, **terms}
    if not all(math.isfinite(v) and v >= 0 for v in terms.values()):
        raise ValueError(f"noise terms must be finite and non-negative, not {terms}")
    basis = max(terms, key=lambda k: terms[k])
    noise = terms[basis]
    return m * noise, f"{m:g} x {basis} {noise:.1e}"


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

    ``max_rel`` is ``max_abs / max|reference|``. It passes when ``max_abs <= tol``: ``tol``
    is derived from the noise of the unsharded computation (``basis`` says from what, see
    :func:`noise_tolerance`), or is ``atol + rtol * max|reference|`` when fixed tolerances
    were asked for. ``note`` says how a sharded value was reassembled, or why it failed.
    """

    name: str
    kind: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""
    tol: float = math.nan
    basis: str = ""


def compare(name: str, kind: str, got: Any, ref: Any, rtol: float = 0.0, atol: float = 0.0, *,
            tol: float | None = None, basis: str = "") -> Comparison:
    """Compare ``got`` with the reference ``ref`` (tensors, or other values for equality).

    Passes when ``max|got - ref| <= tol``; without ``tol``, ``tol = atol + rtol * max|ref|``.

    Example::

        >>> c = compare("output", "output", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-12]), 1e-10, 0)
        >>> c.passed, c.max_abs < 1e-11
        (True, True)
    """
    if not isinstance(ref, Tensor) or not isinstance(got, Tensor):
        same = type(got) is type(ref) and _equal_values(got, ref)
        return Comparison(name, kind, 0.0 if same else math.inf, 0.0 if same else math.inf, rtol, atol, same,
                          "" if same else f"{_short(got)} != {_short(ref)}", 0.0, "equal")
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(name, kind, math.inf, math.inf, rtol, atol, False,
                          f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}", 0.0, basis)
    if not (ref.is_floating_point() or ref.is_complex()):
        rtol = atol = tol = 0.0  # integers and booleans must be equal
        basis = "equal"
    a = got.detach().to("cpu", torch.float64)
    b = ref.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    same_nonfinite = (a == b) | (torch.isnan(a) & torch.isnan(b))
    scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
    if tol is None:
        tol = atol + rtol * scale
        basis = basis or f"rtol {rtol:.0e} atol {atol:.0e}"
    if bool((~finite & ~same_nonfinite).any()):
        return Comparison(name, kind, math.inf, math.inf, rtol, atol, False, "non-finite values differ", tol, basis)
    err = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    return Comparison(name, kind, err, rel, rtol, atol, err <= tol, "", tol, basis)


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
# The noise of the unsharded computation: per compared tensor, from the reference runs.

#: Relative size of the Monte Carlo perturbations; the measured change is divided by it (a
#: sensitivity). Small enough for a model to respond linearly, and well above float32's unit
#: roundoff (6e-8): models that compute a part in float32 whatever their dtype (Hugging Face
#: Llama's RMSNorm casts to float32) would otherwise round a tinier perturbation away, or turn
#: it into a whole float32 unit, which divided by a tiny delta looks like a huge sensitivity.
_DELTA = 2.0 ** -16

_aten = torch.ops.aten
#: Operations that round nothing (a float64 copy is exact): left unperturbed.
_EXACT = {_aten._to_copy, _aten.clone, _aten.copy_, _aten.detach, _aten.lift_fresh_copy, _aten.alias,
          _aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.zero_, _aten.fill_}


class _RoundingModel(TorchDispatchMode):
    """Monte Carlo arithmetic on a float64 run: every floating result of every operation
    (forward, backward, optimizer step) becomes ``r * (1 + delta * s)`` with ``s`` uniform in
    [-1, 1] per element, as if each result were rounded to nearest with a unit roundoff of
    ``delta`` (a relative error uniform within one unit).

    Views compute nothing and are left alone; in-place results are perturbed in place; exact
    copies are skipped; a value that would overflow keeps its value. The draws come from a
    private generator (the caller's random state, e.g. dropout masks, is untouched).
    """

    def __init__(self, seed: int, delta: float = _DELTA) -> None:
        super().__init__()
        self.delta = delta
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def _draw(self, t: Tensor) -> Tensor:
        gen = self._gens.get(t.device)
        if gen is None:
            gen = self._gens[t.device] = torch.Generator(device=t.device).manual_seed(self.seed)
        return torch.rand(t.shape, generator=gen, device=t.device, dtype=t.dtype) * 2 - 1

    def _noisy(self, t: Tensor) -> Tensor:
        noisy = t * (1 + self.delta * self._draw(t))
        return torch.where(torch.isfinite(noisy), noisy, t)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _EXACT:
            return out
        aliases = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
        if aliases and not any(a.is_write for a in aliases):
            return out  # a view of its input

        def perturb(t: Any) -> Any:
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
                return t
            if aliases:  # in place (or out=): the result is the mutated input
                with torch.no_grad():
                    t.copy_(self._noisy(t))
                return t
            return self._noisy(t)

        return map_tensors(out, perturb)


def _named_values(step: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of one step (the reference's, or a rank's before reassembly), by the names
    the comparisons give them: ``param w``, ``output...``, ``grad input[0]``, ``grad w``,
    ``step w``, ``second forward output...``; the module records as ``module <key><leaf>``."""
    named: dict[str, Any] = {}
    named.update({f"param {n}": v for n, v in (step.get("params0") or {}).items()})
    named.update(dict(flatten(step.get("output"), "output")) if "output" in step else {})
    named.update({f"grad {n}": v for n, v in (step.get("input_grads") or {}).items()})
    named.update({f"grad {n}": v for n, v in (step.get("grads") or {}).items()})
    named.update({f"step {n}": v for n, v in (step.get("params") or {}).items()})
    if "second" in step:
        named.update({f"second forward {n}": v for n, v in flatten(step["second"], "output")})
    for key, _, _, leaves in step.get("modules") or []:
        named.update({f"module {key}{name}": v for name, v in leaves})
    return {n: v for n, v in named.items() if isinstance(v, Tensor) and v.is_floating_point()}


def _max_abs(t: Tensor) -> float:
    t = t.detach().to("cpu", torch.float64)
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _max_diff(a: Tensor, b: Tensor) -> float:
    """``max|a - b|`` over the elements finite in both (shapes must agree)."""
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0


class Tolerances:
    """The tolerance of every compared tensor, by name (see :func:`noise_tolerance`).

    :meth:`derive` measures them from the reference runs; :meth:`fixed` is ``atol + rtol *
    max|reference|`` for every tensor. Calling it gives :func:`compare`'s tolerance keywords.
    """

    def __init__(self, dtype: torch.dtype, table: dict[str, tuple[float, str]] | None = None,
                 fixed: tuple[float, float] | None = None, prefix: str = "") -> None:
        self.dtype = dtype
        self.table = table or {}
        self.fixed_rtol_atol = fixed
        self.prefix = prefix  # "module " for the module records

    @classmethod
    def fixed(cls, dtype: torch.dtype, rtol: float, atol: float) -> Tolerances:
        return cls(dtype, fixed=(rtol, atol))

    @classmethod
    def derive(cls, dtype: torch.dtype, truth: dict[str, Any], runs: Sequence[dict[str, Any]],
               samples: Sequence[dict[str, Any]], delta: float = _DELTA, margin: float | None = None,
               run_dtype: torch.dtype | None = None, unit_roundoff: float | None = None) -> Tolerances:
        """From the float64 ``truth`` step, the steps ``runs`` in ``run_dtype`` (default
        ``dtype``; for float64, float32 runs whose errors are scaled by the ratio of unit
        roundoffs; the largest error counts) and the float64 ``samples`` run under
        :class:`_RoundingModel` with ``delta``; ``unit_roundoff``: that of the coarsest dtype
        the computation rounds in, when coarser than ``dtype`` (see :func:`coarsest_roundoff`)."""
        run_dtype = dtype if run_dtype is None else run_dtype
        scale = default_tolerance(dtype).unit_roundoff / default_tolerance(run_dtype).unit_roundoff
        ref = _named_values(truth)
        ran = [_named_values(r) for r in runs]
        drawn = [_named_values(s) for s in samples]

        def diff(other: dict[str, Tensor], name: str, t: Tensor) -> float | None:
            o = other.get(name)
            return _max_diff(o, t) if o is not None and tuple(o.shape) == tuple(t.shape) else None

        table = {}
        for name, t in ref.items():
            errs = [e for e in (diff(r, name, t) for r in ran) if e is not None]
            err = max(errs) * scale if errs else None
            sens = max((d for d in (diff(s, name, t) for s in drawn) if d is not None), default=0.0) / delta
            table[name] = noise_tolerance(dtype, _max_abs(t), run=err, sensitivity=sens, margin=margin,
                                          unit_roundoff=unit_roundoff)
        return cls(dtype, table)

    def __call__(self, name: str, ref: Any = None) -> dict[str, Any]:
        if self.fixed_rtol_atol is not None:
            rtol, atol = self.fixed_rtol_atol
            return {"rtol": rtol, "atol": atol}
        if self.prefix + name in self.table:
            tol, basis = self.table[self.prefix + name]
        else:  # not measured (e.g. a module record only the ranks have): its own rounding
            magnitude = _max_abs(ref) if isinstance(ref, Tensor) and ref.is_floating_point() else 0.0
            tol, basis = noise_tolerance(self.dtype, magnitude)
        return {"tol": tol, "basis": basis}

    def modules(self) -> Tolerances:
        """The tolerances of the module records (named ``module <key><leaf>`` in the table)."""
        return Tolerances(self.dtype, self.table, self.fixed_rtol_atol, "module ")


def _keep_overflow(truth: dict[str, Any], run: dict[str, Any] | None) -> None:
    """Where the unsharded model itself overflows in the tested dtype (inf or nan where the
    float64 truth is finite), the truth takes its value: that is the dtype's behaviour, which
    the sharded model must reproduce, not a difference. In place."""
    if run is None:
        return
    ran = _named_values(run)
    for name, t in _named_values(truth).items():
        r = ran.get(name)
        if r is None or tuple(r.shape) != tuple(t.shape):
            continue
        bad = ~torch.isfinite(r) & torch.isfinite(t)
        if bool(bad.any()):
            t.copy_(torch.where(bad, r.to(t.dtype), t))


def coarsest_roundoff(gm: Any, dtype: torch.dtype) -> float | None:
    """The unit roundoff of the coarsest floating dtype a captured graph computes in, when it is
    coarser than ``dtype`` (the model's own code casts down: Hugging Face's Mixtral routes in
    float32 inside a float64 model), else None. The sharded model's sums then round in that
    dtype too, and its noise is that dtype's.

    Example::

        >>> import torch.fx as fx
        >>> g = fx.symbolic_trace(lambda x: x.float().softmax(-1).double())
        >>> _ = [n.meta.update(tensor_meta=type("M", (), {"dtype": torch.float32})()) for n in g.graph.nodes]
        >>> coarsest_roundoff(g, torch.float64) == 2.0 ** -24
        True
    """
    own = default_tolerance(dtype).unit_roundoff
    coarsest = None
    for node in gm.graph.nodes:
        metas = node.meta.get("tensor_meta"), node.meta.get("val")
        for m in metas:
            for leaf in (m if isinstance(m, (list, tuple)) else [m]):
                dt = getattr(leaf, "dtype", None)
                if isinstance(dt, torch.dtype) and dt in DEFAULT_TOLERANCES:
                    u = DEFAULT_TOLERANCES[dt].unit_roundoff
                    if u > own and (coarsest is None or u > coarsest):
                        coarsest = u
    return coarsest
