"""Repeated blocks: capture two, stamp the rest.

Most models repeat one block N times (``model.layers.0`` ... ``model.layers.31``). Capturing
all of them costs N times one block — for a 7B Hugging Face model through ``torch.export``,
most of the start-up. Here the model is captured with its block list cut to the first two
blocks, and the graph of the second is copied for blocks 2 .. N-1 ("stamped"), each copy
reading its own block's parameters. The planner then plans the two-block graph once, and
:mod:`tpshard.compiler.blocks_plan` gives every stamped block the second block's decisions.

A block list is stamped only when nothing can tell the copies apart:

- every block has the same class, module tree, parameter and buffer names, shapes and dtypes,
  the same plain attributes (ints, floats, strings) — except one holding each block's own index
  (``layer_idx``), allowed because the next check sees it if the graph uses it — and no hooks;
- the captured graphs of block 0 and block 1 are the same node for node (ops, constants,
  shapes); block 1 reads block 0's outputs where block 0 read the prefix's, and both read the
  same shared values (masks, rotary tables); nothing after the blocks reads block 0, and nothing
  but block 1 does.

Anything else is captured whole, with the reason in ``Captured.note``. Cutting the list is
temporary (the container's ``_modules`` is restored when :func:`truncated` exits); a forward
that indexes blocks past the second fails that capture and is captured whole.

The limit of the index exemption: code that branches on the index in a way blocks 0 and 1
agree on but a later block does not (``if layer_idx >= 2``) cannot be seen in two blocks. Such
a model must be captured whole: ``TPSHARD_REPEATED_BLOCKS=0`` (or ``capture(..., repeated_blocks=False)``).

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(4)])
    >>> find_repeated(net)
    RepeatedList(container='', count=4)
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from tpshard.compiler.ir import shape_of

__all__ = ["RepeatedList", "Stamp", "NotRepeatable", "find_repeated", "truncated", "stamp", "build_stamped"]

_PLAIN = (int, float, bool, str, type(None))


class NotRepeatable(Exception):
    """The blocks cannot be stamped; the message says why (recorded in the capture's note)."""


@dataclass(frozen=True)
class RepeatedList:
    """A container (``ModuleList`` / ``Sequential``, "" for the root) of ``count`` identical blocks."""

    container: str
    count: int

    def block(self, i: int) -> str:
        return f"{self.container}.{i}" if self.container else str(i)


@dataclass
class Stamp:
    """How the full graph is made from the two-block one, by node name (the two-block graph's
    nodes keep theirs). ``seg0`` / ``seg1``: the nodes of block 0 and block 1 (in order, the
    block's own ``get_attr`` nodes first). ``copies[k - 2]``: block 1's node -> block k's node,
    for k = 2 .. count-1."""

    blocks: RepeatedList
    seg0: list[str] = field(default_factory=list)
    seg1: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # the nodes after the blocks
    outs: list[int] = field(default_factory=list)  # block 1's outputs, by index among its non-attr nodes
    copies: list[dict[str, str]] = field(default_factory=list)


# -- finding the block list ---------------------------------------------------------------------

def _signature(block: nn.Module) -> tuple[tuple, dict[tuple[str, str], Any]] | None:
    """(structure, plain attributes) of a block, or None when it has hooks."""
    structure: list[tuple] = []
    attrs: dict[tuple[str, str], Any] = {}
    for path, m in block.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return None
        structure.append((path, type(m)))
        attrs.update({(path, k): v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _PLAIN)})
    for kind, items in (("p", block.named_parameters()), ("b", block.named_buffers())):
        structure.extend((kind, n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in items)
    return tuple(structure), attrs


def _identical(blocks: list[nn.Module]) -> bool:
    """Same structure and attributes; an attribute may differ only by being each block's index."""
    sigs = [_signature(b) for b in blocks]
    if any(s is None for s in sigs) or any(s[0] != sigs[0][0] or s[1].keys() != sigs[0][1].keys() for s in sigs):
        return False
    for key, first in sigs[0][1].items():
        values = [s[1][key] for s in sigs]
        if any(type(v) is not type(first) or v != first for v in values) and values != list(range(len(blocks))):
            return False
    return True


def find_repeated(model: nn.Module) -> RepeatedList | None:
    """The block list with the most parameters among those of >= 3 identical blocks, or None."""
    best: tuple[int, RepeatedList] | None = None
    for path, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 3:
            continue
        children = list(m._modules.values())
        if any(c is None for c in children) or list(m._modules) != [str(i) for i in range(len(children))]:
            continue
        if not _identical(children):
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, RepeatedList(path, len(children)))
    return best[1] if best else None


@contextlib.contextmanager
def truncated(model: nn.Module, blocks: RepeatedList) -> Iterator[None]:
    """The block list holds only its first two blocks inside the ``with``; restored after."""
    container = model.get_submodule(blocks.container)
    saved = container._modules
    container._modules = OrderedDict(list(saved.items())[:2])
    try:
        yield
    finally:
        container._modules = saved


