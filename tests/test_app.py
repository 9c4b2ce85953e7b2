"""The Streamlit app, rendered by AppTest on small runs built here (bn, acn, cn with a context predictor).

Every page is rendered with its defaults and after changing its main widgets; the assertions read what is
shown: metric values, table rows, captions, and the Plotly figures' JSON (trace counts, dashed component
lines, frames, axis ranges). A damaged run must give st.error, never a traceback. One test renders every page
on the committed checkpoints/ (skipped when it holds no runs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest_helpers import arr, chart, chart_keys, no_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
HIST, EVO, DAYNIGHT, COMPARE = ("pages/1_Activation_Histograms.py", "pages/2_Cluster_Evolution.py",
                                "pages/3_Day_Night_Transfer.py", "pages/4_Compare_Normalizers.py")
TIMEOUT = 180
_BUILT: dict[str, Path] = {}

RUN_ARGS = ["--dataset", "fashion-mnist", "--width", "0.25", "--epochs", "2", "--limit-train", "256",
            "--limit-test", "128", "--snapshot-every", "2", "--batch-size", "64", "--threads", "1", "--quiet",
            "--record-size", "0"]  # the live path (recorded runs: test_app_recorded.py)


def build_runs(base: Path) -> Path:
    """Three tiny runs (bn, acn, cn + context predictor) under ``base``/runs, built once per session."""
    key = str(base)
    if key in _BUILT:
        return _BUILT[key]
    from cbnorm import data
    from cbnorm import train

    try:
        data.load_dataset("fashion-mnist", "train")  # the test split always loads (shipped)
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"Fashion-MNIST is not installed ({err})")
    root = base / "runs"
    for norm, extra in (("bn", []), ("acn", ["--components", "3"]), ("cn", ["--context-head"])):
        if not (root / norm / "model.safetensors").exists():
            train.main(RUN_ARGS + ["--norm", norm, "--out", str(root / norm)] + extra)
    _BUILT[key] = root
    return root


@pytest.fixture(scope="session")
def app_runs(tmp_path_factory) -> Path:
    return build_runs(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def damaged_runs(app_runs, tmp_path_factory) -> Path:
    """A runs directory with a good bn run and a copy whose config.json is corrupt."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(app_runs / "bn", root / "bn")
    shutil.copytree(app_runs / "bn", root / "broken")
    (root / "broken" / "config.json").write_text('{"format_version": 1, "task": ', encoding="utf-8")
    return root


@pytest.fixture
def app(app_runs, monkeypatch):
    monkeypatch.setenv("CBNORM_RUNS", str(app_runs))
    return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


# ----------------------------------------------------------------------------------------------- helpers
def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "title", "subheader")
             for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def compare_chart_keys(runs_dir: Path, bench_dir: Path = ROOT / "bench" / "results") -> set:
    """The charts the compare page draws with its defaults, from what is there: the two curve figures and
    the live panel; a seed figure per setting where some recipe has several seeds; the reproduction's
    curves per setting, and the speed / convergence plots, when bench/results holds them."""
    from cbnorm.app import compare as C

    keys = {"cmp_err_chart", "cmp_loss_chart", "cmp_live_chart"}
    runs = []
    for p in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            cfg, m = (json.loads((p / f).read_text()) for f in ("config.json", "metrics.json"))
        except (OSError, ValueError):
            continue
        if cfg.get("task", "classify") == "classify":
            runs.append((p.name, cfg, m))
    groups = C.group_runs(runs)
    settings = list(dict.fromkeys(g["setting"] for g in groups))
    shown = {g["label"] for g in groups[:12]}
    keys |= {f"cmp_seeds_chart_{i}" for i, s in enumerate(settings)
             if any(len(g["seeds"]) > 1 and g["label"] in shown for g in groups if g["setting"] == s)}
    rep = C.reproduction.__wrapped__(str(bench_dir))
    if rep["status"] == "ok":
        keys |= {f"cmp_repro_chart_{i}" for i in range(len(rep["settings"]))}
    plots = C.bench_plot_data(str(bench_dir))
    keys |= {k for k, need in (("cmp_bench_speed", "speed_layers"), ("cmp_bench_conv", "convergence_runs"))
             if need in plots}
    return keys


