"""Repeated blocks captured as two, stamped, and planned once (tpshard.compiler.blocks*).

The stamped graph must compute what the model computes, the stamped plan must be the plan of
the full graph, and blocks that differ in any way the graph shows must be captured whole.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import tpshard
from tpshard import models
from tpshard.compiler import capture, capture_for_plan, make_plan, plan_captured
from tpshard.compiler.blocks import find_repeated
from tpshard.verify.launch import run_ranks

from _dist import rel_error, step_errors

tf = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

DT = torch.float64
N = 4  # blocks: two captured, two stamped


def hf(name: str, **extra: object) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, num_hidden_layers=N, num_attention_heads=4, max_position_embeddings=64)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=N, n_head=4,
                                                 bos_token_id=0, eos_token_id=0, **extra))
    elif name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                   **common, **extra))
    elif name == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                   head_dim=8, **common, **extra))
    else:
        model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, intermediate_size=64, **common, **extra))
    model = model.to(DT).eval()
    models.randomize_(model)
    return model


def mlp_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)) for _ in range(N)]).to(DT)


def reference(name: str) -> tuple[nn.Module, tuple]:
    model, args = models.build(name, n_layer=N)
    model = model.to(DT)
    models.randomize_(model)
    return model, args


IDS = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
CASES = {
    "hf-gpt2": lambda: (hf("gpt2"), (IDS,), {"use_cache": False}),
    "hf-llama": lambda: (hf("llama"), (IDS,), {"use_cache": False}),
    "hf-qwen3": lambda: (hf("qwen3"), (IDS,), {"use_cache": False}),
    "hf-bert": lambda: (hf("bert"), (IDS,), {}),
    "gpt": lambda: (*reference("gpt"), {}),
    "llama": lambda: (*reference("llama"), {}),
    "mlp-stack": lambda: (mlp_stack(), (torch.randn(3, 8, dtype=DT),), {}),
    "hf-mixtral": lambda: (moe("mixtral"), (IDS,), {"use_cache": False}),  # routed experts per block
    "hf-qwen2-moe": lambda: (moe("qwen2_moe"), (IDS,), {"use_cache": False}),
}


def moe(name: str) -> nn.Module:
    from test_moe import hf_model

    return hf_model(name, layers=N)


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_stamped_graph_and_plan_equal_the_full_ones(name: str) -> None:
    model, args, kwargs = CASES[name]()
    c = capture(model, args, kwargs)
    assert c.repeated is not None, c.note
    assert "stamped" in c.note
    # The stamped graph computes the model.
    torch.testing.assert_close(_logits(c.gm(*args, **kwargs)), _logits(model(*args, **kwargs)), rtol=1e-12, atol=0)
    whole = capture(model, args, kwargs, repeated_blocks=False)
    assert len(c.gm.graph.nodes) == len(whole.gm.graph.nodes)
    for world in (2, 4):
        stamped = plan_captured(c, world)
        assert not any("each block planned" in n for n in stamped.notes), stamped.notes
        # Planned once and stamped = planned over the full stamped graph, entry for entry.
        assert stamped.blocks == {"container": find_repeated(model).container, "count": N,
                                  "stamped_from": find_repeated(model).block(1), "planned_once": True}
        assert {**stamped.to_dict(), "blocks": {}} == {**make_plan(c.gm, c.ops, world, None, c.kind).to_dict(),
                                                       "blocks": {}}
        # ... and the same decisions as capturing every block (node names aside).
        full = make_plan(whole.gm, whole.ops, world, None, whole.kind)
        assert stamped.params == full.params and stamped.grads == full.grads
        assert [(m.path.split(":")[0], m.style) for m in stamped.modules.values()] == \
               [(m.path.split(":")[0], m.style) for m in full.modules.values()]
        assert sorted(e.kind for e in stamped.edits) == sorted(e.kind for e in full.edits)
        assert stamped.collective_counts() == full.collective_counts()


def test_find_repeated_needs_identical_blocks() -> None:
    stack = mlp_stack()
    assert find_repeated(stack).count == N
    assert find_repeated(nn.Sequential(*list(stack)[:2])) is None  # two blocks: nothing to stamp
    odd = mlp_stack()
    odd[2][0] = nn.Linear(8, 16)
    odd[2][2] = nn.Linear(16, 8)
    assert find_repeated(odd) is None  # a block with other shapes
    hooked = mlp_stack()
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert find_repeated(hooked) is None  # a hook can make any block different
    llama = hf("llama")
    assert find_repeated(llama).container == "model.layers"  # layer_idx differs: it is the index


class ScaledBlock(nn.Module):
    """Scales by 1/(index + 1): the index attribute is in the graph (as GPT-2's optional
    scale_attn_by_inverse_layer_idx puts layer_idx there)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x))) / (self.index + 1)


