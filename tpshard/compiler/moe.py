"""Routed experts (mixture of experts) as one known region of the graph.

An experts module's forward (a loop over experts that selects tokens, or batched expert weights
applied with bmm / grouped matmul) has shapes that depend on the routing, so it is captured as
one node: the module, called with the tokens, the routing indices and the routing weights.
What the region computes is established by its data flow, not by names:

1. **Candidates** (:func:`find_regions`, capture time): modules whose parameters are stacked
   per expert (3-D, one leading expert dim E) or sit in a ``ModuleList`` of E alike experts,
   called (one eager forward on the example inputs, hooks recording the arguments) with float
   tokens and an integer tensor (the routing indices), returning a tensor shaped like the
   tokens. The aten ops of that call name the form (loop with index_add_/scatter, or batched).
2. **The split** (:func:`probe`, plan time, for a world size W): expert tensor parallelism
   splits every expert's hidden dim: gate/up projections by their output rows (a fused
   gate_up by its two segments), the down projection by its input columns. Which dims those
   are is found by running the module's own code on each rank's shard of random float64
   parameters (float32 where its kernels take no float64, as Hugging Face's grouped_mm on CPU),
   random tokens, and random and recorded routings: the split is taken only when
   the shards' outputs add up to the whole module's output (then the region's output is a
   partial sum, reduced once with the shared expert's and the rest of the layer's). Anything
   else (a bias or a norm after the down projection, sizes read from attributes, a hidden dim
   W does not divide) is kept whole, with the reason in the Plan.

The router stays outside the region and whole, so every rank routes identically.

Example::

    >>> import torch
    >>> class Experts(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.up = torch.nn.Parameter(torch.randn(4, 8, 6)); self.down = torch.nn.Parameter(torch.randn(4, 6, 8))
    ...     def forward(self, x, idx, w):
    ...         out = torch.zeros_like(x)
    ...         for e in range(4):
    ...             tok, k = torch.where(idx == e)
    ...             h = torch.relu(x[tok] @ self.up[e].t()) @ self.down[e].t()
    ...             out.index_add_(0, tok, h * w[tok, k, None])
    ...         return out
    >>> r = Region("experts", Experts(), (torch.randn(5, 6), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)), 4, "")
    >>> probe(r, 2)[0]
    {'up': (1, None), 'down': (2, None)}
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from tpshard import comm, layout
from tpshard.compiler.ir import Op, shape_of

__all__ = ["Region", "find_regions", "stand_ins", "regions_as_nodes", "attach", "probe", "describe_split", "EXPERT_STYLE",
           "copy_joint"]

EXPERT_STYLE = "expert_tp"
_MAX_COMBOS = 128


@dataclass
class Region:
    """One experts module: its path, the module, its recorded call, the expert count, the form."""

    path: str
    module: nn.Module
    args: tuple
    experts: int
    form: str


# -- the region as one graph node --------------------------------------------------------------
_LIVE: dict[int, nn.Module] = {}


@torch.library.custom_op("tpshard::experts_region", mutates_args=())
def _experts_region(args: list[torch.Tensor], region: int) -> torch.Tensor:
    module = _LIVE[region]  # (only if a capture runs it on real values: its class forward)
    return type(module).forward(module, *args).clone()


@_experts_region.register_fake
def _(args: list[torch.Tensor], region: int) -> torch.Tensor:
    return torch.empty_like(args[0])


def _expert_count(module: nn.Module) -> int | None:
    """E when the module's parameters are stacked per expert (3-D, leading dim E) or held by a
    ModuleList of E alike experts; None otherwise."""
    stacked = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    if len(stacked) >= 2 and len(set(stacked)) == 1 and stacked[0] >= 2:
        return int(stacked[0])
    for child in module.children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            shapes = [tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in child]
            # an expert is a flat MLP: two or more layers with parameters, none made of layers
            flat = all(next(iter(g.children()), None) is None for c in child for g in c.children())
            layers = sum(1 for g in child[0].children() if next(iter(g.parameters()), None) is not None)
            if shapes[0] and all(s == shapes[0] for s in shapes) and flat and layers >= 2:
                return len(child)
    return None


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _form(module: nn.Module, args: tuple, experts: int) -> str:
    """The form of the experts, from the aten ops of one call (on random CPU values when the
    module is on the meta device)."""
    rec = _OpNames()
    params = None
    if any(p.is_meta for p in module.parameters()) or any(a.is_meta for a in args):
        g = torch.Generator().manual_seed(0)
        params = {k: torch.randn(p.shape, generator=g) for k, p in module.named_parameters()}
        args = _random_args(args, experts, g, torch.float32)
    try:
        with torch.no_grad(), rec:
            module(*args) if params is None else torch.func.functional_call(module, params, args)
    except Exception as e:  # noqa: BLE001 - the probe will say why it cannot be split
        return f"experts that did not run outside the model ({type(e).__name__})"
    batched = sorted(rec.names & {"bmm", "baddbmm", "_grouped_mm", "grouped_mm_fallback", "grouped_mm"})
    gathered = sorted(rec.names & {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_"})
    if batched:
        return "batched expert weights (" + ", ".join(batched) + ") after a permutation of tokens by expert"
    if gathered:
        return "a loop over experts selecting tokens, accumulated with " + ", ".join(gathered)
    return "per-expert products (" + ", ".join(sorted(rec.names & {"mm", "addmm", "linear", "matmul"})) + ")"


def _is_ids(x: torch.Tensor, experts: int) -> bool:
    """An integer tensor of expert ids (on the meta device: any integer tensor)."""
    if x.is_floating_point() or not x.numel():
        return False
    return x.is_meta or (0 <= int(x.min()) and int(x.max()) < experts)


def _candidates(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    cands: dict[str, tuple[nn.Module, int]] = {}
    for path, m in model.named_modules():
        if path and not any(path.startswith(c + ".") for c in cands) and (e := _expert_count(m)):
            cands[path] = (m, e)
    return cands


def stand_ins(model: nn.Module) -> list[Region]:
    """On the meta device nothing can run: every candidate is captured as one node, its call
    read from the graph (:func:`attach`); one that is not called as experts is kept whole."""
    return [Region(path, m, (), e, "") for path, (m, e) in _candidates(model).items()]


def _valid(a: tuple, out: Any, experts: int) -> bool:
    return bool(a and all(isinstance(x, torch.Tensor) for x in a) and a[0].is_floating_point()
                and any(_is_ids(x, experts) for x in a)
                and isinstance(out, torch.Tensor) and out.shape == a[0].shape and out.dtype == a[0].dtype)


def find_regions(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[Region]:
    """The experts modules of ``model``, their calls recorded in one forward on the example
    inputs (see module doc)."""
    cands = _candidates(model)
    if not cands or not (args or kwargs) or any(p.is_meta for p in model.parameters()):
        return []
    calls: dict[str, tuple] = {}

    def hook(path: str) -> Any:
        def record(mod: nn.Module, a: tuple, out: Any) -> None:
            if path not in calls:
                calls[path] = (a, out)
        return record

    handles = [m.register_forward_hook(hook(path)) for path, (m, _) in cands.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no regions: capture reports the model's own failure
        return []
    finally:
        for h in handles:
            h.remove()
    regions: list[Region] = []
    for path, (a, out) in calls.items():
        m, e = cands[path]
        if _valid(a, out, e):
            regions.append(Region(path, m, tuple(x.detach().clone() for x in a), e, _form(m, a, e)))
    return regions


@contextlib.contextmanager
def regions_as_nodes(regions: list[Region]) -> Iterator[None]:
    """While capturing, each region's forward is one custom op (a fake kernel gives its shape)."""
    saved = {id(r): r.module.__dict__.get("forward") for r in regions}  # a forward set on the instance
    for r in regions:
        key = id(r)
        _LIVE[key] = r.module
        r.module.forward = lambda *a, _k=key: torch.ops.tpshard.experts_region(list(a), _k)
    try:
        yield
    finally:
        for r in regions:
            _LIVE.pop(id(r), None)
            del r.module.forward  # the class's forward again, or the instance's own
            if saved[id(r)] is not None:
                r.module.forward = saved[id(r)]