def metric(at, label_start: str) -> str:
    for m in at.metric:
        if m.label.startswith(label_start):
            return m.value
    raise AssertionError(f"no metric {label_start!r} in {[m.label for m in at.metric]}")


# ----------------------------------------------------------------------------------------------- home
def test_home_shows_runs_device_and_honest_accuracy(app, app_runs):
    no_problem(app)
    assert app.title[0].value.startswith("cbnorm")
    assert metric(app, "Device in use") in ("CPU", "CUDA")
    assert metric(app, "Runs loaded") == "3" and metric(app, "Runs that cannot be loaded") == "0"
    table = app.dataframe[0].value
    assert sorted(table["run"]) == ["acn", "bn", "cn"]
    metrics = json.loads((app_runs / "cn" / "metrics.json").read_text())
    row = table[table["run"] == "cn"].iloc[0]
    assert row["test_acc"] == pytest.approx(metrics["test_acc"])
    assert row["oracle"] == pytest.approx(metrics["test_acc_oracle"])
    assert row["snapshots"] == len(list((app_runs / "cn" / "snapshots").iterdir()))
    assert "Oracle accuracy" in texts(app) and "honest" in texts(app)
    for page in ("Activation histograms", "Cluster evolution", "Day ↔ night transfer", "Compare normalizers"):
        assert any(p.proto.label == page for p in app.get("page_link")), page
    # the shared sidebar: run, layer (studied first), seed
    assert app.session_state["run"] == "acn" and app.session_state["layer"] == "blocks.conv3.norm"
    app.selectbox(key="w_run").select("bn").run()
    assert app.session_state["run"] == "bn" and app.session_state["layer"] == "blocks.conv3.norm"
    assert app.selectbox(key="w_layer").options[0] == "conv3 · bn (studied)"
    app.selectbox(key="w_layer").select("blocks.conv1.norm").run()
    app.number_input(key="w_seed").set_value(5).run()
    assert app.session_state["layer"] == "blocks.conv1.norm" and app.session_state["seed"] == 5
    # the choice survives a page switch
    app.switch_page(HIST).run()
    no_problem(app)
    assert "conv1" in texts(app) and "seed 5" in texts(app)


# ----------------------------------------------------------------------------------------------- histograms
def test_histograms_defaults_draw_the_layers_own_mixture(app):
    app.switch_page(HIST).run()
    no_problem(app)
    fig_in, fig_out = charts(app)
    channels = 8  # default random subset
    k = 3  # the acn run's own components
    names = [t.get("name") for t in fig_in["data"]]
    assert names.count("histogram") == channels and names.count("mixture") == channels
    dashed = [t for t in fig_in["data"] if t.get("line", {}).get("dash") == "dash"]
    assert len(dashed) == channels * k
    assert len({t["line"]["color"] for t in dashed}) == k  # one colour per component
    solid = [t for t in fig_in["data"] if t.get("name") == "mixture"]
    assert all(t["line"].get("dash") in (None, "solid") for t in solid)
    assert len(fig_in["data"]) == channels * (1 + k + 1)
    # mixture = sum of the dashed components, in the first panel
    comp = sum(arr(t["y"]) for t in dashed[:k])
    np.testing.assert_allclose(comp, arr(solid[0]["y"]), rtol=1e-6, atol=1e-9)
    assert "own AdaptiveContextNorm parameters" in texts(app)
    # the default view is x_hat (before the affine): N(0, 1) dotted in each panel, KS in the titles and table
    assert app.radio(key="hist_view").value == "x_hat"
    assert app.radio(key="hist_view").options == ["x̂ — normalized, before the affine",
                                                  "output — γ·x̂ + β, after the affine"]
    assert "x̂ (before the affine)" in {ax.get("title", {}).get("text") for k, ax in fig_out["layout"].items()
                                       if k.startswith("xaxis")}
    assert sum(t.get("name") == "N(0, 1)" and t["line"]["dash"] == "dot" for t in fig_out["data"]) == channels
    titles = [a["text"] for a in fig_out["layout"]["annotations"]]
    assert len(titles) == channels and all("skew" in t and "KS" in t for t in titles)
    table = app.dataframe[0].value
    assert len(table) == channels and {"skew x̂", "ex. kurt x̂", "KS x̂", "KS in (std.)"} <= set(table.columns)
    assert metric(app, "median |skewness| (x̂)") == f"{np.median(np.abs(table['skew x̂'])):.3f}"
    assert metric(app, "median KS distance to N(0,1) (x̂)") == f"{np.median(table['KS x̂']):.3f}"
    assert len(app.get("download_button")) == 2
    # the second view, the output after the affine: labelled so, shape statistics only, no N(0, 1) anywhere
    app.radio(key="hist_view").set_value("output").run()
    no_problem(app)
    _, fig_aff = charts(app)
    assert "output value (after the affine)" in {ax.get("title", {}).get("text") for k, ax in
                                                 fig_aff["layout"].items() if k.startswith("xaxis")}
    assert not any(t.get("name") == "N(0, 1)" for t in fig_aff["data"])
    assert not any("KS" in a["text"] for a in fig_aff["layout"]["annotations"])
    table = app.dataframe[0].value
    assert {"skew out", "ex. kurt out", "std out"} <= set(table.columns)
    assert not any("KS" in c or "W1" in c for c in table.columns)
    labels = [m.label for m in app.metric]
    assert "median |skewness| (output)" in labels and not any("N(0,1)" in m for m in labels)


