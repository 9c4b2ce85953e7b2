"""The app in a real browser: `streamlit run app.py` headless on a free port, Chromium driven by Playwright.

Every page is visited; the test waits until the script has finished (`data-test-script-state="notRunning"`)
and the Plotly figures are drawn, checks that no exception or error box is shown, and saves a screenshot
(to $CBNORM_SCREENSHOTS, default a temporary folder). Skipped when /usr/bin/chromium or Playwright is
missing. Runs against the small runs built by tests/test_app.py's fixture; the Compare page's figures are
read back from the browser (their traces) and, on the committed runs (BN, MN and ACN with 3 seeds each) and
the committed reproduce_mn.json, every group's ±1 sd band and mean line are checked.

    python tests/test_browser.py [RUNS_DIR] [SCREENSHOT_DIR]   # the same visit, by hand (e.g. checkpoints/)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port, start_server, stop_server  # noqa: E402
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
#: url path -> (name, number of Plotly figures the page shows with its defaults). The first visit is a deep
#: link on a fresh server: the page must still run inside app.py's frame (sidebar with the run picker).
PAGES = {"Activation_Histograms": ("histograms", 2), "": ("home", 0), "Cluster_Evolution": ("evolution", 2),
         "Day_Night_Transfer": ("day_night", 1), "Compare_Normalizers": ("compare", 3),
         "Image_Generation": ("generation", 0),  # 0: these runs hold no GAN run (see test_generation_page_...)
         "Across_Runs_and_Training": ("across", 4)}  # its first view: ridge, per-step, overlay, percentiles
ERROR_SELECTOR = "[data-testid='stException'], [data-testid='stAlertContentError']"


def wait_idle(page, timeout_ms: int) -> None:
    """Until the script run has finished (and stays finished for a moment)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)


#: every drawn Plotly figure's title and traces (name, fill, number of points), read from the graph divs
#: (numpy arrays travel as typed binary arrays, so the point count comes from Plotly's full trace data)
FIGURES_JS = """els => els.map(el => ({
    title: (el.layout && el.layout.title && el.layout.title.text) || "",
    traces: (el.data || []).map((t, i) => {
        const full = (el._fullData || [])[i] || {};
        const n = (t.x && t.x.length !== undefined) ? t.x.length : (full._length ?? (full.x ? full.x.length : -1));
        return {name: t.name || "", fill: full.fill || t.fill || "", n: n};
    })}))"""


def visit(base_url: str, shots: Path, timeout_ms: int = 120_000, width: int = 1280,
          pages: Optional[dict] = None) -> dict:
    """Visit every page (or ``pages``, a subset of PAGES); return {page: {"figures", "errors", "seconds",
    "screenshot", "plots"}} with "plots" the figures' traces (FIGURES_JS)."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    report = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            for path, (name, n_figs) in (pages or PAGES).items():
                t0 = time.perf_counter()
                page.goto(f"{base_url}/{path}", wait_until="domcontentloaded")
                page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
                wait_idle(page, timeout_ms)
                if n_figs:
                    # count figures drawn (a plot with its svg), not svg layers: one plot has several
                    page.wait_for_function(
                        "n => [...document.querySelectorAll('.js-plotly-plot')]"
                        ".filter(e => e.querySelector('.main-svg')).length >= n", arg=n_figs,
                        timeout=timeout_ms)
                seconds = time.perf_counter() - t0
                errors = [e.inner_text()[:500] for e in page.query_selector_all(ERROR_SELECTOR)]
                errors += [d.inner_text()[:200] for d in page.query_selector_all("[role='dialog']")
                           if "not found" in d.inner_text().lower()]
                figs = page.eval_on_selector_all(".js-plotly-plot", "els => els.length")
                plots = page.eval_on_selector_all(".js-plotly-plot", FIGURES_JS)
                framed = page.query_selector("[data-testid='stSidebar'] [data-testid='stSelectbox']") is not None
                # the app scrolls inside its main block: grow the viewport to the content for a whole-page shot
                height = page.evaluate("() => { const m = document.querySelector(\"[data-testid='stMain']\");"
                                       " return m ? m.scrollHeight : document.body.scrollHeight; }")
                page.set_viewport_size({"width": width, "height": int(min(max(900, height), 8000))})
                page.wait_for_timeout(800)  # let Plotly relayout and finish drawing
                shot = shots / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                page.set_viewport_size({"width": width, "height": 900})
                report[name] = {"figures": figs, "errors": errors, "seconds": seconds, "screenshot": str(shot),
                                "expected_figures": n_figs, "framed": framed, "plots": plots}
        finally:
            browser.close()
    return report


def _runs_of(runs_dir: Path) -> list[tuple[str, dict, dict]]:
    import json

    out = []
    for p in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            cfg, m = (json.loads((p / f).read_text()) for f in ("config.json", "metrics.json"))
        except (OSError, ValueError):
            continue
        if cfg.get("task", "classify") == "classify":
            out.append((p.name, cfg, m))
    return out


def seed_groups(runs_dir: Path) -> list[dict]:
    """The compare page's groups of the runs in ``runs_dir`` (cbnorm.app.compare.group_runs)."""
    from cbnorm.app.compare import group_runs

    return group_runs(_runs_of(runs_dir))


