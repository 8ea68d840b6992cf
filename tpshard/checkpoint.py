"""Sharded checkpoints: shard a saved model once, offline and streaming; each rank later reads
only its own file.

A checkpoint is a directory::

    manifest.json                       format version, tpshard/torch versions, the Plan, world
                                        size, every tensor (full shape, dtype, split), the ties,
                                        and per rank file its sha256, size, shapes and dtypes
    rank-00000-of-00004.safetensors     rank 0's part of every tensor of the state_dict
    rank-00001-of-00004.safetensors     ...

Each rank file holds, for every tensor of the model's ``state_dict``, this rank's shard when
the Plan splits it (:func:`tpshard.layout.shard`, the very function the parallel layers use)
or the whole tensor when it is replicated. A tied parameter is stored once, under the name it
is tied to (``Plan.ties``); the manifest records the alias.

Streaming: tensors go one at a time, and each in chunks of rows (32 MiB): rows along dim 0
are contiguous in memory and on disk, and a split keeps every row whole, so each chunk is read
(memory-mapped just for that chunk: a map of the whole file would keep every page it touched
resident), split and appended to the rank files, whose safetensors headers were written up
front from shapes and dtypes. Files are written and hashed on worker threads meanwhile.
Memory stays about one chunk per rank whatever the size of the model or of its largest
tensor; reshard and merge stream the same way. The model is only looked at on the meta device.

Safety: output goes to a temporary sibling directory that is renamed at the end, so an
interrupted run never leaves a directory that looks complete; an existing output is replaced
only with ``force`` (and only when it is a tpshard checkpoint or empty). Readers check the
manifest's sha256 of every file they read, in the same pass that reads the tensors.

Example::

    >>> import tempfile, torch
    >>> from tpshard import checkpoint, models
    >>> model, _ = models.build("gpt", dtype=torch.float64)
    >>> ckpt = tempfile.mkdtemp() + "/gpt-tp2"
    >>> manifest = checkpoint.save_sharded(model, ckpt, 2, progress=False)
    >>> sorted(manifest.ties.items())
    [('lm_head.weight', 'wte.weight')]
    >>> rank1 = checkpoint.load_sharded(lambda: models.build("gpt", dtype=torch.float64), ckpt, rank=1)
    >>> rank1.get_parameter("h.0.attn.c_attn.weight").shape
    torch.Size([48, 32])
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import mmap
import os
import pickle
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from tpshard import comm, layout
from tpshard.plan import ParamShard, Plan

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CheckpointError",
    "Manifest",
    "TensorInfo",
    "RankFile",
    "WeightSource",
    "SafetensorsWriter",
    "empty_weights",
    "format_bytes",
    "on_meta",
    "unpack_model",
    "open_weights",
    "plan_model",
    "rank_file_name",
    "read_manifest",
    "save_sharded",
    "load_sharded",
    "merge",
    "reshard",
]

#: Version of the checkpoint layout (manifest + rank files); readers refuse newer versions.
FORMAT_VERSION = 1
FORMAT_NAME = "tpshard-sharded-checkpoint"
MANIFEST_NAME = "manifest.json"

ModelLike = Union[nn.Module, Callable[[], Any]]


class CheckpointError(ValueError):
    """A checkpoint, weights file or model does not fit; the message names the file and the fix."""


def rank_file_name(rank: int, world_size: int) -> str:
    """The file of ``rank`` in a ``world_size`` checkpoint.

    Example::

        >>> rank_file_name(0, 4)
        'rank-00000-of-00004.safetensors'
    """
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


# =============================================================================================
# The safetensors format, streamed: 8-byte little-endian header length, a JSON header with
# dtype/shape/data_offsets per tensor (offsets relative to the end of the header), raw data.
# =============================================================================================

_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
    }.items()
    if dt is not None
}
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


def _dtype_name(dtype: torch.dtype, what: str) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"{what}: dtype {dtype} cannot be stored in safetensors; "
                              f"convert it to one of {sorted(map(str, _DTYPE_NAMES))}") from None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is big-endian")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (C order), without a copy when ``t`` is contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _make_header(layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None) -> tuple[bytes, list[_Entry]]:
    """The header bytes (length prefix included, padded to 8 bytes) and the entries in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    rel = []
    offset = 0
    for name, dtype, shape in layout:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _dtype_name(dtype, name), "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        rel.append((name, header[name]["dtype"], tuple(shape), offset, offset + size))
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # align the data to 8 bytes, as safetensors does
    start = 8 + len(text)
    entries = [_Entry(n, d, s, start + b, start + e) for n, d, s, b, e in rel]
    return len(text).to_bytes(8, "little") + text, entries


_CHUNK_BYTES = 32 << 20  # bytes read, split and written at a time: the memory a tensor needs

# File I/O and sha256 run on worker threads (both release the GIL on large buffers), so
# several rank files are written and hashed at once. Each file has a key that always maps to
# the same single thread: its writes and hash updates stay in order.
_ASYNC_BYTES = 1 << 20
_FILE_KEYS = itertools.count()
_WORKERS: list[concurrent.futures.ThreadPoolExecutor] = []


