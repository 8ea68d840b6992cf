"""The planner: choose a style for every linear and embedding, by trying regions.

Phases, in order:

1. Seeds, in graph order. An embedding tries "vocab" (its lookup becomes a partial sum); a
   linear whose input is replicated tries "column" (its output becomes S(-1)).
2. A trial propagates the seed's placement forward with :func:`tpshard.compiler.analysis.transfer`
   until every split value has reached a row linear (which turns it into a partial sum) or the
   graph output, and every partial sum has been reduced. When an op needs another operand
   split (q meets k in ``q @ k.T``; ``silu(gate) * up``), the trial *pulls*: the undecided
   linear that produces that operand through views becomes column-parallel too. Choices
   (pull or slice; which dim of a reshape carries the split) are backtracked on failure.
3. A trial that fails leaves the seed replicated, with the failing node and reason recorded;
   a failure that is only a size the world size does not divide is an error, because silently
   replicating an attention block or MLP would be a performance cliff (a lone output head is
   replicated instead).
4. Replay: with every style fixed, passes over the graph (until the set of reduced partial
   sums is stable) give the final placements and the edits (collectives on edges, shape
   literals) that make up the Plan.

The planner decides; it never mutates the graph or the model.
"""

from __future__ import annotations

import fnmatch
import heapq
from collections import ChainMap
from typing import Any

import networkx as nx
import torch.fx as fx

from tpshard.compiler import analysis as A
from tpshard.compiler.ir import Op, shape_of
from tpshard.compiler.ir import plan_key as _key
from tpshard.compiler.kv_heads import KEPT_WHOLE_PREFIX
from tpshard.compiler.moe import EXPERT_STYLE, describe_split, probe
from tpshard.compiler.moe_ep import EP_STYLE, choose_ep, ep_reason
from tpshard.compiler.planner_replay import replay
from tpshard.compiler.styles import STYLES
from tpshard.plan import Plan, PlanError

__all__ = ["make_plan", "STYLES"]

_MAX_TRIES = 48
_MISSING = object()


class _State:
    """Committed (or, in a trial, overlaid) planning state."""

    def __init__(self) -> None:
        self.place: dict[fx.Node, Any] = {}
        self.styles: dict[str, str] = {}          # op name -> style
        self.params: dict[str, Any] = {}          # param name -> (dim, var) or None (replicated)
        self.column_vars: dict[str, int] = {}     # op name -> layout var of its output features
        self.layouts = A.Layouts()


