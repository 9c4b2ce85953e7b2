"""Cluster evolution: a fixed sample's activations at every snapshot, projected to 2-D and aligned."""
import streamlit as st

from cbnorm.app import evolution as E
from cbnorm.app import figures as F
from cbnorm.app import shared as S
from cbnorm.app import source as SRC
from cbnorm.app import state

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Cluster evolution")
st.caption("How the representation at one layer organizes itself during training (as in Fig. 3/11/16 of the "
           "CB-Norm paper): the same test images at every snapshot, projected to 2-D.")

sel = S.selection()
with S.guard("Cluster evolution"):
    run, layer, info = S.selected_layer(sel)
    all_steps = E.evolution_steps(run, layer=layer)
    ss = st.session_state

    live = SRC.live(run)
    if not live:
        st.info(SRC.live_reason(run) + " Recorded steps keep each input's channel means: the projection uses them.")
    with st.form("evo_form"):
        c1, c2, c3 = st.columns(3)
        size = c1.slider("Test images", 100, 5000, 1000, step=100, key="evo_size", disabled=not live,
                         help="Size of the fixed random sample (drawn with the sidebar's seed), the same at every snapshot")
        which = c2.radio("Activations", ["output", "input"], horizontal=True, key="evo_which",
                         help="The layer's output (after normalization and affine) or its input")
        pool = c3.checkbox("Average over positions", value=True, key="evo_pool", disabled=not live,
                           help="Each channel's spatial mean (C features; the default, what every recorded run keeps, "
                                "and several times cheaper) or, unticked, every activation (C × H × W, needs the "
                                "model). With recorded summaries, the channel means come from them (the recorded probe "
                                "batch, whatever the number of test images above).")
        pool = pool or not live
        method = st.radio("Projection", ["pca", "tsne", "umap"], horizontal=True, key="evo_method",
                          format_func=lambda m: {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[m],
                          help="PCA: linear, fitted on the last snapshot and applied to all (axes show % variance "
                               "explained). t-SNE (openTSNE) and UMAP: non-linear; the first snapshot is embedded "
                               "from scratch, each next one starts from the previous layout, so frames stay aligned.")
        t1, t2, t3 = st.columns(3)
        perplexity = t1.slider("t-SNE perplexity", 2, 100, 30, key="evo_perplexity",
                               help="Roughly the number of neighbours each point attends to; low values show local "
                                    "structure, high values global structure (TensorBoard's projector: 2–100)")
        lr = t2.select_slider("t-SNE learning rate", options=["auto", 10, 50, 100, 200, 500, 1000], value="auto",
                              key="evo_lr", help="Step size of the optimisation; auto = N / exaggeration (openTSNE)")
        refine = t3.slider("Iterations per later snapshot", 25, 500, 100, step=25, key="evo_refine",
                           help="t-SNE iterations (UMAP epochs) for each snapshot after the first, started from the "
                                "previous layout (the first snapshot gets a full run: 400 t-SNE iterations, UMAP's "
                                "default epochs). More = each frame closer to its own optimum, slower.")
        u1, u2, u3 = st.columns(3)
        neighbors = u1.slider("UMAP neighbours", 5, 50, 15, key="evo_neighbors",
                              help="Size of the local neighbourhood UMAP preserves: small = local detail, large = "
                                   "global shape")
        min_dist = u2.slider("UMAP min_dist", 0.0, 0.99, 0.1, step=0.01, key="evo_min_dist",
                             help="How tightly UMAP packs points together: small = dense clumps, large = even spread")
        max_snaps = len(all_steps)
        if len(all_steps) > 2:
            max_snaps = u3.slider("Snapshots", 2, len(all_steps), len(all_steps), key="evo_snaps",
                                  help="How many snapshots to project (evenly spread; first and last always included)")
        st.form_submit_button("Run projection", type="primary", icon=":material/play_arrow:", on_click=S.set_flag,
                              args=("evo_submitted",))

    params = E.EvolutionParams(run=str(run.path), layer=layer, size=int(size), seed=sel["seed"], which=which,
                               pool=bool(pool), method=method, perplexity=float(perplexity), learning_rate=lr,
                               n_neighbors=int(neighbors), min_dist=float(min_dist), refine_iters=int(refine),
                               max_snapshots=int(max_snaps))
    shown = ss.get("evo_params")
    if ss.pop("evo_submitted", False):
        shown = params
    elif shown is None or (shown.run, shown.layer) != (params.run, params.layer):
        shown = params if params.method == "pca" else None  # PCA is quick enough to run without asking
    ss["evo_params"] = shown
    if shown is None:
        st.info("Set the projection and press **Run projection**.")
        st.stop()
    if shown != params:
        st.info("The settings above (or the sidebar's seed) differ from the projection shown; press "
                "**Run projection** to recompute.")

    bar = st.progress(0.0, text="Preparing…")
    ev = E.evolution(shown, progress=lambda f, t: bar.progress(min(1.0, max(0.0, f)), text=t))
    bar.empty()

    n = len(ev["indices"])
    if n < ev["total"]:
        st.info(f"Subsampled: {n:,} of the {ev['total']:,} test images (random, seed {shown.seed}), the same "
                f"images at each of the {len(ev['steps'])} snapshots.", icon=":material/filter_alt:")
    details = {"pca": "PCA fitted on the last snapshot", "tsne": f"t-SNE, perplexity {ev['info'].get('perplexity', '')}",
               "umap": f"UMAP, {ev['info'].get('n_neighbors', '')} neighbours"}[ev["method"]]
    st.caption(f"Run **{run.path.name}** · layer `{shown.layer}` ({info['class']}) · {shown.which} "
               f"({ev['feature_dim']:,} features per image{', channel means' if shown.pool else ''}) · {details} · "
               f"{n:,} {'test images' if live else 'recorded probe inputs'} at each of {len(ev['steps'])} steps")

    colours = E.colourings(run, ev, info)
    state.ensure("evo_colour", colours, next(iter(colours)))
    colour = st.radio("Colour by", list(colours), horizontal=True, key="evo_colour",
                      help="Class label, superclass (the contexts of context layers), the model's prediction at "
                           "that snapshot, or the layer's mixture component (argmax of its posteriors)")
    groups, group_names = colours[colour]
    state.ensure("evo_step", ev["steps"], ev["steps"][-1])
    step = st.select_slider("Snapshot (training step)", options=ev["steps"], key="evo_step",
                            help="Training step of the snapshot; step 0 is the initialization")
    i = ev["steps"].index(step)
    hover = E.hover_text(run, ev)
    fig = F.embedding_figure(ev["coords"][i], groups[i], group_names, xlim=ev["xlim"], ylim=ev["ylim"],
                             method=ev["method"], info=ev["info"], legend_title=colour, hover=hover,
                             title=f"step {step}")
    st.plotly_chart(fig, key="evo_chart", config={"displaylogo": False})
    S.download_frame(E.evolution_frame(run, ev, colours), f"{run.path.name}_{shown.layer}_{ev['method']}_evolution.csv",
                     key="evo_dl", label="Download every snapshot's projection (CSV)")

    st.subheader("Animation over training")
    st.caption("Press play; the axes stay fixed across snapshots so movement is real movement.")
    anim = F.embedding_animation(ev["coords"], groups, group_names, ev["steps"], xlim=ev["xlim"], ylim=ev["ylim"],
                                 method=ev["method"], info=ev["info"], legend_title=colour, hover=hover)
    st.plotly_chart(anim, key="evo_anim", config={"displaylogo": False})
    S.download_figure(anim, f"{run.path.name}_{shown.layer}_{ev['method']}_animation.csv", key="evo_anim_dl")
