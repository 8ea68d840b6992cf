"""One training step, the same for the ranks and the reference, and the body of each rank.

A :class:`~tpshard.verify.model._Job` carries the model's source, the plan and the inputs to the ranks. Each rank
(:func:`_rank_main`) builds its sharded module with :func:`tpshard.parallelize`, records its
module outputs for localization, and runs :func:`_run_step`: a forward whose collectives are
counted, a weighted-sum backward (each rank weights its slice of a split output), one SGD step
and a second forward with fresh inputs. Everything comes back on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from tpshard import layout
from tpshard.api import parallelize
from tpshard.verify.compare import _to_cpu, flatten, map_tensors
from tpshard.verify.step import _output_layout
from tpshard.verify.localize import _Probes, _Recorder, _sharded_tag
from tpshard.verify.model import _Job

# ---------------------------------------------------------------------------------------------
# Collective counting: per kind, as CommDebugMode counts, plus the bytes each collective moves.

_KIND_NAMES = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
               "_allgather_base_": "all_gather", "allgather_": "all_gather",
               "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
               "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
               "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
               "broadcast_": "broadcast", "broadcast": "broadcast", "alltoall_": "all_to_all",
               "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all"}
_KINDS = set(_KIND_NAMES.values())


def _counter() -> Any:
    """Counts the collectives dispatched, per kind, as ``CommDebugMode`` does, and records the
    bytes of the largest tensor each call hands over (the all-reduced buffer, the gathered
    output, the reduce-scattered input): ``.summary()`` -> ``{"all_reduce": {"count": n,
    "bytes": b}}``. A dispatch mode rather than CommDebugMode itself: its module tracker loses
    its parent stack inside Hugging Face's experts modules (they call a shared activation)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = defaultdict(int)
            self.bytes: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func.namespace in ("c10d", "_c10d_functional") and _kind(func._overloadpacket) in _KINDS:
                kind = _kind(func._overloadpacket)
                tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, Tensor)]
                self.counts[kind] += 1
                self.bytes[kind] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return out

        def summary(self) -> dict[str, dict[str, int]]:
            return {k: {"count": n, "bytes": int(self.bytes[k])} for k, n in sorted(self.counts.items())}

    return _Counter()


def _kind(packet: Any) -> str:
    name = getattr(packet, "__name__", str(packet)).split(".")[-1]
    return _KIND_NAMES.get(name, name)


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
    with fwd:
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
    with bwd:
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


# ---------------------------------------------------------------------------------------------
# The body of each rank.


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank_device(device: str) -> torch.device:
    if device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _rank_main(rank: int, world_size: int, job: _Job) -> dict[str, Any]:
    """Body of one rank: build the sharded module, run the step, return everything on the CPU."""
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
