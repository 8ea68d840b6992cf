"""Per-rank activation memory and step time, with and without sequence parallelism.

A Llama-shaped reference model (:mod:`tpshard.models` Llama: RMSNorm, RoPE, SwiGLU), float32,
on real gloo ranks at world sizes 2 and 4, and unsharded on one process. Per rank:

- ``activation_bytes``: the bytes autograd saves for backward in one training forward — the
  activation memory that peaks before backward starts (``torch.autograd.graph.saved_tensors_hooks``,
  each storage counted once; parameters and their shards excluded);
- ``step_ms``: the median forward + backward time (slowest rank), after warm-up.

Reported beside them: the ratio to the unsharded model's and to the ideal 1/W.

    python3 benchmarks/sequence_memory.py                # world sizes 2 and 4, ~1 minute on 2 CPU cores
    python3 benchmarks/sequence_memory.py --seq 256 --iters 3 --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tpshard  # noqa: E402
from tpshard import models  # noqa: E402
from tpshard.verify.launch import run_ranks  # noqa: E402

CONFIG = dict(hidden_size=256, intermediate_size=688, n_head=8, n_kv_head=8, n_layer=4, vocab_size=512,
              max_seq=1024)


def _build(batch: int, seq: int) -> tuple[torch.nn.Module, tuple]:
    return models.build("llama", dtype=torch.float32, batch=batch, seq=seq, **CONFIG)


def _measure(model: torch.nn.Module, ids: torch.Tensor, iters: int, barrier: bool) -> dict:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    activation = sum(seen.values())
    out.float().pow(2).mean().backward()
    times = []
    for i in range(iters + 1):
        if barrier:
            dist.barrier()
        t0 = time.perf_counter()
        model(ids).float().pow(2).mean().backward()
        if barrier:
            dist.barrier()
        if i:
            times.append(1000 * (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
    return {"activation_bytes": activation, "step_ms": statistics.median(times)}


def _rank(rank: int, world: int, batch: int, seq: int, iters: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for sp in (False, True):
        model, (ids,) = _build(batch, seq)
        sharded = tpshard.parallelize(model, world, example_inputs=(ids,), sequence_parallel=sp)
        out["sp" if sp else "tp"] = _measure(sharded, ids, iters, barrier=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--out", action="store_true", help="also write benchmarks/results/sequence_memory-*.json")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, (ids,) = _build(ns.batch, ns.seq)
    base = _measure(model, ids, ns.iters, barrier=False)
    rows = [{"world": 1, "mode": "unsharded", **base, "vs_unsharded": 1.0, "vs_ideal": 1.0}]
    for world in [int(w) for w in ns.worlds.split(",")]:
        res = run_ranks(_rank, world, ns.batch, ns.seq, ns.iters, timeout=900)
        for mode in ("tp", "sp"):
            act = max(r[mode]["activation_bytes"] for r in res)
            ms = max(r[mode]["step_ms"] for r in res)
            rows.append({"world": world, "mode": "tensor parallel" if mode == "tp" else "+ sequence parallel",
                         "activation_bytes": act, "step_ms": ms,
                         "vs_unsharded": act / base["activation_bytes"],
                         "vs_ideal": act / (base["activation_bytes"] / world)})
    print(f"Llama {CONFIG}, batch {ns.batch}, seq {ns.seq}, float32, CPU gloo, 1 thread per rank")
    print("| W | mode | activation MiB / rank | x unsharded | x ideal 1/W | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['mode']} | {r['activation_bytes'] / 2**20:.1f} | {r['vs_unsharded']:.3f} | "
              f"{r['vs_ideal']:.2f} | {r['step_ms']:.0f} |")
    summary = {"config": CONFIG, "batch": ns.batch, "seq": ns.seq, "rows": rows}
    print(json.dumps(summary))
    if ns.out:
        path = Path(__file__).parent / "results" / f"sequence_memory-{time.strftime('%Y%m%d-%H%M')}-cpu.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
