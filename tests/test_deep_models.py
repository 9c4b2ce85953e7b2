"""ResNet-20 and DenseNet-40 end to end at toy scale: the training CLI with layer patterns, the run format,
load_run / evaluate / resume, and every app page on those runs with every layer path.

Runs are trained on scikit-learn's 8x8 digits (always available offline), width 0.25, one epoch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cbnorm
from cbnorm import evaluate, train as train_mod
from cbnorm.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "digits", "--width", "0.25", "--epochs", "1", "--batch-size", "64", "--snapshot-every", "8",
          "--threads", "1", "--quiet", "--limit-train", "512", "--limit-test", "200"]
RUNS = {
    "resnet20-mn": ["--model", "resnet20", "--layers", "layer3.*", "--norm", "mn", "--components", "2"],
    "densenet40-acn": ["--model", "densenet40", "--layers", "transition*,final", "--norm", "acn", "--components", "2"],
}


@pytest.fixture(scope="module")
def deep_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deep")
    for name, args in RUNS.items():
        assert train_mod.main(COMMON + args + ["--out", str(root / name)]) == 0
    return root


def test_runs_record_the_patterns_and_rebuild_the_same_layers(deep_runs):
    cfg = json.loads((deep_runs / "resnet20-mn" / "config.json").read_text())
    assert cfg["model"]["name"] == "resnet20" and cfg["layers"] == ["layer3.*"]
    run = load_run(deep_runs / "resnet20-mn")
    mn = [n for n, m in run.model.named_modules() if isinstance(m, cbnorm.MixtureNorm)]
    assert mn == [f"layer3.{i}.bn{j}" for i in range(3) for j in (1, 2)]
    assert all(m.num_components == 2 for m in run.model.modules() if isinstance(m, cbnorm.MixtureNorm))
    run = load_run(deep_runs / "densenet40-acn")
    acn = [n for n, m in run.model.named_modules() if isinstance(m, cbnorm.AdaptiveContextNorm)]
    assert acn == ["transition1.norm", "transition2.norm", "final"]
    assert len(cbnorm.norm_layer_paths(run.model)) == 3 * 12 + 3
    m = json.loads((deep_runs / "densenet40-acn" / "metrics.json").read_text())
    assert m["epochs_done"] == 1 and 0.0 <= m["test_acc"] <= 1.0
    assert len(list((deep_runs / "densenet40-acn" / "snapshots").iterdir())) == 2  # step 0 and the last


def test_evaluate_and_resume(deep_runs, tmp_path):
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(deep_runs / "resnet20-mn", run_dir)
    stored = json.loads((run_dir / "metrics.json").read_text())["test_acc"]
    assert evaluate.main([str(run_dir), "--check"]) == 0  # the stored accuracy is recomputed from the weights
    assert train_mod.main(["--out", str(run_dir), "--resume", "--epochs", "2", "--quiet", "--threads", "1"]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["epochs_done"] == 2 and m["epochs"][0]["test_acc"] == stored


def test_bad_pattern_is_a_clear_cli_error(tmp_path, capsys):
    rc = train_mod.main(COMMON + ["--model", "resnet20", "--layers", "layer4.*", "--norm", "mn",
                                  "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "layer4.*" in err and "layer3.2.bn2" in err


# ----------------------------------------------------------------------------------------------- the app
st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

PAGES = ("pages/1_Activation_Histograms.py", "pages/2_Cluster_Evolution.py", "pages/4_Compare_Normalizers.py")
DAYNIGHT = "pages/3_Day_Night_Transfer.py"  # its runs are day<->night translators: it must explain, not fail


def _clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_every_page_on_deep_runs_with_any_layer(deep_runs, monkeypatch, run_name):
    monkeypatch.setenv("CBNORM_RUNS", str(deep_runs))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240).run()
    _clean(at)
    at.selectbox(key="w_run").select(run_name).run()
    layers = at.selectbox(key="w_layer").options
    studied = "layer3.0.bn1" if run_name.startswith("resnet") else "transition1.norm"
    assert studied in at.session_state["layer"] and "(studied)" in layers[0]
    # the studied layer, then a stem layer and one in the middle: every path works on every page (the sidebar
    # with the layer picker is the frame's, present on every page)
    others = [p for p in cbnorm.norm_layer_paths(load_run(deep_runs / run_name).model)]
    for layer in (at.session_state["layer"], others[0], others[len(others) // 2]):
        at.selectbox(key="w_layer").select(layer).run()
        assert at.session_state["layer"] == layer
        for page in PAGES:
            at.switch_page(page).run()
            _clean(at)
            assert len(at.get("plotly_chart")) >= 1, (page, layer)
    at.switch_page(DAYNIGHT).run()
    assert not at.exception, [e.value for e in at.exception]
