"""The ``tpshard`` command line.

    tpshard plan MODEL --world-size N [--json] [--sequence-parallel] [--expert-parallel]
                                                        how MODEL is split, and memory per rank
    tpshard shard MODEL --world-size N --out DIR        a sharded checkpoint: one file per rank
    tpshard merge DIR --out FILE.safetensors | OUT_DIR  the full weights again, bit-exact (a directory:
                                                        what from_pretrained loads)
    tpshard reshard DIR --world-size M --out DIR2       N ranks -> M ranks, tensor by tensor
    tpshard verify ...                                  (when tpshard.verify.cli is installed)

MODEL is a Hugging Face ``save_pretrained`` directory (its model built from ``config.json`` on
the meta device, its safetensors files the weights), a file of ``torch.save(model)`` (with
``--trust-pickle``), a built-in reference model name (see ``tpshard.models.REFERENCE_MODELS``) or
``package.module:callable`` returning a model, ``(model, example_args)`` or
``(model, example_args, example_kwargs)`` (the current directory is importable). With
``--weights FILE`` (a ``.safetensors`` file, or a torch state_dict file, loaded with
``weights_only=True``) the model is built without weights (parameters on the meta device, see
:func:`tpshard.checkpoint.empty_weights`) and the file supplies them; without it the model's
own weights are used. A file holding a whole pickled ``nn.Module`` is read only with
``--trust-pickle``, because unpickling runs arbitrary code.

Exit status: 0 on success, 2 on a user error (one line on stderr, no traceback), 130 when
interrupted.

Example::

    >>> main(["plan", "mlp", "--world-size", "2", "--json"])  # doctest: +ELLIPSIS
    {
     "format_version": 1,
     ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Any, Sequence

import torch

from tpshard import checkpoint
from tpshard._version import __version__
from tpshard.checkpoint import format_bytes
from tpshard.models.hf import is_model_dir, is_torch_file
from tpshard.models.resolve import ModelSpecError, resolve_model
from tpshard.verify.cli import MODEL_HELP, add_override_arg, overrides_of

__all__ = ["main", "build_parser", "load_model", "ModelSpecError"]

#: MODEL -> (model, args, kwargs): :func:`tpshard.models.resolve_model`, the resolver the
#: verifier and the checkpoint functions share (the name this module has always offered).
load_model = resolve_model


# ---------------------------------------------------------------------------------------------
# MODEL and --weights.
# ---------------------------------------------------------------------------------------------


def _saved(spec: str) -> bool:
    """MODEL is a saved model (a model directory or a torch file): it carries its weights."""
    return is_model_dir(spec) or is_torch_file(spec)


def _load_for(ns: argparse.Namespace) -> tuple[Any, tuple, dict]:
    """MODEL of a subcommand: built without weights when --weights supplies them."""
    return resolve_model(ns.model, empty=ns.weights is not None, trust_pickle=ns.trust_pickle)


# ---------------------------------------------------------------------------------------------
# tpshard plan
# ---------------------------------------------------------------------------------------------


def _tensor_dtypes(model: torch.nn.Module, source: Any) -> dict[str, torch.dtype]:
    """Each parameter's and buffer's dtype: the weights file's where it has the tensor."""
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    dtypes.update({k: b.dtype for k, b in model.named_buffers(remove_duplicate=False)})
    if source is None:
        return dtypes
    in_file = set(source.keys())
    dtypes.update({k: source.info(k)[1] for k in in_file})
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():  # a file may hold a tied parameter under either of its names
        stored = [n for n in names if n in in_file]
        if stored:
            dtypes.update({n: dtypes[stored[0]] for n in names})
    return dtypes


