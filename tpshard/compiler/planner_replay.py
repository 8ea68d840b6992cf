"""Phase 4 of planning: with every style fixed, replay the rules once and write the Plan.

The replay walks the graph in order, takes each op's output placement from
:func:`tpshard.compiler.analysis.transfer`, and turns every edge whose input placement differs from
what the op needs into an :class:`~tpshard.plan.Edit`. Edits on the same value and of the same
kind are merged, so consumers of one replicated activation share one copy (one backward
all-reduce), and consumers of one partial sum share one all-reduce.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch.fx as fx

from tpshard.compiler import analysis as A
from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.ir import plan_key as _key
from tpshard.compiler.kv_heads import replicate_kv_heads
from tpshard.plan import (GRAD_ALL_GATHER, GRAD_ALL_REDUCE, GRAD_LOCAL, GRAD_REPLICAS, GRAD_WHOLE, Edit, ModulePlan,
                          ParamShard, Plan, PlanError)


class _Planner(Protocol):
    """What the replay reads of :class:`tpshard.compiler.planner._Planner` (which imports this
    module, not the other way round): the committed state and the graph's indexes."""

    gm: fx.GraphModule
    ops: list[Op]
    world_size: int
    capture_kind: str
    index: dict[fx.Node, int]
    state: Any  # planner._State: place, styles, params, column_vars, layouts
    reasons: dict[str, str]
    param_shapes: dict[str, tuple[int, ...]]
    canon: dict[str, str]
    param_names: list[str]
    replicas: dict[str, int]  # parameter -> replicas of its shard (replicated kv heads), written by kv_heads
    kv_replicas: bool         # may kv heads be replicated (not for in-place plans)

    def override(self, op: Op) -> str | None: ...

    def reachable(self, start: fx.Node, through: Any, reverse: bool = False) -> set[fx.Node]: ...

__all__ = ["replay"]


class _Fixed:
    """A Decider with every decision already taken."""

    def __init__(self, planner: "_Planner", reduced: frozenset = frozenset()) -> None:
        self.planner = planner
        self.world_size = planner.world_size
        self.layouts = planner.state.layouts
        self.reduced = reduced  # partial sums some consumer reduces anyway

    def linear_style(self, op: Op) -> str | None:
        style = self.planner.state.styles.get(op.name)
        return "column" if style == "column_no_gather" else style

    def embedding_style(self, op: Op) -> str | None:
        return self.planner.state.styles.get(op.name)

    def column_var(self, op: Op) -> int:
        return self.planner.state.column_vars[op.name]

    def make_row(self, op: Op, var: int) -> None:
        raise A.Fail(op, "reached by a split value after planning (internal)")

    def choose(self, op: Op, candidates: list[Any]) -> Any:
        return candidates[0]


def _grad_nodes(ops: list[Op], param_names: Any) -> set[fx.Node]:
    """Values a gradient can flow to: those computed from parameters or float inputs."""
    out: set[fx.Node] = set()
    for op in ops:
        n = op.node
        if n.op == "get_attr":
            if n.target in param_names:
                out.add(n)
        elif n.op == "placeholder":
            val = n.meta.get("tensor_meta")
            if val is not None and getattr(val, "dtype", None) is not None and val.dtype.is_floating_point:
                out.add(n)
        elif n.op == "call_module" and op.kind in ("linear", "embedding", "norm", "opaque"):
            out.add(n)
        elif any(a in out and shape_of(a) is not None for a in n.all_input_nodes) and not _integral(n):
            # through tensors only: a size (a sym_size of the input) carries no gradient, and neither
            # does a boolean mask or an integer index computed from a float value
            out.add(n)
    return out


def _integral(n: fx.Node) -> bool:
    """Is the node's value known to be a bool or integer tensor?"""
    meta = n.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None) if meta is not None else getattr(n.meta.get("val"), "dtype", None)
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


