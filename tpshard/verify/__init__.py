"""The verify stage: run the original and the sharded model on real ranks and compare.

Modules, each importing only those above it:

- :mod:`~tpshard.verify.launch`: run a function on N real ``torch.distributed`` ranks;
- :mod:`~tpshard.verify.model`: active dropout, the job the ranks get, the model's way to them;
- :mod:`~tpshard.verify.compare`: tolerances from the rounding noise, comparing tensors and nested outputs;
- :mod:`~tpshard.verify.step`: one training step's values compared, tensor by tensor;
- :mod:`~tpshard.verify.report`: :class:`VerifyReport`;
- :mod:`~tpshard.verify.localize`: the first module whose output differs;
- :mod:`~tpshard.verify.ranks`: one training step, the body of each rank;
- :mod:`~tpshard.verify.harness`: :func:`verify`, the phases;
- :mod:`~tpshard.verify.cli`: ``tpshard verify``.
"""

from tpshard.models.resolve import resolve_model
from tpshard.verify.compare import (DEFAULT_TOLERANCES, Comparison, Tolerances, compare, default_tolerance, flatten,
                                    noise_tolerance)
from tpshard.verify.harness import verify
from tpshard.verify.model import active_dropout
from tpshard.verify.report import VerifyReport

__all__ = ["verify", "VerifyReport", "Comparison", "DEFAULT_TOLERANCES", "default_tolerance", "noise_tolerance",
           "Tolerances", "resolve_model", "active_dropout", "flatten", "compare"]
