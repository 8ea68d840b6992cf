"""Offline tests for tpshard.layers (no ranks needed): argument errors, from_module semantics,
meta, repr, refusing to communicate without a process group, and the module's doctests."""

from __future__ import annotations

import copy
import doctest
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpshard import layers
from tpshard.comm import OfflineGroup
from tpshard.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

from _dist import DT


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda g: ColumnParallelLinear(4, 6, group=g),
         ["ColumnParallelLinear out_features=6", "world size 4", "[1, 2, 3, 6]"]),
        (lambda g: ColumnParallelLinear(4, 16, segments=(8, 4, 4), group=OfflineGroup(0, 8)),
         ["ColumnParallelLinear out_features=16", "segments [8, 4, 4]", "world size 8", "[1, 2, 4]"]),
        (lambda g: RowParallelLinear(10, 4, group=g),
         ["RowParallelLinear in_features=10", "world size 4", "[1, 2, 5, 10]"]),
        (lambda g: RowParallelLinear(18, 4, stride=3, group=g),
         ["RowParallelLinear in_features=18", "segments [6, 6, 6]", "[1, 2, 3, 6]"]),
        (lambda g: ParallelEmbedding(10, 6, group=g),
         ["ParallelEmbedding embedding_dim=6", "world size 4", "[1, 2, 3, 6]"]),
        (lambda g: VocabParallelEmbedding(50, 8, group=g),
         ["VocabParallelEmbedding num_embeddings=50", "world size 4", "[1, 2, 5, 10, 25, 50]"]),
    ],
)
def test_indivisible_sizes_name_the_argument(make: Callable, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make(OfflineGroup(0, 4))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_layout_argument_errors() -> None:
    with pytest.raises(ValueError, match="ColumnParallelLinear out_features=10: stride 3"):
        ColumnParallelLinear(4, 10, stride=3)
    with pytest.raises(ValueError, match="not both"):
        ColumnParallelLinear(4, 12, stride=3, segments=(4, 4, 4))
    with pytest.raises(ValueError, match="RowParallelLinear in_features=12: segments"):
        RowParallelLinear(12, 4, segments=(4, 4))
    with pytest.raises(ValueError, match="contiguous"):
        VocabParallelEmbedding.from_module(nn.Embedding(8, 2), stride=2)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        ColumnParallelLinear.from_module(nn.Embedding(8, 2))


def test_from_module_copies_exactly_and_owns_its_storage() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 8, dtype=DT)
    lin.weight.requires_grad_(False)
    layer = ColumnParallelLinear.from_module(lin, group=OfflineGroup(1, 2))
    torch.testing.assert_close(layer.weight, lin.weight[4:], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias[4:], rtol=0, atol=0)
    assert layer.weight.dtype == DT and not layer.weight.requires_grad and layer.bias.requires_grad
    before = layer.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
    row = RowParallelLinear.from_module(lin, group=OfflineGroup(0, 2))
    assert row.weight.is_contiguous() and row.bias.data_ptr() != lin.bias.data_ptr()
    emb = nn.Embedding(8, 4, padding_idx=3, dtype=torch.float16)
    v = VocabParallelEmbedding.from_module(emb, group=OfflineGroup(0, 2))
    assert v.weight.dtype == torch.float16 and v.local_padding_idx == 3
    v1 = VocabParallelEmbedding.from_module(emb, group=OfflineGroup(1, 2))
    assert v1.local_padding_idx is None and v1.padding_idx == 3
    # deep copies share the (uncopyable) group
    assert copy.deepcopy(layer).group is layer.group


def test_from_module_on_meta_is_instant() -> None:
    """A 7B-shaped (Llama) model on the meta device goes through from_module at once."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        emb = nn.Embedding(32000, 4096)
        attn = [nn.Linear(4096, 4096, bias=False) for _ in range(4)]
        gate_up = [nn.Linear(4096, 11008, bias=False) for _ in range(2)]
        down = nn.Linear(11008, 4096, bias=False)
    g = OfflineGroup(3, 8)
    out = [VocabParallelEmbedding.from_module(emb, group=g)]
    for _ in range(32):
        out += [ColumnParallelLinear.from_module(m, group=g, gather_output=False) for m in attn[:3]]
        out.append(RowParallelLinear.from_module(attn[3], group=g, input_is_parallel=True))
        out += [ColumnParallelLinear.from_module(m, group=g, gather_output=False) for m in gate_up]
        out.append(RowParallelLinear.from_module(down, group=g, input_is_parallel=True))
    assert time.perf_counter() - t0 < 5.0
    assert all(p.is_meta for m in out for p in m.parameters())
    assert out[0].weight.shape == (4000, 4096)
    assert out[1].weight.shape == (512, 4096) and out[4].weight.shape == (4096, 512)
    assert out[-1].weight.shape == (4096, 1376)
    assert out[1].gather_weight().shape == (4096, 4096)  # meta: no communication
    fresh = ColumnParallelLinear(4096, 4096, device="meta", group=g)
    assert fresh.weight.is_meta


def test_offline_layer_refuses_to_communicate() -> None:
    col = ColumnParallelLinear(4, 6, group=OfflineGroup(0, 2))
    with pytest.raises(RuntimeError, match="needs a running process group"):
        col(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="needs a running process group"):
        col.gather_weight()
    with pytest.raises(RuntimeError, match="needs a running process group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), group=OfflineGroup(0, 2))


def test_extra_repr_shows_global_and_local_sizes() -> None:
    s = repr(ColumnParallelLinear(4, 16, segments=(8, 4, 4), group=OfflineGroup(1, 2), device="meta"))
    for w in ("in_features=4", "out_features=16 (local 8)", "segments=(8, 4, 4)", "gather_output=True",
              "rank=1", "world_size=2"):
        assert w in s, s
    s = repr(RowParallelLinear(8, 3, input_is_parallel=True, group=OfflineGroup(0, 2), device="meta"))
    assert "in_features=8 (local 4)" in s and "input_is_parallel=True" in s
    s = repr(VocabParallelEmbedding(8, 3, padding_idx=1, group=OfflineGroup(1, 2), device="meta"))
    assert "8 (local 4..7)" in s and "padding_idx=1" in s
    assert "4 (local 2)" in repr(ParallelEmbedding(8, 4, group=OfflineGroup(1, 2), device="meta"))


def test_docstring_examples() -> None:
    result = doctest.testmod(layers, optionflags=doctest.ELLIPSIS, extraglobs={"torch": torch, "nn": nn, "F": F})
    assert result.attempted > 5 and result.failed == 0

