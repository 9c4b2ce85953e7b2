"""Widget groups the views draw alike, most of them page 6's ("Across runs and training"): the activations
shown, histogram range and bins, channels, a window of steps, the runs and the shared layer, the runs that have snapshots, the embedding grid's
projection, the quality metrics, a chart or table with its download. Each remembers its settings in the page's
:class:`cbnorm.app.state.Memory` and stops the page with a message where nothing can be shown."""
from __future__ import annotations

from typing import Callable, Optional

import streamlit as st

from . import shared as S
from . import training as T
from .state import Memory, ensure, keep

#: page 6's remembered settings (the same Memory as the page's)
MEMORY_NAME, MEMORY_PREFIXES = "tr_kept", ("tr_d_", "tr_x_", "tr_g_", "tr_q_")


def memory() -> Memory:
    return Memory(MEMORY_NAME, MEMORY_PREFIXES)


#: the activations a view can show; x̂ first: what a normalizer aims at N(0, 1)
WHICH = ["x_hat", "output", "input"]


def activations(where, prefix: str, default: str) -> str:
    """The radio choosing input, x̂ or output, drawn in ``where`` (a column or ``st``)."""
    return where.radio("Activations", WHICH, key=f"{prefix}_which", help=S.VIEW_HELP, format_func=S.VIEW_LABELS.get,
                       index=memory().index(f"{prefix}_which", WHICH, default))


def step_range(prefix: str, steps: list[int]) -> list[int]:
    """The steps inside a window chosen on a range slider (every step when there is one)."""
    if len(steps) < 2:
        return list(steps)
    ss, key = st.session_state, f"{prefix}_range"
    r = ss.get(key)
    if not (isinstance(r, tuple) and all(x in steps for x in r)):
        ss.pop(key, None)  # a range slider takes its default as a tuple value
    r = memory().get(key, None)
    r = r if isinstance(r, tuple) and all(x in steps for x in r) else (steps[0], steps[-1])
    lo, hi = st.select_slider("Steps shown", options=steps, value=r, key=key,
                              help="The window of training steps (snapshots) to draw")
    return [s for s in steps if lo <= s <= hi]


def pool_checkbox(where, prefix: str, names: list[str], layer: str) -> bool:
    """Average each channel over positions: on by default (the features every run has, recorded or not, and
    several times cheaper: a cold cluster-quality view of 6 runs x 7 snapshots of conv1 at 1,000 images takes
    11 s pooled, 51 s on every position); forced on where a run is recorded (it keeps channel means only)."""
    every_pos = T.all_rebuildable(names)
    return where.checkbox("Average over positions", value=memory().get(f"{prefix}_pool", True) or not every_pos,
                          key=f"{prefix}_pool", disabled=not every_pos,
                          help="Each channel's spatial mean (C features; the default, what recorded runs keep) or, "
                               "unticked, every activation (needs the model)") or not every_pos