def replay(pl: "_Planner") -> Plan:
    layouts = pl.state.layouts
    for v in list(layouts.parent):  # free layouts (outputs only gathered, rows) are contiguous
        if layouts.get(v) is None:
            layouts.pin(v, (layouts.size[layouts.find(v)],))
    # Replay until the set of reduced partial sums is stable: a sum reduced for one consumer is
    # added as that reduced value elsewhere (see analysis._pointwise), which reduces no more.
    reduced: frozenset = frozenset()
    for _ in range(8):
        place, edits = _replay_once(pl, reduced)
        now = frozenset(e.node for e in edits if e.kind == "reduce")
        if now <= reduced:
            break
        reduced = reduced | now
    edits = _shard_sliced_params(pl, edits)
    edits = replicate_kv_heads(pl, edits, _grad_nodes(pl.ops, set(pl.param_names)), pl.kv_replicas)
    _join_copies(pl, place, edits)
    return _write_plan(pl, place, edits, {op.node: op for op in pl.ops})


def _join_copies(pl: "_Planner", place: dict, edits: list[Edit]) -> None:
    """In a mixture-of-experts layer, the copies whose partial gradients all end in the layer's
    one reduce (the tokens into the experts and the shared expert, the routing weights, a shared
    expert's gate) get one ``joint`` number: one backward all-reduce for all of them, as a dense
    MLP has. Not where a copied value is computed from another's users (no order would do)."""
    reduces = {e.node for e in edits if e.kind == "reduce"}
    by_name = {op.name: op for op in pl.ops}

    def reduce_of(start: fx.Node) -> str | None:
        """The one reduced partial sum that ``start``'s split or partial values flow into."""
        found, stack, seen = set(), [start], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.name in reduces:
                found.add(n.name)
                continue
            stack.extend(u for u in n.users if place.get(u) is not A.REPLICATED)
        return found.pop() if len(found) == 1 else None

    moe = {reduce_of(op.node) for op in pl.ops
           if op.kind == "experts" and isinstance(place.get(op.node), A.Partial)} - {None}
    groups: dict[str, list[Edit]] = {}
    for e in edits:
        if e.kind == "copy":
            ends = {reduce_of(by_name[u].node) for u in e.users}
            if len(ends) == 1 and ends <= moe:
                groups.setdefault(ends.pop(), []).append(e)
    joint = 0
    for members in groups.values():
        sources = {by_name[e.node].node for e in members}
        users = {by_name[u].node for e in members for u in e.users}
        if len(members) < 2 or any(sources & pl.reachable(u, lambda o: True) for u in users):
            continue
        for e in members:
            e.joint = joint
        joint += 1


def _shard_sliced_params(pl: "_Planner", edits: list[Edit]) -> list[Edit]:
    """A parameter that every use slices the same way (a learnable vector inside a split MLP)
    is stored as its shard instead: exact, 1/N of the memory, and its gradient is its shard's
    (no backward all-gather of the slices). Not for tied parameters or buffers."""
    readers: dict[str, int] = {}  # parameter -> how many get_attr nodes read it
    node_of: dict[str, fx.Node] = {}  # get_attr node name -> node
    for op in pl.ops:
        if op.node.op == "get_attr":
            readers[op.node.target] = readers.get(op.node.target, 0) + 1
            node_of[op.name] = op.node
    tied = {name for pair in pl.canon.items() if pair[0] != pair[1] for name in pair}
    params = set(pl.param_names)
    keep: list[Edit] = []
    for e in edits:
        node = node_of.get(e.node)
        target = node.target if node is not None else None
        if (e.kind == "scatter" and not e.reduced and target in params and target not in tied
                and readers[target] == 1 and all(u.name in e.users for u in node.users)
                and pl.state.params.get(target) is None):
            size = pl.param_shapes[target][e.dim]
            pl.state.params[target] = (e.dim, pl.state.layouts.new(size, e.segments or (size,)))
            continue
        keep.append(e)
    return keep


