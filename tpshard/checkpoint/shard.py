"""Shard, merge and reshard: a checkpoint written or rewritten tensor by tensor, streaming.

Tensors go one at a time, and each in chunks of rows (32 MiB): rows along dim 0 are contiguous
in memory and on disk, and a split keeps every row whole, so each chunk is read (memory-mapped
just for that chunk: a map of the whole file would keep every page it touched resident), split
and appended to the rank files, whose safetensors headers were written up front from shapes and
dtypes. Files are written and hashed on worker threads meanwhile. Memory stays about one chunk
per rank whatever the size of the model or of its largest tensor. The model is only looked at
on the meta device. Output goes to a temporary sibling directory renamed at the end
(:mod:`tpshard.checkpoint.fsutil`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tpshard import layout
from tpshard.checkpoint.fsutil import _atomic_dir, _atomic_file, _check_replaceable, _Progress
from tpshard.checkpoint.hf_dir import DEFAULT_SHARD_BYTES, write_model_dir
from tpshard.checkpoint.load import _check_model
from tpshard.checkpoint.manifest import (
    Manifest,
    RankFile,
    TensorInfo,
    _rank_readers,
    _versions,
    _write_manifest,
    rank_file_name,
    read_manifest,
)
from tpshard.checkpoint.model import _factory_spec, _record_inputs, _resolve_model, plan_model
from tpshard.checkpoint.safetensors_io import _DTYPE_NAMES, CheckpointError, SafetensorsWriter, _dtype_name, _nbytes
from tpshard.checkpoint.weights import WeightSource, _CheckpointSource, _weights_for
from tpshard.models.hf import build_from_record, config_record, is_model_dir, is_torch_file
from tpshard.models.resolve import ModelLike
from tpshard.plan import ParamShard, Plan

__all__ = ["save_sharded", "merge", "reshard"]


# =============================================================================================
# Shard.
# =============================================================================================


_CHUNK_BYTES = 32 << 20  # bytes read, split and written at a time: the memory a tensor needs


@dataclass(frozen=True)
class _Item:
    """One tensor to store: its checkpoint name, its name in the source, and its split."""

    name: str
    source_name: str
    dtype: torch.dtype
    spec: ParamShard


def _tie_map(model: nn.Module, plan: Plan) -> dict[str, str]:
    """alias -> canonical over the parameters that are one tensor; the canonical name is the
    Plan's (``Plan.ties``) where it names one, else the first name in ``named_parameters``."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    canonical_in_plan = set(plan.ties.values())
    ties = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        canon = next((n for n in names if n in canonical_in_plan), names[0])
        ties.update({n: canon for n in names if n != canon})
    return ties


