"""The rewriter: apply a Plan to a captured graph and build one rank's module.

It never decides: every module style, parameter split, collective and shape literal comes
from the Plan. It never mutates its input: a new GraphModule is built, with

- tpshard's parallel layers (or copies of the replicated modules) at the original qualified
  names, holding exact copies of this rank's weight shards (ties kept: one Parameter);
- the collectives as explicit graph nodes calling :mod:`tpshard.comm`, inserted on the edges
  the Plan names (reduce first, then copy/scatter/gather), each shared by all its users;
- literal shape arguments at split dims replaced by the local sizes;
- for replicated kv heads (``ParamShard.replicas``), the projection holding its one kv head's
  rows, its parameters entering through one copy over the replica subgroup
  (:mod:`tpshard.subgroups`, made here in the Plan's edit order, the same on every rank).

Example::

    >>> import torch
    >>> from tpshard.compiler.capture import capture
    >>> from tpshard.compiler.planner import make_plan
    >>> from tpshard.comm import OfflineGroup
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> c = capture(mlp)
    >>> rank0 = rewrite(c, make_plan(c.gm, c.ops, 2), OfflineGroup(0, 2))
    >>> rank0.get_submodule("0").weight.shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import copy
import heapq
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from tpshard import comm, subgroups
from tpshard.compiler.capture import Captured
from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.moe import copy_joint
from tpshard.compiler.moe_ep import local_experts
from tpshard.compiler.sequence import full_size
from tpshard.compiler.styles import SPLIT_STYLES, parallel_layer
from tpshard.layers import vocab_parallel_lookup
from tpshard.plan import Edit, Plan, PlanError

__all__ = ["rewrite", "GROUP_ATTR", "linear_with_replica_grads"]

GROUP_ATTR = "_tpshard_group"


def _build_module(orig: nn.Module, path: str, plan: Plan, group: comm.Group) -> nn.Module:
    mp = plan.modules.get(path)
    style = mp.style if mp is not None else "replicate"
    if style in SPLIT_STYLES and isinstance(orig, nn.modules.conv._ConvNd):  # a 1x1 convolution
        return _local_conv(orig, path, style, plan, group)
    if style in SPLIT_STYLES and any(plan.params[f"{path}.{n}"].replicas > 1 for n, _ in orig.named_parameters()):
        return _local_replicas(orig, path, plan, group)
    if style in SPLIT_STYLES:  # the layer without its collectives: they are graph nodes here
        return parallel_layer(orig, style, mp.segments, group, in_graph=True)
    if style == "expert_tp":  # a routed experts region: its own code on this rank's shards (moe.py)
        return _local_params(orig, path, plan, group)
    if style == "expert_parallel":  # this rank's whole experts, its routing remapped (moe_ep.py)
        return local_experts(_local_params(orig, path, plan, group), mp.expert_parallel, group.rank)
    return copy.deepcopy(orig)


def _local_params(orig: nn.Module, path: str, plan: Plan, group: comm.Group) -> nn.Module:
    new = copy.deepcopy(orig)
    for name, p in orig.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        local = plan.params[f"{path}.{name}"].shard(p.detach(), group.rank, group.size).clone()
        setattr(new.get_submodule(owner_path) if owner_path else new, attr,
                nn.Parameter(local, requires_grad=p.requires_grad))
    return new


def _local_conv(orig: nn.Module, path: str, style: str, plan: Plan, group: comm.Group) -> nn.Module:
    """This rank's 1x1 convolution: its shard of the weight (and of the bias, as a column); a
    row keeps its bias as a parameter but does not add it (the reduce edit adds it once)."""
    new = copy.deepcopy(orig)
    for name, p in list(orig.named_parameters(recurse=False)):
        local = plan.params[f"{path}.{name}"].shard(p.detach(), group.rank, group.size).clone()
        setattr(new, name, nn.Parameter(local, requires_grad=p.requires_grad))
    if style == "row":
        cls = type(orig)
        new.__class__ = type(f"Row{cls.__name__}", (cls,), {"forward": _conv_without_bias})
    return new


def _local_replicas(orig: nn.Module, path: str, plan: Plan, group: comm.Group) -> nn.Module:
    """This rank's k/v projection with replicated kv heads: a copy of the linear holding the rows
    of its one kv head (``ParamShard.replicas``); its ``out_features`` are the local rows."""
    new = copy.deepcopy(orig)
    for name, p in list(orig.named_parameters(recurse=False)):
        local = plan.params[f"{path}.{name}"].shard(p.detach(), group.rank, group.size).clone()
        setattr(new, name, nn.Parameter(local, requires_grad=p.requires_grad))
    if isinstance(new, nn.Linear):
        new.out_features = new.weight.shape[0]
    return new


def linear_with_replica_grads(group: Any, x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose parameters enter through one copy over ``group`` (a
    replica subgroup: forward identity, backward one all-reduce of both gradients, flattened) —
    the functional (aten) form of a ``replica_grad`` edit."""
    ts = [weight] + ([bias] if bias is not None else [])
    flat = comm.mp_copy(torch.cat([t.reshape(-1) for t in ts]), group)
    pieces = [p.view_as(t) for p, t in zip(flat.split([t.numel() for t in ts]), ts)]
    return nn.functional.linear(x, pieces[0], pieces[1] if bias is not None else None)


