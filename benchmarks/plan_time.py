"""Plan and rewrite a 7B-shaped Llama on the meta device; print JSON (seconds, peak RSS).

    python benchmarks/plan_time.py [--world-size 8] [--layers 32] [--repeat 3]

Nothing is materialized: the model lives on the meta device, ``tpshard.plan`` reads it, and
``tpshard.parallelize`` builds rank 0's module for an OfflineGroup (no collectives run).
The baseline in the same run is the cost of building the meta model itself.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

import tpshard
from tpshard import models


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layer=args.layers,
               n_head=32, n_kv_head=32, max_seq=4096)
    rss0 = peak_rss_mb()
    build_s, plan_s, par_s = [], [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        model, example = models.build("llama", device="meta", **cfg)
        build_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        plan = tpshard.plan(model, args.world_size, example_inputs=example)
        plan_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        rank0 = tpshard.parallelize(model, args.world_size, example_inputs=example, plan=plan,
                                    group=tpshard.OfflineGroup(0, args.world_size))
        par_s.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters())
    local = sum(p.numel() for p in rank0.parameters())
    materialized = [n for n, p in rank0.named_parameters() if not p.is_meta]
    result = {
        "benchmark": "plan_time",
        "torch": torch.__version__,
        "world_size": args.world_size,
        "layers": args.layers,
        "params": n_params,
        "params_rank0": local,
        "build_meta_model_s_median": round(statistics.median(build_s), 3),
        "plan_s_median": round(statistics.median(plan_s), 3),
        "parallelize_s_median": round(statistics.median(par_s), 3),
        "plan_plus_parallelize_s_median": round(statistics.median(p + q for p, q in zip(plan_s, par_s)), 3),
        "ratio_plan_to_build": round(statistics.median(plan_s) / statistics.median(build_s), 2),
        "peak_rss_mb_over_start": round(peak_rss_mb() - rss0, 1),
        "materialized_params": len(materialized),
        "collectives_per_step": plan.collective_counts(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
