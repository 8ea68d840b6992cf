"""``tpshard verify``: check on real ranks that the sharded model equals the original.

    tpshard verify gpt --world-size 2
    tpshard verify llama -n 4 --dtype bfloat16 --device cuda
    tpshard verify mypkg.models:build_model -n 2 --json

MODEL is a built-in reference model name (``mlp``, ``gpt``, ``llama``) or
``package.module:callable`` returning a model, ``(model, example_args)`` or
``(model, example_args, example_kwargs)``. Prints the plan and the report (see
:func:`tpshard.verify`). Exit status: 0 when equivalent, 1 when not (or when a rank raised,
hung or died), 2 on a usage error.

``cli.py`` adds the subcommand with :func:`add_parser`; it calls ``ns.fn(ns)`` and exits with
the integer it returns.

Example::

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="tpshard")
    >>> _ = add_parser(parser.add_subparsers(dest="command"))
    >>> ns = parser.parse_args(["verify", "mlp", "-n", "2", "--dtype", "float32"])
    >>> ns.world_size, ns.dtype, ns.fn is run
    (2, 'float32', True)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tpshard.compiler import CaptureError
from tpshard.models.hf import example_inputs_for, is_torch_file, load_module
from tpshard.plan import PlanError
from tpshard.verify.harness import verify
from tpshard.verify.launch import RankError, RankTimeout

__all__ = ["add_parser", "run", "MODEL_HELP", "add_override_arg", "overrides_of"]

EXIT_EQUIVALENT, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2

#: MODEL, and ``--override``, as every subcommand of the command line takes them.
MODEL_HELP = ("a Hugging Face model directory (config.json and safetensors), a torch.save(model) file "
              "(with --trust-pickle), a built-in model (mlp, gpt, llama) or package.module:callable")


def override(text: str) -> tuple[str, str]:
    """``PATTERN=STYLE`` of ``--override``: an fnmatch pattern on module paths, and a style."""
    pattern, sep, style = text.rpartition("=")
    if not sep or not pattern or not style:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=STYLE (e.g. lm_head=column_no_gather)")
    return pattern, style


def overrides_of(ns: argparse.Namespace) -> dict[str, str] | None:
    """The ``overrides=`` dict of the repeated ``--override`` options (None when there are none)."""
    return dict(ns.override) if getattr(ns, "override", None) else None


def add_override_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--override", metavar="PATTERN=STYLE", type=override, action="append", default=[],
                   help="force the style of the modules matching PATTERN (fnmatch on module paths): column, row, "
                        "vocab, embed_dim, replicate or column_no_gather; repeatable (the plan's overrides=)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "verify", help="run the sharded model on real ranks and compare it with the original",
        description="Run MODEL sharded over N real ranks and the original, one training step each, and "
                    "compare outputs, gradients, parameters after an optimizer step and a second forward. "
                    "Exit status 0 only when equivalent (1 when not, 2 on a usage error).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("-n", "--world-size", type=int, required=True, help="number of ranks")
    add_override_arg(p)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a torch.save(model) file as MODEL (unpickling runs arbitrary code)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float64", help="float64 (default), float32, bfloat16 or float16")
    p.add_argument("--rtol", type=float, default=None,
                   help="fixed relative tolerance, atol + rtol * max|reference| (default: each tensor's tolerance "
                        "derived from the rounding noise of the unsharded model)")
    p.add_argument("--atol", type=float, default=None, help="fixed absolute tolerance (see --rtol)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the ranks (default: 300)")
    p.add_argument("--no-backward", action="store_true", help="compare the forward only")
    p.add_argument("--no-step", action="store_true", help="skip the optimizer step comparison")
    p.add_argument("--keep-dropout", action="store_true",
                   help="keep dropout active in training mode (it cannot match; default: eval mode)")
    p.add_argument("--json", action="store_true", help="print the report summary as one JSON line")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the verdict line (and the failing checks); the exit status says the rest")
    p.set_defaults(fn=run)
    return p


def run(ns: argparse.Namespace) -> int:
    """Handle ``tpshard verify``: print the plan and the report; return the exit status."""
    if ns.world_size < 1:
        return _usage(f"--world-size must be at least 1, not {ns.world_size}")
    try:
        model: Any = ns.model
        inputs: tuple[tuple, dict | None] = ((), None)
        if is_torch_file(model):  # a whole saved module: unpickled here, only with --trust-pickle
            model = load_module(model, trust_pickle=ns.trust_pickle)
            inputs = example_inputs_for(model) if hasattr(model, "config") else inputs
        report = verify(model, ns.world_size, example_inputs=inputs[0], example_kwargs=inputs[1], device=ns.device,
                        dtype=ns.dtype, rtol=ns.rtol, atol=ns.atol, backward=not ns.no_backward,
                        optimizer_step=not ns.no_step, timeout=ns.timeout, keep_dropout=ns.keep_dropout,
                        overrides=overrides_of(ns))
    except (RankError, RankTimeout) as e:  # the sharded model failed to run: not equivalent
        print(f"tpshard verify: {e}", file=sys.stderr)
        return EXIT_DIFFERENT
    except (ValueError, TypeError, PlanError, CaptureError) as e:
        return _usage(str(e))
    if ns.json:
        print(json.dumps(report.to_dict()))
    elif getattr(ns, "quiet", False):
        lines = report.table().splitlines()
        print(lines[0] if lines else ("equivalent" if report.ok else "NOT equivalent"))
        for c in report.failures:
            print(f"  FAIL {c.name}: max rel {c.max_rel:.3g} (rtol {c.rtol:g})")
    else:
        if report.plan is not None:
            print(report.plan.explain())
            print()
        print(report)
    return EXIT_EQUIVALENT if report.ok else EXIT_DIFFERENT


def _usage(message: str) -> int:
    print(f"tpshard verify: {message}", file=sys.stderr)
    return EXIT_USAGE
