"""Expert parallelism for routed experts regions (``expert_parallel=True``).

Whole experts are split across ranks: rank r holds experts ``[r*E/W, (r+1)*E/W)``, every
parameter stacked per expert split along its leading dim (a plain ``ParamShard(dim=0)``).
Under tensor parallelism the tokens entering the layer are replicated, so no all-to-all is
needed: each rank calls the experts module's own code on its local experts with the routing
remapped (:func:`remap`: a token routed to a local expert gets its local index, any other
gets the weight 0 and a harmless index, the ``sentinel``), and the module's output is a
partial sum, reduced by the one all-reduce the layer already has.

The remapping is found, not assumed (:func:`probe_ep`): on random float64 parameters (float32
where a kernel takes no float64) and random and recorded routings, the sum over ranks of
each rank's output must equal the whole module's output. The candidates: the module's int
attributes equal to E (an expert count, such as Hugging Face's ``num_experts``) set to E/W or
left alone, and the sentinel E/W (an index the module skips) or 0 (a local expert given weight
0). The chosen one is data in the Plan (``ModulePlan.expert_parallel``)::

    {"experts": E, "per_rank": E/W, "ids": arg, "weights": arg, "sentinel": s, "attributes": [...]}

Experts held in a ``ModuleList`` (each rank would hold a different list of modules) and
modules with a parameter not stacked per expert are refused (expert tensor parallelism
instead), with the reason in the Plan.

Example::

    >>> import torch
    >>> from tpshard.compiler.moe import Region
    >>> class Experts(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.up = torch.nn.Parameter(torch.randn(4, 8, 6)); self.down = torch.nn.Parameter(torch.randn(4, 6, 8))
    ...     def forward(self, x, idx, w):
    ...         out = torch.zeros_like(x)
    ...         for e in range(self.up.shape[0]):
    ...             tok, k = torch.where(idx == e)
    ...             out.index_add_(0, tok, torch.relu(x[tok] @ self.up[e].t()) @ self.down[e].t() * w[tok, k, None])
    ...         return out
    >>> r = Region("experts", Experts(), (torch.randn(5, 6), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)), 4, "")
    >>> spec, why = probe_ep(r, 2)
    >>> spec["per_rank"], spec["sentinel"], spec["ids"], spec["weights"]
    (2, 2, 1, 2)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from tpshard.compiler.moe import Region, _random_args
from tpshard.plan import PlanError

__all__ = ["EP_STYLE", "probe_ep", "remap", "local_experts", "ep_reason", "divisors", "choose_ep"]

EP_STYLE = "expert_parallel"
_PROBED: dict[tuple, tuple] = {}


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def ep_reason(spec: dict[str, Any], world: int) -> str:
    """The plan row's reason: which experts each rank holds, and how the routing is remapped."""
    n = spec["per_rank"]
    ranges = " ".join(f"[{r * n}:{(r + 1) * n}]" for r in range(world))
    attrs = ", ".join(f"{a}={n}" for a in spec["attributes"])
    sentinel = (f"index {spec['sentinel']} (skipped)" if spec["sentinel"] == n else f"index {spec['sentinel']}")
    return (f"expert parallel: experts {ranges} per rank ({spec['experts']} experts, {n} per rank); tokens routed "
            f"elsewhere get weight 0 and {sentinel}" + (f"; {attrs} on each rank" if attrs else "")
            + "; partial sums reduced with the layer's")


def remap(args: tuple, spec: dict[str, Any], rank: int) -> tuple:
    """The experts module's call on ``rank``: its local expert indices, others weighted 0."""
    n, i, j = spec["per_rank"], spec["ids"], spec["weights"]
    idx, w = args[i], args[j]
    lo = rank * n
    mine = (idx >= lo) & (idx < lo + n)
    out = list(args)
    out[i] = torch.where(mine, idx - lo, torch.full_like(idx, spec["sentinel"]))
    out[j] = w.masked_fill(~mine, 0)
    return tuple(out)


_CLASSES: dict[type, type] = {}


def _ep_forward(self: nn.Module, *args: Any) -> Any:
    spec, rank = self._tpshard_ep
    return self._tpshard_base.forward(self, *remap(args, spec, rank))


def local_experts(module: nn.Module, spec: dict[str, Any], rank: int) -> nn.Module:
    """``module`` (already holding this rank's shards of its parameters) made to run on this
    rank's experts: its expert-count attributes set, its routing remapped (mutates ``module``)."""
    for a in spec["attributes"]:
        setattr(module, a, spec["per_rank"])
    cls = type(module)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (cls,), {"forward": _ep_forward, "_tpshard_base": cls})
    module.__class__ = _CLASSES[cls]
    module._tpshard_ep = (dict(spec), rank)
    return module


def _roles(args: tuple) -> tuple[int, int] | str:
    """(ids arg, weights arg) of the call, or why they cannot be told apart."""
    ids = [k for k, a in enumerate(args) if k and not a.is_floating_point()]
    if len(ids) != 1:
        return f"the call has {len(ids)} integer (expert id) arguments, not one"
    weights = [k for k, a in enumerate(args) if k and a.is_floating_point() and a.shape == args[ids[0]].shape]
    if len(weights) != 1:
        return f"the call has {len(weights)} routing-weight arguments shaped like the expert ids, not one"
    return ids[0], weights[0]


