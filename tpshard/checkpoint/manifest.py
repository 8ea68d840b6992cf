"""The manifest of a sharded checkpoint (``manifest.json``) and its rank files.

:class:`Manifest` holds the format version, tpshard/torch versions, the Plan, the world size,
every tensor (:class:`TensorInfo`: full shape, dtype, split), the ties, and per rank file
(:class:`RankFile`) its sha256, size, shapes and dtypes. :func:`read_manifest` reads and checks
it; ``_RankReader`` opens a rank file and checks it against the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpshard._version import __version__
from tpshard.plan import ParamShard, Plan
from tpshard.checkpoint.safetensors_io import _DTYPES, CheckpointError, _SafetensorsFile

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "TensorInfo", "RankFile", "rank_file_name",
           "read_manifest"]

#: Version of the checkpoint layout (manifest + rank files); readers refuse newer versions.
FORMAT_VERSION = 1
FORMAT_NAME = "tpshard-sharded-checkpoint"
MANIFEST_NAME = "manifest.json"


def rank_file_name(rank: int, world_size: int) -> str:
    """The file of ``rank`` in a ``world_size`` checkpoint.

    Example::

        >>> rank_file_name(0, 4)
        'rank-00000-of-00004.safetensors'
    """
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor: its full shape and dtype (safetensors name) and how it is split."""

    shape: tuple[int, ...]
    dtype: str
    dim: int | None = None
    segments: tuple[int, ...] | None = None
    replicas: int = 1  # consecutive ranks holding the same part (replicated kv heads); see ParamShard

    @property
    def spec(self) -> ParamShard:
        return ParamShard(shape=self.shape, dim=self.dim, segments=self.segments, replicas=self.replicas)

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
    source: dict | None = None  # where the weights came from (a model directory: its config and files)
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
            "source": self.source,
            "ties": self.ties,
            "tensors": {k: {"shape": list(t.shape), "dtype": t.dtype, "dim": t.dim,
                            "segments": list(t.segments) if t.segments else None,
                            **({"replicas": t.replicas} if t.replicas > 1 else {})}  # absent: 1, as before
                        for k, t in self.tensors.items()},
            "files": [{"name": f.name, "rank": f.rank, "sha256": f.sha256, "bytes": f.bytes,
                       "tensors": {k: {"shape": list(s), "dtype": d} for k, (s, d) in f.tensors.items()}}
                      for f in self.files],
            "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path | None = None) -> "Manifest":
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        tensors = {k: TensorInfo(tuple(t["shape"]), t["dtype"], t.get("dim"), tup(t.get("segments")),
                                 int(t.get("replicas", 1))) for k, t in d["tensors"].items()}
        files = [RankFile(f["name"], int(f["rank"]), f["sha256"], int(f["bytes"]),
                          {k: (tuple(t["shape"]), t["dtype"]) for k, t in f["tensors"].items()})
                 for f in d["files"]]
        return cls(world_size=int(d["world_size"]), plan=Plan.from_dict(d["plan"]), tensors=tensors,
                   ties=dict(d.get("ties", {})), files=files, model=d.get("model"),
                   example_inputs=d.get("example_inputs"), source=d.get("source"), format_version=int(d["format_version"]),
                   tpshard_version=d.get("tpshard_version", ""), torch_version=d.get("torch_version", ""),
                   directory=directory)


def _versions() -> tuple[str, str]:
    return __version__, torch.__version__


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


@contextlib.contextmanager
def _rank_readers(manifest: Manifest) -> Iterator[list[_RankReader]]:
    """Every rank file, opened and checked up front (missing, truncated, wrong tensors)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_RankReader(manifest, r)) for r in range(manifest.world_size)]
