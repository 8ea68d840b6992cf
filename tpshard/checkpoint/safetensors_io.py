"""The safetensors format, streamed: 8-byte little-endian header length, a JSON header with
dtype/shape/data_offsets per tensor (offsets relative to the end of the header), raw data.

:class:`SafetensorsWriter` writes a file tensor by tensor (or a chunk of rows at a time) after
a header built up front from names, shapes and dtypes, hashing as it goes; ``_SafetensorsFile``
reads one tensor, or some rows of it, at a time (copied or memory-mapped), hashing the file in
the same pass. File I/O and sha256 run on worker threads. Also here: the dtype names of the
format and :class:`CheckpointError`, which every part of :mod:`tpshard.checkpoint` raises.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import mmap
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["CheckpointError", "SafetensorsWriter"]


class CheckpointError(ValueError):
    """A checkpoint, weights file or model does not fit; the message names the file and the fix."""


# Its public home: tracebacks, doctests and pickles name it tpshard.checkpoint.CheckpointError,
# as before this module was split out of tpshard.checkpoint (which re-exports it).
CheckpointError.__module__ = "tpshard.checkpoint"


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


_GAP_READ_BYTES = 32 << 20  # bytes read (and hashed) at a time when a reader skips part of a file

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
            block = self._file.read(min(left, _GAP_READ_BYTES))
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
