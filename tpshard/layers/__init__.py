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

Modules: :mod:`tpshard.layers.linear` (the linear layers), :mod:`tpshard.layers.embedding`
(both embeddings and ``vocab_parallel_lookup``), :mod:`tpshard.layers.cross_entropy`, and
:mod:`tpshard.layers._common` (``INIT_FUNCTIONS``, initialization and the shared base class).
Import from ``tpshard.layers``.
"""

from __future__ import annotations

# torch, nn and F: the namespace doctest gives this package's docstring examples.
import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401
from torch import nn  # noqa: F401

from tpshard._doctest import doctest_targets
from tpshard.layers import _common, cross_entropy, embedding, linear
from tpshard.layers._common import INIT_FUNCTIONS
from tpshard.layers.cross_entropy import vocab_parallel_cross_entropy
from tpshard.layers.embedding import ParallelEmbedding, VocabParallelEmbedding, vocab_parallel_lookup
from tpshard.layers.linear import ColumnParallelLinear, RowParallelLinear

__all__ = [
    "INIT_FUNCTIONS",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelEmbedding",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_lookup",
]


__test__ = doctest_targets(_common, linear, embedding, cross_entropy)
