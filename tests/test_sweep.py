"""Sweeps: the plan, a tiny real sweep that resumes and skips, and the summary on curves whose answers are known."""
import json
from pathlib import Path

import numpy as np
import pytest

from cbnorm.train import sweep

pytestmark = pytest.mark.timeout(180)  # spawns sweep worker processes: a hang fails here with its stack


def fake_run(root: Path, setting, norm, seed, steps, acc, epochs=1):
    d = root / setting / norm / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"training": {"epochs": epochs}}))
    m = {"evals": [{"step": s, "test_acc": a} for s, a in zip(steps, acc)], "epochs_done": epochs,
         "epochs": [{"step": steps[-1], "test_acc": acc[-1], "wall": 1.0}], "test_acc": acc[-1],
         "steps_done": steps[-1]}
    (d / "metrics.json").write_text(json.dumps(m))


def test_summary_on_known_curves(tmp_path):
    steps = [0, 10, 20, 30, 40]
    bn = {0: [0.1, 0.5, 0.7, 0.80, 0.78], 1: [0.1, 0.5, 0.72, 0.78, 0.80], 2: [0.1, 0.4, 0.7, 0.79, 0.80]}
    mn = {0: [0.1, 0.6, 0.80, 0.85, 0.86], 1: [0.1, 0.7, 0.79, 0.84, 0.85], 2: [0.1, 0.55, 0.75, 0.80, 0.86]}
    for s in bn:
        fake_run(tmp_path, "large", "bn", s, steps, bn[s])
        fake_run(tmp_path, "large", "mn", s, steps, mn[s])
    fake_run(tmp_path, "large", "acn", 0, steps, [0.1, 0.2, 0.3, 0.4, 0.5])
    out = sweep.summarize(tmp_path)
    s = out["settings"]["large"]
    bn_mean = np.mean([bn[k] for k in bn], axis=0)
    assert s["reference_acc"] == pytest.approx(bn_mean.max()) and s["reference_step"] == 40
    g = s["norms"]["mn"]
    assert g["mean"] == pytest.approx(np.mean([mn[k] for k in mn], axis=0).tolist())
    assert g["sd"] == pytest.approx(np.std([mn[k] for k in mn], axis=0, ddof=1).tolist())
    ref = bn_mean.max()  # 0.7933 at step 40: MN's mean curve (0.78 at 20, 0.83 at 30) reaches it at 30,
    # its seeds at 20 (0.80), 30 (0.79 < ref at 20) and 30
    assert g["steps_to_reference"] == 30 and g["steps_to_reference_per_seed"] == [20, 30, 30]
    assert g["reduction_vs_reference_pct"] == pytest.approx(25.0)
    lo, hi = g["steps_to_reference_ci95"]
    assert 20 <= lo <= np.mean([20, 30, 30]) <= hi <= 30 and lo < hi
    diff = np.mean([max(v) for v in mn.values()]) - np.mean([max(v) for v in bn.values()])
    assert g["best_acc_diff_to_reference"] == pytest.approx(diff) and g["difference_exceeds_seed_spread"] is True
    a = s["norms"]["acn"]
    assert a["steps_to_reference"] is None and a["seeds_reaching_reference"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["large"]["reference_step"] == 40
    assert ref < 0.8


def test_plan_layout_and_setting_parsing(tmp_path):
    jobs = sweep.plan(tmp_path, ["bn", "mn"], [0, 1], {"small": ["--lr", "0.01"]}, ["--epochs", "2"],
                      {"mn": ["--components", "3"]})
    assert len(jobs) == 4 and jobs[2]["dir"] == str(tmp_path / "small" / "mn" / "seed0")
    assert jobs[2]["argv"][:6] == ["--epochs", "2", "--lr", "0.01", "--components", "3"]
    assert sweep._parse_setting('large=--lr 0.05 --optimizer rmsprop') == ("large", ["--lr", "0.05", "--optimizer",
                                                                                       "rmsprop"])
    with pytest.raises(ValueError, match="NAME="):
        sweep._parse_setting("../x=--lr 1")


def test_tiny_sweep_runs_in_parallel_resumes_and_skips(tmp_path):
    args = ["--out", str(tmp_path / "sw"), "--norms", "bn", "--seeds", "0,1", "--jobs", "2", "--threads", "1",
            "--setting", 'a=--lr 0.003', "--", "--dataset", "digits", "--width", "0.125", "--epochs", "1",
            "--batch-size", "64", "--limit-train", "256", "--limit-test", "60", "--eval-every", "2",
            "--eval-subset", "40", "--snapshot-every", "0"]
    assert sweep.main(args) == 0
    s = json.loads((tmp_path / "sw" / "summary.json").read_text())["settings"]["a"]
    assert s["norms"]["bn"]["seeds"] == [0, 1] and s["norms"]["bn"]["steps"] == [0, 2, 4]
    logs = []
    again = sweep.run_sweep(sweep.plan(tmp_path / "sw", ["bn"], [0, 1], {"a": ["--lr", "0.003"]}, args[11:]),
                            2, 1, log=logs.append)
    assert all(j.get("skipped") for j in again) and logs == []  # finished runs are not run again


def test_reproduction_report_states_the_summary_and_the_paper(tmp_path):
    """bench/reproduce_mn.py --report: the README's table, one row per setting and norm, from the summary."""
    from bench.reproduce_mn import PAPER, report

    steps = [0, 10, 20]
    for s, (b, m) in enumerate([([0.1, 0.6, 0.7], [0.1, 0.7, 0.72]), ([0.1, 0.5, 0.8], [0.1, 0.6, 0.7])]):
        fake_run(tmp_path, "small", "bn", s, steps, b)
        fake_run(tmp_path, "small", "mn", s, steps, m)
    summary = sweep.summarize(tmp_path)
    table = report({"summary": summary, "paper": PAPER}).splitlines()
    bn = next(r for r in table if r.startswith("| small | bn |"))
    mn = next(r for r in table if r.startswith("| small | mn |"))
    # BN's mean curve: 0.55, 0.75 -> reference 0.75 at step 20; BN's best 0.70 / 0.80 -> 75.00 ± 7.07
    assert "| 75.00 ± 7.07 | 20 | never, 20 |" in bn and "19,500 / 87.95" in bn and "18,100 / 62.14" in bn
    # MN's mean curve 0.65 at 10, 0.71 at 20: never reaches 0.75; its best 0.72 / 0.70 -> -4.00 to BN
    assert "| 71.00 ± 1.41 | never | never, never |" in mn and "| -4.00 (" in mn and "13,400 (31% fewer) / 88.47" in mn and "17,700 (2% fewer) / 62.29" in mn
    assert any("75.00 at step 20" in r for r in table)
