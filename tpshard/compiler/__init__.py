"""The compiler stage: capture -> sharding propagation -> planner -> Plan -> rewrite (or in place).

Modules, each importing only those above it:

- :mod:`~tpshard.compiler.ir`, :mod:`~tpshard.compiler.ir_aten`: what each graph node means;
- :mod:`~tpshard.compiler.captured`, :mod:`~tpshard.compiler.moe`, :mod:`~tpshard.compiler.capture_export`,
  :mod:`~tpshard.compiler.blocks`, :mod:`~tpshard.compiler.capture`: a model and example
  inputs -> a graph with shapes (routed experts as one node each; repeated blocks captured as
  two and stamped);
- :mod:`~tpshard.compiler.placement`, :mod:`~tpshard.compiler.rules_shape`,
  :mod:`~tpshard.compiler.analysis`: sharding propagation, rules as lookup tables;
- :mod:`~tpshard.compiler.planner_replay`, :mod:`~tpshard.compiler.styles`,
  :mod:`~tpshard.compiler.planner`: the decisions, written as a Plan;
  :mod:`~tpshard.compiler.blocks_plan`: repeated blocks planned once;
- :mod:`~tpshard.compiler.sequence`: sequence parallelism, a post-pass over a Plan's edits;
- :mod:`~tpshard.compiler.rewrite`: a Plan applied to the graph;
- :mod:`~tpshard.compiler.inplace`, :mod:`~tpshard.compiler.inplace_apply`: in-place mode,
  planned (attribute changes recorded in the Plan), then applied.

Other folders use the names below; the modules' underscore names stay inside this folder.
"""

from tpshard.compiler.capture import CaptureError, capture
from tpshard.compiler.blocks_plan import capture_for_plan, plan_captured
from tpshard.compiler.captured import Captured
from tpshard.compiler.inplace import plan_inplace
from tpshard.compiler.inplace_apply import apply_inplace
from tpshard.compiler.planner import make_plan
from tpshard.compiler.rewrite import rewrite
from tpshard.compiler.sequence import sequence_parallel
from tpshard.compiler.styles import SPLIT_STYLES, STYLES

__all__ = ["CaptureError", "Captured", "capture", "make_plan", "plan_captured", "capture_for_plan", "STYLES", "SPLIT_STYLES", "rewrite", "plan_inplace",
           "apply_inplace", "sequence_parallel"]
