"""First-divergence localization: record every module's forward output, reassemble the sharded
ones and name the first module that differs from the original.

Modules called from the graph (``call_module`` nodes) are hooked (:class:`_Recorder`); a
``torch.export`` capture has no such nodes, so probes read module outputs off the graph where
they are computed (:class:`_Probes`). Each recorded output carries a tag that says how to
reassemble it from the ranks: column slices gathered with their layout, row and vocabulary
partial sums added up (plus the row bias), or replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from tpshard import layers, layout
from tpshard.plan import Plan
from tpshard.verify.compare import Comparison, Tolerances, _to_cpu, _worst, compare, flatten
from tpshard.verify.report import VerifyReport

# ---------------------------------------------------------------------------------------------
# Recording module outputs: forward hooks, or probes in an exported graph.


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
    values = [_attr(gm, b).detach().to("cpu", torch.float64, copy=True) for b in names]
    return sum(values[1:], values[0]) if values else None


def _attr(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target`` "a.b.c" (a parameter, buffer or other attribute)."""
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sharded_tag(module: nn.Module) -> tuple:
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


# ---------------------------------------------------------------------------------------------
# Reassembling module outputs and naming the first that differs.


def _candidate_layouts(size: int, plan: Plan) -> list[tuple[int, ...] | None]:
    found: list[tuple[int, ...] | None] = [None]
    for m in plan.modules.values():
        if m.segments and sum(m.segments) == size and len(m.segments) > 1 and m.segments not in found:
            found.append(tuple(m.segments))
    return found


def _module_comparison(key: str, tag: tuple, values: list[Any], ref: Any, plan: Plan,
                       rtol: float = 0.0, atol: float = 0.0, tols: Tolerances | None = None) -> Comparison:
    """Reassemble one module output from the ranks' values as ``tag`` says, and compare (to
    ``tols(key)``, else to ``atol + rtol * max|ref|``)."""
    world = len(values)
    kw = tols(key, ref) if tols is not None else {"rtol": rtol, "atol": atol}
    if not isinstance(ref, Tensor) or not all(isinstance(v, Tensor) for v in values):
        return _worst([compare(key, "module", v, ref, **kw) for v in values])
    if tag[0] == "slice":
        try:
            full = layout.unshard(values, tag[1], tag[2])
        except (ValueError, RuntimeError) as e:
            return Comparison(key, "module", math.inf, math.inf, rtol, atol, False, f"cannot gather: {e}")
        return dataclasses.replace(compare(key, "module", full, ref, **kw), note="column slices gathered")
    if tag[0] == "partial":
        total = torch.stack([v.double() for v in values]).sum(0)
        if tag[1] is not None:
            total = total + tag[1].double()
        return dataclasses.replace(compare(key, "module", total.to(ref.dtype), ref, **kw),
                                   note="partial sums added" + (" + bias" if tag[1] is not None else ""))
    if tag[0] == "full" or all(tuple(v.shape) == tuple(ref.shape) for v in values):
        whole = _worst([compare(key, "module", v, ref, **kw) for v in values])
        if whole.passed or tag[0] == "full":
            return whole
        total = torch.stack([v.double() for v in values]).sum(0).to(ref.dtype)
        summed = compare(key, "module", total, ref, **kw)
        return dataclasses.replace(summed, note="partial sums added") if summed.passed else whole
    dims = [d for d in range(ref.dim()) if values[0].dim() == ref.dim() and values[0].shape[d] * world == ref.shape[d]
            and all(values[0].shape[e] == ref.shape[e] for e in range(ref.dim()) if e != d)]
    if not dims:
        return compare(key, "module", values[0], ref, **kw)
    tries = [dataclasses.replace(compare(key, "module", layout.unshard(values, dims[0], segs), ref, **kw),
                                 note=f"split along dim {dims[0]}" + (f" {list(segs)}" if segs else "") + ": gathered")
             for segs in _candidate_layouts(ref.shape[dims[0]], plan)]
    return next((c for c in tries if c.passed), tries[0])


def _localize(rank_records: list[list], ref_records: list, plan: Plan, rtol: float = 0.0, atol: float = 0.0,
              tols: Tolerances | None = None) -> tuple[list[Comparison], str | None, str]:
    """Per-module forward outputs in execution order; the first module that differs (each
    output to ``tols(key + leaf)``, else to ``atol + rtol * max|ref|``)."""
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
        parts = [_module_comparison(key + name, tag, [r[i][3][j][1] for r in rank_records], ref, plan, rtol, atol,
                                    None if tols is None else tols.modules())
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
