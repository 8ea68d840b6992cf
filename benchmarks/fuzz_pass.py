"""Fuzz the pass: random models (tests/fuzz_models.py), each sharded at world sizes 2 and 4 on
real gloo ranks and compared in float64 with the unsharded model (outputs, input and parameter
gradients, a step, a second forward). Prints counts as JSON.

    python benchmarks/fuzz_pass.py --examples 500 [--world-sizes 2,4] [--seed 0] [--timeout 6]
                                   [--shrink 3]

Counts are over runs (an example at one world size); ``by_world`` splits them. "sharded": the
plan gave at least one linear or embedding a non-replicate style. Every refusal message is
bucketed in ``refusal_reasons`` (sizes, names and node names replaced by placeholders), and
``refusals_naming_no_node`` counts those whose message names no node or module of the model.
``--shrink K`` greedily shrinks the first K mismatching examples (on real ranks, keeping the
failure's kind: outputs wrong, or only gradients) and prints each distinct result as a Python
model definition (on stderr, and in the JSON).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fuzz_models as fm  # noqa: E402


def _bucket(msg: str) -> str:
    """A refusal message with its particulars (names, sizes, shapes) replaced by placeholders."""
    first = msg.split(". ")[0]
    first = re.sub(r"'[^']*'", "'<name>'", first)
    first = re.sub(r"\([^()]*\)", "(...)", first)
    first = re.sub(r"\[[^\]]*\]", "[...]", first)
    first = re.sub(r"\b[a-z_]+\d+\b", "<mod>", first)
    first = re.sub(r"\d+", "N", first)
    return first[:160]


def _compact(f: list) -> list:
    return [f[0], f[1], *(round(v, 6) if isinstance(v, float) else v for v in f[2:])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=6.0, help="seconds allowed per example in a launch")
    ap.add_argument("--shrink", type=int, default=0, help="shrink the first K mismatching examples")
    ap.add_argument("--max-mismatch-examples", type=int, default=5)
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    specs = [fm.random_spec(f"{args.seed}:{i}") for i in range(args.examples)]
    by_world: dict[int, dict] = {}
    totals = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    examples_of_reason: dict[str, str] = {}
    mismatch_examples: list[dict] = []
    error_examples: list[dict] = []
    first_mismatches: list[tuple] = []  # (world, example, result), one per example
    naming_none = 0
    for w in worlds:
        tw = time.perf_counter()
        res = fm.run_examples(specs, w, seed=args.seed * 100_003, per_example_s=args.timeout, progress=log)
        c = collections.Counter()
        for i, r in enumerate(res):
            c["runs"] += 1
            c[r["status"]] += 1
            c["sharded"] += bool(r.get("sharded")) and r["status"] != "refused"
            if r["status"] == "refused":
                b = _bucket(r["reason"])
                reasons[b] += 1
                examples_of_reason.setdefault(b, r["reason"][:300])
                naming_none += not r.get("names_node", False)
            elif r["status"] == "mismatch":
                if all(j != i for _, j, _ in first_mismatches):
                    first_mismatches.append((w, i, r))
                if len(mismatch_examples) < args.max_mismatch_examples:
                    mismatch_examples.append({
                        "example": i, "world": w, "nodes": len(specs[i]["nodes"]),
                        "ops": [n["op"] for n in specs[i]["nodes"]],
                        "failures": [_compact(f) for f in r["failures"][:4]]})
            elif r["status"] == "error" and len(error_examples) < args.max_mismatch_examples:
                error_examples.append({"example": i, "world": w, "stage": r.get("stage"),
                                       "reason": (r.get("reason") or "")[-400:]})
        c["seconds"] = round(time.perf_counter() - tw, 1)
        by_world[w] = dict(c)
        totals.update({k: v for k, v in c.items() if k != "seconds"})
        log(f"world {w}: {dict(c)}")

    reproducers = []
    seen_code: set[str] = set()
    for (w, i, r) in first_mismatches[: args.shrink]:
        sig = fm.signature(r)
        log(f"shrinking example {i} (world {w}, outputs wrong={sig[0]}, grads wrong={sig[1]})")
        small, sr = fm.shrink(specs[i], w, r, seed=args.seed * 100_003 + i, progress=log)
        code = fm.to_python(small)
        if code in seen_code:
            continue
        seen_code.add(code)
        log(code)
        reproducers.append({"example": i, "world": w, "outputs_wrong": sig[0], "grads_wrong": sig[1],
                            "nodes": len(small["nodes"]), "failures": [_compact(f) for f in sr["failures"][:6]],
                            "python": code})

    runs = totals["runs"]
    report = {
        "examples": args.examples,
        "world_sizes": worlds,
        "runs": runs,
        "sharded": totals["sharded"],
        "sharded_fraction": round(totals["sharded"] / max(runs, 1), 3),
        "ok": totals["ok"],
        "refused": totals["refused"],
        "mismatched": totals["mismatch"],
        "errors": totals["error"],
        "by_world": by_world,
        "refusal_reasons": dict(reasons.most_common()),
        "refusal_reason_examples": examples_of_reason,
        "refusals_naming_no_node": naming_none,
        "mismatch_examples": mismatch_examples,
        "error_examples": error_examples,
        "reproducers": reproducers,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
