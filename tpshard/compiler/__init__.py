"""The compiler stage: capture -> sharding propagation -> planner -> Plan -> rewrite.

Other folders use these names; the modules' underscore names stay inside this folder.
"""

from tpshard.compiler.capture import CaptureError, capture
from tpshard.compiler.captured import Captured
from tpshard.compiler.inplace import plan_inplace
from tpshard.compiler.inplace_apply import apply_inplace
from tpshard.compiler.planner import make_plan
from tpshard.compiler.rewrite import rewrite
from tpshard.compiler.styles import SPLIT_STYLES, STYLES

__all__ = ["CaptureError", "Captured", "capture", "make_plan", "STYLES", "SPLIT_STYLES", "rewrite", "plan_inplace",
           "apply_inplace"]