def _replay_once(pl: "_Planner", reduced: frozenset) -> tuple[dict, list[Edit]]:
    s = pl.state
    layouts = s.layouts
    n = pl.world_size
    fixed = _Fixed(pl, reduced)
    place: dict[fx.Node, Any] = {}
    edits: dict[tuple, Edit] = {}
    no_gather_vars = {layouts.find(s.column_vars[k]) for k, st in s.styles.items() if st == "column_no_gather"}
    grads = _grad_nodes(pl.ops, pl.param_names)

    def seg(var: int) -> tuple[int, ...] | None:
        value = layouts.get(var)
        return value if value is not None and len(value) > 1 else None

    def add(kind: str, src: fx.Node, user: fx.Node, **kw: Any) -> None:
        key = (kind, src.name, kw.get("dim"), kw.get("segments"), kw.get("reduced", False))
        e = edits.get(key)
        if e is None:
            e = edits[key] = Edit(kind=kind, node=src.name, **kw)
        if user.name not in e.users:
            e.users.append(user.name)

    for op in pl.ops:
        ins = [place.get(t, A.REPLICATED) for t in op.tensors]
        try:
            out, needs = A.transfer(op, ins, fixed)
        except A.Fail as f:
            raise PlanError(f"planning is inconsistent at {f.op.name!r} (module {f.op.module!r}): {f.reason}") from None
        place[op.node] = out
        style = s.styles.get(op.name)
        if op.kind == "linear" and style in ("column", "column_no_gather"):
            add("copy", op.tensors[0], op.node)
        for t, p, need in zip(op.tensors, ins, needs):
            if need == A.SAME or need is A.REPLICATED and (p is A.REPLICATED or isinstance(p, A.SplitSize)):
                continue
            if need is A.REPLICATED and isinstance(p, A.Partial):
                add("reduce", t, op.node, biases=sorted(p.biases))
            elif need is A.REPLICATED and isinstance(p, A.Split):
                if op.kind != "output":
                    raise PlanError(f"planning is inconsistent at {op.name!r}: split input needs gathering")
                if layouts.find(p.var) in no_gather_vars:
                    continue
                add("gather", t, op.node, dim=p.dim, segments=seg(p.var))
            elif isinstance(need, A.Split):
                if isinstance(p, A.Partial):
                    add("reduce", t, op.node, biases=sorted(p.biases))
                add("scatter", t, op.node, dim=need.dim, segments=seg(need.var),
                    reduced=isinstance(p, A.Partial))
        for i in A.partial_grad_inputs(op, ins, needs, out):
            if op.tensors[i] in grads:  # each rank's share of its gradient: all-reduced in backward
                add("copy", op.tensors[i], op.node)
        if A.partial_grad_params(op, out):  # a norm module on split values: its own parameters
            edits[("copy_params", op.name)] = Edit(kind="copy_params", node=op.name)
        kept = [i for i, (p, need) in enumerate(zip(ins, needs)) if isinstance(p, A.Partial) and need == A.SAME]
        if isinstance(out, A.Partial) and op.kind == "pointwise" and len(op.tensors) == 2 and len(kept) == 1 \
                and op.attrs.get("fn") != "mul":
            # P + R: the add passes P on; R is added once after the reduce (an addend "%name@add").
            edits[("skip_add", op.name)] = Edit(kind="skip_add", node=op.name, dim=kept[0])
        if op.node.op != "call_module":  # functional layers: the rewriter edits the call itself
            if op.kind == "linear" and style == "row" and op.attrs["bias"]:
                edits[("drop_bias", op.name)] = Edit(kind="drop_bias", node=op.name)
            if op.kind == "embedding" and style == "vocab":
                vocab = pl.param_shapes[op.attrs["weight"]][0]
                edits[("vocab_lookup", op.name)] = Edit(kind="vocab_lookup", node=op.name, size=vocab)
        if op.kind in ("view", "expand") and isinstance(out, A.Split):
            if op.attrs.get("shape_arg") is None and op.kind == "view":
                pass  # flatten/unflatten-like: the shape follows the input
            else:
                edits[("shape", op.name)] = Edit(kind="shape", node=op.name, dim=out.dim,
                                                 size=shape_of(op.node)[out.dim] // n)
        if op.kind == "split" and isinstance(ins[0], A.Split) and ins[0].dim == op.attrs["dim"] \
                and op.attrs["method"] == "split":
            edits[("split_sizes", op.name)] = Edit(kind="split_sizes", node=op.name,
                                                   sizes=[sz // n for sz in op.attrs["sizes"]])
    for op in pl.ops:  # an override to row that no column region reached
        if s.styles.get(op.name) is None and op.kind == "linear" and pl.override(op) == "row":
            raise PlanError(f"override 'row' for {op.module or op.name!r} cannot be honored: no column-parallel "
                            "linear feeds it a split input")
    return place, list(edits.values())


def _region_reason(pl: "_Planner", op: Op, style: str) -> str:
    """Why a column or row use is split: where its split value goes, or where it comes from."""
    def walk(start: fx.Node, forward: bool) -> list[str]:
        """The linears (and the output) a split value reaches, or the linears a partial comes from:
        forward through split or partial values, backward through anything, never past a
        linear or a norm."""
        def through(o: Op) -> bool:
            if o.kind in ("linear", "output", "norm"):
                return False
            return not forward or pl.state.place.get(o.node) is not A.REPLICATED

        reached = [pl.ops[pl.index[n]] for n in pl.reachable(start, through, reverse=not forward)]
        return sorted({"the model output" if o.kind == "output" else _key(o)
                       for o in reached if o.kind in ("linear", "output")})

    if style in ("column", "column_no_gather"):
        dests = walk(op.node, True)
        return "output features split; split value flows to " + ", ".join(dests) if dests else "output features split"
    if style == "row":
        srcs = [s for s in walk(op.tensors[0], False) if s != "the model output"]
        return "input features split; partial sums from the split of " + ", ".join(srcs[-3:])
    return "its input is not replicated where it could start a region"


def _write_plan(pl: "_Planner", place: dict, edits: list[Edit], op_of: dict) -> Plan:
    s = pl.state
    n = pl.world_size
    layouts = s.layouts
    params: dict[str, ParamShard] = {}
    for name, shape in pl.param_shapes.items():
        canon = pl.canon.get(name, name)
        choice = s.params.get(canon)
        if choice is None:
            params[name] = ParamShard(shape=shape)
        else:
            dim, var = choice
            value = layouts.get(var)
            params[name] = ParamShard(shape=shape, dim=dim, segments=value if value and len(value) > 1 else None,
                                      replicas=pl.replicas.get(canon, 1))
    param_names = pl.param_names
    grads = _grad_nodes(pl.ops, set(param_names))
    by_name = {op.name: op for op in pl.ops}

    modules: dict[str, ModulePlan] = {}
    owner_of: dict[str, str] = {}
    for op in pl.ops:
        if op.kind not in ("linear", "embedding", "experts"):
            continue
        key = _key(op)
        style = s.styles.get(op.name) or "replicate"
        names = op.attrs["params"] if op.kind == "experts" else [
            x for x in (op.attrs.get("weight"), op.attrs.get("bias")) if x]
        split = next((params[x] for x in names if params[x].dim is not None), None)
        reason = pl.reasons.get(op.name) or _region_reason(pl, op, style)
        modules[key] = ModulePlan(path=key, kind=op.kind, style=style, params=names, reason=reason,
                                  segments=split.segments if split and op.kind != "experts" else None,
                                  expert_parallel=dict(pl.expert_specs.get(op.name, {})))
        owner_of[op.name] = key
    covered = {x for m in modules.values() for x in m.params}
    leftovers: dict[str, list[str]] = {}
    for name in param_names:
        if name not in covered and pl.canon.get(name, name) not in covered:
            leftovers.setdefault(name.rpartition(".")[0] or "<root>", []).append(name)
    for path, names in leftovers.items():
        if all(params[x].replicated for x in names):
            style, reason = "replicate", "parameters kept whole (norms, biases of whole tensors)"
        else:  # see _shard_sliced_params
            style, reason = "sliced", "parameters split like the split values every use multiplies"
        modules.setdefault(path, ModulePlan(path=path, kind="module", style=style, params=sorted(names),
                                            reason=reason))

    def producer(node_name: str) -> str | None:
        """The linear/embedding module whose output flows (through linear ops) into this value."""
        stack, seen = [by_name[node_name]], set()
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            if op.name in owner_of and s.styles.get(op.name) not in (None, "replicate"):
                return owner_of[op.name]
            stack.extend(op_of[t] for t in op.tensors if t in op_of)
        return None

    def count(key: str | None, what: str) -> None:
        if key is None:
            return
        c = modules[key].collectives
        c[what] = c.get(what, 0) + 1

    def param_row(node_name: str) -> str | None:
        """The plan row of the parameter a get_attr node reads (its module, or <root>)."""
        node = by_name[node_name].node
        if node.op != "get_attr" or node.target not in params:
            return None
        owner = next((k for k, m in modules.items() if node.target in m.params), None)
        return owner or (node.target.rpartition(".")[0] or "<root>")

    joined: set[int] = set()
    for e in edits:
        if e.kind == "copy" and e.joint is not None and e.joint in joined:
            continue  # one all-reduce for the joint copies
        if e.kind == "copy":
            if e.joint is not None:
                joined.add(e.joint)
            layer = owner_of.get(e.users[0])
            count(layer or param_row(e.node) or producer(e.users[0]), "bwd all_reduce")
        elif e.kind == "copy_params":
            count(by_name[e.node].module if by_name[e.node].module in modules else producer(e.node), "bwd all_reduce")
        elif e.kind == "reduce":
            count(producer(e.node), "fwd all_reduce")
        elif e.kind == "gather":
            count(producer(e.node), "fwd all_gather")
        elif e.kind == "scatter" and by_name[e.node].node in grads:
            count(producer(e.users[0]), "bwd all_gather")
        elif e.kind == "replica_grad":  # one subgroup all-reduce of the projection's parameters
            count(owner_of[e.node], "bwd all_reduce")
    ties = {a: c for a, c in pl.canon.items() if a != c}
    grad_of = _grad_placements(pl, params, edits, by_name, grads)
    grad_of.update({name: GRAD_REPLICAS for name in param_names if params[name].replicas > 1})
    notes = plan_notes(ties, grad_of)
    order = {name: i for i, name in enumerate(param_names)}
    def row_order(item: tuple[str, ModulePlan]) -> tuple[int, str]:  # module order: first parameter's position
        return (min((order.get(x, len(order)) for x in item[1].params), default=len(order)), item[0])
    modules = dict(sorted(modules.items(), key=row_order))
    return Plan(world_size=n, modules=modules, params=params, edits=edits, capture=pl.capture_kind,
                ties=ties, notes=notes, grads=grad_of, overrides=dict(pl.overrides))


def _grad_placements(pl: "_Planner", params: dict[str, ParamShard], edits: list[Edit], by_name: dict[str, Op],
                     grads: set[fx.Node]) -> dict[str, str]:
    """Where every parameter's gradient comes from, derived from the placements of its uses.

    A split parameter's gradient is its shard's. A replicated one read by a get_attr node gets
    each rank's partial share where :func:`tpshard.compiler.analysis.partial_grad_inputs` put a copy on
    that node (all-reduced in backward), its slices where a scatter takes a slice of it
    (gathered in backward), and is whole otherwise (every use sees replicated values; a
    parameter of a module the plan keeps whole is used on replicated inputs, because a split
    input would have made it row-parallel or failed its trial), except a norm module's, which
    the copy_params edit all-reduces. A parameter both copied and sliced is reported as
    all-reduced (its slices' gradients are gathered as well, on their own edges).
    """
    copied = {e.node for e in edits if e.kind == "copy"}
    module_copied = {f"{by_name[e.node].module}.{n}" for e in edits if e.kind == "copy_params"
                     for n, _ in pl.gm.get_submodule(by_name[e.node].module).named_parameters()}
    sliced = {e.node for e in edits if e.kind == "scatter" and by_name[e.node].node in grads}
    read_by: dict[str, list[str]] = {}
    for op in pl.ops:
        if op.node.op == "get_attr" and isinstance(op.node.target, str):
            read_by.setdefault(pl.canon.get(op.node.target, op.node.target), []).append(op.name)
    out: dict[str, str] = {}
    for name in pl.param_names:
        canon = pl.canon.get(name, name)
        if not params[name].replicated:
            out[name] = GRAD_LOCAL
            continue
        nodes = read_by.get(canon, [])
        if any(x in copied for x in nodes) or name in module_copied or canon in module_copied:
            out[name] = GRAD_ALL_REDUCE
        elif any(x in sliced for x in nodes):
            out[name] = GRAD_ALL_GATHER
        else:
            out[name] = GRAD_WHOLE
    return out


def plan_notes(ties: dict[str, str], grad_of: dict[str, str]) -> list[str]:
    """The notes a plan states about its parameters: ties, gradients synchronized in backward."""
    notes = ["tied: " + ", ".join(f"{a} = {c}" for a, c in sorted(ties.items()))] if ties else []
    synced = [f"{name} ({how})" for name, how in grad_of.items()
              if how in (GRAD_ALL_REDUCE, GRAD_ALL_GATHER, GRAD_REPLICAS)]
    if synced:
        notes.append("gradients synchronized in backward: " + ", ".join(synced))
    return notes
