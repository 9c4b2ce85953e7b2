"""Compare normalizers: curves, a table with the MN paper's speed-up measure, a live panel, benchmarks."""
import streamlit as st

from cbnorm.app import compare as C
from cbnorm.app import figures as F
from cbnorm.app import shared as S

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Compare normalizers")
st.caption("Chosen runs side by side: how fast and how far they learn, what they cost, and what their studied "
           "layers output on the same images.")

sel = S.selection()
ss = st.session_state
with S.guard("Compare normalizers"):
    runs = [r for r in S.classify_runs() if r["ok"]]
    names = [r["name"] for r in runs]
    if not names:
        st.warning("No run to compare: see the Home page.")
        st.stop()
    if "cmp_runs" not in ss:
        ss["cmp_runs"] = names[:9]
    ss["cmp_runs"] = [n for n in ss["cmp_runs"] if n in names]
    chosen = st.multiselect("Runs", names, key="cmp_runs", help="Runs to compare (one colour each)")
    if not chosen:
        st.info("Choose at least one run.")
        st.stop()

    st.subheader("Learning curves")
    c1, c2 = st.columns([2, 3])
    x_axis = c1.radio("x axis", ["step", "epoch"], horizontal=True, key="cmp_x",
                      format_func=lambda a: {"step": "optimizer steps", "epoch": "epochs"}[a])
    window = c2.slider("Training-loss moving average (steps)", 1, 200, 25, key="cmp_smooth",
                       help="Window of the trailing moving average drawn over the noisy per-step training loss")
    x_title = {"step": "optimizer step", "epoch": "epoch"}[x_axis]
    left, right = st.container(), st.container()
    with left:
        fig_err = F.curves_figure(C.error_series(chosen, x_axis), x_title=x_title, y_title="test error (1 − accuracy)",
                                  title="Test error (honest: inferred context)")
        st.plotly_chart(fig_err, key="cmp_err_chart", config={"displaylogo": False})
        S.download_figure(fig_err, "test_error.csv", key="cmp_err_dl")
    with right:
        fig_loss = F.curves_figure(C.loss_series(chosen, x_axis, window), x_title=x_title, y_title="cross-entropy loss",
                                   title="Loss (training, moving average: solid; test at epoch ends: dotted)" if x_axis == "step"
                                   else "Test loss")
        st.plotly_chart(fig_loss, key="cmp_loss_chart", config={"displaylogo": False})
        S.download_figure(fig_loss, "loss.csv", key="cmp_loss_dl")

    st.subheader("Summary")
    bn_runs = [r["name"] for r in runs if r["norm"] == "bn"]
    reference = None
    if bn_runs:
        reference = st.selectbox("BatchNorm reference", bn_runs, key="cmp_ref",
                                 help="Whose best test accuracy defines the target of 'steps to reach BN best'")
    else:
        st.info("No BatchNorm run is loaded, so 'steps to reach BN best' cannot be computed.")
    table, target = C.compare_table(chosen, reference)
    formats = {"test acc": "percent", "oracle acc": "percent", "best acc": "percent", "s / step": "%.3f",
               "params": "%d", "steps to BN best": "%d", "steps": "%d"}
    st.dataframe(table, hide_index=True, key="cmp_table", column_config={
        c: st.column_config.NumberColumn(format=f, help=C.COMPARE_HELP.get(c)) for c, f in formats.items()})
    if target is not None:
        st.caption(f"**Steps to reach BN best**: the first evaluated step at which a run's test accuracy reaches "
                   f"{reference}'s best ({target:.2%}) — the MN paper's measure of faster training; None = never reached. Accuracy is evaluated at the end of each epoch, so steps are multiples of an epoch. "
                   "Test accuracy is honest (context inferred from the image); the oracle column feeds the true "
                   "superclass and leaks the label. Time per step is what the trainer measured on its machine.")

    st.subheader("Live: the studied layers on the same minibatch")
    l1, l2 = st.columns(2)
    size = l1.select_slider("Minibatch size", options=[32, 64, 128, 256, 512], value=128, key="cmp_size",
                            help="Test images drawn with the sidebar's seed; the same images for every run")
    which = l2.radio("Values", ["output", "input"], horizontal=True, key="cmp_which",
                     help="What leaves (or enters) each run's studied layer, all channels pooled")
    with st.spinner(f"Running {len(chosen)} models on the same {size} test images…"):
        outs = C.live_outputs(tuple(str(S.runs_root() / n) for n in chosen), S.device(), size, sel["seed"], which)
    if any(o["subsampled"] for o in outs):
        st.info(f"Pooled values were subsampled to {S.MAX_VALUES:,} per run for the histograms.")
    fig_live = F.distributions_figure([o["values"] for o in outs], [o["name"] for o in outs],
                                      subtitles=[f"{o['name']} · {o['layer']}" for o in outs],
                                      x_title=f"{which} value (all channels pooled)")
    st.plotly_chart(fig_live, key="cmp_live_chart", config={"displaylogo": False})
    S.download_figure(fig_live, f"live_{which}_distributions.csv", key="cmp_live_dl")
    live = C.live_table(outs)
    st.dataframe(live, hide_index=True, key="cmp_live_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f", help=C.LIVE_HELP.get(c))
                                for c in live.columns if c not in ("run", "layer")})

with S.guard("Benchmark results"):
    st.subheader("Benchmarks")
    plots = C.bench_plot_data(str(S.bench_dir()))
    if "speed_layers" in plots:
        st.markdown("**Cost of each layer** (`bench/speed.py`): forward + backward time as a multiple of "
                    "`torch.nn.BatchNorm2d`'s on the same input; black ticks are the goals.")
        fig_speed = F.speed_ratio_figure(plots["speed_layers"], plots["speed_goals"])
        st.plotly_chart(fig_speed, key="cmp_bench_speed", config={"displaylogo": False})
        m = plots["speed_machine"]
        st.caption(f"Measured on {m.get('cpu', 'an unrecorded machine')} ({m.get('device', '?')}, "
                   f"{m.get('torch_threads', '?')} torch threads, torch {m.get('torch', '?')}); "
                   "per-layer tables, the whole network and each speed lever are in speed.json below.")
    if "convergence_runs" in plots:
        b = plots["convergence_budget"]
        st.markdown("**Convergence** (`bench/convergence.py`): test accuracy against optimizer steps, mean "
                    f"over seeds — {b.get('dataset', '?')}, {b.get('train_images', '?')} training images, "
                    f"{b.get('epochs', '?')} epochs, width {b.get('width', '?')}.")
        fig_conv = F.convergence_figure(plots["convergence_runs"])
        st.plotly_chart(fig_conv, key="cmp_bench_conv", config={"displaylogo": False})
        if b.get("note"):
            st.caption(str(b["note"]))
    results = C.bench_results(str(S.bench_dir()))
    if not results:
        st.caption(f"No benchmark results in `{S.bench_dir()}`.")
    for res in results:
        with st.expander(res["name"], expanded=False):
            if res["error"]:
                st.error(res["error"])
                continue
            if res["machine"]:
                st.caption("Machine: " + " · ".join(f"{k} = {v}" for k, v in res["machine"].items()))
            else:
                st.caption("Machine: not recorded in this file.")
            if res["fields"]:
                st.caption(" · ".join(f"{k}: {v}" for k, v in res["fields"].items()))
            for title, rows in res["tables"]:
                st.markdown(f"**{title}**")
                st.dataframe(rows, hide_index=True)
