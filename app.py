"""cbnorm's Streamlit app: `streamlit run app.py`.

The frame: page config, the shared sidebar (run, layer, seed in st.session_state; "Reload runs"), the
navigation over the pages in pages/, and the Home page. Runs are read from $CBNORM_RUNS (default:
checkpoints/ next to this file). Every number shown comes from cbnorm.app (its services call the library).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from cbnorm.app import evolution as E
from cbnorm.app import shared as S
from cbnorm.app import state

HERE = Path(__file__).resolve().parent
S.set_app_dir(HERE)

st.set_page_config(page_title="cbnorm · normalizers at work", page_icon=":material/stacked_bar_chart:",
                   layout="wide")
E.umap_warmup()  # compile UMAP once per process, in the background, long before the evolution page needs it

PAGES = {
    "hist": "pages/1_Activation_Histograms.py",
    "evo": "pages/2_Cluster_Evolution.py",
    "daynight": "pages/3_Day_Night_Transfer.py",
    "compare": "pages/4_Compare_Normalizers.py",
    "gen": "pages/5_Image_Generation.py",
    "across": "pages/6_Across_Runs_and_Training.py",
    "scan": "pages/7_Multimodality_Scan.py",
}


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "—"
    return f"{v:.2%}" if pct else f"{v:,}"


def home() -> None:
    st.title("cbnorm: what normalizers do to activations")
    st.markdown(
        "Batch normalization standardizes every channel with **one** mean and variance. The layers studied "
        "here use **several**: Mixture Normalization fits a Gaussian mixture to each minibatch, Context "
        "Normalization keeps one Gaussian per known context (e.g. a garment superclass), ACN / UCB-Norm "
        "learns the mixture as weights, Mode Normalization gates between modes. This app loads trained runs "
        "and shows, on real test images, what these layers see and what they output, how the learned "
        "representation forms during training, and how the normalizers compare.")
    with S.guard("Reading the runs"):
        runs = S.runs_overview()
        ok = [r for r in runs if r["ok"]]
        bad = [r for r in runs if not r["ok"]]
        c1, c2, c3 = st.columns(3)
        c1.metric("Device in use", S.device_label().split(" (")[0], help=S.device_label())
        c2.metric("Runs loaded", len(ok))
        c3.metric("Runs that cannot be loaded", len(bad))
        st.caption(f"Runs directory: `{S.runs_root()}` (set `{S.RUNS_ENV}` to use another). "
                   f"Device: {S.device_label()}.")
        for r in bad:
            st.error(f"Run **{r['name']}** cannot be loaded: {r['error']}")
        if not runs:
            st.warning(f"No runs found in `{S.runs_root()}` (nor in its folders). Record one from your own "
                       f"training loop with `cbnorm.watch(model, \"{S.runs_root()}/NAME\", probe=...)` or train one "
                       f"with `python -m cbnorm.train --out {S.runs_root()}/NAME ...` (see README.md), or choose "
                       f"another runs directory in the sidebar.")
        classify = [r for r in ok if r["task"] in ("classify", "record")]
        if classify:
            st.subheader("Loaded runs")
            pct = lambda label, help: st.column_config.NumberColumn(label, format="percent", help=help)  # noqa: E731
            st.dataframe(
                [{"run": r["name"], "norm": r["norm"], "test_acc": r["test_acc"], "oracle": r["test_acc_oracle"],
                  "mixed": r["test_acc_mixed"], "best": r["best_test_acc"], "dataset": r["dataset"],
                  "model": f"{r['model']} ({', '.join(r['layers'])})", "contexts": r["contexts"],
                  "epochs": r["epochs"], "steps": r["steps"], "snapshots": r["snapshots"], "recorded": r["recorded"],
                  "state": r["state"] or "", "params": r["params"]}
                 for r in classify],
                hide_index=True, key="home_runs",
                column_config={
                    "model": st.column_config.TextColumn("model (studied layers)"),
                    "test_acc": pct("test acc (honest)", "Last-epoch test accuracy; context layers get the context "
                                    "their own predictor infers from the image, never the label"),
                    "oracle": pct("oracle acc (leaks label)", "Test accuracy when context layers are given the "
                                  "true superclass, which is derived from the label: an upper bound, not a result"),
                    "mixed": pct("CN+ mixed acc", "Context layers mix every context by posterior (CN+), no "
                                 "predictor"),
                    "best": pct("best test acc", "Best honest test accuracy over the epochs"),
                    "recorded": st.column_config.NumberColumn(
                        "recorded steps", help="Steps with recorded summaries (cbnorm.watch): what every page can "
                                               "show without running the model"),
                    "state": st.column_config.TextColumn("recording", help="running: still being written (the "
                                                         "pages can follow it); finished; stopped: never closed"),
                    "params": st.column_config.NumberColumn("params", format="%d")})
            st.caption(
                "**Test accuracy** is the honest number: context layers get the context their own predictor infers "
                "from the image (or CN+ mixing), never the label. **Oracle accuracy** feeds the true superclass, "
                "which is derived from the label, so it is an upper bound, not a result.")
        other = [r for r in ok if r["task"] not in ("classify", "gan", "record")]
        if other:
            st.caption("Other runs: " + ", ".join(f"`{r['name']}` ({r['task']}, {r['norm']})" for r in other)
                       + " — see the day ↔ night page.")

    st.subheader("The pages")
    st.page_link(PAGES["hist"], label="Activation histograms", icon=":material/bar_chart:")
    st.markdown(
        "Pick a run and one of its normalization layers in the sidebar. The app draws a minibatch of test "
        "images (size and seed are yours; *Resample* draws another), runs the model and records what enters and "
        "leaves the layer. For each channel you see the histogram of the layer's **input** with a mixture over "
        "it: the layer's own components (MN, ACN, CN, CN-X, CN-embed, ModeNorm), each dashed in its colour, and "
        "their sum solid; layers without a mixture (BN, LN, GN) get a K-component fit. The **output** grid shows "
        "the normalized values against N(0, 1) with their skewness, excess kurtosis and distance to N(0, 1), so "
        "the papers' claim that the output is closer to normal can be checked by eye and by number.")
    st.page_link(PAGES["evo"], label="Cluster evolution", icon=":material/scatter_plot:")
    st.markdown(
        "The same fixed sample of test images at every training snapshot of a run, through the chosen layer, "
        "projected to 2-D by PCA (fitted on the last snapshot), t-SNE or UMAP (each snapshot started from the "
        "previous one's layout, so the frames stay aligned). Colour points by class, superclass, the model's "
        "prediction at that step or the layer's mixture component, move the snapshot slider or play the "
        "animation to watch classes separate as training goes on.")
    st.page_link(PAGES["daynight"], label="Day ↔ night transfer", icon=":material/dark_mode:")
    st.markdown(
        "The \"American night\" experiment of the Context Normalization paper: a photo is normalized with the day "
        "context's parameters and de-normalized with the night context's (or back), with a learned input-level "
        "context norm, an autoencoder with context norms inside, or plain per-context statistics. Pick a bundled "
        "photo or upload one, set the strength, compare input and output side by side, inspect each context's "
        "parameters, fit contexts from your own day and night photos, and read the measured quality on held-out "
        "photos.")
    st.page_link(PAGES["compare"], label="Compare normalizers", icon=":material/compare_arrows:")
    st.markdown(
        "Runs side by side: test error and loss against epochs or steps; a table of final and best accuracy, "
        "the steps each run needs to reach BatchNorm's best accuracy (the MN paper's speed-up measure), time per "
        "step and parameter count; a live panel that runs every chosen run's studied layer on the same "
        "minibatch and compares their output distributions; and the benchmark results in `bench/results/`.")
    st.page_link(PAGES["gen"], label="Image generation", icon=":material/auto_awesome:")
    st.markdown(
        "DCGANs with BatchNorm, MN or ACN in the generator (the papers' GAN experiments, on Fashion-MNIST): the same "
        "latent vectors drawn by each generator at every snapshot, side by side and animated, with their FD in "
        "classifier features, k-NN precision / recall and the classes their samples cover.")
    st.page_link(PAGES["across"], label="Across runs and training", icon=":material/stacked_line_chart:")
    st.markdown(
        "**Distributions over training**: one layer's values at every snapshot on the same test images, as offset "
        "histograms with each step's mixture components (the MN paper's Fig. 8 at every step), an overlay and "
        "percentile bands over a chosen window of steps. **The same histogram across runs**: several runs' histograms "
        "of a shared layer at one step, overlaid and in aligned panels on bins from the values shown, with each "
        "run's normality statistics and their differences to a reference run. **Embedding grid**: runs as rows and "
        "snapshots as columns, the same images in every cell (the CB-Norm paper's Fig. 3), by PCA, t-SNE or UMAP, "
        "coordinates downloadable. **Cluster quality over training**: silhouette, k-NN accuracy and the agreement "
        "of the layer's mixture components with classes and contexts at every snapshot, one line per run with a "
        "mean ± sd band over seeds.")
    st.page_link(PAGES["scan"], label="Where would a mixture help?", icon=":material/grid_on:")
    st.markdown(
        "The multimodality scan of every recorded normalization layer over training: a layers × steps heat map of "
        "the share of channels whose values a mixture of Gaussians fits better than one (by BIC) and of the median "
        "BIC gain, on the layer's input or x̂, for one run or two side by side (e.g. BN and MN in the same "
        "network); pick a cell for its histograms with the fits. Below it, the verdicts on the papers' premise "
        "measured on the committed runs.")


def _set_root() -> None:
    """Widget callback: switch the runs directory (the selected run and layer start over)."""
    path = Path(st.session_state["w_runs_dir"].strip()).expanduser()
    if not path.is_dir():
        st.session_state["runs_dir_error"] = f"`{path}` is not a directory; the runs directory is unchanged."
        return
    st.session_state.pop("runs_dir_error", None)
    st.session_state["runs_dir"] = str(path)
    st.session_state["run"] = st.session_state["layer"] = None


def sidebar() -> None:
    """Run, layer and seed. The selection lives in session keys "run", "layer", "seed" (read by every page);
    the widgets ("w_run", ...) are re-seeded from them on each run, so the choice survives page switches."""
    ss = st.session_state
    with st.sidebar:
        st.button("Reload runs", icon=":material/refresh:", on_click=S.clear_caches,
                  help="Forget every cached run, activation and projection and read the runs directory again")
        ss.setdefault("seed", 0)
        ss["w_runs_dir"] = str(S.runs_root())
        st.text_input("Runs directory", key="w_runs_dir", on_change=_set_root,
                      help="A folder of runs (searched in nested folders, as tensorboard --logdir) or one run. "
                           "cbnorm-view LOGDIR starts the app on one.")
        if ss.get("runs_dir_error"):
            st.error(ss["runs_dir_error"])
        with S.guard("Runs"):
            runs = S.probe_runs()
            names = [r["name"] for r in runs]
            if not names:
                st.warning(f"No classification runs in `{S.runs_root()}`.")
                ss["run"] = None
            else:
                by_name = {r["name"]: r for r in runs}
                if ss.get("run") not in names:
                    ss["run"] = next((r["name"] for r in runs if r["ok"]), names[0])
                ss["w_run"] = ss["run"]
                st.selectbox("Run", names, key="w_run", on_change=state.keep, args=("run",),
                             format_func=lambda n: f"{n} · {by_name[n]['norm']}" if by_name[n]["ok"]
                             else f"{n} · cannot load",
                             help="A trained run directory (config.json, metrics.json, weights, snapshots)")
                entry = by_name[ss["run"]]
                if not entry["ok"]:
                    st.error(f"Run {entry['name']} cannot be loaded: {entry['error']}")
                else:
                    run = S.run_by_name(ss["run"])
                    layers = S.layer_choices(run)
                    if ss.get("layer") not in layers:
                        ss["layer"] = layers[0]
                    ss["w_layer"] = ss["layer"]
                    st.selectbox("Layer", layers, key="w_layer", on_change=state.keep, args=("layer",),
                                 format_func=lambda n: S.layer_label(run, n),
                                 help="A normalization layer of the run; the studied one (the run's norm) comes first")
        ss["w_seed"] = int(ss["seed"])
        st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="w_seed", on_change=state.keep,
                        args=("seed",), help="Draws the minibatch / sample of test images (and random channel subsets)")
        st.caption(f"Device: {S.device_label()}")


nav = st.navigation([
    st.Page(home, title="Home", icon=":material/home:", default=True),
    st.Page(PAGES["hist"], title="Activation histograms", icon=":material/bar_chart:"),
    st.Page(PAGES["evo"], title="Cluster evolution", icon=":material/scatter_plot:"),
    st.Page(PAGES["daynight"], title="Day ↔ night transfer", icon=":material/dark_mode:"),
    st.Page(PAGES["compare"], title="Compare normalizers", icon=":material/compare_arrows:"),
    st.Page(PAGES["gen"], title="Image generation", icon=":material/auto_awesome:"),
    st.Page(PAGES["across"], title="Across runs and training", icon=":material/stacked_line_chart:"),
    st.Page(PAGES["scan"], title="Where would a mixture help?", icon=":material/grid_on:"),
])
sidebar()
nav.run()
