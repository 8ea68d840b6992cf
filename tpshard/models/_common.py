"""Small helpers the reference models share: the first parameter (dtype/device) and
reproducible random draws from a private seeded generator.
"""

from __future__ import annotations

import torch
from torch import nn


def _first_param(model: nn.Module) -> torch.Tensor:
    """Return the first parameter of ``model`` (used for dtype/device)."""
    for p in model.parameters():
        return p
    raise ValueError(f"{type(model).__name__} has no parameters")


def _seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _randint_on(
    high: int, shape: tuple[int, ...], device: torch.device, seed: int
) -> torch.Tensor:
    """Reproducible ``long`` tensor in ``[0, high)``; empty tensor on meta."""
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.long, device=device)
    idx = torch.randint(0, high, shape, generator=_seeded_generator(seed))
    return idx.to(device)
