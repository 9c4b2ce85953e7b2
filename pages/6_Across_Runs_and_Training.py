"""Across runs and training: distributions over snapshots, one histogram across runs, an embedding grid
(runs x snapshots) and cluster quality over training."""
import streamlit as st

from cbnorm.app import controls as C
from cbnorm.app import figures_training as FT
from cbnorm.app import shared as S
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
WHICH_HELP = S.VIEW_HELP
WHICH = ["x_hat", "output", "input"]  # x̂ first: what a normalizer aims at N(0, 1)
#: every view's settings, kept while another view is shown (Streamlit forgets a widget that is not drawn)
MEMORY = C.memory()
kept, index_of = MEMORY.get, MEMORY.index
ensure = C.ensure


# ============================================================================ 1
def distributions_view() -> None:
    run, layer, info = S.selected_layer(sel)
    steps = T.snapshot_steps(run, layer)
    recorded = T.all_recorded([sel["run"]], layer)
    where = (f"the recorded probe batch at each of its {len(steps)} recorded steps" if recorded else
             f"the same test images (seed {sel['seed']}) at each of its {len(steps)} snapshots")
    st.caption(f"Run **{run.path.name}** ({run.norm}) and layer `{layer}` ({info['class']}) from the sidebar; "
               f"{where}.")
    c1, c2, c3 = st.columns([2, 3, 3])
    which = c1.radio("Activations", WHICH, key="tr_d_which", help=WHICH_HELP, format_func=S.VIEW_LABELS.get,
                     index=index_of("tr_d_which", WHICH, "input"))
    size = c2.select_slider("Test images", options=[64, 128, 256, 512, 1024], value=kept("tr_d_size", 256),
                            key="tr_d_size", disabled=recorded,
                            help="Drawn with the sidebar's seed; the same images at every snapshot (a recorded "
                                 "layer is shown on its recorded probe batch)")
    k = c3.slider("K: fitted components", 1, 6, kept("tr_d_k", 3), key="tr_d_k",
                  help="Components of the GMM fitted where the layer has no mixture of its own (BN, LN, GN inputs, "
                       "every output)")
    chans = C.channel_controls("tr_d", info["num_features"])
    lo, hi = steps[0], steps[-1]
    if len(steps) > 1:
        r = ss.get("tr_d_range")
        if not (isinstance(r, tuple) and all(x in steps for x in r)):
            ss.pop("tr_d_range", None)  # a range slider takes its default as a tuple value
        r = kept("tr_d_range", None)
        r = r if isinstance(r, tuple) and all(x in steps for x in r) else (steps[0], steps[-1])
        lo, hi = st.select_slider("Steps shown", options=steps, value=r, key="tr_d_range",
                                  help="The window of training steps (snapshots) to draw")
    shown = [s for s in steps if lo <= s <= hi]
    tail, bins, log_y = C.histogram_controls("tr_d")
    comps = st.checkbox("Draw each step's mixture components on the ridge", value=kept("tr_d_comps", True),
                        key="tr_d_comps")
    bar, say = C.progress_bar()
    dist = T.distributions(sel["run"], layer, which, chans, k, size, sel["seed"], shown, progress=say)
    bar.empty()
    figs = T.distribution_figures(sel["run"], layer, which, chans, k, size, sel["seed"], tuple(shown), tail, bins,
                                  log_y, comps)
    b = figs["bins"]
    p0 = dist["panels"][0]
    where = "all channels" if not chans else f"channel{'s' if len(chans) > 1 else ''} {', '.join(map(str, chans))}"
    st.caption(f"{S.VIEW_LABELS[which]} of `{layer}`, {where} · {p0['n_values']:,} values per step"
               + (f" (subsampled to {S.MAX_VALUES:,})" if p0["subsampled"] else "")
               + f" · components: {p0['source']} · {len(b['edges']) - 1} bins on [{b['lo']:.3g}, {b['hi']:.3g}]"
               + (f" · {sum(b['below']) + sum(b['above']):,} values outside the range over all steps"
                  if sum(b["below"]) + sum(b["above"]) else ""))
    base = f"{run.path.name}_{layer}_{which}"
    tabs = st.tabs(["Ridge (offset)", "Per-step histograms with components", "Overlay", "Percentiles over steps"])
    with tabs[0]:
        C.chart(figs["ridge"], "tr_d_ridge", f"{base}_ridge.csv")
        st.caption("One histogram per snapshot, the first at the top (TensorBoard's offset mode); the step's "
                   "components dashed, their sum solid. log y does not apply here.")
    with tabs[1]:
        C.chart(figs["multiples"], "tr_d_multiples", f"{base}_per_step.csv")
        st.caption("As Fig. 8 of the MN paper, at every snapshot: the histogram, each component's weighted density "
                   "dashed and the mixture solid; every panel on the same bins.")
    with tabs[2]:
        C.chart(figs["overlay"], "tr_d_overlay", f"{base}_overlay.csv")
    with tabs[3]:
        C.chart(figs["percentiles"], "tr_d_pct", f"{base}_percentiles.csv")
        st.caption("TensorBoard's distributions: bands from min to max and at 7/93, 16/84, 31/69 % (±1.5, ±1, ±0.5 sd "
                   "of a normal), the median as a line.")
        table = T.percentile_frame(dist)
        st.dataframe(table, hide_index=True, key="tr_d_table",
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if c != "step"})
        S.download_frame(table, f"{base}_percentiles_table.csv", key="tr_d_table_dl", label="Download the table (CSV)")


