"""tpshard against DTensor and hand-written tensor parallelism: training and inference steps.

Three rank modules of the same reference model (:mod:`tpshard.models` GPT and Llama, and the
mixture of experts of ``benchmarks/moe_model.py``), run side by side in the same rank processes
on real ``torch.distributed`` gloo ranks:

(a) ``tpshard``      ``tpshard.parallelize(model, world)``: no plan written;
(b) ``dtensor``      ``torch.distributed.tensor.parallel.parallelize_module`` with the hand-written
                     plan of PyTorch's TP tutorial (see :func:`build_dtensor`);
(c) ``handwritten``  a Megatron-style model built from tpshard's layers
                     (``benchmarks/handwritten.py``; for the MoE, expert tensor parallelism
                     written by hand, ``benchmarks/moe_model.py``; it has no (b)).

Per case (model, size, world size): a training step (forward, cross-entropy loss, backward,
AdamW step) and an inference forward (``torch.no_grad``), each timed on every rank after a
barrier; variants interleaved after warm-up, each iteration in the next permutation of their
order (a b c, a c b, b a c, ...); a step's time is the slowest rank's. Reported: median times; the ratios a/b and a/c as the median
of the per-iteration ratios (each pair ran back to back, so a drifting machine load cancels)
and, beside them, the ratios of the medians; collectives per training step and per inference
forward (``CommDebugMode``); per-rank parameter bytes. Before timing, every variant's loss over
the warm-up steps (after 0, 1, 2, ... optimizer steps) is asserted equal to the unsharded
reference's (float32 tolerance), so the three compute the same thing. AdamW runs with
``foreach=False`` for every variant (see :class:`_Runner`). The headline runs also time an A/A
control, ``handwritten_aa``: a second copy of (c), whose ratio to (c) (``c'/c (A/A noise)``,
top-level ``noise_floor``) shows how far two identical models drift apart on this machine: read
a/c against it. With ``--compile`` the tpshard module
is also run under ``torch.compile`` (variant ``tpshard_compiled``; one graph, no graph breaks,
the same collectives as eager; compiling takes a minute or more per case on CPU, so the full
mode compiles the world-size-2 small cases only and ``--quick`` none).

    python3 benchmarks/compare_tp.py --quick            # < 2 minutes on 2 CPU cores
    python3 benchmarks/compare_tp.py                    # every size, world sizes 2 and 4
    python3 benchmarks/compare_tp.py --cases gpt_small:2,llama_w512:4 --iters 30
    python3 benchmarks/compare_tp.py --quick --out      # also write benchmarks/results/*.json
    python3 benchmarks/compare_tp.py --device cuda --variants tpshard,handwritten
                                                        # ranks share one GPU (gloo over CUDA)

On CUDA through gloo (several ranks on one GPU), torch 2.11's DTensor crashed the rank with a
segmentation fault in its functional all-gather (``wait_tensor`` under
``ColwiseParallel(output_layouts=Replicate())`` of ``lm_head``) while tpshard's and the
hand-written model's ``all_gather_into_tensor`` ran; hence ``--variants`` there.

One JSON line per case, then the summary as the last line: a JSON object whose top level has
``tpshard_vs_dtensor`` and ``tpshard_vs_handwritten`` (median ratios of the training step for the
small GPT at world size 2) beside the details.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tpshard
from tpshard import models
from tpshard.verify.launch import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten import build_handwritten  # noqa: E402
from moe_model import HandwrittenMoELM, build_moe  # noqa: E402

VARIANTS = ("tpshard", "dtensor", "handwritten")
RESULTS = Path(__file__).resolve().parent / "results"

#: Benchmark cases: reference model, config, batch, sequence. "gpt_small" is the headline
#: (width 128, 4 blocks, batch 4, sequence 64).
CASES: dict[str, dict[str, Any]] = {
    "gpt_small": dict(model="gpt", batch=4, seq=64,
                      config=dict(n_embd=128, n_head=4, n_layer=4, vocab_size=512, block_size=64)),
    "gpt_w512": dict(model="gpt", batch=4, seq=64,
                     config=dict(n_embd=512, n_head=8, n_layer=4, vocab_size=512, block_size=64)),
    "llama_small": dict(model="llama", batch=4, seq=64,
                        config=dict(hidden_size=128, intermediate_size=384, n_head=8, n_kv_head=4,
                                    n_layer=4, vocab_size=512, max_seq=64)),
    "llama_w512": dict(model="llama", batch=4, seq=64,
                       config=dict(hidden_size=512, intermediate_size=1408, n_head=8, n_kv_head=4,
                                   n_layer=4, vocab_size=512, max_seq=64)),
    # A mixture of experts (benchmarks/moe_model.py): 8 SwiGLU experts, top-2, a shared expert.
    # (c) is the hand-written expert-TP model; no DTensor plan expresses a loop over experts.
    "moe_small": dict(model="moe", batch=4, seq=64,
                      config=dict(vocab_size=512, d=128, hidden=256, experts=8, top_k=2, shared=256, n_layer=2)),
    # --smoke (the test suite): tiny and fast.
    "gpt_tiny": dict(model="gpt", batch=2, seq=8,
                     config=dict(n_embd=32, n_head=4, n_layer=1, vocab_size=64, block_size=8)),
    "llama_tiny": dict(model="llama", batch=2, seq=8,
                       config=dict(hidden_size=32, intermediate_size=64, n_head=4, n_kv_head=2,
                                   n_layer=1, vocab_size=64, max_seq=8)),
}

#: Per mode: the (case, world size, timed iterations) runs, warm-up steps, the runs that also
#: time ``torch.compile`` by default (compiling costs a minute or more per case on CPU), and the
#: runs with the A/A control (a second copy of (c), see ``handwritten_aa``).
MODES: dict[str, dict[str, Any]] = {
    "smoke": dict(runs=[("gpt_tiny", 2, 2), ("llama_tiny", 2, 2)], warmup=3, compile=(), aa=()),
    "quick": dict(runs=[("gpt_small", 2, 72), ("llama_small", 2, 48), ("gpt_w512", 2, 10),
                        ("llama_small", 4, 8), ("moe_small", 2, 10)],
                  warmup=3, compile=(), aa=(("gpt_small", 2),)),
    "full": dict(runs=[(c, w, n) for w in (2, 4) for c, n in
                       (("gpt_small", 72), ("llama_small", 72), ("gpt_w512", 24), ("llama_w512", 24),
                        ("moe_small", 24))],
                 warmup=4, compile=(("gpt_small", 2), ("llama_small", 2)), aa=(("gpt_small", 2), ("llama_small", 2))),
}

LOSS_RTOL = 2e-4  # float32: three implementations summing in different orders


# ---------------------------------------------------------------------------------------------
# (b) DTensor: PyTorch's tutorial plan, written by hand.


def _gpt_attention_local_forward(self: models.CausalSelfAttention, x: Tensor) -> Tensor:
    """CausalSelfAttention.forward with local head counts (the reference reads C from ``x``,
    which is the full width: with ``n_head //= world`` its ``C // n_head`` would be wrong)."""
    B, T, _ = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # n_embd: local width
    q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) * self.scale
    mask = self.bias.narrow(2, 0, T).narrow(3, 0, T)
    att = att.masked_fill(mask == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = self.attn_dropout(att)
    y = att @ v
    y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)
    return self.resid_dropout(self.c_proj(y))