class _Trial:
    """One attempt to grow a region from a seed. Implements analysis.Decider."""

    def __init__(self, planner: "_Planner", decisions: dict[str, int], world_size: int | None = None) -> None:
        base = planner.state
        self.planner = planner
        self.world_size = world_size or planner.world_size
        self.place = ChainMap({}, base.place)
        self.styles = ChainMap({}, base.styles)
        self.params = ChainMap({}, base.params)
        self.column_vars = ChainMap({}, base.column_vars)
        self.cache: dict[fx.Node, tuple] = {}  # per trial: layouts may be pinned between trials
        self.layouts = base.layouts.copy()
        self.decisions = decisions
        self.made: list[tuple[str, int, int]] = []
        self.heap: list[tuple[int, str]] = []
        self.queued: set[fx.Node] = set()

    # -- Decider ----------------------------------------------------------------------------
    def linear_style(self, op: Op) -> str | None:
        return self.styles.get(op.name)

    def embedding_style(self, op: Op) -> str | None:
        return self.styles.get(op.name)

    def column_var(self, op: Op) -> int:
        return self.column_vars[op.name]

    def make_row(self, op: Op, var: int) -> None:
        ov = self.planner.override(op)
        if ov not in (None, "row"):
            raise A.Fail(op, f"would be row-parallel, but the override says {ov!r}")
        in_features = shape_of(op.tensors[0])[op.attrs.get("in_dim", -1)]
        if self.layouts.get(var) is None:
            A.check_segments(self, op, (in_features,), f"in_features of {_key(op)}")
            self.layouts.pin(var, (in_features,))
        A.check_segments(self, op, self.layouts.get(var), f"in_features of {_key(op)}")
        self.styles[op.name] = "row"
        self._param(op, op.attrs["weight"], op.attrs.get("w_in", 0 if op.attrs.get("transposed") else 1), var)
        if op.attrs["bias"]:
            self._param(op, op.attrs["bias"], None, None)

    def choose(self, op: Op, candidates: list[Any]) -> Any:
        key = f"choice:{op.name}"
        for k, _, chosen in self.made:
            if k == key:
                return candidates[min(chosen, len(candidates) - 1)]
        chosen = self.decisions.get(key, 0)
        if chosen >= len(candidates):
            raise A.Fail(op, "no remaining choice")
        self.made.append((key, len(candidates), chosen))
        return candidates[chosen]

    # -- state changes ----------------------------------------------------------------------
    def _param(self, op: Op, name: str, dim: int | None, var: int | None) -> None:
        name = self.planner.canon.get(name, name)
        have = self.params.get(name, _MISSING)
        if have is _MISSING:
            self.params[name] = (dim, var) if dim is not None else None
            return
        if have is None and dim is None:
            return
        if have is None or dim is None or have[0] != dim or not self.layouts.unify(have[1], var):
            raise A.Fail(op, f"parameter {name!r} is used elsewhere with a different split "
                             f"({'replicated' if have is None else f'dim {have[0]}'})")

    def make_column(self, op: Op) -> None:
        out_features = shape_of(op.node)[op.attrs.get("out_dim", -1)]
        A.check_segments(self, op, (out_features,), f"out_features of {_key(op)}")
        var = self.layouts.new(out_features)
        self.styles[op.name] = "column"
        self.column_vars[op.name] = var
        self._param(op, op.attrs["weight"], op.attrs.get("w_out", 1 if op.attrs.get("transposed") else 0), var)
        if op.attrs["bias"]:
            self._param(op, op.attrs["bias"], 0, var)
        self.push(op.node)

    def make_experts(self, op: Op, split: dict[str, Any], style: str = EXPERT_STYLE) -> None:
        """Expert tensor parallelism: every expert's hidden dim split (see tpshard.compiler.moe);
        or expert parallelism: whole experts per rank (tpshard.compiler.moe_ep)."""
        self.styles[op.name] = style
        for rel, (dim, segments) in split.items():
            name = f"{op.attrs['key']}.{rel}"
            size = self.planner.param_shapes[name][dim]
            self._param(op, name, dim, self.layouts.new(size, segments or (size,)))
        self.push(op.node)

    def make_vocab(self, op: Op) -> None:
        vocab = self.planner.param_shapes[op.attrs["weight"]][0]
        self.styles[op.name] = "vocab"
        self._param(op, op.attrs["weight"], 0, self.layouts.new(vocab, (vocab,)))
        self.push(op.node)

    def push(self, node: fx.Node) -> None:
        if node not in self.queued:
            self.queued.add(node)
            heapq.heappush(self.heap, (self.planner.index[node], node.name))

    def placement(self, node: Any) -> Any:
        return self.place.get(node, A.REPLICATED)

    # -- propagation ------------------------------------------------------------------------
    def propagate(self) -> None:
        planner = self.planner
        while self.heap:
            idx, _ = heapq.heappop(self.heap)
            op = planner.ops[idx]
            self.queued.discard(op.node)
            ins = [self.placement(t) for t in op.tensors]
            key = (tuple(self.freeze(p) for p in ins), self.styles.get(op.name))
            cached = self.cache.get(op.node)
            if cached is not None and cached[0] == key:
                out, needs = cached[1]
            else:
                out, needs = A.transfer(op, ins, self)
                self.cache[op.node] = (key, (out, needs))
            for t, p, need in zip(op.tensors, ins, needs):
                if isinstance(need, A.Split) and p is A.REPLICATED:
                    self.pull(t)
            if self.freeze(out) != self.freeze(self.placement(op.node)):
                self.place[op.node] = out
                for user in op.node.users:
                    self.push(user)

    def pull(self, node: fx.Node) -> None:
        """Make the undecided linears behind ``node`` column-parallel, so it arrives split.

        Walks back through replicated shape and pointwise ops (q through its rotary embedding,
        k through a grouped-query repeat) to linears whose own input is replicated.
        """
        planner = self.planner
        stack, seen = [node], set()
        while stack and len(seen) < 64:
            m = stack.pop()
            if m in seen or self.placement(m) is not A.REPLICATED:
                continue
            seen.add(m)
            op = planner.ops[planner.index[m]]
            if op.kind == "linear":
                if self.styles.get(op.name) is None and self.placement(op.tensors[0]) is A.REPLICATED \
                        and planner.override(op) in (None, "column") and self._decide(f"pull:{op.name}"):
                    self.make_column(op)
            elif op.kind in ("view", "dims", "expand", "pointwise", "item", "split", "cat"):
                stack.extend(op.tensors)

    def _decide(self, key: str) -> bool:
        for k, _, chosen in self.made:
            if k == key:
                return chosen == 0
        chosen = self.decisions.get(key, 0)
        self.made.append((key, 2, chosen))
        return chosen == 0

    def freeze(self, p: Any) -> Any:
        """A comparable form of a placement: splits compare by dim and layout, not variable id."""
        if isinstance(p, list):
            return tuple(self.freeze(x) for x in p)
        if isinstance(p, A.Split):
            value = self.layouts.get(p.var)
            return ("S", p.dim, value if value is not None else self.layouts.find(p.var))
        return p

    def validate(self) -> None:
        """Sizes of split dims may only feed the shape arguments the rewriter replaces."""
        for node, p in self.place.maps[0].items():
            if isinstance(p, A.SplitSize):
                for user in node.users:
                    uop = self.planner.ops[self.planner.index[user]]
                    if uop.kind not in ("view", "expand"):
                        raise A.Fail(uop, "uses the size of a split dim in arithmetic")




