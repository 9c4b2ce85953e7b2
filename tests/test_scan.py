"""cbnorm.scan: the multimodality scan of recorded layers — computed at record time on more values than the
summary keeps (checked against scikit-learn on the very values the layer saw), read back per (layer, step),
computed from the kept values where none was stored, and refused with a clear message where it cannot be."""
import json

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

import cbnorm
from cbnorm import scan as SC
from cbnorm.runs import list_summaries, load_run, read_summary

pytestmark = pytest.mark.timeout(240)


def bimodal_probe(n=400, seed=0):
    """(N, 3) features: channel 0 Gaussian, channel 1 two well-separated modes, channel 2 three."""
    rng = np.random.default_rng(seed)
    c0 = rng.normal(0, 1, n)
    c1 = np.where(rng.random(n) < 0.4, rng.normal(-4, 0.7, n), rng.normal(3, 1, n))
    c2 = rng.choice([-8.0, 0.0, 8.0], n) + rng.normal(0, 0.8, n)
    return torch.tensor(np.stack([c0, c1, c2], 1), dtype=torch.float32)


class Tabular(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(x))


def sk_best_k(row: np.ndarray, max_k: int = 4) -> int:
    x = row[:, None].astype(np.float64)
    return int(np.argmin([GaussianMixture(k, random_state=0).fit(x).bic(x) for k in range(1, max_k + 1)]) + 1)


def test_watch_with_scan_stores_the_scan_of_every_value_but_keeps_values_per_channel(tmp_path):
    x = bimodal_probe()
    with cbnorm.watch(Tabular(), tmp_path / "r", probe=x, every=5, early=0, values_per_channel=64, scan=True,
                      scan_values=400) as rec:
        rec.step(1)
    run = load_run(tmp_path / "r")
    s = run.read_summary(0)
    assert s.values("bn", "input").shape == (3, 64)  # kept: 64 of the 400
    assert s.tensors["bn::positions"].numel() == 64
    meta = SC.scan_meta(s)
    assert meta == {"values": 400, "max_components": 4, "seed": 0}
    stored = SC.stored_scan(s, "bn", "input")
    # the scan saw all 400 values of each channel: the probe's columns, which sklearn fits independently
    assert list(stored["best_k"]) == [sk_best_k(x[:, c].numpy()) for c in range(3)] == [1, 2, 3]
    # the kept values are the first 64 of the scanned positions: exactly the probe's values at those rows
    pos = s.tensors["bn::positions"].numpy()
    np.testing.assert_allclose(s.values("bn", "input"), x.numpy()[pos].T, rtol=1e-3, atol=1e-3)  # float16
    xh = SC.stored_scan(s, "bn", "x_hat")
    assert list(xh["best_k"]) == [1, 2, 3]  # eval-mode BN is affine per channel: the same modes
    np.testing.assert_allclose(xh["bic_gain"], stored["bic_gain"], rtol=1e-4, atol=1e-3)
    cfg = run.config["recorder"]["scan"]
    assert cfg == {"values": 400, "max_components": 4, "views": ["input", "x_hat"]}


def test_scan_run_rows_recorded_and_computed_from_kept_values(tmp_path):
    x = bimodal_probe()
    with cbnorm.watch(Tabular(), tmp_path / "with", probe=x, every=2, early=0, values_per_channel=300,
                      scan=True) as rec:
        rec.step(2)
    with cbnorm.watch(Tabular(), tmp_path / "without", probe=x, every=2, early=0, values_per_channel=300) as rec:
        rec.step(2)
    rows = SC.scan_run(load_run(tmp_path / "with"), "input")
    assert [(r["layer"], r["step"], r["source"], r["values"]) for r in rows] == \
        [("bn", 0, "recorded", 300), ("bn", 2, "recorded", 300)]
    r = rows[0]
    assert r["channels"] == 3 and r["nonfinite_channels"] == 0 and r["depth"] == 0
    assert r["share_multimodal"] == pytest.approx(2 / 3) and r["mean_best_k"] == pytest.approx(2.0)
    computed = SC.scan_run(load_run(tmp_path / "without"), "input")
    assert [c["source"] for c in computed] == ["computed", "computed"]
    assert [c["share_multimodal"] for c in computed] == [r["share_multimodal"] for r in rows]
    # storing it afterwards: every summary once, then nothing left to do
    assert SC.add_scan(tmp_path / "without") == 2 and SC.add_scan(tmp_path / "without") == 0
    again = SC.scan_run(load_run(tmp_path / "without"), "input")
    assert [c["source"] for c in again] == ["recorded", "recorded"]
    s = read_summary(list_summaries(tmp_path / "without")[0][1])
    assert s.values("bn", "input").shape == (3, 300)  # the values stay


