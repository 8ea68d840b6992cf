"""Reference models for tpshard tests, benchmarks and the CLI.

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

Example:

>>> model, args = build("gpt", dtype=torch.float64)
>>> model(*args).shape
torch.Size([2, 8, 64])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
]


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# GPT (nanoGPT style)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------


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


def _make_gpt(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int | None = None,
    seq: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, tuple]:
    """Registry factory for ``"gpt"``: overrides go to :class:`GPTConfig`."""
    config = _make_config(GPTConfig, overrides)
    if seq is None:  # default example length, clipped to what the model takes
        seq = min(8, config.block_size)
    return _finish(
        lambda: GPT(config),
        gpt_example_inputs,
        dtype=dtype,
        device=device,
        seed=seed,
        input_kwargs=_seq_kwargs(batch, seq),
    )


def _make_llama(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int | None = None,
    seq: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, tuple]:
    """Registry factory for ``"llama"``: overrides go to :class:`LlamaConfig`."""
    config = _make_config(LlamaConfig, overrides)
    if seq is None:  # default example length, clipped to what the model takes
        seq = min(8, config.max_seq)
    return _finish(
        lambda: Llama(config),
        llama_example_inputs,
        dtype=dtype,
        device=device,
        seed=seed,
        input_kwargs=_seq_kwargs(batch, seq),
    )


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
