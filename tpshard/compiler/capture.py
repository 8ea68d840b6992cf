"""Capture: an ``nn.Module`` plus example inputs -> a shape-annotated FX graph.

Phases:
1. trace with a leaf-aware ``torch.fx`` tracer (torch.nn layers stay ``call_module``); forward
   arguments that are not given become constants (``concrete_args``), as their defaults;
2. propagate shapes on fake tensors (no real memory, also for a model on the meta device);
3. describe every node for the planner (:mod:`tpshard.compiler.ir`).

The model is never modified: the traced GraphModule shares its submodules and parameters.

Example::

    >>> import torch
    >>> c = capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
    >>> [op.kind for op in c.ops]
    ['input', 'linear', 'pointwise', 'output']
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from tpshard.compiler.blocks import NotRepeatable, build_stamped, find_repeated, stamp, truncated
from tpshard.compiler.capture_export import capture_export
from tpshard.compiler.captured import Captured
from tpshard.compiler.ir import describe_fx
from tpshard.compiler.ir_aten import describe_aten
from tpshard.compiler.moe import attach, find_regions, regions_as_nodes, stand_ins

__all__ = ["Captured", "CaptureError", "capture", "infer_example_inputs"]


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the module, the operation and the fix."""


class _Tracer(fx.Tracer):
    """torch.nn layers without sublayers are leaves; remembers where tracing failed."""

    def __init__(self, leaves: frozenset = frozenset()) -> None:
        super().__init__()
        self.failed_in: str | None = None
        self.leaves = leaves  # experts regions (tpshard.compiler.moe): one node each

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        # A torch.nn layer made of other layers (nn.TransformerEncoder, nn.MultiheadAttention)
        # is traced through: as a leaf it would be one opaque call that no rule can split.
        if next(iter(m.children()), None) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


def _user_frame(tb: Any) -> str:
    """The innermost source line outside torch: the operation that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno}: {f.line}"


def _signature_args(model: nn.Module, n_args: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward parameters that are neither given positionally nor by keyword: their defaults."""
    sig = inspect.signature(model.forward)
    concrete = {}
    for i, (name, p) in enumerate(sig.parameters.items()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i < n_args or name in kwargs:
            continue
        if p.default is inspect.Parameter.empty:
            continue
        concrete[name] = p.default
    return concrete


def trace(model: nn.Module, n_args: int = 1, kwargs: dict[str, Any] | None = None,
          leaves: frozenset = frozenset()) -> fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`CaptureError` naming the failing module."""
    kwargs = kwargs or {}
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model, concrete_args=_signature_args(model, n_args, kwargs) or None)
    except Exception as e:
        where = tracer.failed_in or "<root>"
        mod = model.get_submodule(where) if where != "<root>" else model
        line = _user_frame(e.__traceback__)
        raise CaptureError(
            f"torch.fx could not trace module {where!r} ({type(mod).__name__})"
            + (f" at {line}" if line else "")
            + f": {type(e).__name__}: {e}. Symbolic tracing cannot follow Python control flow on "
            "tensor values or shapes; rewrite that line without it, or mark the module as a leaf"
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def infer_example_inputs(model: nn.Module, gm: fx.GraphModule, batch: int = 2, seq: int = 8) -> tuple:
    """Example inputs when they can be inferred without guessing: a single required input whose
    first consumer is an nn.Embedding (integer ids) or an nn.Linear (floats of in_features)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if len(required) != 1:
        raise CaptureError(
            f"cannot infer example inputs for {type(model).__name__}: its forward takes "
            f"{len(required)} required inputs ({[n.target for n in required]}); pass example_inputs=(...)"
        )
    first = _first_leaf(gm, required[0])
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(first, nn.Embedding):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, first.num_embeddings, (batch, seq), generator=g)
        return (ids.to(device),)
    if isinstance(first, nn.Linear):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, first.in_features, generator=g, dtype=first.weight.dtype if first.weight.is_floating_point() else None)
        return (x.to(device),)
    raise CaptureError(
        f"cannot infer example inputs for {type(model).__name__}: its input first reaches "
        f"{type(first).__name__ if first is not None else 'no nn.Embedding or nn.Linear'}; pass example_inputs=(...)"
    )