def test_cell_counts_channels_that_could_not_be_fitted():
    per = SC.scan_values(np.stack([np.r_[np.nan, np.zeros(99)], np.random.default_rng(0).normal(size=100),
                                   np.r_[np.full(50, -5.0), np.full(50, 5.0)] + np.random.default_rng(1).normal(
                                       0, 0.3, 100)]))
    assert list(per["finite"]) == [False, True, True] and per["best_k"][0] == 0
    c = SC.cell(per)
    assert c["channels"] == 2 and c["nonfinite_channels"] == 1
    assert c["share_multimodal"] == 0.5 and c["median_min_weight"] == pytest.approx(0.5, abs=0.05)
    none = SC.cell(SC.scan_values(np.full((2, 10), np.inf)))
    assert none["channels"] == 0 and none["share_multimodal"] is None


def test_a_scan_that_cannot_be_made_says_why(tmp_path):
    x = bimodal_probe()
    with cbnorm.watch(Tabular(), tmp_path / "r", probe=x, every=2, early=0, values_per_channel=32) as rec:
        rec.step(1)
    run = load_run(tmp_path / "r")
    with pytest.raises(ValueError, match=r"did not record \['fc'\]"):
        SC.scan_run(run, layers=["fc"])
    with pytest.raises(ValueError, match=r"no summary at step\(s\) \[7\]"):
        SC.scan_run(run, steps=[7])
    with pytest.raises(ValueError, match="view must be one of"):
        SC.scan_run(run, "output")
    for p in (tmp_path / "r" / "summaries").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="has no recorded summaries"):
        SC.scan_run(load_run(tmp_path / "r"))
    with pytest.raises(ValueError, match="scan_values"):
        cbnorm.watch(Tabular(), tmp_path / "r2", probe=x, scan=True, scan_values=3)


def test_cli_prints_the_table_and_stores_the_scan(tmp_path, capsys):
    x = bimodal_probe()
    with cbnorm.watch(Tabular(), tmp_path / "r", probe=x, every=2, early=0, values_per_channel=256) as rec:
        rec.step(2)
    assert SC.main([str(tmp_path / "r"), "--write"]) == 0
    out = capsys.readouterr().out
    assert "scan stored in 2 summaries" in out and "bn" in out and "0.67/" in out
    assert SC.main([str(tmp_path / "missing")]) == 1


def test_replay_with_scan_of_a_trainer_run(tmp_path):
    from cbnorm import record as R
    from cbnorm import train as train_mod

    out = tmp_path / "t"
    assert train_mod.main(["--dataset", "digits", "--width", "0.25", "--epochs", "1", "--batch-size", "64",
                           "--snapshot-every", "0", "--limit-train", "128", "--limit-test", "60", "--norm", "mn",
                           "--threads", "1", "--quiet", "--record-size", "0", "--out", str(out)]) == 0
    assert R.main([str(out), "--size", "60", "--values-per-channel", "32", "--scan", "--scan-values", "200"]) == 0
    run = load_run(out)
    s = run.read_summary(run.summaries[-1][0])
    layer = s.layers()[0]
    assert s.values(layer, "input").shape[1] <= 32
    assert SC.scan_meta(s)["values"] > 32  # the scan saw more than was kept
    rows = SC.scan_run(run, "x_hat")
    assert {r["source"] for r in rows} == {"recorded"}
    assert len(rows) == len(s.layers()) * len(run.summaries)
    assert json.loads((out / "config.json").read_text())["recorder"]["scan"]["values"] == 200
    # only some snapshots: the others are not recorded; a step without a snapshot is refused by name
    assert R.main([str(out), "--size", "20", "--values-per-channel", "16", "--steps", "0"]) == 0
    assert [s for s, _ in load_run(out).summaries] == [0]
    with pytest.raises(ValueError, match=r"no snapshot at step\(s\) \[3\]"):
        R.replay(out, size=20, values_per_channel=16, steps=[0, 3])


def test_the_trainer_records_the_scan_with_record_scan(tmp_path):
    from cbnorm import train as train_mod

    out = tmp_path / "t"
    assert train_mod.main(["--dataset", "digits", "--width", "0.25", "--epochs", "1", "--batch-size", "64",
                           "--snapshot-every", "0", "--limit-train", "128", "--limit-test", "60", "--norm", "bn",
                           "--threads", "1", "--quiet", "--record-size", "60", "--record-values", "64",
                           "--record-scan", "--out", str(out)]) == 0
    run = load_run(out)
    assert run.config["recorder"]["scan"]["values"] == 64
    assert {r["source"] for r in SC.scan_run(run)} == {"recorded"}