def _conv_without_bias(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x, self.weight, None)


def _build_attr(gm: fx.GraphModule, target: str, plan: Plan, group: comm.Group) -> Any:
    value = operator.attrgetter(target)(gm)
    if not isinstance(value, torch.Tensor):
        return value
    shard = plan.params.get(target)
    local = shard.shard(value, group.rank, group.size) if shard is not None else value
    local = local.detach().clone()
    if isinstance(value, nn.Parameter):
        return nn.Parameter(local, requires_grad=value.requires_grad)
    return local


def _tie(root: dict[str, Any], gm: fx.GraphModule) -> None:
    """Parameters that were one tensor in the original stay one Parameter (first copy wins)."""
    seen: dict[int, nn.Parameter] = {}
    for target, new in root.items():
        if isinstance(new, nn.Parameter):
            orig = gm.get_parameter(target)
            if id(orig) in seen:
                root[target] = seen[id(orig)]
            else:
                seen[id(orig)] = new
        elif isinstance(new, nn.Module):
            orig_mod = gm.get_submodule(target)
            for name, orig in orig_mod.named_parameters(remove_duplicate=False):
                owner_path, _, attr = name.rpartition(".")
                owner = new.get_submodule(owner_path) if owner_path else new
                if id(orig) in seen:
                    setattr(owner, attr, seen[id(orig)])
                else:
                    seen[id(orig)] = getattr(owner, attr)


def _set_shape(node: fx.Node, op: Op, dim: int, size: int) -> None:
    where = op.attrs.get("shape_arg")
    if where is None:
        raise PlanError(f"cannot rewrite the shape of {node.format_node()}: its shape argument is not literal")
    kind, pos = where[:2]
    if kind == "unflatten":  # unflatten(x, dim, sizes): only a dim among the sizes has a literal
        args = list(node.args)
        src = args[0]
        udim = args[pos] % (len(src.meta["tensor_meta"].shape if "tensor_meta" in src.meta else src.meta["val"].shape))
        sizes = list(args[where[2]])
        if 0 <= dim - udim < len(sizes):
            sizes[dim - udim] = size
            args[where[2]] = type(args[where[2]])(sizes)
            node.args = tuple(args)
        return
    if kind == "kw":
        shape = list(node.kwargs[pos])
        shape[dim] = size
        node.kwargs = {**node.kwargs, pos: tuple(shape)}
        return
    args = list(node.args)
    if kind == "tuple" and isinstance(args[pos], fx.Node):
        return  # the size tuple of a tensor (x.expand(q.shape)): computed from local values already
    factor = shape_of(op.node)[dim] // size

    def local(old: Any) -> Any:
        # A symbolic size (batch x heads, as nn.MultiheadAttention views q) stays symbolic:
        # divided in the graph, so other batch sizes still run.
        if isinstance(old, fx.Node):
            with node.graph.inserting_before(node):
                return node.graph.call_function(operator.floordiv, (old, factor))
        return size

    if kind == "tuple":
        shape = list(args[pos])
        if dim >= len(shape):
            raise PlanError(f"cannot rewrite the shape of {node.format_node()}")
        shape[dim] = local(shape[dim])
        args[pos] = type(args[pos])(shape)
    else:
        if pos + dim >= len(args):
            raise PlanError(f"cannot rewrite the shape of {node.format_node()}")
        args[pos + dim] = local(args[pos + dim])
    node.args = tuple(args)


