"""`understudy demo` on a terminal: a bar per phase of the cycle, fed from the route's state."""

from __future__ import annotations

import io
import sys

import pytest

from gateway.demo.run import PhaseBars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_per_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bars = PhaseBars(min_samples=40)
    bars.show({"mode": "cloud"}, cloud_answers=12)
    bars.show({"mode": "training", "job": {"current_step": 3, "total_steps": 30, "loss": 1.5}}, 40)
    bars.show({"mode": "training", "job": {"current_step": 30, "total_steps": 30, "loss": 0.2}}, 40)
    bars.show({"mode": "eval", "window": 4, "pass_rate": 0.75}, 41)
    bars.close()
    text = screen.getvalue()
    assert "collecting cloud answers" in text and "12/40" in text
    assert "training the adapter" in text and "30/30" in text and "loss 0.200" in text
    assert "judging the adapter" in text and "pass rate 75%" in text
    assert "\r" in text  # drawn as bars, not lines
