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


def test_summarize_counts_steps_to_bn_best_per_seed():
    runs = [{"norm": "bn", "seed": 0, "curve": [(10, 0.5), (20, 0.7)], "best_acc": 0.7, "seconds": 1.0},
            {"norm": "acn", "seed": 0, "curve": [(10, 0.72), (20, 0.6)], "best_acc": 0.72, "seconds": 2.0},
            {"norm": "bn", "seed": 1, "curve": [(10, 0.6)], "best_acc": 0.6, "seconds": 1.0},
            {"norm": "acn", "seed": 1, "curve": [(10, 0.5)], "best_acc": 0.5, "seconds": 2.0}]
    s = convergence.summarize(runs)
    assert list(s) == ["bn", "acn"]
    assert s["acn"]["steps_to_bn_best"] == [10, None] and s["acn"]["reached_bn_best"] == "1/2"
    assert s["bn"]["steps_to_bn_best"] == [20, 10] and abs(s["acn"]["best_acc_mean"] - 0.61) < 1e-12


def test_convergence_variant_trains_the_base_layer():
    import types

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    ctx = torch.zeros(64, dtype=torch.long)
    a = types.SimpleNamespace(width=0.125, lr=1e-3, epochs=1, batch_size=32, eval_every=1)
    r = convergence.run_one("acn-data", 0, (x, y, ctx), (x[:16], y[:16], ctx[:16]), a)
    assert r["norm"] == "acn-data" and r["steps"] == 2 and len(r["curve"]) == 2
    assert convergence.VARIANTS["acn-data"] == ("acn", {"num_components": 3, "init": "data"})


def test_interleaved_reports_each_function():
    calls = []
    ms = speed.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", 3)
    assert set(ms) == {"a", "b"} and calls == ["a", "b"] * 4 and all(v >= 0 for v in ms.values())
