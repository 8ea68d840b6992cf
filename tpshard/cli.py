"""The ``tpshard`` command line.

    tpshard plan gpt --world-size 2          # the plan of a built-in model, as a table
    tpshard plan pkg.module:factory -n 4 --json

MODEL is a built-in reference model name (see ``tpshard.models.REFERENCE_MODELS``) or
``package.module:callable`` returning a model, ``(model, example_args)`` or
``(model, example_args, example_kwargs)``. Models are built on the meta device when the
factory allows it, so planning needs no memory for weights.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

import torch

__all__ = ["main", "load_model"]


def load_model(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, tuple, dict]:
    """Resolve MODEL (a built-in name or ``package.module:callable``) to (model, args, kwargs)."""
    from tpshard import models

    if ":" not in spec:
        if spec not in models.REFERENCE_MODELS:
            raise SystemExit(f"tpshard: unknown model {spec!r}; built-in models: {sorted(models.REFERENCE_MODELS)}, "
                             "or pass package.module:callable")
        model, args = models.build(spec, device=device, dtype=dtype)
        return model, args, {}
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"tpshard: cannot load {spec!r}: {e}") from e
    made = factory()
    if isinstance(made, torch.nn.Module):
        return made, (), {}
    if isinstance(made, tuple) and made and isinstance(made[0], torch.nn.Module):
        args = tuple(made[1]) if len(made) > 1 else ()
        kwargs = dict(made[2]) if len(made) > 2 else {}
        return made[0], args, kwargs
    raise SystemExit(f"tpshard: {spec!r} returned {type(made).__name__}; expected a model, "
                     "(model, example_args) or (model, example_args, example_kwargs)")


def _cmd_plan(ns: argparse.Namespace) -> int:
    import tpshard

    model, args, kwargs = load_model(ns.model, device="meta" if ":" not in ns.model else "cpu")
    plan = tpshard.plan(model, ns.world_size, example_inputs=args, example_kwargs=kwargs)
    print(plan.to_json() if ns.json else plan.explain())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpshard", description="Automatic tensor parallelism for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("plan", help="print how a model is split over N ranks")
    sp.add_argument("model", help="built-in model name (mlp, gpt, llama) or package.module:callable")
    sp.add_argument("-n", "--world-size", type=int, required=True)
    sp.add_argument("--json", action="store_true", help="print the Plan's JSON")
    sp.set_defaults(fn=_cmd_plan)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.fn(ns)
    except (ValueError, RuntimeError) as e:  # PlanError, CaptureError: the message says what to do
        print(f"tpshard: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