# ============================================================================ 2
def runs_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    runs = T.runs_of(names)
    width = min(S.layer_info(r, layer)["num_features"] for r in runs)
    steps = T.common_steps(runs)
    c1, c2, c3 = st.columns([2, 3, 3])
    which = c1.radio("Activations", WHICH, key="tr_x_which", help=WHICH_HELP, format_func=S.VIEW_LABELS.get,
                     index=index_of("tr_x_which", WHICH, "x_hat"))
    ensure("tr_x_step", [T.FINAL] + steps, kept("tr_x_step", T.FINAL) if kept("tr_x_step", T.FINAL) in steps
           else T.FINAL)
    step = c2.selectbox("Weights", [T.FINAL] + steps, key="tr_x_step", format_func=T.step_label,
                        help="Each run's final weights, or a snapshot step every chosen run has")
    size = c3.select_slider("Test images", options=[64, 128, 256, 512, 1024], value=kept("tr_x_size", 256),
                            key="tr_x_size",
                            help="The same images (sidebar seed) for every run")
    chans = C.channel_controls("tr_x", width)
    c4, c5 = st.columns([3, 2])
    ensure("tr_x_ref", names, kept("tr_x_ref", names[0]) if kept("tr_x_ref", names[0]) in names else names[0])
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
    b = figs["bins"]
    where = "all channels" if not chans else f"channel{'s' if len(chans) > 1 else ''} {', '.join(map(str, chans))}"
    st.caption(f"{S.VIEW_LABELS[which]} of `{layer}`, {where}, {T.step_label(step)} · {size} test images (seed "
               f"{sel['seed']}) · {len(b['edges']) - 1} bins on [{b['lo']:.3g}, {b['hi']:.3g}]")
    base = f"{layer}_{which}_{T.step_label(step).replace(' ', '')}"
    C.chart(figs["overlay"], "tr_x_overlay", f"{base}_overlay.csv")
    C.chart(figs["multiples"], "tr_x_multiples", f"{base}_multiples.csv")
    st.subheader("Shape side by side")
    table = T.across_stats(res, reference, b)
    st.dataframe(table, hide_index=True, key="tr_x_stats",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns
                                if c not in ("run", "norm", "values", "outside range")})
    st.caption("Skewness and excess kurtosis are 0 for a Gaussian. "
               + {"x_hat": "KS (Kolmogorov-Smirnov) and W1 (1-Wasserstein) are distances of x̂ to N(0, 1). ",
                  "input": "KS and W1 are distances to N(0, 1) of the input standardized per channel (the shape "
                           "alone). ",
                  "output": "The output after the affine gets no distance to N(0, 1): γ and β move it on purpose. "
                  }[which]
               + f"Δ: the run's value minus {reference}'s. Outside range: values beyond the plotted range (still in "
               "the statistics).")
    S.download_frame(table, f"{base}_stats.csv", key="tr_x_stats_dl", label="Download the table (CSV)")


# ============================================================================ 3
def grid_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    names = C.with_snapshots(names)
    with st.container(border=True):
        c1, c2, c3 = st.columns(3)
        size = c1.slider("Test images", 100, 5000, kept("tr_g_size", 1000), step=100, key="tr_g_size",
                         help="A fixed random sample (sidebar seed), the same in every cell")
        which = c2.radio("Activations", WHICH, key="tr_g_which", help=WHICH_HELP, format_func=S.VIEW_LABELS.get,
                         index=index_of("tr_g_which", WHICH, "output"))
        every_pos = T.all_rebuildable(names)  # recorded runs keep channel means only
        pool = c3.checkbox("Average over positions", value=kept("tr_g_pool", T.all_recorded(names, layer))
                           or not every_pos,
                           key="tr_g_pool", disabled=not every_pos,
                           help="Each channel's spatial mean (C features) instead of every activation") or not every_pos
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
    params = T.GridParams(runs=tuple(str(r.path) for r in runs), layer=layer, size=int(size), seed=sel["seed"],
                          which=which, pool=bool(pool), method=method, columns=int(columns),
                          perplexity=float(perplexity), n_neighbors=int(neighbors), min_dist=float(min_dist))
    if ss.pop("tr_g_submitted", False) or method == "pca":
        ss["tr_g_shown"] = params
    if ss.get("tr_g_shown") != params:
        st.info("Set the projection and press **Draw the grid** (t-SNE / UMAP take a while on many snapshots).")
        st.stop()
    bar, say = C.progress_bar()
    grid = T.embedding_grid(params, progress=say)
    bar.empty()
    n = len(grid["indices"])
    colours = T.grid_colourings(grid)
    if ss.get("tr_g_colour") not in colours:
        ss["tr_g_colour"] = kept("tr_g_colour", None) if kept("tr_g_colour", None) in colours else next(iter(colours))
    colour = st.radio("Colour by", list(colours), horizontal=True, key="tr_g_colour",
                      help="Class, superclass (context), the layer's mixture component (argmax posterior) or the "
                           "model's prediction at that step; rows without a colouring are grey")
    groups, group_names = colours[colour]
    method_text = {"pca": "PCA fitted on each row's last snapshot", "tsne": f"t-SNE, perplexity {params.perplexity:g}",
                   "umap": f"UMAP, {params.n_neighbors} neighbours"}[grid["method"]]
    st.caption(f"{n:,} of {grid['total']:,} test images (seed {params.seed}), the same in every cell · `{layer}` "
               f"{which}{' (channel means)' if pool else ''} · {method_text} · axes shared along each row"
               + (" (early snapshots that vary little along the last one's principal axes sit small in their cell)"
                  if grid["method"] == "pca" else ""))
    st.plotly_chart(T.grid_figure(params.key(), colour), key="tr_g_chart", config={"displaylogo": False})
    S.download_frame(T.grid_frame(grid, colours), f"{layer}_{grid['method']}_grid.csv", key="tr_g_dl",
                     label="Download every cell's coordinates (CSV)")