def attach(gm: fx.GraphModule, ops: list[Op], regions: list[Region]) -> None:
    """Each region's node becomes ``call_module(path, tokens, indices, weights)`` described as an
    ``experts`` op; an exported graph's custom-op node is replaced (the module added to the graph)."""
    by_id = {id(r): r for r in regions}
    by_path = {r.path: r for r in regions}
    replaced: dict[fx.Node, fx.Node] = {}
    for i, op in enumerate(ops):
        n = op.node
        if n.op == "call_module" and n.target in by_path:
            r = by_path[n.target]
        elif n.op == "call_function" and n.target is torch.ops.tpshard.experts_region.default:
            r = by_id[n.args[1]]
            *parent, name = r.path.split(".")
            owner = gm.get_submodule(".".join(parent)) if parent else gm
            setattr(owner, name, r.module)
            with gm.graph.inserting_before(n):
                new = gm.graph.call_module(r.path, tuple(n.args[0]))
            new.meta.update(n.meta)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            replaced[n] = n = new
        else:
            continue
        if not r.args:  # a stand-in (meta device): its call as the graph has it
            def like(x: Any) -> Any:  # a meta tensor of the traced shape (symbolic sizes: their example)
                v = x.meta.get("val") if isinstance(x, fx.Node) else None
                if v is None and isinstance(x, fx.Node) and "tensor_meta" in x.meta:
                    v = x.meta["tensor_meta"]
                shape = shape_of(x)
                return torch.empty(shape, dtype=v.dtype, device="meta") if isinstance(shape, tuple) else None

            vals = [like(a) for a in n.args]
            if all(isinstance(v, torch.Tensor) for v in vals):
                r.args = tuple(vals)
            out = like(n)
            r.form = _form(r.module, r.args, r.experts) if _valid(r.args, out, r.experts) else ""
        params = [f"{r.path}.{k}" for k, _ in r.module.named_parameters()]
        ops[i] = Op(n, "experts", list(n.args), {"key": r.path, "region": r, "params": params,
                                                  "weight": None, "bias": None}, r.path)
    for op in ops if replaced else ():
        op.tensors = [replaced.get(t, t) for t in op.tensors]
    gm.recompile()


