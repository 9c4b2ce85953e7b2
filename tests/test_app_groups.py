"""The compare page's runs grouped by recipe (seeds) and its reproduction of the MN paper's claim.

Tiny runs built here (digits, width 0.125, 12 steps, a dense eval every 2 steps): bn and mn with 3 seeds,
acn with one. The Seeds figure must have, per group of several seeds, a ±1 sd band (a trace filled to the
one before it) and a mean line on every eval step, equal to what we compute from metrics.json; a group of
one seed a plain line; the table must hold what ``cbnorm.train.sweep.summarize_groups`` gives. A synthetic
``reproduce_mn.json`` (in a temporary benchmark folder, ``$CBNORM_BENCH``) must give its curves and a table
with the paper's numbers beside ours; missing or malformed ones a message, never an exception.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest_helpers import arr, chart, chart_keys, no_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
APP = str(ROOT / "app.py")
COMPARE = "pages/4_Compare_Normalizers.py"
TIMEOUT = 180
TINY = ["--dataset", "digits", "--width", "0.125", "--epochs", "3", "--batch-size", "64", "--limit-train", "256",
        "--limit-test", "100", "--eval-every", "2", "--eval-subset", "60", "--snapshot-every", "0", "--lr", "0.02",
        "--threads", "1", "--quiet", "--record-size", "0"]
SEEDS = {"bn": [0, 1, 2], "mn": [0, 1, 2], "acn": [0]}
LABELS = {"bn": "bn", "mn": "mn", "acn": "acn-s0"}  # the common part of the run names (one run: its name)


@pytest.fixture(scope="session")
def grouped_runs(tmp_path_factory) -> Path:
    from cbnorm import train

    root = tmp_path_factory.mktemp("grouped") / "runs"
    for norm, seeds in SEEDS.items():
        for s in seeds:
            train.main(TINY + ["--norm", norm, "--seed", str(s), "--out", str(root / f"{norm}-s{s}")])
    return root


def metrics_of(root: Path) -> dict[str, list[tuple[int, dict]]]:
    return {norm: [(s, json.loads((root / f"{norm}-s{s}" / "metrics.json").read_text())) for s in seeds]
            for norm, seeds in SEEDS.items()}


def expected_summary(root: Path) -> dict:
    """summarize_groups of the tiny runs, keyed by the page's group labels."""
    from cbnorm.train.sweep import summarize_groups

    by_norm = metrics_of(root)
    return summarize_groups({"s": {LABELS[n]: runs for n, runs in by_norm.items()}}, reference="bn")["settings"]["s"]


# ----------------------------------------------------------------------------------------------- helpers
def table_with(at, column: str, nth: int = 0):
    tables = [d.value for d in at.dataframe if column in d.value.columns]
    assert len(tables) > nth, f"no table with column {column!r}"
    return tables[nth]


def compare_page(monkeypatch, runs: Path, bench: Path) -> AppTest:
    monkeypatch.setenv("CBNORM_RUNS", str(runs))
    monkeypatch.setenv("CBNORM_BENCH", str(bench))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(COMPARE).run()
    return at


