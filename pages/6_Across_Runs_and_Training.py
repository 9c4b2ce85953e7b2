"""Across runs and training: distributions over snapshots, one histogram across runs, an embedding grid
(runs x snapshots) and cluster quality over training."""
import streamlit as st

from cbnorm.app import captions as W
from cbnorm.app import controls as C
from cbnorm.app import figures_training as FT
from cbnorm.app import shared as S
from cbnorm.app import state
from cbnorm.app import training as T

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Across runs and training")
st.caption("The comparisons the papers draw by hand: a layer's distribution at every snapshot with its mixture "
           "components (MN paper Fig. 8), the same histogram of several runs, the same images embedded for "
           "several runs at several steps (CB-Norm paper Fig. 3) and how well clusters form, as numbers.")

VIEWS = {"dist": "Distributions over training", "runs": "Same histogram across runs", "grid": "Embedding grid",
         "quality": "Cluster quality over training"}
ss = st.session_state
sel = S.selection()
if ss.get("tr_view") not in VIEWS:
    ss["tr_view"] = st.query_params.get("view") if st.query_params.get("view") in VIEWS else "dist"
view = st.radio("View", list(VIEWS), format_func=VIEWS.get, horizontal=True, key="tr_view",
                help="One view at a time: each runs its own models and caches what it computed")
#: every view's settings, kept while another view is shown (Streamlit forgets a widget that is not drawn)
MEMORY = C.memory()
kept = MEMORY.get
SIZES = [64, 128, 256, 512, 1024]


def distributions_view() -> None:
    run, layer, info = S.selected_layer(sel)
    steps = T.snapshot_steps(run, layer)
    recorded = T.all_recorded([sel["run"]], layer)
    st.caption(W.distributions_source(run.path.name, run.norm, layer, info["class"], len(steps), recorded, sel["seed"]))
    c1, c2, c3 = st.columns([2, 3, 3])
    which = C.activations(c1, "tr_d", "input")
    size = c2.select_slider("Test images", options=SIZES, value=kept("tr_d_size", 256), key="tr_d_size",
                            disabled=recorded, help="Drawn with the sidebar's seed; the same images at every snapshot "
                                                    "(a recorded layer is shown on its recorded probe batch)")
    k = c3.slider("K: fitted components", 1, 6, kept("tr_d_k", 3), key="tr_d_k",
                  help="Components of the GMM fitted where the layer has no mixture of its own (BN, LN, GN inputs, "
                       "every output)")
    chans = C.channel_controls("tr_d", info["num_features"])
    shown = C.step_range("tr_d", steps)
    tail, bins, log_y = C.histogram_controls("tr_d")
    comps = st.checkbox("Draw each step's mixture components on the ridge", value=kept("tr_d_comps", True),
                        key="tr_d_comps")
    bar, say = C.progress_bar()
    dist = T.distributions(sel["run"], layer, which, chans, k, size, sel["seed"], shown, progress=say)
    bar.empty()
    figs = T.distribution_figures(sel["run"], layer, which, chans, k, size, sel["seed"], tuple(shown), tail, bins,
                                  log_y, comps)
    st.caption(W.distributions_caption(layer, which, chans, dist["panels"][0], figs["bins"]))
    base = f"{run.path.name}_{layer}_{which}"
    tabs = st.tabs(["Ridge (offset)", "Per-step histograms with components", "Overlay", "Percentiles over steps"])
    with tabs[0]:
        C.chart(figs["ridge"], "tr_d_ridge", f"{base}_ridge.csv")
        st.caption(W.RIDGE_NOTE)
    with tabs[1]:
        C.chart(figs["multiples"], "tr_d_multiples", f"{base}_per_step.csv")
        st.caption(W.MULTIPLES_NOTE)
    with tabs[2]:
        C.chart(figs["overlay"], "tr_d_overlay", f"{base}_overlay.csv")
    with tabs[3]:
        C.chart(figs["percentiles"], "tr_d_pct", f"{base}_percentiles.csv")
        st.caption(W.PERCENTILES_NOTE)
        C.table(T.percentile_frame(dist), "tr_d_table", f"{base}_percentiles_table.csv", lambda c: c != "step")


