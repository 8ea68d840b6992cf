"""Tensor-parallel layers: column/row linear, embedding-dim and vocabulary embeddings, and a
vocabulary-parallel cross entropy.

Each layer holds only this rank's shard of its parameters and does its communication through
:mod:`tpshard.comm` (so ``CommDebugMode`` counts it). Layouts come from :mod:`tpshard.layout`,
so a shard a layer builds is exactly the shard the checkpoint code writes.

==========================  =========================  ====================================
layer                       weight on rank r           forward collectives (backward)
==========================  =========================  ====================================
``ColumnParallelLinear``    rows (out-features) of     all-gather if ``gather_output``
                            ``layout``                 (all-reduce of the input grad)
``RowParallelLinear``       columns (in-features)      all-reduce if ``reduce_output``
                                                       (all-gather if the input is scattered)
``ParallelEmbedding``       columns (embedding dim)    all-gather (none)
``VocabParallelEmbedding``  rows [r*V/N, (r+1)*V/N)    all-reduce if ``reduce_output`` (none)
==========================  =========================  ====================================

The seed's two-layer example: an embedding, a column layer that keeps its output split and a
row layer that takes the split input equal ``nn.Sequential(Embedding, Linear, Linear)`` with
one all-gather and one all-reduce per forward.

Example (one rank; under ``torchrun`` the same code runs split over the ranks)::

    >>> import torch
    >>> from torch import nn
    >>> ref = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.Linear(8, 4))
    >>> tp = nn.Sequential(
    ...     ParallelEmbedding.from_module(ref[0]),
    ...     ColumnParallelLinear.from_module(ref[1], gather_output=False),
    ...     RowParallelLinear.from_module(ref[2], input_is_parallel=True),
    ... )
    >>> ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    >>> torch.allclose(tp(ids), ref(ids))
    True
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tpshard import comm, layout

__all__ = [
    "INIT_FUNCTIONS",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelEmbedding",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]

# ---------------------------------------------------------------------------------------------
# Initialization.

#: ``init_type`` names and the ``torch.nn.init`` functions they call (with default arguments).
INIT_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming_normal": nn.init.kaiming_normal_,
    "kaiming_uniform": nn.init.kaiming_uniform_,
    "normal": nn.init.normal_,
    "uniform": nn.init.uniform_,
    "trunc_normal": nn.init.trunc_normal_,
    "orthogonal": nn.init.orthogonal_,
    "eye": nn.init.eye_,
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
}


def _init_function(init_type: str, owner: str) -> Callable[..., Tensor]:
    """The ``torch.nn.init`` function named by ``init_type``; ValueError names the valid ones."""
    try:
        return INIT_FUNCTIONS[init_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"{owner}: unknown init_type {init_type!r}; valid init types: {sorted(INIT_FUNCTIONS)}"
        ) from None


def _init_shard_(
    param: Tensor,
    full_shape: tuple[int, ...],
    dim: int,
    segments: Sequence[int] | None,
    init_type: str,
    group: comm.Group,
    owner: str,
    zero_row: int | None = None,
) -> None:
    """Fill ``param`` with this rank's shard (along ``dim``, per ``segments``) of a fresh weight.

    The full ("master") weight of ``full_shape`` is initialized on the CPU with a private
    generator seeded by one draw from the global CPU RNG, then only this rank's shard is
    copied into ``param``. Consequences:

    - every rank draws the same seed when every rank seeded torch identically (the usual
      ``torch.manual_seed(s)`` on every rank), so the ranks' shards tile one master weight;
    - a one-rank layer built after the same seed holds exactly that master weight;
    - the global RNG advances by one draw per call, whatever the weight's size or device;
    - memory: the master weight of this one tensor exists transiently on the CPU (float32 for
      half/bfloat16 parameters), then is freed. Meta parameters are left untouched.
    """
    fn = _init_function(init_type, owner)
    if param.is_meta:
        return
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    work_dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    master = torch.empty(full_shape, dtype=work_dtype)
    with torch.no_grad():
        if "generator" in inspect.signature(fn).parameters:
            fn(master, generator=generator)
        else:
            fn(master)
        if zero_row is not None:
            master[zero_row].zero_()  # nn.Embedding zeroes its padding row at init
        param.copy_(layout.shard(master, dim, group.rank, group.size, segments))


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _resolve_layout(size: int, stride: int, segments: Sequence[int] | None, what: str) -> tuple[int, ...]:
    """The segments of a split dimension from ``segments`` or the seed's ``stride``."""
    if segments is not None and stride != 1:
        raise ValueError(f"{what}: pass stride={stride} or segments={tuple(segments)}, not both")
    try:
        if segments is not None:
            return layout.normalize(size, segments)
        return layout.strided(size, stride)
    except ValueError as e:
        raise ValueError(f"{what}={size}: {e}") from None


