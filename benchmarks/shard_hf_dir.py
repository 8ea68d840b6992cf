"""Peak memory of `tpshard shard DIR -n N` on a multi-GB Hugging Face model directory.

    python benchmarks/shard_hf_dir.py [--world-size 4] [--layers 3] [--hidden 4096] [--repeat 2]

A Llama config (hidden 4096, GQA, float32) is written as ``config.json``, and random weights
are written with safetensors directly, tensor by tensor, into files of at most 1 GB with a
``model.safetensors.index.json`` — the model is never built in memory (only on the meta device,
for the names and shapes). Then, in its own subprocess spawned from a torch-free helper (see
``shard_checkpoint.py``), ``python -m tpshard shard DIR -n N --out OUT`` runs; its peak RSS
(``ru_maxrss``) is compared with the baseline measured in the same run: a subprocess that
imports torch, tpshard and the transformers Llama code and exits. Target: at most 1.5x the
largest tensor above that baseline. The rank files are checked against the source (every
tensor's shards joined back equal it). Prints one JSON object; temporary files are removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shard_checkpoint import Spawner  # noqa: E402

from tpshard import checkpoint  # noqa: E402

BASELINE = ("import torch, tpshard, tpshard.cli, tpshard.checkpoint, safetensors.torch, transformers, "
            "transformers.models.llama.modeling_llama")
FILE_BYTES = 1 << 30


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def write_directory(directory: Path, hidden: int, layers: int) -> tuple[int, int, int, int]:
    """config.json, weights in files of at most 1 GB, the index; (bytes, largest, tensors, files)."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 256 * 256,
                            num_hidden_layers=layers, num_attention_heads=hidden // 128,
                            num_key_value_heads=max(1, hidden // 512), vocab_size=32000,
                            max_position_embeddings=2048, dtype="float32")
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    with checkpoint.empty_weights():
        model = tf.LlamaForCausalLM(config)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()]
    groups: list[list] = [[]]
    size = 0
    for entry in layout:
        n = nbytes(entry[2], entry[1])
        if groups[-1] and size + n > FILE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with checkpoint.SafetensorsWriter(directory / name, group, {"format": "pt"}) as w:
            for key, dtype, shape in group:
                w.write(key, torch.randn(shape, generator=gen, dtype=dtype))
                weight_map[key] = name
    total = sum(nbytes(s, d) for _, d, s in layout)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    largest = max(nbytes(s, d) for _, d, s in layout)
    return total, largest, len(layout), len(groups)


def check(directory: Path, ckpt: Path) -> bool:
    """Every source tensor equals its shards joined (one tensor in memory at a time)."""
    from safetensors import safe_open

    manifest = checkpoint.read_manifest(ckpt)
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    ranks = [safe_open(str(manifest.rank_path(r)), "pt") for r in range(manifest.world_size)]
    for name, info in manifest.tensors.items():
        with safe_open(str(directory / index[name]), "pt") as f:
            full = f.get_tensor(name)
        if not torch.equal(info.spec.unshard([r.get_tensor(name) for r in ranks]), full):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4, help="ranks to shard for")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each measurement")
    ap.add_argument("--tmp", default=None, help="work directory (default: a new one under $TMPDIR)")
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tpshard-hfdir-", dir=ns.tmp))
    spawner = Spawner()
    try:
        src = work / "model"
        total, largest, count, files = write_directory(src, ns.hidden, ns.layers)
        base, peaks, walls = [], [], []
        for i in range(ns.repeat):
            base.append(spawner.run([sys.executable, "-c", BASELINE], work)[1])
            out = work / f"ck-{i}"
            wall, rss = spawner.run([sys.executable, "-m", "tpshard", "shard", str(src), "-n", str(ns.world_size),
                                     "--out", str(out)], work)
            peaks.append(rss)
            walls.append(wall)
        ok = check(src, work / "ck-0")
        baseline = statistics.median(base)
        over = statistics.median(peaks) - baseline
        print(json.dumps({
            "command": f"python -m tpshard shard DIR -n {ns.world_size} --out OUT",
            "directory": {"bytes": total, "gb": round(total / 1e9, 2), "files": files, "tensors": count,
                          "largest_tensor_mb": round(largest / 2**20, 1)},
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": [round(p, 1) for p in peaks],
            "rss_over_baseline_mb": round(over, 1),
            "rss_over_baseline_per_largest_tensor": round(over * 2**20 / largest, 2),
            "target_per_largest_tensor": 1.5, "wall_s": [round(w, 2) for w in walls],
            "rank_files_match_source": ok,
        }, indent=1))
    finally:
        spawner.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
