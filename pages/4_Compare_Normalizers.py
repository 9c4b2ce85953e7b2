"""Compare normalizers: curves, a table with the MN paper's speed-up measure, runs grouped by seed (mean ± sd),
a live panel, the reproduction of the MN paper's claim, benchmarks."""
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
        err_series = C.error_series(chosen, x_axis)
        fig_err = F.curves_figure(err_series, x_title=x_title, y_title="test error (1 − accuracy)",
                                  zoom_past_start=x_axis == "step",
                                  title="Test error (honest: inferred context; dots: full test set at epoch ends)")
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
    table, target = C.compare_table(chosen, reference, str(S.bench_dir()))
    formats = {"test acc": "percent", "oracle acc": "percent", "best acc": "percent",
               "step cost vs BN (bench)": "%.2f×",
               "params": "%d", "steps to BN best": "%d", "steps": "%d"}
    st.dataframe(table, hide_index=True, key="cmp_table", column_config={
        c: st.column_config.NumberColumn(format=f, help=C.COMPARE_HELP.get(c)) for c, f in formats.items()})
    if target is not None:
        st.caption(f"**Steps to reach BN best**: the first evaluated step at which a run's test accuracy reaches "
                   f"{reference}'s best ({target:.2%}) — the MN paper's measure of faster training; None = never reached. This table uses the full test set at "
                   "epoch ends, so its steps are multiples of an epoch; the figure above draws the dense evaluations "
                   "(`--eval-every`, a fixed test subset) where a run has them, and the Seeds section below compares "
                   "on those. "
                   "Test accuracy is honest (context inferred from the image); the oracle column feeds the true "
                   "superclass and leaks the label.")
    st.caption(C.cost_caption(str(S.bench_dir()), chosen))

    st.subheader("Seeds")
    groups, seed_summary = C.seed_groups(names)
    many = [g for g in groups if len(g["seeds"]) > 1]
    if not many:
        st.info("Every recipe here has one run (one seed), so there is no spread over seeds to show: the per-run "
                "curves above are the whole story. Runs that differ only in `--seed` are grouped here, with "
                "their mean ± sd.")
    else:
        st.caption("Runs that differ only in their seed form a group (same task, data, model, norm and its "
                   "options, studied layers and training options). Test error on the dense evaluation steps "
                   "(`--eval-every`; else the epoch ends), mean over seeds with a ±1 sd band, as the MN paper's "
                   "Fig. 2; groups of one seed are plain lines. The table's numbers are "
                   "`cbnorm.curves.summarize_groups` of each setting, BatchNorm's group as the reference.")
        labels = [g["label"] for g in groups]
        if "cmp_groups" not in ss:
            ss["cmp_groups"] = labels[:12]
        ss["cmp_groups"] = [n for n in ss["cmp_groups"] if n in labels]
        g1, g2 = st.columns([4, 1])
        shown = g1.multiselect("Groups", labels, key="cmp_groups",
                               format_func=lambda n: f"{n} ({len(next(g for g in groups if g['label'] == n)['seeds'])})",
                               help="Groups of runs (number of seeds); each run stays selectable alone above")
        each_seed = g2.toggle("Seed curves", key="cmp_seed_lines", help="Add every seed's own curve, dotted")
        colors = {label: i for i, label in enumerate(labels)}
        seed_cols = {"best acc mean": st.column_config.NumberColumn(format="percent", help=C.SEEDS_HELP["best acc mean"]),
                     "best acc sd": st.column_config.NumberColumn(format="percent", help=C.SEEDS_HELP["best acc sd"]),
                     "steps to BN best": st.column_config.NumberColumn(format="%d", help=C.SEEDS_HELP["steps to BN best"]),
                     "reduction vs BN %": st.column_config.NumberColumn(format="%.1f", help=C.SEEDS_HELP["reduction vs BN %"]),
                     "Welch p": st.column_config.NumberColumn(format="%.3g", help=C.SEEDS_HELP["Welch p"])}
        seed_cols.update({c: st.column_config.Column(help=h) for c, h in C.SEEDS_HELP.items() if c not in seed_cols})
        n_drawn = 0
        for si, (setting, info) in enumerate(seed_summary.items()):
            members = [g for g in groups if g["setting"] == setting and g["label"] in shown]
            if not any(len(g["seeds"]) > 1 for g in members):
                continue
            rec = members[0]["setting_recipe"]
            if len(seed_summary) > 1:
                st.markdown(f"**Setting: {setting}** — {rec}")
            else:
                st.caption(f"Setting: {rec}")
            summ = info["summary"]
            ref_acc = summ.get("reference_acc")
            fig_seeds = F.seed_band_figure(C.seed_series(members, summ, colors, each_seed),
                                           reference_y=1.0 - ref_acc if ref_acc is not None else None,
                                           title="Test error over seeds (mean ± 1 sd)")
            st.plotly_chart(fig_seeds, key=f"cmp_seeds_chart_{si}", config={"displaylogo": False})
            S.download_figure(fig_seeds, f"seeds_{si}.csv", key=f"cmp_seeds_dl_{si}")
            st.dataframe(C.seeds_table(members, summ), hide_index=True, key=f"cmp_seeds_table_{si}",
                         column_config=seed_cols)
            if info["reference"] is None:
                st.info("This setting has no BatchNorm group, so 'steps to BN best' and the comparison to BN "
                        "cannot be computed.")
            else:
                st.caption(f"BN's best: {ref_acc:.2%}, the maximum of {info['reference']}'s mean curve, reached at step "
                           f"{summ.get('reference_step'):,}. Curves are compared on the steps all seeds of a group have.")
            for label, why in info["skipped"].items():
                st.warning(f"Group {label} is left out: {why}.")
            dups = [(g["label"], d) for g in members for d in g["duplicates"]]
            if dups:
                st.caption("Left out, a seed already in the group: " + ", ".join(f"{d} ({l})" for l, d in dups))
            n_drawn += 1
        if not n_drawn:
            st.info("None of the chosen groups has more than one seed.")

    st.subheader("Live: the studied layers on the same minibatch")
    l1, l2 = st.columns(2)
    size = l1.select_slider("Minibatch size", options=[32, 64, 128, 256, 512], value=128, key="cmp_size",
                            help="Test images drawn with the sidebar's seed; the same images for every run")
    which = l2.radio("Values", ["x_hat", "output", "input"], key="cmp_which", format_func=S.VIEW_LABELS.get,
                     help=S.VIEW_HELP + " All channels pooled.")
    with st.spinner(f"Running {len(chosen)} models on the same {size} test images…"):
        outs = C.live_outputs(tuple(str(S.runs_root() / n) for n in chosen), S.device(), size, sel["seed"], which)
    own = [o["name"] for o in outs if o["note"].startswith("the recorded")]
    if own:
        st.info("Recorded from a model the app cannot rebuild, so shown on its own recorded probe batch (last "
                "step), not on the minibatch the others share: " + ", ".join(own))
    if any(o["subsampled"] for o in outs):
        st.info(f"Pooled values were subsampled to {S.MAX_VALUES:,} per run for the histograms.")
    fig_live = F.distributions_figure([o["values"] for o in outs], [o["name"] for o in outs],
                                      subtitles=[f"{o['name']} · {o['layer']}" for o in outs],
                                      x_title=f"{S.VIEW_LABELS[which]} (all channels pooled)",
                                      reference_normal=which == "x_hat")
    st.plotly_chart(fig_live, key="cmp_live_chart", config={"displaylogo": False})
    S.download_figure(fig_live, f"live_{which}_distributions.csv", key="cmp_live_dl")
    live = C.live_table(outs)
    st.dataframe(live, hide_index=True, key="cmp_live_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3f", help=C.LIVE_HELP.get(c))
                                for c in live.columns if c not in ("run", "layer")})

