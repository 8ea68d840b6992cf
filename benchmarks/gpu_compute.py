"""Per-rank GPU compute of tpshard's shard, against a hand-sharded shard and the unsharded stack.

A Llama-7B-width layer stack (hidden 4096, intermediate 11008, 32 heads, 4 layers, bf16, batch
1, sequences 2048 and 4096) is timed forward + backward on one GPU:

- ``unsharded``: the stack itself (:class:`LlamaStack`, four :class:`tpshard.models.LlamaBlock`);
- ``tpshard``: rank 0's module from ``tpshard.parallelize(stack, N, group=OfflineGroup(0, N))``
  with its collectives removed by :func:`skip_collectives` (an FX pass that rewires every
  ``mp_copy``/``mp_reduce`` node to its input; nothing is monkeypatched);
- ``hand``: rank 0's hand-sharded stack (:class:`HandStack`, Megatron-style blocks from
  ``benchmarks/handwritten.py`` built with ``collectives=False``),

at N = 2, 4 and 8, interleaved in a random order after warm-up (CUDA events). Reported per sequence and N:
medians, tpshard/hand (target: within 3%), and each sharded time over the ideal
``unsharded / N`` (norms, rotary and residual adds stay replicated, so it is above 1). Before
timing, tpshard's and the hand shard's outputs and input gradients are checked equal (they
hold the same weights), and no collective can run: the groups are offline and raise if asked.
``extra_ops_vs_hand`` lists the aten ops (forward + backward) tpshard's shard runs more often
than the hand shard: on this stack, whose input is replicated, tpshard's plan keeps the residual
stream as one growing partial sum (``P += o``, then ``all_reduce(P) + x`` before every norm)
where Megatron adds each reduced output to the replicated stream (``h += all_reduce(o)``): the
same collectives, but ``2 * n_layer - 1`` more full-size replicated adds forward (and their
gradient accumulations backward): on an H100, tpshard/hand measured 1.01 to 1.05.

    python3 benchmarks/gpu_compute.py                  # one H100: well under 5 minutes
    python3 benchmarks/gpu_compute.py --cpu-smoke      # a tiny stack on CPU, float32 (seconds)
    python3 benchmarks/gpu_compute.py --out            # also write benchmarks/results/*.json

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

import tpshard
from tpshard import comm, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten import MegatronLlamaBlock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: Llama-7B widths (multi-head attention: 32 kv heads), 4 layers.
GPU_CONFIG = dict(hidden_size=4096, intermediate_size=11008, n_head=32, n_kv_head=32, n_layer=4)
#: --cpu-smoke: tiny, but every world size divides the heads and the MLP width.
SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=176, n_head=8, n_kv_head=8, n_layer=2)

#: The region functions that are the identity on values in a compute-only run: a copy is the
#: identity forward (its backward all-reduce is skipped) and a reduce's input is this rank's
#: partial sum (the all-reduce is skipped). Gathers and scatters change shapes: refused.
_IDENTITY = (comm.mp_copy, comm.mp_reduce)
_SHAPE_CHANGING = (comm.mp_gather, comm.mp_scatter, comm.mp_all_gather_seq, comm.mp_reduce_scatter_seq)


class LlamaStack(nn.Module):
    """``n_layer`` Llama decoder blocks over hidden states: ``forward(x (B, T, hidden))``.

    Example::

        >>> stack = LlamaStack(models.LlamaConfig(n_layer=1))
        >>> stack(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, config: models.LlamaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(models.LlamaBlock(config) for _ in range(config.n_layer))
        cos, sin = models.rotary_tables(config.head_dim, config.max_seq, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.size(1)
        cos = self.cos.narrow(0, 0, T)  # (T, head_dim)
        sin = self.sin.narrow(0, 0, T)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class HandStack(nn.Module):
    """Rank ``group.rank``'s hand-sharded copy of a :class:`LlamaStack`, collectives left out."""

    def __init__(self, ref: LlamaStack, group: comm.Group) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MegatronLlamaBlock(b, group, collectives=False) for b in ref.layers)
        self.register_buffer("cos", ref.cos.detach().clone(), persistent=False)
        self.register_buffer("sin", ref.sin.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


def skip_collectives(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewire every ``mp_copy``/``mp_reduce`` node of a tpshard module to its input, in place.

    What is left is exactly this rank's local compute. A gather or scatter (which would change
    shapes) raises, naming the node. Returns ``gm`` (recompiled).

    Example::

        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> gm = tpshard.parallelize(mlp, 2, example_inputs=(torch.randn(3, 4),),
        ...                          group=tpshard.OfflineGroup(0, 2))
        >>> skip_collectives(gm)(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SHAPE_CHANGING:
            raise ValueError(f"skip_collectives: {node.format_node()} changes shapes; a compute-only "
                             "run needs a module whose only collectives are copies and reduces")
        if node.target in _IDENTITY:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _build(config: dict, seq: int, worlds: list[int], device: torch.device, dtype: torch.dtype
           ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The unsharded stack and, per N, tpshard's and the hand-sharded rank-0 modules."""
    cfg = models.LlamaConfig(vocab_size=64, max_seq=seq, **config)
    torch.manual_seed(0)
    with torch.device(device):
        stack = LlamaStack(cfg)
    if device.type == "cpu":  # on the GPU the default init will do (and is fast)
        models.randomize_(stack, seed=0)
    stack = stack.to(dtype)
    example = torch.zeros(1, seq, cfg.hidden_size, device=device, dtype=dtype)
    mods: dict[str, nn.Module] = {"unsharded": stack}
    build_s: dict[str, float] = {}
    for n in worlds:
        t = time.perf_counter()
        mods[f"tpshard/{n}"] = skip_collectives(
            tpshard.parallelize(stack, n, example_inputs=(example,), group=tpshard.OfflineGroup(0, n)))
        build_s[f"tpshard/{n}"] = round(time.perf_counter() - t, 3)
        mods[f"hand/{n}"] = HandStack(stack, tpshard.OfflineGroup(0, n))
    for m in mods.values():
        m.train()
    return mods, build_s


def _check(mods: dict[str, nn.Module], worlds: list[int], hidden: int, seq: int, device: torch.device,
           dtype: torch.dtype) -> dict[str, float]:
    """tpshard's shard and the hand shard: same outputs and input gradients (same weights)."""
    # float32: the same ops in the same order up to rounding. bfloat16 through 4 layers: a few
    # percent of the largest value (a wrong shard would be off by order 1).
    tol = 1e-5 if dtype == torch.float32 else 1e-1
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(1, min(seq, 128), hidden, generator=g).to(device, dtype)
    errors = {}
    for n in worlds:
        outs = []
        for name in (f"tpshard/{n}", f"hand/{n}"):
            xi = x.clone().requires_grad_(True)
            y = mods[name](xi)
            y.float().square().mean().backward()
            outs.append((y.detach().float(), xi.grad.float()))
            mods[name].zero_grad(set_to_none=True)
        (ya, ga), (yc, gc) = outs
        err = max(float((ya - yc).abs().max() / yc.abs().max()), float((ga - gc).abs().max() / gc.abs().max()))
        if not err <= tol:
            raise AssertionError(f"world {n}: tpshard's compute-only shard differs from the hand-sharded one "
                                 f"(relative error {err:.3g} > {tol})")
        errors[str(n)] = err
    return errors


def _op_counts(module: nn.Module, x: Tensor) -> collections.Counter:
    """aten ops of one forward + backward of ``module`` (a TorchDispatchMode tally)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Tally(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
            return func(*args, **(kwargs or {}))

    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)  # gradients left by a timing loop would add accumulation ops
    with Tally() as tally:
        module(x).float().square().mean().backward()
    module.zero_grad(set_to_none=True)
    return tally.counts


def _op_diff(mods: dict[str, nn.Module], worlds: list[int], hidden: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Per N: the aten ops tpshard's shard runs more (+) or fewer (-) times than the hand shard."""
    x = torch.randn(1, 8, hidden, device=device, dtype=dtype)
    out = {}
    for n in worlds:
        a, c = _op_counts(mods[f"tpshard/{n}"], x), _op_counts(mods[f"hand/{n}"], x)
        out[str(n)] = {op: a[op] - c[op] for op in sorted(set(a) | set(c)) if a[op] != c[op]}
    return out


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """A function that runs ``step`` once and returns its time in milliseconds."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run(step: Callable[[], None]) -> float:
            torch.cuda.synchronize(device)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        return run

    def run_cpu(step: Callable[[], None]) -> float:
        t = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - t)
    return run_cpu


def bench_seq(config: dict, seq: int, worlds: list[int], device: torch.device, dtype: torch.dtype,
              warmup: int, iters: int) -> dict[str, Any]:
    """Time forward + backward of every module at one sequence length; medians and ratios."""
    mods, build_s = _build(config, seq, worlds, device, dtype)
    errors = _check(mods, worlds, config["hidden_size"], seq, device, dtype)
    extra_ops = _op_diff(mods, worlds, config["hidden_size"], device, dtype)
    x = torch.randn(1, seq, config["hidden_size"], device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn_like(x)

    def step_of(m: nn.Module) -> Callable[[], None]:
        def step() -> None:
            m(x).backward(grad)
        return step

    timer = _timer(device)
    names = list(mods)
    for _ in range(warmup):
        for name in names:
            timer(step_of(mods[name]))
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(iters):
        # Interleaved, in a fresh random order each iteration: a fixed cycle would always run a
        # module right after the same other one (allocator state, clocks, caches).
        order = names[:]
        rng.shuffle(order)
        for name in order:
            for p in mods[name].parameters():
                p.grad = None
            x.grad = None
            times[name].append(timer(step_of(mods[name])))
    med = {n: statistics.median(t) for n, t in times.items()}
    per_world = {}
    for n in worlds:
        a, c, ideal = med[f"tpshard/{n}"], med[f"hand/{n}"], med["unsharded"] / n
        per_world[str(n)] = {
            "tpshard_ms": round(a, 3), "hand_ms": round(c, 3), "ideal_ms": round(ideal, 3),
            "tpshard/hand": round(a / c, 4),
            "tpshard/hand paired": round(statistics.median(
                x / y for x, y in zip(times[f"tpshard/{n}"], times[f"hand/{n}"])), 4),
            "hand/ideal": round(c / ideal, 3), "tpshard/ideal": round(a / ideal, 3),
        }
    del mods
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seq": seq, "unsharded_ms": round(med["unsharded"], 3), "worlds": per_world,
            "check_rel_error": errors, "extra_ops_vs_hand": extra_ops, "build_s": build_s, "iters": iters}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny stack on CPU in float32")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 2048,4096)")
    p.add_argument("--worlds", default="2,4,8", help="comma-separated world sizes")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per module")
    p.add_argument("--out", action="store_true", help="also write the result to benchmarks/results/")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device, dtype, config = torch.device("cpu"), torch.float32, SMOKE_CONFIG
        seqs, warmup, iters = [16, 32], 1, args.iters or 3
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
        device, dtype, config = torch.device("cuda", 0), torch.bfloat16, GPU_CONFIG
        seqs, warmup, iters = [2048, 4096], 3, args.iters or 15
    if args.seqs:
        seqs = [int(s) for s in args.seqs.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]

    started = time.perf_counter()
    rows = []
    for seq in seqs:
        row = bench_seq(config, seq, worlds, device, dtype, warmup, iters)
        rows.append(row)
        print(json.dumps(row), flush=True)

    ratios = [w["tpshard/hand"] for r in rows for w in r["worlds"].values()]
    now = datetime.datetime.now(datetime.timezone.utc)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {
        "benchmark": "gpu_compute",
        "tpshard_vs_hand_max": max(ratios),
        "target tpshard/hand <= 1.03 (every N)": max(ratios) <= 1.03,
        "device": name,
        "dtype": str(dtype).replace("torch.", ""),
        "config": {**config, "batch": 1},
        "torch": torch.__version__,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - started, 1),
        "seqs": rows,
    }
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        path = RESULTS / f"gpu_compute-{now.strftime('%Y%m%d-%H%M')}-{slug}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.rename(path)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
