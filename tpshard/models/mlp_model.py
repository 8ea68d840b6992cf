"""Reference multi-layer perceptron: :func:`mlp` and :func:`mlp_example_inputs`."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from tpshard.models._common import _first_param, _seeded_generator

__all__ = ["ACTIVATIONS", "mlp", "mlp_example_inputs"]


#: Activation names accepted by :func:`mlp`, mapped to module factories.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def mlp(
    in_features: int = 16,
    hidden: Sequence[int] = (32, 32),
    out_features: int = 16,
    activation: str = "gelu",
    bias: bool = True,
) -> nn.Sequential:
    """Build a plain multi-layer perceptron as an ``nn.Sequential``.

    The layout is ``Linear, act, Linear, act, ..., Linear``: one activation
    after every hidden layer, none after the output layer.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers (may be empty: a single Linear).
        out_features: output width.
        activation: one of :data:`ACTIVATIONS` (``"gelu"``, ``"relu"``, ...).
        bias: whether the Linear layers have biases.

    Example:

    >>> m = mlp(8, (16,), 4, activation="relu")
    >>> [type(layer).__name__ for layer in m]
    ['Linear', 'ReLU', 'Linear']
    >>> m(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}"
        )
    widths = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def mlp_example_inputs(model: nn.Module, batch: int = 4, seed: int = 0) -> tuple:
    """Example inputs ``(x,)`` for a model built by :func:`mlp`.

    ``x`` has shape ``(batch, in_features)`` and the dtype/device of the
    model's parameters; it is drawn reproducibly from ``seed`` (an empty
    tensor when the model lives on the meta device).

    Example:

    >>> m = mlp(8, (16,), 4)
    >>> (x,) = mlp_example_inputs(m, batch=2)
    >>> x.shape, x.dtype
    (torch.Size([2, 8]), torch.float32)
    """
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    p = _first_param(model)
    shape = (batch, first_linear.in_features)
    if p.device.type == "meta":
        return (torch.empty(shape, dtype=p.dtype, device=p.device),)
    x = torch.randn(shape, generator=_seeded_generator(seed))
    return (x.to(dtype=p.dtype, device=p.device),)
