"""What capture returns: the graph with shapes, its description for the planner, and how it
was captured. Both capture paths (:mod:`tpshard.compiler.capture`, symbolic tracing, and
:mod:`tpshard.compiler.capture_export`, ``torch.export``) build one; the planner, the rewriter
and in-place mode read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
import torch.nn as nn

from tpshard.compiler.ir import Op

__all__ = ["Captured"]


@dataclass
class Captured:
    """``gm`` and ``ops`` may be built on first use (``build``): a stamped capture's full graph,
    which planning a block once does not need (``tpshard.plan`` of a 70B model never builds it)."""

    _gm: fx.GraphModule | None
    _ops: list[Op] | None
    kind: str  # "fx" or "export"
    model: nn.Module | None = None  # the original (for what tracing does not keep: buffer persistence)
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # repeated blocks (tpshard.compiler.blocks): the two-block capture and how this graph was
    # stamped from it, for planning the blocks once; None: captured whole
    repeated: tuple[Any, Any] | None = None
    build: Callable[[], tuple[fx.GraphModule, list[Op]]] | None = field(default=None, repr=False)

    def _built(self) -> None:
        if self._gm is None and self.build is not None:
            self._gm, self._ops = self.build()
            self.build = None

    @property
    def gm(self) -> fx.GraphModule:
        self._built()
        return self._gm

    @property
    def ops(self) -> list[Op]:
        self._built()
        return self._ops