def _shard_parameter(p: Tensor, dim: int, group: comm.Group, segments: Sequence[int] | None = None) -> nn.Parameter:
    """A new Parameter holding this rank's shard of ``p`` (own storage, same dtype/device)."""
    shard = layout.shard(p.detach(), dim, group.rank, group.size, segments)
    return nn.Parameter(shard.clone(memory_format=torch.contiguous_format), requires_grad=p.requires_grad)


def _check_module(module: nn.Module, kind: type, cls: type) -> None:
    if not isinstance(module, kind):
        raise TypeError(f"{cls.__name__}.from_module needs an nn.{kind.__name__}, got {type(module).__name__}")


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


class _ParallelLayer(nn.Module):
    """Holds the group (``self.group``, ``self.world_size``, ``self.rank``) and gathers."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group: comm.Group = comm.resolve_group(group)
        self.world_size: int = self.group.size
        self.rank: int = self.group.rank

    def _gather_full(self, t: Tensor, dim: int, segments: Sequence[int] | None = None) -> Tensor:
        """The full tensor from every rank's ``t`` (a collective: every rank must call it)."""
        with torch.no_grad():
            if self.world_size == 1:
                return t.detach().clone()
            if t.is_meta:  # nothing to communicate: every rank's part is meta
                shape = list(t.shape)
                shape[dim] *= self.world_size
                return torch.empty(shape, dtype=t.dtype, device="meta")
            return comm.mp_gather(t.detach(), dim, self.group, segments)


# ---------------------------------------------------------------------------------------------
# Linear layers.