def _set_split_sizes(node: fx.Node, sizes: list[int]) -> None:
    args = list(node.args)
    key = "split_size" if "split_size" in node.kwargs else "split_size_or_sections"
    current = args[1] if len(args) > 1 else node.kwargs.get(key)
    new = sizes[0] if isinstance(current, int) else list(sizes)
    if len(args) > 1:
        args[1] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, key: new}


def _drop_bias(node: fx.Node) -> None:
    """A functional row linear runs without its bias; the reduce edit adds it once."""
    aten = torch.ops.aten
    if node.target is aten.addmm.default:  # addmm(b, x, W) -> mm(x, W)
        node.target = aten.mm.default
        node.args = (node.args[1], node.args[2])
    elif len(node.args) > 2:
        node.args = (*node.args[:2], None, *node.args[3:])
    else:
        node.kwargs = {**node.kwargs, "bias": None}


def _vocab_lookup(node: fx.Node, vocab: int, g: comm.Group) -> None:
    """A functional embedding becomes this rank's masked partial lookup (see layers)."""
    if node.target is torch.ops.aten.embedding.default:
        weight, ids = node.args[0], node.args[1]
        pad = node.args[2] if len(node.args) > 2 else -1
        pad = None if pad == -1 else pad
    else:  # F.embedding(ids, weight, padding_idx, ...)
        ids, weight = node.args[0], node.args[1]
        pad = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx")
    local = vocab // g.size
    start = g.rank * local
    local_pad = pad - start if pad is not None and start <= pad % vocab < start + local else None
    node.target = vocab_parallel_lookup
    node.args = (ids, weight, start, local_pad)
    node.kwargs = {}