with S.guard("Reproduction of the MN paper's claim"):
    st.subheader("Reproduction of the MN paper's claim")
    rep = C.reproduction(str(S.bench_dir()))
    if rep["status"] == "missing":
        st.info(rep["message"])
    elif rep["status"] == "malformed":
        st.warning(rep["message"])
    else:
        ref_norm = rep["reference_norm"]
        st.markdown("`bench/reproduce_mn.py` trains the MN paper's protocol (Sec. 4.1) with several seeds per "
                    "norm: test error, mean ± 1 sd over seeds (the paper's Fig. 2), and its Table 3 — steps to "
                    "reach BatchNorm's maximum test accuracy — in our numbers beside the paper's.")
        for si, (setting, entry) in enumerate(rep["settings"].items()):
            st.markdown(f"**{setting}** ({C.SETTING_NAMES.get(setting, 'setting')})")
            ref_acc = entry.get("reference_acc")
            fig_rep = F.seed_band_figure(C.reproduction_series(entry, ref_norm),
                                         reference_y=1.0 - ref_acc if ref_acc is not None else None,
                                         title=f"Test error, {setting}: mean ± 1 sd over seeds")
            st.plotly_chart(fig_rep, key=f"cmp_repro_chart_{si}", config={"displaylogo": False})
            S.download_figure(fig_rep, f"reproduce_mn_{setting}.csv", key=f"cmp_repro_dl_{si}")
            table = C.reproduction_table(entry, setting, rep["paper"], ref_norm)
            cols = {c: st.column_config.NumberColumn(C.repro_label(c), format=C.repro_format(c), help=C.repro_help(c))
                    for c in table.columns if table[c].dtype.kind in "fi" and c != "seeds"}
            cols.update({c: st.column_config.Column(C.repro_label(c), help=C.repro_help(c))
                         for c in table.columns if c not in cols and C.repro_help(c)})
            st.dataframe(table, hide_index=True, key=f"cmp_repro_table_{si}", column_config=cols)
            if ref_acc is not None:
                st.caption(f"BN's best (maximum of its mean curve): {ref_acc:.2%} at step "
                           f"{entry.get('reference_step')}. The paper's numbers are CIFAR's (100 epochs, "
                           "another scale), so compare the reductions and the ordering, not the step counts.")
        st.caption(C.protocol_caption(rep))

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
