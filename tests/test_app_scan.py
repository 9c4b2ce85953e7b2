"""The scan page ("Where would a mixture help?") on recorded runs of a user's own model: one run, two side by
side (cells counted in the figure JSON against cbnorm.scan), a cell's histograms, a run recorded without the
scan (computed from its kept values), a directory without summaries (a message, not a traceback), and the
premise verdicts read from the benchmark results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import cbnorm  # noqa: E402
from apptest_helpers import chart, no_problem  # noqa: E402
from cbnorm import scan as SC  # noqa: E402
from cbnorm.runs import load_run  # noqa: E402
from test_record import Net, _data, _train  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
SCAN = "pages/7_Multimodality_Scan.py"


def record(root: Path, name: str, norm=None, scan=True, steps=20):
    torch.manual_seed(0)
    model = Net() if norm is None else cbnorm.convert(Net(), norm, include="bn1", num_components=2)
    x, y = _data(64)
    with cbnorm.watch(model, root / name, probe=(x, y), every=10, early=1, values_per_channel=256, scan=scan,
                      scan_values=1024) as rec:
        _train(model, rec, steps, x, y)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    record(root, "mine/net-bn")
    record(root, "mine/net-mn", norm="mn")
    record(root, "other/plain", scan=False)
    return root


def app_on(root: Path, monkeypatch, run: str, bench: Path) -> AppTest:
    monkeypatch.setenv("CBNORM_RUNS", str(root))
    monkeypatch.setenv("CBNORM_BENCH", str(bench))
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    no_problem(at)
    at.session_state["run"] = run
    at.switch_page(SCAN).run()
    no_problem(at)
    return at


def array(z) -> np.ndarray:
    """A figure JSON's array: a nested list, or Plotly's typed array {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(z, dict):
        import base64

        a = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return a.reshape([int(v) for v in str(z.get("shape", a.size)).split(",")])
    return np.asarray(z, dtype=float)


def texts(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "warning") for e in at.get(kind))


def test_two_runs_side_by_side_cells_match_the_library(root, monkeypatch, tmp_path):
    at = app_on(root, monkeypatch, "mine/net-mn", tmp_path)
    assert at.multiselect(key="scan_runs").value == ["mine/net-mn", "mine/net-bn"]  # its BN partner beside it
    fig = chart(at, "scan_heatmap")
    heat = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert [t["name"] for t in heat] == ["mine/net-mn", "mine/net-bn"]
    for t in heat:
        rows = SC.scan_run(load_run(root / t["name"]), "input")
        assert t["y"] == ["bn1", "gn"] and t["x"] == ["0", "1", "10", "20"]  # layers x steps
        cells = array(t["z"])
        assert cells.shape == (2, 4)  # every (layer, step) cell, each the library's figure
        want = {(r["layer"], str(r["step"])): r["share_multimodal"] for r in rows}
        for i, ly in enumerate(t["y"]):
            for j, s in enumerate(t["x"]):
                assert cells[i, j] == pytest.approx(want[(ly, s)])
        assert len(t["text"]) == 2 and all(len(r) == 4 for r in t["text"])
    assert "at record time on 1,024 values per channel" in texts(at)
    # the cell: the chosen run's layer and step, its histograms with the fit
    cell = chart(at, "scan_cell_chart")
    assert any(tr.get("type") == "bar" for tr in cell["data"])
    assert "K > 1 wins in" in texts(at)
    at.radio(key="scan_stat").set_value("median_bic_gain").run()
    no_problem(at)
    assert "median BIC gain" in chart(at, "scan_heatmap")["layout"]["title"]["text"]
    at.radio(key="scan_view").set_value("x_hat").run()
    no_problem(at)
    assert "x̂" in chart(at, "scan_heatmap")["layout"]["title"]["text"]
    assert at.get("download_button")  # the scan's table and the cell's figure


def test_one_run_recorded_without_the_scan_is_computed_from_its_values(root, monkeypatch, tmp_path):
    at = app_on(root, monkeypatch, "other/plain", tmp_path)
    assert at.multiselect(key="scan_runs").value == ["other/plain"]
    heat = [t for t in chart(at, "scan_heatmap")["data"] if t["type"] == "heatmap"]
    assert len(heat) == 1
    assert "here, from the kept values on 256 values per channel" in texts(at)


def test_a_directory_without_summaries_gets_a_message(root, monkeypatch, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(root / "other" / "plain", bare / "plain")
    shutil.rmtree(bare / "plain" / "summaries")
    at = app_on(bare, monkeypatch, "plain", tmp_path)
    assert not at.exception and not at.error
    assert "holds recorded summaries" in texts(at)


def test_verdicts_are_read_from_the_benchmark_results(root, monkeypatch, tmp_path):
    (tmp_path / "premise.json").write_text(json.dumps({
        "protocol": "the protocol", "verdicts": {
            k: {"claim": f"claim {k}", "verdict": v, "text": f"numbers of {k}"}
            for k, v in (("P1", "mixed"), ("P2", "not supported"), ("P3", "supported"))}}))
    at = app_on(root, monkeypatch, "mine/net-bn", tmp_path)
    t = texts(at)
    assert "**P1 — claim P1** · *mixed*" in t and "numbers of P3" in t and "the protocol" in t
