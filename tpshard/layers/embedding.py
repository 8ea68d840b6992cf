"""Embeddings split on the embedding dim (:class:`ParallelEmbedding`) or on the vocabulary
(:class:`VocabParallelEmbedding`, :func:`vocab_parallel_lookup`); see :mod:`tpshard.layers`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpshard import comm, layout
from tpshard.layers._common import _check_module, _init_function, _init_shard_, _ParallelLayer, _shard_parameter

__all__ = ["ParallelEmbedding", "VocabParallelEmbedding", "vocab_parallel_lookup"]


def _no_layout(cls: type, stride: int, segments: Sequence[int] | None) -> None:
    if stride != 1 or segments is not None:
        raise ValueError(
            f"{cls.__name__} splits its weight in contiguous blocks; stride={stride} and "
            f"segments={segments} are not supported"
        )


def _normalize_padding_idx(padding_idx: int | None, num_embeddings: int, owner: str) -> int | None:
    """nn.Embedding's rule: a negative index counts from the end; it must be in range."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{owner}: padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
    return padding_idx % num_embeddings


def _no_max_norm(max_norm: float | None, world_size: int, owner: str) -> None:
    if max_norm is not None and world_size > 1:
        raise ValueError(
            f"{owner}: max_norm={max_norm} cannot work with world size {world_size}: the weight "
            "is split along the embedding dim, so each rank sees only part of a row and would "
            "renormalize by a partial norm. Drop max_norm or use VocabParallelEmbedding (whole "
            "rows per rank, where max_norm is exact)"
        )


def _from_embedding(cls: type, module: nn.Embedding, stride: int, segments: Sequence[int] | None, group: Any,
                    options: dict[str, Any], split_dim: int) -> Any:
    """``cls``'s layer for this rank from ``module``: its options copied, and an exact copy of its
    shard of the weight along ``split_dim`` (1: embedding dim, 0: vocabulary); nothing is
    initialized (the layer is built on the meta device first)."""
    _check_module(module, nn.Embedding, cls)
    _no_layout(cls, stride, segments)
    w = module.weight
    layer = cls(
        module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
        max_norm=module.max_norm, norm_type=module.norm_type,
        scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, group=group,
        device="meta", dtype=w.dtype, **options,
    )
    layer.weight = _shard_parameter(w, split_dim, layer.group)
    return layer


def _init_embedding_shard_(layer: Any, split_dim: int) -> None:
    """This rank's part (along ``split_dim``) of a fresh ``init_type`` weight whose padding row is zero."""
    _init_shard_(
        layer.weight, (layer.num_embeddings, layer.embedding_dim), split_dim, None, layer.init_type,
        layer.group, type(layer).__name__, zero_row=layer.padding_idx,
    )


