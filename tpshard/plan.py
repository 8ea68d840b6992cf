"""The Plan: plain data that says how a model is split, shared by the rewriter, the CLI, the
checkpoint code and the verifier.

A Plan holds
- ``modules``: per linear/embedding use, its style (column, row, vocab, embed_dim, replicate,
  column_no_gather), the reason, and the collectives it brings;
- ``params``: per parameter (and buffer), the split dim and layout, or replicated;
- ``edits``: the graph changes the rewriter makes, each naming the node it acts on —
  collectives on edges (copy, reduce, gather, scatter) and shape literals divided by the
  world size;
- ``attribute_changes``: for in-place mode only, the module attributes (head counts, widths)
  divided on every rank, found at plan time (None: not searched, the plan is for the graph);
- ``blocks``: the repeated blocks captured as two and stamped (empty: captured whole), so that
  the graph the edits name is captured again the same way.

It prints as a table (:meth:`Plan.explain`) and round-trips through JSON exactly.

Example::

    >>> p = Plan(world_size=2, params={"w": ParamShard(shape=(4, 2), dim=0)})
    >>> Plan.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tpshard import layout

__all__ = ["Plan", "ModulePlan", "ParamShard", "Edit", "AttributeChange", "PlanError", "ExportedPlan", "FORMAT_VERSION",
           "GRAD_LOCAL", "GRAD_WHOLE", "GRAD_ALL_REDUCE", "GRAD_ALL_GATHER", "GRAD_REPLICAS"]

# Version 2 adds ParamShard.replicas; a plan without replicated shards is still written as 1.
FORMAT_VERSION = 2


# Where each rank's gradient of a parameter comes from (Plan.grads values).
GRAD_LOCAL = "split: each rank's gradient is its shard's"
GRAD_WHOLE = "replicated: computed whole on every rank"
GRAD_ALL_REDUCE = "partial on each rank: all-reduced in backward"
GRAD_ALL_GATHER = "sliced on each rank: slices all-gathered in backward"
GRAD_REPLICAS = "replicated shard: partial on each replica, all-reduced among the ranks holding it in backward"


class PlanError(ValueError):
    """The model cannot be planned as asked; the message names the module or node and the fix."""


@dataclass(frozen=True)
class ParamShard:
    """How one parameter or buffer is split: along ``dim`` with ``segments`` (None: contiguous),
    or replicated when ``dim`` is None. ``shape`` is the full shape.

    ``replicas`` > 1 (grouped-query k/v with fewer kv heads than ranks): the dim is split into
    ``world_size // replicas`` blocks, and ``replicas`` consecutive ranks hold the same block
    (rank ``r`` holds block ``r // replicas``). Invariant: ``replicas`` divides the world size.

    Example::

        >>> import torch
        >>> kv = ParamShard(shape=(4, 1), dim=0, replicas=2)   # 2 kv heads of 2 rows, 4 ranks
        >>> [kv.shard(torch.arange(4.).view(4, 1), r, 4).view(-1).tolist() for r in range(4)]
        [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]
        >>> kv.local_shape(4), kv.unshard([kv.shard(torch.arange(4.).view(4, 1), r, 4) for r in range(4)]).view(-1).tolist()
        ((2, 1), [0.0, 1.0, 2.0, 3.0])
    """

    shape: tuple[int, ...]
    dim: int | None = None
    segments: tuple[int, ...] | None = None
    replicas: int = 1

    @property
    def replicated(self) -> bool:
        return self.dim is None

    def blocks(self, world_size: int) -> int:
        """How many distinct parts the split dim has: ``world_size // replicas``."""
        if self.replicas < 1 or world_size % self.replicas:
            raise ValueError(f"replicas {self.replicas} does not divide the world size {world_size}")
        return world_size // self.replicas

    def local_shape(self, world_size: int) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(self.shape)
        s = list(self.shape)
        s[self.dim] //= self.blocks(world_size)
        return tuple(s)

    def shard(self, tensor: Any, rank: int, world_size: int) -> Any:
        """This rank's part of the full ``tensor`` (the tensor itself when replicated)."""
        if self.dim is None:
            return tensor
        return layout.shard(tensor, self.dim, rank // self.replicas, self.blocks(world_size), self.segments)

    def unshard(self, shards: list[Any]) -> Any:
        """The full tensor from every rank's part, in rank order (one replica of each block)."""
        if self.dim is None:
            return shards[0]
        return layout.unshard(list(shards)[::self.replicas], self.dim, self.segments)


@dataclass
class ModulePlan:
    """The style of one linear or embedding use (``path`` is its module, or module:node)."""

    path: str
    kind: str                    # linear | embedding | experts (a routed experts region)
    style: str                   # column | row | vocab | embed_dim | replicate | column_no_gather | expert_tp
                                 # | expert_parallel;
                                 # for a module's other parameters (kind "module"): replicate | sliced
    params: list[str] = field(default_factory=list)
    reason: str = ""
    segments: tuple[int, ...] | None = None   # layout of the split features (column/row)
    collectives: dict[str, int] = field(default_factory=dict)  # "fwd all_reduce" -> count
    # style expert_parallel: the routing remap (tpshard.compiler.moe_ep); empty otherwise
    expert_parallel: dict[str, Any] = field(default_factory=dict)


@dataclass
class Edit:
    """One graph change. ``kind``:

    - copy: ``node``'s value enters the parallel region for ``users`` (fwd identity, bwd all-reduce):
      the input of a column linear, or any replicated value (a parameter, a broadcast term) that
      meets split values whole, whose gradient each rank computes only in part. Copies with the
      same ``joint`` number (a mixture-of-experts layer's tokens, routing weights and shared
      expert gate) enter together: one bwd all-reduce of all their gradients
    - reduce: all-reduce ``node`` (a partial sum) for ``users``, then add ``biases`` once
      (parameter names, or "%name" for a replicated node added to the partial sum)
    - gather: all-gather ``node`` along ``dim`` (``segments`` layout) for ``users``
    - scatter: keep this rank's slice of ``node`` along ``dim`` for ``users`` (free when no
      gradient flows); ``reduced``: the slice is of the all-reduced value
    - copy_params: the module called at ``node`` (a norm kept whole on split values) takes its own
      parameters through one copy, so their partial gradients are summed in one bwd all-reduce
    - shape: the shape argument at output ``dim`` of view/reshape/expand ``node`` becomes ``size``
    - split_sizes: the sizes argument of split ``node`` becomes ``sizes``
    - skip_add: the add ``node`` of a partial sum and a replicated value passes on its input
      ``dim`` (the partial sum) alone; the replicated value is added after the reduce
    - drop_bias: the functional row linear ``node`` runs without its bias (added after the reduce)
    - vocab_lookup: the functional embedding ``node`` (vocabulary ``size``) becomes this rank's
      masked partial lookup
    - replica_grad: the linear ``node`` (a k/v projection with replicated kv heads) takes its
      parameters through one copy over its replica subgroup (the ``size`` consecutive ranks that
      hold the same kv head): forward identity, backward one subgroup all-reduce

    Sequence parallelism (:mod:`tpshard.compiler.sequence`) adds:

    - reduce_scatter: reduce-scatter the partial sum ``node`` along the sequence ``dim`` for
      ``users`` (bwd all-gather), then add ``biases`` on the shards (a parameter through a copy:
      each rank's share of its gradient is all-reduced in backward)
    - all_gather_seq: all-gather the sequence shards of ``node`` along ``dim`` for ``users``, the
      column linears (bwd reduce-scatter: their input gradients are partial)
    - gather_seq: all-gather the sequence shards of ``node`` along ``dim`` for ``users`` that
      compute whole (bwd: this rank's slice)
    - whole_seq: as gather_seq, for a ``node`` that also has an all_gather_seq: its all-gathered
      value is reused (no second all-gather)
    - seq_size: the size read by ``node`` is of a sequence shard; multiply its sequence ``dim``
      (None: the int itself) by ``size``
    """

    kind: str
    node: str
    users: list[str] = field(default_factory=list)
    dim: int | None = None
    segments: tuple[int, ...] | None = None
    biases: list[str] = field(default_factory=list)
    size: int | None = None
    sizes: list[int] | None = None
    reduced: bool = False
    joint: int | None = None


@dataclass(frozen=True)
class AttributeChange:
    """In-place mode: the integer attribute ``attribute`` of the module at ``module`` ("" for
    the root) holds ``old`` in the model and ``new`` on every rank — a head count or a width
    the model's own code reads (HF GPT-2's ``split_size``, ``Conv1D.nf``)."""

    module: str
    attribute: str
    old: int
    new: int


@dataclass
class Plan:
    """How a model is split over ``world_size`` ranks (see module docstring)."""

    world_size: int
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    params: dict[str, ParamShard] = field(default_factory=dict)
    edits: list[Edit] = field(default_factory=list)
    attribute_changes: list[AttributeChange] | None = None  # in-place mode only; None: not searched
    capture: str = "fx"
    ties: dict[str, str] = field(default_factory=dict)  # alias parameter name -> the name it is tied to
    notes: list[str] = field(default_factory=list)
    # parameter name -> where each rank's gradient comes from (split, whole, all-reduced, gathered)
    grads: dict[str, str] = field(default_factory=dict)
    # the user's overrides (fnmatch pattern -> style) the plan was made with, so it can be remade
    overrides: dict[str, str] = field(default_factory=dict)
    # sequence parallelism (empty: off): the sequence dim, why, the ops on sequence shards
    sequence: dict[str, Any] = field(default_factory=dict)
    # repeated blocks (empty: captured whole): the block list whose blocks 2 .. count-1 were
    # stamped from block 1 at capture, so that a rank captures the same graph (node names) again
    blocks: dict[str, Any] = field(default_factory=dict)

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        for optional in ("sequence", "blocks"):  # plans without them read as before
            if not d[optional]:
                del d[optional]
        for m in d["modules"].values():  # and modules without expert parallelism
            if not m["expert_parallel"]:
                del m["expert_parallel"]
        for e in d["edits"]:  # as do edits outside joint copies
            if e["joint"] is None:
                del e["joint"]
        for p in d["params"].values():  # plans without replicated shards read as before (version 1)
            if p["replicas"] == 1:
                del p["replicas"]
        if all(p.replicas == 1 for p in self.params.values()):
            d["format_version"] = 1
        return d

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as JSON; :meth:`from_json` gives back an equal Plan."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise PlanError(f"plan format version {version} is newer than this tpshard reads "
                            f"({FORMAT_VERSION}); upgrade tpshard")
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        modules = {k: ModulePlan(**{**m, "segments": tup(m.get("segments"))}) for k, m in d["modules"].items()}
        params = {k: ParamShard(shape=tuple(p["shape"]), dim=p["dim"], segments=tup(p["segments"]),
                                replicas=p.get("replicas", 1))
                  for k, p in d["params"].items()}
        edits = [Edit(**{**e, "segments": tup(e.get("segments"))}) for e in d["edits"]]
        changes = d.get("attribute_changes")  # absent from plans written before in-place plans had it
        return cls(world_size=d["world_size"], modules=modules, params=params, edits=edits,
                   attribute_changes=None if changes is None else [AttributeChange(**c) for c in changes],
                   capture=d.get("capture", "fx"), ties=dict(d.get("ties", {})),
                   notes=list(d.get("notes", [])), grads=dict(d.get("grads", {})),
                   overrides=dict(d.get("overrides", {})), sequence=dict(d.get("sequence", {})),
                   blocks=dict(d.get("blocks", {})))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))

    # -- summaries --------------------------------------------------------------------------
    def collective_counts(self) -> dict[str, int]:
        """Collectives per forward and backward pass, e.g. {"fwd all_reduce": 5, ...}."""
        total: dict[str, int] = {}
        for m in self.modules.values():
            for k, v in m.collectives.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    def param_counts(self) -> tuple[int, int]:
        """(elements per rank, elements of the whole model) over the planned parameters."""
        per_rank = full = 0
        for name, p in self.params.items():
            if name in self.ties:
                continue  # counted under the name it is tied to
            n = 1
            for s in p.shape:
                n *= s
            full += n
            per_rank += n if p.dim is None else n // p.blocks(self.world_size)
        return per_rank, full

    def explain(self) -> str:
        """A table: module, style, split dim, parameters per rank, collectives, and why."""
        rows = [("module", "style", "split", "params/rank", "collectives", "why")]
        for path, m in self.modules.items():
            split = "-"
            elems = 0
            for name in m.params:
                p = self.params.get(name)
                if p is None:
                    continue
                if p.dim is not None and split == "-":
                    split = f"dim {p.dim}" + (f" {list(p.segments)}" if p.segments and len(p.segments) > 1 else "")
                    split += f" x{p.replicas} replicas" if p.replicas > 1 else ""
                n = 1
                for s in p.local_shape(self.world_size):
                    n *= s
                elems += n
            coll = ", ".join(f"{k} x{v}" for k, v in m.collectives.items()) or "-"
            rows.append((path, m.style, split, f"{elems:,}", coll, m.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
        per_rank, full = self.param_counts()
        totals = ", ".join(f"{k} x{v}" for k, v in self.collective_counts().items()) or "none"
        lines.append("")
        lines.append(f"world size {self.world_size}: {per_rank:,} of {full:,} parameter elements per rank "
                     f"({100 * per_rank / max(full, 1):.1f}%); collectives per step: {totals}")
        if self.overrides:
            lines.append("overrides: " + ", ".join(f"{k}={v}" for k, v in self.overrides.items()))
        lines.extend(self.notes)
        lines.extend(self._kept_whole_lines(full))
        lines.extend(self._attribute_lines())
        return "\n".join(lines)

    def _kept_whole_lines(self, full: int) -> list[str]:
        """"why not sharded" for every linear or embedding kept whole with over 1% of the parameters."""
        lines = []
        for path, m in self.modules.items():
            if m.style != "replicate" or m.kind not in ("linear", "embedding"):
                continue
            n = sum(math.prod(self.params[x].shape) for x in m.params if x in self.params)
            if n * 100 > full:
                lines.append(f"why not sharded: {path} ({100 * n / max(full, 1):.1f}% of parameters): {m.reason}")
        return lines

    def _attribute_lines(self) -> list[str]:
        """In-place mode's attribute changes, one line per (attribute, old, new)."""
        if not self.attribute_changes:
            return [] if self.attribute_changes is None else ["in place: no attribute changes"]
        by_value: dict[tuple[str, int, int], list[str]] = {}
        for c in self.attribute_changes:
            by_value.setdefault((c.attribute, c.old, c.new), []).append(c.module or "<root>")
        lines = []
        for (attr, old, new), paths in by_value.items():
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            lines.append(f"in place: {attr} {old} -> {new} on {shown}")
        return lines

    def __str__(self) -> str:
        return self.explain()

    # -- export to other libraries' plans ---------------------------------------------------
    def to_dtensor_plan(self, *, strict: bool = True) -> "ExportedPlan":
        """The ``parallelize_module`` plan (module path -> ``ParallelStyle``) of what DTensor
        can express: ``ColwiseParallel``, ``RowwiseParallel`` and their layouts.

        What it cannot express — fused projections split per part, transposed (Conv1D)
        weights, partial gradients of replicated parameters, graph edits and the attributes an
        eager model must have divided — is listed in ``.unsupported``; with ``strict`` (the
        default) that is a :class:`PlanError` naming each item.

        Example::

            >>> import torch, tpshard
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
            >>> {k: type(v).__name__ for k, v in tpshard.plan(mlp, 2).to_dtensor_plan().items()}
            {'0': 'ColwiseParallel', '2': 'RowwiseParallel'}
        """
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        def style(m: ModulePlan) -> Any:
            gathered = m.collectives.get("fwd all_gather", 0) > 0
            if m.style == "vocab":
                return RowwiseParallel(input_layouts=Replicate())
            if m.style == "embed_dim":
                return ColwiseParallel(output_layouts=Replicate())
            if m.style == "row":
                return RowwiseParallel()
            return ColwiseParallel(output_layouts=Replicate()) if gathered else ColwiseParallel()

        styles, unsupported = self._export(style, "DTensor", grads_expressible=False)
        return ExportedPlan.checked(styles, unsupported, "to_dtensor_plan", strict)

    def to_hf_tp_plan(self, *, prefix: str = "", strict: bool = True) -> "ExportedPlan":
        """A Hugging Face ``tp_plan`` (module path -> style name: ``colwise``, ``rowwise``,
        ``colwise_gather_output``, ``embedding_rowwise``, ``packed_colwise``, ...), with layer
        indices collapsed to ``*`` where every layer agrees. ``prefix`` (e.g. ``"model."``) is
        stripped from the paths that have it, for a ``base_model_tp_plan``. What it cannot
        express is in ``.unsupported`` (with ``strict``, a :class:`PlanError`).

        Example::

            >>> import torch, tpshard
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
            >>> dict(tpshard.plan(mlp, 2).to_hf_tp_plan())
            {'0': 'colwise', '2': 'rowwise'}
        """
        def style(m: ModulePlan) -> str:
            packed = m.segments is not None and len(m.segments) > 1
            if m.style == "vocab":
                return "embedding_rowwise"
            if m.style == "embed_dim":
                return "embedding_colwise"
            if m.style == "row":
                return "packed_rowwise" if packed else "rowwise"
            if m.collectives.get("fwd all_gather", 0) > 0:
                return "colwise_gather_output"
            return "packed_colwise" if packed else "colwise"

        styles, unsupported = self._export(style, "Hugging Face", grads_expressible=True)
        out: dict[str, str] = {}
        for path, st in styles.items():  # layers.3.mlp -> layers.*.mlp where every layer agrees
            path = path[len(prefix):] if prefix and path.startswith(prefix) else path
            starred = re.sub(r"\.\d+\.", ".*.", path)
            out[starred] = st if out.get(starred, st) == st else "?"
        if "?" in out.values():  # layers disagree: keep their own paths
            out = {(p[len(prefix):] if prefix and p.startswith(prefix) else p): st for p, st in styles.items()}
        return ExportedPlan.checked(out, unsupported, "to_hf_tp_plan", strict)

    def _export(self, style: Any, target: str, grads_expressible: bool) -> tuple[dict[str, Any], list[str]]:
        """(path -> style, what ``target`` cannot express) over the split modules and the edits."""
        styles: dict[str, Any] = {}
        unsupported: list[str] = []
        for path, m in self.modules.items():
            if m.style == "replicate":
                continue
            if m.kind == "experts":
                unsupported.append(f"{path}: routed experts split along every expert's hidden dim ({m.style}), "
                                   f"which {target}'s styles do not express")
                continue
            weight = self.params.get(f"{path}.weight")
            natural = {"column": 0, "column_no_gather": 0, "row": 1, "vocab": 0, "embed_dim": 1}[m.style]
            if weight is not None and weight.replicas > 1:
                unsupported.append(f"{path}: kv heads replicated {weight.replicas}-fold (ranks that hold the same "
                                   f"head all-reduce its gradient in a subgroup), which {target} does not express")
                continue
            if weight is not None and weight.dim is not None and weight.dim % len(weight.shape) != natural:
                unsupported.append(f"{path}: its weight is split along dim {weight.dim} (stored transposed, like "
                                   f"Conv1D), which {target}'s {m.style} style does not split")
                continue
            if m.segments is not None and len(m.segments) > 1 and (
                    target == "DTensor" or len(set(m.segments)) > 1):
                unsupported.append(f"{path}: a fused projection of parts {list(m.segments)}, each split by itself; "
                                   f"{target} splits the weight as one block")
                continue
            styles[path] = style(m)
        if self.attribute_changes:
            unsupported.extend(f"{c.module}.{c.attribute}: set to {c.new} (was {c.old}) on every rank; the model's "
                               "own code reads it" for c in self.attribute_changes)
        elif self.attribute_changes is None and any(e.kind in ("shape", "split_sizes") for e in self.edits):
            n = sum(e.kind in ("shape", "split_sizes") for e in self.edits)
            unsupported.append(f"{n} shape literals (head counts, split sizes) divided in the graph; whether the "
                               "eager model needs attributes divided is not known: plan with inplace=True")
        for e in self.edits:
            if e.kind == "scatter":
                unsupported.append(f"node {e.node}: sliced locally along dim {e.dim} (graph surgery)")
            elif e.kind == "copy_params" and not grads_expressible:
                unsupported.append(f"node {e.node}: a norm kept whole on split values, its parameters' gradients "
                                   "all-reduced in backward")
        if not grads_expressible:
            unsupported.extend(f"{name}: {how} (no parallelize_module style does it)"
                               for name, how in self.grads.items() if how in (GRAD_ALL_REDUCE, GRAD_ALL_GATHER))
            # (GRAD_REPLICAS parameters are already listed with their module above)
        else:
            for name, how in self.grads.items():
                if how == GRAD_ALL_REDUCE:
                    styles.setdefault(name.rpartition(".")[0], "replicated_with_grad_allreduce")
                elif how == GRAD_ALL_GATHER:
                    unsupported.append(f"{name}: {how}")
        return styles, unsupported


class ExportedPlan(dict):
    """A plan in another library's vocabulary (module path -> style), and ``unsupported``: what
    that vocabulary cannot express, one line each."""

    def __init__(self, styles: dict[str, Any], unsupported: list[str]) -> None:
        super().__init__(styles)
        self.unsupported = list(unsupported)

    @classmethod
    def checked(cls, styles: dict[str, Any], unsupported: list[str], what: str, strict: bool) -> "ExportedPlan":
        if unsupported and strict:
            raise PlanError(f"{what}: the plan has {len(unsupported)} parts this target cannot express: "
                            + "; ".join(unsupported[:8]) + ("; ..." if len(unsupported) > 8 else "")
                            + ". Pass strict=False to get the rest, with these in .unsupported")
        return cls(styles, unsupported)
