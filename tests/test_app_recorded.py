"""The app on runs recorded by cbnorm.watch from a model the library cannot rebuild (a user's own, defined in
test_record.py), found in nested folders: every page that applies renders from the recorded summaries, says
where live exploration does not apply, and follows a run while it is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import cbnorm  # noqa: E402
from apptest_helpers import chart, no_problem  # noqa: E402
from test_record import Net, _data, _train  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HIST, EVO, COMPARE, ACROSS = ("pages/1_Activation_Histograms.py", "pages/2_Cluster_Evolution.py",
                              "pages/4_Compare_Normalizers.py", "pages/6_Across_Runs_and_Training.py")


def record(root: Path, name: str, norm=None, steps=30, close=True):
    torch.manual_seed(0)
    model = Net() if norm is None else cbnorm.convert(Net(), norm, include="bn1", num_components=2)
    x, y = _data(64)
    rec = cbnorm.watch(model, root / name, probe=(x, y), every=10, early=2, class_names=list("abcde"))
    _train(model, rec, steps, x, y)
    rec.log(steps, test_acc=0.5)
    if close:
        rec.close()
    return model, rec, x, y


@pytest.fixture(scope="module")
def recorded_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recorded")
    record(root, "mine/net-bn")
    record(root, "mine/net-mn", norm="mn")
    return root


def app_on(root: Path, monkeypatch, run: str = "mine/net-mn") -> AppTest:
    monkeypatch.setenv("CBNORM_RUNS", str(root))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    no_problem(at)
    at.session_state["run"] = run
    return at


def texts(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "warning") for e in at.get(kind))


def test_home_lists_nested_recorded_runs(recorded_root, monkeypatch):
    at = app_on(recorded_root, monkeypatch)
    at.run()
    no_problem(at)
    table = at.dataframe[0].value
    assert sorted(table["run"]) == ["mine/net-bn", "mine/net-mn"]
    assert list(table["recorded"]) == [6, 6]  # 0, 2 early steps, 10, 20, 30
    assert set(table["state"]) == {"finished"}


def test_histograms_read_the_recorded_step(recorded_root, monkeypatch):
    at = app_on(recorded_root, monkeypatch)
    at.switch_page(HIST).run()
    no_problem(at)
    assert at.select_slider(key="hist_step").value == 30  # the last recorded step
    assert "hist_size" not in [w.key for w in at.select_slider]  # no minibatch to draw: a recorded probe
    fig_in = chart(at, "hist_in_chart")
    assert any(t.get("line", {}).get("dash") == "dash" for t in fig_in["data"])  # MN's own components
    assert "the recorded probe batch at step 30" in texts(at)
    at.select_slider(key="hist_step").set_value(10).run()
    no_problem(at)
    assert "the recorded probe batch at step 10" in texts(at)
    # the table's x_hat skewness per channel is scipy's on the recorded values of that channel
    from scipy import stats

    s = cbnorm.load_run(recorded_root / "mine/net-mn").read_summary(10)
    rec_vals = s.values("bn1", "x_hat").astype(np.float64)
    table = at.dataframe[0].value
    for ch, skew in zip(table["channel"], table["skew x̂"]):
        assert skew == pytest.approx(stats.skew(rec_vals[int(ch)]), abs=1e-6)


def test_cluster_evolution_from_recorded_features(recorded_root, monkeypatch):
    at = app_on(recorded_root, monkeypatch)
    at.switch_page(EVO).run()
    no_problem(at)
    assert "cannot rebuild" in texts(at)
    anim = chart(at, "evo_anim")
    assert len(anim["frames"]) == 6  # one frame per recorded step
    assert all(len(f["data"][0]["x"]["bdata"] if isinstance(f["data"][0]["x"], dict) else f["data"][0]["x"]) > 0
               for f in anim["frames"])
    assert "64" in " ".join(str(c.value) for c in at.caption)  # the recorded probe's 64 inputs


def test_across_runs_and_compare_on_recorded_runs(recorded_root, monkeypatch):
    at = app_on(recorded_root, monkeypatch)
    at.switch_page(ACROSS).run()
    no_problem(at)
    assert at.get("plotly_chart")
    at.switch_page(COMPARE).run()
    no_problem(at)
    assert "own recorded probe batch" in texts(at)


def test_a_run_being_written_is_followed(tmp_path, monkeypatch):
    model, rec, x, y = record(tmp_path, "live", steps=20, close=False)
    at = app_on(tmp_path, monkeypatch, run="live")
    at.switch_page(HIST).run()
    no_problem(at)
    assert at.toggle(key="hist_follow").value is True  # a running run is followed by default
    assert "running" in texts(at)
    assert at.select_slider(key="hist_step").value == 20
    for step in range(21, 31):  # the training goes on: steps 21..30 (a probe at 30)
        rec.step(step, loss=1.0)
    at.run()  # the fragment's next tick
    no_problem(at)
    assert at.select_slider(key="hist_step").value == 30
    at.toggle(key="hist_follow").set_value(False).run()
    rec.probe(31)
    at.run()
    assert at.select_slider(key="hist_step").value == 30  # not following: the page stays where it was
    rec.close()


@pytest.fixture(scope="module")
def partly_recorded(tmp_path_factory) -> Path:
    """A run the app can rebuild whose summaries hold one layer only (as the committed runs: conv3)."""
    from cbnorm import record as R
    from cbnorm import train as train_mod

    root = tmp_path_factory.mktemp("partly")
    train_mod.main(["--dataset", "digits", "--width", "0.25", "--epochs", "1", "--batch-size", "64",
                    "--snapshot-every", "3", "--limit-train", "192", "--limit-test", "80", "--norm", "mn",
                    "--threads", "1", "--quiet", "--record-size", "0", "--out", str(root / "mn")])
    assert R.main([str(root / "mn"), "--size", "40", "--values-per-channel", "64",
                   "--layers", "blocks.conv3.norm"]) == 0
    return root


def test_a_layer_that_was_not_recorded_is_computed_by_the_rebuilt_model(partly_recorded, monkeypatch):
    at = app_on(partly_recorded, monkeypatch, run="mn")
    at.session_state["layer"] = "blocks.conv1.norm"  # not in the summaries
    at.switch_page(HIST).run()
    no_problem(at)
    assert "hist_step" not in [w.key for w in at.select_slider]  # no recorded step to offer for this layer
    assert "test images drawn with seed" in texts(at)
    for page in (EVO, ACROSS):
        at.switch_page(page).run()
        no_problem(at)
    at.session_state["layer"] = "blocks.conv3.norm"  # recorded: its steps are offered, live stays possible
    at.switch_page(HIST).run()
    no_problem(at)
    assert at.select_slider(key="hist_step").options[-1] == "live minibatch (final weights)"
    assert "the recorded probe batch at step" in texts(at)