class ParallelEmbedding(_ParallelLayer):
    """``nn.Embedding`` split on the embedding dim: ``weight`` is ``(num, dim // world_size)``.

    forward: ``ids (*)`` (replicated) -> local lookup ``(*, dim // world)`` -> all-gather
    ``(*, dim)``. The backward needs no communication. ``padding_idx``,
    ``scale_grad_by_freq`` and ``sparse`` behave as in ``nn.Embedding``; ``max_norm`` is
    refused for world size > 1 (a rank sees only part of each row's norm).

    Example::

        >>> emb = ParallelEmbedding(10, 4, padding_idx=0)
        >>> emb(torch.tensor([[0, 3], [5, 9]])).shape
        torch.Size([2, 2, 4])
        >>> emb.weight[0].abs().sum().item()
        0.0
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_type: str = "normal",
        group: Any = None,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        name = type(self).__name__
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, name)
        _no_max_norm(max_norm, self.world_size, name)
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.init_type = init_type
        layout.check_divisible(embedding_dim, None, self.world_size, f"{name} embedding_dim")
        _init_function(init_type, name)
        self.local_embedding_dim = embedding_dim // self.world_size
        # weight: (num_embeddings, dim_local); every rank holds every row (its columns).
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, self.local_embedding_dim, device=device, dtype=dtype)
        )
        self.reset_parameters()

    @classmethod
    def from_module(
        cls,
        module: nn.Embedding,
        *,
        stride: int = 1,
        segments: Sequence[int] | None = None,
        group: Any = None,
        **options: Any,
    ) -> "ParallelEmbedding":
        """This rank's layer with an exact copy of its columns of ``module.weight``.

        Copies ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and
        ``sparse``; only the contiguous layout (``stride=1``, no ``segments``) is supported.

        Example::

            >>> emb = nn.Embedding(10, 4)
            >>> torch.equal(ParallelEmbedding.from_module(emb).weight, emb.weight)
            True
        """
        return _from_embedding(cls, module, stride, segments, group, options, split_dim=1)

    def reset_parameters(self) -> None:
        """This rank's columns of a fresh ``init_type`` weight whose padding row is zero."""
        _init_embedding_shard_(self, split_dim=1)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids (*)`` integer, the same on every rank -> ``(*, embedding_dim)``."""
        out = F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )  # (*, dim_local)
        return comm.mp_gather(out, -1, self.group)  # (*, dim)

    def gather_weight(self) -> Tensor:
        """The full ``(num_embeddings, embedding_dim)`` weight (an all-gather on every rank)."""
        return self._gather_full(self.weight, 1)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_embeddings}, {self.embedding_dim} (local {self.local_embedding_dim})"
        )
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}, norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        return s + f", rank={self.rank}, world_size={self.world_size}"


def vocab_parallel_lookup(ids: Tensor, weight: Tensor, vocab_start: int, padding_idx: int | None = None) -> Tensor:
    """This rank's partial embedding: rows of ``weight`` (ids ``[vocab_start, vocab_start +
    weight.shape[0])``) for the ids it owns, zeros elsewhere. Summed over ranks: the lookup.

    ``ids (*)`` -> ``(*, dim)``; ``padding_idx`` is local (None when another rank owns it).

    Example::

        >>> w = torch.arange(6.0).view(3, 2)
        >>> vocab_parallel_lookup(torch.tensor([2, 3, 4]), w, vocab_start=2).tolist()
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    """
    vocab_end = vocab_start + weight.shape[0]
    owned = (ids >= vocab_start) & (ids < vocab_end)  # (*) bool
    # Other ranks' ids read local row 0; their outputs (and so the grads) are zeroed.
    local = torch.where(owned, ids - vocab_start, torch.zeros_like(ids))
    out = F.embedding(local, weight, padding_idx)  # (*, dim)
    return out.masked_fill(~owned.unsqueeze(-1), 0.0)


class VocabParallelEmbedding(_ParallelLayer):
    """``nn.Embedding`` split on the vocabulary: rank r owns ids ``[r*V/N, (r+1)*V/N)``.

    ``weight`` is ``(num_embeddings // world_size, embedding_dim)``: whole rows. forward:
    ids outside this rank's range look up nothing (their rows are zero), the rest look up
    their local row; the partial results are all-reduced (one all-reduce, none in backward).
    With ``reduce_output=False`` the partial ``(*, dim)`` is returned for the caller to
    reduce (the rewriter sums several partials and reduces once).

    ``padding_idx`` behaves as in ``nn.Embedding`` (its row starts at zero and gets no
    gradient; only the owning rank holds it). ``max_norm`` and ``scale_grad_by_freq`` are
    exact: a row lives on one rank, and the owning rank sees every occurrence of its ids (this
    path selects the in-range ids, a data-dependent shape; the default path masks instead).
    Ids outside ``[0, num_embeddings)`` give zero rows instead of raising.

    Example::

        >>> emb = VocabParallelEmbedding(10, 4, padding_idx=3)
        >>> emb(torch.tensor([[0, 3], [5, 9]])).shape
        torch.Size([2, 2, 4])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_type: str = "normal",
        group: Any = None,
        *,
        reduce_output: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        name = type(self).__name__
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _normalize_padding_idx(padding_idx, num_embeddings, name)
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.init_type = init_type
        self.reduce_output = reduce_output
        layout.check_divisible(num_embeddings, None, self.world_size, f"{name} num_embeddings")
        _init_function(init_type, name)
        self.local_num_embeddings = num_embeddings // self.world_size
        self.vocab_start = self.rank * self.local_num_embeddings
        self.vocab_end = self.vocab_start + self.local_num_embeddings
        # The padding row's local index on the rank owning it, None elsewhere.
        p = self.padding_idx
        owns_pad = p is not None and self.vocab_start <= p < self.vocab_end
        self.local_padding_idx = p - self.vocab_start if owns_pad else None
        # weight: (num_local, dim): rows vocab_start .. vocab_end - 1.
        self.weight = nn.Parameter(
            torch.empty(self.local_num_embeddings, embedding_dim, device=device, dtype=dtype)
        )
        self.reset_parameters()

    @classmethod
    def from_module(
        cls,
        module: nn.Embedding,
        *,
        stride: int = 1,
        segments: Sequence[int] | None = None,
        group: Any = None,
        **options: Any,
    ) -> "VocabParallelEmbedding":
        """This rank's layer with an exact copy of its rows of ``module.weight``.

        Copies ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and
        ``sparse``; ``options``: ``reduce_output``, ``init_type``. Contiguous ranges only.

        Example::

            >>> emb = nn.Embedding(10, 4)
            >>> torch.equal(VocabParallelEmbedding.from_module(emb).weight, emb.weight)
            True
        """
        return _from_embedding(cls, module, stride, segments, group, options, split_dim=0)

    def reset_parameters(self) -> None:
        """This rank's rows of a fresh ``init_type`` weight whose padding row is zero."""
        _init_embedding_shard_(self, split_dim=0)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids (*)`` integer, the same on every rank -> ``(*, embedding_dim)``.

        With ``reduce_output=False``: this rank's partial (zero rows for other ranks' ids).
        """
        args = (self.local_padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        if self.world_size == 1:
            return F.embedding(ids, self.weight, *args)
        owned = (ids >= self.vocab_start) & (ids < self.vocab_end)  # (*) bool
        if self.max_norm is not None or self.scale_grad_by_freq:
            # Exact path: look up only the owned ids, so max_norm renormalizes exactly the rows
            # nn.Embedding would and the frequency counts see exactly the same ids.
            rows = F.embedding(ids[owned] - self.vocab_start, self.weight, *args)  # (M, dim)
            out = rows.new_zeros((*ids.shape, self.embedding_dim)).index_put((owned,), rows)
        else:
            out = vocab_parallel_lookup(ids, self.weight, self.vocab_start, self.local_padding_idx)
        if self.reduce_output:
            out = comm.mp_reduce(out, self.group)  # exactly one rank contributed each row
        return out

    def gather_weight(self) -> Tensor:
        """The full ``(num_embeddings, embedding_dim)`` weight (an all-gather on every rank)."""
        return self._gather_full(self.weight, 0)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_embeddings} (local {self.vocab_start}..{self.vocab_end - 1}), "
            f"{self.embedding_dim}"
        )
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}, norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        return s + f", reduce_output={self.reduce_output}, rank={self.rank}, world_size={self.world_size}"