# -- the two segments ---------------------------------------------------------------------------

def _in_block(node: fx.Node, prefix: str) -> bool:
    if node.op in ("call_module", "get_attr"):
        return isinstance(node.target, str) and node.target.startswith(prefix)
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path == prefix[:-1] or path.startswith(prefix):
            return True
    return False


def _segments(graph: fx.Graph, blocks: RepeatedList) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node], list[fx.Node]]:
    """(attrs0, seg0, attrs1, seg1): each block's get_attr nodes and its other nodes, in order."""
    p0, p1 = blocks.block(0) + ".", blocks.block(1) + "."
    attrs0 = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(p0)]
    attrs1 = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(p1)]
    nodes = [n for n in graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    member = [0 if _in_block(n, p0) else 1 if _in_block(n, p1) else None for n in nodes]
    pos0 = [i for i, b in enumerate(member) if b == 0]
    pos1 = [i for i, b in enumerate(member) if b == 1]
    if not pos0 or not pos1:
        raise NotRepeatable(f"the graph has no nodes of {blocks.block(0)} or {blocks.block(1)}")
    if pos0[-1] > pos1[0] or any(b is None for b in member[pos0[0]:pos1[-1] + 1]):
        raise NotRepeatable(f"the nodes of {blocks.block(0)} and {blocks.block(1)} are interleaved with others")
    return attrs0, [nodes[i] for i in pos0], attrs1, [nodes[i] for i in pos1]


def _rel(target: str, prefix: str) -> str:
    return target[len(prefix):]


def _same(a: Any, b: Any, ref: Any) -> bool:
    """Structural equality of two nodes' arguments; node leaves compared through ``ref``."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and ref(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, ref) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], ref) for k in a)
    if isinstance(a, slice):
        return all(_same(x, y, ref) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, torch.Tensor):
        return False  # a tensor constant per block: not comparable cheaply
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without equality: not the same
        return False


def _match(blocks: RepeatedList, attrs0: list[fx.Node], seg0: list[fx.Node], attrs1: list[fx.Node],
           seg1: list[fx.Node]) -> set[int]:
    """Check that block 1's graph is block 0's; return the indices of block 0's outputs (the
    values block 1 reads in place of block 0's inputs)."""
    p0, p1 = blocks.block(0) + ".", blocks.block(1) + "."
    if len(seg0) != len(seg1) or [_rel(a.target, p0) for a in attrs0] != [_rel(a.target, p1) for a in attrs1]:
        raise NotRepeatable(f"{blocks.block(0)} and {blocks.block(1)} captured different graphs")
    idx0 = {n: i for i, n in enumerate(seg0)}
    idx1 = {n: i for i, n in enumerate(seg1)}
    a0 = {n: _rel(n.target, p0) for n in attrs0}
    a1 = {n: _rel(n.target, p1) for n in attrs1}
    carried: dict[fx.Node, int] = {}  # block 0's input -> the index of block 0's node block 1 reads there

    def ref(x: fx.Node, y: fx.Node) -> bool:
        if x in idx0:
            return idx1.get(y) == idx0[x]
        if x in a0:
            return a1.get(y) == a0[x]
        if y in idx0:  # block 0 reads x from before the blocks, block 1 reads block 0's node y
            return carried.setdefault(x, idx0[y]) == idx0[y]
        return x is y and x not in a1 and y not in idx1  # a shared value

    for x, y in zip(seg0, seg1):
        tx = _rel(x.target, p0) if x.op == "call_module" else x.target
        ty = _rel(y.target, p1) if y.op == "call_module" else y.target
        if (x.op != y.op or tx != ty or not _same(x.args, y.args, ref) or not _same(x.kwargs, y.kwargs, ref)
                or shape_of(x) != shape_of(y) or _dtype(x) != _dtype(y)):
            raise NotRepeatable(f"{blocks.block(0)} and {blocks.block(1)} differ at {x.name} / {y.name} "
                                f"({x.format_node()} vs {y.format_node()})")
    outs0 = {idx0[n] for n in seg0 if any(u not in idx0 for u in n.users)}
    outs1 = {idx1[n] for n in seg1 if any(u not in idx1 for u in n.users)}
    if any(u not in idx0 and u not in idx1 for n in seg0 for u in n.users):
        raise NotRepeatable(f"a value of {blocks.block(0)} is read after the blocks (e.g. all hidden states kept)")
    if set(carried.values()) != outs0 or outs1 != outs0:
        raise NotRepeatable(f"{blocks.block(1)} does not read {blocks.block(0)}'s outputs as {blocks.block(0)} "
                            "reads the values before the blocks")
    return outs0


def _dtype(n: fx.Node) -> Any:
    meta = n.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


# -- stamping -----------------------------------------------------------------------------------

def _install(gm: fx.GraphModule, model: nn.Module, target: str) -> None:
    """gm.<target> = model.<target> (a parameter, buffer or module), creating containers."""
    *path, leaf = target.split(".")
    holder: nn.Module = gm
    for name in path:
        nxt = getattr(holder, name, None)
        if not isinstance(nxt, nn.Module):
            nxt = nn.Module()
            setattr(holder, name, nxt)
        holder = nxt
    value = functools.reduce(getattr, target.split("."), model)
    if isinstance(value, nn.Parameter):
        holder.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        holder.add_module(leaf, value)
    elif isinstance(value, torch.Tensor):
        holder.register_buffer(leaf, value)
    else:
        setattr(holder, leaf, value)


def _restack(meta: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of a node's meta whose module stack names block ``new`` instead of ``old``."""
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        def swap(path: str) -> str:
            return new + path[len(old):] if path == old or path.startswith(old + ".") else path
        meta["nn_module_stack"] = {k: ((swap(v[0]),) + tuple(v[1:]) if isinstance(v, tuple) else swap(str(v)))
                                   for k, v in stack.items()}
    return meta


def _shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (graph, class, code generator) sharing its parameters and buffers."""
    memo = {id(t): t for _, t in [*gm.named_parameters(remove_duplicate=False),
                                  *gm.named_buffers(remove_duplicate=False)]}
    return copy.deepcopy(gm, memo)


def stamp(two: fx.GraphModule, blocks: RepeatedList) -> Stamp:
    """How the full graph is made from the two-block graph ``two``, with every node's name,
    before (and without) building it. Block k's copy of block 1's node ``n`` is ``n_b<k>``.
    Raises :class:`NotRepeatable` when the two blocks' graphs do not show that they are
    interchangeable."""
    attrs0, seg0, attrs1, seg1 = _segments(two.graph, blocks)
    outs = _match(blocks, attrs0, seg0, attrs1, seg1)
    order = list(two.graph.nodes)
    used = {n.name for n in order}
    result = Stamp(blocks, seg0=[n.name for n in attrs0 + seg0],
                   seg1=[n.name for n in attrs1 + seg1],
                   after=[n.name for n in order[order.index(seg1[-1]) + 1:]], outs=sorted(outs))
    for k in range(2, blocks.count):
        names = {}
        for n in result.seg1:
            name = f"{n}_b{k}"
            while name in used:
                name += "_"
            used.add(name)
            names[n] = name
        result.copies.append(names)
    return result


def build_stamped(two: fx.GraphModule, model: nn.Module, st: Stamp) -> fx.GraphModule:
    """The full model's graph: a copy of ``two`` (left as it is) where block 1's nodes are copied
    for blocks 2 .. count-1, each reading the previous block's outputs and its own parameters,
    and what comes after the blocks reads the last block's outputs. Names are ``st``'s."""
    full = _shared_copy(two)
    graph, blocks = full.graph, st.blocks
    by_name = {n.name: n for n in graph.nodes}  # same names as two's
    seg0, seg1 = [by_name[n] for n in st.seg0], [by_name[n] for n in st.seg1]
    attrs1 = [n for n in seg1 if n.op == "get_attr"]
    body1 = [n for n in seg1 if n.op != "get_attr"]
    body0 = [n for n in seg0 if n.op != "get_attr"]
    idx0 = {n: i for i, n in enumerate(body0)}
    idx1 = {n: i for i, n in enumerate(body1)}
    after_blocks = {n: list(n.users) for n in body1 if any(u not in idx1 for u in n.users)}
    p1 = blocks.block(1)
    prev = {j: body1[j] for j in st.outs}  # the previous block's outputs, by index in the block
    cursor = body1[-1]
    for k, names in zip(range(2, blocks.count), st.copies):
        pk = blocks.block(k)
        copy_k: dict[fx.Node, fx.Node] = {}

        def read(n: fx.Node, copy_k: dict[fx.Node, fx.Node] = copy_k, prev: dict[int, fx.Node] = prev) -> fx.Node:
            if n in copy_k:
                return copy_k[n]
            if n in idx0:  # block 1 read block 0's output j: block k reads block k-1's
                return prev[idx0[n]]
            return n  # a value from before the blocks, shared by all of them

        for n in attrs1 + body1:
            target = pk + n.target[len(p1):] if n.op in ("get_attr", "call_module") else n.target
            if target is not n.target:
                _install(full, model, target)
            with graph.inserting_after(cursor):
                cursor = graph.create_node(n.op, target, fx.node.map_arg(n.args, read),
                                           fx.node.map_arg(n.kwargs, read), names[n.name], n.type)
            if cursor.name != names[n.name]:
                raise NotRepeatable(f"the stamped node {names[n.name]} could not keep its name")
            cursor.meta = _restack(n.meta, p1, pk)
            copy_k[n] = cursor
        prev = {j: copy_k[body1[j]] for j in st.outs}
    for n, users in after_blocks.items():  # after the blocks: read the last block's outputs
        for u in users:
            if u not in idx1:
                u.replace_input_with(n, prev[idx1[n]])
    graph.lint()
    full.recompile()
    return full
