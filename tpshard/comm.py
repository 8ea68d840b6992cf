"""Tensor-parallel groups and the differentiable region functions.

Every collective tpshard issues goes through this module, so torch's ``CommDebugMode`` sees
and counts all of them (they are plain ``torch.distributed`` calls underneath).

The region functions come in mirror-image pairs; each one's backward is the other's forward:

==========================  ======================  ==========================
function                    forward                 backward
==========================  ======================  ==========================
``mp_copy``                 identity                all-reduce
``mp_reduce``               all-reduce              identity
``mp_scatter(dim)``         keep own slice          all-gather along ``dim``
``mp_gather(dim)``          all-gather along dim    keep own slice
``mp_all_gather_seq(dim)``  all-gather along dim    reduce-scatter along dim
``mp_reduce_scatter_seq``   reduce-scatter          all-gather
==========================  ======================  ==========================

All of them are out of place: no autograd input is ever modified.

A group is a ``torch.distributed`` ProcessGroup, a 1-D ``DeviceMesh`` (e.g. ``mesh["tp"]``),
a :class:`Group`, or ``None`` meaning the default tensor-parallel group (set by
:func:`init_parallelism`, else the WORLD group when torch.distributed is initialized, else a
one-rank world in which every region function is the identity).

Example (one rank, no process group needed)::

    >>> import torch
    >>> from tpshard import comm
    >>> comm.mp_reduce(torch.ones(2)).tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tpshard import layout

__all__ = [
    "Group",
    "OfflineGroup",
    "init_parallelism",
    "reset_parallelism",
    "resolve_group",
    "get_world_size",
    "get_rank",
    "mp_copy",
    "mp_reduce",
    "mp_scatter",
    "mp_gather",
    "mp_all_gather_seq",
    "mp_reduce_scatter_seq",
    "mp_seq_whole",
    "call_with_param_copies",
]


class Group:
    """A tensor-parallel group: a ProcessGroup (or none, for one rank) with its rank and size.

    Deep-copying a module that holds a Group shares the group (ProcessGroups cannot be copied).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    @property
    def size(self) -> int:
        if self.process_group is None:
            return 1
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        if self.process_group is None:
            return 0
        return dist.get_rank(self.process_group)

    @property
    def can_communicate(self) -> bool:
        return self.size == 1 or self.process_group is not None

    def __deepcopy__(self, memo: dict) -> "Group":
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class OfflineGroup(Group):
    """A group that knows its rank and size but never communicates.

    Used to build one rank's module without a running job (planning, offline sharding,
    benchmarks). Running a collective on it raises.

    Example::

        >>> OfflineGroup(rank=1, world_size=4)
        OfflineGroup(rank=1, size=4)
    """

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(None)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self._rank = rank
        self._size = world_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def can_communicate(self) -> bool:
        return self._size == 1


_default_group: Group | None = None
_default_mesh: Any = None