def _items(module: nn.Module, plan: Plan, source: WeightSource, ties: dict[str, str]) -> list[_Item]:
    """The tensors to store, in state_dict order, each checked against the weights and the plan."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    available = set(source.keys())
    aliases: dict[str, list[str]] = {}
    for alias, canon in ties.items():
        aliases.setdefault(canon, []).append(alias)
    unexpected = sorted(available - set(expected))
    missing = [k for k in expected if k not in ties and not ({k, *aliases.get(k, [])} & available)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source.where} does not match the model ({type(module).__name__}): "
            + (f"missing {len(missing)} tensors {missing[:4]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected tensors {unexpected[:4]}" if unexpected else "")
            + "; check that MODEL builds the architecture (and config) the weights were saved from")
    items = []
    for name, shape in expected.items():
        if name in ties:
            continue
        src = name if name in available else next(a for a in aliases[name] if a in available)
        src_shape, dtype = source.info(src)
        if tuple(src_shape) != shape:
            raise CheckpointError(f"{source.where}: tensor {src!r} has shape {list(src_shape)}, the model expects "
                                  f"{list(shape)}; check that MODEL matches the weights")
        spec = plan.params.get(name, ParamShard(shape=shape))
        if tuple(spec.shape) != shape:
            raise CheckpointError(f"the plan splits {name!r} of shape {list(spec.shape)}, but the model's is "
                                  f"{list(shape)}; make the plan from this model")
        _dtype_name(dtype, f"{source.where}: {src}")
        items.append(_Item(name, src, dtype, spec))
    return items


def _chunks(rows: int, row_bytes: int, budget: int) -> Iterator[tuple[int, int]]:
    """``(start, count)`` runs of rows of about ``budget`` bytes (at least one row each)."""
    step = max(1, budget // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(step, rows - start)


def _write_rows_split(it: _Item, writers: list[SafetensorsWriter], source: WeightSource) -> None:
    """A tensor split along dim 0: each rank's rows, read a chunk at a time and appended to its
    file; the ranks take turns so their files are written (and hashed) side by side."""
    world, shape = len(writers), it.spec.shape
    row_bytes = _nbytes(shape[1:], it.dtype)
    # Replicated kv heads: rank r writes block r // replicas of world // replicas (its kv head's rows).
    blocks, reps = it.spec.blocks(world), it.spec.replicas
    ranges = [layout.local_ranges(shape[0], r // reps, blocks, it.spec.segments) for r in range(world)]
    for i in range(len(ranges[0])):  # every rank has the same range lengths (one per segment)
        for s, n in _chunks(ranges[0][i][1], row_bytes, _CHUNK_BYTES // world):
            for r, w in enumerate(writers):
                w.wait()  # its previous chunk is out: memory stays about one chunk per rank
                w.write(it.name, source.load_rows(it.source_name, ranges[r][i][0] + s, n))


def _write_rows_whole(it: _Item, writers: list[SafetensorsWriter], source: WeightSource) -> None:
    """A tensor replicated or split along a later dim: chunks of whole rows, each split N ways."""
    world, shape = len(writers), it.spec.shape
    for s, n in _chunks(shape[0], _nbytes(shape[1:], it.dtype), _CHUNK_BYTES):
        rows = source.load_rows(it.source_name, s, n)
        for r, w in enumerate(writers):
            w.write(it.name, it.spec.shard(rows, r, world))
        for w in writers:  # nothing may still read these rows once they go
            w.wait()


def _write_item(it: _Item, writers: list[SafetensorsWriter], source: WeightSource) -> None:
    """Append one tensor's shard to every rank file, a bounded chunk of rows at a time (rows
    along dim 0 are contiguous in memory and on disk, and every split keeps them whole)."""
    shape = it.spec.shape
    if not shape or shape[0] == 0:  # a scalar or an empty tensor: nothing to stream
        full = source.load(it.source_name)
        for r, w in enumerate(writers):
            w.write(it.name, it.spec.shard(full, r, len(writers)))
    elif it.spec.dim is not None and it.spec.dim % len(shape) == 0:
        _write_rows_split(it, writers, source)
    else:
        _write_rows_whole(it, writers, source)
    for w in writers:
        w.wait()


def _write_ranks(directory: Path, items: list[_Item], world_size: int, source: WeightSource,
                 progress: _Progress) -> list[RankFile]:
    """Write every rank file of ``directory``, tensor by tensor, from ``source``."""
    layouts = [[(it.name, it.dtype, it.spec.local_shape(world_size)) for it in items] for _ in range(world_size)]
    meta = {"format": "pt", "tpshard_world_size": str(world_size)}
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(SafetensorsWriter(directory / rank_file_name(r, world_size), layouts[r],
                                                         {**meta, "tpshard_rank": str(r)}))
                   for r in range(world_size)]
        for it in items:
            _write_item(it, writers, source)
            progress.update(_nbytes(it.spec.shape, it.dtype) * _copies(it, world_size))
        shas = [w.close() for w in writers]
    dname = lambda dt: _DTYPE_NAMES[dt]  # noqa: E731
    return [RankFile(rank_file_name(r, world_size), r, shas[r], writers[r].size,
                     {n: (tuple(s), dname(d)) for n, d, s in layouts[r]}) for r in range(world_size)]


def _copies(it: _Item, world_size: int) -> int:
    """How many times the ranks' files hold each element: once when split (``replicas`` times
    for replicated kv heads), on every rank when replicated."""
    return it.spec.replicas if it.spec.dim is not None else world_size


def _total_bytes(items: list[_Item], world_size: int) -> int:
    return sum(_nbytes(tuple(it.spec.shape), it.dtype) * _copies(it, world_size) for it in items)


def _manifest(plan: Plan, items: list[_Item], ties: dict[str, str], files: list[RankFile], model: str | None,
              inputs: dict | None, source: dict | None = None) -> Manifest:
    tpshard_version, torch_version = _versions()
    tensors = {it.name: TensorInfo(tuple(it.spec.shape), _DTYPE_NAMES[it.dtype], it.spec.dim, it.spec.segments,
                                   it.spec.replicas) for it in items}
    return Manifest(world_size=plan.world_size, plan=plan, tensors=tensors, ties=ties, files=files, model=model,
                    example_inputs=inputs, source=source, tpshard_version=tpshard_version, torch_version=torch_version)


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"the world size must be a positive integer, not {world_size!r}")


def save_sharded(model: ModelLike, directory: str | os.PathLike, world_size: int, *,
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None, trust_pickle: bool = False,
                 plan: Plan | None = None, example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                 overrides: dict[str, str] | None = None, model_spec: str | None = None, force: bool = False,
                 progress: bool | None = None, expert_parallel: bool = False) -> Manifest:
    """Shard ``weights`` (default: ``model``'s own) over ``world_size`` ranks into ``directory``.

    ``model`` describes the architecture: an ``nn.Module`` (on the meta device is enough when
    ``weights`` is given) or a zero-argument factory (run under :func:`empty_weights`) returning a
    model, ``(model, example_args)`` or ``(model, example_args, example_kwargs)``. ``weights`` is a
    ``.safetensors`` file, a torch state_dict file or a state_dict. The plan is made on the meta
    device unless given. Streaming: one tensor in memory at a time. ``model_spec`` (what the CLI
    takes as MODEL) is recorded so :func:`reshard` can plan again; a module-level factory is
    recorded by itself. ``progress``: a bar on stderr (default: when it is a terminal).
    ``expert_parallel``: as in :func:`tpshard.plan` (when the plan is made here).

    Returns the manifest written. Example::

        >>> import tempfile
        >>> from tpshard import models
        >>> m = save_sharded(models.build("mlp")[0], tempfile.mkdtemp() + "/ckpt", 2, progress=False)
        >>> [f.name for f in m.files]
        ['rank-00000-of-00002.safetensors', 'rank-00001-of-00002.safetensors']
    """
    _check_world_size(world_size)
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs, trust_pickle=trust_pickle)
    source_record = None
    if is_model_dir(model):  # a save_pretrained directory: its own safetensors files are the weights
        weights = model if weights is None else weights
        model_spec = str(Path(model).absolute())
        source_record = config_record(model)
    elif model_spec is None and isinstance(model, (str, os.PathLike)) and is_torch_file(model):
        model_spec = str(Path(model).absolute())
    elif model_spec is None and not isinstance(model, nn.Module):
        model_spec = _factory_spec(model)
    _check_replaceable(Path(directory).absolute(), force, is_dir=True)  # fail before the slow part
    if plan is not None and overrides:
        raise CheckpointError("pass either plan= or overrides=, not both: a given plan is used as it is "
                              "(its overrides are plan.overrides); make it with tpshard.plan(..., overrides=...)")
    with _weights_for(module, weights, trust_pickle) as source:
        if plan is None:
            plan = plan_model(module, world_size, example_inputs=args, example_kwargs=kwargs, overrides=overrides,
                              expert_parallel=expert_parallel)
        elif plan.world_size != world_size:
            raise CheckpointError(f"the plan is for world size {plan.world_size}, not {world_size}")
        ties = _tie_map(module, plan)
        items = _items(module, plan, source, ties)
        bar = _Progress("shard", _total_bytes(items, world_size), progress)
        try:
            with _atomic_dir(directory, force) as tmp:
                files = _write_ranks(tmp, items, world_size, source, bar)
                manifest = _manifest(plan, items, ties, files, model_spec, _record_inputs(args, kwargs), source_record)
                _write_manifest(tmp, manifest)
        finally:
            bar.close()
    manifest.directory = Path(directory).absolute()
    return manifest


# =============================================================================================
# Merge and reshard: tensor by tensor, through every rank's shard.
# =============================================================================================


def merge(directory: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
          progress: bool | None = None, max_shard_bytes: int | None = None) -> Path:
    """Reassemble the full weights of a checkpoint, bit-exactly, into ``out``: one
    ``.safetensors`` file, or (any other name) a ``save_pretrained``-style directory —
    ``config.json`` when the checkpoint was sharded from a model directory, safetensors files
    of at most ``max_shard_bytes`` (default 5 GB) and ``model.safetensors.index.json`` — that
    ``from_pretrained`` loads.

    Streaming: a chunk of rows of one tensor at a time is read from the rank files holding
    it, joined (:func:`tpshard.layout.unshard`) and appended. A tied parameter is written under
    each of its names, so ``load_state_dict(strict=True)`` of the original works; the file's
    metadata ``tpshard_ties`` lists the aliases. Every rank file's sha256 is checked; the
    output appears only if all match.

    Example::

        >>> import tempfile
        >>> from safetensors.torch import load_file
        >>> from tpshard import models
        >>> model, _ = models.build("gpt")
        >>> d = tempfile.mkdtemp()
        >>> _ = save_sharded(model, d + "/ckpt", 2, progress=False)
        >>> full = load_file(merge(d + "/ckpt", d + "/full.safetensors", progress=False))
        >>> torch.equal(full["h.0.attn.c_attn.weight"], model.h[0].attn.c_attn.weight)
        True
        >>> model.load_state_dict(full, strict=True)  # lm_head.weight, tied to wte.weight, included
        <All keys matched successfully>
    """
    manifest = read_manifest(directory)
    aliases: dict[str, list[str]] = {}
    for alias, canon in manifest.ties.items():
        aliases.setdefault(canon, []).append(alias)
    entries = []  # (name in the output, name in the checkpoint, dtype, shape): aliases after their canonical
    for n, t in manifest.tensors.items():
        entries.extend((o, n, t.torch_dtype, t.shape) for o in [n, *aliases.get(n, [])])
    bar = _Progress("merge", sum(_nbytes(s, d) for _, _, d, s in entries), progress)

    def write_tensor(name: str, src: str, dtype: torch.dtype, shape: tuple, writer: SafetensorsWriter) -> None:
        _write_item(_Item(name, src, dtype, ParamShard(shape)), [writer], source)  # whole: one "rank"

    as_file = Path(out).suffix == ".safetensors"
    try:
        opened = _atomic_file(out, force) if as_file else _atomic_dir(out, force)
        with _rank_readers(manifest) as readers, opened as tmp:
            source = _CheckpointSource(manifest, readers)
            if as_file:
                meta = {"format": "pt", "tpshard_ties": json.dumps(manifest.ties)}
                with SafetensorsWriter(tmp, [(o, d, s) for o, _, d, s in entries], meta) as writer:
                    for o, src, d, s in entries:
                        write_tensor(o, src, d, s, writer)
                        bar.update(_nbytes(s, d))
            else:
                write_model_dir(manifest, source, tmp, write_tensor, bar.update,
                                max_shard_bytes or DEFAULT_SHARD_BYTES)
            for rd in readers:
                rd.verify()
    finally:
        bar.close()
    return Path(out).absolute()


def reshard(directory: str | os.PathLike, out_dir: str | os.PathLike, world_size: int, *,
            model: ModelLike | None = None, plan: Plan | None = None, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, force: bool = False, progress: bool | None = None) -> Manifest:
    """Re-split a checkpoint of N ranks into ``world_size`` ranks in ``out_dir``, tensor by tensor.

    The new split comes from ``plan``, or from planning ``model`` (a module, meta is enough, or
    a factory; default for a checkpoint of a model directory: built from the config its
    manifest records) for ``world_size`` — a plan for another world size may choose other styles, so
    it is made again rather than rescaled. Streaming: a chunk of rows of one tensor at a time
    is read from the N shards holding it, joined and split M ways; neither the model nor a
    whole tensor is ever in memory. Source checksums are checked; the output appears only if
    all match.

    Example::

        >>> import tempfile
        >>> from tpshard import models
        >>> d = tempfile.mkdtemp()
        >>> _ = save_sharded(models.build("gpt")[0], d + "/tp2", 2, progress=False)
        >>> m = reshard(d + "/tp2", d + "/tp4", 4, model=lambda: models.build("gpt"), progress=False)
        >>> m.world_size, m.tensors["h.0.attn.c_attn.weight"].segments
        (4, (32, 32, 32))
    """
    _check_world_size(world_size)
    src = read_manifest(directory)
    if Path(out_dir).absolute() == Path(directory).absolute():
        raise CheckpointError(f"reshard cannot write into its source {directory}; choose another output directory")
    if plan is None and model is None and (src.source or {}).get("config"):
        model = lambda: build_from_record(src.source)  # noqa: E731  (sharded from a model directory)
    if plan is None:
        if model is None:
            raise CheckpointError("reshard needs the model (or a plan) to plan the new world size: pass model=... "
                                  "(--model MODEL)")
        module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs, src.example_inputs)
        _check_model(module, src)
        # The source's overrides hold for the new world size too (a head left split stays split),
        # as does expert parallelism.
        plan = plan_model(module, world_size, example_inputs=args, example_kwargs=kwargs,
                          overrides=src.plan.overrides or None,
                          expert_parallel=any(m.style == "expert_parallel" for m in src.plan.modules.values()))
    elif plan.world_size != world_size:
        raise CheckpointError(f"the plan is for world size {plan.world_size}, not {world_size}")
    items = []
    for name, info in src.tensors.items():
        spec = plan.params.get(name, ParamShard(shape=info.shape))
        if tuple(spec.shape) != info.shape:
            raise CheckpointError(f"the new plan splits {name!r} of shape {list(spec.shape)}, but {directory} holds "
                                  f"it as {list(info.shape)}; plan the model the checkpoint was made from")
        items.append(_Item(name, name, info.torch_dtype, spec))
    _check_replaceable(Path(out_dir).absolute(), force, is_dir=True)
    bar = _Progress("reshard", _total_bytes(items, world_size), progress)
    try:
        with _rank_readers(src) as readers, _atomic_dir(out_dir, force) as tmp:
            files = _write_ranks(tmp, items, world_size, _CheckpointSource(src, readers), bar)
            for rd in readers:
                rd.verify()
            manifest = _manifest(plan, items, src.ties, files, src.model, src.example_inputs, src.source)
            _write_manifest(tmp, manifest)
    finally:
        bar.close()
    manifest.directory = Path(out_dir).absolute()
    return manifest
