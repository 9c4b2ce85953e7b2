"""The app in a real browser: `streamlit run app.py` headless on a free port, Chromium driven by Playwright.

Every page is visited; the test waits until the script has finished (`data-test-script-state="notRunning"`)
and the Plotly figures are drawn, checks that no exception or error box is shown, and saves a screenshot
(to $CBNORM_SCREENSHOTS, default a temporary folder). Skipped when /usr/bin/chromium or Playwright is
missing. Runs against the small runs built by tests/test_app.py's fixture.

    python tests/test_browser.py [RUNS_DIR] [SCREENSHOT_DIR]   # the same visit, by hand (e.g. checkpoints/)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port, start_server, stop_server  # noqa: E402
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
#: url path -> (name, number of Plotly figures the page shows with its defaults). The first visit is a deep
#: link on a fresh server: the page must still run inside app.py's frame (sidebar with the run picker).
PAGES = {"Activation_Histograms": ("histograms", 2), "": ("home", 0), "Cluster_Evolution": ("evolution", 2),
         "Day_Night_Transfer": ("day_night", 1), "Compare_Normalizers": ("compare", 3)}
ERROR_SELECTOR = "[data-testid='stException'], [data-testid='stAlertContentError']"


def wait_idle(page, timeout_ms: int) -> None:
    """Until the script run has finished (and stays finished for a moment)."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)


def visit(base_url: str, shots: Path, timeout_ms: int = 120_000, width: int = 1280) -> dict:
    """Visit every page; return {page: {"figures", "errors", "seconds", "screenshot"}}."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    report = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            for path, (name, n_figs) in PAGES.items():
                t0 = time.perf_counter()
                page.goto(f"{base_url}/{path}", wait_until="domcontentloaded")
                page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
                wait_idle(page, timeout_ms)
                if n_figs:
                    page.wait_for_function(
                        f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figs}",
                        timeout=timeout_ms)
                seconds = time.perf_counter() - t0
                errors = [e.inner_text()[:500] for e in page.query_selector_all(ERROR_SELECTOR)]
                errors += [d.inner_text()[:200] for d in page.query_selector_all("[role='dialog']")
                           if "not found" in d.inner_text().lower()]
                figs = page.eval_on_selector_all(".js-plotly-plot", "els => els.length")
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
                                "expected_figures": n_figs, "framed": framed}
        finally:
            browser.close()
    return report


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


from test_app import app_runs  # noqa: E402,F401  (the session fixture of small runs)

if __name__ == "__main__":  # by hand: python tests/test_browser.py checkpoints/ /tmp/shots
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "checkpoints"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/cbnorm-shots")
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = start_server(runs.resolve(), port, out / "streamlit.log")
    try:
        for k, v in visit(f"http://127.0.0.1:{port}", out).items():
            print(k, v)
    finally:
        stop_server(proc)
        print((out / "streamlit.log").read_text()[-2000:])
