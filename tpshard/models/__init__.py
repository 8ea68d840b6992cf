"""Reference models for tpshard tests, benchmarks and the CLI; models without weights; MODEL.

These are plain single-device PyTorch models, written the way people usually
write them (no tensor parallelism inside).  Every model here can be traced
with ``torch.fx.symbolic_trace`` using the default leaf rules: there is no
Python control flow on tensor values or shapes, and every shape number comes
either from unpacking ``x.size()`` or from a literal config attribute.

Public names:

* :func:`mlp`, :func:`mlp_example_inputs`
* :class:`GPTConfig`, :class:`GPT`, :class:`Block`,
  :class:`CausalSelfAttention`, :class:`GPTMLP`, :func:`gpt_example_inputs`
* :class:`LlamaConfig`, :class:`Llama`, :class:`LlamaBlock`,
  :class:`LlamaAttention`, :class:`LlamaMLP`, :class:`RMSNorm`,
  :func:`rotate_half`, :func:`apply_rotary`, :func:`rotary_tables`,
  :func:`llama_example_inputs`
* :func:`randomize_`
* :data:`REFERENCE_MODELS`, :func:`build`
* :func:`empty_weights`, :func:`on_meta`, :func:`to_meta` (models without weights)
* :func:`resolve_model`, :func:`unpack_model`, :class:`ModelSpecError` (MODEL: a built-in name,
  ``package.module:callable``, a factory or a module)

They live in :mod:`tpshard.models.mlp_model`, :mod:`tpshard.models.gpt`,
:mod:`tpshard.models.llama`, :mod:`tpshard.models.registry` (:func:`randomize_`,
the registry), :mod:`tpshard.models.meta`, :mod:`tpshard.models.hf` (saved models: Hugging Face
directories, ``torch.save`` modules) and :mod:`tpshard.models.resolve`; import them from
``tpshard.models``.

Example:

>>> model, args = build("gpt", dtype=torch.float64)
>>> model(*args).shape
torch.Size([2, 8, 64])
"""

from __future__ import annotations

import torch  # noqa: F401  (the namespace doctest gives this package's docstring examples)

from tpshard._doctest import doctest_targets
from tpshard.models import _common, gpt, llama, mlp_model, registry
from tpshard.models.gpt import GPT, GPTMLP, Block, CausalSelfAttention, GPTConfig, gpt_example_inputs
from tpshard.models.llama import (
    Llama,
    LlamaAttention,
    LlamaBlock,
    LlamaConfig,
    LlamaMLP,
    RMSNorm,
    apply_rotary,
    llama_example_inputs,
    rotary_tables,
    rotate_half,
)
from tpshard.models.meta import empty_weights, on_meta, to_meta
from tpshard.models.mlp_model import ACTIVATIONS, mlp, mlp_example_inputs
from tpshard.models.registry import REFERENCE_MODELS, build, randomize_
from tpshard.models.resolve import ModelSpecError, resolve_model, unpack_model

__all__ = [
    "ACTIVATIONS",
    "mlp",
    "mlp_example_inputs",
    "GPTConfig",
    "CausalSelfAttention",
    "GPTMLP",
    "Block",
    "GPT",
    "gpt_example_inputs",
    "LlamaConfig",
    "RMSNorm",
    "rotate_half",
    "apply_rotary",
    "rotary_tables",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaBlock",
    "Llama",
    "llama_example_inputs",
    "randomize_",
    "REFERENCE_MODELS",
    "build",
    "empty_weights",
    "on_meta",
    "to_meta",
    "ModelSpecError",
    "resolve_model",
    "unpack_model",
]


__test__ = doctest_targets(_common, mlp_model, gpt, llama, registry)
