"""What ``tpshard.parallelize`` costs, stage by stage, in a fresh process; print JSON.

    python benchmarks/parallelize_stages.py [--model gpt] [--world-size 2] [--repeat 3]

Stages: import torch, import tpshard, build the model, capture (tracing and shape propagation),
plan, rewrite (rank 0's module for an OfflineGroup: no collectives run), and a second
``parallelize`` in the same process (the warm cost). Each repeat is a new interpreter, so the
import and first-capture costs are what a rank pays at start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import tpshard
from tpshard import models
from tpshard.compiler.capture import capture
from tpshard.compiler.planner import make_plan
from tpshard.compiler.rewrite import rewrite
t2 = time.perf_counter()
model, args = models.build(sys.argv[1])
t3 = time.perf_counter()
c = capture(model, args)
t4 = time.perf_counter()
plan = make_plan(c.gm, c.ops, int(sys.argv[2]), None, c.kind)
t5 = time.perf_counter()
rewrite(c, plan, tpshard.OfflineGroup(0, int(sys.argv[2])))
t6 = time.perf_counter()
tpshard.parallelize(model, int(sys.argv[2]), example_inputs=args, group=tpshard.OfflineGroup(0, int(sys.argv[2])))
t7 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "import_tpshard": t2 - t1, "build": t3 - t2, "capture": t4 - t3,
                  "plan": t5 - t4, "rewrite": t6 - t5, "parallelize_warm": t7 - t6, "capture_kind": c.kind}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    runs = []
    for _ in range(a.repeat):
        out = subprocess.run([sys.executable, "-c", _CHILD, a.model, str(a.world_size)], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    stages = [k for k in runs[0] if k != "capture_kind"]
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in stages}
    cold = sum(med[k] for k in ("import_tpshard", "build", "capture", "plan", "rewrite"))
    print(json.dumps({"benchmark": "parallelize_stages", "model": a.model, "world_size": a.world_size,
                      "capture_kind": runs[0]["capture_kind"], "median_s": med,
                      "first_parallelize_after_torch_import_s": round(cold, 3)}))


if __name__ == "__main__":
    main()
