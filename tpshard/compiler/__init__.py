"""The compiler stage: capture -> sharding propagation -> planner -> Plan -> rewrite.

Other folders use these names; the modules' underscore names stay inside this folder.
"""

from tpshard.compiler.capture import CaptureError, Captured, capture
from tpshard.compiler.inplace import apply_inplace
from tpshard.compiler.planner import STYLES, make_plan
from tpshard.compiler.rewrite import rewrite

__all__ = ["CaptureError", "Captured", "capture", "make_plan", "STYLES", "rewrite", "apply_inplace"]
