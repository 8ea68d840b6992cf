"""Parameter products that are not ``nn.Linear``, described as linear ops with their split dims
read from the graph (see the ``linear`` kind of :mod:`tpshard.compiler.ir`):

- ``einsum`` of one activation and one parameter: ``"btd,dhk->bthk"`` is a column linear whose
  split label is the parameter's first label that the activation lacks (h: the heads);
  ``"bthk,hkd->btd"`` is a row linear over the activation's first contracted label;
- 1x1 convolutions (stride 1, no padding, one group): channels are dim 1 of input and output.

Each gives the attrs of a linear op (no Op here: :mod:`tpshard.compiler.ir` and
:mod:`tpshard.compiler.ir_aten` build it): ``in_dim`` (the input dim a row split contracts), ``out_dim`` (the output dim a
column split splits), ``w_in`` / ``w_out`` (the weight dims split as row / column).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["einsum_linear", "conv_linear", "is_pointwise_conv"]


def einsum_linear(equation: Any, operands: list, weight_name: Any, ndim: Any) -> tuple[Any, dict] | None:
    """(the activation, the linear's attrs), or None (the op stays opaque). ``weight_name(o)``:
    the parameter name of an operand, or None; ``ndim(o)``: its number of dims. One activation
    and one parameter, no repeated or ellipsis labels."""
    if not isinstance(equation, str) or "." in equation or "->" not in equation or len(operands) != 2:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    names = [weight_name(o) for o in operands]
    if sum(n is not None for n in names) != 1:
        return None
    wi = 0 if names[0] is not None else 1
    xs, ws = terms[1 - wi], terms[wi]
    if any(len(set(t)) != len(t) for t in (xs, ws, out)):
        return None
    x = operands[1 - wi]
    if len(xs) != ndim(x) or len(ws) != ndim(operands[wi]):
        return None
    contracted = [c for c in xs if c in ws and c not in out]
    free = [c for c in ws if c not in xs and c in out]
    if not contracted or not free or any(c not in xs and c not in ws for c in out):
        return None
    row, col = contracted[0], free[0]
    return x, {"weight": names[wi], "bias": None, "transposed": False, "in_dim": xs.index(row),
               "w_in": ws.index(row), "out_dim": out.index(col), "w_out": ws.index(col)}


def is_pointwise_conv(m: Any) -> bool:
    """A 1x1 convolution: a linear over the channels at every position."""
    return isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and m.groups == 1 \
        and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) \
        and all(p == 0 for p in (m.padding if not isinstance(m.padding, str) else (0,))) \
        and m.padding_mode == "zeros"


def conv_linear(weight: str, bias: str | None) -> dict:
    """A 1x1 convolution's attrs: channels are dim 1 of input and output, dim 0 / 1 of the weight."""
    return {"weight": weight, "bias": bias, "transposed": False, "conv": True,
            "in_dim": 1, "w_in": 1, "out_dim": 1, "w_out": 0}