def _first_leaf(gm: fx.GraphModule, start: fx.Node) -> nn.Module | None:
    frontier = [start]
    seen = set()
    while frontier:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "call_module":
                    return gm.get_submodule(u.target)
                nxt.append(u)
        frontier = nxt
    return None


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records each node's ``tensor_meta`` (as torch's ShapeProp does,
    without its symbolic-shape machinery, whose import alone costs a second)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise RuntimeError(f"shape propagation failed at {n.format_node()}: {e}") from e
        if any(isinstance(r, torch.Tensor) for r in _leaves(result)):
            n.meta["tensor_meta"] = fx.node.map_aggregate(
                result, lambda r: _tensor_metadata(r) if isinstance(r, torch.Tensor) else r)
        n.meta["type"] = type(result)
        return result


def _tensor_metadata(t: torch.Tensor) -> Any:
    """torch's TensorMetadata, with the memory format from the tensor's own contiguity checks
    (torch's symbolic ones import sympy, a second at start-up)."""
    meta = _extract_tensor_metadata(t, include_contiguity=False)
    if t.layout != torch.strided:
        return meta
    for fmt, ndim in ((torch.contiguous_format, None), (torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if (ndim is None or t.dim() == ndim) and t.is_contiguous(memory_format=fmt):
            return meta._replace(memory_format=fmt)
    return meta


def _leaves(value: Any) -> list:
    out: list = []
    fx.node.map_aggregate(value, out.append)
    return out


# Shape propagation runs the example for real when that is cheaper than the meta device, whose
# first op imports torch._dynamo (~2 s): parameter elements x example input elements, a bound on
# the multiply-adds of the run (about 0.1 s of compute at this bound on a laptop core).
_REAL_RUN_WORK = 2e9


def _propagate_shapes(gm: fx.GraphModule, args: list[Any]) -> None:
    """Record every node's shape without touching the model, the cheapest way that works:

    - a model on the meta device runs as it is;
    - a small one runs for real, on a twin that shares the parameters and has copies of the
      buffers (a BatchNorm's running statistics are not updated), with the random state restored
      afterwards (dropout draws nothing from the user's stream);
    - a large one runs on a meta twin; a graph that mixes devices or reads values on fake tensors.
    """
    tensors = [*gm.parameters(), *gm.buffers(), *(a for a in args if isinstance(a, torch.Tensor))]
    if all(t.is_meta for t in tensors):
        _ShapeRecorder(gm).run(*args)  # meta tensors carry shapes already: no fake mode needed
        return
    n_params = sum(p.numel() for p in gm.parameters())
    n_input = max([a.numel() for a in args if isinstance(a, torch.Tensor)] or [1])
    if not any(t.is_meta for t in tensors) and n_params * n_input <= _REAL_RUN_WORK:
        _run_real(gm, args)
        return
    try:
        twin = _twin(gm, _to_meta)
        _ShapeRecorder(twin).run(*[_to_meta(a) if isinstance(a, torch.Tensor) else a for a in args])
    except Exception:  # noqa: BLE001 - the fake-tensor run below is the one whose error counts
        pass
    else:
        _copy_records(twin, gm)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with fake_mode:
        _ShapeRecorder(gm).run(*fake_args)


def _run_real(gm: fx.GraphModule, args: list[Any]) -> None:
    buffers = {id(b) for b in gm.buffers()}
    twin = _twin(gm, lambda t: t.clone() if id(t) in buffers else t)
    devices = sorted({t.device.index or 0 for t in gm.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        _ShapeRecorder(twin).run(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    _copy_records(twin, gm)


def _copy_records(twin: fx.GraphModule, gm: fx.GraphModule) -> None:
    # The twin's nodes are copies of gm's, in the same order.
    for mine, theirs in zip(gm.graph.nodes, twin.graph.nodes):
        for key in ("tensor_meta", "type"):
            if key in theirs.meta:
                mine.meta[key] = theirs.meta[key]


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    if isinstance(t, nn.Parameter):
        return nn.Parameter(m, requires_grad=t.requires_grad)
    return m.requires_grad_(t.requires_grad) if t.is_floating_point() or t.is_complex() else m


def _twin(gm: fx.GraphModule, substitute: Any) -> fx.GraphModule:
    """A deep copy of ``gm`` whose parameters and buffers are ``substitute(tensor)``."""
    memo: dict[int, Any] = {}
    for _, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if id(t) not in memo:
            memo[id(t)] = substitute(t)
    return copy.deepcopy(gm, memo)


def capture(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None,
            method: str = "auto", repeated_blocks: bool | None = None, timeout_s: float | None = None) -> Captured:
    """Capture ``model``: symbolic tracing first, ``torch.export`` when tracing fails.

    ``method``: "auto", "fx" (symbolic tracing only) or "export". Routed experts modules
    (:mod:`tpshard.compiler.moe`) are captured as one node each. With ``repeated_blocks``
    (default: true unless ``$TPSHARD_REPEATED_BLOCKS`` is 0), a list of >= 3 identical blocks
    is captured as two and stamped (:mod:`tpshard.compiler.blocks`); ``Captured.note`` says so,
    or why it was captured whole.

    ``timeout_s`` bounds the capture (default: ``$TPSHARD_CAPTURE_TIMEOUT_S``, else 300 s; 0 or
    None from the variable: no bound). Past it, :class:`CaptureError` names the source line the
    capture was running. The bound needs the main thread (a timer signal); elsewhere it is off.
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"capture method {method!r}: use 'auto', 'fx' or 'export'")
    if repeated_blocks is None:
        repeated_blocks = os.environ.get("TPSHARD_REPEATED_BLOCKS", "1") != "0"
    if timeout_s is None:
        timeout_s = float(os.environ.get("TPSHARD_CAPTURE_TIMEOUT_S", _DEFAULT_TIMEOUT_S) or 0)
    try:
        with _deadline(timeout_s):
            return _capture(model, tuple(example_inputs), dict(example_kwargs or {}), method, repeated_blocks)
    except _CaptureTimeout as t:
        raise CaptureError(
            f"capturing {type(model).__name__} did not finish in {timeout_s:g} s; it was running {t.where}. "
            "Capture cannot follow this code in bounded time: simplify that line (e.g. Python control flow on "
            "tensor values), pass example_inputs that take a simpler path, or raise the bound with "
            "TPSHARD_CAPTURE_TIMEOUT_S") from None


_DEFAULT_TIMEOUT_S = 300.0


class _CaptureTimeout(BaseException):
    """Raised by the timer inside whatever capture runs; a BaseException, so that the generic
    ``except Exception`` of tracing code (and the fallbacks here) do not swallow it."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    # An outer timer (pytest-timeout's, a job's) keeps its deadline: whichever is first fires,
    # and the outer one is re-armed with what is left of it afterwards. The timer repeats every
    # half second past the deadline: an exception raised while Python runs a finalizer is
    # printed and dropped, and a capture must not outlive its bound because of one.
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    ours_at = started + seconds
    outer_at = started + outer_left if outer_left else float("inf")

    def expire(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now >= outer_at - 1e-3 and callable(previous):
            previous(signum, frame)
        elif now >= ours_at - 1e-3:
            raise _CaptureTimeout(_running_line(frame))

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left or seconds), 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_at - time.monotonic(), 1e-3), outer_interval)


def _running_line(frame: Any) -> str:
    """The innermost line on the stack that is the model's code: not torch, its symbolic maths
    (sympy), tpshard or the standard library."""
    libs = [os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__))]
    if "sympy" in sys.modules:
        libs.append(os.path.dirname(sys.modules["sympy"].__file__))
    stdlib = os.path.dirname(os.__file__)

    def library(path: str) -> bool:
        return path.startswith(tuple(libs)) or (path.startswith(stdlib) and "site-packages" not in path)

    for f in reversed(traceback.extract_stack(frame)):
        if not library(f.filename):
            return f"{f.filename}:{f.lineno} ({f.name}): {f.line}"
    return "inside torch (no model source line on the stack)"


def _capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any], method: str,
             repeated_blocks: bool) -> Captured:
    on_meta = any(p.is_meta for p in model.parameters())
    regions = stand_ins(model) if on_meta else find_regions(model, example_inputs, example_kwargs)

    def whole() -> Captured:  # (the block list cut or not)
        with regions_as_nodes(regions):
            c = _capture_whole(model, example_inputs, example_kwargs, method, frozenset(r.path for r in regions))
        attach(c.gm, c.ops, regions)
        return c

    blocks = find_repeated(model) if repeated_blocks else None
    if blocks is None:
        return whole()
    try:
        with truncated(model, blocks):
            two = whole()
        st = stamp(two.gm, blocks)
    except Exception as e:  # noqa: BLE001 - captured whole instead; the reason goes in the note
        why = str(e).splitlines()[0] if isinstance(e, NotRepeatable) else f"the two-block capture failed ({type(e).__name__})"
        c = whole()
        c.note = "; ".join(filter(None, [c.note, f"{blocks.container or 'the model'}: {blocks.count} blocks "
                                                 f"captured whole: {why}"]))
        return c
    note = (f"{blocks.container or 'the model'}: {blocks.count} identical blocks, two captured; "
            f"{blocks.block(2)} .. {blocks.block(blocks.count - 1)} stamped from {blocks.block(1)}")

    def build() -> tuple[fx.GraphModule, list]:  # the full graph, when something needs it
        gm = build_stamped(two.gm, model, st)
        ops = describe_aten(gm) if two.kind == "export" else describe_fx(gm)
        attach(gm, ops, regions)  # the stamped blocks' experts, as block 1's
        return gm, ops

    return Captured(None, None, two.kind, model, two.example_inputs, two.example_kwargs,
                    "; ".join(filter(None, [two.note, note])), repeated=(two, st), build=build)


