"""In-place mode: apply a Plan to the original module object, so every method keeps working.

``tpshard.parallelize(model, n, inplace=True)`` swaps parallel layers in at the planned module
paths (collectives inside the layers: column layers copy their input, row layers and
vocabulary embeddings reduce their output) and divides the module attributes that hold head
counts or widths. No graph is kept, so ``generate()`` with its KV cache, ``save_pretrained`` and
other methods run the sharded model as they ran the original.

This module is the mode's plan time, :func:`plan_inplace` (``tpshard.plan(..., inplace=True)``):
it checks that the eager model can express the Plan and records the attributes to divide in
``Plan.attribute_changes`` (printed by ``explain()``, in the JSON and the checkpoint manifest).
:mod:`tpshard.compiler.inplace_apply` applies such a Plan and decides nothing.

Which attributes change is found by the analysis, not by a list of names:

1. a *shadow* of the model (a copy whose planned layers hold parameters of the local shapes) is
   captured the same way the model was;
2. every shape literal the Plan rewrites must come out at its local size in the shadow's graph,
   and every other literal unchanged. A literal computed from a tensor's shape (``-1``,
   ``x.shape``) already does; one that still has its global value comes from an attribute;
3. candidate attributes are the integer attributes of the node's module (and its parents) equal
   to that global value; each candidate (an attribute name on a module class) is divided in
   the shadow and kept only if the shadow's graph gets closer to the planned one without any
   literal going wrong.

A Plan that needs graph surgery the eager model cannot express — a local slice of a replicated
value, a gather that is not a column layer's output, a partial sum not made by a layer, a layer
used through a functional call — is refused with the node that needs the graph.

Cost of staying eager: consumers of one replicated activation each copy it, so q/k/v and
gate/up issue one backward all-reduce each instead of one shared; partial sums that the graph
mode adds before one all-reduce (token + position embeddings) are reduced one by one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from tpshard.compiler.capture import Captured, capture
from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.ir import plan_key as _key
from tpshard.compiler.styles import SPLIT_STYLES
from tpshard.plan import AttributeChange, Plan, PlanError

__all__ = ["plan_inplace", "find_attribute_changes"]


def _layer_ops(captured: Captured, plan: Plan) -> list[Op]:
    return [op for op in captured.ops if op.kind in ("linear", "embedding")
            and plan.modules.get(_key(op)) is not None and plan.modules[_key(op)].style in SPLIT_STYLES]


def _check_expressible(model: nn.Module, captured: Captured, plan: Plan) -> dict[str, Op]:
    """The planned layers are modules, and every edit is one a layer can do by itself."""
    by_name = {op.name: op for op in captured.ops}
    layer_ops = _layer_ops(captured, plan)
    for op in layer_ops:
        path = _key(op)
        module = _module_or_none(model, path)
        weight = getattr(module, "weight", None)
        if module is None or weight is None or weight is not _param_or_none(model, op.attrs["weight"]):
            raise PlanError(f"in-place mode: node {op.name!r} uses {op.attrs['weight']!r} through a functional call, "
                            f"not as the weight of a module at {path!r}; use the graph mode (inplace=False)")
    column_nodes = {op.name for op in layer_ops if plan.modules[_key(op)].style.startswith("column")}
    for e in plan.edits:
        if e.kind == "scatter":
            raise PlanError(f"in-place mode cannot slice the replicated value {e.node!r} for {e.users}: that needs "
                            "the graph (inplace=False), or a world size that divides the kv heads")
        if e.kind == "copy_params":
            raise PlanError(f"in-place mode: the norm at node {e.node!r} is kept whole on split values, so its "
                            "parameters' gradients need an all-reduce in backward that no layer can make; use "
                            "the graph mode (inplace=False)")
        if e.kind == "copy" and any(u not in column_nodes for u in e.users):
            bad = next(u for u in e.users if u not in column_nodes)
            raise PlanError(f"in-place mode: the replicated value {e.node!r} meets split values at node {bad!r}, so "
                            "its gradient needs an all-reduce in backward that no layer can make; use the graph "
                            "mode (inplace=False)")
        if e.kind == "gather" and e.node not in column_nodes:
            raise PlanError(f"in-place mode: the gathered value {e.node!r} is not a column layer's output; "
                            "use the graph mode (inplace=False)")
        if e.kind == "reduce":
            bad = _non_layer_partial(by_name[e.node], by_name)
            if bad is not None:
                raise PlanError(f"in-place mode: node {bad!r} makes a partial sum outside a layer; "
                                "use the graph mode (inplace=False)")
    return {op.name: op for op in layer_ops}


def _non_layer_partial(op: Op, by_name: dict[str, Op]) -> str | None:
    """A matmul upstream of the reduced value ``op`` (not past a layer, norm or softmax): a
    partial sum no layer can reduce by itself."""
    stop = ("linear", "embedding", "input", "norm", "softmax")
    producers = nx.DiGraph()  # value -> its producers, through ops that may pass a partial sum on
    for o in by_name.values():
        if o.kind not in stop:
            producers.add_edges_from((o.name, t.name) for t in o.tensors if t.name in by_name)
    if op.kind == "matmul":
        return op.name
    if op.name not in producers:
        return None
    return next((n for n in nx.descendants(producers, op.name) if by_name[n].kind == "matmul"), None)


def _module_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _param_or_none(model: nn.Module, name: str) -> Any:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------
# Attribute search on a shadow.


def _shadow(model: nn.Module, layer_ops: list[Op], plan: Plan) -> nn.Module:
    """A copy whose planned layers hold uninitialized parameters of the local shapes (1/N of the
    model's memory). Not on the meta device: model code may branch on the device type."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty((0,), dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.clone()
    shadow = copy.deepcopy(model, memo)
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        holder = shadow.get_submodule(owner) if owner else shadow
        current = getattr(holder, attr)
        if current.numel() == 0:
            current.data = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    n = plan.world_size
    for op in layer_ops:
        module = shadow.get_submodule(_key(op))
        for name in (op.attrs["weight"], op.attrs.get("bias")):
            if name:
                local = plan.params[name].local_shape(n)
                attr = name.rpartition(".")[2]
                old = getattr(module, attr)
                setattr(module, attr, nn.Parameter(torch.empty(local, device=old.device, dtype=old.dtype)))
    return shadow


def _shape_value(node: fx.Node, op: Op, dim: int) -> Any:
    kind, pos = op.attrs["shape_arg"]
    if kind == "kw":
        return node.kwargs[pos][dim]
    if kind == "tuple":
        return node.args[pos][dim]
    return node.args[pos + dim]


def _literals(node: fx.Node) -> list:
    out: list = []
    fx.node.map_aggregate((node.args, node.kwargs),
                          lambda a: out.append(a) if isinstance(a, int) and not isinstance(a, bool) else None)
    return out


def _mismatches(captured: Captured, shadow: Captured, plan: Plan) -> list[tuple[str, int]]:
    """Nodes whose literals in the shadow differ from the planned rewrite: (node, global value)."""
    mine = {n.name: n for n in captured.gm.graph.nodes}
    theirs = {n.name: n for n in shadow.gm.graph.nodes}
    ops = {op.name: op for op in captured.ops}
    if set(mine) != set(theirs):
        raise PlanError("in-place mode: the model with local layer shapes captures to a different graph "
                        "(its code branches on sizes); use the graph mode (inplace=False)")
    expected: dict[str, list] = {name: _literals(n) for name, n in mine.items()}
    wrong: list[tuple[str, int]] = []
    edited = set()
    for e in plan.edits:
        if e.kind == "shape":
            want, was = e.size, _shape_value(mine[e.node], ops[e.node], e.dim)
            got = _shape_value(theirs[e.node], ops[e.node], e.dim)
            edited.add(e.node)
            if isinstance(was, int) and was != -1 and got != want:
                wrong.append((e.node, was))
        elif e.kind == "split_sizes":
            edited.add(e.node)
            got = [s[ops[e.node].attrs["dim"]] for s in _shapes(theirs[e.node])]
            if got != e.sizes:
                wrong.append((e.node, ops[e.node].attrs["sizes"][0]))
    for name, lits in expected.items():
        if name not in edited and _literals(theirs[name]) != lits:
            wrong.append((name, -1))  # a literal the plan does not change changed
    return wrong


def _shapes(node: fx.Node) -> list:
    s = shape_of(node)
    return s if isinstance(s, list) else [s]


def _candidates(model: nn.Module, module_path: str, value: int) -> list[tuple[type, str]]:
    """(module class, attribute) pairs holding ``value``, innermost module first."""
    out: list[tuple[type, str]] = []
    parts = module_path.split(".") if module_path else []
    for k in range(len(parts), -1, -1):
        m = _module_or_none(model, ".".join(parts[:k]))
        if m is None:
            continue
        for attr, v in vars(m).items():
            if type(v) is int and v == value and (type(m), attr) not in out:
                out.append((type(m), attr))
    return out


def _divide(model: nn.Module, cls: type, attr: str, value: int, n: int) -> list[AttributeChange]:
    changed = []
    for path, m in model.named_modules():
        if type(m) is cls and getattr(m, attr, None) == value:
            setattr(m, attr, value // n)
            changed.append(AttributeChange(path, attr, value, value // n))
    return changed


def find_attribute_changes(model: nn.Module, captured: Captured, plan: Plan, layer_ops: list[Op]
                           ) -> list[AttributeChange]:
    """The attributes of ``model`` to divide so that its own code computes the local shapes
    ``plan`` asks for (see module docstring); ``layer_ops`` are the planned layers' uses.
    Raises :class:`PlanError` naming the node when no attribute can be shown to hold a literal."""
    shadow = _shadow(model, layer_ops, plan)
    args, kwargs = captured.example_inputs, captured.example_kwargs
    method = "export" if captured.kind == "export" else "fx"

    def probe() -> tuple[int, Any]:
        """How far the shadow gets: (0, modules run) when it fails eagerly, (1, error) when only
        its capture fails, (2, mismatches against the plan) when it captures."""
        done = [0]
        hooks = [m.register_forward_hook(lambda *_: done.__setitem__(0, done[0] + 1)) for m in shadow.modules()]
        # Eagerly, a vocabulary-split embedding would reject other ranks' ids: clamp them (shapes
        # are all the probe is about; the hooks are gone before the capture).
        hooks += [m.register_forward_pre_hook(lambda mod, a: (a[0].clamp(0, mod.weight.shape[0] - 1), *a[1:]))
                  for m in shadow.modules() if isinstance(m, nn.Embedding)]
        try:
            with torch.no_grad():
                shadow(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a wrong size makes the shadow fail to run
            return 0, done[0]
        finally:
            for h in hooks:
                h.remove()
        try:
            shadow_capture = capture(shadow, args, kwargs, method=method)
        except Exception as e:  # noqa: BLE001
            return 1, re.sub(r"\bs\d+\b", "s", str(e))  # symbolic size names vary per capture
        return 2, _mismatches(captured, shadow_capture, plan)

    ops = {op.name: op for op in captured.ops}
    graph = {n.name: n for n in captured.gm.graph.nodes}
    edited = []  # (node, global literal) of every literal the plan changes
    for e in plan.edits:
        if e.kind == "shape":
            was = _shape_value(graph[e.node], ops[e.node], e.dim)
            if isinstance(was, int) and was != -1:
                edited.append((e.node, was))
        elif e.kind == "split_sizes":
            edited.append((e.node, ops[e.node].attrs["sizes"][0]))

    def better(new: tuple[int, Any], old: tuple[int, Any]) -> bool:
        if new[0] != old[0]:
            return new[0] > old[0]
        if new[0] == 0:
            return new[1] > old[1]  # runs further
        if new[0] == 1:
            return new[1] != old[1]
        return not any(v == -1 for _, v in new[1]) and len(new[1]) < len(old[1])

    state = probe()
    changes: list[AttributeChange] = []
    tried: set[tuple[type, str, int]] = set()
    while not (state[0] == 2 and not state[1]):
        if state[0] == 2 and any(v == -1 for _, v in state[1]):
            node = next(n for n, v in state[1] if v == -1)
            raise PlanError(f"in-place mode: with local layer shapes, node {node!r} changes where the plan does "
                            "not expect it; use the graph mode (inplace=False)")
        targets = state[1] if state[0] == 2 else edited
        progress = False
        for node, value in targets:
            for cls, attr in _candidates(shadow, ops[node].module, value):
                if (cls, attr, value) in tried:
                    continue
                tried.add((cls, attr, value))
                trial = _divide(shadow, cls, attr, value, plan.world_size)
                new = probe()
                if better(new, state):
                    changes.extend(trial)
                    state, progress = new, True
                    break
                for c in trial:  # undo
                    setattr(shadow.get_submodule(c.module) if c.module else shadow, c.attribute, c.old)
            if progress:
                break
        if not progress:
            node, value = targets[0]
            raise PlanError(f"in-place mode: the literal {value} at node {node!r} (module {ops[node].module!r}) must "
                            f"become {value // plan.world_size}, and no attribute of that module can be shown to "
                            "hold it; use the graph mode (inplace=False)")
    return changes


def plan_inplace(model: nn.Module, captured: Captured, plan: Plan) -> Plan:
    """``plan`` for in-place mode (plan time): refused with the node that needs the graph when
    the eager model cannot express it, else a copy with ``attribute_changes`` recorded (none
    at world size 1)."""
    layer_ops = list(_check_expressible(model, captured, plan).values())
    changes = find_attribute_changes(model, captured, plan, layer_ops) if plan.world_size > 1 else []
    return dataclasses.replace(plan, attribute_changes=changes)