def compare_problems(plots: list[dict], runs_dir: Path, bench_dir: Path) -> list[str]:
    """What is wrong with the compare page's drawn figures: any figure without traces; for every group of
    several seeds among the first 12 (the page's default choice), its band ("NAME + 1 sd" filled down to
    "NAME − 1 sd", right before it) and mean line on every eval step; for a group of one seed, a plain line
    and no band; for reproduce_mn.json in ``bench_dir``, a band per norm of several seeds in each setting."""
    import json

    from cbnorm.train.sweep import curve_of

    problems = [f"figure {i} ({p['title']!r}) has no trace" for i, p in enumerate(plots) if not p["traces"]]
    names_in = [[t["name"] for t in p["traces"]] for p in plots]

    def band_problem(ts: list[dict], names: list[str], name: str, n_points: int) -> Optional[str]:
        hi, lo = f"{name} + 1 sd", f"{name} − 1 sd"
        if hi not in names or lo not in names or names.index(lo) + 1 != names.index(hi):
            return f"{name!r}: no band traces {lo!r} then {hi!r}"
        if ts[names.index(hi)]["fill"] != "tonexty" or ts[names.index(lo)]["fill"] not in ("", "none"):
            return f"{name!r}: the band is not filled between its edges"
        if ts[names.index(name)]["n"] < n_points:
            return f"{name!r}: {ts[names.index(name)]['n']} points, fewer than the {n_points} eval steps"
        return None

    def band(name: str, n_points: int) -> None:
        """Some figure has the mean line ``name`` with its band (another figure may use the same name)."""
        found = [band_problem(p["traces"], names, name, n_points) for p, names in zip(plots, names_in) if name in names]
        if not found:
            problems.append(f"no mean line {name!r}")
        elif all(found):
            problems.append(found[0])

    def plain(name: str) -> None:
        if not any(name in names and f"{name} + 1 sd" not in names for names in names_in):
            problems.append(f"{name!r}: expected a plain line without a band")

    groups = seed_groups(runs_dir)
    if any(len(g["seeds"]) > 1 for g in groups):
        for g in groups[:12]:
            n = len(g["seeds"])
            if not any(len(o["seeds"]) > 1 for o in groups[:12] if o["setting"] == g["setting"]):
                continue  # a setting of single runs draws no seed figure
            steps = set.intersection(*(set(curve_of(m)[0].tolist()) for _, m in g["metrics"]))
            name = f"{g['label']} ({n} seed{'s' if n != 1 else ''})"
            if n > 1:
                band(name, len(steps))
            else:
                plain(name)
    rep_path = bench_dir / "reproduce_mn.json"
    try:
        rep = json.loads(rep_path.read_text())["summary"]["settings"] if rep_path.exists() else {}
    except (OSError, ValueError, KeyError, TypeError):
        rep = {}  # a malformed file: the page says so (checked by test_app_groups)
    for entry in rep.values():
        for norm, g in entry["norms"].items():
            if len(g["seeds"]) > 1:
                band(f"{norm} ({len(g['seeds'])} seeds)", len(g["steps"]))
    return problems