class ColumnParallelLinear(_ParallelLayer):
    """``nn.Linear`` split on its output features: rank r holds rows of ``weight`` and ``bias``.

    ``weight`` is ``(out_features // world_size, in_features)``: rank r's part of every segment
    of ``layout`` (``segments``, or ``stride`` equal segments for a fused q/k/v weight, else one
    contiguous block). The bias is split the same way and added inside the local product.

    forward: ``x (*, in) -> mp_copy -> linear -> y (*, out // world)``, then all-gathered to
    ``(*, out)`` in the original feature order if ``gather_output``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        gather_output: all-gather the output (else return this rank's features).
        init_type: a ``torch.nn.init`` name (see ``INIT_FUNCTIONS``); the bias starts at zero.
        stride: the seed's fused-weight layout: ``stride`` equal segments.
        group: the tensor-parallel group (None: the default group).
        segments: explicit layout of ``out_features`` (e.g. q, k, v widths).
        copy_input: wrap the input in ``mp_copy`` (backward all-reduce of its gradient). The
            rewriter passes False when it inserts one shared copy for several consumers.
        device, dtype: as ``nn.Linear``. On the meta device nothing is initialized.

    Fresh initialization builds the master weight of this one layer on the CPU transiently
    and keeps the shard (see ``reset_parameters``).

    Example::

        >>> layer = ColumnParallelLinear(4, 6, segments=(2, 2, 2))
        >>> layer(torch.randn(2, 3, 4)).shape
        torch.Size([2, 3, 6])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = True,
        init_type: str = "xavier_normal",
        stride: int = 1,
        group: Any = None,
        *,
        segments: Sequence[int] | None = None,
        copy_input: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        what = f"{type(self).__name__} out_features"
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.copy_input = copy_input
        self.init_type = init_type
        self.stride = stride
        self.segments = _resolve_layout(out_features, stride, segments, what)
        layout.check_divisible(out_features, self.segments, self.world_size, what)
        _init_function(init_type, type(self).__name__)
        self.local_out_features = out_features // self.world_size
        factory = {"device": device, "dtype": dtype}
        # weight: (out_local, in), bias: (out_local,) -- both in local layout order.
        self.weight = nn.Parameter(torch.empty(self.local_out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.local_out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        *,
        stride: int = 1,
        segments: Sequence[int] | None = None,
        group: Any = None,
        **options: Any,
    ) -> "ColumnParallelLinear":
        """This rank's layer holding an exact copy of its shard of ``module``'s parameters.

        No initialization runs; the parameters keep ``module``'s dtype, device and
        ``requires_grad`` and do not share its storage (a meta module gives a meta layer).
        ``options``: ``gather_output``, ``copy_input``, ``init_type``.

        Example::

            >>> lin = nn.Linear(4, 6)
            >>> layer = ColumnParallelLinear.from_module(lin, gather_output=False)
            >>> torch.equal(layer.weight, lin.weight)
            True
        """
        _check_module(module, nn.Linear, cls)
        w = module.weight
        layer = cls(
            module.in_features, module.out_features, bias=module.bias is not None, stride=stride,
            group=group, segments=segments, device="meta", dtype=w.dtype, **options,
        )
        layer.weight = _shard_parameter(w, 0, layer.group, layer.segments)
        if module.bias is not None:
            layer.bias = _shard_parameter(module.bias, 0, layer.group, layer.segments)
        return layer

    def reset_parameters(self) -> None:
        """Weight: this rank's shard of a fresh ``init_type`` master weight; bias: zero."""
        _init_shard_(
            self.weight, (self.out_features, self.in_features), 0, self.segments, self.init_type,
            self.group, type(self).__name__,
        )
        if self.bias is not None and not self.bias.is_meta:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``x (*, in_features)`` -> ``(*, out_features)``, or ``(*, out_features // world)``."""
        if self.copy_input:
            x = comm.mp_copy(x, self.group)  # backward: all-reduce of the input grad
        y = F.linear(x, self.weight, self.bias)  # (*, out_local)
        if self.gather_output:
            y = comm.mp_gather(y, -1, self.group, self.segments)  # (*, out)
        return y

    def gather_weight(self) -> Tensor:
        """The full ``(out_features, in_features)`` weight (an all-gather: call on every rank)."""
        return self._gather_full(self.weight, 0, self.segments)

    def gather_bias(self) -> Tensor | None:
        """The full ``(out_features,)`` bias, or None (an all-gather: call on every rank)."""
        return None if self.bias is None else self._gather_full(self.bias, 0, self.segments)

    def extra_repr(self) -> str:
        seg = f", segments={self.segments}" if len(self.segments) > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.local_out_features}){seg}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, copy_input={self.copy_input}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