def _joint_order(graph: fx.Graph, joints: dict[int, list[Edit]], nodes: dict[str, fx.Node]) -> list[fx.Node]:
    """The graph's nodes in order, except that the users of joint copies wait for the last value
    the joint copies (a stable topological order: earlier nodes first where free)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if not joints:
        return list(graph.nodes)
    extra: dict[fx.Node, set[fx.Node]] = {}
    for members in joints.values():
        last = max((nodes[m.node] for m in members), key=order.__getitem__)
        for m in members:
            for u in m.users:
                extra.setdefault(nodes[u], set()).add(last)
    deps = {n: set(n.all_input_nodes) | extra.get(n, set()) for n in graph.nodes}
    users: dict[fx.Node, list[fx.Node]] = {}
    for n, ds in deps.items():
        for d in ds:
            users.setdefault(d, []).append(n)
    waiting = {n: len(ds) for n, ds in deps.items()}
    ready = [(order[n], n.name) for n in graph.nodes if not waiting[n]]
    heapq.heapify(ready)
    by_name = {n.name: n for n in graph.nodes}
    out: list[fx.Node] = []
    while ready:
        n = by_name[heapq.heappop(ready)[1]]
        out.append(n)
        for u in users.get(n, ()):
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, (order[u], u.name))
    if len(out) != len(order):
        raise PlanError("the plan's joint copies cannot be ordered in this graph; make the plan from the same model")
    return out


def rewrite(captured: Captured, plan: Plan, group: Any = None) -> fx.GraphModule:
    """Build this rank's module from ``captured`` and ``plan`` (see module docstring)."""
    g = comm.resolve_group(group)
    if plan.world_size != g.size:
        raise PlanError(f"the plan is for world size {plan.world_size}, but the group has {g.size} ranks")
    gm = captured.gm
    ops = {op.node.name: op for op in captured.ops}
    conv_biases = {op.attrs["bias"] for op in captured.ops if op.kind == "linear" and op.attrs.get("conv")}
    nodes = {n.name: n for n in gm.graph.nodes}
    for e in plan.edits:
        if e.node not in nodes or any(u not in nodes for u in e.users):
            raise PlanError(f"the plan's edit {e.kind} names node {e.node!r}, which this capture does not have; "
                            "make the plan from the same model and inputs")

    # Phase 1: modules and attributes at the original qualified names.
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in root:
            root[node.target] = _build_module(gm.get_submodule(node.target), node.target, plan, g)
        elif node.op == "get_attr" and node.target not in root:
            root[node.target] = _build_attr(gm, node.target, plan, g)
    _tie(root, gm)
    for e in plan.edits:  # row biases, added after the reduce, are graph attributes too
        for b in e.biases:
            if b not in root and not b.startswith("%"):
                owner, _, attr = b.rpartition(".")
                root[b] = getattr(root[owner], attr)

    # Replica subgroups, created in the plan's edit order (the same on every rank; see subgroups).
    for e in plan.edits:
        if e.kind == "replica_grad" and f"{GROUP_ATTR}_replicas_{e.size}" not in root:
            root[f"{GROUP_ATTR}_replicas_{e.size}"] = subgroups.replica_group(g, e.size)

    # Phase 2: index the edits by edge. Order on an edge: reduce, then copy | scatter | gather.
    edge: dict[tuple[str, str], list[Edit]] = {}
    shape_edits: dict[str, list[Edit]] = {}
    skip_add: dict[str, int] = {}
    for e in plan.edits:
        if e.kind == "skip_add":
            skip_add[e.node] = e.dim
        elif e.kind in ("shape", "split_sizes", "drop_bias", "vocab_lookup", "copy_params", "seq_size",
                        "replica_grad"):
            shape_edits.setdefault(e.node, []).append(e)
        else:
            for u in e.users:
                edge.setdefault((e.node, u), []).append(e)
    seq_gathers = {e.node: e for e in plan.edits if e.kind == "all_gather_seq"}
    order = {"reduce": 0, "reduce_scatter": 0, "all_gather_seq": 0.5, "gather_seq": 0.5, "whole_seq": 0.5,
             "copy": 1, "scatter": 1, "gather": 1}
    for v in edge.values():
        v.sort(key=lambda e: order[e.kind])

    # Phase 3: copy the graph node by node, inserting the collectives before their first user.
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    made: dict[tuple, fx.Node] = {}
    state: dict[str, fx.Node] = {}

    def group_node() -> fx.Node:
        if "group" not in state:
            state["group"] = graph.get_attr(GROUP_ATTR)
        return state["group"]

    def apply(src: fx.Node, e: Edit, value: fx.Node) -> fx.Node:
        key = (e.kind, src.name, e.dim, e.segments, e.reduced)
        if key in made:
            return made[key]
        if e.kind in ("reduce", "reduce_scatter"):
            if e.kind == "reduce":
                out = graph.call_function(comm.mp_reduce, (value, group_node()))
            else:
                out = graph.call_function(comm.mp_reduce_scatter_seq, (value, e.dim, group_node()))
            for b in e.biases:  # row biases (parameters) and replicated terms ("%node@add")
                if b.startswith("%"):
                    term_node, _, add = b[1:].partition("@")
                    term = lookup_edge(nodes[term_node], nodes[add])  # as that add saw it (maybe reduced)
                else:
                    term = graph.get_attr(b)
                    if e.kind == "reduce_scatter":  # a row bias added on sequence shards: partial gradient
                        term = graph.call_function(comm.mp_copy, (term, group_node()))
                    if b in conv_biases:  # a convolution's bias is per channel (dim 1): (C, 1, ..., 1)
                        trailing = (1,) * (len(shape_of(src)) - 2)
                        term = graph.call_method("view", (term, (-1, *trailing)))
                out = graph.call_function(operator.add, (out, term))
        elif e.kind == "copy" and e.joint is not None:  # with the others of its joint: one bwd all-reduce
            members = joints[e.joint]
            if ("joint", e.joint) not in made:
                made[("joint", e.joint)] = graph.call_function(
                    copy_joint, (group_node(), *(env[nodes[m.node]] for m in members)))
            out = graph.call_function(operator.getitem, (made[("joint", e.joint)], members.index(e)))
        elif e.kind == "copy":
            out = graph.call_function(comm.mp_copy, (value, group_node()))
        elif e.kind == "all_gather_seq":
            out = graph.call_function(comm.mp_all_gather_seq, (value, e.dim, group_node()))
        elif e.kind == "gather_seq":
            out = graph.call_function(comm.mp_gather, (value, e.dim, group_node()))
        elif e.kind == "whole_seq":  # the all_gather_seq of the same value, reused
            full = apply(src, seq_gathers[src.name], value)
            out = graph.call_function(comm.mp_seq_whole, (full, value, e.dim, group_node()))
        elif e.kind == "scatter":
            out = graph.call_function(comm.mp_scatter, (value, e.dim, group_node(), e.segments))
        else:
            out = graph.call_function(comm.mp_gather, (value, e.dim, group_node(), e.segments))
        made[key] = out
        return out

    def lookup_edge(a: fx.Node, user: fx.Node) -> fx.Node:
        """``a``'s value as ``user`` takes it: with the edits on that edge applied."""
        value = env[a]
        for e in edge.get((a.name, user.name), ()):
            value = apply(a, e, value)
        return value

    joints: dict[int, list[Edit]] = {}
    for e in plan.edits:
        if e.kind == "copy" and e.joint is not None:
            joints.setdefault(e.joint, []).append(e)
    for node in _joint_order(gm.graph, joints, nodes):
        def lookup(a: fx.Node, user: fx.Node = node) -> fx.Node:
            return lookup_edge(a, user)

        if node.name in skip_add:  # P + R: pass the partial sum on; R joins after the reduce
            env[node] = lookup(ops[node.name].tensors[skip_add[node.name]])
            continue
        new = graph.node_copy(node, lookup)
        if any(e.kind == "copy_params" for e in shape_edits.get(node.name, ())):
            # module(x) -> call_with_param_copies(module, group, x): same parameters, one bwd all-reduce
            with graph.inserting_after(new):
                mod = graph.get_attr(node.target)
            with graph.inserting_after(mod):
                synced = graph.call_function(comm.call_with_param_copies, (mod, group_node(), *new.args), new.kwargs)
            new.replace_all_uses_with(synced)
            graph.erase_node(new)
            new = synced
        for e in shape_edits.get(node.name, ()):
            if e.kind == "replica_grad":  # the projection's parameters through one subgroup copy
                with graph.inserting_before(new):
                    sub = graph.get_attr(f"{GROUP_ATTR}_replicas_{e.size}")
                if new.op == "call_module":
                    with graph.inserting_after(new):
                        mod = graph.get_attr(node.target)
                    with graph.inserting_after(mod):
                        synced = graph.call_function(comm.call_with_param_copies, (mod, sub, *new.args), new.kwargs)
                else:  # aten.linear(x, weight, bias)
                    with graph.inserting_after(new):
                        synced = graph.call_function(linear_with_replica_grads, (sub, *new.args), new.kwargs)
                new.replace_all_uses_with(synced)
                graph.erase_node(new)
                new = synced
        for e in shape_edits.get(node.name, ()):
            if e.kind == "seq_size":  # the size of a sequence shard, read as the full size
                with graph.inserting_after(new):
                    full = graph.call_function(full_size, (new, e.dim, e.size))
                new.replace_all_uses_with(full)
                full.args = (new, e.dim, e.size)
                new = full
        env[node] = new
        for e in shape_edits.get(node.name, ()):
            if e.kind == "shape":
                _set_shape(new, ops[node.name], e.dim, e.size)
            elif e.kind == "split_sizes":
                _set_split_sizes(new, e.sizes)
            elif e.kind in ("copy_params", "seq_size", "replica_grad"):
                pass  # applied above
            elif e.kind == "drop_bias":
                _drop_bias(new)
            else:
                _vocab_lookup(new, e.size, g)

    # An exported graph's pytree in/out specs. A shallow copy: the specs are immutable, and a deep
    # copy rebuilds each TreeSpec through copyreg, which warns (LeafSpec is deprecated) on every rank.
    graph._codegen = copy.copy(gm.graph._codegen)
    root[GROUP_ATTR] = g
    out = fx.GraphModule(root, graph, f"TP{type(gm).__name__}")
    _restore_buffer_persistence(out, captured.model if captured.model is not None else gm)
    out.train(gm.training)
    out.tpshard_plan = plan
    return out


def _restore_buffer_persistence(new: nn.Module, orig: nn.Module) -> None:
    for name, _ in list(new.named_buffers()):
        owner_path, _, attr = name.rpartition(".")
        try:
            orig_owner = orig.get_submodule(owner_path) if owner_path else orig
        except AttributeError:
            continue
        if attr in getattr(orig_owner, "_non_persistent_buffers_set", ()):
            owner = new.get_submodule(owner_path) if owner_path else new
            owner._non_persistent_buffers_set.add(attr)