@pytest.mark.slow
def test_every_page_in_chromium(app_runs, tmp_path_factory):
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    shots = Path(os.environ.get("CBNORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    proc = start_server(app_runs, port, log_path)
    try:
        report = visit(f"http://127.0.0.1:{port}", shots)
    finally:
        stop_server(proc)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    for name, r in report.items():
        assert not r["errors"], f"{name}: error box shown: {r['errors']}"
        assert r["figures"] >= r["expected_figures"], f"{name}: {r['figures']} figures, expected {r['expected_figures']}"
        assert r["framed"], f"{name}: shown without app.py's sidebar (run picker)"
        assert Path(r["screenshot"]).stat().st_size > 5_000
    # the compare page's figures have their traces (these runs: one seed each, so no seed bands)
    assert not compare_problems(report["compare"]["plots"], app_runs, ROOT / "bench" / "results")
    err = report["compare"]["plots"][0]
    assert sorted(t["name"] for t in err["traces"]) == sorted(p.name for p in app_runs.iterdir() if p.is_dir())


@pytest.mark.slow
def test_compare_seed_bands_in_chromium(tmp_path_factory):
    """The Compare page in Chromium on the committed runs (BN, MN and ACN with 3 seeds, the other norms one)
    and bench/results (the committed reproduce_mn.json): every group's band and mean line are drawn, one-seed
    groups as plain lines, a band per norm of each reproduction setting. (The same checks on a synthetic
    sweep of tiny runs are AppTest's, tests/test_app_groups.py.)"""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    which = "checkpoints"
    runs, bench = ROOT / "checkpoints", ROOT / "bench" / "results"
    assert sum(len(g["seeds"]) == 3 for g in seed_groups(runs)) >= 3  # BN, MN, ACN
    shots = Path(os.environ.get("CBNORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")) / f"seeds-{which}"
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    proc = start_server(runs, port, log_path, extra_env={"CBNORM_BENCH": str(bench)})
    try:
        report = visit(f"http://127.0.0.1:{port}", shots, pages={"Compare_Normalizers": ("compare", 4)})
    finally:
        stop_server(proc)
    assert "Traceback" not in log_path.read_text()
    r = report["compare"]
    assert not r["errors"], r["errors"]
    problems = compare_problems(r["plots"], runs, bench)
    assert not problems, problems
    assert any(t["fill"] == "tonexty" for p in r["plots"] for t in p["traces"])


@pytest.mark.slow
def test_generation_page_in_chromium(tmp_path_factory):
    """Page 5 in Chromium on two tiny GAN runs (tests/test_gan.py's): sample grids, the animation, score curves
    and class histogram drawn, no error box, no traceback in the server log."""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from test_gan import tiny_run

    runs = tmp_path_factory.mktemp("gan_browser")
    tiny_run(runs, "bn")
    tiny_run(runs, "acn")
    shots = Path(os.environ.get("CBNORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")) / "generation"
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    proc = start_server(runs, port, log_path)
    try:
        report = visit(f"http://127.0.0.1:{port}", shots, pages={"Image_Generation": ("generation", 3)})
    finally:
        stop_server(proc)
    assert "Traceback" not in log_path.read_text()
    r = report["generation"]
    assert not r["errors"], r["errors"]
    assert r["figures"] >= 3 and r["framed"]
    scores = [p for p in r["plots"] if len(p["traces"]) == 2]
    assert scores, r["plots"]  # one line per run


#: page 6's views (?view=...) and the figures each draws with its defaults
ACROSS_VIEWS = {"dist": 4, "runs": 2, "grid": 1, "quality": 1}


@pytest.mark.slow
def test_across_runs_and_training_views_in_chromium(training_runs, tmp_path_factory):
    """Page 6's four views in Chromium on tests/test_app_training.py's tiny runs (each view deep-linked with
    ?view=): no error box, no traceback, and the figures drawn with a trace per snapshot (distributions), per
    run (histograms), per run x snapshot x class (grid) and per run (cluster quality)."""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    shots = Path(os.environ.get("CBNORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")) / "across"
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    proc = start_server(training_runs, port, log_path)
    try:
        report = visit(f"http://127.0.0.1:{port}", shots, timeout_ms=240_000,
                       pages={f"Across_Runs_and_Training?view={v}": (f"across_{v}", n) for v, n in ACROSS_VIEWS.items()})
    finally:
        stop_server(proc)
    assert "Traceback" not in log_path.read_text()
    for v, n in ACROSS_VIEWS.items():
        r = report[f"across_{v}"]
        assert not r["errors"], (v, r["errors"])
        assert r["figures"] >= n and r["framed"], v
        assert all(p["traces"] for p in r["plots"]), v
    steps = sorted(int(p.stem.split("_")[1]) for p in (training_runs / "acn-s0" / "snapshots").glob("step_*"))
    overlay = report["across_dist"]["plots"][2]  # the sidebar's first run, acn-s0: one line per snapshot
    assert [t["name"] for t in overlay["traces"]] == [f"step {s}" for s in steps]
    hist = report["across_runs"]["plots"][0]  # acn-s0 and a BatchNorm run
    assert [t["name"].split(" ")[0] for t in hist["traces"] if t["name"] != "N(0, 1)"] == ["acn-s0", "bn-s0"]
    grid = report["across_grid"]["plots"][0]
    cells = [t for t in grid["traces"] if t["name"].startswith(("acn-s0 · step", "bn-s0 · step"))]
    assert len(cells) == 2 * len(steps) and all(t["n"] == 360 for t in cells)  # one trace per cell, every image
    assert len(grid["traces"]) == len(cells) + 10  # + one legend entry per class
    quality = report["across_quality"]["plots"][0]
    assert {"acn-s0 (acn)", "bn-s0 (bn)", "bn-s1 (bn)"} <= {t["name"] for t in quality["traces"]}


from test_app import app_runs  # noqa: E402,F401  (the session fixture of small runs)
from test_app_training import training_runs  # noqa: E402,F401  (tiny runs with snapshots, two seeds of bn)

pytestmark = pytest.mark.timeout(240)  # spawns a server and Chromium: a hang fails here with its stack

if __name__ == "__main__":  # by hand: python tests/test_browser.py checkpoints/ /tmp/shots
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "checkpoints"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/cbnorm-shots")
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = start_server(runs.resolve(), port, out / "streamlit.log")
    try:
        report = visit(f"http://127.0.0.1:{port}", out)
        for k, v in report.items():
            print(k, {kk: vv for kk, vv in v.items() if kk != "plots"})
        print("compare page problems:", compare_problems(report["compare"]["plots"], runs.resolve(),
                                                         ROOT / "bench" / "results") or "none")
    finally:
        stop_server(proc)
        print((out / "streamlit.log").read_text()[-2000:])


@pytest.mark.slow
def test_recorded_runs_and_following_in_chromium(tmp_path_factory):
    """Runs recorded by cbnorm.watch from a user's model (nested folders, one still being written): every page
    that applies (the multimodality scan too) is drawn without an error box, and the histogram page follows the running run: a step
    written after the page opened appears without a reload."""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from test_app_recorded import record

    root = tmp_path_factory.mktemp("recorded-browser")
    record(root, "mine/net-mn", norm="mn")
    _, rec, _, _ = record(root, "a-live/net-bn", steps=20, close=False)  # first in the sidebar: followed
    shots = Path(os.environ.get("CBNORM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    proc = start_server(root, port, log_path)
    try:
        pages = {"Activation_Histograms": ("recorded_histograms", 2), "Cluster_Evolution": ("recorded_evolution", 2),
                 "Across_Runs_and_Training": ("recorded_across", 4), "Compare_Normalizers": ("recorded_compare", 3),
                 "Multimodality_Scan": ("recorded_scan", 2)}  # the heat maps (both runs) and a cell's histograms
        report = visit(f"http://127.0.0.1:{port}", shots, pages=pages)
        for name, r in report.items():
            assert not r["errors"], f"{name}: error box shown: {r['errors']}"
            assert r["figures"] >= r["expected_figures"], f"{name}: {r['figures']} figures"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/Activation_Histograms", wait_until="domcontentloaded")
                wait_idle(page, 120_000)
                page.wait_for_selector("text=the recorded probe batch at step 20", timeout=60_000)
                for step in range(21, 31):
                    rec.step(step, loss=1.0)  # step 30 is a probe step: a new summary
                page.wait_for_selector("text=the recorded probe batch at step 30", timeout=30_000)
                page.wait_for_selector("text=6 recorded steps, last 30", timeout=10_000)  # the badge follows too
                page.screenshot(path=str(shots / "recorded_followed.png"), full_page=True)
            finally:
                browser.close()
    finally:
        rec.close()
        stop_server(proc)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
