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
Collectives are counted at the dispatcher, per kind as torch's ``CommDebugMode`` counts them,
with bytes, forward and backward.

Every tensor is compared with the original run in float64 (from the tested dtype's weights
and inputs), to a tolerance derived from the rounding noise the *unsharded* model makes in
that tensor: its own error when run in the tested dtype (for float64: in float32, scaled by
the ratio of unit roundoffs), and how far the tensor moves when every operation's result is
rounded at random to the dtype's unit roundoff (Monte Carlo arithmetic on the float64 run),
times a per-dtype margin (:func:`tpshard.verify_compare.noise_tolerance`,
:data:`DEFAULT_TOLERANCES`). So a near-zero sum of large terms gets the tolerance of the terms,
and a defect well above the dtype's noise fails. ``rtol``/``atol`` replace it with a fixed
``atol + rtol * max|reference|``.

Dropout active in training mode cannot match (the ranks and the original draw different masks),
so :func:`verify` puts such a model in eval mode and says so in ``report.notes``; with
``keep_dropout=True`` it keeps training mode and names dropout as the reason of any mismatch.

This module runs the phases; the pieces live in :mod:`tpshard.verify.compare` (tolerances,
comparisons), :mod:`tpshard.verify.model` (dropout, the job and getting the model to the
ranks), :mod:`tpshard.verify.ranks` (the training step and the body of each rank),
:mod:`tpshard.verify.localize` (first-divergence localization), :mod:`tpshard.verify.report`
(the report) and :mod:`tpshard.verify.launch` (real ranks).

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
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from tpshard.compiler import capture, plan_captured
from tpshard.models.resolve import resolve_model
from tpshard.plan import Plan, PlanError
from tpshard.verify.compare import (Tolerances, _keep_overflow, _RoundingModel, coarsest_roundoff, default_tolerance,
                                    map_tensors, parse_dtype)
from tpshard.verify.launch import run_ranks
from tpshard.verify.localize import _fallback_divergence, _localize, _Recorder
from tpshard.verify.model import _Job, _named_tensors, _Source, _source_for, active_dropout
from tpshard.verify.ranks import _convert, _fresh, _output_shapes, _rank_main, _run_step
from tpshard.verify.report import VerifyReport
from tpshard.verify.step import _comparisons

__all__ = ["verify"]

# ---------------------------------------------------------------------------------------------
# verify.