def init_parallelism(tensor_parallel_size: int, device_type: str | None = None) -> Any:
    """Build a 2-D ("dp", "tp") DeviceMesh and make its "tp" dim the default group.

    Must run inside an initialized torch.distributed job (for example under ``torchrun``).
    Returns the mesh, so the "dp" dim can be handed to FSDP.

    Example (inside ``torchrun --nproc-per-node 4``)::

        mesh = tpshard.init_parallelism(2)      # 2-way TP x 2-way DP
        layer = tpshard.ColumnParallelLinear(8, 8)   # uses mesh["tp"]
    """
    global _default_group, _default_mesh
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError(
            "init_parallelism needs torch.distributed to be initialized: launch with "
            "`torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group() first"
        )
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size "
            f"{world}; valid sizes: {valid}"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(
        device_type, (world // tensor_parallel_size, tensor_parallel_size), mesh_dim_names=("dp", "tp")
    )
    _default_mesh = mesh
    _default_group = Group(mesh["tp"].get_group())
    return mesh


def reset_parallelism() -> None:
    """Forget the default group set by :func:`init_parallelism` (e.g. before destroying it)."""
    global _default_group, _default_mesh
    _default_group = None
    _default_mesh = None


def resolve_group(group: Any = None) -> Group:
    """Normalize ``group`` (None, ProcessGroup, 1-D DeviceMesh or Group) to a :class:`Group`."""
    if isinstance(group, Group):
        return group
    if group is None:
        if _default_group is not None:
            return _default_group
        if dist.is_available() and dist.is_initialized():
            return Group(dist.group.WORLD)
        return Group(None)
    if type(group).__name__ == "DeviceMesh":
        if group.ndim != 1:
            raise ValueError(
                f"a {group.ndim}-D DeviceMesh is not a tensor-parallel group; pass one dim of it, "
                'e.g. mesh["tp"]'
            )
        return Group(group.get_group())
    return Group(group)


def get_world_size(group: Any = None) -> int:
    """Size of the tensor-parallel group (1 when torch.distributed is not initialized)."""
    return resolve_group(group).size


def get_rank(group: Any = None) -> int:
    """This process's rank in the tensor-parallel group (0 when not initialized)."""
    return resolve_group(group).rank


# ---------------------------------------------------------------------------------------------
# Raw collectives. Each takes a resolved Group of size > 1 and returns a new tensor.
# Gathers and scatters honour a layout: ``segments`` along ``dim`` (see tpshard.layout), so a
# fused weight or activation whose rank slices are strided is reassembled in original order.


# torch >= 2.13 names these *_single (the *_tensor names warn); older releases have only those.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check(group: Group, what: str) -> None:
    if not group.can_communicate:
        raise RuntimeError(
            f"{what} needs a running process group, but this module was built for "
            f"{group!r}; use it for inspection only, or build it inside the torch.distributed job"
        )


def _all_reduce(x: Tensor, group: Group) -> Tensor:
    _check(group, "all-reduce")
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group.process_group)
    return out


def _all_gather(x: Tensor, dim: int, group: Group, segments: Sequence[int] | None = None) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (reordered to the full layout)."""
    _check(group, "all-gather")
    dim = dim % x.dim()
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((group.size * moved.shape[0], *moved.shape[1:]))
    _all_gather_into(out, moved, group=group.process_group)
    # out is [rank0 shard | rank1 shard | ...] along dim 0, each shard in local layout order.
    shards = list(out.chunk(group.size, dim=0))
    full = layout.unshard(shards, 0, segments)
    return full.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group: Group) -> Tensor:
    _check(group, "reduce-scatter")
    dim = dim % x.dim()
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % group.size:
        raise ValueError(
            f"reduce-scatter along dim {dim} of size {moved.shape[0]} needs a multiple of the "
            f"world size {group.size}"
        )
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    _reduce_scatter_into(out, moved, group=group.process_group)
    return out.movedim(0, dim)


def _own_slice(x: Tensor, dim: int, group: Group, segments: Sequence[int] | None = None) -> Tensor:
    return layout.shard(x, dim, group.rank, group.size, segments).contiguous()


# ---------------------------------------------------------------------------------------------
# Differentiable region functions (autograd mirror images).


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group, segments: Any) -> Tensor:
        ctx.dim, ctx.group, ctx.segments = dim, group, segments
        return _own_slice(x, dim, group, segments)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group, ctx.segments), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group, segments: Any) -> Tensor:
        ctx.dim, ctx.group, ctx.segments = dim, group, segments
        return _all_gather(x, dim, group, segments)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _own_slice(grad, ctx.dim, ctx.group, ctx.segments), None, None, None


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        # contiguous: the column linears that share it would each copy (and save) a strided view
        return _all_gather(x, dim, group).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def mp_copy(x: Tensor, group: Any = None) -> Tensor:
    """Enter the tensor-parallel region: forward identity, backward all-reduce of the gradient.

    Args:
        x: a replicated tensor, shape ``(*)``.
        group: the tensor-parallel group (None: the default).
    Returns:
        ``x`` (a view), shape ``(*)``.

    Example::

        >>> mp_copy(torch.ones(3)).shape
        torch.Size([3])
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _Copy.apply(x, g)


