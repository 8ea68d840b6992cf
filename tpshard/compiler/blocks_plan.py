"""Repeated blocks planned once: the two-block plan's decisions given to every stamped block.

:mod:`tpshard.compiler.blocks` captures two blocks and stamps the rest. The planner plans the
two-block graph; :func:`stamp_plan` then writes block 1's rows (styles, parameter splits,
gradient sources) and its edits, renamed, for blocks 2 .. N-1. This is exact when the plan
itself shows the blocks are interchangeable, which is checked:

- block 0's decisions are block 1's, renamed (rows, reasons, parameters, gradients, edits);
- no edit crosses a block boundary (a collective between blocks — sequence parallelism has
  them — would need the boundary's two sides), and no tie involves a block's parameters;
- an edit on a value from before the blocks acts for block 0's and block 1's readers alike,
  and gets block k's readers added.

Otherwise :class:`~tpshard.compiler.blocks.NotRepeatable` is raised and the caller plans the full
(stamped) graph, which is always right, only slower. The test suite checks that a stamped plan
equals the full graph's plan.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch.nn as nn

from tpshard.compiler.blocks import NotRepeatable, Stamp
from tpshard.compiler.capture import capture
from tpshard.compiler.captured import Captured
from tpshard.compiler.planner import make_plan
from tpshard.compiler.planner_replay import plan_notes
from tpshard.plan import Edit, ModulePlan, Plan, PlanError

__all__ = ["stamp_plan", "plan_captured", "capture_for_plan"]

_TOKEN = re.compile(r"\w[\w.]*")  # a node name or a dotted path, in a bias reference or a reason
_QUOTED = re.compile(r"'(\w+)'")  # a node a reason names


class _Names:
    """Renames names of block 1 (and of block 0, the block before it) to those of block ``k``
    (and of block k-1): module paths by prefix, node names through the stamp's maps."""

    def __init__(self, stamp: Stamp, k: int, known: set[str] = frozenset()) -> None:  # k >= 2
        self.known = known  # the module paths reasons may name
        blocks = stamp.blocks
        self.paths = [(blocks.block(1), blocks.block(k)), (blocks.block(0), blocks.block(k - 1))]
        zero_to_prev = (dict(zip(stamp.seg0, stamp.seg1)) if k == 2 else
                        {a: stamp.copies[k - 3][b] for a, b in zip(stamp.seg0, stamp.seg1)})
        self.nodes = {**zero_to_prev, **stamp.copies[k - 2]}

    @classmethod
    def block0_as_block1(cls, stamp: Stamp, known: set[str]) -> "_Names":
        """Block 0's names as block 1's (what comes before the blocks stays as it is)."""
        names = cls.__new__(cls)
        names.known, names.paths = known, [(stamp.blocks.block(0), stamp.blocks.block(1))]
        names.nodes = dict(zip(stamp.seg0, stamp.seg1))
        return names

    def __call__(self, name: str) -> str:
        if name in self.nodes:
            return self.nodes[name]
        for old, new in self.paths:
            if name == old or name.startswith(old + ".") or name.startswith(old + ":"):
                head, sep, node = (new + name[len(old):]).partition(":")
                return head + sep + self.nodes.get(node, node)
        return name

    def text(self, text: str) -> str:
        """Every name in a bias reference (``%add_3@add_4``, a parameter name) renamed."""
        return _TOKEN.sub(lambda m: self(m.group(0)), text)

    def prose(self, text: str) -> str:
        """The module paths and quoted node names in a reason renamed; nothing else (its words
        may spell node names, "split", or numbers, "0.5", that look like a root Sequential's paths)."""
        text = _QUOTED.sub(lambda m: f"'{self.nodes.get(m.group(1), m.group(1))}'", text)  # (at node 'x')
        return _TOKEN.sub(lambda m: self(m.group(0)) if m.group(0) in self.known else m.group(0), text)


def _in(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".") or name.startswith(block + ":")


def _row(m: ModulePlan, names: Callable[[str], str], text: Callable[[str], str]) -> ModulePlan:
    return dataclasses.replace(m, path=names(m.path), params=[names(p) for p in m.params], reason=text(m.reason))


def _edit(e: Edit, names: _Names) -> Edit:
    return dataclasses.replace(e, node=names(e.node), users=[names(u) for u in e.users],
                               biases=[names.text(b) for b in e.biases])


def _refs(e: Edit) -> set[str]:
    return {e.node, *e.users, *(t for b in e.biases for t in _TOKEN.findall(b))}


def _after_last(items: list, is_block1: Callable[[Any], bool], extra: list) -> list:
    last = max((i for i, x in enumerate(items) if is_block1(x)), default=None)
    if last is None:
        if extra:
            raise NotRepeatable("block 1 has no entry to place the stamped blocks' entries after")
        return items
    return items[:last + 1] + extra + items[last + 1:]


