"""The benchmark scripts' own logic (their numbers are measured, not tested)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import convergence, speed  # noqa: E402


def test_steps_to_reach_is_the_first_step_at_or_above_target():
    curve = [(10, 0.5), (20, 0.8), (30, 0.79), (40, 0.9)]
    assert convergence.steps_to_reach(curve, 0.8) == 20
    assert convergence.steps_to_reach(curve, 0.85) == 40
    assert convergence.steps_to_reach(curve, 0.95) is None


def test_speed_builds_every_layer_and_times_a_step():
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    ctx = torch.arange(8) % 3
    for name, _ in speed.LAYERS:
        layer = speed.make(name, 4, 3, "cpu")
        assert speed.timed(speed.step_fn(layer, x, ctx), "cpu") > 0
    assert speed.make("mn-fit25", 4, 3, "cpu").fit_fraction == 0.25
