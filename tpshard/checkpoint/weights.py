"""Weight sources: tensors by name, loaded one at a time.

A :class:`WeightSource` is a ``.safetensors`` file (memory-mapped a tensor, or some rows, at a
time), a torch state_dict file (loaded with ``weights_only=True`` unless ``trust_pickle``), an
in-memory mapping, a Hugging Face model directory (the safetensors files its index names, read
through ``safetensors.safe_open`` slices), or a sharded checkpoint read back as full tensors.
:func:`open_weights` makes one from what the user passes.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tpshard import layout
from tpshard.checkpoint.manifest import Manifest, _RankReader
from tpshard.checkpoint.safetensors_io import _DTYPES, CheckpointError, _SafetensorsFile

__all__ = ["WeightSource", "open_weights"]


class WeightSource:
    """Tensors by name, each loaded on demand: a safetensors file (each tensor, or rank's rows,
    memory-mapped only while in use), a torch state_dict file (``torch.load(weights_only=True,
    mmap=True)``: pages stay mapped until the end) or an in-memory mapping.

    Use :func:`open_weights` to make one.
    """

    def __init__(self, where: str) -> None:
        self.where = where

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of ``name`` without reading its data."""
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def load_rows(self, name: str, start: int, rows: int) -> torch.Tensor:
        """Rows ``[start, start + rows)`` of ``name`` (along dim 0), reading no more than those."""
        return self.load(name).narrow(0, start, rows)

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class _SafetensorsSource(WeightSource):
    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._file = _SafetensorsFile(path, "check that it is a complete .safetensors file")

    def keys(self) -> list[str]:
        return list(self._file.entries)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._file.info(name)

    # Memory-mapped, some rows at a time: the pages count towards the resident memory only
    # while those rows are in use, and no copy is made to write them out.
    def load(self, name: str) -> torch.Tensor:
        return self._file.map(name)

    def load_rows(self, name: str, start: int, rows: int) -> torch.Tensor:
        return self._file.map(name, start, rows)

    def close(self) -> None:
        self._file.close()


class _MappingSource(WeightSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        super().__init__(where)
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{where}: values of {bad[:5]} are not tensors; it must be a state_dict "
                                  "(name -> tensor), e.g. torch.save(model.state_dict(), path)")
        meta = [k for k, v in tensors.items() if v.is_meta]
        if meta:
            raise CheckpointError(f"{where}: {meta[:3]} (and {max(0, len(meta) - 3)} more) are on the meta "
                                  "device and hold no data; pass the weights (a .safetensors or state_dict file)")
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[name]
        return tuple(t.shape), t.dtype

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


INDEX_NAME = "model.safetensors.index.json"


class _DirectorySource(WeightSource):
    """The safetensors files of a ``save_pretrained`` directory: those its index names, or every
    ``*.safetensors`` file without one. Each read opens the file with ``safetensors.safe_open``
    and takes a slice, so only the rows in use are mapped (a map held open would keep every
    page it touched resident)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(str(directory))
        from safetensors import safe_open

        self._open = lambda path: safe_open(str(path), framework="pt", device="cpu")
        index = directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); "
                                      "re-save the model with save_pretrained") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no .safetensors weights (nor {INDEX_NAME}); re-save the model "
                                  "with save_pretrained(dir, safe_serialization=True), or pass --weights FILE")
        self.files: list[Path] = []
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{index} names {name}, which is missing from {directory}; copy it back or "
                                      "re-save the model")
            self.files.append(path)
            try:
                with self._open(path) as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self._where[key] = path
                        self._info[key] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
            except Exception as e:  # safetensors raises its own error types
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path} could not be read as safetensors ({type(e).__name__}: {e}); "
                                      "check that it is a complete .safetensors file") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._info[name]

    def load(self, name: str) -> torch.Tensor:
        with self._open(self._where[name]) as f:
            return f.get_tensor(name)

    def load_rows(self, name: str, start: int, rows: int) -> torch.Tensor:
        shape = self._info[name][0]
        if not shape:
            return self.load(name)
        with self._open(self._where[name]) as f:
            return f.get_slice(name)[start:start + rows]


_SAVE_WEIGHTS_HINT = ("save the weights instead: safetensors.torch.save_model(model, 'model.safetensors') or "
                      "torch.save(model.state_dict(), 'weights.pt')")


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` memory-mapped when the file allows it; pickles only with ``trust_pickle``."""
    def load(mapped: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mapped)

    try:
        try:
            return load(mapped=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return load(mapped=False)  # a legacy (non-zip) torch file cannot be memory-mapped
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} holds pickled Python objects (a whole nn.Module?), not just tensors; unpickling "
                f"runs arbitrary code, so it is refused. If you trust the file, pass --trust-pickle "
                f"(trust_pickle=True); or {_SAVE_WEIGHTS_HINT}") from None
        raise CheckpointError(f"{path} is neither a .safetensors file nor a torch file ({e}); {_SAVE_WEIGHTS_HINT}") from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} could not be read as a torch file ({type(e).__name__}: {e}); "
                              f"{_SAVE_WEIGHTS_HINT}") from None