class _Planner:
    def __init__(self, gm: fx.GraphModule, ops: list[Op], world_size: int, overrides: dict[str, str] | None,
                 capture_kind: str, kv_replicas: bool = True, expert_parallel: bool = False) -> None:
        self.gm = gm
        self.expert_parallel = expert_parallel
        self.expert_specs: dict[str, dict[str, Any]] = {}  # experts op -> remap (moe_ep)
        self.kv_replicas = kv_replicas
        self.replicas: dict[str, int] = {}  # parameter -> replicas (replicated kv heads, see kv_heads)
        self.ops = ops
        self.world_size = world_size
        self.capture_kind = capture_kind
        self.index = {op.node: i for i, op in enumerate(ops)}
        self.graph = nx.DiGraph()  # the data flow: value -> consumer
        self.graph.add_nodes_from(op.node for op in ops)
        self.graph.add_edges_from((src, op.node) for op in ops for src in op.node.all_input_nodes)
        self.state = _State()
        self.reasons: dict[str, str] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.canon: dict[str, str] = {}  # every parameter name -> the first name of the same tensor (ties)
        first: dict[int, str] = {}
        # In module order (named_parameters), so that everything written from it is deterministic.
        self.param_names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
        for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            self.param_shapes[name] = tuple(t.shape)
            self.canon[name] = first.setdefault(id(t), name)
        self.overrides = dict(overrides or {})
        for pattern, style in self.overrides.items():
            if style not in STYLES:
                raise PlanError(f"override {pattern!r}: unknown style {style!r}; use one of {sorted(STYLES)}")
        self.used_overrides: set[str] = set()

    def override(self, op: Op) -> str | None:
        for pattern, style in self.overrides.items():
            if fnmatch.fnmatchcase(_key(op), pattern) or fnmatch.fnmatchcase(op.module, pattern):
                self.used_overrides.add(pattern)
                return style
        return None

    # -- phase 1-3: seeds and trials ---------------------------------------------------------
    def run(self) -> Plan:
        for op in self.ops:
            if op.kind == "embedding" and op.name not in self.state.styles:
                self.seed_embedding(op)
            elif op.kind == "experts" and op.name not in self.state.styles:
                self.seed_experts(op)
            elif op.kind == "linear" and op.name not in self.state.styles:
                if not isinstance(self.state.place.get(op.tensors[0]), A.Split):  # R, or P reduced first
                    self.seed_linear(op)
        for pattern in self.overrides:
            if pattern not in self.used_overrides:
                raise PlanError(f"override {pattern!r} matches no linear or embedding in the model")
        return self.replay()

    def attempt(self, seed: Op, start: Any, world_size: int | None = None) -> tuple[_Trial | None, list[A.Fail]]:
        """Grow a region from ``seed``, backtracking over the trials' choices. ``world_size=1``
        is a probe: which failures are structural, whatever the sizes."""
        decisions: dict[str, int] = {}
        failures: list[A.Fail] = []
        for _ in range(_MAX_TRIES):
            trial = _Trial(self, decisions, world_size)
            try:
                start(trial)
                trial.propagate()
                trial.validate()
                return trial, failures
            except A.Fail as f:
                failures.append(f)
                for i in range(len(trial.made) - 1, -1, -1):
                    key, n, chosen = trial.made[i]
                    if chosen + 1 < n:
                        decisions = {k: c for k, _, c in trial.made[:i]}
                        decisions[key] = chosen + 1
                        break
                else:
                    return None, failures
        return None, failures

    def commit(self, trial: _Trial) -> None:
        s = self.state
        s.place.update(trial.place.maps[0])
        s.styles.update(trial.styles.maps[0])
        s.params.update(trial.params.maps[0])
        s.column_vars.update(trial.column_vars.maps[0])
        s.layouts = trial.layouts

    def replicate(self, op: Op, reason: str) -> None:
        self.state.styles[op.name] = "replicate"
        self.reasons[op.name] = reason
        for name in (op.attrs.get("weight"), op.attrs.get("bias")):
            name = self.canon.get(name, name) if name else None
            if name and name not in self.state.params:
                self.state.params[name] = None

    def seed_embedding(self, op: Op) -> None:
        ov = self.override(op)
        vocab, dim = self.param_shapes[op.attrs["weight"]]
        n = self.world_size
        if ov == "replicate" or n == 1:
            return self.replicate(op, "override" if ov else "world size 1")
        if ov == "embed_dim":
            if dim % n:
                raise PlanError(f"{_key(op)}: embedding_dim {dim} is not divisible by the world size {n}")
            self.state.styles[op.name] = "embed_dim"
            self.state.params[self.canon[op.attrs["weight"]]] = (1, self.state.layouts.new(dim, (dim,)))
            self.reasons[op.name] = "override: embedding-dim partition, output gathered"
            return
        if ov not in (None, "vocab"):
            raise PlanError(f"override {ov!r} does not apply to the embedding {_key(op)}; use vocab, embed_dim or replicate")
        if vocab % n:
            if ov == "vocab":
                raise PlanError(f"{_key(op)}: num_embeddings {vocab} is not divisible by the world size {n}")
            return self.replicate(op, f"vocabulary {vocab} is not divisible by {n}; pad it to a multiple of {n} to split it")
        trial, failures = self.attempt(op, lambda t: t.make_vocab(op))
        if trial is None:
            return self.replicate(op, failures[0].args[0])
        self.commit(trial)
        self.reasons[op.name] = "vocabulary partition: masked lookup, partial sums reduced once"

    def seed_experts(self, op: Op) -> None:
        ov = self.override(op)
        if ov not in (None, "replicate", EXPERT_STYLE, EP_STYLE):
            raise PlanError(f"override {ov!r} does not apply to the experts {_key(op)}; use {EXPERT_STYLE}, "
                            f"{EP_STYLE} or replicate")
        if ov == "replicate" or self.world_size == 1:
            return self.replicate(op, "override" if ov else "world size 1")
        region = op.attrs["region"]
        wanted = ov == EP_STYLE or (self.expert_parallel and ov is None)
        ep, refused = choose_ep(_key(op), region, self.world_size, wanted, ov == EP_STYLE)
        if ep is not None:  # whole experts per rank: every parameter split along its expert dim
            split, style = {k: (0, None) for k, _ in region.module.named_parameters()}, EP_STYLE
        else:
            style = EXPERT_STYLE
            split, why = probe(region, self.world_size) if region.form else (
                None, "kept whole: parameters stacked per expert, but not called with tokens and expert ids")
            if split is None:
                if ov:
                    raise PlanError(f"override {ov!r} for {_key(op)} cannot be honored: {why}")
                return self.replicate(op, refused + why)
        trial, failures = self.attempt(op, lambda t: t.make_experts(op, split, style))
        if trial is None:
            return self.replicate(op, f"{refused}kept whole: {failures[0].reason} (at node {failures[0].op.name!r})")
        self.commit(trial)
        if ep is not None:
            self.expert_specs[op.name] = ep
            self.reasons[op.name] = ep_reason(ep, self.world_size) + f" (recognized as {region.form})"
        else:
            self.reasons[op.name] = (f"{refused}expert tensor parallelism over {region.experts} experts, recognized as "
                                     f"{region.form}: hidden dim split ({describe_split(split)}); partial sums "
                                     "reduced with the layer's")
        routing = self.reachable(op.node, lambda o: o.kind != "linear", reverse=True) - {op.tensors[0]}
        for n in routing:  # the router: whole, so that every rank routes alike
            other = self.ops[self.index[n]]
            if other.kind == "linear" and self.state.styles.get(other.name) == "replicate" \
                    and n not in self.reachable(op.tensors[0], lambda o: True, reverse=True):
                self.reasons[other.name] = ("the router of " + _key(op) + ": kept whole, so every rank routes alike "
                                            f"({self.reasons.get(other.name, '')})")

    def seed_linear(self, op: Op) -> None:
        ov = self.override(op)
        if ov == "replicate":
            return self.replicate(op, "override")
        if ov == "row":
            return  # reached from a column region, or reported at replay
        if self.world_size == 1:
            return self.replicate(op, "world size 1")
        trial, failures = self.attempt(op, lambda t: t.make_column(op))
        if trial is not None:
            self.commit(trial)
            if ov == "column_no_gather":
                self.state.styles[op.name] = "column_no_gather"
            return
        first = failures[0]
        div = next((f for f in failures if f.divisibility), None)
        if ov in ("column", "column_no_gather"):
            raise PlanError(f"override {ov!r} for {_key(op)} cannot be honored: {first.args[0]}")
        out_features = shape_of(op.node)[op.attrs.get("out_dim", -1)]
        if first.op is op and first.divisibility and out_features < self.world_size:
            # A gate Linear(d, 1), a 2-way classifier: no split exists at this world size.
            return self.replicate(op, f"kept whole: out_features {out_features} is smaller than the world size "
                                      f"{self.world_size}")
        if div is not None and self._joins_split(op):
            # Joins a split region (grouped-query k/v with fewer heads than ranks): kept whole,
            # which is exact; each rank slices the heads its region needs.
            # (tpshard.compiler.kv_heads replicates grouped-query kv heads instead, where exact.)
            return self.replicate(op, f"{KEPT_WHOLE_PREFIX}: {div.reason}")
        if div is not None:
            # Is a size the real blocker? Probe with every size divisible (one rank): when the
            # region fails even then, a missing rule blocks it, and that is what the plan says.
            probe, structural = self.attempt(op, lambda t: t.make_column(op), world_size=1)
            if probe is None:
                real = structural[0]
                return self.replicate(op, f"kept whole: {real.reason} (at node {real.op.name!r}, module "
                                          f"{real.op.module or '<root>'!r})")
        if div is not None and self._feeds_another_linear(op):
            raise PlanError(
                f"{_key(op)}: {div.reason} (at node {div.op.name!r}, module {div.op.module or '<root>'!r}). "
                f"Pick a world size that divides it, or keep it whole with overrides={{{_key(op)!r}: 'replicate'}}"
            )
        self.replicate(op, f"kept whole: {first.reason} (at node {first.op.name!r})")

    def reachable(self, start: fx.Node, through: Any, reverse: bool = False) -> set[fx.Node]:
        """Nodes reachable from ``start`` (consumers, or producers with ``reverse``) along edges
        that leave ``start`` or an op for which ``through(op)`` holds."""
        graph = self.graph.reverse(copy=False) if reverse else self.graph
        view = nx.subgraph_view(graph, filter_edge=lambda u, v: u is start or through(self.ops[self.index[u]]))
        return nx.descendants(view, start)

    def _downstream(self, seed: Op, found: Any, stop: tuple[str, ...]) -> bool:
        """Does ``found`` hold for an op the seed's output reaches (not walking past ``stop`` kinds)?"""
        return any(found(self.ops[self.index[n]])
                   for n in self.reachable(seed.node, lambda o: o.kind not in stop))

    def _joins_split(self, seed: Op) -> bool:
        """Does the seed's output meet a value an earlier region already split (before any
        linear)? Then keeping the seed whole still leaves that region split."""
        return self._downstream(seed, lambda o: any(isinstance(self.state.place.get(t), A.Split) for t in o.tensors),
                                stop=("linear", "norm", "output"))

    def _feeds_another_linear(self, seed: Op) -> bool:
        """Is the seed's output contracted again (a pair could form), or only the model's output?"""
        return self._downstream(seed, lambda o: o.kind in ("linear", "matmul", "sdpa"), stop=())

    # -- phase 4: replay ---------------------------------------------------------------------
    def replay(self) -> Plan:
        return replay(self)


def make_plan(gm: fx.GraphModule, ops: list[Op], world_size: int, overrides: dict[str, str] | None = None,
              capture_kind: str = "fx", kv_replicas: bool = True, expert_parallel: bool = False) -> Plan:
    """Plan ``gm`` (already shape-propagated and described as ``ops``) for ``world_size`` ranks.

    ``kv_replicas``: grouped-query kv heads fewer than the ranks are replicated where exact
    (:mod:`tpshard.compiler.kv_heads`); False keeps them whole (in-place plans).
    ``expert_parallel``: routed experts get whole experts per rank (:mod:`tpshard.compiler.moe_ep`)."""
    if world_size < 1:
        raise PlanError(f"world_size must be >= 1, got {world_size}")
    return _Planner(gm, ops, world_size, overrides, capture_kind, kv_replicas, expert_parallel).run()
