"""Test helpers: assert that a model sharded by tpshard equals the original.

In a pytest suite::

    from tpshard.testing import assert_equivalent

    def test_my_model_shards():
        model = MyModel()
        assert_equivalent(model, 2, example_inputs=(torch.randn(4, 16),))

:func:`assert_equivalent` runs :func:`tpshard.verify` (real ranks, one training step, float64
by default) and raises ``AssertionError`` with the report's table — every compared tensor,
its error and tolerance, and the first module that diverges — unless every check passes.
Give the test a time limit above ``timeout`` (e.g. ``@pytest.mark.timeout(120)``).

Example::

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    >>> assert_equivalent(mlp, 2, example_inputs=(torch.randn(3, 8),)).ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tpshard.verify import VerifyReport, verify

__all__ = ["assert_equivalent"]


def assert_equivalent(model: nn.Module | str, world_size: int, **kwargs: Any) -> VerifyReport:
    """Verify ``model`` sharded over ``world_size`` ranks; raise ``AssertionError`` with the
    report's table unless it is equivalent. ``kwargs`` are :func:`tpshard.verify`'s
    (``example_inputs``, ``dtype``, ``device``, ``plan``, ``rtol``, ``timeout``, ...).
    Returns the report (for further assertions, e.g. on ``report.collectives``).

    A rank that raises, hangs or dies raises :class:`tpshard.verify.launch.RankError` /
    :class:`tpshard.verify.launch.RankTimeout` with its traceback.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    report = verify(model, world_size, **kwargs)
    if not report.ok:
        where = f" at {report.first_divergence!r}" if report.first_divergence else ""
        raise AssertionError(f"the sharded model differs from the original{where}\n{report}")
    return report


def _scale_all_reduce(delta: float, rank: int, world_size: int, sharded: nn.Module) -> None:
    """A defect injected from outside tpshard, to test the verifier itself: in this rank,
    every all-reduce of :mod:`tpshard.comm` (forward and backward) returns its result times
    ``1 + delta``. Runs as ``tpshard.verify._verify(..., _tamper=functools.partial(
    _scale_all_reduce, delta))``, in each rank right after parallelize (module level, so that
    spawned CUDA ranks can unpickle it)."""
    from tpshard import comm

    exact = comm._all_reduce

    def scaled(x: Any, group: Any) -> Any:
        return exact(x, group) * (1 + delta)

    comm._all_reduce = scaled
