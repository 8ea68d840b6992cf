"""Tests for tpshard.models (reference models). CPU, float64, fast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tpshard.models import (
    GPT,
    REFERENCE_MODELS,
    CausalSelfAttention,
    GPTConfig,
    Llama,
    LlamaConfig,
    RMSNorm,
    apply_rotary,
    build,
    gpt_example_inputs,
    llama_example_inputs,
    mlp,
    mlp_example_inputs,
    randomize_,
    rotary_tables,
    rotate_half,
)

DT = torch.float64
NAMES = ["mlp", "gpt", "llama"]


def _inputs(name: str, model: nn.Module, batch: int, seq: int, seed: int = 0) -> tuple:
    if name == "mlp":
        return mlp_example_inputs(model, batch=batch, seed=seed)
    if name == "gpt":
        return gpt_example_inputs(model, batch=batch, seq=seq, seed=seed)
    return llama_example_inputs(model, batch=batch, seq=seq, seed=seed)


def _out_shape(name: str, model: nn.Module, batch: int, seq: int) -> tuple:
    if name == "mlp":
        return (batch, model[-1].out_features)
    return (batch, seq, model.config.vocab_size)


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[nn.Module, torch.fx.GraphModule]]:
    out = {}
    for name in NAMES:
        model, _ = build(name, dtype=DT)
        out[name] = (model, torch.fx.symbolic_trace(model))
    return out


# ---------------------------------------------------------------------------
# Forward / tracing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_build_default_forward(name):
    model, args = build(name, dtype=DT)
    assert isinstance(args, tuple)
    out = model(*args)
    assert out.dtype == DT
    assert torch.isfinite(out).all()
    assert all(p.dtype == DT for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("seq", [1, 5, 8])
def test_forward_shapes_and_trace_match(built, name, batch, seq):
    model, traced = built[name]
    args = _inputs(name, model, batch, seq, seed=batch * 10 + seq)
    expected = model(*args)
    assert expected.shape == _out_shape(name, model, batch, seq)
    # One trace, reused for every batch/seq: shapes must not be baked in.
    torch.testing.assert_close(traced(*args), expected)


@pytest.mark.parametrize("name", NAMES)
def test_trace_keeps_module_structure(built, name):
    model, traced = built[name]
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= targets
    # No stray constants: buffers are referenced by name.
    consts = [n.target for n in traced.graph.nodes if n.op == "get_attr"]
    assert not any("_tensor_constant" in str(t) for t in consts)


def test_full_block_size_and_max_seq():
    gpt, _ = build("gpt", dtype=DT, block_size=8)
    (idx,) = gpt_example_inputs(gpt, seq=8)
    assert gpt(idx).shape == (2, 8, 64)
    with pytest.raises(ValueError):
        gpt_example_inputs(gpt, seq=9)
    llama, _ = build("llama", dtype=DT, max_seq=6)
    assert llama(llama_example_inputs(llama, seq=6)[0]).shape == (2, 6, 64)
    with pytest.raises(ValueError):
        llama_example_inputs(llama, seq=7)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


def test_mlp_layout():
    m = mlp(8, (16, 12), 4, activation="relu", bias=False)
    kinds = [type(layer).__name__ for layer in m]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert all(layer.bias is None for layer in m if isinstance(layer, nn.Linear))
    assert [layer.out_features for layer in m if isinstance(layer, nn.Linear)] == [16, 12, 4]
    single = mlp(8, (), 4)
    assert len(single) == 1 and isinstance(single[0], nn.Linear)
    with pytest.raises(ValueError):
        mlp(activation="nope")


def test_mlp_example_inputs_follow_model():
    m = mlp(5, (7,), 3).to(DT)
    (x,) = mlp_example_inputs(m, batch=6, seed=1)
    assert x.shape == (6, 5) and x.dtype == DT
    torch.testing.assert_close(x, mlp_example_inputs(m, batch=6, seed=1)[0])
    assert not torch.equal(x, mlp_example_inputs(m, batch=6, seed=2)[0])


def test_mlp_build_overrides():
    model, (x,) = build("mlp", dtype=DT, in_features=3, hidden=(5,), out_features=2,
                        activation="silu", batch=7)
    assert x.shape == (7, 3)
    assert model(x).shape == (7, 2)
    assert isinstance(model[1], nn.SiLU)


# ---------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------


def test_gpt_tying_and_randomize():
    model = GPT(GPTConfig())
    assert model.lm_head.weight is model.wte.weight
    randomize_(model, seed=3)
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # de-duplicated: filled once

    built_model, _ = build("gpt", dtype=DT)
    assert built_model.lm_head.weight is built_model.wte.weight
    assert built_model.wte.weight.dtype == DT

    untied = GPT(GPTConfig(tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight


def test_gpt_standard_init():
    model = GPT(GPTConfig())
    attn = model.h[0].attn
    assert torch.count_nonzero(attn.c_attn.bias) == 0
    assert 0.01 < attn.c_attn.weight.std().item() < 0.03
    torch.testing.assert_close(model.ln_f.weight, torch.ones(32))


def test_randomize_fills_everything_reproducibly():
    for cls in (GPT, Llama):
        a = randomize_(cls(), seed=5)
        b = randomize_(cls(), seed=5)
        c = randomize_(cls(), seed=6)
        for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
            assert torch.equal(pa, pb), name
            assert not torch.equal(pa, pc), name
            if pa.dim() == 1:
                # biases non-zero; norm weights near 1 but not all 1
                assert not torch.all(pa == 0), name
                assert not torch.all(pa == 1), name
            else:
                assert 0.05 < pa.std().item() < 0.5, name
    gpt = randomize_(GPT(), seed=0)
    assert abs(gpt.ln_f.weight.mean().item() - 1.0) < 0.1
    assert gpt.h[0].attn.c_attn.bias.abs().max() > 0


def test_randomize_independent_of_dtype():
    m32, _ = build("gpt", dtype=torch.float32, seed=4)
    m64, _ = build("gpt", dtype=DT, seed=4)
    for p32, p64 in zip(m32.parameters(), m64.parameters()):
        torch.testing.assert_close(p32.to(DT), p64)


def test_gpt_attention_matches_sdpa():
    cfg = GPTConfig()
    attn = randomize_(CausalSelfAttention(cfg)).to(DT)
    x = torch.randn(3, 7, cfg.n_embd, dtype=DT)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), ref)
    assert math.isclose(attn.scale, 1 / math.sqrt(cfg.n_embd // cfg.n_head))


def test_gpt_dropout_configurable():
    model = GPT(GPTConfig(dropout=0.25))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    # drop + 2 layers * (attn_dropout, resid_dropout, mlp dropout)
    assert len(drops) == 1 + 2 * 3
    assert all(d.p == 0.25 for d in drops)
    assert all(d.p == 0.0 for d in GPT().modules() if isinstance(d, nn.Dropout))
    # Dropout stays a leaf module in the trace.
    traced = torch.fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"drop", "h.0.attn.attn_dropout", "h.1.mlp.dropout"} <= called


def test_gpt_no_bias_config():
    model, (idx,) = build("gpt", dtype=DT, bias=False)
    assert model.h[0].attn.c_attn.bias is None
    assert model.ln_f.bias is None
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(idx), model(idx))


# ---------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_llama_gqa_variants(n_kv_head):
    model, (idx,) = build("llama", dtype=DT, n_kv_head=n_kv_head, batch=3, seq=6)
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features == n_kv_head * attn.head_dim
    assert attn.n_rep == 4 // n_kv_head
    out = model(idx)
    assert out.shape == (3, 6, 64)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(idx), out)


def test_llama_gqa_equals_mha_with_repeated_kv():
    gqa, (idx,) = build("llama", dtype=DT, n_kv_head=2, seed=1)
    mha, _ = build("llama", dtype=DT, n_kv_head=4, seed=2)
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    n_rep = 2
    for key, w in list(sd.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # HF repeat_kv: query head h uses kv head h // n_rep.
            heads = w.view(2, hd, -1)
            sd[key] = heads.repeat_interleave(n_rep, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    torch.testing.assert_close(mha(idx), gqa(idx))


def test_llama_invalid_config():
    with pytest.raises(ValueError):
        LlamaConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError):
        LlamaConfig(hidden_size=30, n_head=4)


def test_llama_tie_weights_and_buffers():
    model, (idx,) = build("llama", dtype=DT, tie_weights=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.cos.shape == (64, 8) and model.cos.dtype == DT
    assert "cos" not in model.state_dict()  # non-persistent
    assert Llama().lm_head.weight is not Llama().embed_tokens.weight


def test_rmsnorm_and_rotate_half():
    norm = RMSNorm(4, eps=0.0).to(DT)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=DT)
    torch.testing.assert_close(norm(x), torch.tensor([[1.0, -2.0, 3.0, -4.0]], dtype=DT))
    torch.testing.assert_close(
        rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0])
    )


def test_llama_rotary_is_relative():
    # RoPE: <rot(q, m), rot(k, n)> depends only on m - n.
    hd, T = 8, 6
    cos, sin = rotary_tables(hd, T)
    cos, sin = cos.to(DT), sin.to(DT)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, hd, dtype=DT, generator=g).expand(1, 1, T, hd)
    k = torch.randn(1, 1, 1, hd, dtype=DT, generator=g).expand(1, 1, T, hd)
    scores = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1)
    s = scores[0, 0]
    torch.testing.assert_close(s[1:, 1:], s[:-1, :-1])
    assert not torch.allclose(s[0, 0], s[0, 1])
    torch.testing.assert_close(cos[0], torch.ones(hd, dtype=DT))


# ---------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_causal(built, name):
    model, traced = built[name]
    (idx,) = _inputs(name, model, batch=2, seq=8)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % model.config.vocab_size
    for fn in (model, traced):
        a, b = fn(idx), fn(changed)
        torch.testing.assert_close(a[:, :5], b[:, :5])
        assert not torch.allclose(a[:, 5:], b[:, 5:])


# ---------------------------------------------------------------------------
# Registry / build
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registry_factories_zero_arg(name):
    model, args = REFERENCE_MODELS[name]()
    assert isinstance(model, nn.Module) and isinstance(args, tuple)
    assert next(model.parameters()).dtype == torch.float32
    model(*args)


@pytest.mark.parametrize("name", NAMES)
def test_build_meta_allocates_nothing(name):
    model, args = build(name, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert all(a.is_meta for a in args)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if name == "gpt":
        assert model.lm_head.weight is model.wte.weight
        assert args[0].dtype == torch.long and args[0].shape == (2, 8)
    # Still traceable (tracing touches no data).
    torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("name", NAMES)
def test_build_reproducible(name):
    m1, a1 = build(name, dtype=DT, seed=7)
    m2, a2 = build(name, dtype=DT, seed=7)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    for x1, x2 in zip(a1, a2):
        assert torch.equal(x1, x2)
    torch.testing.assert_close(m1(*a1), m2(*a2))


def test_build_errors():
    with pytest.raises(ValueError, match="gpt"):
        build("resnet")
    with pytest.raises(ValueError, match="n_embd"):
        build("gpt", not_a_field=1)
    with pytest.raises(ValueError):
        build("mlp", n_layer=3)
    with pytest.raises(ValueError):
        build("mlp", seq=4)


def test_build_config_overrides_and_batch_seq():
    model, (idx,) = build("gpt", dtype=DT, n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                          batch=3, seq=5)
    assert len(model.h) == 1 and model.config.n_head == 2
    assert idx.shape == (3, 5) and int(idx.max()) < 50 and int(idx.min()) >= 0
    assert model(idx).shape == (3, 5, 50)
