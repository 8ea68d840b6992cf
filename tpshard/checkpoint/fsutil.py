"""Output that appears all at once (a temporary sibling renamed at the end, replacing an
existing output only with ``force``), and a progress bar."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tpshard.checkpoint.manifest import MANIFEST_NAME
from tpshard.checkpoint.safetensors_io import CheckpointError

__all__ = ["format_bytes"]


def _check_replaceable(target: Path, force: bool, is_dir: bool) -> None:
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise CheckpointError(f"{target} exists; pass --force (force=True) to replace it, or choose another output")
    if is_dir:
        if not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a directory; remove it or choose another output")
        ours = (target / MANIFEST_NAME).is_file() or (target / "model.safetensors.index.json").is_file()
        if any(target.iterdir()) and not ours:
            raise CheckpointError(f"refusing to replace {target}: it is not a tpshard checkpoint (no {MANIFEST_NAME}), "
                                  "not a merged model directory and not empty; remove it yourself or choose another "
                                  "output")
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
    """A progress bar of bytes on stderr (tqdm), shown only when stderr is a terminal (or ``enabled``)."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        self.enabled = bool(sys.stderr.isatty()) if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=max(total, 1), desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