def memory_report(plan: Any, dtypes: dict[str, torch.dtype]) -> str:
    """Bytes per rank of the planned parameters and buffers (ties counted once), as a table.

    Example::

        >>> import tpshard
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> print(memory_report(tpshard.plan(mlp, 2), {}))
        memory per rank (parameters and buffers, float32):
          rank  elements  bytes
          0-1   40        160 B
          whole model: 76 elements, 304 B
    """
    world = plan.world_size
    per_rank = [[0, 0] for _ in range(world)]  # elements, bytes
    full = [0, 0]
    used: set[str] = set()
    for name, p in plan.params.items():
        if name in plan.ties:
            continue
        dtype = dtypes.get(name, torch.float32)
        used.add(str(dtype).removeprefix("torch."))
        size = torch.empty((), dtype=dtype).element_size()
        n_full = 1
        for s in p.shape:
            n_full *= s
        n_local = 1
        for s in p.local_shape(world):
            n_local *= s
        full[0] += n_full
        full[1] += n_full * size
        for r in range(world):  # every rank holds the same local shape: splits are even
            per_rank[r][0] += n_local
            per_rank[r][1] += n_local * size
    lines = [f"memory per rank (parameters and buffers, {', '.join(sorted(used)) or 'no tensors'}):",
             "  rank  elements  bytes"]
    start = 0
    for r in range(1, world + 1):
        if r == world or per_rank[r] != per_rank[start]:
            ranks = f"{start}" if r - 1 == start else f"{start}-{r - 1}"
            lines.append(f"  {ranks:<5} {per_rank[start][0]:<9,} {format_bytes(per_rank[start][1])}")
            start = r
    lines.append(f"  whole model: {full[0]:,} elements, {format_bytes(full[1])}")
    return "\n".join(lines)


def _cmd_plan(ns: argparse.Namespace) -> int:
    model, args, kwargs = resolve_model(ns.model, empty=True, trust_pickle=ns.trust_pickle)  # no weights needed
    weights = ns.weights or (ns.model if is_model_dir(ns.model) else None)
    source = checkpoint.open_weights(weights, trust_pickle=ns.trust_pickle) if weights else None
    with source if source is not None else contextlib.nullcontext():
        plan = checkpoint.plan_model(model, ns.world_size, example_inputs=args, example_kwargs=kwargs,
                                     overrides=overrides_of(ns), sequence_parallel=ns.sequence_parallel,
                                     expert_parallel=ns.expert_parallel)
        if ns.json:
            print(plan.to_json())
            return 0
        print(plan.explain())
        print()
        print(memory_report(plan, _tensor_dtypes(model, source)))
    return 0


# ---------------------------------------------------------------------------------------------
# tpshard shard | merge | reshard
# ---------------------------------------------------------------------------------------------


def _cmd_shard(ns: argparse.Namespace) -> int:
    if _saved(ns.model):  # save_sharded reads the directory's files (or the module) itself
        model, args, kwargs = ns.model, None, None
    else:
        model, args, kwargs = _load_for(ns)
    manifest = checkpoint.save_sharded(
        model, ns.out, ns.world_size, weights=ns.weights, trust_pickle=ns.trust_pickle, example_inputs=args,
        example_kwargs=kwargs, overrides=overrides_of(ns), model_spec=ns.model, force=ns.force,
        expert_parallel=ns.expert_parallel)
    total = sum(f.bytes for f in manifest.files)
    print(f"wrote {manifest.directory}: {len(manifest.files)} rank files, {format_bytes(total)} in all, "
          f"{len(manifest.tensors)} tensors ({len(manifest.ties)} tied aliases)")
    return 0


def _cmd_merge(ns: argparse.Namespace) -> int:
    path = checkpoint.merge(ns.dir, ns.out, force=ns.force, max_shard_bytes=ns.max_shard_size)
    size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    print(f"wrote {path}: {format_bytes(size)}")
    return 0


def _cmd_reshard(ns: argparse.Namespace) -> int:
    src = checkpoint.read_manifest(ns.dir)
    spec = ns.model or src.model
    if not ns.model and (src.source or {}).get("config"):  # from a model directory: built from its config
        manifest = checkpoint.reshard(ns.dir, ns.out, ns.world_size, force=ns.force)
        print(f"wrote {manifest.directory}: {src.world_size} -> {manifest.world_size} ranks")
        return 0
    if spec is None:
        raise ModelSpecError(f"{ns.dir}/{checkpoint.MANIFEST_NAME} does not say which model it holds (it was not "
                             "written by `tpshard shard MODEL`); pass --model MODEL to plan the new world size")
    model, args, kwargs = resolve_model(spec, empty=True)
    manifest = checkpoint.reshard(ns.dir, ns.out, ns.world_size, model=model, example_inputs=args or None,
                                  example_kwargs=kwargs or None, force=ns.force)
    print(f"wrote {manifest.directory}: {src.world_size} -> {manifest.world_size} ranks")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser.
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage stays behind --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _world_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


