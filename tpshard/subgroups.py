"""Replica subgroups of a tensor-parallel group: the ranks that hold the same block of a
parameter whose shard is replicated (``ParamShard.replicas``, grouped-query k/v heads).

With ``replicas = R`` in a group of ``W`` ranks, group rank ``r`` is in replica subgroup
``r // R``: the ``W // R`` subgroups are consecutive runs of ``R`` group ranks. Each replica
computes only a partial gradient of its block (from its own query heads), so the block's
gradient is all-reduced within its subgroup: :func:`tpshard.comm.mp_copy` (forward identity,
backward all-reduce) taken over the subgroup does exactly that.

``torch.distributed.new_group`` must be entered by every process of the default group, for
every subgroup, in the same order, members or not. :func:`replica_group` therefore creates all
subgroups of every tensor-parallel group (found by one ``all_gather_object`` when the group is
not the whole world, e.g. the "tp" dim of a 2-D mesh) in sorted order, once per
(group, replicas), and caches them.

Example (no process group needed: an offline group stands for its replica subgroup)::

    >>> from tpshard.comm import OfflineGroup
    >>> replica_group(OfflineGroup(rank=3, world_size=4), 2)
    OfflineGroup(rank=1, size=2)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from tpshard import comm

__all__ = ["replica_group", "replica_ranks"]

# (id of the process group, its global ranks, replicas) -> this process's replica subgroup
_cache: dict[tuple[int, tuple[int, ...], int], comm.Group] = {}


def replica_ranks(world_size: int, replicas: int, rank: int) -> list[int]:
    """The group ranks that hold the same block as ``rank``: ``[b * R, (b + 1) * R)``, ``b = rank // R``.

    Example::

        >>> replica_ranks(4, 2, 3)
        [2, 3]
    """
    if replicas < 1 or world_size % replicas:
        raise ValueError(f"replicas {replicas} does not divide the world size {world_size}")
    b = rank // replicas
    return list(range(b * replicas, (b + 1) * replicas))


def replica_group(group: Any, replicas: int) -> comm.Group:
    """This rank's replica subgroup of ``group`` (see the module docstring).

    The group itself when ``replicas`` is its size; an :class:`~tpshard.comm.OfflineGroup` of
    ``replicas`` ranks when ``group`` cannot communicate. Collective over the default group the
    first time it is called for a (group, replicas): every process must call it, in the same order.
    """
    g = comm.resolve_group(group)
    replica_ranks(g.size, replicas, g.rank)  # validates
    if replicas == g.size:
        return g
    if g.process_group is None:  # offline: rank and size only
        return comm.OfflineGroup(g.rank % replicas, replicas)
    ranks = tuple(dist.get_process_group_ranks(g.process_group))
    key = (id(g.process_group), ranks, replicas)
    if key not in _cache:
        if len(ranks) == dist.get_world_size():
            every = [ranks]
        else:  # every process must create every tp group's subgroups: learn them all
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, ranks)
            every = sorted({tuple(x) for x in gathered})
        me = dist.get_rank()
        mine = None
        for tp in every:  # sorted tp groups, each's subgroups in group-rank order
            for start in range(0, len(tp), replicas):
                members = list(tp[start:start + replicas])
                pg = dist.new_group(members)
                if me in members:
                    mine = pg
        _cache[key] = comm.Group(mine)
    return _cache[key]