@torch.no_grad()
def _rank_major_qkv(linear: nn.Linear, world: int) -> None:
    """Reorder a fused ``[q | k | v]`` weight (and bias) to ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``,
    so that ColwiseParallel's contiguous Shard(0) gives rank r its own heads of q, k and v."""
    for name in ("weight", "bias"):
        p = getattr(linear, name)
        if p is None:
            continue
        parts = [t.chunk(world, dim=0) for t in p.chunk(3, dim=0)]  # [q, k, v] x ranks
        p.copy_(torch.cat([parts[j][r] for r in range(world) for j in range(3)], dim=0))


def build_dtensor(model: nn.Module, mesh: Any) -> nn.Module:
    """Parallelize ``model`` (a GPT or Llama, modified in place) with DTensor's
    ``parallelize_module`` and the hand-written plan of PyTorch's TP tutorial:

    - token embedding: ``RowwiseParallel(input_layouts=Replicate())`` (vocabulary split; its
      Partial output is all-reduced); GPT's position embedding stays replicated;
    - q/k/v (or GPT's fused ``c_attn``), ``c_fc``, ``gate_proj``/``up_proj``: ``ColwiseParallel()``;
      ``c_proj``/``o_proj``/``down_proj``: ``RowwiseParallel()``;
    - ``lm_head``: ``ColwiseParallel(output_layouts=Replicate())`` (the logits all-gathered);
    - head counts divided by the world size on the attention modules, as the tutorial does.

    GPT's fused ``c_attn`` is ``[q | k | v]`` along its output rows, which ColwiseParallel's
    contiguous split cannot express (rank 0 would get all of q and half of k). We reorder the
    rows rank-major first (:func:`_rank_major_qkv`) and give each attention module a forward
    that uses the local width (:func:`_gpt_attention_local_forward`), the same math. GPT's
    tied ``lm_head.weight``/``wte.weight`` (both Shard(0) over the vocabulary: the same local
    rows) is re-tied after distribution, which otherwise makes two Parameters of it.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = mesh.size()
    col, row = ColwiseParallel(), RowwiseParallel()
    plan: dict[str, Any] = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    if isinstance(model, models.GPT):
        tied = model.lm_head.weight is model.wte.weight
        plan["wte"] = RowwiseParallel(input_layouts=Replicate())
        for i, block in enumerate(model.h):
            attn = block.attn
            _rank_major_qkv(attn.c_attn, world)
            attn.n_head //= world
            attn.n_embd //= world
            attn.forward = types.MethodType(_gpt_attention_local_forward, attn)
            plan.update({f"h.{i}.attn.c_attn": col, f"h.{i}.attn.c_proj": row,
                         f"h.{i}.mlp.c_fc": col, f"h.{i}.mlp.c_proj": row})
        # Order matters for the tie: wte first, then lm_head (dict order is the apply order).
        plan = {"wte": plan.pop("wte"), **plan}
        parallelize_module(model, mesh, plan)
        if tied:
            model.lm_head.weight = model.wte.weight
    elif isinstance(model, models.Llama):
        tied = model.lm_head.weight is model.embed_tokens.weight
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
        for i, layer in enumerate(model.layers):
            layer.self_attn.n_head //= world
            layer.self_attn.n_kv_head //= world
            plan.update({f"layers.{i}.self_attn.q_proj": col, f"layers.{i}.self_attn.k_proj": col,
                         f"layers.{i}.self_attn.v_proj": col, f"layers.{i}.self_attn.o_proj": row,
                         f"layers.{i}.mlp.gate_proj": col, f"layers.{i}.mlp.up_proj": col,
                         f"layers.{i}.mlp.down_proj": row})
        plan = {"embed_tokens": plan.pop("embed_tokens"), **plan}
        parallelize_module(model, mesh, plan)
        if tied:
            model.lm_head.weight = model.embed_tokens.weight
    else:
        raise TypeError(f"no DTensor plan for {type(model).__name__}")
    return model


# ---------------------------------------------------------------------------------------------
# One rank.


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _param_bytes(model: nn.Module) -> int:
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())  # unique params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One variant: its module and optimizer, and its training and inference steps."""

    def __init__(self, name: str, module: nn.Module, ids: Tensor, targets: Tensor) -> None:
        self.name, self.module, self.ids, self.targets = name, module, ids, targets
        module.train()
        # foreach=False for every variant: torch's default turns foreach on for CUDA parameters,
        # and DTensor's mix of DTensor (sharded) and plain (norm) parameters then fails in the
        # foreach kernels ("got mixed torch.Tensor and DTensor"); on CPU it is off anyway.
        self.opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=False)

    def train_step(self) -> Tensor:
        logits = self.module(self.ids)  # (B, T, V) full logits on every rank
        loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def infer_step(self) -> Tensor:
        with torch.no_grad():
            return self.module(self.ids)