WORLD_HELP = "number of tensor-parallel ranks"


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    digits = t.rstrip("KMGIB")
    try:
        n = int(float(digits) * units[t[len(digits):]])
    except (ValueError, KeyError):
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 5GB, 500MB, 1000000)")
    return n


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--weights", metavar="FILE",
                   help="weights: a .safetensors file, a model directory or a torch state_dict file (default: "
                        "MODEL's own)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled nn.Module as MODEL or --weights (unpickling runs arbitrary code)")
    add_override_arg(p)


EP_HELP = ("give each rank whole routed experts (rank r: experts [r*E/N, (r+1)*E/N)) instead of every expert's "
           "hidden dim; N must divide the expert count")


def _add_plan(sub: Any) -> None:
    p = sub.add_parser("plan", help="print how a model is split over N ranks, and memory per rank")
    _add_model_args(p)
    p.add_argument("-n", "--world-size", type=_world_size, required=True, help=WORLD_HELP)
    p.add_argument("--json", action="store_true", help="print the Plan's JSON")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split the residual stream between blocks along the sequence dim (norms, residual adds, "
                        "dropout on sequence shards; reduce-scatter + all-gather in place of each all-reduce)")
    p.add_argument("--expert-parallel", action="store_true", help=EP_HELP)
    p.set_defaults(fn=_cmd_plan)


def _add_shard(sub: Any) -> None:
    p = sub.add_parser("shard", help="write a sharded checkpoint: one safetensors file per rank")
    _add_model_args(p)
    p.add_argument("-n", "--world-size", type=_world_size, required=True, help=WORLD_HELP)
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (created)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is an existing tpshard checkpoint")
    p.add_argument("--expert-parallel", action="store_true", help=EP_HELP)
    p.set_defaults(fn=_cmd_shard)


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="reassemble the full weights of a sharded checkpoint")
    p.add_argument("dir", metavar="DIR", help="a checkpoint written by `tpshard shard`")
    p.add_argument("--out", metavar="OUT", required=True,
                   help="FILE.safetensors: one file; any other name: a directory from_pretrained loads (config, "
                        "safetensors files of at most --max-shard-size, their index)")
    p.add_argument("--max-shard-size", metavar="BYTES", type=_size, default=None,
                   help="largest safetensors file of an output directory, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(fn=_cmd_merge)


def _add_reshard(sub: Any) -> None:
    p = sub.add_parser("reshard", help="re-split a sharded checkpoint for another world size")
    p.add_argument("dir", metavar="DIR", help="a checkpoint written by `tpshard shard`")
    p.add_argument("-n", "--world-size", type=_world_size, required=True, help="the new number of ranks")
    p.add_argument("--out", metavar="DIR2", required=True, help="output directory (created)")
    p.add_argument("--model", metavar="MODEL", help="the model to plan for the new world size "
                                                    "(default: the MODEL recorded in the manifest)")
    p.add_argument("--force", action="store_true", help="replace DIR2 if it is an existing tpshard checkpoint")
    p.set_defaults(fn=_cmd_reshard)


def _add_verify(sub: Any) -> None:
    """`tpshard verify`, whose handler lives in tpshard.verify.cli (when it exists)."""
    try:
        verify_cli = importlib.import_module("tpshard.verify.cli")
    except ImportError as e:
        if e.name != "tpshard.verify.cli":  # it exists but is broken: say so, keep the other commands
            warnings.warn(f"`tpshard verify` is unavailable: {type(e).__name__}: {e}", stacklevel=2)
        return
    verify_cli.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tpshard", description="Automatic tensor parallelism for PyTorch models.")
    p.add_argument("--version", action="version", version=f"tpshard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_plan(sub)
    _add_shard(sub)
    _add_merge(sub)
    _add_reshard(sub)
    _add_verify(sub)
    return p


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

# What a user can fix: PlanError, CaptureError, CheckpointError, ModelSpecError (ValueError or
# RuntimeError, with messages that say what to do) and file system errors.
_USER_ERRORS = (ValueError, RuntimeError, OSError)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 2 user error, 130 interrupted)."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(ns.fn(ns) or 0)
    except _USER_ERRORS as e:
        if isinstance(e, BrokenPipeError):  # `tpshard plan ... | head`: the reader left; not an error
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"tpshard: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
