"""Reference nanoGPT-style model: :class:`GPT` and its parts, :func:`gpt_example_inputs`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpshard.models._common import _first_param, _randint_on

__all__ = ["GPTConfig", "CausalSelfAttention", "GPTMLP", "Block", "GPT", "gpt_example_inputs"]


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT` (defaults: a tiny test model).

    Example:

    >>> GPTConfig(n_layer=1).n_layer
    1
    """

    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    Attention is written out explicitly (matmul, mask, softmax, matmul).

    Example:

    >>> attn = CausalSelfAttention(GPTConfig())
    >>> attn(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        # A literal Python float: ``math.sqrt(k.size(-1))`` would not trace.
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer(
            "bias",
            mask.view(1, 1, config.block_size, config.block_size),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale
        # == self.bias[:, :, :T, :T]; narrow() because default fx tracing hands
        # buffers over as real tensors, which cannot be sliced by a traced T.
        mask = self.bias.narrow(2, 0, T).narrow(3, 0, T)
        att = att.masked_fill(mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTMLP(nn.Module):
    """GPT feed-forward: ``c_fc`` -> GELU -> ``c_proj`` -> dropout.

    Example:

    >>> GPTMLP(GPTConfig())(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block of :class:`GPT`.

    ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.

    Example:

    >>> Block(GPTConfig())(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = GPTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """nanoGPT-style decoder-only language model.

    ``forward(idx)`` maps a ``(B, T)`` long tensor of token ids (``T <=
    block_size``) to ``(B, T, vocab_size)`` logits.  With
    ``config.tie_weights`` the output head shares its weight Parameter with
    the token embedding (``lm_head.weight is wte.weight``).

    Example:

    >>> model = GPT(GPTConfig(n_layer=1))
    >>> model.lm_head.weight is model.wte.weight
    True
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 64])
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else GPTConfig()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)


def gpt_example_inputs(
    model: GPT, batch: int = 2, seq: int = 8, seed: int = 0
) -> tuple:
    """Example inputs ``(idx,)`` for :class:`GPT`.

    ``idx`` is a ``(batch, seq)`` long tensor of token ids in
    ``[0, vocab_size)`` on the model's device, drawn reproducibly from
    ``seed``.  Raises ``ValueError`` if ``seq > block_size``.

    Example:

    >>> (idx,) = gpt_example_inputs(GPT(), batch=3, seq=4)
    >>> idx.shape, idx.dtype
    (torch.Size([3, 4]), torch.int64)
    """
    cfg = model.config
    if seq > cfg.block_size:
        raise ValueError(f"seq ({seq}) exceeds block_size ({cfg.block_size})")
    device = _first_param(model).device
    return (_randint_on(cfg.vocab_size, (batch, seq), device, seed),)
