"""Merge into what the ecosystem reads: a ``save_pretrained``-style directory.

``config.json`` (the one the checkpoint was sharded from, recorded in its manifest), the full
tensors in ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each (one
``model.safetensors`` when they fit) and ``model.safetensors.index.json``, so that
``from_pretrained(OUT)`` loads it. A tied parameter is written under each of its names, so
``load_state_dict(strict=True)`` of the original model works too. Streaming as in
:func:`tpshard.checkpoint.merge`: a chunk of rows at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tpshard.checkpoint.manifest import Manifest
from tpshard.checkpoint.safetensors_io import SafetensorsWriter, _nbytes
from tpshard.checkpoint.weights import INDEX_NAME, WeightSource

__all__ = ["write_model_dir", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 5 << 30  # Hugging Face's default max_shard_size, 5 GB


def _groups(layout: list[tuple[str, str, torch.dtype, tuple[int, ...]]],
            max_bytes: int) -> list[list[tuple[str, str, torch.dtype, tuple[int, ...]]]]:
    """Consecutive runs of tensors of at most ``max_bytes`` each (a larger tensor alone)."""
    groups: list[list] = [[]]
    size = 0
    for entry in layout:
        n = _nbytes(entry[3], entry[2])
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def write_model_dir(manifest: Manifest, source: WeightSource, out: Path,
                    write_tensor: Callable[[str, str, torch.dtype, tuple, SafetensorsWriter], None],
                    progress: Callable[[int], None], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write ``out`` (an existing empty directory): config, safetensors files and their index.

    ``write_tensor(name, source_name, dtype, shape, writer)`` streams one full tensor of
    ``source`` into ``writer``; ``progress(nbytes)`` is called after each.
    """
    layout = []  # (name in the output, name in the checkpoint, dtype, shape), aliases after their canonical
    aliases: dict[str, list[str]] = {}
    for alias, canon in manifest.ties.items():
        aliases.setdefault(canon, []).append(alias)
    for name, info in manifest.tensors.items():
        layout.append((name, name, info.torch_dtype, info.shape))
        layout.extend((a, name, info.torch_dtype, info.shape) for a in aliases.get(name, []))
    groups = _groups(layout, max_shard_bytes)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups):
        with SafetensorsWriter(out / fname, [(o, d, s) for o, _, d, s in group], {"format": "pt"}) as writer:
            for o, src, d, s in group:
                write_tensor(o, src, d, s, writer)
                progress(_nbytes(s, d))
                weight_map[o] = fname
    total = sum(_nbytes(s, d) for _, _, d, s in layout)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    config = (manifest.source or {}).get("config")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