def test_histogram_statistics_are_scipys_on_x_hat_and_the_standardized_input(app, app_runs):
    """The table's numbers, recomputed outside the app with scipy on the same arrays: x_hat (before the
    affine) of the same layer on the same seeded minibatch, the input standardized per channel."""
    import scipy.stats as sps
    import torch

    from cbnorm import probe
    from cbnorm.data import load_dataset
    from cbnorm.runs import load_run

    app.switch_page(HIST).run()
    no_problem(app)
    table = app.dataframe[0].value
    seed, layer = app.session_state["seed"], app.session_state["layer"]
    run = load_run(app_runs / app.session_state["run"])
    ds = load_dataset("fashion-mnist", "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=256, replace=False))
    cap = probe.capture(run.model, run.preprocess(ds.images[idx]), [layer])[layer]
    for _, row in table.iterrows():
        c = int(row["channel"])
        xh = cap.x_hat[:, c].reshape(-1).double().numpy()
        xi = cap.input[:, c].reshape(-1).double().numpy()
        zi = (xi - xi.mean()) / xi.std()
        assert row["ex. kurt x̂"] == pytest.approx(sps.kurtosis(xh), abs=1e-6)
        assert row["skew x̂"] == pytest.approx(sps.skew(xh), abs=1e-6)
        assert row["KS x̂"] == pytest.approx(sps.kstest(xh, "norm").statistic, abs=1e-6)
        assert row["KS in (std.)"] == pytest.approx(sps.kstest(zi, "norm").statistic, abs=1e-6)
        assert row["skew in"] == pytest.approx(sps.skew(xi), abs=1e-6)
    # and x_hat is not the output: the affine moved it
    assert not torch.allclose(cap.x_hat, cap.output, atol=1e-3)


def test_histograms_after_changing_widgets(app):
    app.switch_page(HIST).run()
    app.session_state["run"] = "bn"  # as the sidebar's run picker does
    app.run()
    app.slider(key="hist_k").set_value(2)
    app.slider(key="hist_count").set_value(3)
    app.select_slider(key="hist_size").set_value(64)
    app.run()
    no_problem(app)
    fig_in, _ = charts(app)
    assert len(fig_in["data"]) == 3 * (1 + 2 + 1)
    assert sum(t.get("line", {}).get("dash") == "dash" for t in fig_in["data"]) == 3 * 2
    assert "2-component GMM fitted per channel with cbnorm.gmm" in texts(app)
    assert "64 test images" in texts(app)
    seed = app.session_state["seed"]
    next(b for b in app.button if b.label == "Resample").click().run()
    assert app.session_state["seed"] == seed + 1 and f"seed {seed + 1}" in texts(app)
    app.radio(key="hist_ch_mode").set_value("choose").run()
    app.multiselect(key="hist_channels").set_value([0, 5]).run()
    no_problem(app)
    assert [a["text"] for a in charts(app)[0]["layout"]["annotations"]] == ["channel 0", "channel 5"]
    assert list(app.dataframe[0].value["channel"]) == [0, 5]


def test_histograms_context_run_names_contexts_and_takes_true_context(app):
    app.switch_page(HIST).run()
    app.session_state["run"] = "cn"
    app.run()
    no_problem(app)
    names = {t.get("name") for t in charts(app)[0]["data"]}
    assert {"context tops", "context footwear", "context bags"} <= names
    assert "context inferred by the model" in texts(app)
    app.radio(key="hist_context").set_value("true").run()
    no_problem(app)
    assert "true superclass given (oracle)" in texts(app) and len(charts(app)) == 2


# ----------------------------------------------------------------------------------------------- evolution
def test_cluster_evolution_defaults_pca(app, app_runs):
    app.switch_page(EVO).run()
    no_problem(app)
    static, anim = charts(app)
    steps = sorted(int(p.stem.split("_")[1]) for p in (app_runs / "acn" / "snapshots").iterdir())
    assert [t["type"] for t in static["data"]] == ["scattergl"] * 10  # one trace per class
    assert sum(len(arr(t["x"])) for t in static["data"]) == 1000
    assert "% of variance" in static["layout"]["xaxis"]["title"]["text"]
    assert len(anim["frames"]) == len(steps) and [f["name"] for f in anim["frames"]] == [f"step {s}" for s in steps]
    assert static["layout"]["xaxis"]["range"] == anim["layout"]["xaxis"]["range"]  # fixed axes
    assert "Subsampled: 1,000 of the 10,000 test images" in texts(app)
    options = app.radio(key="evo_colour").options
    assert "mixture component (argmax posterior)" in options and "superclass / context" in options
    app.radio(key="evo_colour").set_value("mixture component (argmax posterior)").run()
    names = [t["name"] for t in charts(app)[0]["data"]]
    assert names == ["component 1", "component 2", "component 3"]
    app.select_slider(key="evo_step").set_value(steps[0]).run()
    assert charts(app)[0]["layout"]["title"]["text"] == f"step {steps[0]}"
    no_problem(app)


def test_cluster_evolution_tsne_is_cached_across_slider_and_colour(app, monkeypatch):
    from cbnorm import analysis

    calls = []
    real = analysis.embed_step
    monkeypatch.setattr(analysis, "embed_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    app.switch_page(EVO).run()
    app.radio(key="evo_method").set_value("tsne")
    app.slider(key="evo_size").set_value(200)
    app.slider(key="evo_perplexity").set_value(10)
    app.slider(key="evo_refine").set_value(25)
    next(b for b in app.button if b.label == "Run projection").click()
    app.run()
    no_problem(app)
    static, anim = charts(app)
    assert static["layout"]["xaxis"]["title"]["text"] == "t-SNE 1"
    assert "t-SNE, perplexity 10" in texts(app)
    n_frames = len(anim["frames"])
    assert len(calls) == n_frames  # one embedding per snapshot, each warm-started
    app.radio(key="evo_colour").set_value("prediction (at that step)").run()
    app.select_slider(key="evo_step").set_value(app.select_slider(key="evo_step").options[0]).run()
    no_problem(app)
    assert len(calls) == n_frames  # nothing recomputed
    assert [t["name"] for t in charts(app)[0]["data"]][:2] == ["T-shirt/top", "Trouser"]


def test_cluster_evolution_umap(app):
    app.switch_page(EVO).run()
    app.radio(key="evo_method").set_value("umap")
    app.slider(key="evo_size").set_value(100)
    app.slider(key="evo_neighbors").set_value(10)
    app.slider(key="evo_snaps").set_value(2)
    next(b for b in app.button if b.label == "Run projection").click()
    app.run()
    no_problem(app)
    static, anim = charts(app)
    assert static["layout"]["xaxis"]["title"]["text"] == "UMAP 1" and len(anim["frames"]) == 2
    assert "UMAP, 10 neighbours" in texts(app)


# ----------------------------------------------------------------------------------------------- compare
def test_compare_defaults_and_changes(app, app_runs):
    app.switch_page(COMPARE).run()
    no_problem(app)
    assert set(chart_keys(app)) == compare_chart_keys(app_runs)
    err, loss, live = (chart(app, k) for k in ("cmp_err_chart", "cmp_loss_chart", "cmp_live_chart"))
    speed, conv = chart(app, "cmp_bench_speed"), chart(app, "cmp_bench_conv")
    assert [t["name"] for t in err["data"]] == ["acn", "bn", "cn"]
    # one run per recipe: the Seeds section says so and draws nothing
    assert any("one run (one seed)" in i.value for i in app.info)
    # bench/results/speed.json and convergence.json as plots: bars per input shape with goal ticks, curves
    committed = json.loads((Path(APP).parent / "bench" / "results" / "speed.json").read_text())
    goal = next(t for t in speed["data"] if t["name"] == "goal")
    assert dict(zip(goal["x"], goal["y"])) == {k: v for k, v in committed["goals"].items() if k in goal["x"]}
    assert sum(t["type"] == "bar" for t in speed["data"]) == len({tuple(r["shape"]) for r in committed["layers"]})
    assert any(t["name"].startswith("bn (") for t in conv["data"])
    bn_metrics = json.loads((app_runs / "bn" / "metrics.json").read_text())
    np.testing.assert_allclose(arr(err["data"][1]["y"]), [1 - e["test_acc"] for e in bn_metrics["epochs"]])
    np.testing.assert_array_equal(arr(err["data"][1]["x"]), [e["step"] for e in bn_metrics["epochs"]])
    assert any(t.get("line", {}).get("dash") == "dot" for t in loss["data"])  # test loss dotted
    table = app.dataframe[0].value
    bn = table[table["run"] == "bn"].iloc[0]
    best_step = next(e["step"] for e in bn_metrics["epochs"] if e["test_acc"] >= bn_metrics["best_test_acc"])
    assert bn["steps to BN best"] == best_step and bn["params"] == bn_metrics["params"]
    assert bn["best acc"] == pytest.approx(bn_metrics["best_test_acc"])
    # the cost column is the benchmark's side-by-side ratio for the run's setting, never the trainer's wall time
    assert not any("s / step" in c or "wall" in c for c in table.columns)
    network = {r["layer"]: r["ratio_to_bn_network"] for r in
               json.loads((ROOT / "bench" / "results" / "speed.json").read_text())["network"]}
    for _, row in table.iterrows():
        assert row["step cost vs BN (bench)"] == pytest.approx(network[row["norm"]]), row["run"]
    assert "measured side by side by bench/speed.py on AMD EPYC" in texts(app) and "2026-12-01" in texts(app)
    # live panel: one histogram per run, N(0, 1) in each panel, stats table
    assert sum(t["type"] == "bar" for t in live["data"]) == 3
    assert sum(t.get("name") == "N(0, 1)" for t in live["data"]) == 3
    assert list(app.dataframe[1].value["layer"]) == ["blocks.conv3.norm"] * 3
    assert any(e.label == "gmm.json" for e in app.expander)  # bench/results/*.json
    # change: epochs on x, two runs
    app.radio(key="cmp_x").set_value("epoch")
    app.multiselect(key="cmp_runs").set_value(["bn", "cn"])
    app.run()
    no_problem(app)
    err, loss, live = (chart(app, k) for k in ("cmp_err_chart", "cmp_loss_chart", "cmp_live_chart"))
    assert [t["name"] for t in err["data"]] == ["bn", "cn"]
    np.testing.assert_array_equal(arr(err["data"][0]["x"]), [e["epoch"] for e in bn_metrics["epochs"]])
    assert sum(t["type"] == "bar" for t in live["data"]) == 2
    app.radio(key="cmp_which").set_value("input").run()
    no_problem(app)
    live = chart(app, "cmp_live_chart")
    assert live["layout"]["xaxis"]["title"]["text"] == "input (all channels pooled)"
    assert not any(t.get("name") == "N(0, 1)" for t in live["data"])  # only x_hat is aimed at N(0, 1)
    app.radio(key="cmp_which").set_value("output").run()
    no_problem(app)
    assert not any(t.get("name") == "N(0, 1)" for t in chart(app, "cmp_live_chart")["data"])
    assert not any("KS" in c for c in app.dataframe[1].value.columns)


def test_day_night_page_renders(app):
    app.switch_page(DAYNIGHT).run()
    no_problem(app)
    assert "Day ↔ night transfer" in [t.value for t in app.title]  # the page itself: tests/test_app_daynight.py


# ----------------------------------------------------------------------------------------------- failures
def test_damaged_run_shows_an_error_not_a_traceback(damaged_runs, monkeypatch):
    monkeypatch.setenv("CBNORM_RUNS", str(damaged_runs))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert metric(at, "Runs that cannot be loaded") == "1"
    assert any("broken" in e.value and "malformed JSON" in e.value for e in at.error)
    for page in (HIST, EVO, COMPARE):
        at.switch_page(page).run()
        at.session_state["run"] = "broken"
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
        if page != COMPARE:  # the compare page only lists loadable runs
            assert any("config.json" in e.value and "malformed JSON" in e.value for e in at.error), page
        else:
            assert set(chart_keys(at)) == compare_chart_keys(damaged_runs)  # curves, losses, live, benchmarks


def test_missing_runs_directory_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("CBNORM_RUNS", str(tmp_path / "nowhere"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception and any("No runs found" in w.value for w in at.warning)
    at.switch_page(HIST).run()
    assert not at.exception and any("No run to show" in w.value for w in at.warning)


# ----------------------------------------------------------------------------------------------- real runs
def test_every_page_on_the_committed_checkpoints(monkeypatch):
    ckpt = ROOT / "checkpoints"
    from cbnorm.runs import find_runs

    runs = find_runs(ckpt)  # nested runs too (gan-features/classifier)
    if not runs:
        pytest.skip("checkpoints/ holds no runs yet")
    monkeypatch.delenv("CBNORM_RUNS", raising=False)  # the default: checkpoints/ next to app.py
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert int(metric(at, "Runs loaded")) + int(metric(at, "Runs that cannot be loaded")) == len(runs)
    expected = {HIST: 2, EVO: 2, DAYNIGHT: None, COMPARE: None}  # the day-night page has its own tests
    for page, n in expected.items():
        at.switch_page(page).run()
        no_problem(at)
        assert n is None or len(charts(at)) == n, page
        if page == COMPARE:  # what is drawn follows what is there: groups of seeds, bench/results
            assert set(chart_keys(at)) == compare_chart_keys(ckpt)
            for key in (k for k in chart_keys(at) if k.startswith(("cmp_seeds_chart", "cmp_repro_chart"))):
                fig = chart(at, key)
                multi = [t for t in fig["data"] if t["name"].endswith(" seeds)")]
                assert sum(t.get("fill") == "tonexty" for t in fig["data"]) == len(multi) >= 1, key


# ----------------------------------------------------------------------------------------------- helpers
def test_figure_frame_and_bench_results(tmp_path):
    from cbnorm.app import compare, figures

    rng = np.random.default_rng(0)
    w = np.full((2, 2), 0.5)
    m = np.array([[-1.0, 1.0], [0.0, 2.0]])
    v = np.ones((2, 2))
    fig = figures.histogram_grid(rng.normal(size=(2, 300)), [3, 7], mixture=(w, m, v), reference_normal=True)
    assert len(fig.data) == 2 * (1 + 2 + 1 + 1)
    df = figures.figure_frame(fig)
    assert set(df["trace"]) == {"histogram", "component 1", "component 2", "mixture", "N(0, 1)"}
    assert figures.frame_csv(df).startswith(b"trace,panel,x,y")
    anim = figures.embedding_animation([rng.normal(size=(20, 2))] * 3, [np.arange(20) % 2] * 3, ["a", "b"],
                                       [0, 5, 10], xlim=(-3, 3), ylim=(-3, 3))
    fdf = figures.figure_frame(anim)
    assert list(fdf["frame"].unique()) == ["step 0", "step 5", "step 10"] and len(fdf) == 60
    (tmp_path / "a.json").write_text(json.dumps({"machine": {"cpu": "x", "cpu_count": 2},
                                                 "rows": [{"k": 1, "t": [1, 2, 3, 4, 5]}], "note": "n"}))
    (tmp_path / "b.json").write_text("{broken")
    a, b = compare.bench_results.__wrapped__(str(tmp_path))
    assert a["machine"] == {"cpu": "x", "cpu_count": 2} and a["tables"] == [("rows", [{"k": 1}])]
    assert a["fields"] == {"note": "n"} and "cannot be read" in b["error"]