def grid_settings(names: list[str], layer: str, seed: int):
    """The embedding grid's settings and its draw button -> (:class:`T.GridParams`, pooled)."""
    kept, index_of = memory().get, memory().index
    with st.container(border=True):
        c1, c2, c3 = st.columns(3)
        size = c1.slider("Test images", 100, 5000, kept("tr_g_size", 1000), step=100, key="tr_g_size",
                         help="A fixed random sample (sidebar seed), the same in every cell")
        which = activations(c2, "tr_g", "output")
        pool = pool_checkbox(c3, "tr_g", names, layer)
        c4, c5 = st.columns(2)
        method = c4.radio("Projection", ["pca", "tsne", "umap"], horizontal=True, key="tr_g_method",
                          index=index_of("tr_g_method", ["pca", "tsne", "umap"], "pca"),
                          format_func=lambda m: {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[m],
                          help="PCA fitted on each row's last snapshot; t-SNE / UMAP: the first snapshot of a row "
                               "from scratch, each next one started from the previous layout and rotated onto it")
        columns = c5.slider("Snapshots per run (columns)", 2, 17, kept("tr_g_columns", 4), key="tr_g_columns",
                            help="At evenly spaced fractions of each run's training (nearest snapshot)")
        t1, t2, t3 = st.columns(3)
        perplexity = t1.slider("t-SNE perplexity", 2, 100, kept("tr_g_perplexity", 30), key="tr_g_perplexity")
        neighbors = t2.slider("UMAP neighbours", 5, 50, kept("tr_g_neighbors", 15), key="tr_g_neighbors")
        min_dist = t3.slider("UMAP min_dist", 0.0, 0.99, kept("tr_g_min_dist", 0.1), step=0.01, key="tr_g_min_dist")
        st.button("Draw the grid", icon=":material/grid_view:", key="tr_g_draw", on_click=S.set_flag,
                  args=("tr_g_submitted",), help="PCA redraws by itself; t-SNE and UMAP wait for this button")
    runs = T.runs_of(names)
    params = T.GridParams(runs=tuple(str(r.path) for r in runs), layer=layer, size=int(size), seed=seed,
                          which=which, pool=bool(pool), method=method, columns=int(columns),
                          perplexity=float(perplexity), n_neighbors=int(neighbors), min_dist=float(min_dist))
    return params, pool


def drawn(params) -> None:
    """Stop the page until the grid's settings were submitted (PCA draws at once)."""
    ss = st.session_state
    if ss.pop("tr_g_submitted", False) or params.method == "pca":
        ss["tr_g_shown"] = params
    if ss.get("tr_g_shown") != params:
        st.info("Set the projection and press **Draw the grid** (t-SNE / UMAP take a while on many snapshots).")
        st.stop()


def colouring(colours: dict) -> str:
    """The grid's colouring: the remembered one while this grid offers it, else the first."""
    last = memory().get("tr_g_colour", None)
    ensure("tr_g_colour", colours, last if last in colours else next(iter(colours)))
    return st.radio("Colour by", list(colours), horizontal=True, key="tr_g_colour",
                    help="Class, superclass (context), the layer's mixture component (argmax posterior) or the "
                         "model's prediction at that step; rows without a colouring are grey")


def metric_picker(metrics: list[str]) -> tuple[list[str], dict]:
    """The cluster-quality metrics to draw (all again when the available ones change) -> (chosen, labels)."""
    ss = st.session_state
    labels = {m: T.QUALITY_METRICS[m][0] for m in metrics}
    if ss.get("tr_q_available") != metrics:  # other runs, other metrics: show every one again
        ss["tr_q_available"] = metrics
        ss["tr_q_metrics"] = metrics
    elif "tr_q_metrics" not in ss:  # back from another view
        ss["tr_q_metrics"] = [m for m in memory().get("tr_q_metrics", metrics) if m in metrics] or metrics
    chosen = st.multiselect("Metrics", metrics, format_func=labels.get, key="tr_q_metrics",
                            help="; ".join(f"{v[0]}: {v[1]}" for v in T.QUALITY_METRICS.values()))
    if not chosen:
        st.info("Choose at least one metric.")
        st.stop()
    return chosen, labels


def table(frame, key: str, file_name: str, numbers: Optional[Callable[[str], bool]] = None) -> None:
    """A table (numbers to 3 decimals in the columns ``numbers`` accepts) and its CSV download."""
    st.dataframe(frame, hide_index=True, key=key,
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in frame.columns
                                if numbers is None or numbers(c)})
    S.download_frame(frame, file_name, key=f"{key}_dl", label="Download the table (CSV)")