# ============================================================================ 4
def quality_view() -> None:
    names = C.pick_runs(1)
    layer = C.pick_layer(names)
    names = C.with_snapshots(names)
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
    seeds = c1.checkbox("Add the other seeds of each run's recipe", value=kept("tr_q_seeds", True), key="tr_q_seeds",
                        help="Runs that differ only in the seed (the Compare page's groups): their mean ± sd band")
    size = c2.select_slider("Test images", options=[200, 500, 1000, 2000], value=kept("tr_q_size", 1000),
                            key="tr_q_size",
                            help="The same images (sidebar seed) at every snapshot of every run")
    which = c3.radio("Activations", WHICH, key="tr_q_which", help=WHICH_HELP, format_func=S.VIEW_LABELS.get,
                     index=index_of("tr_q_which", WHICH, "output"))
    k = c4.select_slider("k (neighbours)", options=[1, 3, 5, 10, 20], value=kept("tr_q_k", 5), key="tr_q_k")
    every_pos = T.all_rebuildable(names)  # recorded runs keep channel means only
    pool = st.checkbox("Average over positions", value=kept("tr_q_pool", T.all_recorded(names, layer)) or not every_pos,
                       key="tr_q_pool",
                       disabled=not every_pos,
                       help="Each channel's spatial mean (C features) instead of every activation") or not every_pos
    shown = T.with_seeds(names) if seeds else names
    bar, say = C.progress_bar()
    q = T.quality_over_training(shown, layer, size, sel["seed"], which, pool, k, progress=say)
    bar.empty()
    metrics = T.available_metrics(q)
    labels = {m: T.QUALITY_METRICS[m][0] for m in metrics}
    if ss.get("tr_q_available") != metrics:  # other runs, other metrics: show every one again
        ss["tr_q_available"] = metrics
        ss["tr_q_metrics"] = metrics
    elif "tr_q_metrics" not in ss:  # back from another view
        ss["tr_q_metrics"] = [m for m in kept("tr_q_metrics", metrics) if m in metrics] or metrics
    chosen = st.multiselect("Metrics", metrics, format_func=labels.get, key="tr_q_metrics",
                            help="; ".join(f"{v[0]}: {v[1]}" for v in T.QUALITY_METRICS.values()))
    if not chosen:
        st.info("Choose at least one metric.")
        st.stop()
    st.caption(f"`{layer}` {which}{' (channel means)' if pool else ''} of {q['runs'][0]['n']:,} test images at every "
               f"snapshot, in the layer's own feature space (not the 2-D picture) · k-NN: half the images held out "
               f"(seeded), k = {k}" + ("" if any(r["has_components"] for r in q["runs"]) else
                                       " · no chosen layer has mixture components (no NMI / ARI)"))
    bands = {m: T.group_bands(q, m) for m in chosen}
    C.chart(FT.quality_figure(q, chosen, labels, bands), "tr_q_chart", f"{layer}_cluster_quality_plot.csv")
    table = T.quality_table(q)
    st.dataframe(table, hide_index=True, key="tr_q_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if "·" in c})
    st.caption("Components used: how many distinct mixture components the images fall in (argmax of the layer's "
               "posteriors averaged over each image's positions); with one, NMI and ARI are 0. "
               "Groups of several seeds: the band is ±1 sd over the seeds on the steps they all have (the mean line "
               "carries the same as error bars); where they share fewer than 3 steps (extra seeds keep their first and "
               "last snapshot only), the mean ± sd is drawn as diamonds with error bars at those steps. A normalizer forms clusters faster than another when its curve "
               "rises earlier by more than the bands' width.")
    S.download_frame(T.quality_frame(q), f"{layer}_cluster_quality.csv", key="tr_q_dl",
                     label="Download every snapshot's numbers (CSV)")


with S.guard(VIEWS[view]):
    {"dist": distributions_view, "runs": runs_view, "grid": grid_view, "quality": quality_view}[view]()
