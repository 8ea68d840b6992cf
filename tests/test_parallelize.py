"""End to end on real gloo ranks: every reference model, sharded, equals the original in
float64 — outputs, every parameter gradient, parameters after an optimizer step, a second
forward — and uses the minimal number of collectives."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode

import tpshard
from tpshard import models
from tpshard.verify.launch import run_ranks

RTOL = 1e-10

ALL_REDUCE = torch.ops.c10d.allreduce_
ALL_GATHER = torch.ops.c10d._allgather_base_


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _counts(mode: CommDebugMode) -> dict[str, int]:
    c = mode.get_comm_counts()
    return {"all_reduce": c.get(ALL_REDUCE, 0), "all_gather": c.get(ALL_GATHER, 0),
            "total": mode.get_total_counts()}


def _check_model(name: str, rank: int, world: int, overrides: dict | None = None, **config) -> dict:
    """Compare one model's sharded and original training step; return the measurements."""
    torch.manual_seed(0)
    model, args = models.build(name, dtype=torch.float64, batch=3, **config)
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=args, overrides=overrides)
    plan = sharded.tpshard_plan
    # The original is untouched by parallelize.
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)

    with CommDebugMode() as fwd_mode:
        out = sharded(*args)
    ref_out = ref(*args)
    assert out.shape == ref_out.shape
    errors = {"output": _rel(out, ref_out)}

    # A loss that weights every output element differently, so every gradient path counts.
    weights = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with CommDebugMode() as bwd_mode:
        (out * weights).sum().backward()
    (ref_out * weights).sum().backward()

    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for pname, p in sharded.named_parameters():
        shard = plan.params[pname]
        expect = shard.shard(ref_params[pname].grad, rank, world)
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.shape == expect.shape, pname
        errors[f"grad {pname}"] = _rel(p.grad, expect)

    opt = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    ref_opt.step()
    for pname, p in sharded.named_parameters():
        expect = plan.params[pname].shard(ref_params[pname].detach(), rank, world)
        errors[f"step {pname}"] = _rel(p.detach(), expect)

    # A second forward at another batch size and sequence length.
    g = torch.Generator().manual_seed(7)
    if name == "mlp":
        args2 = (torch.randn(5, args[0].shape[1], generator=g, dtype=torch.float64),)
    else:
        args2 = (torch.randint(0, model_vocab(ref), (5, 6), generator=g),)
    errors["second forward"] = _rel(sharded(*args2), ref(*args2))

    local = sum(p.numel() for p in sharded.parameters())
    full = sum(p.numel() for p in ref.parameters())
    norms = sum(p.numel() for n, p in ref.named_parameters() if plan.params[n].dim is None)
    return {"errors": errors, "fwd": _counts(fwd_mode), "bwd": _counts(bwd_mode),
            "local": local, "full": full, "replicated": norms,
            # replicated kv heads: a k/v weight's rows are 1/(world/replicas) of it, not 1/world
            "kv_extra": sum(math.prod(s.shape) * (s.replicas - 1) // world for s in plan.params.values())}


def model_vocab(model: torch.nn.Module) -> int:
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return emb.num_embeddings


CASES = {
    "mlp": dict(),
    "gpt": dict(),
    "llama": dict(),
}


def _body(rank: int, world: int, cases: list[tuple[str, dict]]) -> list[dict]:
    return [_check_model(name, rank, world, **cfg) for name, cfg in cases]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_reference_models_equal_original(world: int) -> None:
    cases = [("mlp", {}), ("gpt", {}), ("llama", {}), ("llama", {"n_kv_head": 4})]
    results = run_ranks(_body, world, cases, timeout=200)
    for rank_results in results:
        for (name, cfg), r in zip(cases, rank_results):
            bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
            assert not bad, f"{name} {cfg} world {world}: {bad}"
    # Collective counts (rank 0; every rank issues the same collectives).
    for (name, cfg), r in zip(cases, results[0]):
        if world == 1:
            assert r["fwd"]["total"] == 0 and r["bwd"]["total"] == 0
            continue
        n_layer = 2
        if name == "mlp":
            # Linear, act, Linear, act, Linear: a column/row pair, then a gathered column.
            assert r["fwd"] == {"all_reduce": 1, "all_gather": 1, "total": 2}, r
            assert r["bwd"]["total"] == 1, r  # the last column's copy (the input needs no grad)
        else:
            # Per block: one all-reduce for attention and one for the MLP, each direction;
            # the embedding adds one forward all-reduce, the head one all-gather forward and
            # one all-reduce backward.
            # Grouped-query attention with fewer kv heads than ranks replicates the kv heads
            # (each rank holds the one its q heads use): k's and v's gradients are all-reduced
            # among the ranks that hold the same head, one subgroup all-reduce each per layer.
            kv_replicated = name == "llama" and cfg.get("n_kv_head", 2) < world
            assert r["fwd"] == {"all_reduce": 2 * n_layer + 1, "all_gather": 1, "total": 2 * n_layer + 2}, r
            subgroup = 2 * n_layer if kv_replicated else 0
            assert r["bwd"] == {"all_reduce": 2 * n_layer + 1 + subgroup, "all_gather": 0,
                                "total": 2 * n_layer + 1 + subgroup}, r
        # Each rank holds at most 1/N of the split weights plus the replicated norms.
        split = r["full"] - r["replicated"]
        assert r["local"] <= split / world + r["replicated"] + r["kv_extra"], r
        if name != "mlp":
            assert r["replicated"] < 0.05 * r["full"], r


# ---------------------------------------------------------------------------------------------
# Tied weights through F.linear, a head left split for the vocab-parallel loss, overrides.


class TiedFunctionalLM(torch.nn.Module):
    """An embedding whose weight the head reuses through F.linear (not an nn.Linear)."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return torch.nn.functional.linear(self.norm(x), self.emb.weight)


def _tied_and_loss_body(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = TiedFunctionalLM().double()
    models.randomize_(model)
    ids = torch.randint(0, 32, (3, 7))
    ref = copy.deepcopy(model)
    sharded = tpshard.parallelize(model, world, example_inputs=(ids,))
    plan = sharded.tpshard_plan
    styles = {k: m.style for k, m in plan.modules.items()}
    out, ref_out = sharded(ids), ref(ids)
    out.pow(2).sum().backward()
    ref_out.pow(2).sum().backward()
    g = sharded.get_parameter("emb.weight").grad
    errs = {"out": _rel(out, ref_out),
            "emb grad": _rel(g, plan.params["emb.weight"].shard(ref.emb.weight.grad, rank, world))}

    # The same model with its head left split: the loss is the vocab-parallel cross entropy.
    gpt, args = models.build("gpt", dtype=torch.float64, batch=3)
    ref_gpt = copy.deepcopy(gpt)
    local = tpshard.parallelize(gpt, world, example_inputs=args, overrides={"lm_head": "column_no_gather"})
    target = torch.randint(0, gpt.config.vocab_size, args[0].shape, generator=torch.Generator().manual_seed(3))
    target[0, :2] = -100
    logits_shard = local(*args)
    loss = tpshard.vocab_parallel_cross_entropy(logits_shard, target, label_smoothing=0.1)
    ref_loss = torch.nn.functional.cross_entropy(ref_gpt(*args).flatten(0, 1), target.flatten(), label_smoothing=0.1)
    loss.backward()
    ref_loss.backward()
    w = local.get_parameter("h.0.mlp.c_fc.weight").grad
    errs["vocab-parallel loss"] = _rel(loss, ref_loss)
    errs["loss grad"] = _rel(w, local.tpshard_plan.params["h.0.mlp.c_fc.weight"].shard(
        ref_gpt.get_parameter("h.0.mlp.c_fc.weight").grad, rank, world))
    errs["logits are the local vocab slice"] = float(logits_shard.shape[-1] != gpt.config.vocab_size // world)

    # An override that keeps an MLP whole still gives the same function.
    gpt2, args2 = models.build("gpt", dtype=torch.float64, batch=2)
    kept = tpshard.parallelize(gpt2, world, example_inputs=args2, overrides={"h.*.mlp.c_fc": "replicate"})
    errs["override"] = _rel(kept(*args2), gpt2(*args2))
    return {"errors": errs, "styles": styles}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_tied_head_vocab_loss_and_overrides(world: int) -> None:
    for r in run_ranks(_tied_and_loss_body, world, timeout=100):
        assert r["styles"]["emb"] == "vocab"
        assert r["styles"]["emb:linear"] == "column"
        bad = {k: v for k, v in r["errors"].items() if not v <= RTOL}
        assert not bad, bad


# ---------------------------------------------------------------------------------------------
# Property: random MLP stacks on random world sizes equal the original, or are refused clearly.

from hypothesis import given, settings, strategies as st  # noqa: E402

_layer = st.tuples(st.sampled_from([4, 6, 8, 12, 16]), st.sampled_from(["relu", "gelu", "tanh", "none"]),
                   st.booleans(), st.booleans())  # width, activation, bias, layer norm after


def _build_stack(spec: tuple) -> torch.nn.Module:
    in_features, layers = spec
    mods: list[torch.nn.Module] = []
    width = in_features
    for out, act, bias, norm in layers:
        mods.append(torch.nn.Linear(width, out, bias=bias))
        if act != "none":
            mods.append({"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}[act]())
        if norm:
            mods.append(torch.nn.LayerNorm(out))
        width = out
    return torch.nn.Sequential(*mods)


def _stack_body(rank: int, world: int, specs: list) -> list:
    results = []
    for i, spec in enumerate(specs):
        torch.manual_seed(i)
        model = _build_stack(spec).double()
        models.randomize_(model)
        x = torch.randn(3, spec[0], dtype=torch.float64, requires_grad=True)
        ref = copy.deepcopy(model)
        try:
            sharded = tpshard.parallelize(model, world, example_inputs=(x.detach(),))
        except tpshard.PlanError as e:
            results.append(("refused", str(e)))
            continue
        x2 = x.detach().clone().requires_grad_(True)
        out, ref_out = sharded(x), ref(x2)
        out.sum().backward()
        ref_out.sum().backward()
        results.append(("ran", max(_rel(out, ref_out), _rel(x.grad, x2.grad))))
    return results


@pytest.mark.timeout(300)
@settings(max_examples=4, deadline=None)
@given(world=st.sampled_from([2, 4]),
       specs=st.lists(st.tuples(st.sampled_from([4, 8, 6]), st.lists(_layer, min_size=1, max_size=4)),
                      min_size=6, max_size=6))
def test_random_mlp_stacks_equal_or_refuse(world: int, specs: list) -> None:
    results = run_ranks(_stack_body, world, specs, timeout=120)
    for spec, (kind, value) in zip(specs, results[0]):
        if kind == "refused":
            assert "not divisible by the world size" in value and "world sizes that divide it" in value, value
        else:
            assert value <= RTOL, (spec, value)


# ---------------------------------------------------------------------------------------------
# A parallel attention + MLP block (GPT-J style): the two partial sums meet before any other op,
# so the block needs one all-reduce forward and, sharing the normed input, one backward.


class ParallelBlockLM(torch.nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.ln = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.up = torch.nn.ModuleList(torch.nn.Linear(dim, 4 * dim) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(4 * dim, dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        b, t, d = x.shape
        for ln, qkv, out, up, down in zip(self.ln, self.qkv, self.out, self.up, self.down):
            h = ln(x)
            q, k, v = qkv(h).view(b, t, self.heads, 3, d // self.heads).permute(3, 0, 2, 1, 4).unbind(0)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + out(a.transpose(1, 2).reshape(b, t, d)) + down(torch.nn.functional.gelu(up(h)))
        return self.head(x)


def _parallel_block_body(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = ParallelBlockLM().double()
    models.randomize_(model)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 32, (3, 7))
    sharded = tpshard.parallelize(model, world, example_inputs=(ids,))
    with CommDebugMode() as fwd:
        out = sharded(ids)
    ref_out = ref(ids)
    with CommDebugMode() as bwd:
        out.sum().backward()
    ref_out.sum().backward()
    grads = max(_rel(p.grad, sharded.tpshard_plan.params[n].shard(dict(ref.named_parameters())[n].grad, rank, world))
                for n, p in sharded.named_parameters())
    return {"out": _rel(out, ref_out), "grads": grads, "fwd": _counts(fwd), "bwd": _counts(bwd)}


@pytest.mark.timeout(120)
def test_parallel_attention_mlp_block_shares_one_all_reduce() -> None:
    for r in run_ranks(_parallel_block_body, 2, timeout=100):
        assert r["out"] <= RTOL and r["grads"] <= RTOL, r
        # per block: 1 all-reduce forward (attention + MLP partial sums, plus the residual, added
        # first) and 1 backward (the shared copy of ln(x)); the embedding adds one forward
        # all-reduce, the head one all-gather forward and one all-reduce backward.
        assert r["fwd"] == {"all_reduce": 2 + 1, "all_gather": 1, "total": 4}, r
        assert r["bwd"] == {"all_reduce": 2 + 1, "all_gather": 0, "total": 3}, r


def _mesh_body(rank: int, world: int) -> dict:
    mesh = tpshard.init_parallelism(2)  # 2-way TP x 2-way DP on 4 ranks
    try:
        model, args = models.build("gpt", dtype=torch.float64, batch=2)
        sharded = tpshard.parallelize(model, 2, example_inputs=args)  # the mesh's "tp" dim by default
        same = _rel(sharded(*args), model(*args))
        explicit = tpshard.parallelize(model, 2, example_inputs=args, group=mesh["tp"])
        return {"default": same, "explicit": _rel(explicit(*args), model(*args)),
                "tp_rank": mesh["tp"].get_local_rank(), "dp_rank": mesh["dp"].get_local_rank()}
    finally:
        tpshard.reset_parallelism()


@pytest.mark.timeout(120)
def test_tensor_parallel_on_one_dim_of_a_2d_mesh() -> None:
    results = run_ranks(_mesh_body, 4, timeout=100)
    for r in results:
        assert r["default"] <= RTOL and r["explicit"] <= RTOL, r
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
