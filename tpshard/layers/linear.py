"""Column- and row-parallel ``nn.Linear`` (:class:`ColumnParallelLinear`,
:class:`RowParallelLinear`); see :mod:`tpshard.layers` for the layouts and collectives.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpshard import comm, layout
from tpshard.layers._common import _check_module, _init_function, _init_shard_, _ParallelLayer, _shard_parameter

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


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