def stamp_plan(two: Plan, stamp: Stamp) -> Plan:
    """The full model's plan from the plan of its two-block graph (see the module docstring)."""
    b = stamp.blocks
    b0, b1 = b.block(0), b.block(1)
    seg0, seg1, after = set(stamp.seg0), set(stamp.seg1), set(stamp.after)
    if two.sequence:
        raise NotRepeatable("sequence parallelism places collectives between blocks")
    if any(_in(a, b0) or _in(a, b1) or _in(t, b0) or _in(t, b1) for a, t in two.ties.items()):
        raise NotRepeatable("a block's parameter is tied")
    known = {*two.modules, *(p.rpartition(".")[0] for p in two.params)}
    zero_to_one = _Names.block0_as_block1(stamp, known)

    def same(kind: str, xs: Any, ys: Any) -> None:
        if xs != ys:
            raise NotRepeatable(f"{b0} and {b1} were planned differently ({kind})")

    # A row's collectives include those of the next block's edits it feeds (a kept-whole k of
    # the next block all-gathers in backward what this block's down projection produced), so
    # rows are compared without them; blocks 1 .. N-2 (followed by a block) take block 0's,
    # the last block (followed by what comes after the blocks) takes block 1's.
    rows = list(two.modules.items())
    bare_row = lambda m: dataclasses.replace(m, collectives={})  # noqa: E731
    rows0 = [_row(m, zero_to_one, zero_to_one.prose) for k, m in rows if _in(k, b0)]
    rows1 = [m for k, m in rows if _in(k, b1)]
    same("styles", [bare_row(m) for m in rows0], [bare_row(m) for m in rows1])
    for field_name in ("params", "grads"):
        d = getattr(two, field_name)
        same(field_name, [(zero_to_one(k), v) for k, v in d.items() if _in(k, b0)],
             [(k, v) for k, v in d.items() if _in(k, b1)])

    # Edits, by where they act (two-block names):
    # - own0 / own1: on block 0's (block 1's) nodes for its own readers; they may read the block
    #   before (a residual added after a reduce), so they are compared without those biases;
    # - out0 / out1: on a block's node for the next block's readers (out0: block 1's; out1: the
    #   part after the blocks') — the boundary between two blocks;
    # - before the blocks (block k's readers are added to block 1's) and after them (they read
    #   the last block where they read block 1).
    own0, own1, out0, out1 = [], [], [], []
    for i, e in enumerate(two.edits):
        users = set(e.users)
        if e.node in seg0:
            if _refs(e) - {e.node} - users & seg1 or not users <= seg0 | seg1:
                raise NotRepeatable(f"the edit {e.kind} on {e.node} acts across a block boundary")
            (own0 if users <= seg0 else out0).append(i)
        elif e.node in seg1:
            if _refs(e) - users & after:
                raise NotRepeatable(f"the edit {e.kind} on {e.node} acts across a block boundary")
            (own1 if users <= seg1 else out1).append(i)
        elif e.node in after:
            if _refs(e) & seg0:
                raise NotRepeatable(f"the edit {e.kind} on {e.node} after the blocks reads {b0}")
        elif users & seg1:
            same(f"readers of {e.node}", sorted(zero_to_one(u) for u in e.users if u in seg0),
                 sorted(u for u in e.users if u in seg1))
    # Joint copies (one backward all-reduce per MoE layer) are numbered in graph order: compared
    # as groups, renumbered for the stamped blocks below.
    bare = lambda e: dataclasses.replace(e, biases=[])  # noqa: E731
    unnumbered = lambda e: dataclasses.replace(e, joint=None if e.joint is None else -1)  # noqa: E731
    same("edits", len(own0), len(own1))
    joints: dict[int, int] = {}
    for i, j in zip(own0, own1):
        e0, e1 = _edit(two.edits[i], zero_to_one), two.edits[j]
        reads_before = bool(_refs(e1) & seg0)
        if e0.joint is not None and e1.joint is not None and joints.setdefault(e0.joint, e1.joint) != e1.joint:
            raise NotRepeatable(f"{b0} and {b1} join their copies differently")
        e0, e1 = unnumbered(e0), unnumbered(e1)
        same(f"the edit on {e1.node}", bare(e0) if reads_before else e0, bare(e1) if reads_before else e1)
    block1_joints = {two.edits[i].joint for i in own1 + out0} - {None}
    per_block = len(block1_joints)
    last_joint = max(block1_joints, default=-1)
    # out0 and out1 differ by their readers (the next block; what comes after the blocks), so
    # they are not compared: block 1's outputs are block 0's when its rows and own edits are.

    renames = [_Names(stamp, k, known) for k in range(2, b.count)]  # count >= 3: never empty
    last = renames[-1]
    middle = {m.path: m.collectives for m in rows0}  # block 1's paths -> block 0's collectives
    followed = [(k, dataclasses.replace(m, collectives=dict(middle[k])) if _in(k, b1) else m) for k, m in rows]
    stamped_rows = [(r(k), _row(m if r is last else dataclasses.replace(m, collectives=dict(middle[k])), r, r.prose))
                    for r in renames for k, m in rows if _in(k, b1)]
    modules = dict(_after_last(followed, lambda kv: _in(kv[0], b1), stamped_rows))
    dicts = {}
    for field_name in ("params", "grads"):
        items = list(getattr(two, field_name).items())
        dicts[field_name] = dict(_after_last(items, lambda kv: _in(kv[0], b1),
                                             [(r(k), v) for r in renames for k, v in items if _in(k, b1)]))
    # Block k's edits are block 1's, and the boundary k-1 -> k is the boundary 0 -> 1 (both
    # renamed: block 1's names to block k's, block 0's to block k-1's); after the blocks, block
    # 1's names are the last block's. Order: as the planner writes them, by node.
    # Block 1's edits come in runs (the planner's, in graph order; the kv-head pass's, appended):
    # each run's copies for blocks 2 .. N-1 follow it, block by block.
    mine = sorted(own1 + out0)
    runs = [[i] for i in mine[:1]]
    for i in mine[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    run_end = {run[-1]: run for run in runs}
    edits: list[Edit] = []
    def numbered(e: Edit, k: int) -> Edit:  # block k's joint number (block 1's + a block's count each)
        return e if e.joint is None else dataclasses.replace(e, joint=e.joint + (k - 1) * per_block)

    for i, e in enumerate(two.edits):
        if e.joint is not None and e.joint > last_joint:  # after the blocks: after every block's
            e = dataclasses.replace(e, joint=e.joint + (b.count - 2) * per_block)
        if e.node in after or i in out1:
            e = _edit(e, last)
        elif e.node not in seg0 | seg1 and any(u in seg1 for u in e.users):
            e = dataclasses.replace(e, users=e.users + [r(u) for r in renames for u in e.users if u in seg1])
        edits.append(e)
        if i in run_end:
            for k, r in enumerate(renames, 2):
                edits.extend(numbered(_edit(two.edits[j], r), k) for j in run_end[i])
    return dataclasses.replace(two, modules=modules, params=dicts["params"], grads=dicts["grads"], edits=edits,
                               notes=plan_notes(two.ties, dicts["grads"]))


def plan_captured(c: Captured, world_size: int, overrides: dict[str, str] | None = None,
                  kv_replicas: bool = True, expert_parallel: bool = False) -> Plan:
    """Plan a capture: a stamped one through its two-block graph (each block planned once), when
    the plan shows the blocks are interchangeable; else the full graph (a note in the plan says
    why), and with overrides (which may name any block) too.

    Example::

        >>> import torch, torch.nn as nn
        >>> from tpshard.compiler.capture import capture
        >>> mlp = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> c = capture(nn.Sequential(*[mlp() for _ in range(4)]), (torch.randn(2, 8),))
        >>> p = plan_captured(c, 2)
        >>> [p.modules[k].style for k in ("3.0", "3.2")]
        ['column', 'row']
    """
    if c.repeated is None:
        return make_plan(c.gm, c.ops, world_size, overrides, c.kind, kv_replicas=kv_replicas, expert_parallel=expert_parallel)
    two, stamp = c.repeated
    b = stamp.blocks
    why = "overrides may name any block" if overrides else ""
    plan = None
    if not overrides:
        try:
            plan = stamp_plan(make_plan(two.gm, two.ops, world_size, None, two.kind, kv_replicas=kv_replicas, expert_parallel=expert_parallel), stamp)
        except NotRepeatable as e:  # exact either way; the note says why planning took longer
            why = str(e)
    if plan is None:
        plan = make_plan(c.gm, c.ops, world_size, overrides, c.kind, kv_replicas=kv_replicas, expert_parallel=expert_parallel)
        plan.notes.append(f"{b.container or 'the model'}: each block planned (not once): {why}")
    plan.blocks = {"container": b.container, "count": b.count, "stamped_from": b.block(1), "planned_once": not why}
    return plan


def capture_for_plan(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any] | None,
                     plan: Plan) -> Captured:
    """Capture ``model`` the way ``plan`` was made (its edits name the nodes of that graph):
    stamped when the plan's blocks were, whole otherwise (plans made before stamping)."""
    c = capture(model, example_inputs, example_kwargs, repeated_blocks=bool(plan.blocks))
    if plan.blocks:
        got = c.repeated[1].blocks if c.repeated is not None else None
        if got is None or (got.container, got.count) != (plan.blocks["container"], plan.blocks["count"]):
            raise PlanError(
                f"the plan was made on a capture with {plan.blocks['count']} blocks of "
                f"{plan.blocks['container'] or 'the model'} stamped, but this model captures "
                + (f"{got.count} blocks of {got.container or 'the model'}" if got else f"whole ({c.note})")
                + "; plan this model again with tpshard.plan")
    return c
