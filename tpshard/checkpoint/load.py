"""Loading one rank of a checkpoint (:func:`load_sharded`): its group, the model checked
against the manifest, the sharded module rewritten on the meta device from the manifest's Plan,
and its meta parameters and buffers filled from the rank file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tpshard import comm
from tpshard.checkpoint.manifest import MANIFEST_NAME, Manifest, _RankReader, read_manifest
from tpshard.checkpoint.model import _resolve_model
from tpshard.checkpoint.safetensors_io import CheckpointError
from tpshard.compiler import capture_for_plan, rewrite
from tpshard.models.meta import on_meta, to_meta
from tpshard.models.resolve import ModelLike

__all__ = ["load_sharded"]


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


def _off_meta(sharded: nn.Module, device: Any) -> None:
    """A graph captured on the meta device (torch.export bakes devices in: ``arange(...,
    device=meta)``, ``_assert_tensor_metadata(..., device=meta)``) made to run on ``device``."""
    target = torch.device(device if device is not None else "cpu")
    swap = lambda v: target if isinstance(v, torch.device) and v.type == "meta" else v  # noqa: E731
    for gm in sharded.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
                if any(swap(v) is target for v in node.kwargs.values()):
                    gm.graph.erase_node(node)  # an assertion of the capture's device, no value
                    changed = True
                    continue
            args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), swap)
            if (args, kwargs) != (node.args, node.kwargs):
                node.args, node.kwargs = args, kwargs
                changed = True
        if changed:
            gm.recompile()


# ---------------------------------------------------------------------------------------------
# Load one rank.


def load_sharded(model: ModelLike, directory: str | os.PathLike, *, rank: int | None = None, group: Any = None,
                 device: str | torch.device | None = None, example_inputs: tuple | None = None,
                 example_kwargs: dict | None = None) -> nn.Module:
    """This rank's sharded module (what :func:`tpshard.parallelize` returns), reading only this
    rank's file of the checkpoint in ``directory`` (and ``manifest.json``).

    ``model``: the architecture, built on the meta device — best under :func:`empty_weights`, so
    non-persistent buffers (rotary tables, causal masks) stay real — or a zero-argument factory
    (run under :func:`empty_weights`) returning a model, ``(model, args)`` or ``(model, args,
    kwargs)``. ``model`` is not modified. The rank comes from ``group`` (default: the
    tensor-parallel group, as in :func:`tpshard.parallelize`); without a running job, ``rank``
    builds that rank's module offline (it cannot run collectives). ``device``: where the
    tensors go (default CPU). Weights take the model's dtypes, as with ``load_state_dict``.
    The file's sha256 is checked in the same pass that reads it.

    Raises :class:`CheckpointError` naming the file and the fix when the world size differs
    from the manifest's, the rank file is missing, its checksum, shapes or dtypes do not
    match the manifest, or the manifest is from a newer format version.

    Example (one rank of a 2-rank checkpoint, offline)::

        >>> import tempfile, torch
        >>> from tpshard import checkpoint, models
        >>> ckpt = tempfile.mkdtemp() + "/llama"
        >>> _ = checkpoint.save_sharded(models.build("llama")[0], ckpt, 2, progress=False)
        >>> rank0 = load_sharded(lambda: models.build("llama"), ckpt, rank=0)
        >>> rank0.get_parameter("layers.0.mlp.down_proj.weight").shape, rank0.cos.is_meta
        (torch.Size([32, 32]), False)
    """
    manifest = read_manifest(directory)
    g = _load_group(manifest, rank, group)
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs, manifest.example_inputs)
    _check_model(module, manifest)
    buffers = _real_buffers(module)
    with on_meta(module):
        sharded = rewrite(capture_for_plan(module, to_meta(args), to_meta(kwargs), manifest.plan), manifest.plan, g)
    path = manifest.rank_path(g.rank)
    with _RankReader(manifest, g.rank) as reader:
        by_offset = sorted(reader.entries.values(), key=lambda e: e.begin)
        stored = {e.name: reader.read(e.name) for e in by_offset}
        reader.verify()
    _fill(sharded, stored, buffers, manifest, g, device, path)
    _off_meta(sharded, device)
    if device is not None:
        sharded.to(device)
    return sharded
