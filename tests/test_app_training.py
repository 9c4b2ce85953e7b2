"""Page 6, across runs and training, rendered by AppTest on tiny runs built here.

Runs (scikit-learn's digits, width 0.125, 4 optimizer steps, snapshots at steps 0, 1, 2, 4): bn with seeds 0
and 1 (one recipe: a mean ± sd band), mn and acn (seed 0), and a tiny ViT (other layer paths: "share no
layer"). Every view is rendered with two or more runs and the Plotly figures' JSON is read back: traces per
run and per snapshot (by their ``meta``), x values against the snapshot steps, and the numbers against an
independent computation (the snapshot model run through probe.capture, scipy / scikit-learn on the same
arrays). Layer mismatches and missing snapshots must give a message, never an exception.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest_helpers import arr, chart, no_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGE = "pages/6_Across_Runs_and_Training.py"
TIMEOUT = 240
TINY = ["--dataset", "digits", "--width", "0.125", "--epochs", "1", "--batch-size", "64", "--limit-train", "256",
        "--limit-test", "100", "--snapshot-every", "2", "--snapshot-early", "2", "--eval-every", "2",
        "--eval-subset", "60", "--components", "2", "--quiet", "--threads", "1", "--record-size", "0"]
RUNS = {"bn-s0": ("bn", 0), "bn-s1": ("bn", 1), "mn-s0": ("mn", 0), "acn-s0": ("acn", 0)}
LAYER = "blocks.conv3.norm"


@pytest.fixture(scope="session")
def training_runs(tmp_path_factory) -> Path:
    from cbnorm import train

    root = tmp_path_factory.mktemp("training") / "runs"
    for name, (norm, seed) in RUNS.items():
        train.main(TINY + ["--norm", norm, "--seed", str(seed), "--out", str(root / name)])
    train.main(["--dataset", "digits", "--model", "vit", "--model-kwargs", '{"dim": 16, "depth": 1}', "--epochs",
                "1", "--batch-size", "64", "--limit-train", "128", "--limit-test", "60", "--snapshot-every", "2",
                "--norm", "bn", "--quiet", "--threads", "1", "--record-size", "0", "--out", str(root / "vit")])
    return root


# ----------------------------------------------------------------------------------------------- helpers
def metas(fig: dict) -> list[str]:
    return [t.get("meta", "") for t in fig["data"]]


def page(monkeypatch, runs: Path, view: str, run: str = "bn-s0", seed: int = 0) -> AppTest:
    monkeypatch.setenv("CBNORM_RUNS", str(runs))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.session_state["run"] = run  # as the sidebar's run picker does
    at.session_state["seed"] = seed
    at.switch_page(PAGE).run()
    if view != "dist":
        at.radio(key="tr_view").set_value(view).run()
    return at


def steps_of(runs: Path, name: str) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (runs / name / "snapshots").glob("step_*.safetensors"))


def layer_capture(runs: Path, name: str, step, size: int, seed: int):
    """The layer's capture at a snapshot (None: final weights), computed here without the app's caches."""
    import cbnorm
    from cbnorm import probe
    from cbnorm.app.activations import sample_indices
    from cbnorm.data import load_dataset

    run = cbnorm.load_run(runs / name)
    ds = load_dataset("digits", "test")
    idx = sample_indices(len(ds), size, seed)
    model = run.model if step is None else run.load_snapshot(step)
    cap = probe.capture(model, run.preprocess(np.asarray(ds.images[idx])), [LAYER])[LAYER]
    return cap, np.asarray(ds.labels[idx])


# ----------------------------------------------------------------------------------------------- 1. distributions
def test_distributions_over_training_traces_per_snapshot_percentiles_and_the_layers_components(training_runs,
                                                                                              monkeypatch):
    at = page(monkeypatch, training_runs, "dist", run="mn-s0", seed=3)
    no_problem(at)
    steps = steps_of(training_runs, "mn-s0")
    ridge, multiples, overlay, pct = (chart(at, k) for k in ("tr_d_ridge", "tr_d_multiples", "tr_d_overlay", "tr_d_pct"))
    for fig in (ridge, multiples):  # per snapshot: its histogram, its components, the mixture
        for s in steps:
            m = [x for x in metas(fig) if x.startswith(f"step {s} · ")]
            assert m[0] == f"step {s} · histogram" and m[-1] == f"step {s} · mixture"
            assert len(m) >= 3, m
    assert metas(overlay) == [f"step {s} · histogram" for s in steps]
    # the MN layer's own components (its inference mixture at that snapshot), drawn where they weigh >= 1%
    import cbnorm

    run = cbnorm.load_run(training_runs / "mn-s0")
    for s in steps:
        layer = dict(run.load_snapshot(s).named_modules())[LAYER]
        w = layer.channel_mixture_parameters()[0][:, 0].numpy()
        drawn = [x for x in metas(multiples) if x.startswith(f"step {s} · ") and "fit" in x]
        assert len(drawn) == int((w >= 0.01).sum()), (s, drawn, w)
    # percentile bands: 4 bands (lower edge, then the upper filled to it) + the median, on every step
    assert len(pct["data"]) == 9 and [t.get("fill") for t in pct["data"][1:8:2]] == ["tonexty"] * 4
    for t in pct["data"]:
        np.testing.assert_array_equal(arr(t["x"]), steps)
    median = arr(pct["data"][-1]["y"])
    for i, s in enumerate(steps):
        cap, _ = layer_capture(training_runs, "mn-s0", s, 256, 3)
        v = cap.input[:, 0].reshape(-1).double().numpy()
        np.testing.assert_allclose(median[i], np.median(v), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arr(pct["data"][0]["y"])[i], v.min(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arr(pct["data"][1]["y"])[i], v.max(), rtol=1e-5, atol=1e-6)

    # a step window, bins, log y and the output answer from the cache: no new model run
    from cbnorm.app import activations

    calls = []
    real = activations.capture
    monkeypatch.setattr(activations, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    at.select_slider(key="tr_d_range").set_value((steps[1], steps[-1])).run()
    no_problem(at)
    assert metas(chart(at, "tr_d_overlay")) == [f"step {s} · histogram" for s in steps[1:]]
    assert len(chart(at, "tr_d_multiples")["layout"]["annotations"]) == len(steps) - 1
    at.select_slider(key="tr_d_bins").set_value(20).run()
    at.checkbox(key="tr_d_logy").check().run()
    no_problem(at)
    ov = chart(at, "tr_d_overlay")
    assert ov["layout"]["yaxis"]["type"] == "log" and len(arr(ov["data"][0]["x"])) == 20
    assert not calls
    at.radio(key="tr_d_which").set_value("output").run()
    no_problem(at)
    assert not calls  # the output too: one model run per snapshot served every view (source.activations)
    assert "a 3-component GMM fitted" in " ".join(c.value for c in at.caption)


def test_distributions_pooled_channels_and_a_run_without_snapshots(training_runs, tmp_path, monkeypatch):
    import shutil

    at = page(monkeypatch, training_runs, "dist", run="bn-s0", seed=4)
    at.checkbox(key="tr_d_all").check().run()
    no_problem(at)
    cap = " ".join(c.value for c in at.caption)
    assert "all channels" in cap and "a 3-component GMM fitted" in cap
    # a run without snapshots: a message naming it
    runs = tmp_path / "runs"
    shutil.copytree(training_runs / "bn-s0", runs / "nosnap")
    shutil.rmtree(runs / "nosnap" / "snapshots")
    shutil.copytree(training_runs / "acn-s0", runs / "acn-s0")
    at = page(monkeypatch, runs, "dist", run="nosnap")
    assert not at.exception
    assert not at.error  # nothing to show is information, not an error of the app
    assert any("nosnap has no snapshots" in e.value for e in at.info)
    # the views over several runs leave it out, saying so; the final weights still compare
    for view, key in (("grid", "tr_g_chart"), ("quality", "tr_q_chart"), ("runs", "tr_x_overlay")):
        at = page(monkeypatch, runs, view, run="nosnap")
        at.multiselect(key="w_tr_runs").set_value(["nosnap", "acn-s0"]).run()
        no_problem(at)
        fig = chart(at, key)
        if view == "runs":
            assert not at.warning and "nosnap · histogram" in metas(fig)
        else:
            assert any("nosnap has no snapshots" in w.value and "left out" in w.value for w in at.warning)
            assert not any(m.startswith("nosnap") for m in metas(fig)) and any(m.startswith("acn-s0") for m in metas(fig))


# ----------------------------------------------------------------------------------------------- 2. across runs
def test_the_same_histogram_across_runs_overlay_multiples_and_statistics(training_runs, monkeypatch):
    from scipy import stats as sps

    at = page(monkeypatch, training_runs, "runs", seed=5)
    names = ["bn-s0", "mn-s0", "acn-s0"]
    at.multiselect(key="w_tr_runs").set_value(names).run()
    at.selectbox(key="tr_x_ref").set_value("bn-s0").run()
    no_problem(at)
    overlay, multiples = chart(at, "tr_x_overlay"), chart(at, "tr_x_multiples")
    assert [m for m in metas(overlay) if m != "N(0, 1)"] == [f"{n} · histogram" for n in names]
    assert [m for m in metas(multiples) if m != "N(0, 1)"] == [f"{n} · histogram" for n in names]
    x0 = arr(overlay["data"][0]["x"])
    for t in overlay["data"][:3]:  # one set of bins for every run
        np.testing.assert_array_equal(arr(t["x"]), x0)
    assert len(multiples["layout"]["annotations"]) >= 3
    ys = [multiples["layout"][k]["range"] for k in multiples["layout"] if k.startswith("yaxis")]
    assert all(r == ys[0] for r in ys)  # aligned: one y range
    table = next(d.value for d in at.dataframe if "Δ skewness" in d.value.columns)
    assert list(table["run"]) == names and abs(table["Δ skewness"].iloc[0]) < 1e-12
    assert at.radio(key="tr_x_which").value == "x_hat"  # the default: what a normalizer aims at N(0, 1)
    for i, n in enumerate(names):  # the final weights' x_hat (before the affine), channel 0, against scipy
        cap, _ = layer_capture(training_runs, n, None, 256, 5)
        v = cap.x_hat[:, 0].reshape(-1).double().numpy()
        np.testing.assert_allclose(table["skewness"].iloc[i], sps.skew(v), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(table["excess kurtosis"].iloc[i], sps.kurtosis(v), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(table["KS to N(0,1)"].iloc[i], sps.kstest(v, "norm").statistic, rtol=1e-6)
    ref = table[table["run"] == "bn-s0"].iloc[0]
    np.testing.assert_allclose(table["Δ KS to N(0,1)"], table["KS to N(0,1)"] - ref["KS to N(0,1)"])

    # the output after the affine: shape statistics only, no N(0, 1) drawn even with the box ticked
    at.radio(key="tr_x_which").set_value("output").run()
    no_problem(at)
    assert "N(0, 1)" not in metas(chart(at, "tr_x_overlay")) + metas(chart(at, "tr_x_multiples"))
    table = next(d.value for d in at.dataframe if "Δ skewness" in d.value.columns)
    assert not any("N(0,1)" in c for c in table.columns)
    cap, _ = layer_capture(training_runs, names[1], None, 256, 5)
    v = cap.output[:, 0].reshape(-1).double().numpy()
    np.testing.assert_allclose(table["std"].iloc[1], v.std(), rtol=1e-5)
    at.radio(key="tr_x_which").set_value("x_hat").run()

    # a snapshot step every run has, a robust range that leaves values out (counted), log y
    at.selectbox(key="tr_x_step").set_value(2)
    at.select_slider(key="tr_x_tail").set_value(0.02)
    at.checkbox(key="tr_x_logy").check().run()
    no_problem(at)
    overlay = chart(at, "tr_x_overlay")
    assert overlay["layout"]["yaxis"]["type"] == "log"
    table = next(d.value for d in at.dataframe if "Δ skewness" in d.value.columns)
    cap, _ = layer_capture(training_runs, "bn-s0", 2, 256, 5)
    assert (table["values"] == cap.output[:, 0].numel()).all()
    lo, hi = overlay["layout"]["xaxis"]["range"]  # the 2 % quantile of one run, the 98 % of one
    outside = []
    for n in names:
        v = layer_capture(training_runs, n, 2, 256, 5)[0].x_hat[:, 0].reshape(-1).double().numpy()  # the view
        outside.append(int(((v < lo) | (v > hi)).sum()))
    assert sum(outside) > 0 and list(table["outside range"]) == outside
    assert ["outside" in t["name"] for t in overlay["data"][:3]] == [o > 0 for o in outside]
    assert "step 2" in " ".join(c.value for c in at.caption)


def test_runs_sharing_no_layer_give_a_message_in_every_view(training_runs, monkeypatch):
    for view in ("runs", "grid", "quality"):
        at = page(monkeypatch, training_runs, view)
        at.multiselect(key="w_tr_runs").set_value(["bn-s0", "vit"]).run()
        no_problem(at)
        assert any("share no normalization layer" in w.value for w in at.warning), view
        assert not at.get("plotly_chart")


# ----------------------------------------------------------------------------------------------- 3. embedding grid
def test_embedding_grid_rows_runs_columns_snapshots_shared_axes_and_seeded(training_runs, monkeypatch):
    at = page(monkeypatch, training_runs, "grid", seed=6)
    at.multiselect(key="w_tr_runs").set_value(["bn-s0", "mn-s0", "acn-s0"]).run()
    no_problem(at)
    fig = chart(at, "tr_g_chart")
    steps = steps_of(training_runs, "bn-s0")  # 4 snapshots, 4 columns (the default)
    from cbnorm.app.activations import sample_indices
    from cbnorm.data import load_dataset

    labels = np.asarray(load_dataset("digits", "test").labels)[sample_indices(360, 1000, 6)]
    for run in ("bn-s0", "mn-s0", "acn-s0"):
        for s in steps:  # one trace per cell: every test image of digits, coloured by its class
            cell = [t for t in fig["data"] if t["meta"] == f"{run} · step {s}"]
            assert len(cell) == 1, (run, s, len(cell))
            assert len(arr(cell[0]["x"])) == 360
            np.testing.assert_array_equal(arr(cell[0]["marker"]["color"]), labels)
    assert [m for m in metas(fig) if m.startswith("legend")] == [f"legend · {i}" for i in range(10)]
    # shared axes along a row
    axes = {}
    for t in fig["data"]:
        if not t["meta"].startswith("legend"):
            axes.setdefault(t["meta"].split(" · ")[0], set()).add(t.get("xaxis", "x"))
    assert len(axes) == 3
    for run, ax in axes.items():
        ranges = {tuple(fig["layout"]["xaxis" + a[1:]]["range"]) for a in ax}
        assert len(ax) == len(steps) and len(ranges) == 1, (run, ranges)
    # colour by mixture component: the BN row has none (grey), ACN's cells their components
    at.radio(key="tr_g_colour").set_value("mixture component").run()
    no_problem(at)
    fig2 = chart(at, "tr_g_chart")
    cells = {t["meta"]: t for t in fig2["data"]}
    assert all(cells[f"bn-s0 · step {s}"]["marker"]["color"] == "#bbbbbb" for s in steps)
    assert "legend · none" in cells and "legend · component 1" in cells
    from cbnorm import analysis

    cap, _ = layer_capture(training_runs, "acn-s0", steps[-1], 1000, 6)
    np.testing.assert_array_equal(arr(cells[f"acn-s0 · step {steps[-1]}"]["marker"]["color"]),
                                  analysis.mixture_assignments(cap.module, cap.input))
    # seeded: the same settings after clearing every cache give the same picture
    coords = {t["meta"]: arr(t["x"]) for t in fig["data"] if not t["meta"].startswith("legend")}
    next(b for b in at.button if b.label == "Reload runs").click().run()
    at.radio(key="tr_g_colour").set_value("class").run()
    no_problem(at)
    again = {t["meta"]: arr(t["x"]) for t in chart(at, "tr_g_chart")["data"] if not t["meta"].startswith("legend")}
    assert again.keys() == coords.keys()
    for k in coords:
        np.testing.assert_allclose(again[k], coords[k], rtol=1e-5, atol=1e-6)


def test_embedding_grid_tsne_and_fewer_columns(training_runs, monkeypatch):
    at = page(monkeypatch, training_runs, "grid", seed=7)
    at.multiselect(key="w_tr_runs").set_value(["bn-s0", "acn-s0"]).run()
    at.radio(key="tr_g_method").set_value("tsne")
    at.slider(key="tr_g_columns").set_value(2)
    at.slider(key="tr_g_size").set_value(200)
    next(b for b in at.button if b.label == "Draw the grid").click().run()  # a form: applied on its button
    no_problem(at)
    assert "t-SNE, perplexity 30" in " ".join(c.value for c in at.caption)
    fig = chart(at, "tr_g_chart")
    steps = steps_of(training_runs, "bn-s0")
    for run in ("bn-s0", "acn-s0"):
        cells = {m.split(" · ")[1] for m in metas(fig) if m.startswith(run)}
        assert cells == {f"step {steps[0]}", f"step {steps[-1]}"}  # 0 % and 100 % of training
    assert sum(len(arr(t["x"])) for t in fig["data"] if not t["meta"].startswith("legend")) == 2 * 2 * 200
    assert any(d.label.startswith("Download every cell") for d in at.get("download_button"))


# ----------------------------------------------------------------------------------------------- 4. cluster quality
def test_cluster_quality_lines_per_run_band_per_group_and_numbers_match_sklearn(training_runs, monkeypatch):
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    at = page(monkeypatch, training_runs, "quality", seed=8)
    at.multiselect(key="w_tr_runs").set_value(["bn-s0", "acn-s0"]).run()  # bn-s1 joins as bn-s0's other seed
    at.select_slider(key="tr_q_size").set_value(200).run()
    at.checkbox(key="tr_q_pool").uncheck().run()  # every position (channel means are the default)
    no_problem(at)
    fig = chart(at, "tr_q_chart")
    steps = steps_of(training_runs, "bn-s0")
    for run in ("bn-s0", "bn-s1", "acn-s0"):
        for metric in ("silhouette", "knn_accuracy"):
            t = next(t for t in fig["data"] if t["meta"] == f"{run} · {metric}")
            np.testing.assert_array_equal(arr(t["x"]), steps)
    assert "acn-s0 · nmi" in metas(fig) and "bn-s0 · nmi" in metas(fig)
    names = metas(fig)
    for metric in ("silhouette", "knn_accuracy"):  # the bn group's band, then its mean line
        lo, hi, mean = (names.index(f"bn {w} · {metric}") for w in ("− 1 sd", "+ 1 sd", "mean"))
        assert lo + 1 == hi < mean and fig["data"][hi]["fill"] == "tonexty"
        a, b = (arr(next(t for t in fig["data"] if t["meta"] == f"bn-s{s} · {metric}")["y"]) for s in (0, 1))
        np.testing.assert_allclose(arr(fig["data"][mean]["y"]), (a + b) / 2, rtol=1e-9)
        np.testing.assert_allclose(arr(fig["data"][hi]["y"]) - arr(fig["data"][mean]["y"]),
                                   np.std([a, b], axis=0, ddof=1), rtol=1e-7, atol=1e-12)
    # the numbers, in the layer's feature space, against scikit-learn on the same arrays
    sil = arr(next(t for t in fig["data"] if t["meta"] == "acn-s0 · silhouette")["y"])
    knn = arr(next(t for t in fig["data"] if t["meta"] == "acn-s0 · knn_accuracy")["y"])
    for i, s in enumerate(steps):
        cap, labels = layer_capture(training_runs, "acn-s0", s, 200, 8)
        f = cap.output.reshape(200, -1).numpy().astype(np.float64)
        np.testing.assert_allclose(sil[i], silhouette_score(f, labels), rtol=1e-6, atol=1e-9)
        perm = np.random.default_rng(8).permutation(200)
        test, train = perm[:100], perm[100:]
        sk = KNeighborsClassifier(5).fit(f[train], labels[train]).score(f[test], labels[test])
        assert knn[i] == pytest.approx(sk)
    table = next(d.value for d in at.dataframe if "run" in d.value.columns and "group" in d.value.columns)
    assert set(table["run"]) == {"bn-s0", "acn-s0", "bn-s1", "bn (mean of 2)"}
    # without the other seeds: no band
    at.checkbox(key="tr_q_seeds").uncheck().run()
    no_problem(at)
    assert not [m for m in metas(chart(at, "tr_q_chart")) if " sd · " in m]


def test_each_views_settings_survive_a_visit_to_another_view(training_runs, monkeypatch):
    at = page(monkeypatch, training_runs, "dist", seed=9)
    at.slider(key="tr_d_k").set_value(2)
    at.select_slider(key="tr_d_bins").set_value(40).run()
    at.radio(key="tr_view").set_value("grid").run()
    at.slider(key="tr_g_columns").set_value(2).run()
    no_problem(at)
    at.radio(key="tr_view").set_value("dist").run()
    no_problem(at)
    assert at.slider(key="tr_d_k").value == 2 and at.select_slider(key="tr_d_bins").value == 40
    at.radio(key="tr_view").set_value("grid").run()
    assert at.slider(key="tr_g_columns").value == 2
    assert len({m for m in metas(chart(at, "tr_g_chart")) if not m.startswith("legend")}) == 2 * 2


def test_quality_figure_draws_no_band_across_steps_a_group_does_not_share():
    """Extra seeds with only their first and last snapshot (the committed runs' layout): the group's mean ±
    sd as markers with error bars at those two steps, no band bridging the training between."""
    from cbnorm.app import figures_training as FT

    steps = [0, 5, 10, 50, 100]
    runs = [{"run": "a", "norm": "bn", "steps": steps, "metrics": {"silhouette": np.linspace(0, 1, 5)}},
            {"run": "b", "norm": "bn", "steps": [0, 100], "metrics": {"silhouette": np.array([0.1, 0.8])}}]
    q = {"runs": runs, "groups": [{"label": "g", "members": ["a", "b"]}]}
    bands = {"silhouette": [{"label": "g", "members": ["a", "b"], "steps": [0, 100],
                             "mean": np.array([0.05, 0.9]), "sd": np.array([0.07, 0.14])}]}
    fig = FT.quality_figure(q, ["silhouette"], {"silhouette": "silhouette"}, bands)
    names = [t.meta for t in fig.data]
    assert names == ["g mean · silhouette", "a · silhouette", "b · silhouette"]
    mean = fig.data[0]
    assert mean.mode == "markers" and list(mean.x) == [0, 100] and list(mean.error_y.array) == [0.07, 0.14]
    assert fig.data[1].mode == "lines+markers" and fig.data[2].mode == "markers"  # a run of 2 snapshots: points
    bands["silhouette"][0].update(steps=[0, 50, 100], mean=np.array([0.05, 0.5, 0.9]), sd=np.array([0.1, 0.1, 0.1]))
    fig = FT.quality_figure(q, ["silhouette"], {"silhouette": "silhouette"}, bands)
    assert [t.meta for t in fig.data][:3] == ["g − 1 sd · silhouette", "g + 1 sd · silhouette", "g mean · silhouette"]
    assert fig.data[1].fill == "tonexty" and fig.data[2].mode == "lines+markers"