class RowParallelLinear(_ParallelLayer):
    """``nn.Linear`` split on its input features: rank r holds columns of ``weight``.

    ``weight`` is ``(out_features, in_features // world_size)`` (rank r's part of every
    segment of the in-features layout); ``bias`` is full size and replicated.

    forward: ``x (*, in)`` is scattered to ``(*, in // world)`` unless ``input_is_parallel``;
    the local product ``x @ weight.T`` (no bias) is a partial sum; with ``reduce_output`` it
    is all-reduced and the bias added once, giving ``(*, out)``.

    With ``reduce_output=False`` the forward returns the local partial sum WITHOUT the bias:
    the caller must all-reduce it (possibly summed with other partials first) and add
    ``self.bias`` exactly once. tpshard's rewriter uses this to share one all-reduce.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        input_is_parallel: the input is already this rank's in-features slice.
        init_type, stride, group, segments, device, dtype: as :class:`ColumnParallelLinear`
            (``stride``/``segments`` describe the in-features layout).
        reduce_output: all-reduce the partial sums and add the bias.

    Example::

        >>> layer = RowParallelLinear(6, 4)
        >>> layer(torch.randn(2, 3, 6)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_type: str = "xavier_normal",
        stride: int = 1,
        group: Any = None,
        *,
        segments: Sequence[int] | None = None,
        reduce_output: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(group)
        what = f"{type(self).__name__} in_features"
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.reduce_output = reduce_output
        self.init_type = init_type
        self.stride = stride
        self.segments = _resolve_layout(in_features, stride, segments, what)
        layout.check_divisible(in_features, self.segments, self.world_size, what)
        _init_function(init_type, type(self).__name__)
        self.local_in_features = in_features // self.world_size
        factory = {"device": device, "dtype": dtype}
        # weight: (out, in_local); bias: (out,) replicated on every rank.
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        *,
        stride: int = 1,
        segments: Sequence[int] | None = None,
        group: Any = None,
        **options: Any,
    ) -> "RowParallelLinear":
        """This rank's layer with an exact copy of its weight shard and of the full bias.

        Same rules as :meth:`ColumnParallelLinear.from_module`; ``options``:
        ``input_is_parallel``, ``reduce_output``, ``init_type``.

        Example::

            >>> lin = nn.Linear(6, 4)
            >>> torch.equal(RowParallelLinear.from_module(lin).bias, lin.bias)
            True
        """
        _check_module(module, nn.Linear, cls)
        w = module.weight
        layer = cls(
            module.in_features, module.out_features, bias=module.bias is not None, stride=stride,
            group=group, segments=segments, device="meta", dtype=w.dtype, **options,
        )
        layer.weight = _shard_parameter(w, 1, layer.group, layer.segments)
        if module.bias is not None:
            b = module.bias
            layer.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        return layer

    def reset_parameters(self) -> None:
        """Weight: this rank's columns of a fresh ``init_type`` master weight; bias: zero."""
        _init_shard_(
            self.weight, (self.out_features, self.in_features), 1, self.segments, self.init_type,
            self.group, type(self).__name__,
        )
        if self.bias is not None and not self.bias.is_meta:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``x (*, in)`` (or ``(*, in // world)`` if ``input_is_parallel``) -> ``(*, out)``.

        With ``reduce_output=False``: this rank's partial sum ``(*, out)`` without the bias.
        """
        if not self.input_is_parallel:
            x = comm.mp_scatter(x, -1, self.group, self.segments)  # (*, in_local)
        y = F.linear(x, self.weight)  # partial sum over this rank's in-features; no bias here
        if not self.reduce_output:
            return y
        y = comm.mp_reduce(y, self.group)  # full sum, identical on every rank
        return y if self.bias is None else y + self.bias

    def gather_weight(self) -> Tensor:
        """The full ``(out_features, in_features)`` weight (an all-gather: call on every rank)."""
        return self._gather_full(self.weight, 1, self.segments)

    def gather_bias(self) -> Tensor | None:
        """The full bias (a copy: it is replicated, so nothing is communicated), or None."""
        return None if self.bias is None else self.bias.detach().clone()

    def extra_repr(self) -> str:
        seg = f", segments={self.segments}" if len(self.segments) > 1 else ""
        return (
            f"in_features={self.in_features} (local {self.local_in_features}){seg}, "
            f"out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, reduce_output={self.reduce_output}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


# ---------------------------------------------------------------------------------------------
# Embeddings.


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
        _check_module(module, nn.Embedding, cls)
        _no_layout(cls, stride, segments)
        w = module.weight
        layer = cls(
            module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
            max_norm=module.max_norm, norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, group=group,
            device="meta", dtype=w.dtype, **options,
        )
        layer.weight = _shard_parameter(w, 1, layer.group)
        return layer

    def reset_parameters(self) -> None:
        """This rank's columns of a fresh ``init_type`` weight whose padding row is zero."""
        _init_shard_(
            self.weight, (self.num_embeddings, self.embedding_dim), 1, None, self.init_type,
            self.group, type(self).__name__, zero_row=self.padding_idx,
        )

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
        _check_module(module, nn.Embedding, cls)
        _no_layout(cls, stride, segments)
        w = module.weight
        layer = cls(
            module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
            max_norm=module.max_norm, norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, group=group,
            device="meta", dtype=w.dtype, **options,
        )
        layer.weight = _shard_parameter(w, 0, layer.group)
        return layer

    def reset_parameters(self) -> None:
        """This rank's rows of a fresh ``init_type`` weight whose padding row is zero."""
        _init_shard_(
            self.weight, (self.num_embeddings, self.embedding_dim), 0, None, self.init_type,
            self.group, type(self).__name__, zero_row=self.padding_idx,
        )

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


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel cross entropy.


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
