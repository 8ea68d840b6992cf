"""How a split dimension is laid out across ranks: pure index math, no communication.

A layout of a dimension of size ``F`` is a tuple of *segments* whose sizes add up to ``F``.
Each segment is split into ``world_size`` equal contiguous chunks, and rank ``r`` owns chunk
``r`` of every segment, concatenated in segment order:

- ``(F,)`` (or ``None``): contiguous blocks, the plain Megatron split;
- ``(E, E, E)``: a fused q/k/v projection of width 3E viewed as (3, heads, head_dim), where
  each rank owns its heads of q, of k and of v (the seed's ``stride=3``);
- ``(q, k, v)`` with unequal sizes: a grouped-query fused projection split by sizes.

The checkpoint code, the layers and the region functions all use these three functions, so
a shard written offline is exactly the shard a layer builds in a running job.

Example::

    >>> import torch
    >>> shard(torch.arange(6), 0, rank=1, world_size=2, segments=(2, 4)).tolist()
    [1, 4, 5]
    >>> unshard([torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5])], 0, (2, 4)).tolist()
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["normalize", "strided", "check_divisible", "valid_world_sizes", "local_ranges", "shard", "unshard", "local_segments"]


def normalize(size: int, segments: Sequence[int] | None) -> tuple[int, ...]:
    """The segments of a dimension of ``size``; ``None`` means one contiguous segment."""
    if segments is None:
        return (size,)
    segs = tuple(int(s) for s in segments)
    if sum(segs) != size or any(s <= 0 for s in segs):
        raise ValueError(f"segments {segs} do not add up to the dimension size {size}")
    return segs


def strided(size: int, stride: int) -> tuple[int, ...]:
    """The layout of the seed's ``stride``: ``stride`` equal segments."""
    if stride < 1 or size % stride:
        raise ValueError(f"stride {stride} does not divide the dimension size {size}")
    return (size // stride,) * stride


def check_divisible(size: int, segments: Sequence[int] | None, world_size: int, what: str) -> None:
    """Raise ValueError naming ``what`` unless every segment splits evenly over ``world_size``."""
    segs = normalize(size, segments)
    if all(s % world_size == 0 for s in segs):
        return
    valid = valid_world_sizes(segs)
    shown = f"{size}" if len(segs) == 1 else f"{size} (segments {list(segs)})"
    raise ValueError(
        f"{what}={shown} is not divisible by the world size {world_size}; "
        f"world sizes that divide it: {valid}"
    )


def valid_world_sizes(segments: Sequence[int], limit: int = 512) -> list[int]:
    """World sizes (up to ``limit``) that split every segment evenly: the divisors of their gcd."""
    g = math.gcd(*segments)
    return [n for n in range(1, min(g, limit) + 1) if g % n == 0]


def local_ranges(size: int, rank: int, world_size: int, segments: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The ``(start, length)`` index ranges of ``rank``'s part, in local order."""
    segs = normalize(size, segments)
    ranges = []
    start = 0
    for seg in segs:
        if seg % world_size:
            raise ValueError(f"segment of size {seg} does not split over {world_size} ranks")
        chunk = seg // world_size
        ranges.append((start + rank * chunk, chunk))
        start += seg
    return ranges


def local_segments(size: int, world_size: int, segments: Sequence[int] | None = None) -> tuple[int, ...]:
    """The layout of a rank's local part: each segment shrunk by ``world_size``."""
    return tuple(s // world_size for s in normalize(size, segments))


def shard(t: Tensor, dim: int, rank: int, world_size: int, segments: Sequence[int] | None = None) -> Tensor:
    """``rank``'s part of ``t`` along ``dim`` (a view when the layout is contiguous)."""
    dim = dim % t.dim()
    ranges = local_ranges(t.shape[dim], rank, world_size, segments)
    if len(ranges) == 1:
        start, length = ranges[0]
        return t.narrow(dim, start, length)
    return torch.cat([t.narrow(dim, s, n) for s, n in ranges], dim=dim)


def unshard(shards: Sequence[Tensor], dim: int, segments: Sequence[int] | None = None) -> Tensor:
    """Reassemble the full tensor from every rank's part (inverse of :func:`shard`)."""
    world_size = len(shards)
    dim = dim % shards[0].dim()
    full = shards[0].shape[dim] * world_size
    segs = normalize(full, segments)
    if len(segs) == 1:
        return torch.cat(list(shards), dim=dim)
    pieces = []
    local_offsets = [0]
    for seg in segs:
        local_offsets.append(local_offsets[-1] + seg // world_size)
    for i, seg in enumerate(segs):
        for s in shards:
            pieces.append(s.narrow(dim, local_offsets[i], seg // world_size))
    return torch.cat(pieces, dim=dim)