def open_weights(weights: str | os.PathLike | Mapping[str, torch.Tensor], *,
                 trust_pickle: bool = False) -> WeightSource:
    """A :class:`WeightSource` for a ``.safetensors`` file, a torch state_dict file, a model
    directory (its safetensors files, through the index when there is one), or a mapping.

    A torch file is loaded with ``weights_only=True`` (memory-mapped when it is in the zip
    format); a file holding a pickled ``nn.Module`` is refused unless ``trust_pickle``, because
    unpickling runs arbitrary code (its ``state_dict()`` is used then).

    Example::

        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save(torch.nn.Linear(2, 3).state_dict(), path)
        >>> with open_weights(path) as w:
        ...     w.keys(), w.info("weight")
        (['weight', 'bias'], ((3, 2), torch.float32))
    """
    if isinstance(weights, Mapping):
        return _MappingSource(weights, "the given state_dict")
    path = Path(weights)
    if path.is_dir():
        return _DirectorySource(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; pass a .safetensors file or a torch state_dict file")
    with open(path, "rb") as f:
        head = f.read(9)
    looks_safetensors = path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")
    if looks_safetensors:
        return _SafetensorsSource(path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict; {_SAVE_WEIGHTS_HINT}")
    return _MappingSource(obj, str(path))


def _weights_for(module: nn.Module, weights: Any, trust_pickle: bool) -> WeightSource:
    if weights is not None:
        return open_weights(weights, trust_pickle=trust_pickle)
    return _MappingSource(module.state_dict(), f"{type(module).__name__}.state_dict() (no weights given)")


class _CheckpointSource(WeightSource):
    """The full tensors of a sharded checkpoint, each joined from its N shards when loaded."""

    def __init__(self, manifest: Manifest, readers: list[_RankReader]) -> None:
        super().__init__(str(manifest.directory))
        self._manifest, self._readers = manifest, readers

    def keys(self) -> list[str]:
        return list(self._manifest.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._manifest.tensors[name]
        return t.shape, t.torch_dtype

    def load(self, name: str) -> torch.Tensor:
        return self._manifest.tensors[name].spec.unshard([rd.read(name) for rd in self._readers])

    def load_rows(self, name: str, start: int, rows: int) -> torch.Tensor:
        """Rows of the full tensor from the shards that hold them: every shard's same rows when
        split along a later dim, else the pieces of the ranks owning those rows."""
        info = self._manifest.tensors[name]
        if info.dim is None:
            return self._readers[0].read(name, start, rows)
        if info.dim % len(info.shape):
            shards = [rd.read(name, start, rows) for rd in self._readers]
            return info.spec.unshard(shards)
        parts = []
        reps = info.replicas  # replicated kv heads: block b is on ranks [b*reps, (b+1)*reps); read the first
        owners = _row_owners(info.shape[0], info.spec.blocks(len(self._readers)), info.segments)
        for full_start, length, block, local_start in owners:
            rank = block * reps
            lo, hi = max(start, full_start), min(start + rows, full_start + length)
            if lo < hi:
                parts.append(self._readers[rank].read(name, local_start + lo - full_start, hi - lo))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_owners(size: int, world: int, segments: tuple[int, ...] | None) -> list[tuple[int, int, int, int]]:
    """For a dim of ``size`` split over ``world`` ranks: ``(full start, length, rank, local
    start)`` of every piece, in full order (the inverse of :func:`tpshard.layout.local_ranges`)."""
    pieces, full, local = [], 0, 0
    for seg in layout.normalize(size, segments):
        chunk = seg // world
        pieces.extend((full + q * chunk, chunk, q, local) for q in range(world))
        full, local = full + seg, local + chunk
    return pieces
