"""Fuzz the pass: random models (tests/fuzz_models.py), each sharded at world sizes 2 and 4 on
real gloo ranks and compared in float64 with the unsharded model (outputs, input and parameter
gradients, a step, a second forward). Prints counts as JSON.

    python benchmarks/fuzz_pass.py --examples 500 [--world-sizes 2,4] [--seed 0] [--timeout 6]
                                   [--shrink 3]

Counts are over runs (an example at one world size); ``by_world`` splits them. "sharded": the
plan gave at least one linear or embedding a non-replicate style. Every refusal message is
bucketed in ``refusal_reasons`` (sizes, names and node names replaced by placeholders), and
``refusals_naming_no_node`` counts those whose message names no node or module of the model.
Mismatches are sorted into the known bug classes by a heuristic (:func:`classify`);
``--shrink K`` greedily shrinks up to K mismatching examples, the first of each class and
every unclassified one (on real ranks, keeping the failure's kind: outputs wrong, or only
gradients), and prints each distinct result as a Python model definition (on stderr, and in
the JSON).
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


# -- a heuristic classification of mismatches by the known bug classes ---------------------------

_PASS = ("act", "scale", "view", "transpose", "permute", "item", "split", "unsqueeze")


def _from_linear(spec: dict, i: int, through: tuple = _PASS) -> bool:
    """Is node i a linear output, possibly through ops that keep its feature split?"""
    nodes = spec["nodes"]
    while nodes[i]["op"] in through:
        i = nodes[i]["in"][0]
    return nodes[i]["op"] in ("linear", "embedding")


def classify(spec: dict, result: dict, world: int) -> str:
    """Which known class a mismatch most likely is: a heuristic over the spec and the failing
    tensors (``--shrink`` gives minimal models; every class below was confirmed that way).

    - row-output-plus-itself: outputs wrong, and a linear's output is added to itself (``y + y``
      of a row-parallel output: the partial sums add up, the bias deferred past the add is
      added once instead of twice);
    - replicated-param-times-split: only gradients of learnable scalars/vectors or norm weights
      fail (a replicated parameter multiplying a split value gets a partial gradient);
    - reduction-of-gathered-column: a reduction consumes a linear's output;
    - replicated-activation-times-split: a q @ k^T whose operands are not split by whole heads
      (one head, a head count the world size does not divide, no heads, or not a linear's
      output): the planner contracts the split head_dim into an all-reduced value (or keeps a
      replicated one), which then multiplies a split value and gets a partial gradient;
    - unclassified.
    """
    nodes = spec["nodes"]
    what = [f[1] for f in result["failures"]]
    mods = {n.get("mod"): n for n in nodes}
    grads = [w.split()[-1] for w in what if w.startswith("grad ")]

    def is_param_grad(name: str) -> bool:
        return mods.get(name.split(".")[0], {}).get("op") in ("param", "norm")

    def source(i: int) -> int:
        while nodes[i]["op"] in _PASS + ("scale",):
            i = nodes[i]["in"][0]
        return i

    if any(w.startswith("output") for w in what) and any(
            n["op"] == "binary" and n["fn"] in ("add", "sub") and source(n["in"][0]) == source(n["in"][1])
            and nodes[source(n["in"][0])]["op"] == "linear" for n in nodes):
        return "row-output-plus-itself"
    if grads and all(is_param_grad(g) for g in grads) and "input grad" not in what:
        return "replicated-param-times-split"
    if any(n["op"] == "reduce" and _from_linear(spec, n["in"][0]) for n in nodes):
        return "reduction-of-gathered-column"

    def heads_of(i: int) -> int:
        """The head count a matmul operand is split into (0: none)."""
        while nodes[i]["op"] in _PASS:
            shape = nodes[i]["shape"]
            if nodes[i]["op"] == "view" and len(shape) >= 4:
                return shape[3] if len(shape) == 5 and shape[2] == 3 else shape[2]
            i = nodes[i]["in"][0]
        return 0

    if any(n["op"] in ("matmul_t", "sdpa") and any(heads_of(j) % world or heads_of(j) == 0 for j in n["in"][:2])
           for n in nodes):
        return "replicated-activation-times-split"
    return "unclassified"


def _compact(f: list) -> list:
    return [f[0], f[1], *(round(v, 6) if isinstance(v, float) else v for v in f[2:])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=6.0, help="seconds allowed per example in a launch")
    ap.add_argument("--shrink", type=int, default=0, help="shrink up to K mismatches: the first of each class, every unclassified one")
    ap.add_argument("--max-mismatch-examples", type=int, default=5)
    ap.add_argument("--results", help="also write every run's result (with its spec) to this JSONL file")
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
    classes: collections.Counter = collections.Counter()
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
                cls = classify(specs[i], r, w)
                classes[cls] += 1
                r["class"] = cls
                if all(j != i for _, j, _ in first_mismatches) and (
                        cls == "unclassified" or all(m[2]["class"] != cls for m in first_mismatches)):
                    first_mismatches.append((w, i, r))
                if len(mismatch_examples) < args.max_mismatch_examples:
                    mismatch_examples.append({
                        "example": i, "world": w, "class": cls, "nodes": len(specs[i]["nodes"]),
                        "ops": [n["op"] for n in specs[i]["nodes"]],
                        "failures": [_compact(f) for f in r["failures"][:4]]})
            elif r["status"] == "error" and len(error_examples) < args.max_mismatch_examples:
                error_examples.append({"example": i, "world": w, "stage": r.get("stage"),
                                       "reason": (r.get("reason") or "")[-400:]})
        if args.results:
            with open(args.results, "a") as f:
                for i, r in enumerate(res):
                    f.write(json.dumps({"example": i, "world": w, **r, "spec": specs[i]}, default=str) + "\n")
        c["seconds"] = round(time.perf_counter() - tw, 1)
        by_world[w] = dict(c)
        totals.update({k: v for k, v in c.items() if k != "seconds"})
        log(f"world {w}: {dict(c)}")

    reproducers = []
    seen_code: set[str] = set()
    first_mismatches.sort(key=lambda m: m[2]["class"] != "unclassified")
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
        "mismatch_classes": dict(classes.most_common()),
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