def copy_joint(group: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors enter the parallel region together (a Plan's joint copies): forward the same
    values (each in its own dtype), backward one all-reduce of all their gradients, flattened
    into one buffer of the widest dtype.

    Example::

        >>> a, b = copy_joint(None, torch.ones(2), torch.zeros(3, dtype=torch.float32))
        >>> a.tolist(), b.shape
        ([1.0, 1.0], torch.Size([3]))
    """
    g = comm.resolve_group(group)
    if g.size == 1:
        return tensors
    wide = torch.promote_types(tensors[0].dtype, tensors[0].dtype)
    for t in tensors[1:]:
        wide = torch.promote_types(wide, t.dtype)
    flat = comm.mp_copy(torch.cat([t.reshape(-1).to(wide) for t in tensors]), g)
    pieces = flat.split([t.numel() for t in tensors])
    return tuple(p.view(t.shape).to(t.dtype) for p, t in zip(pieces, tensors))


# -- the split, found on random parameters --------------------------------------------------------
def _role(name: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def describe_split(split: dict[str, tuple[int, tuple[int, ...] | None]]) -> str:
    """"gate_up_proj dim 1 [48, 48], down_proj dim 2"; experts in a ModuleList once, as ``*``."""
    seen: dict[str, str] = {}
    for k, (dim, segs) in split.items():
        seen.setdefault(_role(k), f"{_role(k)} dim {dim}" + (f" {list(segs)}" if segs else ""))
    return ", ".join(seen.values())


def _options(shape: tuple[int, ...], world: int, stacked: bool) -> list[tuple[int, tuple[int, ...] | None] | None]:
    out: list[Any] = []
    for dim in range(1 if stacked else 0, len(shape)):
        n = shape[dim]
        if n % world == 0:
            out.append((dim, None))
        if n % (2 * world) == 0:
            out.append((dim, (n // 2, n // 2)))
    return out + [None]


def _random_args(args: tuple, experts: int, g: torch.Generator, dtype: torch.dtype = torch.float64) -> tuple:
    """CPU values shaped like ``args``: random tokens and weights, expert ids below ``experts``."""
    return tuple(torch.randn(a.shape, generator=g, dtype=dtype) if a.is_floating_point()
                 else torch.randint(0, experts, a.shape, generator=g, dtype=a.dtype) for a in args)


def probe(r: Region, world: int) -> tuple[dict[str, tuple[int, tuple[int, ...] | None]] | None, str]:
    """The split of each of the region's parameters (relative name -> (dim, segments)) for
    ``world`` ranks, or None and why not (see module doc). Alike experts modules (same class,
    parameter shapes, attributes and call) share one probe: the layers of a model probe once."""
    key = (type(r.module), repr(r.module), tuple((k, tuple(p.shape)) for k, p in r.module.named_parameters()),
           tuple(sorted((k, v) for k, v in vars(r.module).items() if isinstance(v, (int, float, str, bool)))),
           tuple((tuple(a.shape), a.dtype) for a in r.args), r.experts, world)
    if key not in _PROBED:
        _PROBED[key] = _probe(r, world)
    return _PROBED[key]


_PROBED: dict[tuple, tuple] = {}


def _probe(r: Region, world: int) -> tuple[dict[str, tuple[int, tuple[int, ...] | None]] | None, str]:
    """float64 where the experts' code runs in it, else float32 (Hugging Face's grouped_mm on CPU)."""
    failed = ""
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        try:
            return _probe_in(r, world, dtype, tol)
        except _CannotRun as e:
            failed = failed or str(e)
    return None, f"kept whole: the experts do not run outside the model on random values ({failed})"


class _CannotRun(Exception):
    pass


def _probe_in(r: Region, world: int, dtype: torch.dtype, tol: float) -> tuple[dict | None, str]:
    named = dict(r.module.named_parameters())
    roles: dict[str, list[str]] = {}
    for k in named:
        roles.setdefault(_role(k), []).append(k)
    g = torch.Generator().manual_seed(0)
    # scaled so that every product is O(1): a bias added on every rank shows at any width
    full = {k: torch.randn(p.shape, generator=g, dtype=dtype) / max(p.shape[-1], 1) ** 0.5 for k, p in named.items()}
    buffers = {k: (b.to(dtype) if b.is_floating_point() else b) for k, b in r.module.named_buffers()}
    if any(b.is_meta for b in buffers.values()):
        return None, "kept whole: the experts' buffers are on the meta device, so their split cannot be checked"
    calls = [_random_args(r.args, r.experts, g, dtype), _random_args(r.args, r.experts, g, dtype)]
    if not any(a.is_meta for a in r.args):  # and the routing recorded on the example inputs
        calls.append(tuple(a.to(dtype) if a.is_floating_point() else a for a in r.args))

    def run(params: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
        return torch.func.functional_call(r.module, {**params, **buffers}, args)

    try:
        with torch.no_grad():
            want = [run(full, a) for a in calls]
    except Exception as e:  # noqa: BLE001
        raise _CannotRun(f"{dtype}: {type(e).__name__}: {str(e)[:200]}") from None
    role_names = list(roles)
    choices = [_options(tuple(named[roles[x][0]].shape), world, named[roles[x][0]].dim() == 3) for x in role_names]
    for combo in itertools.islice(itertools.product(*choices), _MAX_COMBOS):
        if all(c is None for c in combo):
            break
        split = {k: c for x, c in zip(role_names, combo) for k in roles[x] if c is not None}
        if _adds_up(run, full, split, calls, want, world, tol):
            return split, ""
    return None, (f"kept whole: no split of the experts' hidden dim over {world} ranks adds up to the whole "
                  "module's output (a bias or norm after the down projection, a size the world size does not "
                  "divide, or sizes read from attributes)")


def _adds_up(run: Any, full: dict, split: dict, calls: list, want: list, world: int, tol: float) -> bool:
    try:
        with torch.no_grad():
            for args, ref in zip(calls, want):
                total = None
                for rank in range(world):
                    local = {k: (layout.shard(t, *split[k][:1], rank, world, split[k][1]) if k in split else t)
                             for k, t in full.items()}
                    out = run(local, args)
                    total = out if total is None else total + out
                if total is None or total.shape != ref.shape:
                    return False
                if not torch.allclose(total, ref, rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1e-3))):
                    return False
    except Exception:  # noqa: BLE001 - the module's code cannot run on this split
        return False
    return True
