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
from tpshard.plan import Edit, ModulePlan, ParamShard, Plan, PlanError


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


def _grad_nodes(ops: list[Op], param_names: set[str]) -> set[fx.Node]:
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
        elif any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


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
    return _write_plan(pl, place, edits, {op.node: op for op in pl.ops})


def _replay_once(pl: "_Planner", reduced: frozenset) -> tuple[dict, list[Edit]]:
    s = pl.state
    layouts = s.layouts
    n = pl.world_size
    fixed = _Fixed(pl, reduced)
    place: dict[fx.Node, Any] = {}
    edits: dict[tuple, Edit] = {}
    no_gather_vars = {layouts.find(s.column_vars[k]) for k, st in s.styles.items() if st == "column_no_gather"}

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
        kept = [i for i, (p, need) in enumerate(zip(ins, needs)) if isinstance(p, A.Partial) and need == A.SAME]
        if isinstance(out, A.Partial) and op.kind == "pointwise" and len(op.tensors) == 2 and len(kept) == 1:
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
            params[name] = ParamShard(shape=shape, dim=dim, segments=value if value and len(value) > 1 else None)
    param_names = {name for name, _ in pl.gm.named_parameters(remove_duplicate=False)}
    grads = _grad_nodes(pl.ops, param_names)
    by_name = {op.name: op for op in pl.ops}

    modules: dict[str, ModulePlan] = {}
    owner_of: dict[str, str] = {}
    for op in pl.ops:
        if op.kind not in ("linear", "embedding"):
            continue
        key = _key(op)
        style = s.styles.get(op.name) or "replicate"
        names = [x for x in (op.attrs.get("weight"), op.attrs.get("bias")) if x]
        split = next((params[x] for x in names if params[x].dim is not None), None)
        reason = pl.reasons.get(op.name) or _region_reason(pl, op, style)
        modules[key] = ModulePlan(path=key, kind=op.kind, style=style, params=names, reason=reason,
                                  segments=split.segments if split else None)
        owner_of[op.name] = key
    covered = {x for m in modules.values() for x in m.params}
    leftovers: dict[str, list[str]] = {}
    for name in param_names:
        if name not in covered and pl.canon.get(name, name) not in covered:
            leftovers.setdefault(name.rpartition(".")[0] or "<root>", []).append(name)
    for path, names in leftovers.items():
        modules.setdefault(path, ModulePlan(path=path, kind="module", style="replicate", params=sorted(names),
                                            reason="parameters kept whole (norms, biases of whole tensors)"))

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

    for e in edits:
        if e.kind == "copy":
            count(owner_of.get(e.users[0]), "bwd all_reduce")
        elif e.kind == "reduce":
            count(producer(e.node), "fwd all_reduce")
        elif e.kind == "gather":
            count(producer(e.node), "fwd all_gather")
        elif e.kind == "scatter" and by_name[e.node].node in grads:
            count(producer(e.users[0]), "bwd all_gather")
    ties = {a: c for a, c in pl.canon.items() if a != c}
    notes = ["tied: " + ", ".join(f"{a} = {c}" for a, c in sorted(ties.items()))] if ties else []
    return Plan(world_size=n, modules=modules, params=params, edits=edits, capture=pl.capture_kind,
                ties=ties, notes=notes)