def verify(model: nn.Module | str, world_size: int, *, example_inputs: Any = (), example_kwargs: dict | None = None,
           device: str = "cpu", dtype: torch.dtype | str = torch.float64, plan: Plan | None = None,
           backward: bool = True, optimizer_step: bool = True, rtol: float | None = None,
           atol: float | None = None, timeout: float = 300.0, keep_dropout: bool = False,
           overrides: dict[str, str] | None = None) -> VerifyReport:
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
        rtol, atol: fixed tolerances, ``atol + rtol * max|reference|`` for every tensor
            (default: each tensor's tolerance derived from the rounding noise of the unsharded
            model, see :func:`tpshard.verify_compare.noise_tolerance`).
        timeout: seconds for the ranks; a hung or dead rank fails the call within it.
        keep_dropout: keep dropout active in training mode (default: switch to eval, with a note).
        overrides: module path pattern -> style, as in :func:`tpshard.plan` (ignored with ``plan``).
    Returns:
        a :class:`VerifyReport`; ``report.ok`` only when every comparison passes.
    Raises:
        tpshard.verify.launch.RankError (a rank raised; its traceback is in the message),
        tpshard.verify.launch.RankTimeout (a rank hung or died), ValueError / PlanError / CaptureError
        (the model, inputs or plan cannot be used as given; the message says why).

    Example::

        >>> import torch, tpshard
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> tpshard.verify(mlp, 2, example_inputs=(torch.randn(3, 8),)).ok  # doctest: +SKIP
        True
    """
    return _verify(model, world_size, example_inputs=example_inputs, example_kwargs=example_kwargs, device=device,
                   dtype=dtype, plan=plan, backward=backward, optimizer_step=optimizer_step, rtol=rtol, atol=atol,
                   timeout=timeout, keep_dropout=keep_dropout, overrides=overrides)


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


def _float64_kernels(work: nn.Module) -> list[str]:
    """The reference runs in float64; Hugging Face's grouped_mm experts have no float64 kernel,
    so their config selects the eager loop (the same function) for the verification."""
    notes = []
    for config in {id(c): c for c in (getattr(m, "config", None) for m in work.modules()) if c is not None}.values():
        if getattr(config, "_experts_implementation", None) == "grouped_mm":
            config._experts_implementation = "eager"
            notes.append("experts: Hugging Face's grouped_mm has no float64 kernel, so the experts ran their "
                         "eager loop (the same function) for the float64 reference and the ranks")
    return notes[:1]


def _verify(model: nn.Module | str, world_size: int, *, example_inputs: Any = (), example_kwargs: dict | None = None,
            device: str = "cpu", dtype: torch.dtype | str = torch.float64, plan: Plan | None = None,
            backward: bool = True, optimizer_step: bool = True, rtol: float | None = None,
            atol: float | None = None, timeout: float = 300.0, keep_dropout: bool = False,
            overrides: dict[str, str] | None = None,
            localize: bool = True, start_method: str | None = None,
            _tamper: Callable[[int, int, nn.Module], None] | None = None) -> VerifyReport:
    """:func:`verify`, plus the knobs tests need: ``_tamper(rank, world_size, sharded)`` runs
    in each rank right after parallelize (a module-level function when ranks are spawned), to
    inject a fault; ``start_method`` picks fork/spawn; ``localize`` records module outputs."""
    t0 = time.perf_counter()
    dtype = parse_dtype(dtype)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    default_tolerance(dtype)  # a dtype with a tolerance, before any rank starts
    derive = rtol is None and atol is None

    # Phase 1: a private copy of the model in `dtype`, its inputs, dropout, the plan.
    label, spec, work, args, kwargs = _prepare(model, dtype, example_inputs, example_kwargs)
    notes: list[str] = _float64_kernels(work)
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
        plan = plan_captured(c, world_size, overrides)
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

    # Phase 3: the original, after the ranks (no OpenMP state is forked), hooked at the same
    # modules: in float64 (the truth), in the tested dtype, and under the rounding model.
    ref_device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
    work.to(ref_device)
    paths = list(dict.fromkeys(rec[1] for rec in ranks[0]["modules"]))
    truth, runs, samples = _reference_steps(work, job, ref_device, paths if localize else None, derive)
    if dtype != torch.float64:
        _keep_overflow(truth, runs[0])

    # Phase 4: compare, then localize a mismatch.
    report = VerifyReport(model=label, world_size=world_size, device=device, dtype=str(dtype).removeprefix("torch."),
                          backend=backend, notes=notes, plan=plan)
    if derive:
        coarse = coarsest_roundoff(c.gm, dtype)
        if coarse is not None:
            notes.append(f"the model computes in a coarser dtype somewhere (unit roundoff {coarse:.1e}, e.g. a "
                         "float32 router): the noise of every tensor is taken at that roundoff")
        tols = Tolerances.derive(dtype, truth, runs, samples, run_dtype=_run_dtype(dtype), unit_roundoff=coarse)
        spec = default_tolerance(dtype)
        report.tolerance = {"derived": True, "margin": spec.margin, "unit_roundoff": spec.unit_roundoff,
                            "runs": len(runs), "run_dtype": str(_run_dtype(dtype)).removeprefix("torch."),
                            "samples": len(samples)}
    else:
        tols = Tolerances.fixed(dtype, rtol or 0.0, atol or 0.0)
        report.tolerance = {"derived": False, "rtol": rtol or 0.0, "atol": atol or 0.0}
    report.comparisons = _comparisons(ranks, truth, job, tols, report.notes)
    report.collectives = {"forward": ranks[0]["collectives"].get("forward", {}),
                          "backward": ranks[0].get("backward_collectives", {})}
    if not report.ok and localize:
        report.modules, report.first_divergence, report.divergence = _localize(
            [r["modules"] for r in ranks], truth.get("modules", []), plan, tols=tols)
        if report.first_divergence is None:
            report.first_divergence, report.divergence = _fallback_divergence(report, paths)
        if report.first_divergence is None and report.modules:
            report.divergence = ("every module output matches; the difference arises in functional code "
                                 f"after {report.modules[-1].name!r} or in the second forward")
        if dropout:
            report.divergence = "dropout is active in training mode; " + (report.divergence or "outputs differ")
    report.seconds = time.perf_counter() - t0
    return report


#: Runs of the unsharded model in the noise dtype (the first exact, the others with every
#: floating parameter and input moved by up to one unit roundoff: new rounding everywhere) and
#: draws of the rounding model in float64, per verification. A tensor of a few elements (a
#: scalar) errs by a different amount in each realization, so one run alone can understate its
#: noise: of two equal noises one is 4x the other in 16% of draws.
_RUNS, _SAMPLES = 4, 2


def _run_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the unsharded runs whose error is the noise floor: the tested dtype, or
    float32 for float64 (its error scaled by the ratio of unit roundoffs: rounding errors are
    proportional to the unit roundoff, and a float32 run sees the real kernels' rounding, e.g.
    a LayerNorm's mean, which shifts every output of a row alike)."""
    return torch.float32 if dtype == torch.float64 else dtype


