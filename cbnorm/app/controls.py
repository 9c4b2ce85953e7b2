"""Widget groups that several views draw alike (page 6, "Across runs and training"): histogram range and
bins, channels, the runs and the shared layer, the runs that have snapshots. Each remembers its settings in the
page's :class:`cbnorm.app.state.Memory` and stops the page with a message where nothing can be shown."""
from __future__ import annotations

import streamlit as st

from . import shared as S
from . import training as T
from .state import Memory, ensure, keep

#: page 6's remembered settings (the same Memory as the page's)
MEMORY_NAME, MEMORY_PREFIXES = "tr_kept", ("tr_d_", "tr_x_", "tr_g_", "tr_q_")


def memory() -> Memory:
    return Memory(MEMORY_NAME, MEMORY_PREFIXES)


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
