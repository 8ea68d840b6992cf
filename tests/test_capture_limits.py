"""Capture failures end in bounded time and name the model's line (issue 12, item 5)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tpshard.compiler import CaptureError, capture


class PaddedEncoder(nn.Module):
    """A bidirectional mask built from Python control flow on tensor values (as encoder-only
    text models do): neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.q, self.o = nn.Embedding(32, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        s = self.q(x) @ x.transpose(1, 2)
        if (mask == 0).any():  # padding present: mask the keys
            s = s.masked_fill(mask[:, None, :] == 0, -1e9)
        return self.o(s.softmax(-1) @ x)


def test_control_flow_on_values_names_the_line_for_both_captures() -> None:
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with pytest.raises(CaptureError) as info:
        capture(PaddedEncoder(), (ids, mask))
    msg = str(info.value)
    line = "if (mask == 0).any()"
    assert "torch.fx could not trace module '<root>' (PaddedEncoder) at test_capture_limits.py:" in msg
    assert "torch.export failed too at test_capture_limits.py:" in msg
    assert msg.count(line) == 2, msg  # each capture names the line
    assert len(msg) < 2000, msg  # the error, not torch's pages of partial graph


def test_capture_is_bounded_in_time_and_names_the_line() -> None:
    class Spins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            while x.shape[0] > 0:  # symbolic tracing: the shape is a proxy, always true
                pass
            return self.lin(x)

    t = time.monotonic()
    with pytest.raises(CaptureError, match=r"did not finish in 1 s.*test_capture_limits.py:\d+ \(forward\)"):
        capture(Spins(), (torch.randn(2, 4),), timeout_s=1)
    assert time.monotonic() - t < 30
