"""Run a function on N real ``torch.distributed`` ranks (processes), with a hard time limit.

Used by the tests, the equivalence harness and the benchmarks. Each rank is a process that
initializes a gloo (CPU, or CUDA tensors shared on one GPU) or NCCL process group through a
``FileStore`` in a private temporary directory, so no port has to be agreed on in advance.

Guarantees:
- a rank that raises makes :func:`run_ranks` raise :class:`RankError` carrying that rank's
  traceback, and every other rank is killed (they would otherwise wait in a collective);
- a rank that dies without a word, or a run that outlasts ``timeout``, raises within
  ``timeout`` seconds; nothing is left running afterwards.

Example::

    >>> def body(rank, world_size):
    ...     import torch, torch.distributed as dist
    ...     x = torch.tensor([float(rank)])
    ...     dist.all_reduce(x)
    ...     return x.item()
    >>> run_ranks(body, 2)  # doctest: +SKIP
    [1.0, 1.0]
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "RankError", "RankTimeout"]


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""

    def __init__(self, rank: int, tb: str) -> None:
        super().__init__(f"rank {rank} raised:\n{tb}")
        self.rank = rank
        self.traceback = tb


class RankTimeout(RuntimeError):
    """Ranks did not finish in time, or died without reporting."""


def _rank_main(fn: Callable, rank: int, world_size: int, store_path: str, backend: str,
               device: str, collective_timeout: float, threads: int, args: tuple, kwargs: dict,
               results: Any) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        if device.startswith("cuda"):
            n = torch.cuda.device_count()
            torch.cuda.set_device(rank % max(n, 1))
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        value = fn(rank, world_size, *args, **kwargs)
        try:
            payload = pickle.dumps(value)
        except Exception as e:  # an unpicklable result is a bug in the body; say so
            raise TypeError(f"rank {rank} returned an unpicklable {type(value).__name__}: {e}") from e
        results.put((rank, "ok", payload))
    except BaseException:
        # Report before tearing the group down: peers waiting in a collective fail once it goes.
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              backend: str | None = None, device: str = "cpu", start_method: str | None = None,
              threads: int = 1, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return the results.

    Args:
        fn: a picklable (module-level) function; its return values must be picklable.
        world_size: number of ranks (processes).
        timeout: seconds for the whole run; collectives inside time out a little sooner.
        backend: "gloo" (default on CPU, and on CUDA when ranks must share a GPU) or "nccl".
        device: "cpu" or "cuda"; with CUDA, NCCL is used when each rank has its own GPU.
        start_method: "fork" (fast: ranks inherit the imported torch) or "spawn"; default
            fork on CPU, spawn with CUDA.
        threads: intra-op threads per rank.
    Returns:
        the list of return values, indexed by rank.
    """
    if device.startswith("cuda"):
        if backend is None:
            backend = "nccl" if torch.cuda.device_count() >= world_size else "gloo"
        start_method = start_method or "spawn"
    else:
        backend = backend or "gloo"
        start_method = start_method or ("fork" if os.name == "posix" else "spawn")
    ctx = mp.get_context(start_method)
    tmp = tempfile.mkdtemp(prefix="tpshard-ranks-")
    results = ctx.Queue()
    collective_timeout = max(5.0, timeout * 0.8)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, os.path.join(tmp, "store"), backend, device,
                  collective_timeout, threads, args, kwargs, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        return _collect(procs, results, world_size, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:  # a process whose start failed cannot be joined
                p.join(timeout=5)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)


# A rank that fails because a peer went away reports one of these; prefer the peer's own error.
_SECONDARY = ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out",
              "DistBackendError", "wait timeout")


def _root_cause(rank: int, tb: str, results: Any, grace: float = 1.0) -> RankError:
    """The first error that is not just a consequence of another rank's failure."""
    errors = [(rank, tb)]
    deadline = time.monotonic() + grace
    while any(s in errors[-1][1] for s in _SECONDARY) and time.monotonic() < deadline:
        try:
            r, status, payload = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if status == "error":
            errors.append((r, payload))
    for r, t in errors:
        if not any(s in t for s in _SECONDARY):
            return RankError(r, t)
    return RankError(*errors[0])


def _collect(procs: list, results: Any, world_size: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise RankTimeout(
                f"timed out: ranks {missing} of {world_size} did not finish within {timeout:.0f} s "
                "(a hung collective, or a rank waiting for one that failed)"
            )
        try:
            rank, status, payload = results.get(timeout=min(0.2, remaining))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs)
                    if r not in values and not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                # Give a dying rank's report a moment to arrive through the queue.
                try:
                    rank, status, payload = results.get(timeout=1.0)
                except queue.Empty:
                    r = dead[0]
                    raise RankTimeout(
                        f"rank {r} died with exit code {procs[r].exitcode} without reporting"
                    ) from None
            else:
                continue
        if status == "error":
            raise _root_cause(rank, payload, results)
        values[rank] = pickle.loads(payload)
    return [values[r] for r in range(world_size)]