def histogram_controls(prefix: str, log_default: bool = False) -> tuple[float, object, bool]:
    c1, c2, c3 = st.columns([3, 3, 2])
    tail = c1.select_slider("Range", options=[0.0, 0.001, 0.005, 0.01, 0.02], value=memory().get(f"{prefix}_tail", 0.005),
                            key=f"{prefix}_tail",
                            format_func=lambda t: "every value" if t == 0 else f"robust: {t:.1%} cut each end",
                            help="The x range: from the lowest to the highest quantile over the samples shown, so a "
                                 "few outliers do not flatten the plot. Values outside are still counted (legend, "
                                 "hover, panel titles) and stay in each density's total.")
    bins = c2.select_slider("Bins", options=["auto", 20, 40, 60, 100, 150, 200], value=memory().get(f"{prefix}_bins", "auto"),
                            key=f"{prefix}_bins",
                            help="auto: the bin width numpy's rule gives the values shown (pooled; the smaller "
                                 "of Sturges' and Freedman-Diaconis' widths); or a fixed number over the range")
    log_y = c3.checkbox("log y", value=memory().get(f"{prefix}_logy", log_default), key=f"{prefix}_logy", help="Logarithmic density axis (tails)")
    return tail, bins, log_y


def channel_controls(prefix: str, n_channels: int) -> tuple[int, ...]:
    c1, c2 = st.columns([2, 5])
    pooled = c1.checkbox("All channels pooled", value=memory().get(f"{prefix}_all", False), key=f"{prefix}_all",
                         help="Pool the values of every channel (the components are then averaged over channels)")
    if pooled:
        return ()
    ensure(f"{prefix}_channels", list(range(n_channels)), [c for c in memory().get(f"{prefix}_channels", [0])
                                                           if c < n_channels] or [0], many=True)
    chans = c2.multiselect("Channels (pooled together)", list(range(n_channels)), max_selections=16,
                           key=f"{prefix}_channels",
                           help="The values of these channels over every image and position, pooled into one histogram")
    if not chans:
        st.info("Choose at least one channel, or pool all of them.")
        st.stop()
    return tuple(int(c) for c in chans)


def pick_runs(minimum: int = 1) -> list[str]:
    names = T.run_names()
    if not names:
        st.warning("No classification runs to show: see the Home page.")
        st.stop()
    ss = st.session_state
    chosen = ss.get("tr_runs")
    chosen = T.default_runs(names, S.selection()["run"]) if chosen is None else [n for n in chosen if n in names]
    ss["tr_runs"] = ss["w_tr_runs"] = chosen
    st.multiselect("Runs", names, key="w_tr_runs", on_change=keep, args=("tr_runs",),
                   help="Runs to compare (the sidebar's run and a BatchNorm run at first)")
    if len(ss["tr_runs"]) < minimum:
        st.info(f"Choose at least {minimum} run{'s' if minimum > 1 else ''}.")
        st.stop()
    return list(ss["tr_runs"])


def pick_layer(runs: list[str]) -> str:
    ss = st.session_state
    try:
        layers = T.shared_layers(T.runs_of(runs))
    except ValueError as err:
        st.warning(str(err), icon=":material/call_split:")
        st.stop()
    if ss.get("tr_layer") not in layers:
        ss["tr_layer"] = layers[0]
    ss["w_tr_layer"] = ss["tr_layer"]
    first = T.runs_of(runs[:1])[0]
    st.selectbox("Layer (shared by every chosen run)", layers, key="w_tr_layer", on_change=keep, args=("tr_layer",),
                 format_func=lambda n: S.layer_label(first, n), help="Module paths every chosen run has")
    return ss["tr_layer"]


def with_snapshots(names: list[str]) -> list[str]:
    """The chosen runs that have snapshots; a warning names the others (left out of this view)."""
    runs = dict(zip(names, T.runs_of(names)))
    missing = [n for n, r in runs.items() if not r.snapshots]
    if missing:
        st.warning(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no snapshots (train with "
                   "--snapshot-every to get them) and " f"{'is' if len(missing) == 1 else 'are'} left out of this view.",
                   icon=":material/history_toggle_off:")
    kept_names = [n for n in names if n not in missing]
    if not kept_names:
        st.stop()
    return kept_names


def progress_bar():
    bar = st.progress(0.0, text="Preparing…")
    return bar, (lambda f, t: bar.progress(min(1.0, max(0.0, f)), text=t))


def chart(fig, key: str, file_name: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
    S.download_figure(fig, file_name, key=f"{key}_dl")