def _worker_count() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _worker(key: int) -> concurrent.futures.ThreadPoolExecutor:
    if not _WORKERS:
        _WORKERS.extend(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tpshard-io")
                        for _ in range(_worker_count()))
    return _WORKERS[key % len(_WORKERS)]


if hasattr(os, "register_at_fork"):  # a forked child (a rank) has the executors but not their threads
    os.register_at_fork(after_in_child=_WORKERS.clear)


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, hashing as it goes (peak memory: one tensor).

    The layout — names, dtypes and shapes, in write order — is fixed up front so the header
    can be written first; :meth:`write` then takes the tensors in that order. Large tensors
    are written and hashed on a worker thread: the tensor must not change until :meth:`wait`
    returns (``close`` waits). The file is created exclusively (never overwritten).

    Example::

        >>> import tempfile, torch
        >>> from safetensors import safe_open
        >>> path = tempfile.mkdtemp() + "/t.safetensors"
        >>> with SafetensorsWriter(path, [("a", torch.float32, (2, 3))]) as w:
        ...     w.write("a", torch.ones(2, 3))
        >>> with safe_open(path, "pt") as f:
        ...     f.get_tensor("a").sum().item()
        6.0
    """

    def __init__(self, path: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        _check_little_endian()
        self.path = Path(path)
        header, self._entries = _make_header(layout, metadata)
        self._next = 0  # the entry being written, and how many of its rows are
        self._rows = 0
        self._hash = hashlib.sha256()
        self._inflight: list[concurrent.futures.Future] = []
        self._key = next(_FILE_KEYS)
        self._size = 0
        self.sha256: str | None = None
        self._file: BinaryIO | None = open(self.path, "xb")
        self._put(memoryview(header))

    def _put(self, data: memoryview) -> None:
        assert self._file is not None
        if len(data) >= _ASYNC_BYTES:
            self._inflight.append(_worker(self._key).submit(self._emit, data))
        else:
            self.wait()
            self._emit(data)
        self._size += len(data)

    def _emit(self, data: memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)

    def wait(self) -> None:
        """Wait until everything given so far is written and hashed (its memory may then go)."""
        try:
            for done in self._inflight:
                done.result()
        finally:
            concurrent.futures.wait(self._inflight)  # after a failure, let the rest finish too
            self._inflight.clear()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``name``, the next tensor of the layout: all of it, or its next
        rows (along dim 0) when called several times."""
        if self._next >= len(self._entries):
            raise CheckpointError(f"{self.path}: {name!r} written after the last tensor of the layout")
        e = self._entries[self._next]
        rows = tensor.shape[0] if e.shape and tensor.dim() else 1
        fits = tuple(tensor.shape[1:]) == e.shape[1:] and self._rows + rows <= e.shape[0] if e.shape \
            else tensor.dim() == 0
        if name != e.name or _DTYPE_NAMES.get(tensor.dtype) != e.dtype or not fits:
            raise CheckpointError(f"{self.path}: expected {e.name} {e.dtype} {list(e.shape)} (rows from "
                                  f"{self._rows}), got {name} {tensor.dtype} {list(tensor.shape)}")
        self._put(_tensor_bytes(tensor))
        self._rows += rows
        if not e.shape or self._rows == e.shape[0]:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> str:
        """Finish the file; return its sha256 (hex). Fails if tensors of the layout are missing."""
        if self._file is None:
            assert self.sha256 is not None
            return self.sha256
        self.wait()
        self._file.close()
        self._file = None
        while self._next < len(self._entries) and self._entries[self._next].shape[:1] == (0,):
            self._next += 1  # tensors with no rows take no bytes
        if self._next != len(self._entries):
            missing = [e.name for e in self._entries[self._next:]]
            raise CheckpointError(f"{self.path}: closed before {len(missing)} tensors were written ({missing[:3]}...)")
        self.sha256 = self._hash.hexdigest()
        return self.sha256

    @property
    def size(self) -> int:
        return self._size

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            with contextlib.suppress(Exception):
                self.wait()  # no write may still be queued for the file about to close
            self._file.close()
            self._file = None


def _map_readonly(fileno: int, length: int, offset: int) -> mmap.mmap:
    """A read-only private mapping, its pages mapped in up front where the OS can (one call
    instead of a page fault per 4 KiB)."""
    if os.name == "nt":
        return mmap.mmap(fileno, length, offset=offset, access=mmap.ACCESS_READ)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fileno, length, flags=flags, prot=mmap.PROT_READ, offset=offset)


