"""Compare normalizers: curves, a table with the MN paper's speed-up measure, runs grouped by seed (mean ± sd),
a live panel, the reproduction of the MN paper's claim, benchmarks."""
import streamlit as st

from cbnorm.app import captions as W
from cbnorm.app import compare as C
from cbnorm.app import figures as F
from cbnorm.app import shared as S
from cbnorm.app import state
from cbnorm.app.controls import chart

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Compare normalizers")
st.caption("Chosen runs side by side: how fast and how far they learn, what they cost, and what their studied "
           "layers output on the same images.")

sel = S.selection()
with S.guard("Compare normalizers"):
    runs = [r for r in S.classify_runs() if r["ok"]]
    names = [r["name"] for r in runs]
    if not names:
        st.warning("No run to compare: see the Home page.")
        st.stop()
    state.prune("cmp_runs", names, names[:9])
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
    chart(F.curves_figure(C.error_series(chosen, x_axis), x_title=x_title, y_title="test error (1 − accuracy)",
                          zoom_past_start=x_axis == "step",
                          title="Test error (honest: inferred context; dots: full test set at epoch ends)"),
          "cmp_err_chart", "test_error.csv")
    chart(F.curves_figure(C.loss_series(chosen, x_axis, window), x_title=x_title, y_title="cross-entropy loss",
                          title="Loss (training, moving average: solid; test at epoch ends: dotted)"
                          if x_axis == "step" else "Test loss"), "cmp_loss_chart", "loss.csv")

    st.subheader("Summary")
    bn_runs = [r["name"] for r in runs if r["norm"] == "bn"]
    reference = None
    if bn_runs:
        reference = st.selectbox("BatchNorm reference", bn_runs, key="cmp_ref",
                                 help="Whose best test accuracy defines the target of 'steps to reach BN best'")
    else:
        st.info("No BatchNorm run is loaded, so 'steps to reach BN best' cannot be computed.")
    table, target = C.compare_table(chosen, reference, str(S.bench_dir()))
    st.dataframe(table, hide_index=True, key="cmp_table", column_config=C.compare_columns())
    if target is not None:
        st.caption(W.steps_to_bn_note(reference, target))
    st.caption(C.cost_caption(str(S.bench_dir()), chosen))

    st.subheader("Seeds")
    groups, seed_summary = C.seed_groups(names)
    many = [g for g in groups if len(g["seeds"]) > 1]
    if not many:
        st.info(W.NO_SEEDS_NOTE)
    else:
        st.caption(W.SEEDS_NOTE)
        labels = [g["label"] for g in groups]
        state.prune("cmp_groups", labels, labels[:12])
        g1, g2 = st.columns([4, 1])
        shown = g1.multiselect("Groups", labels, key="cmp_groups",
                               format_func=lambda n: f"{n} ({len(next(g for g in groups if g['label'] == n)['seeds'])})",
                               help="Groups of runs (number of seeds); each run stays selectable alone above")
        each_seed = g2.toggle("Seed curves", key="cmp_seed_lines", help="Add every seed's own curve, dotted")
        colors = {label: i for i, label in enumerate(labels)}
        seed_cols = C.seeds_columns()
        settings = C.settings_shown(groups, seed_summary, shown)
        for si, setting, info, members in settings:
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
            chart(fig_seeds, f"cmp_seeds_chart_{si}", f"seeds_{si}.csv")
            st.dataframe(C.seeds_table(members, summ), hide_index=True, key=f"cmp_seeds_table_{si}",
                         column_config=seed_cols)
            if info["reference"] is None:
                st.info(W.NO_BN_GROUP_NOTE)
            else:
                st.caption(W.bn_best_note(info["reference"], ref_acc, summ.get("reference_step")))
            for label, why in info["skipped"].items():
                st.warning(f"Group {label} is left out: {why}.")
            if W.duplicates_note(members):
                st.caption(W.duplicates_note(members))
        if not settings:
            st.info("None of the chosen groups has more than one seed.")

    st.subheader("Live: the studied layers on the same minibatch")
    l1, l2 = st.columns(2)
    size = l1.select_slider("Minibatch size", options=[32, 64, 128, 256, 512], value=128, key="cmp_size",
                            help="Test images drawn with the sidebar's seed; the same images for every run")
    which = l2.radio("Values", ["x_hat", "output", "input"], key="cmp_which", format_func=S.VIEW_LABELS.get,
                     help=S.VIEW_HELP + " All channels pooled.")
    with st.spinner(f"Running {len(chosen)} models on the same {size} test images…"):
        outs = C.live_outputs(tuple(str(S.runs_root() / n) for n in chosen), S.device(), size, sel["seed"], which)
    for note in W.live_notes(outs):
        st.info(note)
    fig_live = F.distributions_figure([o["values"] for o in outs], [o["name"] for o in outs],
                                      subtitles=[f"{o['name']} · {o['layer']}" for o in outs],
                                      x_title=f"{S.VIEW_LABELS[which]} (all channels pooled)",
                                      reference_normal=which == "x_hat")
    chart(fig_live, "cmp_live_chart", f"live_{which}_distributions.csv")
    live = C.live_table(outs)
    st.dataframe(live, hide_index=True, key="cmp_live_table", column_config=C.live_columns(live))

with S.guard("Reproduction of the MN paper's claim"):
    st.subheader("Reproduction of the MN paper's claim")
    rep = C.reproduction(str(S.bench_dir()))
    if rep["status"] == "missing":
        st.info(rep["message"])
    elif rep["status"] == "malformed":
        st.warning(rep["message"])
    else:
        ref_norm = rep["reference_norm"]
        st.markdown(W.REPRODUCTION_INTRO)
        for si, (setting, entry) in enumerate(rep["settings"].items()):
            st.markdown(f"**{setting}** ({C.SETTING_NAMES.get(setting, 'setting')})")
            ref_acc = entry.get("reference_acc")
            fig_rep = F.seed_band_figure(C.reproduction_series(entry, ref_norm),
                                         reference_y=1.0 - ref_acc if ref_acc is not None else None,
                                         title=f"Test error, {setting}: mean ± 1 sd over seeds")
            chart(fig_rep, f"cmp_repro_chart_{si}", f"reproduce_mn_{setting}.csv")
            table = C.reproduction_table(entry, setting, rep["paper"], ref_norm)
            st.dataframe(table, hide_index=True, key=f"cmp_repro_table_{si}", column_config=C.reproduction_columns(table))
            if ref_acc is not None:
                st.caption(W.reproduction_best_note(ref_acc, entry.get("reference_step")))
        st.caption(C.protocol_caption(rep))

with S.guard("Benchmark results"):
    st.subheader("Benchmarks")
    plots = C.bench_plot_data(str(S.bench_dir()))
    if "speed_layers" in plots:
        st.markdown(W.SPEED_INTRO)
        fig_speed = F.speed_ratio_figure(plots["speed_layers"], plots["speed_goals"])
        st.plotly_chart(fig_speed, key="cmp_bench_speed", config={"displaylogo": False})
        st.caption(W.speed_machine_note(plots["speed_machine"]))
    if "convergence_runs" in plots:
        b = plots["convergence_budget"]
        st.markdown(W.convergence_intro(b))
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
            st.caption(W.machine_note(res["machine"]))
            if res["fields"]:
                st.caption(" · ".join(f"{k}: {v}" for k, v in res["fields"].items()))
            for title, rows in res["tables"]:
                st.markdown(f"**{title}**")
                st.dataframe(rows, hide_index=True)