def probe_ep(r: Region, world: int) -> tuple[dict[str, Any] | None, str]:
    """The remapping for ``world`` ranks (see module doc), or None and why not."""
    key = (type(r.module), repr(r.module), tuple((k, tuple(p.shape)) for k, p in r.module.named_parameters()),
           tuple(sorted((k, v) for k, v in vars(r.module).items() if isinstance(v, (int, float, str, bool)))),
           tuple((tuple(a.shape), a.dtype) for a in r.args), r.experts, world,
           r.form)  # the ops its call ran: Hugging Face's implementation is chosen by its config
    if key not in _PROBED:
        _PROBED[key] = _probe(r, world)
    return _PROBED[key]


def _probe(r: Region, world: int) -> tuple[dict[str, Any] | None, str]:
    e, m = r.experts, r.module
    if any(isinstance(c, nn.ModuleList) for c in m.children()):
        return None, ("the experts are a ModuleList of modules, and a plan splits parameters, not lists of "
                      "modules (each rank would hold other experts' modules)")
    not_stacked = [k for k, p in m.named_parameters() if p.dim() < 2 or p.shape[0] != e]
    if not_stacked:
        return None, f"parameters not stacked per expert (leading dim {e}): {', '.join(not_stacked)}"
    roles = _roles(r.args)
    if isinstance(roles, str):
        return None, roles
    n = e // world
    attrs = sorted(k for k, v in vars(m).items() if type(v) is int and v == e)
    candidates = [(a, s) for a in ([attrs, []] if attrs else [[]]) for s in (n, 0)]
    failed = ""
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        try:
            for a, s in candidates:
                spec = {"experts": e, "per_rank": n, "ids": roles[0], "weights": roles[1], "sentinel": s,
                        "attributes": a}
                if _adds_up(r, spec, world, dtype, tol):
                    return spec, ""
        except _CannotRun as err:
            failed = failed or str(err)
            continue
        return None, (f"no remapping of the routing to {n} local experts per rank adds up to the whole module's "
                      "output (the module may read its expert count another way)")
    return None, f"the experts do not run outside the model on random values ({failed})"


class _CannotRun(Exception):
    pass


def _shallow(module: nn.Module, attrs: list[str], n: int) -> nn.Module:
    """A copy sharing nothing mutable with ``module`` that functional_call would swap."""
    m = copy.copy(module)
    m._parameters, m._buffers, m._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    for a in attrs:
        setattr(m, a, n)
    return m


def _adds_up(r: Region, spec: dict[str, Any], world: int, dtype: torch.dtype, tol: float) -> bool:
    g = torch.Generator().manual_seed(0)
    named = dict(r.module.named_parameters())
    full = {k: torch.randn(p.shape, generator=g, dtype=dtype) / max(p.shape[-1], 1) ** 0.5 for k, p in named.items()}
    buffers = {k: (b.to(dtype) if b.is_floating_point() else b) for k, b in r.module.named_buffers()}
    if any(b.is_meta for b in buffers.values()):
        return False
    calls = [_random_args(r.args, r.experts, g, dtype) for _ in range(2)]
    if not any(a.is_meta for a in r.args):
        calls.append(tuple(a.to(dtype) if a.is_floating_point() else a for a in r.args))
    try:
        with torch.no_grad():
            want = [torch.func.functional_call(r.module, {**full, **buffers}, a) for a in calls]
    except Exception as err:  # noqa: BLE001
        raise _CannotRun(f"{dtype}: {type(err).__name__}: {str(err)[:200]}") from None
    n = spec["per_rank"]
    local_module = _shallow(r.module, spec["attributes"], n)
    try:
        with torch.no_grad():
            for args, ref in zip(calls, want):
                total = None
                for rank in range(world):
                    local = {k: t[rank * n:(rank + 1) * n] for k, t in full.items()}
                    out = torch.func.functional_call(local_module, {**local, **buffers}, remap(args, spec, rank))
                    total = out if total is None else total + out
                if total is None or total.shape != ref.shape or not torch.allclose(
                        total, ref, rtol=tol, atol=tol * float(ref.abs().max().clamp_min(1e-3))):
                    return False
    except Exception:  # noqa: BLE001 - the module's code cannot run on this remapping
        return False
    return True


def choose_ep(key: str, r: Region, world: int, wanted: bool, forced: bool) -> tuple[dict[str, Any] | None, str]:
    """The planner's decision for one experts region: (remap spec, "") when expert parallel,
    else (None, the refusal to prefix to the region's reason; "" when not ``wanted``).
    A world size that does not divide the expert count is an error, as is a forced refusal."""
    if not wanted:
        return None, ""
    if r.experts % world:
        raise PlanError(f"expert_parallel=True: the experts {key} hold {r.experts} experts, which {world} ranks do "
                        f"not divide; expert parallelism needs a world size among {divisors(r.experts)} "
                        "(or leave expert_parallel off for expert tensor parallelism)")
    spec, why = probe_ep(r, world) if r.form else (None, "not called with tokens and expert ids")
    if spec is None and forced:
        raise PlanError(f"override 'expert_parallel' for {key} cannot be honored: {why}")
    return spec, "" if spec is not None else f"expert parallel refused: {why}; "