# ----------------------------------------------------------------------------------------------- seeds
def test_seeds_figure_has_bands_means_and_the_table_has_summarize_groups_numbers(grouped_runs, tmp_path,
                                                                                 monkeypatch):
    at = compare_page(monkeypatch, grouped_runs, tmp_path)
    no_problem(at)
    # every run stays selectable alone
    assert sorted(at.multiselect(key="cmp_runs").options) == sorted(f"{n}-s{s}" for n, ss in SEEDS.items() for s in ss)
    fig = chart(at, "cmp_seeds_chart_0")
    traces = {t["name"]: t for t in fig["data"]}
    by_norm = metrics_of(grouped_runs)
    for norm in ("bn", "mn"):
        name = f"{LABELS[norm]} (3 seeds)"
        steps = [e["step"] for e in by_norm[norm][0][1]["evals"]]
        accs = np.array([[e["test_acc"] for e in m["evals"]] for _, m in by_norm[norm]])
        mean, sd = 1 - accs.mean(axis=0), accs.std(axis=0, ddof=1)
        line = traces[name]
        assert len(arr(line["x"])) >= len(steps) and line.get("fill") in (None, "none")
        np.testing.assert_array_equal(arr(line["x"]), steps)
        np.testing.assert_allclose(arr(line["y"]), mean, rtol=1e-9, atol=1e-12)
        lo, hi = traces[f"{name} − 1 sd"], traces[f"{name} + 1 sd"]
        assert hi["fill"] == "tonexty" and lo.get("fill") in (None, "none")
        names = [t["name"] for t in fig["data"]]
        assert names.index(f"{name} − 1 sd") + 1 == names.index(f"{name} + 1 sd")  # filled down to the lower edge
        np.testing.assert_allclose(arr(hi["y"]), mean + sd, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(arr(lo["y"]), mean - sd, rtol=1e-9, atol=1e-12)
        assert hi["legendgroup"] == lo["legendgroup"] == line["legendgroup"]
    single = [t for t in fig["data"] if t["name"].startswith("acn-s0")]
    assert [t["name"] for t in single] == ["acn-s0 (1 seed)"] and single[0].get("fill") in (None, "none")
    assert sum(t.get("fill") == "tonexty" for t in fig["data"]) == 2
    assert fig["layout"]["shapes"], "BN's best as a dotted line"

    # the table: summarize_groups' numbers, one row per group
    exp = expected_summary(grouped_runs)
    table = table_with(at, "beyond seed spread").set_index("group")
    assert list(table.index) == ["bn", "acn-s0", "mn"]  # the reference first
    for norm, label in LABELS.items():
        row, e = table.loc[label], exp["norms"][label]
        assert row["seeds"] == len(SEEDS[norm])
        assert row["best acc mean"] == pytest.approx(e["best_acc_mean"])
        if len(SEEDS[norm]) > 1:
            assert row["best acc sd"] == pytest.approx(e["best_acc_sd"])
            assert "±" in row["best acc"]
        else:
            assert "1 seed" in row["best acc"] and np.isnan(row["best acc sd"])
        steps = e["steps_to_reference"]
        assert (np.isnan(row["steps to BN best"]) if steps is None else row["steps to BN best"] == steps)
        assert row["per seed"] == ", ".join("never" if s is None else f"{s:,}" for s in e["steps_to_reference_per_seed"])
        red = e["reduction_vs_reference_pct"]
        assert (np.isnan(row["reduction vs BN %"]) if red is None else row["reduction vs BN %"] == pytest.approx(red))
        ci = e["steps_to_reference_ci95"]
        if ci is not None:
            assert row["95% interval (seeds)"] == f"[{ci[0]:,.0f}, {ci[1]:,.0f}]"
        else:
            assert " reach" in row["95% interval (seeds)"]
        spread = e["difference_exceeds_seed_spread"]
        assert row["beyond seed spread"].split(" (")[0] == ("reference" if label == "bn" else
                                                            "—" if spread is None else "yes" if spread else "no")
        p = e["welch_p"]
        assert (np.isnan(row["Welch p"]) if p is None else row["Welch p"] == pytest.approx(p))
    assert f"{exp['reference_acc']:.2%}" in "\n".join(c.value for c in at.caption)

    # each seed's own curve on demand; fewer groups
    at.toggle(key="cmp_seed_lines").set_value(True).run()
    no_problem(at)
    fig = chart(at, "cmp_seeds_chart_0")
    assert sum(t["name"].startswith("mn (3 seeds) seed ") for t in fig["data"]) == 3
    at.multiselect(key="cmp_groups").set_value(["mn", "acn-s0"]).run()
    no_problem(at)
    fig = chart(at, "cmp_seeds_chart_0")
    assert {t["legendgroup"] for t in fig["data"]} == {"mn (3 seeds)", "acn-s0 (1 seed)"}
    at.multiselect(key="cmp_groups").set_value(["acn-s0"]).run()
    no_problem(at)
    assert not [k for k in chart_keys(at) if k.startswith("cmp_seeds_chart")]
    assert any("more than one seed" in i.value for i in at.info)


def test_one_seed_per_recipe_says_so_and_draws_no_seed_figure(grouped_runs, tmp_path, monkeypatch):
    import shutil

    runs = tmp_path / "runs"
    for name in ("bn-s0", "mn-s0"):
        shutil.copytree(grouped_runs / name, runs / name)
    at = compare_page(monkeypatch, runs, tmp_path / "bench")
    no_problem(at)
    assert not [k for k in chart_keys(at) if k.startswith("cmp_seeds_chart")]
    assert any("one run (one seed)" in i.value for i in at.info)
    assert any("No `reproduce_mn.json`" in i.value for i in at.info)


# ----------------------------------------------------------------------------------------------- grouping
def _config(**training) -> dict:
    from cbnorm.train.classify import DEFAULTS

    t = {k: v for k, v in DEFAULTS.items() if k not in ("out", "resume", "device", "threads", "quiet")}
    t.update(training)
    return {"task": "classify", "model": {"name": "shallow_cnn", "kwargs": {"width": 0.25}}, "norm": t["norm"],
            "norm_kwargs": {"num_components": 3} if t["norm"] == "mn" else {}, "layers": ["conv3"],
            "dataset": {"name": "fashion-mnist", "limit_train": None, "limit_test": None, "subset_seed": t["seed"]},
            "contexts": {"spec": "none"}, "training": t}


def _metrics(acc: list[float]) -> dict:
    return {"evals": [{"step": 10 * i, "test_acc": a, "test_loss": 1.0, "n": 100} for i, a in enumerate(acc)],
            "epochs": [{"epoch": 1, "step": 10 * (len(acc) - 1), "test_acc": acc[-1]}]}


def test_group_runs_by_recipe_settings_labels_and_duplicates():
    from cbnorm.app import compare as C

    runs = []
    for lr in (0.01, 0.05):
        for norm in ("bn", "mn"):
            for seed in (0, 1):
                cfg = _config(norm=norm, lr=lr, seed=seed, optimizer="rmsprop", world_size=1 + seed,
                              snapshot_every=10 * (seed + 1))
                runs.append((f"{'small' if lr == 0.01 else 'large'}-{norm}-seed{seed}", cfg,
                             _metrics([0.1, 0.5 + 0.1 * seed, 0.6])))
    old = _config(norm="bn", lr=0.01, seed=2, optimizer="rmsprop")
    for k in ("eval_every", "schedule", "nesterov"):  # an older trainer's config: defaults fill them
        del old["training"][k]
    runs.append(("small-bn-seed2", old, _metrics([0.2, 0.6, 0.7])))
    runs.append(("small-bn-copy", _config(norm="bn", lr=0.01, seed=0, optimizer="rmsprop"), _metrics([0.1, 0.2, 0.3])))
    runs.append(("empty", _config(norm="bn", lr=0.01, seed=5, optimizer="rmsprop"), {"evals": [], "epochs": []}))
    groups = C.group_runs(runs)
    assert [(g["setting"], g["label"], g["seeds"]) for g in groups] == [
        ("lr 0.01", "small-bn", [0, 1, 2]), ("lr 0.01", "small-mn", [0, 1]),
        ("lr 0.05", "large-bn", [0, 1]), ("lr 0.05", "large-mn", [0, 1])]
    small_bn = groups[0]
    assert small_bn["is_reference"] and not groups[1]["is_reference"] and groups[2]["is_reference"]
    assert small_bn["duplicates"] == ["small-bn-seed0"]  # seed 0 twice: the first name is kept
    assert small_bn["recipe"] == "bn · lr 0.01" and groups[3]["recipe"] == "mn · lr 0.05"
    assert "fashion-mnist" in small_bn["setting_recipe"] and "rmsprop" in small_bn["setting_recipe"]
    summ = C.summarize_seed_groups(groups)
    assert set(summ) == {"lr 0.01", "lr 0.05"}
    assert summ["lr 0.01"]["reference"] == "small-bn"
    assert set(summ["lr 0.01"]["summary"]["norms"]) == {"small-bn", "small-mn"}
    table = C.seeds_table([g for g in groups if g["setting"] == "lr 0.05"], summ["lr 0.05"]["summary"])
    assert list(table["group"]) == ["large-bn", "large-mn"] and list(table["seeds"]) == [2, 2]
    # names without a distinct common part: the recipe is the label
    renamed = [(f"run{i}", c, m) for i, (_, c, m) in enumerate(runs)]
    labels = [g["label"] for g in C.group_runs(renamed)]
    assert labels == ["bn · lr 0.01", "mn · lr 0.01", "bn · lr 0.05", "mn · lr 0.05"]
    # one setting, a norm option that tells two mn groups apart
    one = [(f"mn-k{k}-s{s}", copy.deepcopy(_config(norm="mn", seed=s)), _metrics([0.1, 0.3])) for k in (2, 3)
           for s in (0, 1)]
    for name, cfg, _ in one:
        cfg["norm_kwargs"]["num_components"] = int(name[4])
    g = C.group_runs(one)
    assert [x["recipe"] for x in g] == ["mn · num_components 2", "mn · num_components 3"]
    assert {x["setting"] for x in g} == {""} and not any(x["is_reference"] for x in g)
    s = C.summarize_seed_groups(g)[""]
    assert s["reference"] is None and set(s["summary"]["norms"]) == {"mn-k2", "mn-k3"}


# ----------------------------------------------------------------------------------------------- reproduction
def reproduce_json(root: Path) -> dict:
    """A reproduce_mn.json in the shape bench/reproduce_mn.py writes, from the tiny runs."""
    from bench.reproduce_mn import PAPER
    from cbnorm.train.sweep import summarize_groups

    by_norm = metrics_of(root)
    runs = {"bn": by_norm["bn"], "mn": by_norm["mn"]}
    large = {n: [(s, {**m, "evals": [{**e, "test_acc": e["test_acc"] * 0.9} for e in m["evals"]]}) for s, m in r]
             for n, r in runs.items()}
    summary = summarize_groups({"small": runs, "large": large}, reference="bn")
    return {"protocol": {"common_args": ["--dataset", "digits", "--optimizer", "rmsprop"],
                         "settings": {"small": ["--lr", "0.01"], "large": ["--lr", "0.05"]}, "seeds": [0, 1, 2],
                         "why_this_scale": "tiny runs of a test"},
            "machine": {"cpu": "Test CPU 9000", "device": "cpu", "torch_threads": 1, "torch": "x"},
            "summary": summary, "runs": {}, "paper": PAPER, "failed": []}


def test_reproduction_section_draws_curves_and_table_3_beside_the_paper(grouped_runs, tmp_path, monkeypatch):
    rep = reproduce_json(grouped_runs)
    (tmp_path / "reproduce_mn.json").write_text(json.dumps(rep))
    at = compare_page(monkeypatch, grouped_runs, tmp_path)
    no_problem(at)
    assert not at.warning
    for i, setting in enumerate(("small", "large")):
        fig = chart(at, f"cmp_repro_chart_{i}")
        entry = rep["summary"]["settings"][setting]
        names = [t["name"] for t in fig["data"]]
        assert names == ["bn (3 seeds) − 1 sd", "bn (3 seeds) + 1 sd", "bn (3 seeds)",
                         "mn (3 seeds) − 1 sd", "mn (3 seeds) + 1 sd", "mn (3 seeds)"]
        mn = fig["data"][5]
        np.testing.assert_allclose(arr(mn["y"]), 1 - np.asarray(entry["norms"]["mn"]["mean"]))
        np.testing.assert_allclose(arr(fig["data"][4]["y"]), 1 - np.asarray(entry["norms"]["mn"]["mean"])
                                   + np.asarray(entry["norms"]["mn"]["sd"]))
        assert fig["data"][4]["fill"] == "tonexty"
        table = table_with(at, "paper CIFAR-10: steps to BN best", i).set_index("norm")
        paper = rep["paper"]["cifar10"][setting]
        for norm in ("bn", "mn"):
            row, g = table.loc[norm], entry["norms"][norm]
            assert row["best acc mean %"] == pytest.approx(100 * g["best_acc_mean"])
            assert row["best acc sd %"] == pytest.approx(100 * g["best_acc_sd"])
            assert row["seeds"] == 3
            s = g["steps_to_reference"]
            assert np.isnan(row["steps to BN best"]) if s is None else row["steps to BN best"] == s
            assert row["paper CIFAR-10: max acc %"] == paper[norm]["max_acc"]
            assert row["paper CIFAR-100: max acc %"] == rep["paper"]["cifar100"][setting][norm]["max_acc"]
        if setting == "small":
            assert table.loc["mn", "paper CIFAR-10: steps to BN best"] == 1.34e4
            assert table.loc["bn", "paper CIFAR-10: steps to BN best"] == 1.95e4
            assert table.loc["mn", "paper CIFAR-10: reduction %"] == pytest.approx(100 * (1 - 1.34 / 1.95))
        else:  # Table 2 gives no step counts at the large learning rate
            assert np.isnan(table.loc["mn", "paper CIFAR-10: steps to BN best"])
    captions = "\n".join(c.value for c in at.caption)
    assert "Test CPU 9000" in captions and "--optimizer rmsprop" in captions and "31%" in captions
    # the generic listing does not repeat the curves
    exp = next(e for e in at.expander if e.label == "reproduce_mn.json")
    assert "summary." not in "\n".join(c.value for c in exp.caption)


@pytest.mark.parametrize("content,expected", [
    ("{broken", "cannot be read"),
    ("[1, 2]", "not a JSON object"),
    ('{"summary": {"settings": {}}}', "no 'summary' with 'settings'"),
    ('{"summary": {"settings": {"small": {"norms": {"bn": {"steps": [0, 10], "mean": [0.1], "sd": [0, 0], '
     '"seeds": [0]}}}}}}', "'mean' has 1 values but 'steps' has 2"),
])
def test_malformed_reproduction_is_a_message_not_an_exception(grouped_runs, tmp_path, monkeypatch, content, expected):
    from cbnorm.app import compare as C

    (tmp_path / "reproduce_mn.json").write_text(content)
    rep = C.reproduction.__wrapped__(str(tmp_path))
    assert rep["status"] == "malformed" and expected in rep["message"], rep["message"]
    if expected != "cannot be read":
        return  # one AppTest run shows how the page says it
    at = compare_page(monkeypatch, grouped_runs, tmp_path)
    assert not at.exception, [e.value for e in at.exception]
    assert any("reproduce_mn.json" in w.value and expected in w.value for w in at.warning)
    assert not [k for k in chart_keys(at) if k.startswith("cmp_repro_chart")]


# ----------------------------------------------------------------------------------------------- committed
def test_committed_runs_and_reproduction_have_dense_curves_and_seed_bands(monkeypatch):
    """What a new user sees first (issue 12's done-means): on the committed runs, BN, MN and ACN each with 3
    seeds drawn as a mean line of at least 20 test points inside a ±1 sd band equal to the runs' own curves;
    the committed reproduce_mn.json drawn with a band for every norm of every setting."""
    from cbnorm.train.sweep import curve_of

    at = compare_page(monkeypatch, ROOT / "checkpoints", ROOT / "bench" / "results")
    no_problem(at)
    # one seeds figure per setting (the context runs train with a context head: another setting)
    figs = [chart(at, k) for k in chart_keys(at) if k.startswith("cmp_seeds_chart")]
    traces = {t["name"]: t for f in figs for t in f["data"]}
    for norm in ("bn", "mn", "acn"):
        runs = [f"fmnist-{norm}", f"fmnist-{norm}-s1", f"fmnist-{norm}-s2"]
        curves = [curve_of(json.loads((ROOT / "checkpoints" / r / "metrics.json").read_text())) for r in runs]
        assert all(c[2] == "evals" and len(c[0]) >= 20 for c in curves)
        accs = np.array([c[1] for c in curves])
        name = f"fmnist-{norm} (3 seeds)"
        line, hi = traces[name], traces[f"{name} + 1 sd"]
        np.testing.assert_array_equal(arr(line["x"]), curves[0][0])
        np.testing.assert_allclose(arr(line["y"]), 1 - accs.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(arr(hi["y"]), 1 - accs.mean(axis=0) + accs.std(axis=0, ddof=1), atol=1e-12)
        assert hi["fill"] == "tonexty"
    # one setting: the context layers (trained with a context head) are compared with BN too
    assert [k for k in chart_keys(at) if k.startswith("cmp_seeds_chart")] == ["cmp_seeds_chart_0"]
    assert "fmnist-cn (1 seed)" in traces
    # step 0 (chance, error 0.9) does not squeeze the curves: the y range ends below it
    lo, hi = figs[0]["layout"]["yaxis"]["range"]
    assert hi < 0.5 and lo < min(arr(t["y"]).min() for t in figs[0]["data"] if t["name"].endswith("(3 seeds)"))
    # the learning-curve figure draws the dense evaluations, with the epoch-end full test as markers
    err = {t["name"]: t for t in chart(at, "cmp_err_chart")["data"]}
    m = json.loads((ROOT / "checkpoints" / "fmnist-bn" / "metrics.json").read_text())
    np.testing.assert_array_equal(arr(err["fmnist-bn"]["x"]), [e["step"] for e in m["evals"]])
    np.testing.assert_allclose(arr(err["fmnist-bn"]["y"]), [1 - e["test_acc"] for e in m["evals"]])
    err_hi = chart(at, "cmp_err_chart")["layout"]["yaxis"]["range"][1]
    assert max(1 - e["test_acc"] for e in m["evals"][1:]) < err_hi < 0.5  # every point past step 0's chance
    ends = err["fmnist-bn (full test, epoch ends)"]
    assert ends["mode"] == "markers" and list(arr(ends["x"])) == [e["step"] for e in m["epochs"]]
    rep = json.loads((ROOT / "bench" / "results" / "reproduce_mn.json").read_text())
    order = sorted(rep["summary"]["settings"], key=lambda n: n != "small")  # the paper's Table 3 setting first
    for i, setting in enumerate(order):
        entry = rep["summary"]["settings"][setting]
        names = [t["name"] for t in chart(at, f"cmp_repro_chart_{i}")["data"]]
        for norm, g in entry["norms"].items():
            assert len(g["seeds"]) == 3 and len(g["steps"]) >= 20, (setting, norm)
            assert f"{norm} (3 seeds) + 1 sd" in names and f"{norm} (3 seeds)" in names, (setting, norm, names)
