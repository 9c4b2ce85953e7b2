"""Training protocol: learning-rate schedules recorded step by step, --eval-every, snapshot schedules, resume.

Tiny runs on scikit-learn's digits (1,437 training images: 22 steps of 64 per epoch)."""
import json
import math

import pytest
import torch

from cbnorm.runs import load_run, read_safetensors
from cbnorm.train import train
from cbnorm.train.schedules import lr_at, snapshot_steps

BASE = dict(dataset="digits", width=0.125, batch_size=64, epochs=4, quiet=True, snapshot_every=0, threads=1,
            limit_test=120)
STEPS_PER_EPOCH = 1437 // 64


def expected_lr(t, lr, schedule, total, factor, every, milestones, warmup):
    """The schedules written out again from their definitions (MN paper Sec. 4.1, ResNet/DenseNet's steps)."""
    epoch = t // STEPS_PER_EPOCH
    if schedule == "constant":
        v = lr
    elif schedule == "exponential":
        v = lr * factor ** math.floor(epoch / every)
    elif schedule == "step":
        v = lr
        for m in milestones:
            if epoch >= m * total / STEPS_PER_EPOCH:
                v *= factor
    else:
        v = lr / 2 * (1 + math.cos(math.pi * t / total))
    return v * min(1.0, (t + 1) / warmup) if warmup else v


CASES = [
    ("constant", dict(lr=0.01)), ("constant", dict(lr=0.003, warmup_steps=10)),
    ("exponential", dict(lr=0.05, lr_factor=0.93, lr_every=2)),  # the MN paper's
    ("exponential", dict(lr=0.02, lr_factor=0.5, lr_every=1, warmup_steps=5)),
    ("step", dict(lr=0.1, lr_factor=0.1, milestones="0.5,0.75", optimizer="sgd", nesterov=True)),  # DenseNet's
    ("step", dict(lr=0.05, lr_factor=0.2, milestones=[0.3, 0.6, 0.8], optimizer="sgd")),  # Wide ResNet's
    ("cosine", dict(lr=0.01)), ("cosine", dict(lr=0.02, warmup_steps=8, optimizer="rmsprop")),
]


@pytest.mark.parametrize("schedule,opts", CASES)
def test_recorded_learning_rates_follow_the_formula(tmp_path, schedule, opts):
    out = train({**BASE, "schedule": schedule, **opts, "out": str(tmp_path / "r")})
    m = json.loads((out / "metrics.json").read_text())
    total = 4 * STEPS_PER_EPOCH
    assert [s for s, _ in m["lr"]] == list(range(1, total + 1))
    ms = opts.get("milestones")
    ms = [float(v) for v in ms.split(",")] if isinstance(ms, str) else ms
    for step, lr in m["lr"]:
        want = expected_lr(step - 1, opts["lr"], schedule, total, opts.get("lr_factor", 0.1), opts.get("lr_every", 1),
                           ms or [], opts.get("warmup_steps", 0))
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (step, lr, want)
    cfg = json.loads((out / "config.json").read_text())["training"]
    assert cfg["schedule"] == schedule and cfg["lr"] == opts["lr"]  # everything the run used is recorded
    if schedule == "step":
        assert cfg["milestones"] == ms and cfg["nesterov"] == opts.get("nesterov", False)


def test_eval_every_and_snapshot_schedule(tmp_path):
    out = train({**BASE, "epochs": 2, "eval_every": 5, "eval_subset": 50, "snapshot_every": 10,
                 "snapshot_early": 4, "out": str(tmp_path / "e")})
    m = json.loads((out / "metrics.json").read_text())
    total = 2 * STEPS_PER_EPOCH
    assert [e["step"] for e in m["evals"]] == list(range(0, total + 1, 5))
    assert all(e["n"] == 50 and 0 <= e["test_acc"] <= 1 for e in m["evals"])
    assert [e["step"] for e in m["epochs"]] == [STEPS_PER_EPOCH, total]  # and the full test set at epoch ends
    steps = sorted(s for s, _ in load_run(out).snapshots)
    assert steps == [0, 1, 2, 3, 6, 10, 20, 30, 40, total]  # log-spaced early, every 10, the end
    assert snapshot_steps(100, 0, 0) == {0, 100}


def test_resumed_run_equals_uninterrupted(tmp_path):
    opts = {**BASE, "norm": "mn", "components": 2, "schedule": "exponential", "lr_factor": 0.5, "lr_every": 1,
            "warmup_steps": 4, "optimizer": "rmsprop", "lr": 0.005, "eval_every": 6, "eval_subset": 40,
            "snapshot_every": 8, "snapshot_early": 3, "limit_train": 384}  # 6 steps per epoch
    full = train({**opts, "epochs": 3, "out": str(tmp_path / "full")})
    part = train({**opts, "epochs": 1, "out": str(tmp_path / "part")})
    part = train({"out": str(part), "resume": True, "epochs": 3, "quiet": True, "threads": 1})
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (full, part))
    for key in ("loss", "lr", "evals"):
        assert ma[key] == mb[key], key
    wa, _ = read_safetensors(full / "model.safetensors")
    wb, _ = read_safetensors(part / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_cannot_stretch_a_schedule_that_depends_on_the_length(tmp_path):
    out = train({**BASE, "epochs": 1, "schedule": "cosine", "limit_train": 128, "out": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="cannot change --epochs of a run with --schedule cosine"):
        train({"out": str(out), "resume": True, "epochs": 2, "quiet": True})


@pytest.mark.parametrize("bad,match", [
    (dict(schedule="linear"), "--schedule must be one of"),
    (dict(schedule="step"), "needs --milestones"),
    (dict(schedule="step", milestones="50,75"), "fractions of the epochs"),
    (dict(lr_factor=1.5), "--lr-factor"),
    (dict(nesterov=True), "--nesterov needs --optimizer sgd"),
    (dict(eval_every=-1), "--eval-every"),
])
def test_bad_protocol_options_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train({**BASE, **bad, "out": str(tmp_path / "x")})


def test_lr_at_warmup_and_bounds():
    assert lr_at(0, 1.0, "constant", 10, 100, warmup_steps=4) == 0.25
    assert lr_at(3, 1.0, "constant", 10, 100, warmup_steps=4) == 1.0
    assert lr_at(100, 1.0, "cosine", 10, 100) == pytest.approx(0.0, abs=1e-15)
