"""The model under verification: active dropout, and how each rank gets its copy (inherited
when forked; pickled, or rebuilt from its factory and filled with the parent's values, when
spawned). MODEL names and factories are resolved by :func:`tpshard.models.resolve_model`.
"""

from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tpshard.models.resolve import resolve_model
from tpshard.plan import Plan

__all__ = ["active_dropout"]

# ---------------------------------------------------------------------------------------------
# Dropout.

_DROPOUT_FUNCTIONS: dict[Any, tuple[str, str]] = {
    f: ("p", "training") for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                   F.feature_alpha_dropout)
}
_DROPOUT_FUNCTIONS.update({f: ("p", "train") for f in (
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
    torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default,  # torch.export graphs
    torch.ops.aten.feature_dropout.default, torch.ops.aten.alpha_dropout.default)})


def active_dropout(model: nn.Module, gm: fx.GraphModule | None = None) -> list[str]:
    """Where ``model`` draws random dropout masks: dropout modules with ``p > 0`` in training
    mode, and (in a captured graph ``gm``) functional dropout calls with ``p > 0`` and training on.

    Example::

        >>> active_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
        ['1 (Dropout, p=0.1)']
    """
    found = [f"{name or '<root>'} ({type(m).__name__}, p={m.p})" for name, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if gm is None:
        return found
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _DROPOUT_FUNCTIONS:
            continue
        p, training = _dropout_args(node)
        if p > 0 and training:
            found.append(f"{node.name} ({getattr(node.target, '__name__', node.target)}, p={p})")
    return found


def _dropout_args(node: fx.Node) -> tuple[float, bool]:
    p_name, train_name = _DROPOUT_FUNCTIONS[node.target]
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        p, training = bound.arguments[p_name], bound.arguments[train_name]
    except (TypeError, ValueError, KeyError):  # builtins: (input, p, train)
        p = node.kwargs.get(p_name, node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get(train_name, node.args[2] if len(node.args) > 2 else True)
    if isinstance(p, fx.Node) or isinstance(training, fx.Node):
        return 1.0, True  # decided at run time: assume it is active
    return float(p), bool(training)


# ---------------------------------------------------------------------------------------------
# How a rank gets the model.


@dataclass
class _Source:
    """How a rank gets the model: the object itself (fork: inherited; spawn: pickled), or a
    factory / built-in name that a spawned rank rebuilds, then fills with the parent's values."""

    model: nn.Module | None = None
    spec: str | None = None
    values: dict[str, Tensor] | None = None
    modes: dict[str, bool] | None = None

    def materialize(self, dtype: torch.dtype) -> nn.Module:
        if self.model is not None:
            return self.model
        assert self.spec is not None and self.values is not None and self.modes is not None
        model = resolve_model(self.spec, dtype=dtype)[0].to("cpu", dtype)
        with torch.no_grad():
            for name, t in _named_tensors(model).items():
                t.copy_(self.values[name])
        for name, m in model.named_modules():
            m.training = self.modes.get(name, m.training)
        return model


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _source_for(work: nn.Module, spec: str | None, spawn: bool) -> _Source:
    if not spawn:
        return _Source(model=work)
    if spec is not None:
        values = {k: v.detach().cpu() for k, v in _named_tensors(work).items()}
        return _Source(spec=spec, values=values, modes={n: m.training for n, m in work.named_modules()})
    try:
        pickle.dumps(work)
        for m in work.modules():
            _check_importable_in_child(type(m))
    except Exception as e:
        raise ValueError(
            f"verify: the model ({type(work).__module__}.{type(work).__qualname__}) cannot be sent to "
            f"spawned ranks: {type(e).__name__}: {e}. CUDA ranks are spawned, and a class defined inside a "
            "function (or under `if __name__ == '__main__':`) cannot be found there. Define the class at "
            "module level, pass an importable factory 'package.module:callable' instead of the model, or "
            "verify on device='cpu' (forked ranks inherit it)"
        ) from e
    return _Source(model=work)


def _check_importable_in_child(cls: type) -> None:
    """A spawned rank re-runs only the top level of ``__main__``: a class the script defines in
    a block (``if __name__ == "__main__":``) pickles here but is missing there."""
    if cls.__module__ != "__main__":
        return
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError) as e:
        raise pickle.PicklingError(f"class {cls.__qualname__} lives in an interactive __main__") from e
    if lines and lines[0][:1].isspace():
        raise pickle.PicklingError(f"class {cls.__qualname__} is defined inside a block of the main script")


# ---------------------------------------------------------------------------------------------
# What the ranks get.


@dataclass
class _Job:
    source: _Source
    dtype: torch.dtype
    device: str
    plan: Plan
    args: tuple
    kwargs: dict
    fresh_args: tuple
    fresh_kwargs: dict
    output_shapes: dict[str, tuple[int, ...]]
    backward: bool
    optimizer_step: bool
    localize: bool
    seed: int = 0
    tamper: Callable[[int, int, nn.Module], None] | None = None