def runs_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    runs = T.runs_of(names)
    width = min(S.layer_info(r, layer)["num_features"] for r in runs)
    steps = T.common_steps(runs)
    c1, c2, c3 = st.columns([2, 3, 3])
    which = C.activations(c1, "tr_x", "x_hat")
    state.ensure("tr_x_step", [T.FINAL] + steps, kept("tr_x_step", T.FINAL) if kept("tr_x_step", T.FINAL) in steps
             else T.FINAL)
    step = c2.selectbox("Weights", [T.FINAL] + steps, key="tr_x_step", format_func=T.step_label,
                        help="Each run's final weights, or a snapshot step every chosen run has")
    size = c3.select_slider("Test images", options=SIZES, value=kept("tr_x_size", 256), key="tr_x_size",
                            help="The same images (sidebar seed) for every run")
    chans = C.channel_controls("tr_x", width)
    c4, c5 = st.columns([3, 2])
    state.ensure("tr_x_ref", names, kept("tr_x_ref", names[0]) if kept("tr_x_ref", names[0]) in names else names[0])
    reference = c4.selectbox("Reference run (differences)", names, key="tr_x_ref",
                             help="The statistics table gives every run's difference to this run")
    normal = c5.checkbox("N(0, 1) for reference", value=kept("tr_x_normal", True), key="tr_x_normal",
                         disabled=which != "x_hat", help="Drawn with x̂ only: the output after the affine and the input "
                                                         "are not aimed at N(0, 1)")
    tail, bins, log_y = C.histogram_controls("tr_x")
    if len(names) < 2:
        st.info("Choose two or more runs to compare them.")
    if not steps:
        st.caption("The chosen runs share no snapshot step; only their final weights can be compared.")
    bar, say = C.progress_bar()
    res = T.across_runs(names, layer, which, chans, step, size, sel["seed"], progress=say)
    bar.empty()
    figs = T.across_figures(tuple(names), layer, which, chans, step, size, sel["seed"], tail, bins, log_y, normal)
    st.caption(W.across_caption(layer, which, chans, T.step_label(step), size, sel["seed"], figs["bins"]))
    base = f"{layer}_{which}_{T.step_label(step).replace(' ', '')}"
    C.chart(figs["overlay"], "tr_x_overlay", f"{base}_overlay.csv")
    C.chart(figs["multiples"], "tr_x_multiples", f"{base}_multiples.csv")
    st.subheader("Shape side by side")
    table = T.across_stats(res, reference, figs["bins"])
    st.caption(W.across_stats_note(which, reference))
    C.table(table, "tr_x_stats", f"{base}_stats.csv", lambda c: c not in ("run", "norm", "values", "outside range"))


def grid_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    names = C.with_snapshots(names)
    params, pool = C.grid_settings(names, layer, sel["seed"])
    C.drawn(params)
    bar, say = C.progress_bar()
    grid = T.embedding_grid(params, progress=say)
    bar.empty()
    colours = T.grid_colourings(grid)
    colour = C.colouring(colours)
    st.caption(W.grid_caption(grid, params, pool))
    st.plotly_chart(T.grid_figure(params.key(), colour), key="tr_g_chart", config={"displaylogo": False})
    S.download_frame(T.grid_frame(grid, colours), f"{layer}_{grid['method']}_grid.csv", key="tr_g_dl",
                     label="Download every cell's coordinates (CSV)")


def quality_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    names = C.with_snapshots(names)
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
    seeds = c1.checkbox("Add the other seeds of each run's recipe", value=kept("tr_q_seeds", True), key="tr_q_seeds",
                        help="Runs that differ only in the seed (the Compare page's groups): their mean ± sd band")
    size = c2.select_slider("Test images", options=[200, 500, 1000, 2000], value=kept("tr_q_size", 1000),
                            key="tr_q_size", help="The same images (sidebar seed) at every snapshot of every run")
    which = C.activations(c3, "tr_q", "output")
    k = c4.select_slider("k (neighbours)", options=[1, 3, 5, 10, 20], value=kept("tr_q_k", 5), key="tr_q_k")
    pool = C.pool_checkbox(st, "tr_q", names, layer)
    bar, say = C.progress_bar()
    q = T.quality_over_training(T.with_seeds(names) if seeds else names, layer, size, sel["seed"], which, pool, k,
                                progress=say)
    bar.empty()
    chosen, labels = C.metric_picker(T.available_metrics(q))
    st.caption(W.quality_caption(q, layer, which, pool, k))
    bands = {m: T.group_bands(q, m) for m in chosen}
    C.chart(FT.quality_figure(q, chosen, labels, bands), "tr_q_chart", f"{layer}_cluster_quality_plot.csv")
    table = T.quality_table(q)
    st.dataframe(table, hide_index=True, key="tr_q_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if "·" in c})
    st.caption(W.QUALITY_NOTE)
    S.download_frame(T.quality_frame(q), f"{layer}_cluster_quality.csv", key="tr_q_dl",
                     label="Download every snapshot's numbers (CSV)")


with S.guard(VIEWS[view]):
    {"dist": distributions_view, "runs": runs_view, "grid": grid_view, "quality": quality_view}[view]()
