"""Learning-rate and snapshot schedules, as closed-form functions of the step (so resuming needs no state).

``t`` is the number of optimizer updates done before the current one (0 for the first update); an epoch has
``steps_per_epoch`` updates, the run ``total_steps = epochs * steps_per_epoch``.

* ``constant``:    lr
* ``exponential``: lr * factor ** floor(epoch / every)  — the MN paper's "x 0.93 every 2 epochs" (Sec. 4.1)
* ``step``:        lr * factor ** (number of milestones passed), milestones as fractions of the epochs —
                   ResNet / DenseNet's "divided by 10 at 50% and 75%" (MN paper Sec. 4.3-4.4)
* ``cosine``:      lr * (1 + cos(pi * t / total_steps)) / 2
* warm-up:         the first ``warmup_steps`` updates are scaled by (t + 1) / warmup_steps (linear), on top.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["SCHEDULES", "lr_at", "check_schedule", "snapshot_steps", "parse_milestones"]

SCHEDULES = ("constant", "exponential", "step", "cosine")


def parse_milestones(value) -> Optional[list[float]]:
    """"0.5,0.75" or [0.5, 0.75] -> sorted fractions in (0, 1); None stays None."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = sorted(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ValueError(f"--milestones must be comma-separated fractions of the epochs, e.g. 0.5,0.75; got "
                         f"{value!r}") from None
    if not out or not all(0.0 < m < 1.0 for m in out):
        raise ValueError(f"--milestones must be fractions of the epochs in (0, 1), e.g. 0.5,0.75; got {value!r}")
    return out


def check_schedule(schedule: str, factor: float, every: int, milestones, warmup_steps: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(factor, (int, float)) and 0.0 < factor <= 1.0):
        raise ValueError(f"--lr-factor must be in (0, 1], got {factor!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"--lr-every must be a positive number of epochs, got {every!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {warmup_steps!r}")
    if schedule == "step" and not parse_milestones(milestones):
        raise ValueError("--schedule step needs --milestones, e.g. 0.5,0.75 (fractions of the epochs)")


def lr_at(t: int, lr: float, schedule: str, steps_per_epoch: int, total_steps: int, factor: float = 0.1,
          every: int = 1, milestones: Optional[Sequence[float]] = None, warmup_steps: int = 0) -> float:
    """The learning rate of update ``t`` (0-based) under ``schedule`` (module docstring)."""
    epoch = t // steps_per_epoch
    if schedule == "constant":
        out = lr
    elif schedule == "exponential":
        out = lr * factor ** (epoch // every)
    elif schedule == "step":
        epochs = total_steps / steps_per_epoch
        out = lr * factor ** sum(epoch >= m * epochs for m in parse_milestones(milestones) or ())
    elif schedule == "cosine":
        out = lr * 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / max(total_steps, 1)))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup_steps and t < warmup_steps:
        out *= (t + 1) / warmup_steps
    return float(out)


def snapshot_steps(total_steps: int, every: int, early: int = 0) -> set[int]:
    """Steps at which a snapshot is written: 0, every ``every`` steps, ``early`` log-spaced steps in
    [1, every) (dense where training moves fast), and the last step."""
    steps = {0, total_steps}
    if every:
        steps |= set(range(every, total_steps + 1, every))
    if early:
        top = every if every else total_steps
        steps |= {int(s) for s in np.unique(np.round(np.geomspace(1, max(top, 1), early + 1)[:-1]))}
    return {s for s in steps if 0 <= s <= total_steps}