def _capture_whole(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any], method: str,
                   leaves: frozenset = frozenset()) -> Captured:
    if method == "export":
        return capture_export(model, _require_inputs(model, example_inputs, example_kwargs), example_kwargs)
    try:
        return _capture_fx(model, example_inputs, example_kwargs, leaves)
    except CaptureError as fx_error:
        if method == "fx":
            raise
        if not example_inputs and not example_kwargs:
            raise CaptureError(f"{fx_error}\nPass example_inputs=(...) to let tpshard capture it with "
                               "torch.export instead") from None
        try:
            return capture_export(model, example_inputs, example_kwargs)
        except Exception as e:
            # torch's message runs to pages (the partial graph); its first line and the model's
            # line say what failed. The whole error is chained (``__cause__``).
            line = _user_frame(e.__traceback__)
            first = (str(e).strip().splitlines() or [""])[0]
            raise CaptureError(f"{fx_error}\n... and torch.export failed too" + (f" at {line}" if line else "")
                               + f": {type(e).__name__}: {first}") from e


def _require_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    if args or kwargs:
        return args
    raise CaptureError(f"capturing {type(model).__name__} with torch.export needs example_inputs=(...)")


def _capture_fx(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any],
                leaves: frozenset = frozenset()) -> Captured:
    gm = trace(model, len(example_inputs), example_kwargs, leaves)
    if not example_inputs and not example_kwargs:
        example_inputs = infer_example_inputs(model, gm)
    args = []
    pos = list(example_inputs)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if pos:
            args.append(pos.pop(0))
        elif node.target in example_kwargs:
            args.append(example_kwargs[node.target])
        elif node.args:
            args.append(node.args[0])
        else:
            raise CaptureError(f"no example value for the input {node.target!r} of {type(model).__name__}")
    try:
        _propagate_shapes(gm, args)
    except Exception as e:
        raise CaptureError(f"running {type(model).__name__} on the example inputs failed: {e}") from e
    return Captured(gm, describe_fx(gm), "fx", model, example_inputs, example_kwargs)