def test_blocks_the_graph_tells_apart_are_captured_whole() -> None:
    # Block 0 and block 1 differ at the constant, so stamping block 1 would give block 3 block
    # 1's scale: captured whole, and said.
    model = nn.Sequential(*[ScaledBlock(i) for i in range(N)]).to(DT)
    assert find_repeated(model) is not None  # the attribute is only the index ...
    x = torch.randn(3, 8, dtype=DT)
    c = capture(model, (x,))
    assert c.repeated is None and "captured whole" in c.note and "differ" in c.note, c.note  # ... the graph tells
    torch.testing.assert_close(c.gm(x), model(x), rtol=1e-12, atol=0)
    # An attribute that differs otherwise (GPT-2's per-layer scaling) is seen before capture.
    assert find_repeated(hf("gpt2", scale_attn_by_inverse_layer_idx=True)) is None


class KeepsEveryBlock(nn.Module):
    """Returns every block's output: the part after the blocks reads block 0."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = mlp_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        return torch.stack(outs).sum(0)


class IndexesBlocks(nn.Module):
    """Reads self.blocks[3]: the two-block capture fails, and the model is captured whole."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = mlp_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(N):
            x = self.blocks[i](x)
        return x


@pytest.mark.parametrize("cls", [KeepsEveryBlock, IndexesBlocks])
def test_models_stamping_cannot_follow_are_captured_whole(cls: type) -> None:
    model = cls().to(DT)
    x = torch.randn(3, 8, dtype=DT)
    c = capture(model, (x,))
    assert c.repeated is None and "captured whole" in c.note, c.note
    torch.testing.assert_close(c.gm(x), model(x), rtol=1e-12, atol=0)
    p = plan_captured(c, 2)
    assert len([m for m in p.modules.values() if m.style in ("column", "row")]) == 2 * N


def test_a_plan_is_applied_to_the_graph_it_was_made_on() -> None:
    model, args = reference("gpt")
    stamped = tpshard.plan(model, 2, example_inputs=args)
    assert stamped.blocks["count"] == N
    # A plan made on a whole capture (as every plan before stamping was) is applied to a whole
    # capture: its edits name that graph's nodes.
    whole = make_plan(*(lambda c: (c.gm, c.ops))(capture(model, args, repeated_blocks=False)), 2)
    assert not whole.blocks
    assert capture_for_plan(model, args, {}, stamped).repeated is not None
    assert capture_for_plan(model, args, {}, whole).repeated is None
    for plan in (stamped, whole):
        sharded = tpshard.parallelize(model, 2, example_inputs=args, plan=plan, group=tpshard.OfflineGroup(0, 2))
        assert sharded.get_parameter("h.3.mlp.c_fc.weight").shape[0] == model.h[3].mlp.c_fc.weight.shape[0] // 2
    # A stamped plan for a model whose blocks no longer stamp the same way is refused.
    other, _ = reference("gpt")
    other.h = nn.ModuleList(list(other.h)[:3])
    with pytest.raises(tpshard.PlanError, match="4 blocks of h stamped.*3 blocks of h"):
        tpshard.parallelize(other, 2, example_inputs=args, plan=stamped, group=tpshard.OfflineGroup(0, 2))


def test_shape_propagation_leaves_the_model_and_random_state_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    stats = copy.deepcopy(model[1].state_dict())
    x = torch.randn(6, 4)
    state = torch.random.get_rng_state()
    c = capture(model, (x,))
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert c.ops[-2].node.meta["tensor_meta"].shape == (6, 4)


def test_shapes_on_the_meta_device_equal_the_real_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    capture_module = importlib.import_module("tpshard.compiler.capture")
    model, args = models.build("gpt")
    real = capture(model, args)
    monkeypatch.setattr(capture_module, "_REAL_RUN_WORK", 0)  # as for a model too large to run
    meta = capture(model, args)
    shapes = lambda c: [(n.name, n.meta.get("tensor_meta")) for n in c.gm.graph.nodes]  # noqa: E731
    assert shapes(meta) == shapes(real)


def _parity(name: str, rank: int, world: int) -> dict:
    model, args, kwargs = CASES[name]()
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=args, example_kwargs=kwargs)
    plan = sharded.tpshard_plan
    errors, _, _ = step_errors(sharded, ref, lambda m: _logits(m(*args, **kwargs)), plan, rank, world)
    out2, ref2 = _logits(sharded(*args, **kwargs)), _logits(ref(*args, **kwargs))
    errors["after a step"] = rel_error(out2.detach(), ref2.detach())
    stamped = [k for k in plan.modules if k.startswith(("model.layers.3.", "transformer.h.3.", "h.3.", "3.",
                                                        "layers.3.", "bert.encoder.layer.3."))]
    return {"errors": errors, "stamped_rows": len(stamped), "capture_note": plan.notes}


def _body(rank: int, world: int, names: list[str]) -> list[dict]:
    return [_parity(n, rank, world) for n in names]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,names", [(2, ["hf-llama", "hf-gpt2", "gpt", "mlp-stack"]), (4, ["hf-llama"])])
def test_stamped_models_equal_the_original_on_real_ranks(world: int, names: list[str]) -> None:
    # (The in-process test above shows each stamped plan is the full graph's plan, for every case.)
    results = run_ranks(_body, world, names, timeout=360)
    for rank_results in results:
        for name, r in zip(names, rank_results):
            bad = {k: v for k, v in r["errors"].items() if not v <= 1e-10}
            assert not bad, f"{name} world {world}: {bad}"
            assert r["stamped_rows"] >= 2, (name, r)  # a stamped block is planned and sharded