def _jitter(obj: Any, dtype: torch.dtype, gen: torch.Generator) -> Any:
    """Every floating tensor of ``obj`` (a module's parameters, or inputs) times ``1 + u * s``,
    ``s`` uniform in [-1, 1], rounded to ``dtype``: a new rounding realization downstream.
    Buffers (masks, rotary tables) are constants of the model and are left alone."""
    u = default_tolerance(dtype).unit_roundoff

    def move(t: torch.Tensor) -> torch.Tensor:
        s = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.device) * 2 - 1
        return (t.detach().to(torch.float64) * (1 + u * s)).to(t.dtype)

    if isinstance(obj, nn.Module):
        with torch.no_grad():
            for t in obj.parameters():
                if t.is_floating_point():
                    t.copy_(move(t))
        return obj
    return map_tensors(obj, lambda t: move(t) if t.is_floating_point() else t)


def _reference_steps(work: nn.Module, job: _Job, device: torch.device, paths: list[str] | None, derive: bool
                     ) -> tuple[dict, list[dict], list[dict]]:
    """The original's training step: (truth, runs, samples).

    ``truth`` is the step in float64 (for a lower ``job.dtype``, from its rounded weights and
    inputs, widened: the same function); ``runs`` the step in :func:`_run_dtype`, exact and
    :data:`_RUNS` - 1 times jittered (:func:`_jitter`; for float64 none unless ``derive``;
    only the exact one unless ``derive``); ``samples`` the float64 step under
    :class:`_RoundingModel`, :data:`_SAMPLES` draws (none unless ``derive``). Every step
    records the module outputs at ``paths`` (under ``"modules"``) when given; ``work`` ends in
    the state of its own step.
    """
    wide = job.dtype == torch.float64
    pristine = copy.deepcopy(work).to(torch.float64) if (derive or not wide) else None  # before any step

    def retyped(dtype: torch.dtype, gen: torch.Generator | None = None) -> _Job:
        def conv(x: Any) -> Any:
            x = _convert(x, dtype)
            return x if gen is None else _jitter(x, dtype, gen)

        return dataclasses.replace(job, dtype=dtype, args=conv(job.args), kwargs=conv(job.kwargs),
                                   fresh_args=conv(job.fresh_args), fresh_kwargs=conv(job.fresh_kwargs))

    def step(model: nn.Module, j: _Job, mode: Any = None) -> dict:
        recorder = _Recorder(model, paths, lambda m: ("full",)) if paths is not None else None
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), (mode or contextlib.nullcontext()):
            # the caller's random state is left as it was
            result = _run_step(model, j, device, recorder, False, lambda name, t: None)
        result["modules"] = recorder.records if recorder is not None else []
        return result

    noisy = _run_dtype(job.dtype)
    runs = []
    if not wide:
        runs.append(step(work, job))
    for k in range(len(runs), _RUNS if derive else len(runs)):
        gen = torch.Generator().manual_seed(k)
        model = copy.deepcopy(pristine).to(noisy)
        runs.append(step(model if k == 0 else _jitter(model, noisy, gen), retyped(noisy, None if k == 0 else gen)))
    truth = step(work if wide else copy.deepcopy(pristine), job if wide else retyped(torch.float64))
    samples = [step(copy.deepcopy(pristine), job if wide else retyped(torch.float64), _RoundingModel(seed=k))
               for k in range(_SAMPLES if derive else 0)]
    return truth, runs, samples
