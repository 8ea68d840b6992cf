"""Shard a >1 GB checkpoint to N ranks: `tpshard shard` (streaming) against the naive way.

    python benchmarks/shard_checkpoint.py [--world-size 4] [--layers 4] [--repeat 3]

A Llama-shaped model's float32 weights (random data, written tensor by tensor) are saved as
one .safetensors file in a temporary directory. Then, in interleaved repetitions, each method
runs in its own subprocess, whose wall time and peak RSS (``ru_maxrss`` from ``os.wait4`` of
that very child, spawned from a small torch-free helper so that its parent's memory does not
count) are measured:

- tpshard: ``python -m tpshard.cli shard MODEL --weights FILE -n N --out DIR`` — the model is
  built without weights, each tensor is read, split and appended to the rank files;
- naive: ``safetensors.torch.load_file`` (the whole model in memory), each tensor sliced with
  the same Plan's shards, ``save_file`` per rank.

The baseline is a subprocess that imports torch and tpshard and exits. Targets: tpshard's peak
RSS at most 1.5x the largest tensor above that baseline, and not slower than the naive way.
Both methods' rank files are checked to hold the same tensors. Prints one JSON object;
temporary files are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from tpshard import checkpoint, models

# The model factory `tpshard shard` imports (MODEL = bench_model:build), written into the work dir.
FACTORY = """\
from tpshard import models

CONFIG = {config!r}

def build():
    return models.build("llama", **CONFIG)
"""

# The naive way: everything in memory, then one save_file per rank.
NAIVE = """\
import sys
from safetensors.torch import load_file, save_file
from tpshard import checkpoint
import bench_model

src, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
with checkpoint.empty_weights():
    model, args = bench_model.build()
plan = checkpoint.plan_model(model, world, example_inputs=args)
state = load_file(src)
for r in range(world):
    shards = {{k: (plan.params[k].shard(v, r, world) if k in plan.params else v).contiguous()
              for k, v in state.items()}}
    save_file(shards, f"{{out}}/rank-{{r:05d}}-of-{{world:05d}}.safetensors")
"""

BASELINE = "import torch, tpshard, tpshard.cli, tpshard.checkpoint, safetensors.torch"


# Measures one command at a time, from a process that never imports torch. A child's peak RSS
# (ru_maxrss) includes the memory of the process it was spawned from at exec time — a vfork'ed
# child execs from its parent's address space — so children are spawned from this small one.
SPAWNER = """\
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    err = open(job["stderr"], "wb")
    start = time.perf_counter()
    proc = subprocess.Popen(job["argv"], cwd=job["cwd"], env=job["env"], stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}),
          flush=True)
"""


class Spawner:
    """Runs commands in a torch-free helper process; returns (wall s, peak RSS MB) per command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SPAWNER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], cwd: Path) -> tuple[float, float]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
        errfile = cwd / "stderr.txt"
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stderr": str(errfile)}) + "\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.readline())
        if res["rc"] != 0:
            raise RuntimeError(f"{argv} failed ({res['rc']}):\n{errfile.read_text()[-3000:]}")
        return res["wall"], res["maxrss_kb"] / 1024  # Linux reports KiB

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def write_weights(path: Path, config: dict) -> tuple[int, int, int]:
    """Random float32 weights of the model, written tensor by tensor; (bytes, largest, count)."""
    with checkpoint.empty_weights():
        model, _ = models.build("llama", **config)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    with checkpoint.SafetensorsWriter(path, layout, {"format": "pt"}) as w:
        for name, dtype, shape in layout:
            w.write(name, torch.randn(shape, generator=gen, dtype=dtype))
    largest = max(checkpoint._nbytes(s, d) for _, d, s in layout)
    return path.stat().st_size, largest, len(layout)


def same_rank_files(a: Path, b: Path, world: int) -> bool:
    for r in range(world):
        name = checkpoint.rank_file_name(r, world)
        with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return False
            if any(not torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def summary(walls: list[float], rss: list[float], baseline: float) -> dict:
    return {"wall_s_median": round(statistics.median(walls), 2), "peak_rss_mb_median": round(statistics.median(rss), 1),
            "rss_over_baseline_mb": round(statistics.median(rss) - baseline, 1),
            "wall_s": [round(w, 2) for w in walls], "peak_rss_mb": [round(x, 1) for x in rss]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: the system's)")
    args = ap.parse_args()
    config = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, n_layer=args.layers, n_head=16,
                  n_kv_head=16, max_seq=2048)
    world = args.world_size
    work = Path(tempfile.mkdtemp(prefix="tpshard-bench-", dir=args.dir))
    spawner = Spawner()
    try:
        (work / "bench_model.py").write_text(FACTORY.format(config=config))
        (work / "naive.py").write_text(NAIVE.format())
        src = work / "model.safetensors"
        t = time.perf_counter()
        total, largest, count = write_weights(src, config)
        gen_s = time.perf_counter() - t

        methods = {
            "tpshard": lambda out: [sys.executable, "-m", "tpshard.cli", "shard", "bench_model:build", "--weights",
                                    str(src), "-n", str(world), "--out", str(out)],
            "naive": lambda out: [sys.executable, str(work / "naive.py"), str(src), str(out), str(world)],
        }
        base = [spawner.run([sys.executable, "-c", BASELINE], work)[1] for _ in range(args.repeat)]
        walls: dict[str, list[float]] = {m: [] for m in methods}
        rss: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(args.repeat):
            order = list(methods) if rep % 2 == 0 else list(reversed(methods))
            for m in order:
                out = work / f"out-{m}"
                shutil.rmtree(out, ignore_errors=True)
                if m == "naive":
                    out.mkdir()
                w, r = spawner.run(methods[m](out), work)
                walls[m].append(w)
                rss[m].append(r)
        identical = same_rank_files(work / "out-tpshard", work / "out-naive", world)
    finally:
        spawner.close()
        shutil.rmtree(work, ignore_errors=True)

    baseline = statistics.median(base)
    res = {m: summary(walls[m], rss[m], baseline) for m in methods}
    largest_mb = largest / 2**20
    over = res["tpshard"]["rss_over_baseline_mb"]
    result = {
        "benchmark": "shard_checkpoint",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "world_size": world,
        "model": {"llama": config},
        "checkpoint_mb": round(total / 2**20, 1),
        "tensors": count,
        "largest_tensor_mb": round(largest_mb, 1),
        "generate_s": round(gen_s, 2),
        "repeat": args.repeat,
        "baseline_rss_mb": round(baseline, 1),
        "tpshard": res["tpshard"],
        "naive": res["naive"],
        "ratios": {
            "tpshard_rss_over_baseline_per_largest_tensor": round(over / largest_mb, 2),
            "naive_over_tpshard_rss_over_baseline": round(res["naive"]["rss_over_baseline_mb"] / max(over, 1e-9), 2),
            "naive_over_tpshard_wall": round(res["naive"]["wall_s_median"] / res["tpshard"]["wall_s_median"], 2),
        },
        "targets": {
            "tpshard_rss_over_baseline_le_1.5x_largest_tensor": over <= 1.5 * largest_mb,
            "tpshard_not_slower_than_naive": res["tpshard"]["wall_s_median"] <= res["naive"]["wall_s_median"],
        },
        "same_rank_files": identical,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
