"""Image generation: DCGAN generators with BN, MN or ACN side by side — samples, scores, class coverage."""
import streamlit as st

from cbnorm.app import generation as G
from cbnorm.app import shared as S
from cbnorm.app import state

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Image generation")
st.caption("DCGANs trained on Fashion-MNIST with BatchNorm, Mixture Normalization or ACN in the generator (the MN "
           "paper's Sec. 4.5 / Fig. 6-7, the PKN paper's Sec. IV-B / Fig. 5-6). Every generator draws the **same "
           "fixed latent vectors**, so the grids differ only by the generator. Scores: the Fréchet distance in the "
           "features of a Fashion-MNIST classifier trained by this project (**FD in classifier features**, not "
           "FID: not comparable with published FIDs), k-NN precision / recall and the classes the classifier finds.")

with S.guard("Image generation"):
    entries = G.gan_runs()
    if not entries:
        st.warning(f"No GAN runs in `{S.runs_root()}`. Train one with `python -m cbnorm.train.gan --out "
                   f"{S.runs_root()}/gan-NAME ...` (or `python bench/gan.py train`) and press **Reload runs**.")
        st.stop()
    by_name = {r["name"]: r for r in entries}
    names = list(by_name)
    ss = st.session_state
    rank = {"bn": 0, "mn": 1, "acn": 2}
    seed0 = sorted((n for n in names if by_name[n]["ok"] and n.endswith("-s0")),
                   key=lambda n: (rank.get(by_name[n]["norm"], 9), n))
    state.prune("gen_runs", names, (seed0 or [n for n in names if by_name[n]["ok"]] or names)[:3])
    chosen = st.multiselect("Runs", names, key="gen_runs", max_selections=6,
                            format_func=lambda n: f"{n} · {by_name[n]['norm']}" if by_name[n]["ok"]
                            else f"{n} · cannot load",
                            help="GAN run directories (task gan): config.json, metrics.json, the generator's weights, "
                                 "its float16 snapshots and the fixed latent vectors")
    runs = []
    for n in chosen:
        if not by_name[n]["ok"]:
            st.error(f"Run **{n}** cannot be loaded: {by_name[n]['error']}", icon=":material/error:")
            continue
        try:
            runs.append(S.run_by_name(n))
        except ValueError as err:
            st.error(f"Run **{n}** cannot be loaded: {err}", icon=":material/error:")
    if not runs:
        st.info("Choose at least one run that loads.")
        st.stop()

    steps = G.common_steps(runs)
    st.subheader("Samples: the same latent vectors through each generator")
    if not steps:
        st.warning("These runs have no snapshots; showing their final weights.")
        step = None
    else:
        step = st.select_slider("Snapshot (generator updates)", options=steps, value=steps[-1], key="gen_step",
                                help="Every run's snapshot at this step (or its last one before it)")
    cols = st.columns(len(runs))
    for col, run in zip(cols, runs):
        with col:
            s = None if step is None else G.nearest_step(run, step)
            try:
                grid = G.sample_grid(str(run.path), S.device(), s)
            except ValueError as err:
                st.error(f"**{run.path.name}**: {err}", icon=":material/broken_image:")
                continue
            e = G.eval_at(run, s if s is not None else 10**12)
            score = "" if e is None else (f" · FD {e['fd']:.2f} · modes {e['modes']}/{len(run.class_names) or '?'}"
                                          f" · recall {e['recall']:.2f}")
            st.image(grid, caption=f"{run.path.name} ({run.norm}) · step {s}{score}", width="stretch")

    if steps and len(steps) > 1:
        with st.expander("Animation over snapshots", expanded=False, icon=":material/play_circle:"):
            st.caption("Play runs every chosen generator's grid through its snapshots, side by side.")
            try:
                st.plotly_chart(G.grid_animation(runs, steps, S.device()), key="gen_anim",
                                config={"displaylogo": False})
            except ValueError as err:
                st.error(str(err))

    st.subheader("Scores during training")
    metric = st.radio("Score", list(G.METRICS), horizontal=True, key="gen_metric",
                      format_func=lambda m: G.METRICS[m][0].split(" (")[0],
                      help="FD in classifier features (lower is better); precision = share of samples inside the "
                           "real data's k-NN balls (quality); recall = share of real images inside the samples' "
                           "balls (coverage); modes and evenness from the classifier's predicted classes")
    fig = G.score_figure(runs, metric, step)
    st.plotly_chart(fig, key="gen_scores", config={"displaylogo": False})
    S.download_figure(fig, f"gan_{metric}.csv", key="gen_scores_dl")
    st.caption(f"Scored at every evaluation on {runs[0].config['evaluation'].get('eval_samples', '?')} samples "
               f"(the same latents for every run, generator in eval mode) against the "
               f"{runs[0].config['evaluation'].get('real', 'test split')} of {runs[0].config['dataset']['name']}.")

    names_cls = runs[0].class_names
    if names_cls and step is not None:
        st.subheader("Which classes the samples fall into")
        st.caption("Share of the scored samples the feature classifier assigns to each class at the evaluation at or "
                   "before the chosen snapshot: a collapsed generator piles into a few bars.")
        st.plotly_chart(G.class_bar_figure(runs, step, names_cls), key="gen_classes", config={"displaylogo": False})

    st.subheader("Summary")
    rows = G.score_table(runs)
    st.dataframe(rows, hide_index=True, key="gen_table",
                 column_config={"best FD": st.column_config.NumberColumn(format="%.2f"),
                                "final FD": st.column_config.NumberColumn(format="%.2f"),
                                "precision": st.column_config.NumberColumn(format="%.3f"),
                                "recall": st.column_config.NumberColumn(format="%.3f"),
                                "evenness": st.column_config.NumberColumn(format="%.3f"),
                                "wall ms / step": st.column_config.NumberColumn(
                                    format="%.1f", help="Median wall time of an update during training: includes "
                                                        "waiting for other jobs on a shared machine (see the "
                                                        "benchmark's CPU time for a comparison)")})
    bench = G.bench_result()
    if bench and bench.get("by_norm"):
        st.markdown("**Benchmark** (`bench/results/gan.json`, all seeds; `python bench/gan.py report`)")
        tgt = bench.get("target") or {}
        st.dataframe(G.bench_rows(bench), hide_index=True, key="gen_bench",
                     column_config={"best FD mean": st.column_config.NumberColumn(format="%.2f"),
                                    "sd": st.column_config.NumberColumn(format="%.2f"),
                                    "steps to BN's best (mean curve)": st.column_config.NumberColumn(
                                        help="First evaluation at which the norm's mean FD curve (over seeds) is "
                                             "at or below BN's best; empty: never within the run"),
                                    "fewer steps than BN (%)": st.column_config.NumberColumn(format="%.0f"),
                                    "CPU ms / step": st.column_config.NumberColumn(
                                        format="%.1f", help="CPU time of one update (D + G), the norms measured "
                                                            "interleaved at 1 thread by bench/gan.py report"),
                                    "vs BN": st.column_config.NumberColumn(format="%.2fx")})
        if bench.get("verdict"):
            st.markdown(f"**Verdict** (from the numbers above): {bench['verdict']}")
        st.caption(f"BN's best on its mean curve: FD {tgt.get('bn_best_fd_mean_curve', float('nan')):.2f} at step "
                   f"{tgt.get('bn_best_step_mean_curve')}. The papers (Inception FID on CIFAR, not comparable in "
                   "value): MN 33.35 vs BN 37.56, MN reaching BN's best in 25k instead of 60k updates (\"~58% "
                   "faster\"); PKN: ACN fastest and lowest FID (curves only).")
    st.caption("The generator's norm layers (norm1, norm2, norm3) can be inspected on the **Activation histograms** "
               "and **Cluster evolution** pages: choose the GAN run in the sidebar; its inputs there are seeded "
               "latent vectors, coloured by the class of their final sample.")
