"""The reference-model registry (:data:`REFERENCE_MODELS`, :func:`build`) and
:func:`randomize_`, which fills a model with reproducible non-trivial weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from tpshard.models._common import _seeded_generator
from tpshard.models.gpt import GPT, GPTConfig, gpt_example_inputs
from tpshard.models.llama import Llama, LlamaConfig, RMSNorm, llama_example_inputs
from tpshard.models.mlp_model import mlp, mlp_example_inputs

__all__ = ["randomize_", "REFERENCE_MODELS", "build"]


# ---------------------------------------------------------------------------
# Randomization
# ---------------------------------------------------------------------------


_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    RMSNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every floating parameter of ``model`` with reproducible random values.

    Unlike the standard init (zero biases, unit norm weights), every
    parameter gets a non-trivial value so that tests catch bugs that drop or
    duplicate biases and norm affine parameters:

    * norm weights (LayerNorm/RMSNorm/...): ``1 + 0.1 * N(0, 1)``;
    * other 1-D parameters (biases, norm biases): ``0.1 * N(0, 1)``;
    * matrices: ``N(0, 1) / sqrt(fan_in)`` with ``fan_in = numel / shape[0]``
      for N-D weights and ``shape[-1]`` for 2-D ones (0.177 for width 32, so
      activations keep a moderate scale at any width).

    Values are drawn in float32 on the CPU from a generator seeded with
    ``seed``, in ``named_parameters()`` order, and copied in place, so the
    result does not depend on the model's dtype/device and tied Parameters
    (shared objects) are filled once and stay tied.  Parameters on the meta
    device and non-floating parameters are left alone.  Returns ``model``.

    Example:

    >>> model = randomize_(GPT(), seed=1)
    >>> model.lm_head.weight is model.wte.weight
    True
    >>> bool(model.h[0].attn.c_attn.bias.abs().sum() > 0)
    True
    """
    gen = _seeded_generator(seed)
    norm_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, _NORM_TYPES) and getattr(m, "weight", None) is not None
    }
    for _, p in model.named_parameters():  # de-duplicates tied parameters
        if not p.is_floating_point() or p.device.type == "meta":
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.dim() <= 1:
            values = 1.0 + 0.1 * noise if id(p) in norm_weights else 0.1 * noise
        elif p.dim() == 2:
            values = noise / math.sqrt(p.shape[-1])
        else:
            values = noise / math.sqrt(max(1, p.numel() // p.shape[0]))
        p.copy_(values)
    return model


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def _finish(
    construct: Callable[[], nn.Module],
    make_inputs: Callable[..., tuple],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    input_kwargs: dict[str, Any],
) -> tuple[nn.Module, tuple]:
    device = torch.device(device)
    with torch.device(device):
        model = construct()
    randomize_(model, seed=seed)  # no-op on meta
    model = model.to(dtype=dtype)  # floating params/buffers only
    model.eval()
    return model, make_inputs(model, seed=seed, **input_kwargs)


def _make_config(cls: type, overrides: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}"
        )
    return cls(**overrides)


def _make_mlp(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int | None = None,
    seq: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, tuple]:
    """Registry factory for ``"mlp"``: overrides go to :func:`mlp`."""
    known = {"in_features", "hidden", "out_features", "activation", "bias"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown mlp() arguments {unknown}; known: {sorted(known)}")
    if seq is not None:
        raise ValueError("the 'mlp' model takes no sequence length (seq)")
    kw = {} if batch is None else {"batch": batch}
    return _finish(
        lambda: mlp(**overrides),
        mlp_example_inputs,
        dtype=dtype,
        device=device,
        seed=seed,
        input_kwargs=kw,
    )


def _seq_kwargs(batch: int | None, seq: int | None) -> dict[str, int]:
    kw: dict[str, int] = {}
    if batch is not None:
        kw["batch"] = batch
    if seq is not None:
        kw["seq"] = seq
    return kw


def _transformer_factory(model_cls: type, config_cls: type, example_inputs: Callable, max_len: str) -> Callable:
    """A registry factory for a transformer: overrides go to ``config_cls``; the default example
    length is 8, clipped to the config's ``max_len`` attribute."""

    def make(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
             batch: int | None = None, seq: int | None = None, **overrides: Any) -> tuple[nn.Module, tuple]:
        config = _make_config(config_cls, overrides)
        if seq is None:
            seq = min(8, getattr(config, max_len))
        return _finish(lambda: model_cls(config), example_inputs, dtype=dtype, device=device, seed=seed,
                       input_kwargs=_seq_kwargs(batch, seq))

    make.__doc__ = f"Registry factory for {model_cls.__name__}: overrides go to :class:`{config_cls.__name__}`."
    return make


_make_gpt = _transformer_factory(GPT, GPTConfig, gpt_example_inputs, "block_size")
_make_llama = _transformer_factory(Llama, LlamaConfig, llama_example_inputs, "max_seq")


#: Name -> factory.  Each factory can be called with no arguments and returns
#: ``(model, example_args)``; it accepts the same keyword arguments as
#: :func:`build` (minus ``name``).
REFERENCE_MODELS: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "mlp": _make_mlp,
    "gpt": _make_gpt,
    "llama": _make_llama,
}


def build(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int | None = None,
    seq: int | None = None,
    **config_overrides: Any,
) -> tuple[nn.Module, tuple]:
    """Build a reference model and its example inputs.

    The model is constructed directly on ``device`` (under
    ``torch.device(device)``, so ``device="meta"`` allocates no storage),
    filled by :func:`randomize_` with ``seed`` (skipped on meta), converted
    to ``dtype`` (floating parameters and buffers only), and put in eval
    mode.  ``config_overrides`` go to :class:`GPTConfig` / :class:`LlamaConfig`
    or to :func:`mlp`; ``batch``/``seq`` size the example inputs (``seq``
    is not accepted for ``"mlp"``; by default it is
    ``min(8, block_size/max_seq)``).  Unknown names or overrides raise
    ``ValueError``.

    Returns ``(model, example_args)`` where ``example_args`` is a tuple to
    call ``model(*example_args)`` with.

    Example:

    >>> model, (idx,) = build("llama", n_kv_head=4, batch=3, seq=5)
    >>> model(idx).shape
    torch.Size([3, 5, 64])
    >>> model, _ = build("gpt", device="meta")
    >>> model.wte.weight.is_meta
    True
    """
    if name not in REFERENCE_MODELS:
        raise ValueError(
            f"unknown reference model {name!r}; known: {sorted(REFERENCE_MODELS)}"
        )
    return REFERENCE_MODELS[name](
        dtype=dtype,
        device=device,
        seed=seed,
        **_seq_kwargs(batch, seq),
        **config_overrides,
    )
