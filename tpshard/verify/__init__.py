"""The verify stage: run the original and the sharded model on real ranks and compare."""

from tpshard.verify.harness import (
    DEFAULT_TOLERANCES,
    Comparison,
    VerifyReport,
    active_dropout,
    compare,
    default_tolerance,
    flatten,
    resolve_model,
    verify,
)

__all__ = ["verify", "VerifyReport", "Comparison", "DEFAULT_TOLERANCES", "default_tolerance", "resolve_model",
           "active_dropout", "flatten", "compare"]