class _SafetensorsFile:
    """A safetensors file opened for reads of one tensor, or some rows of it, at a time.

    With ``hashing``, reads that go forward through the file also feed a sha256 of it (the
    bytes skipped between them are read and hashed too), so checking a checksum costs no second
    pass when tensors are read in file order; :meth:`sha256` hashes the file on its own otherwise.
    """

    def __init__(self, path: str | os.PathLike, fix: str, *, hashing: bool = False) -> None:
        _check_little_endian()
        self.path = Path(path)
        self._fix = fix
        self._hashing = hashing
        self._key = next(_FILE_KEYS)
        try:
            self._file: BinaryIO = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file; {fix}") from None
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.metadata, self.entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; {self._fix}")

    def _read_header(self) -> tuple[dict[str, str], dict[str, _Entry]]:
        self._hash = hashlib.sha256()
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail(f"not a safetensors file (only {len(prefix)} bytes)")
        n = int.from_bytes(prefix, "little")
        if n > min(_MAX_HEADER, self.size - 8):
            raise self._fail(f"not a safetensors file, or truncated (header of {n} bytes in a file of {self.size})")
        text = self._file.read(n)
        self._hash.update(prefix)
        self._hash.update(text)
        self._pos = 8 + n
        try:
            header = json.loads(text)
            metadata = header.pop("__metadata__", None) or {}
            entries = {}
            for name, h in header.items():
                begin, end = (int(x) for x in h["data_offsets"])
                entries[name] = _Entry(name, h["dtype"], tuple(int(s) for s in h["shape"]), 8 + n + begin, 8 + n + end)
        except (ValueError, KeyError, TypeError) as e:
            raise self._fail(f"corrupted safetensors header ({type(e).__name__}: {e})") from None
        for e in entries.values():
            if e.dtype not in _DTYPES:
                raise self._fail(f"tensor {e.name!r} has dtype {e.dtype!r}, which this tpshard cannot read")
            if e.end - e.begin != _nbytes(e.shape, _DTYPES[e.dtype]):
                raise self._fail(f"tensor {e.name!r}: {e.end - e.begin} bytes do not hold {e.dtype} {list(e.shape)}")
        end = max((e.end for e in entries.values()), default=8 + n)
        if end > self.size:
            raise self._fail(f"truncated: {self.size} bytes, but its header describes {end}")
        self._sequential = True
        self._pending: concurrent.futures.Future | None = None
        return metadata, entries

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        e = self.entries[name]
        return e.shape, _DTYPES[e.dtype]

    def _rows(self, e: _Entry, start: int, rows: int | None) -> tuple[int, int, tuple[int, ...]]:
        """(file offset, byte count, shape) of rows ``[start, start + rows)`` of ``e`` (all: None)."""
        if not e.shape:
            return e.begin, e.end - e.begin, ()
        rows = e.shape[0] - start if rows is None else rows
        row = (e.end - e.begin) // e.shape[0] if e.shape[0] else 0
        return e.begin + start * row, rows * row, (rows, *e.shape[1:])

    def _hash_gap(self, until: int) -> None:
        """Hash the bytes between the last in-order read and ``until`` (skipped by the reader)."""
        if self._pending is not None:
            self._pending.result()
        self._file.seek(self._pos)
        left = until - self._pos
        while left > 0:
            block = self._file.read(min(left, _CHUNK_BYTES))
            if not block:
                raise self._fail("truncated")
            self._hash.update(block)
            left -= len(block)
        self._pos = until

    def _read_bytes(self, begin: int, nbytes: int, name: str) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        self._file.seek(begin)
        got = 0
        while got < nbytes:
            k = self._file.readinto(view[got:])
            if not k:
                raise self._fail(f"truncated while reading {name!r}")
            got += k
        if self._hashing and self._sequential and begin >= self._pos:
            if begin > self._pos:
                self._hash_gap(begin)
            # Hashed on another core while the caller uses the bytes; one thread per file keeps
            # the updates in order, so waiting for the last one waits for all.
            self._pending = _worker(self._key).submit(lambda v=view, keep=buf: self._hash.update(v))
            self._pos = begin + nbytes
        elif self._hashing and nbytes:
            self._sequential = False  # read backwards: sha256() will hash the file on its own
        return buf

    def read(self, name: str, start: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows ``[start, start + rows)`` of ``name`` (all by default) as a new CPU tensor."""
        e = self.entries[name]
        begin, nbytes, shape = self._rows(e, start, rows)
        return self._read_bytes(begin, nbytes, name).view(_DTYPES[e.dtype]).reshape(shape)

    def map(self, name: str, start: int = 0, rows: int | None = None) -> torch.Tensor:
        """Like :meth:`read`, over a private read-only memory map of just those bytes: no copy,
        and the mapping (and its resident pages) goes away with the tensor."""
        e = self.entries[name]
        begin, nbytes, shape = self._rows(e, start, rows)
        if nbytes == 0:
            return torch.empty(shape, dtype=_DTYPES[e.dtype])
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = _map_readonly(self._file.fileno(), begin + nbytes - aligned, aligned)
        with warnings.catch_warnings():  # read-only memory: nothing here ever writes to it
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=begin - aligned)
        return buf.view(_DTYPES[e.dtype]).reshape(shape)

    def sha256(self) -> str:
        """The file's sha256: from the in-order reads (and the gaps between them), else a second pass."""
        if self._sequential:
            self._hash_gap(self.size)
            self._pending = None
            return self._hash.hexdigest()
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        h = hashlib.sha256()
        self._file.seek(0)
        _hash_rest(self._file, h)
        return h.hexdigest()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
        self._file.close()

    def __enter__(self) -> "_SafetensorsFile":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _hash_rest(f: BinaryIO, h: Any, chunk: int = 1 << 24) -> None:
    while block := f.read(chunk):
        h.update(block)


# =============================================================================================
# Weight sources: tensors by name, loaded one at a time.
# =============================================================================================


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
    """A :class:`WeightSource` for a ``.safetensors`` file, a torch state_dict file, or a mapping.

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


# =============================================================================================
# Models: built without weights, and looked at on the meta device.
# =============================================================================================


def _meta_parameter(param: nn.Parameter) -> nn.Parameter:
    meta = param.detach().to("meta")
    try:
        new = type(param)(meta, requires_grad=param.requires_grad)
    except TypeError:
        new = nn.Parameter(meta, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


def _skip_on_meta(init: Callable) -> Callable:
    def init_unless_meta(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor  # nothing to fill; skipping also spares torch's slow first meta kernels
        return init(tensor, *args, **kwargs)

    return init_unless_meta


@contextlib.contextmanager
def _no_meta_init() -> Iterator[None]:
    """``torch.nn.init`` functions return meta tensors untouched (as Hugging Face's no_init_weights)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(nn.init, n))]
    originals = {n: getattr(nn.init, n) for n in names}
    for n, fn in originals.items():
        setattr(nn.init, n, _skip_on_meta(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(nn.init, n, fn)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build models with their parameters on the meta device and their buffers real.

    Inside the block every parameter a module registers is replaced by a meta tensor of the
    same shape, dtype and ``requires_grad`` (initializers then run on meta: no memory, no
    time), while buffers are computed as usual. Non-persistent buffers — rotary cos/sin
    tables, causal masks — are not in checkpoints, so a model built entirely on the meta
    device would lose them; built here, it keeps them and :func:`load_sharded` fills only the
    parameters. Tied parameters stay tied, and ``torch.nn.init`` functions skip meta tensors.
    (The approach of accelerate's ``init_empty_weights``.) A module that fills a parameter's
    tensor *before* registering it (``nn.Parameter(torch.randn(n))``) still allocates it briefly.

    Example::

        >>> from tpshard import models
        >>> with empty_weights():
        ...     model = models.Llama()
        >>> model.lm_head.weight.is_meta, model.cos.is_meta
        (True, False)
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = _meta_parameter(param)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with _no_meta_init():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def on_meta(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily hold every parameter and buffer of ``model`` on the meta device.

    Capture and planning need only shapes; a model built under :func:`empty_weights` mixes
    meta parameters with real buffers, which shape propagation rejects. Ties are kept, and the
    original tensors are put back on exit.

    Example::

        >>> lin = torch.nn.Linear(2, 2)
        >>> with on_meta(lin):
        ...     lin.weight.is_meta
        True
        >>> lin.weight.is_meta
        False
    """
    swapped: list[tuple[dict, str, Any]] = []
    replacement: dict[int, Any] = {}
    for mod in model.modules():
        for store, make in ((mod._parameters, _meta_parameter), (mod._buffers, lambda t: t.to("meta"))):
            for key, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                if id(t) not in replacement:
                    replacement[id(t)] = make(t)
                swapped.append((store, key, t))
                store[key] = replacement[id(t)]
    try:
        yield model
    finally:
        for store, key, t in reversed(swapped):
            store[key] = t


def _to_meta(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value)


def unpack_model(made: Any, where: str) -> tuple[nn.Module, tuple, dict]:
    """(model, example_args, example_kwargs) from what a model factory returned: a model,
    ``(model, example_args)`` or ``(model, example_args, example_kwargs)``."""
    if isinstance(made, nn.Module):
        return made, (), {}
    if isinstance(made, tuple) and 1 <= len(made) <= 3 and isinstance(made[0], nn.Module):
        args = tuple(made[1]) if len(made) > 1 else ()
        kwargs = dict(made[2]) if len(made) > 2 else {}
        return made[0], args, kwargs
    raise CheckpointError(f"{where} returned {type(made).__name__}; expected a model, (model, example_args) "
                          "or (model, example_args, example_kwargs)")


def _factory_spec(factory: Any) -> str | None:
    """``module:qualname`` of a module-level factory (what the CLI can import again), else None."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def _resolve_model(model: ModelLike, example_inputs: tuple | None, example_kwargs: dict | None,
                   recorded: dict | None = None) -> tuple[nn.Module, tuple, dict]:
    """The model (a factory runs under :func:`empty_weights`) and the example inputs to capture
    it with: given ones first, then the factory's, then those recorded in a manifest."""
    if isinstance(model, nn.Module):
        module, args, kwargs = model, (), {}
    elif callable(model):
        with empty_weights():
            made = model()
        module, args, kwargs = unpack_model(made, f"the model factory {model!r}")
    else:
        raise TypeError(f"model must be an nn.Module or a zero-argument factory, not {type(model).__name__}")
    if example_inputs is not None:
        args = tuple(example_inputs)
    if example_kwargs is not None:
        kwargs = dict(example_kwargs)
    if not args and not kwargs and recorded:
        args, kwargs = _inputs_from_record(recorded)
    return module, args, kwargs


def _record_inputs(args: tuple, kwargs: dict) -> dict | None:
    """Shapes and dtypes of the example inputs, when they are tensors and plain values (JSON);
    None when there are none (capture infers them) or they cannot be written as JSON."""
    if not args and not kwargs:
        return None
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {"tensor": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        raise TypeError
    try:
        return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in kwargs.items()}}
    except TypeError:
        return None


def _inputs_from_record(rec: dict) -> tuple[tuple, dict]:
    def one(d: dict) -> Any:
        if "tensor" in d:
            return torch.zeros(d["tensor"], dtype=getattr(torch, d["dtype"]), device="meta")
        return d["value"]
    return tuple(one(a) for a in rec.get("args", [])), {k: one(v) for k, v in rec.get("kwargs", {}).items()}


def plan_model(model: nn.Module, world_size: int, *, example_inputs: tuple = (), example_kwargs: dict | None = None,
               overrides: dict[str, str] | None = None) -> Plan:
    """:func:`tpshard.plan` on a meta view of ``model`` (for models built under :func:`empty_weights`,
    whose real buffers and meta parameters do not mix in shape propagation).

    Example::

        >>> from tpshard import models
        >>> with empty_weights():
        ...     model, args = models.build("llama")
        >>> plan_model(model, 2, example_inputs=args).modules["lm_head"].style
        'column'
    """
    from tpshard.api import plan

    with on_meta(model):
        return plan(model, world_size, example_inputs=_to_meta(tuple(example_inputs)),
                    example_kwargs=_to_meta(dict(example_kwargs or {})), overrides=overrides)


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


# =============================================================================================
# The manifest.
# =============================================================================================


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor: its full shape and dtype (safetensors name) and how it is split."""

    shape: tuple[int, ...]
    dtype: str
    dim: int | None = None
    segments: tuple[int, ...] | None = None

    @property
    def spec(self) -> ParamShard:
        return ParamShard(shape=self.shape, dim=self.dim, segments=self.segments)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class RankFile:
    """One rank's file: its name in the directory, sha256, size, and tensors (local shapes)."""

    name: str
    rank: int
    sha256: str
    bytes: int
    tensors: dict[str, tuple[tuple[int, ...], str]]


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring); ``directory`` is where it was read."""

    world_size: int
    plan: Plan
    tensors: dict[str, TensorInfo]
    ties: dict[str, str]
    files: list[RankFile]
    model: str | None = None
    example_inputs: dict | None = None
    format_version: int = FORMAT_VERSION
    tpshard_version: str = ""
    torch_version: str = ""
    directory: Path | None = field(default=None, compare=False)

    def rank_path(self, rank: int) -> Path:
        assert self.directory is not None
        return self.directory / self.files[rank].name

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tpshard_version": self.tpshard_version,
            "torch_version": self.torch_version,
            "world_size": self.world_size,
            "model": self.model,
            "example_inputs": self.example_inputs,
            "ties": self.ties,
            "tensors": {k: {"shape": list(t.shape), "dtype": t.dtype, "dim": t.dim,
                            "segments": list(t.segments) if t.segments else None} for k, t in self.tensors.items()},
            "files": [{"name": f.name, "rank": f.rank, "sha256": f.sha256, "bytes": f.bytes,
                       "tensors": {k: {"shape": list(s), "dtype": d} for k, (s, d) in f.tensors.items()}}
                      for f in self.files],
            "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path | None = None) -> "Manifest":
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        tensors = {k: TensorInfo(tuple(t["shape"]), t["dtype"], t.get("dim"), tup(t.get("segments")))
                   for k, t in d["tensors"].items()}
        files = [RankFile(f["name"], int(f["rank"]), f["sha256"], int(f["bytes"]),
                          {k: (tuple(t["shape"]), t["dtype"]) for k, t in f["tensors"].items()})
                 for f in d["files"]]
        return cls(world_size=int(d["world_size"]), plan=Plan.from_dict(d["plan"]), tensors=tensors,
                   ties=dict(d.get("ties", {})), files=files, model=d.get("model"),
                   example_inputs=d.get("example_inputs"), format_version=int(d["format_version"]),
                   tpshard_version=d.get("tpshard_version", ""), torch_version=d.get("torch_version", ""),
                   directory=directory)


def _versions() -> tuple[str, str]:
    import tpshard  # imported here: tpshard/__init__ may import this module

    return getattr(tpshard, "__version__", "unknown"), torch.__version__


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and check ``directory/manifest.json``.

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable, written by
    a newer tpshard (format version), or inconsistent.

    Example::

        >>> import tempfile
        >>> read_manifest(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tpshard.checkpoint.CheckpointError: .../manifest.json is missing: ... is not a tpshard checkpoint; ...
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a tpshard checkpoint; create one with "
                              "`tpshard shard MODEL --world-size N --out DIR`")
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: re-create it "
                              "with `tpshard shard`") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a tpshard checkpoint manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}, newer than this tpshard reads "
                              f"({FORMAT_VERSION}); upgrade tpshard (pip install -U tpshard)")
    try:
        manifest = Manifest.from_dict(d, directory)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is incomplete or damaged ({type(e).__name__}: {e}); re-create the "
                              "checkpoint with `tpshard shard`") from None
    if len(manifest.files) != manifest.world_size or [f.rank for f in manifest.files] != list(range(manifest.world_size)):
        raise CheckpointError(f"{path} lists {len(manifest.files)} rank files for world size "
                              f"{manifest.world_size}; re-create the checkpoint with `tpshard shard`")
    return manifest


def _pretty_json(obj: Any, depth: int = 0, width: int = 100) -> str:
    """JSON with one line per value that fits in ``width`` (one line per tensor, say)."""
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or len(flat) + depth <= width:
        return flat
    pad = " " * (depth + 1)
    if isinstance(obj, dict):
        body = [f"{pad}{json.dumps(k)}: {_pretty_json(v, depth + 1, width)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(body) + "\n" + " " * depth + "}"
    body = [pad + _pretty_json(v, depth + 1, width) for v in obj]
    return "[\n" + ",\n".join(body) + "\n" + " " * depth + "]"


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    with open(directory / MANIFEST_NAME, "x") as f:
        f.write(_pretty_json(manifest.to_dict()) + "\n")


class _RankReader(_SafetensorsFile):
    """A rank file of a checkpoint, checked against the manifest: present, complete, with the
    listed tensors, shapes and dtypes; :meth:`verify` checks its sha256."""

    def __init__(self, manifest: Manifest, rank: int) -> None:
        self.expected = manifest.files[rank]
        path = manifest.rank_path(rank)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (the manifest lists {manifest.world_size} rank files); copy "
                                  "it back, or re-create the checkpoint with `tpshard shard`")
        super().__init__(path, "the checkpoint is damaged: copy the file again or re-create the "
                               "checkpoint with `tpshard shard`", hashing=True)
        try:
            self._check_against_manifest()
        except BaseException:
            self.close()
            raise

    def _check_against_manifest(self) -> None:
        if self.size != self.expected.bytes:
            what = "truncated" if self.size < self.expected.bytes else "larger than written"
            raise self._fail(f"{what}: {self.size} bytes, the manifest says {self.expected.bytes}")
        have = {n: (e.shape, e.dtype) for n, e in self.entries.items()}
        for name, (shape, dtype) in self.expected.tensors.items():
            if name not in have:
                raise self._fail(f"tensor {name!r} listed in the manifest is not in the file")
            if have[name] != (shape, dtype):
                kind = "dtype" if have[name][1] != dtype else "shape"
                raise self._fail(f"{kind} mismatch for {name!r}: {have[name][1]} {list(have[name][0])} in the "
                                 f"file, {dtype} {list(shape)} in the manifest")
        extra = sorted(set(have) - set(self.expected.tensors))
        if extra:
            raise self._fail(f"tensors {extra[:3]} are not in the manifest")

    def verify(self) -> None:
        digest = self.sha256()
        if digest != self.expected.sha256:
            raise self._fail(f"sha256 mismatch (file {digest[:12]}..., manifest {self.expected.sha256[:12]}...): "
                             "the file is corrupted or was modified")


# =============================================================================================
# Output that appears all at once, and a progress bar.
# =============================================================================================


def _check_replaceable(target: Path, force: bool, is_dir: bool) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise CheckpointError(f"{target} exists; pass --force (force=True) to replace it, or choose another output")
    if is_dir:
        if not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a directory; remove it or choose another output")
        if any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
            raise CheckpointError(f"refusing to replace {target}: it is not a tpshard checkpoint (no {MANIFEST_NAME}) "
                                  "and not empty; remove it yourself or choose another output")
    elif target.is_dir():
        raise CheckpointError(f"{target} is a directory; choose a file name for the output")


@contextlib.contextmanager
def _atomic_dir(target: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; rename it to ``target`` if the block succeeds,
    remove it if it fails (or is interrupted): ``target`` is never left half-written."""
    target = Path(target).absolute()
    _check_replaceable(target, force, is_dir=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        _check_replaceable(target, force, is_dir=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_file(target: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Like :func:`_atomic_dir` for one file (written under a temporary name, then renamed)."""
    target = Path(target).absolute()
    _check_replaceable(target, force, is_dir=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _check_replaceable(target, force, is_dir=False)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_bytes(n: float) -> str:
    """Bytes in binary units.

    Example::

        >>> format_bytes(3 * 2**29)
        '1.50 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (or ``enabled``)."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.stream = sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.label, self.total, self.done = label, max(total, 1), 0
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            frac = min(self.done / self.total, 1.0)
            width = 30
            bar = "#" * int(frac * width)
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(f"\r{self.label} {frac:4.0%} [{bar:<{width}}] {format_bytes(self.done)}/"
                              f"{format_bytes(self.total)} {format_bytes(rate)}/s ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# =============================================================================================
# Shard.
# =============================================================================================


@dataclass(frozen=True)
class _Item:
    """One tensor to store: its checkpoint name, its name in the source, and its split."""

    name: str
    source_name: str
    dtype: torch.dtype
    spec: ParamShard


def _weights_for(module: nn.Module, weights: Any, trust_pickle: bool) -> WeightSource:
    if weights is not None:
        return open_weights(weights, trust_pickle=trust_pickle)
    return _MappingSource(module.state_dict(), f"{type(module).__name__}.state_dict() (no weights given)")


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
    ranges = [layout.local_ranges(shape[0], r, world, it.spec.segments) for r in range(world)]
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
            w.write(it.name, rows if it.spec.dim is None else it.spec.shard(rows, r, world))
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
            progress.update(_nbytes(it.spec.shape, it.dtype) * (1 if it.spec.dim is not None else world_size))
        shas = [w.close() for w in writers]
    dname = lambda dt: _DTYPE_NAMES[dt]  # noqa: E731
    return [RankFile(rank_file_name(r, world_size), r, shas[r], writers[r].size,
                     {n: (tuple(s), dname(d)) for n, d, s in layouts[r]}) for r in range(world_size)]


def _total_bytes(items: list[_Item], world_size: int) -> int:
    return sum(_nbytes(tuple(it.spec.shape), it.dtype) * (1 if it.spec.dim is not None else world_size)
               for it in items)


def _manifest(plan: Plan, items: list[_Item], ties: dict[str, str], files: list[RankFile], model: str | None,
              inputs: dict | None) -> Manifest:
    tpshard_version, torch_version = _versions()
    tensors = {it.name: TensorInfo(tuple(it.spec.shape), _DTYPE_NAMES[it.dtype], it.spec.dim, it.spec.segments)
               for it in items}
    return Manifest(world_size=plan.world_size, plan=plan, tensors=tensors, ties=ties, files=files, model=model,
                    example_inputs=inputs, tpshard_version=tpshard_version, torch_version=torch_version)


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"the world size must be a positive integer, not {world_size!r}")


def save_sharded(model: ModelLike, directory: str | os.PathLike, world_size: int, *,
                 weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None, trust_pickle: bool = False,
                 plan: Plan | None = None, example_inputs: tuple | None = None, example_kwargs: dict | None = None,
                 overrides: dict[str, str] | None = None, model_spec: str | None = None, force: bool = False,
                 progress: bool | None = None) -> Manifest:
    """Shard ``weights`` (default: ``model``'s own) over ``world_size`` ranks into ``directory``.

    ``model`` describes the architecture: an ``nn.Module`` (on the meta device is enough when
    ``weights`` is given) or a zero-argument factory (run under :func:`empty_weights`) returning a
    model, ``(model, example_args)`` or ``(model, example_args, example_kwargs)``. ``weights`` is a
    ``.safetensors`` file, a torch state_dict file or a state_dict. The plan is made on the meta
    device unless given. Streaming: one tensor in memory at a time. ``model_spec`` (what the CLI
    takes as MODEL) is recorded so :func:`reshard` can plan again; a module-level factory is
    recorded by itself. ``progress``: a bar on stderr (default: when it is a terminal).

    Returns the manifest written. Example::

        >>> import tempfile
        >>> from tpshard import models
        >>> m = save_sharded(models.build("mlp")[0], tempfile.mkdtemp() + "/ckpt", 2, progress=False)
        >>> [f.name for f in m.files]
        ['rank-00000-of-00002.safetensors', 'rank-00001-of-00002.safetensors']
    """
    _check_world_size(world_size)
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs)
    if model_spec is None and not isinstance(model, nn.Module):
        model_spec = _factory_spec(model)
    _check_replaceable(Path(directory).absolute(), force, is_dir=True)  # fail before the slow part
    with _weights_for(module, weights, trust_pickle) as source:
        if plan is None:
            plan = plan_model(module, world_size, example_inputs=args, example_kwargs=kwargs, overrides=overrides)
        elif plan.world_size != world_size:
            raise CheckpointError(f"the plan is for world size {plan.world_size}, not {world_size}")
        ties = _tie_map(module, plan)
        items = _items(module, plan, source, ties)
        bar = _Progress("shard", _total_bytes(items, world_size), progress)
        try:
            with _atomic_dir(directory, force) as tmp:
                files = _write_ranks(tmp, items, world_size, source, bar)
                manifest = _manifest(plan, items, ties, files, model_spec, _record_inputs(args, kwargs))
                _write_manifest(tmp, manifest)
        finally:
            bar.close()
    manifest.directory = Path(directory).absolute()
    return manifest


# =============================================================================================
# Load one rank.
# =============================================================================================


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
        >>> from tpshard import models
        >>> ckpt = tempfile.mkdtemp() + "/llama"
        >>> _ = save_sharded(models.build("llama")[0], ckpt, 2, progress=False)
        >>> rank0 = load_sharded(lambda: models.build("llama"), ckpt, rank=0)
        >>> rank0.get_parameter("layers.0.mlp.down_proj.weight").shape, rank0.cos.is_meta
        (torch.Size([32, 32]), False)
    """
    from tpshard.capture import capture
    from tpshard.rewrite import rewrite

    manifest = read_manifest(directory)
    g = _load_group(manifest, rank, group)
    module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs, manifest.example_inputs)
    _check_model(module, manifest)
    buffers = _real_buffers(module)
    with on_meta(module):
        sharded = rewrite(capture(module, _to_meta(args), _to_meta(kwargs)), manifest.plan, g)
    path = manifest.rank_path(g.rank)
    with _RankReader(manifest, g.rank) as reader:
        by_offset = sorted(reader.entries.values(), key=lambda e: e.begin)
        stored = {e.name: reader.read(e.name) for e in by_offset}
        reader.verify()
    _fill(sharded, stored, buffers, manifest, g, device, path)
    if device is not None:
        sharded.to(device)
    return sharded


# =============================================================================================
# Merge and reshard: tensor by tensor, through every rank's shard.
# =============================================================================================


@contextlib.contextmanager
def _rank_readers(manifest: Manifest) -> Iterator[list[_RankReader]]:
    """Every rank file, opened and checked up front (missing, truncated, wrong tensors)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_RankReader(manifest, r)) for r in range(manifest.world_size)]


def _read_full(readers: list[_RankReader], name: str, info: TensorInfo) -> torch.Tensor:
    shards = [rd.read(name) for rd in readers]
    return info.spec.unshard(shards) if info.dim is not None else shards[0]


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
        return _read_full(self._readers, name, self._manifest.tensors[name])

    def load_rows(self, name: str, start: int, rows: int) -> torch.Tensor:
        """Rows of the full tensor from the shards that hold them: every shard's same rows when
        split along a later dim, else the pieces of the ranks owning those rows."""
        info = self._manifest.tensors[name]
        if info.dim is None:
            return self._readers[0].read(name, start, rows)
        if info.dim % len(info.shape):
            shards = [rd.read(name, start, rows) for rd in self._readers]
            return layout.unshard(shards, info.dim, info.segments)
        parts = []
        for full_start, length, rank, local_start in _row_owners(info.shape[0], len(self._readers), info.segments):
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


def merge(directory: str | os.PathLike, out_file: str | os.PathLike, *, force: bool = False,
          progress: bool | None = None) -> Path:
    """Reassemble the full weights of a checkpoint into one ``.safetensors`` file, bit-exactly.

    Streaming: a chunk of rows of one tensor at a time is read from the rank files holding
    it, joined (:func:`tpshard.layout.unshard`) and appended. Tied parameters appear once, under the canonical name; the file's metadata
    ``tpshard_ties`` lists the aliases (``safetensors.torch.load_model`` re-ties them). Every
    rank file's sha256 is checked; the output appears only if all match.

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
    """
    manifest = read_manifest(directory)
    layout = [(n, t.torch_dtype, t.shape) for n, t in manifest.tensors.items()]
    meta = {"format": "pt", "tpshard_ties": json.dumps(manifest.ties)}
    bar = _Progress("merge", sum(_nbytes(s, d) for _, d, s in layout), progress)
    try:
        with _rank_readers(manifest) as readers, _atomic_file(out_file, force) as tmp:
            source = _CheckpointSource(manifest, readers)
            with SafetensorsWriter(tmp, layout, meta) as writer:
                for name, info in manifest.tensors.items():  # whole: replicated over one "rank"
                    _write_item(_Item(name, name, info.torch_dtype, ParamShard(info.shape)), [writer], source)
                    bar.update(_nbytes(info.shape, info.torch_dtype))
            for rd in readers:
                rd.verify()
    finally:
        bar.close()
    return Path(out_file).absolute()


def reshard(directory: str | os.PathLike, out_dir: str | os.PathLike, world_size: int, *,
            model: ModelLike | None = None, plan: Plan | None = None, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, force: bool = False, progress: bool | None = None) -> Manifest:
    """Re-split a checkpoint of N ranks into ``world_size`` ranks in ``out_dir``, tensor by tensor.

    The new split comes from ``plan``, or from planning ``model`` (a module, meta is enough, or
    a factory) for ``world_size`` — a plan for another world size may choose other styles, so
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
    if plan is None:
        if model is None:
            raise CheckpointError("reshard needs the model (or a plan) to plan the new world size: pass model=... "
                                  "(--model MODEL)")
        module, args, kwargs = _resolve_model(model, example_inputs, example_kwargs, src.example_inputs)
        _check_model(module, src)
        plan = plan_model(module, world_size, example_inputs=args, example_kwargs=kwargs)
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
            manifest = _manifest(plan, items, src.ties, files, src.model, src.example_inputs)
            _write_manifest(tmp, manifest)
    finally:
        bar.close()
    manifest.directory = Path(out_dir).absolute()
    return manifest
