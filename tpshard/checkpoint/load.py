"""Loading one rank of a checkpoint: its group, the model checked against the manifest, and
the meta parameters and buffers of the sharded module filled from the rank file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tpshard import comm
from tpshard.checkpoint.manifest import MANIFEST_NAME, Manifest
from tpshard.checkpoint.safetensors_io import CheckpointError

__all__: list[str] = []


def _job_running() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _load_group(manifest: Manifest, rank: int | None, group: Any) -> comm.Group:
    n = manifest.world_size
    path = manifest.directory / MANIFEST_NAME if manifest.directory else MANIFEST_NAME
    if group is None and rank is not None and not _job_running():
        if not 0 <= rank < n:
            raise CheckpointError(f"rank {rank} is outside the {n} ranks of {path}")
        return comm.OfflineGroup(rank, n)
    g = comm.resolve_group(group)
    if g.size != n:
        if group is None and not _job_running():
            raise CheckpointError(f"{path} is for world size {n}, but no torch.distributed job is running; launch "
                                  f"{n} ranks (torchrun --nproc-per-node {n}), or pass rank=R to build one rank's "
                                  "module offline")
        raise CheckpointError(f"{path} is for world size {n}, but this job's tensor-parallel group has {g.size} "
                              f"ranks; run with {n} ranks, or reshard it first: tpshard reshard "
                              f"{manifest.directory} --world-size {g.size} --out NEW_DIR")
    if rank is not None and rank != g.rank:
        raise CheckpointError(f"rank={rank} was asked for, but this process is rank {g.rank} of its group")
    return g


def _check_model(module: nn.Module, manifest: Manifest) -> None:
    """The model's state_dict has the checkpoint's tensors (ties included), with the same shapes."""
    path = manifest.directory / MANIFEST_NAME if manifest.directory else MANIFEST_NAME
    have = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    want = {k: t.shape for k, t in manifest.tensors.items()}
    want.update({alias: manifest.tensors[canon].shape for alias, canon in manifest.ties.items()})
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    differ = [f"{k} (model {list(have[k])}, checkpoint {list(want[k])})" for k in want if k in have and have[k] != want[k]]
    if missing or extra or differ:
        parts = ([f"not in the model: {missing[:4]}"] if missing else []) + \
                ([f"not in the checkpoint: {extra[:4]}"] if extra else []) + \
                ([f"shape differs: {differ[:3]}"] if differ else [])
        raise CheckpointError(f"the model ({type(module).__name__}) does not match {path}: " + "; ".join(parts)
                              + "; build the model the checkpoint was made from")


def _real_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in module.named_buffers(remove_duplicate=False) if not b.is_meta}


def _owners(module: nn.Module, kind: str) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (owner module, attribute, qualified name) holding it, ties included."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for attr, t in getattr(mod, kind).items():
            if t is not None:
                out.setdefault(id(t), []).append((mod, attr, f"{prefix}.{attr}" if prefix else attr))
    return out


def _fill(sharded: nn.Module, stored: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          manifest: Manifest, group: comm.Group, device: Any, path: Path) -> None:
    """Replace the meta parameters and buffers of ``sharded``: from the rank file (``stored``),
    else (non-persistent buffers) this rank's part of the model's real buffer."""
    for kind in ("_parameters", "_buffers"):
        for holders in _owners(sharded, kind).values():
            old = getattr(holders[0][0], kind)[holders[0][1]]
            names = [q for _, _, q in holders]
            key = next((manifest.ties.get(q, q) for q in names if manifest.ties.get(q, q) in stored), None)
            if key is not None:
                value = stored[key]
            elif kind == "_buffers" and any(q in buffers for q in names):
                q = next(q for q in names if q in buffers)
                spec = manifest.plan.params.get(q)
                value = spec.shard(buffers[q], group.rank, group.size) if spec is not None else buffers[q]
                value = value.clone()
            else:
                raise CheckpointError(
                    f"{names[0]} is in neither {path} nor the model (it is on the meta device): a non-persistent "
                    "buffer is not saved in checkpoints; build the model under tpshard.checkpoint.empty_weights() "
                    "(parameters on meta, buffers real), or pass a zero-argument factory")
            if tuple(value.shape) != tuple(old.shape):
                raise CheckpointError(f"{path}: shape mismatch for {names[0]}: {list(value.shape)} stored, the "
                                      f"sharded model expects {list(old.shape)}; the plan in the manifest does not fit "
                                      "this model")
            value = value.to(device=device if device is not None else value.device, dtype=old.dtype)
            if kind == "_parameters":
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            for owner, attr, _ in holders:
                getattr(owner, kind)[attr] = value
