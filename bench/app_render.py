"""How long the app takes on this machine: each page's first render and each main action, measured with
Streamlit's AppTest (the scripts' own run time: model runs, fits, projections and figure building), then
each page's first visit in Chromium on a fresh server (until the script is idle and the figures are drawn;
skipped without /usr/bin/chromium or with --no-browser). Runs on the committed checkpoints/ (or $CBNORM_RUNS).

    python bench/app_render.py [--points 2000] [--out bench/results/app_render.json]

One process, one session, pages visited in a user's order (Home first, so loading the runs is counted
there). The headline is the cluster-evolution page with t-SNE on 2,000 test images over every snapshot:
cold (nothing cached) against the goal of 20 s, then cached (colour change, snapshot slider, re-running the
same projection) against the goal of 1 s. Page 6 (across runs and training): each view cold, then cached
(goal 1 s), and a cold embedding grid of 3 runs x 11 snapshots x 1,000 images by PCA (goal 20 s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIST, EVO, COMPARE = ("pages/1_Activation_Histograms.py", "pages/2_Cluster_Evolution.py",
                      "pages/4_Compare_Normalizers.py")
ACROSS = "pages/6_Across_Runs_and_Training.py"
#: the runs the across-runs views compare (those of them that are there), else the first three
ACROSS_RUNS = ("fmnist-bn", "fmnist-mn", "fmnist-acn")


def machine() -> dict:
    import torch

    from bench.common import cpu_model

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "loadavg_start": os.getloadavg()[0]}


def across(at, timed, click) -> None:
    """Page 6's four views: each one's first render (cold), then the changes that must answer from the cache
    (goal 1 s), and the headline: a cold grid of 3 runs x 11 snapshots x 1,000 images by PCA (goal 20 s)."""
    timed("distributions over training: first render (sidebar run, 256 images, every snapshot)", "across",
          lambda: at.switch_page(ACROSS).run())
    steps = at.select_slider(key="tr_d_range").options
    if len(steps) > 2:
        at.select_slider(key="tr_d_range").set_value((steps[1], steps[-1]))
        timed("distributions: step window (cached)", "across", at.run, goal=1.0)
    at.select_slider(key="tr_d_bins").set_value(40)
    timed("distributions: 40 bins (cached)", "across", at.run, goal=1.0)
    at.checkbox(key="tr_d_logy").check()
    timed("distributions: log y (cached)", "across", at.run, goal=1.0)
    at.checkbox(key="tr_d_all").check()
    timed("distributions: all channels pooled (activations cached, panels recomputed)", "across", at.run)

    at.radio(key="tr_view").set_value("runs")
    timed("same histogram across runs: first render (2 runs, final weights)", "across", at.run)
    names = at.multiselect(key="w_tr_runs").options
    chosen = [n for n in ACROSS_RUNS if n in names] or list(names[:3])
    at.multiselect(key="w_tr_runs").set_value(chosen)
    timed(f"same histogram across {len(chosen)} runs", "across", at.run, runs=chosen)
    at.select_slider(key="tr_x_tail").set_value(0.01)
    timed("across runs: range 1 % cut (cached)", "across", at.run, goal=1.0)
    at.checkbox(key="tr_x_logy").check()
    timed("across runs: log y (cached)", "across", at.run, goal=1.0)

    at.radio(key="tr_view").set_value("grid")
    timed("embedding grid: first render (4 snapshots per run, 1,000 images, PCA)", "across", at.run, runs=chosen)
    from cbnorm.app import training

    training.clear_caches()  # the headline below starts cold: no activation, panel or projection of page 6 cached
    at.slider(key="tr_g_columns").set_value(11)
    at.slider(key="tr_g_size").set_value(1000)
    timed(f"embedding grid: {len(chosen)} runs x 11 snapshots x 1,000 images, PCA, cold", "across", at.run, goal=20.0,
          runs=chosen, snapshots=11, points=1000)
    at.radio(key="tr_g_colour").set_value(at.radio(key="tr_g_colour").options[-1])
    timed("embedding grid: change colouring (cached)", "across", at.run, goal=1.0)
    at.radio(key="tr_g_colour").set_value(at.radio(key="tr_g_colour").options[0])
    timed("embedding grid: back to class colours (cached)", "across", at.run, goal=1.0)

    at.radio(key="tr_view").set_value("quality")
    timed(f"cluster quality: {len(chosen)} runs and their other seeds x every snapshot, 1,000 images, cold",
          "across", at.run, runs=chosen)
    metrics = at.multiselect(key="tr_q_metrics").value
    at.multiselect(key="tr_q_metrics").set_value(metrics[:2])
    timed("cluster quality: fewer metrics (cached)", "across", at.run, goal=1.0)
    at.radio(key="tr_view").set_value("grid")
    timed("embedding grid again (cached)", "across", at.run, goal=1.0)


#: the run whose recorded summaries the "recorded" views read
RECORDED_RUN = "fmnist-mn"


def recorded(at, timed, click) -> None:
    """The views read from recorded summaries (``cbnorm.watch``, or ``python -m cbnorm.record`` for the
    committed runs), cold: distributions over every recorded step (goal 2 s over 17 steps) and the cluster
    evolution by PCA on the recorded features (goal 3 s). Nothing is cached before each."""
    import streamlit as st

    at.session_state["run"] = RECORDED_RUN
    at.session_state["layer"] = None
    at.run()
    st.cache_data.clear()
    st.cache_resource.clear()
    at = timed("distributions over training from recorded summaries, cold", "recorded",
               lambda: at.switch_page(ACROSS).run(), goal=2.0)
    steps = at.select_slider(key="tr_d_range").options
    timings_note = {"steps": len(steps)}
    st.cache_data.clear()
    st.cache_resource.clear()
    at.switch_page(EVO).run()
    at.radio(key="evo_method").set_value("pca")
    at.checkbox(key="evo_pool").check()
    timed(f"cluster evolution, PCA on recorded features ({timings_note['steps']} steps), cold", "recorded",
          lambda: click(at, "Run projection"), goal=3.0, **timings_note)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=2000, help="test images of the t-SNE evolution (2000)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "app_render.json"))
    ap.add_argument("--only", choices=["all", "across", "recorded"], default="all",
                    help="across: Home, then page 6's views only; recorded: Home, then the cold views read from "
                         "recorded summaries (write to another --out)")
    ap.add_argument("--no-browser", action="store_true",
                    help="skip the second part: each page's first render in Chromium (fresh server)")
    a = ap.parse_args(argv)

    import faulthandler

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    faulthandler.dump_traceback_later(400, exit=False)  # show where a stalled run is stuck

    info = machine()
    timings: list[dict] = []

    def timed(what: str, page: str, fn, goal: float | None = None, **extra):
        t0 = time.perf_counter()
        at = fn()
        dt = time.perf_counter() - t0
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        row = {"page": page, "action": what, "seconds": round(dt, 3), **extra}
        if goal is not None:
            row["goal_s"] = goal
            row["meets_goal"] = dt < goal
        if problems:
            row["problems"] = [str(p)[:300] for p in problems]
        timings.append(row)
        print(f"{page:12s} {what:60s} {dt:8.2f} s" + (f"  (goal {goal} s)" if goal else "")
              + (f"  PROBLEMS {problems}" if problems else ""), flush=True)
        return at

    def click(at, label):
        next(b for b in at.button if b.label == label).click()
        return at.run()

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    timed("first render (loads every run; starts UMAP's background compilation)", "home", at.run)
    timed("rerun (cached)", "home", at.run)
    from cbnorm.app import evolution

    t0 = time.perf_counter()
    evolution.umap_warmup().join()  # measured apart: a one-time cost per process, paid in the background
    timings.append({"page": "(process)", "action": "UMAP warm-up finishes (background thread, once per process)",
                    "seconds": round(time.perf_counter() - t0, 3), "note": "time waited after Home's first render"})
    print(f"UMAP warm-up waited {timings[-1]['seconds']} s", flush=True)

    if a.only == "across":
        across(at, timed, click)
        return finish(a, info, timings)
    if a.only == "recorded":
        recorded(at, timed, click)
        return finish(a, info, timings)
    timed("first render (defaults: 256 images, 8 channels)", "histograms", lambda: at.switch_page(HIST).run())
    at.slider(key="hist_k").set_value(2)
    timed("change K (refit the output mixtures)", "histograms", at.run)
    timed("resample the minibatch (new seed)", "histograms", lambda: click(at, "Resample"))
    at.select_slider(key="hist_size").set_value(1024)
    timed("minibatch of 1024 images", "histograms", at.run)
    at.slider(key="hist_count").set_value(16)
    timed("16 channels", "histograms", at.run)

    timed("first render (defaults: PCA, 1,000 images, every snapshot)", "evolution", lambda: at.switch_page(EVO).run())
    at.radio(key="evo_colour").set_value(at.radio(key="evo_colour").options[-1])
    timed("change colouring (cached)", "evolution", at.run)
    n_snap = len(at.select_slider(key="evo_step").options)
    at.radio(key="evo_method").set_value("tsne")
    at.slider(key="evo_size").set_value(a.points)
    at.checkbox(key="evo_pool").uncheck()  # every position of 2,000 test images: the model runs (as before)
    timed(f"t-SNE on {a.points:,} images x {n_snap} snapshots, cold", "evolution", lambda: click(at, "Run projection"),
          goal=20.0, points=a.points, snapshots=n_snap)
    at.radio(key="evo_colour").set_value(at.radio(key="evo_colour").options[0])
    timed("t-SNE: change colouring (cached)", "evolution", at.run, goal=1.0)
    at.select_slider(key="evo_step").set_value(at.select_slider(key="evo_step").options[0])
    timed("t-SNE: move the snapshot slider (cached)", "evolution", at.run, goal=1.0)
    timed("t-SNE: run the same projection again (cached)", "evolution", lambda: click(at, "Run projection"), goal=1.0)
    at.slider(key="evo_perplexity").set_value(50)
    timed(f"t-SNE perplexity 50 (features cached, projection recomputed)", "evolution",
          lambda: click(at, "Run projection"))
    at.radio(key="evo_method").set_value("umap")
    timed(f"UMAP on {a.points:,} images x {n_snap} snapshots, cold (compiled in the background)", "evolution",
          lambda: click(at, "Run projection"))
    at.radio(key="evo_method").set_value("pca")
    timed(f"PCA on {a.points:,} images (features cached)", "evolution", lambda: click(at, "Run projection"))

    timed("first render (every run, live panel 128 images)", "compare", lambda: at.switch_page(COMPARE).run())
    at.radio(key="cmp_x").set_value("epoch")
    timed("x axis: epochs", "compare", at.run)
    at.select_slider(key="cmp_size").set_value(512)
    timed("live panel with 512 images", "compare", at.run)

    across(at, timed, click)

    if not a.no_browser and Path("/usr/bin/chromium").exists():
        # the same pages in a real browser, on a fresh server: until the script is idle and the figures drawn
        import tempfile

        sys.path.insert(0, str(ROOT / "tests"))
        from test_browser import visit

        from bench.common import free_port, start_server, stop_server

        port = free_port()
        runs = Path(os.environ.get("CBNORM_RUNS") or ROOT / "checkpoints")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:  # the server's log and the screenshots
            proc = start_server(runs.resolve(), port, Path(tmp) / "streamlit.log")
            timings.append({"page": "(browser)", "action": "streamlit server start until healthy",
                            "seconds": round(time.perf_counter() - t0, 3)})
            try:
                for name, r in visit(f"http://127.0.0.1:{port}", Path(tmp)).items():
                    timings.append({"page": name, "action": "browser: first visit until idle with figures drawn "
                                    "(fresh server; histograms first, as a deep link)",
                                    "seconds": round(r["seconds"], 3), "figures": r["figures"]})
                    print(f"{name:12s} browser first visit {r['seconds']:8.2f} s", flush=True)
            finally:
                stop_server(proc)

    finish(a, info, timings)


def finish(a, info: dict, timings: list) -> None:
    info["loadavg_end"] = os.getloadavg()[0]
    result = {"benchmark": "app page renders and actions: AppTest (script time) and Chromium (until drawn)",
              "runs": str(os.environ.get("CBNORM_RUNS") or ROOT / "checkpoints"), "machine": info, "timings": timings,
              "note": "One process and session in a user's order; cold = nothing cached in the process. Other jobs "
                      "may share the CPU: see loadavg."}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
