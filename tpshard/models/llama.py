"""Reference Llama-style model (RMSNorm, RoPE, GQA, SwiGLU): :class:`Llama` and its parts,
the rotary helpers, :func:`llama_example_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpshard.models._common import _first_param, _randint_on

__all__ = [
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
]


@dataclass
class LlamaConfig:
    """Hyper-parameters of :class:`Llama` (defaults: a tiny test model).

    ``n_kv_head < n_head`` gives grouped-query attention; ``n_head`` must be
    a multiple of ``n_kv_head``.

    Example:

    >>> LlamaConfig().hidden_size // LlamaConfig().n_head
    8
    """

    vocab_size: int = 64
    hidden_size: int = 32
    intermediate_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    rope_theta: float = 10000.0
    max_seq: int = 64
    rms_eps: float = 1e-6
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_head != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of "
                f"n_kv_head ({self.n_kv_head})"
            )
        if (self.hidden_size // self.n_head) % 2 != 0:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        """Per-head width, ``hidden_size // n_head``."""
        return self.hidden_size // self.n_head


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale ``weight``.

    ``x * rsqrt(mean(x**2, -1) + eps) * weight``.

    Example:

    >>> norm = RMSNorm(8)
    >>> norm(torch.randn(2, 8)).shape
    torch.Size([2, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: ``(x1, x2) -> (-x2, x1)``.

    Example:

    >>> rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor([-3., -4.,  1.,  2.])
    """
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary position embedding to ``x`` of shape ``(B, H, T, D)``.

    ``cos``/``sin`` have shape ``(T, D)`` and are broadcast as
    ``(1, 1, T, D)``.

    Example:

    >>> cos, sin = rotary_tables(8, 5)
    >>> apply_rotary(torch.randn(2, 4, 5, 8), cos, sin).shape
    torch.Size([2, 4, 5, 8])
    """
    cos = cos.unsqueeze(0).unsqueeze(0)
    sin = sin.unsqueeze(0).unsqueeze(0)
    return x * cos + rotate_half(x) * sin


def rotary_tables(
    head_dim: int, max_seq: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style rotary ``(cos, sin)`` tables, each of shape ``(max_seq, head_dim)``.

    Computed in float64 and returned in the default dtype (on the default
    device, so this allocates nothing under ``torch.device("meta")``).

    Example:

    >>> cos, sin = rotary_tables(8, 16)
    >>> cos.shape, bool(cos[0].eq(1).all())
    (torch.Size([16, 8]), True)
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    )
    t = torch.arange(max_seq, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    dtype = torch.get_default_dtype()
    return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaAttention(nn.Module):
    """Llama attention: separate q/k/v/o projections, RoPE, GQA, SDPA.

    ``forward(x, cos, sin)`` with ``x`` of shape ``(B, T, hidden)`` and
    ``cos``/``sin`` of shape ``(T, head_dim)``.

    Example:

    >>> cfg = LlamaConfig()
    >>> cos, sin = rotary_tables(cfg.head_dim, 5)
    >>> LlamaAttention(cfg)(torch.randn(2, 5, 32), cos, sin).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.n_rep = config.n_head // config.n_kv_head
        hd = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, config.hidden_size, bias=False)

    def _repeat_kv(self, x: torch.Tensor, B: Any, T: Any) -> torch.Tensor:
        # Branch on a config int only (trace-safe), like HF's repeat_kv.
        if self.n_rep == 1:
            return x
        x = x[:, :, None, :, :].expand(B, self.n_kv_head, self.n_rep, T, self.head_dim)
        return x.reshape(B, self.n_head, T, self.head_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        k = self._repeat_kv(k, B, T)
        v = self._repeat_kv(v, B, T)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Example:

    >>> LlamaMLP(LlamaConfig())(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm Llama decoder layer.

    Example:

    >>> cfg = LlamaConfig()
    >>> cos, sin = rotary_tables(cfg.head_dim, 5)
    >>> LlamaBlock(cfg)(torch.randn(2, 5, 32), cos, sin).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Llama(nn.Module):
    """Llama-style decoder-only language model (RMSNorm, RoPE, GQA, SwiGLU).

    ``forward(idx)`` maps a ``(B, T)`` long tensor (``T <= max_seq``) to
    ``(B, T, vocab_size)`` logits.  Rotary tables are non-persistent buffers
    ``cos``/``sin`` of shape ``(max_seq, head_dim)``.

    Example:

    >>> model = Llama(LlamaConfig(n_layer=1))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 64])
    """

    def __init__(self, config: LlamaConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else LlamaConfig()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(config.head_dim, config.max_seq, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        # == self.cos[:T]; see CausalSelfAttention.forward for why narrow().
        cos = self.cos.narrow(0, 0, T)
        sin = self.sin.narrow(0, 0, T)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.lm_head(x)


def llama_example_inputs(
    model: Llama, batch: int = 2, seq: int = 8, seed: int = 0
) -> tuple:
    """Example inputs ``(idx,)`` for :class:`Llama`.

    ``idx`` is a ``(batch, seq)`` long tensor of token ids in
    ``[0, vocab_size)`` on the model's device, drawn reproducibly from
    ``seed``.  Raises ``ValueError`` if ``seq > max_seq``.

    Example:

    >>> (idx,) = llama_example_inputs(Llama(), batch=3, seq=4)
    >>> idx.shape
    torch.Size([3, 4])
    """
    cfg = model.config
    if seq > cfg.max_seq:
        raise ValueError(f"seq ({seq}) exceeds max_seq ({cfg.max_seq})")
    device = _first_param(model).device
    return (_randint_on(cfg.vocab_size, (batch, seq), device, seed),)
