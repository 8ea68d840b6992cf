"""Plan Hugging Face Llama-2-7B and a 70B-shaped Llama on the meta device; print JSON.

    python benchmarks/plan_time.py [--world-size 8] [--repeat 3] [--models 7b,70b] [--reference]

Nothing is materialized: each model is built from its config on the meta device and
``tpshard.plan`` reads it (capture through torch.export, repeated blocks captured as two and
stamped, planned once). The baseline, measured in the same run on the same model, is a bare
``torch.export.export`` of it (static shapes, ``use_cache=False``), the cost any export-based
planner pays before planning anything. A tiny model is exported first, so that neither side is
charged with torch.export's first-call imports.

``--reference`` adds tpshard's own 7B-shaped reference Llama (symbolic tracing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

import tpshard

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_llama(**cfg: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**cfg))


def bare_export(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
    return time.perf_counter() - t


def time_plan(model: torch.nn.Module, example: tuple, world_size: int, repeat: int) -> tuple[list[float], tpshard.Plan]:
    times, plan = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        plan = tpshard.plan(model, world_size, example_inputs=example)
        times.append(time.perf_counter() - t)
    return times, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="7b,70b")
    ap.add_argument("--reference", action="store_true", help="also tpshard's 7B-shaped reference Llama")
    args = ap.parse_args()
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    rss0 = peak_rss_mb()
    warm = bare_export(hf_llama(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4), ids)
    results = []
    for name in args.models.split(","):
        model = hf_llama(**SHAPES[name])
        export_s = bare_export(model, ids)
        plan_s, plan = time_plan(model, (ids,), args.world_size, args.repeat)
        local, full = plan.param_counts()
        results.append({
            "model": f"hf-llama-{name}", "layers": SHAPES[name]["num_hidden_layers"], "params": full,
            "params_rank0_fraction": round(local / full, 4),
            "bare_export_s": round(export_s, 3),
            "plan_s_median": round(statistics.median(plan_s), 3),
            "plan_s_all": [round(t, 3) for t in plan_s],
            "ratio_plan_to_export": round(statistics.median(plan_s) / export_s, 3),
            "materialized_params": sum(not p.is_meta for p in model.parameters()),
            "collectives_per_step": plan.collective_counts(),
        })
    if args.reference:
        from tpshard import models

        cfg = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layer=32, n_head=32,
                   n_kv_head=32, max_seq=4096)
        model, example = models.build("llama", device="meta", **cfg)
        plan_s, plan = time_plan(model, example, args.world_size, args.repeat)
        results.append({"model": "reference-llama-7b", "plan_s_median": round(statistics.median(plan_s), 3),
                        "plan_s_all": [round(t, 3) for t in plan_s]})
    print(json.dumps({"benchmark": "plan_time", "torch": torch.__version__, "world_size": args.world_size,
                      "warmup_export_s": round(warm, 3), "results": results,
                      "peak_rss_mb_over_start": round(peak_rss_mb() - rss0, 1)}))


if __name__ == "__main__":
    main()