def call_with_param_copies(module: nn.Module, group: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` with its own parameters entering the region as one copy: forward as
    ``module(*args, **kwargs)``; backward, the gradients of all its parameters are summed over
    the ranks in one all-reduce (flattened into one buffer).

    For a module kept whole whose input is split (a norm over the head dim on split heads):
    each rank computes its share of the parameters' gradients. Parameter names are unchanged.

    Example::

        >>> ln = nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> torch.equal(call_with_param_copies(ln, None, x), ln(x))
        True
    """
    g = resolve_group(group)
    named = list(module.named_parameters())
    if g.size == 1 or not named:
        return module(*args, **kwargs)
    flat = mp_copy(torch.cat([p.reshape(-1) for _, p in named]), g)  # one bwd all-reduce for all of them
    pieces = flat.split([p.numel() for _, p in named])
    params = {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}
    return torch.func.functional_call(module, params, args, kwargs)


def mp_reduce(x: Tensor, group: Any = None) -> Tensor:
    """Leave the region by summing partial results: forward all-reduce, backward identity.

    Args:
        x: this rank's partial sum, shape ``(*)``.
    Returns:
        the sum over ranks, shape ``(*)``, a new tensor (the input is never modified).

    Example::

        >>> mp_reduce(torch.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _Reduce.apply(x, g)


def mp_scatter(x: Tensor, dim: int = -1, group: Any = None, segments: Sequence[int] | None = None) -> Tensor:
    """Keep this rank's slice along ``dim``: forward slice, backward all-gather.

    Args:
        x: replicated tensor, shape ``(..., N, ...)``.
        dim: the dimension to split.
        segments: layout of ``dim`` (sizes of the fused parts, each split evenly); None: contiguous.
    Returns:
        shape ``(..., N // world_size, ...)``.

    Example::

        >>> mp_scatter(torch.arange(4.0), dim=0).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _Scatter.apply(x, dim, g, tuple(segments) if segments is not None else None)


def mp_gather(x: Tensor, dim: int = -1, group: Any = None, segments: Sequence[int] | None = None) -> Tensor:
    """Assemble the full tensor from every rank's slice: forward all-gather, backward slice.

    Args:
        x: this rank's slice, shape ``(..., N // world_size, ...)``.
        dim: the split dimension.
        segments: layout of the full ``dim`` (see :mod:`tpshard.layout`); None: contiguous.
    Returns:
        shape ``(..., N, ...)`` in the original order.

    Example::

        >>> mp_gather(torch.arange(4.0), dim=0).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _Gather.apply(x, dim, g, tuple(segments) if segments is not None else None)


def mp_all_gather_seq(x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """Sequence parallel: all-gather along the sequence ``dim``; backward reduce-scatter.

    Example::

        >>> mp_all_gather_seq(torch.ones(2, 4, 3)).shape
        torch.Size([2, 4, 3])
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _AllGatherSeq.apply(x, dim, g)


def mp_reduce_scatter_seq(x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """Sequence parallel: reduce-scatter along the sequence ``dim``; backward all-gather.

    Example::

        >>> mp_reduce_scatter_seq(torch.ones(2, 4, 3)).shape
        torch.Size([2, 4, 3])
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _ReduceScatterSeq.apply(x, dim, g)


class _SeqWhole(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, full: Tensor, x: Tensor, dim: int, group: Group) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return full.view_as(full)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None, None]:
        return None, _own_slice(grad, ctx.dim, ctx.group), None, None


def mp_seq_whole(full: Tensor, x: Tensor, dim: int = 1, group: Any = None) -> Tensor:
    """Sequence parallel: ``full``, the all-gather of the shards ``x`` that column linears take
    (:func:`mp_all_gather_seq`), for a consumer that computes whole: forward ``full`` (no second
    all-gather), backward this rank's slice of the gradient to ``x`` (every rank's is the same).

    Example::

        >>> x = torch.ones(2, 4, 3)
        >>> mp_seq_whole(mp_all_gather_seq(x), x).shape
        torch.Size([2, 4, 3])
    """
    g = resolve_group(group)
    if g.size == 1:
        return x
    return _SeqWhole.apply(full, x, dim, g)
