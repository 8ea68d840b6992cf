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

import copy
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from tpshard.compiler import capture, make_plan
from tpshard.models.resolve import resolve_model
from tpshard.plan import Plan, PlanError
from tpshard.verify.compare import _comparisons, default_tolerance, parse_dtype
from tpshard.verify.launch import run_ranks
from tpshard.verify.localize import _fallback_divergence, _localize, _Recorder
from tpshard.verify.model import _Job, _named_tensors, _Source, _source_for, active_dropout
from tpshard.verify.ranks import _convert, _fresh, _output_shapes, _rank_main, _run_step
from tpshard.verify.report import VerifyReport

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
        rtol, atol: tolerances (default :func:`default_tolerance` of ``dtype``).
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
        plan = make_plan(c.gm, c.ops, world_size, overrides, c.kind)
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