_KINDS = {"all_reduce": ("allreduce", "all_reduce"), "all_gather": ("allgather", "all_gather"),
          "reduce_scatter": ("reduce_scatter",)}


def _count(fn: Callable[[], Any]) -> dict[str, int]:
    """Collectives issued by ``fn()`` (CommDebugMode), by kind, and their total."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        fn()
    counts: dict[str, int] = {}
    for op, n in mode.get_comm_counts().items():
        name = str(op).split(".")[-1]  # c10d.allreduce_ (tpshard) or _c10d_functional.all_reduce (DTensor)
        kind = next((k for k, pats in _KINDS.items() if any(p in name for p in pats)), name)
        counts[kind] = counts.get(kind, 0) + n
    return {**dict(sorted(counts.items())), "total": mode.get_total_counts()}


def _rank_bench(rank: int, world: int, spec: dict) -> dict:
    """Build the three variants of ``spec``'s model on this rank, check them, time them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # CommDebugMode's module tracker hooks the modules; its notes about hooks are noise here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    device = torch.device("cuda", torch.cuda.current_device()) if spec["device"] == "cuda" else torch.device("cpu")
    case = CASES[spec["case"]]
    torch.manual_seed(0)
    build = build_moe if case["model"] == "moe" else lambda **kw: models.build(case["model"], **kw)
    ref, (ids,) = build(dtype=torch.float32, device=device, batch=case["batch"], seq=case["seq"], **case["config"])
    vocab = case["config"]["vocab_size"]
    targets = torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(1)).to(device)

    t0 = time.perf_counter()
    builders: dict[str, Callable[[], nn.Module]] = {
        "tpshard": lambda: tpshard.parallelize(ref, world, example_inputs=(ids,)),
        "dtensor": lambda: build_dtensor(copy.deepcopy(ref), init_device_mesh(device.type, (world,))),
        "handwritten": lambda: HandwrittenMoELM(ref) if case["model"] == "moe" else build_handwritten(ref),
        # A/A control: a second, independent copy of (c). Its ratio to (c) is the noise floor of
        # this machine's ratios (two identical models differ only by noise).
        "handwritten_aa": lambda: HandwrittenMoELM(ref) if case["model"] == "moe" else build_handwritten(ref),
    }
    if case["model"] == "moe":  # whole experts per rank (expert parallelism), beside expert TP
        builders["tpshard_ep"] = lambda: tpshard.parallelize(ref, world, example_inputs=(ids,), expert_parallel=True)
    variants = [v for v in VARIANTS if v in spec["variants"] and not (v == "dtensor" and case["model"] == "moe")]
    if case["model"] == "moe" and "tpshard" in variants:
        variants.insert(variants.index("tpshard") + 1, "tpshard_ep")
    if spec.get("aa") and "handwritten" in variants:
        variants.append("handwritten_aa")
    build_s: dict[str, float] = {}
    modules: dict[str, nn.Module] = {}
    for v in variants:
        t = time.perf_counter()
        modules[v] = builders[v]()
        build_s[v] = time.perf_counter() - t
    compile_info: dict[str, Any] = {}
    if spec["compile"]:
        t = time.perf_counter()
        try:
            modules["tpshard_compiled"] = torch.compile(copy.deepcopy(modules["tpshard"]))
            variants.append("tpshard_compiled")
        except Exception as e:  # reported, not fatal
            compile_info["error"] = f"{type(e).__name__}: {e}"
        build_s["tpshard_compiled"] = time.perf_counter() - t

    runners = {v: _Runner(v, modules[v], ids, targets) for v in variants}
    reference = _Runner("reference", copy.deepcopy(ref), ids, targets)

    # Warm-up, and the apples-to-apples check: same losses as the unsharded model, step by step.
    losses: dict[str, list[float]] = {v: [] for v in ["reference", *variants]}
    for _ in range(max(spec["warmup"], 3) if spec["check"] else spec["warmup"]):
        if spec["check"]:
            losses["reference"].append(reference.train_step().item())
        for v in list(variants):
            try:
                t = time.perf_counter()
                losses[v].append(runners[v].train_step().item())
                runners[v].infer_step()
                if v == "tpshard_compiled" and "first_steps_s" not in compile_info:
                    compile_info["first_steps_s"] = time.perf_counter() - t
            except Exception as e:
                if v != "tpshard_compiled":
                    raise
                compile_info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"
                variants.remove(v)
                del runners[v]
    if spec["check"]:
        ref_losses = torch.tensor(losses["reference"])
        for v in variants:
            got = torch.tensor(losses[v])
            if not torch.allclose(got, ref_losses, rtol=LOSS_RTOL, atol=1e-6):
                raise AssertionError(f"{spec['case']} world {world}: {v} losses {got.tolist()} differ from the "
                                     f"reference {ref_losses.tolist()}: the comparison would not be apples to apples")
    del reference

    # Collectives per step (one untimed step each).
    comms = {v: {"train": _count(runners[v].train_step), "infer": _count(runners[v].infer_step)}
             for v in variants}

    # Timed, interleaved: every iteration runs each variant once, in an order that cycles through
    # all permutations, so that no variant always runs right after the same other one (caches,
    # allocator state and the scheduler would favour one of them).
    times: dict[str, dict[str, list[float]]] = {k: {v: [] for v in variants} for k in ("train", "infer")}
    orders = list(itertools.permutations(variants))
    for i in range(spec["iters"]):
        order = orders[i % len(orders)]
        for kind in ("train", "infer"):
            for v in order:
                step = runners[v].train_step if kind == "train" else runners[v].infer_step
                _sync(device)
                dist.barrier()
                t = time.perf_counter()
                step()
                _sync(device)
                times[kind][v].append(time.perf_counter() - t)

    return {
        "times": times,
        "comms": comms,
        "param_bytes": {v: _param_bytes(modules[v]) for v in variants},
        "build_s": build_s,
        "losses": losses,
        "compile": compile_info,
        "setup_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# Driver.


def _summarize(case: str, world: int, per_rank: list[dict]) -> dict:
    """Per-iteration slowest rank, then medians and ratios."""
    r0 = per_rank[0]
    variants = list(r0["times"]["train"])
    out: dict[str, Any] = {"case": case, "world_size": world, "model": CASES[case]["model"],
                           "batch": CASES[case]["batch"], "seq": CASES[case]["seq"],
                           "config": CASES[case]["config"]}
    for kind in ("train", "infer"):
        steps = {v: [max(r["times"][kind][v][i] for r in per_rank) for i in range(len(r0["times"][kind][v]))]
                 for v in variants}
        med = {v: statistics.median(s) for v, s in steps.items()}
        block: dict[str, Any] = {"median_ms": {v: round(1e3 * m, 3) for v, m in med.items()}}
        pairs = [("a/b", "tpshard", "dtensor"), ("a/c", "tpshard", "handwritten"),
                 ("compiled/a", "tpshard_compiled", "tpshard"), ("compiled/c", "tpshard_compiled", "handwritten"),
                 ("ep/c", "tpshard_ep", "handwritten"), ("ep/a", "tpshard_ep", "tpshard"),
                 ("c'/c (A/A noise)", "handwritten_aa", "handwritten")]
        for key, x, y in pairs:
            if x not in med or y not in med:
                continue
            # The median of the per-iteration ratios (each pair ran back to back, so a drifting
            # machine load cancels), and the ratio of the medians beside it.
            block[key] = round(statistics.median(a / b for a, b in zip(steps[x], steps[y])), 4)
            block[key + " of medians"] = round(med[x] / med[y], 4)
        out[kind] = block
    out["collectives"] = r0["comms"]
    out["param_bytes_per_rank"] = {v: [r["param_bytes"][v] for r in per_rank] for v in variants}
    out["build_s"] = {k: round(v, 3) for k, v in r0["build_s"].items()}
    out["iters"] = len(r0["times"]["train"]["tpshard"])
    if r0["compile"]:
        out["compile"] = r0["compile"]
    out["losses_checked"] = {v: [round(x, 6) for x in ls] for v, ls in r0["losses"].items() if ls}
    return out


def _targets(cases: list[dict], headline: dict) -> dict[str, bool]:
    """The issue's targets, each judged on what was measured (a missing variant: no entry)."""
    dense = [c for c in cases if c["model"] != "moe"]  # (the MoE case has no DTensor variant)
    at2 = [c for c in dense if c["world_size"] == 2]
    out: dict[str, bool] = {}
    for kind in ("train", "infer"):
        if at2 and all("a/c" in c[kind] for c in at2):
            out[f"a/c <= 1.03 (world 2, every size, {kind})"] = all(c[kind]["a/c"] <= 1.03 for c in at2)
        if at2 and all("a/b" in c[kind] for c in at2):
            out[f"a/b <= 1.0 (world 2, every size, {kind})"] = all(c[kind]["a/b"] <= 1.0 for c in at2)
    for c in cases:
        if c["model"] == "moe" and "a/c" in c["train"]:
            out[f"moe a/c <= 1.03 (world {c['world_size']}, train)"] = c["train"]["a/c"] <= 1.03
            out[f"moe collectives a <= c (world {c['world_size']})"] = all(
                c["collectives"]["tpshard"][k]["total"] <= c["collectives"]["handwritten"][k]["total"]
                for k in ("train", "infer"))
    if "a/b" in headline["train"]:
        out[f"a/b <= 0.85 ({headline['case']}, world {headline['world_size']}, train)"] = headline["train"]["a/b"] <= 0.85
    if dense and all("dtensor" in c["collectives"] for c in dense):
        out["collectives a <= b (every case)"] = all(
            c["collectives"]["tpshard"][k]["total"] <= c["collectives"]["dtensor"][k]["total"]
            for c in dense for k in ("train", "infer"))
    return out


def _machine(device: str) -> tuple[str, str]:
    """(description, file-name slug) of the machine the benchmark ran on."""
    if device == "cuda":
        desc = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
        slug = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        desc = f"{cpu}, {os.cpu_count()} CPU cores"
        slug = f"cpu{os.cpu_count()}"
    return desc, re.sub(r"[^A-Za-z0-9]+", "-", slug).strip("-").lower()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a run under 2 minutes on 2 CPU cores")
    g.add_argument("--smoke", action="store_true", help="tiny models, a few steps (the test suite)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the ranks share the GPU(s) through gloo")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile(tpshard module) in every run (default: the mode's "
                        "world-size-2 small runs in the full mode, none in --quick/--smoke)")
    p.add_argument("--iters", type=int, help="timed iterations per variant (overrides the mode)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of tpshard,dtensor,handwritten (tpshard is required). "
                        "On CUDA through gloo, torch 2.11's DTensor segfaulted in its functional "
                        "all-gather: pass tpshard,handwritten there")
    p.add_argument("--aa", action="store_true", help="add the A/A control (a second copy of the "
                   "hand-written model) to every run, not only the mode's headline runs")
    p.add_argument("--start-method", choices=("fork", "spawn"), help="rank processes (default: "
                   "fork on CPU, spawn with CUDA)")
    p.add_argument("--cases", help="comma-separated case[:world] list, e.g. gpt_small:2,llama_w512:4")
    p.add_argument("--out", action="store_true", help="also write the summary to benchmarks/results/")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    args = p.parse_args(argv)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = MODES[mode]
    runs = cfg["runs"]
    if args.cases:
        default_iters = {(c, w): n for c, w, n in runs}
        runs = []
        for item in args.cases.split(","):
            name, _, world = item.partition(":")
            if name not in CASES:
                p.error(f"unknown case {name!r}; known: {sorted(CASES)}")
            w = int(world or 2)
            runs.append((name, w, default_iters.get((name, w), 10)))

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "tpshard" not in variants or set(variants) - set(VARIANTS):
        p.error(f"--variants {args.variants!r}: a subset of {','.join(VARIANTS)} that includes tpshard")

    started = time.perf_counter()
    cases = []
    for case, world, iters in runs:
        do_compile = args.compile if args.compile is not None else (case, world) in cfg["compile"]
        spec = dict(case=case, device=args.device, warmup=cfg["warmup"], iters=args.iters or iters,
                    check=True, compile=do_compile, variants=variants,
                    aa=args.aa or (case, world) in cfg["aa"])
        per_rank = run_ranks(_rank_bench, world, spec, timeout=args.timeout, device=args.device,
                             backend="gloo", threads=1, start_method=args.start_method)
        summary = _summarize(case, world, per_rank)
        cases.append(summary)
        print(json.dumps(summary), flush=True)

    headline = next((c for c in cases if c["case"] == "gpt_small" and c["world_size"] == 2), cases[0])
    desc, slug = _machine(args.device)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "compare_tp",
        "tpshard_vs_dtensor": headline["train"].get("a/b"),
        "tpshard_vs_handwritten": headline["train"].get("a/c"),
        "headline": f"{headline['case']} world {headline['world_size']}, training step, median ratios",
        "noise_floor": {k: headline[k].get("c'/c (A/A noise)") for k in ("train", "infer")},
        "targets": _targets(cases, headline),
        "mode": mode,
        "device": args.device,
        "machine": desc,
        "torch": torch.__version__,
        "tpshard": tpshard.__version__,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "threads_per_rank": 1,
        "wall_s": round(time.perf_counter() - started, 1),
        "cases": cases,
    }
    line = json.dumps(result)
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"compare_tp-{args.device}-{mode}-{now.strftime('%Y%m%d-%H%M')}-{slug}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.rename(path)
        print(f"wrote {path}", file=sys.stderr)
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
