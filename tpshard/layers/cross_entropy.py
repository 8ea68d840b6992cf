"""Cross entropy of vocabulary-split logits (:func:`vocab_parallel_cross_entropy`), never
materializing the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: F401  (the docstring example uses it)
from torch import Tensor

from tpshard import comm

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce_max(x: Tensor, group: comm.Group) -> Tensor:
    """Element-wise max over the group, out of place (not differentiable: used on detached maxima)."""
    if group.size == 1:
        return x
    if not group.can_communicate:
        raise RuntimeError(
            f"all-reduce (max) needs a running process group, but this call was given {group!r}"
        )
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group.process_group)
    return out


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row loss from vocab-split logits; backward is local (no communication).

    With full logits z (V), target y, smoothing e and K = V classes:
        loss = lse(z) - (1 - e) * z_y - (e / K) * sum_j z_j      (0 for ignored rows)
        dloss/dz_j = softmax(z)_j - (1 - e) * [j == y] - e / K
    Only lse's max and sum, z_y and sum_j z_j need the other ranks: one all-reduce MAX and
    one all-reduce SUM of three stacked rows.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, ignore_index: int, smoothing: float,
                group: comm.Group) -> Tensor:
        # logits: (N, V_local), this rank's vocab slice; target: (N,) global class ids.
        n_local = logits.shape[-1]
        start = group.rank * n_local
        n_classes = n_local * group.size
        # Stability: subtract the global row max (all-reduce MAX of the local max).
        row_max = _all_reduce_max(logits.amax(dim=-1), group)  # (N,)
        shifted = logits - row_max.unsqueeze(-1)  # (N, V_local), <= 0
        exp = shifted.exp()
        valid = target != ignore_index  # (N,)
        owned = valid & (target >= start) & (target < start + n_local)  # exactly one rank per valid row
        local_target = torch.where(owned, target - start, torch.zeros_like(target))
        picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        parts = [exp.sum(dim=-1), picked]
        if smoothing:
            parts.append(shifted.sum(dim=-1))
        sums = comm.mp_reduce(torch.stack(parts), group)  # (2 or 3, N): global sums
        sum_exp, z_target = sums[0], sums[1]
        # The max shift cancels: lse - (1-e) z_y - e mean(z) is invariant under z -> z - m.
        loss = sum_exp.log() - (1.0 - smoothing) * z_target
        if smoothing:
            loss = loss - (smoothing / n_classes) * sums[2]
        loss = loss.masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # (N, V_local); exp is ours to overwrite
        ctx.save_for_backward(softmax, local_target, owned, valid)
        ctx.smoothing, ctx.n_classes = smoothing, n_classes
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        softmax, local_target, owned, valid = ctx.saved_tensors
        e = ctx.smoothing
        grad = softmax - e / ctx.n_classes if e else softmax.clone()
        hit = owned.to(grad.dtype).unsqueeze(-1) * -(1.0 - e)  # (N, 1): -(1-e) on owned rows
        grad.scatter_add_(-1, local_target.unsqueeze(-1), hit)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    group: Any = None,
) -> Tensor:
    """Cross entropy of vocabulary-split logits, never materializing the full logits.

    Equals ``F.cross_entropy(full_logits.flatten(0, -2), target.flatten(), ignore_index=...,
    reduction=..., label_smoothing=...)`` where ``full_logits`` concatenates every rank's
    slice along the last dim (rank r holds classes ``[r*V/N, (r+1)*V/N)``, the layout of
    :class:`VocabParallelEmbedding` and of a column-parallel head without ``gather_output``).
    Differentiable in ``logits_shard``; the backward needs no communication. Forward: one
    all-reduce MAX and one all-reduce SUM. Half/bfloat16 logits are computed in float32.

    Args:
        logits_shard: ``(..., V // world_size)``, e.g. ``(N, V/N)`` or ``(B, T, V/N)``.
        target: class ids, shape ``(...)`` matching the leading dims (same on every rank).
            Ids outside ``[0, V)`` other than ``ignore_index`` are not detected.
        ignore_index: rows with this target contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows), "sum" or "none" (shape ``(N_rows,)``, the
            flattened leading dims, as F.cross_entropy on the flattened input returns).
        label_smoothing: as ``F.cross_entropy``.
        group: the tensor-parallel group (None: the default).

    Example::

        >>> logits = torch.randn(2, 3, 5)
        >>> target = torch.tensor([[0, 4, -100], [2, 1, 3]])
        >>> ref = F.cross_entropy(logits.flatten(0, -2), target.flatten())
        >>> torch.allclose(vocab_parallel_cross_entropy(logits, target), ref)
        True
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction={reduction!r}; use 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing={label_smoothing} must be in [0, 1]")
    g = comm.resolve_group(group)
    n_local = logits_shard.shape[-1]
    logits = logits_shard.reshape(-1, n_local)  # (N, V_local)
    flat_target = target.reshape(-1)  # (N,)
    if flat_target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"vocab_parallel_cross_entropy: target of shape {tuple(target.shape)} does not match "
            f"logits of shape {tuple(logits_shard.shape)} (expected {logits.shape[0]} targets)"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = _VocabParallelCrossEntropy.apply(logits, flat_target, ignore_index, float(label_smoothing), g)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (flat_target != ignore_index).sum().to(loss.dtype)
    return loss.to(logits_shard.dtype)
