"""Equivalence checks on one machine: every reference model (and the Hugging Face GPT-2 and
Llama, when ``transformers`` is installed and tpshard can plan them), sharded over 2 and 4
ranks, in float32 and bfloat16, against the original — with :func:`tpshard.verify`.

    python3 benchmarks/gpu_check.py                    # CUDA: ranks share the GPU(s)
    python3 benchmarks/gpu_check.py --device cpu       # the same checks on CPU ranks
    python3 benchmarks/gpu_check.py --device cpu --seeds 3 --hf no   # tolerance measurements
    python3 benchmarks/gpu_check.py --device cpu --defect 0.1 --dtypes bfloat16   # must all fail

Prints one JSON line per check (model, dtype, world size, pass, largest relative error and
largest error in noise units per kind of compared tensor, collectives, seconds) and a summary
line per dtype: the worst error in noise units (``max|sharded - float64| / noise``, the
measurements behind the margins of ``tpshard.verify.DEFAULT_TOLERANCES``), and the share of
its tolerance the worst tensor used. ``--defect DELTA`` scales every all-reduce result by
``1 + DELTA`` inside the ranks (a bug injected from outside tpshard): then every check must
be reported different, and the summary gives the weakest detection (the smallest, over
checks, of the largest error in noise units). Exit status 0 when every check came out as
expected (equivalent; with ``--defect``, not equivalent; skipped ones included), 1 otherwise,
2 on a usage error. A check that would end past ``--budget`` seconds is not started
(reported skipped), so the run ends in time with its summary. On one GPU the ranks share it
(gloo over CUDA tensors; NCCL needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any, Callable

import torch

import tpshard
from tpshard import models
from tpshard.compiler.capture import CaptureError
from tpshard.verify.launch import RankError, RankTimeout
from tpshard.plan import PlanError
from tpshard.testing import _scale_all_reduce
from tpshard.verify import _verify, default_tolerance

Builder = Callable[[int], tuple[torch.nn.Module, tuple]]


def reference_builder(name: str, batch: int) -> Builder:
    return lambda seed: models.build(name, dtype=torch.float32, seed=seed, batch=batch)


def hf_builders(batch: int) -> dict[str, Builder]:
    """Small randomly initialized Hugging Face models (nothing downloaded); {} without transformers."""
    try:
        import transformers
    except ImportError:
        return {}
    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=128, use_cache=False, bos_token_id=0, eos_token_id=0)

    def gpt2(seed: int) -> tuple[torch.nn.Module, tuple]:
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(cfg).eval(), (_ids(batch, seed),)

    def llama(seed: int) -> tuple[torch.nn.Module, tuple]:
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, **common)
        return transformers.LlamaForCausalLM(cfg).eval(), (_ids(batch, seed),)

    return {"hf-gpt2": gpt2, "hf-llama": llama}


def _ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, 8), generator=torch.Generator().manual_seed(seed))


def run_check(name: str, build: Builder, dtype: str, world: int, seed: int, device: str, timeout: float,
              defect: float = 0.0) -> dict:
    """One verify run as a JSON-ready row; planning refusals are 'skipped', not failures.
    ``defect``: every all-reduce result scaled by ``1 + defect`` in the ranks (0: none)."""
    row: dict[str, Any] = {"check": f"{name}/{dtype}/world{world}/seed{seed}", "model": name, "dtype": dtype,
                           "world_size": world, "seed": seed, "device": device, "defect": defect}
    t = time.perf_counter()
    try:
        model, args = build(seed)
        tamper = functools.partial(_scale_all_reduce, defect) if defect else None
        report = _verify(model, world, example_inputs=args, device=device, dtype=dtype, timeout=timeout,
                         _tamper=tamper)
    except (PlanError, CaptureError) as e:
        row.update(status="skipped", reason=f"tpshard cannot plan it: {str(e).splitlines()[0][:200]}")
    except (RankError, RankTimeout) as e:
        row.update(status="failed", reason=str(e)[-2000:])
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[-2000:]}")
    else:
        d = report.to_dict()
        margin = default_tolerance(dtype).margin
        units = {k: _round(v * margin) for k, v in d["tolerance_used"].items() if isinstance(v, float)}
        worst = max(report.comparisons, key=lambda c: c.max_abs / c.tol if c.tol > 0 else 0.0)
        expected = report.ok != bool(defect)
        row.update(status="passed" if expected else "failed", equivalent=report.ok, backend=report.backend,
                   max_rel={k: _round(v) for k, v in d["max_rel"].items() if isinstance(v, float)},
                   noise_units=units, worst={"name": worst.name, "max_abs": _round(worst.max_abs),
                                             "tol": _round(worst.tol), "basis": worst.basis},
                   tolerance_used=_round(report.tolerance_used()), failed=d["failed"][:10],
                   first_divergence=report.first_divergence,
                   collectives={p: report.collective_counts(p) for p in ("forward", "backward")})
    row["seconds"] = round(time.perf_counter() - t, 2)
    return row


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def summarize(rows: list[dict], device: str, seconds: float, defect: float = 0.0) -> dict:
    """Per dtype: the worst error in noise units per kind and overall; with a defect, the
    weakest detection (the smallest per-check worst) and the checks that missed it."""
    worst: dict[str, dict[str, float]] = {}
    per_check: dict[str, list[float]] = {}
    for r in rows:
        units = r.get("noise_units") or {}
        for kind, v in units.items():
            slot = worst.setdefault(r["dtype"], {})
            slot[kind] = max(slot.get(kind, 0.0), v)
        if units:
            per_check.setdefault(r["dtype"], []).append(max(units.values()))
    count = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "skipped")}
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    out = {"summary": True, "device": device, "gpu": gpu, "torch": torch.__version__,
           "tpshard": tpshard.__version__, "defect": defect, "checks": len(rows), **count,
           "worst_noise_units": {k: {kk: _round(vv) for kk, vv in v.items()} for k, v in worst.items()},
           "margin": {k: default_tolerance(k).margin for k in worst}}
    if defect:
        out["weakest_detection_noise_units"] = {k: _round(min(v)) for k, v in per_check.items()}
        out["missed"] = [r["check"] for r in rows if r.get("equivalent")]
    else:
        out["worst_check_noise_units"] = {k: _round(max(v)) for k, v in per_check.items()}
    out["seconds"] = round(seconds, 1)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--models", nargs="+", default=["mlp", "gpt", "llama"],
                    help="reference models (mlp gpt llama) and/or Hugging Face ones (hf-gpt2 hf-llama)")
    ap.add_argument("--hf", choices=["auto", "no"], default="auto",
                    help="also the Hugging Face models (auto: when transformers is installed)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per configuration (for measurements)")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per check")
    ap.add_argument("--defect", type=float, default=0.0,
                    help="scale every all-reduce result by 1 + DEFECT in the ranks: every check must fail")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds for the whole run: later checks are reported skipped (default 270)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run with --device cpu", file=sys.stderr)
        return 2
    builders: dict[str, Builder] = {m: reference_builder(m, ns.batch) for m in ns.models if not m.startswith("hf-")}
    only_hf = [m for m in ns.models if m.startswith("hf-")]
    if ns.hf == "auto":
        hf = hf_builders(ns.batch)
        if not hf:
            print(json.dumps({"note": "transformers is not installed: Hugging Face checks skipped"}), flush=True)
        builders.update({m: b for m, b in hf.items() if not only_hf or m in only_hf})
    t0 = time.perf_counter()
    rows: list[dict] = []
    longest = 0.0  # the slowest check so far: one that would end past the budget is not started
    for name, build in builders.items():
        for dtype in ns.dtypes:
            for world in ns.worlds:
                for seed in range(ns.seeds):
                    if time.perf_counter() - t0 + longest > ns.budget:
                        row = {"check": f"{name}/{dtype}/world{world}/seed{seed}", "model": name, "dtype": dtype,
                               "world_size": world, "seed": seed, "device": ns.device, "status": "skipped",
                               "reason": f"would end past the {ns.budget:.0f} s budget"}
                    else:
                        row = run_check(name, build, dtype, world, seed, ns.device, ns.timeout, ns.defect)
                        longest = max(longest, row["seconds"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = summarize(rows, ns.device, time.perf_counter() - t0, ns.defect)
    print(json.dumps(summary), flush=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
