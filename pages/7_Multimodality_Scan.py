"""Where would a mixture help? The multimodality scan of every recorded layer over training (cbnorm.scan)."""
import streamlit as st

from cbnorm.app import figures as F
from cbnorm.app import histograms as H
from cbnorm.app import scan as M
from cbnorm.app import shared as S
from cbnorm.app import source as SRC
from cbnorm.app import state

S.page_setup()

st.title("Where would a mixture help?")
st.caption("For every recorded normalization layer and step: how many channels' values are fitted best (lowest "
           "BIC) by a mixture of 2 to 4 Gaussians rather than one — the premise of the mixture-normalization paper "
           "(its Fig. 1), measured on your run. Pick a cell to see its histograms with the fits.")

sel = S.selection()
with S.guard("Multimodality scan"):
    names = M.recorded_runs([r["name"] for r in S.probe_runs() if r["ok"]])
    if not names:
        raise S.NothingToShow("no run in this directory holds recorded summaries. Record one with "
                              "cbnorm.watch(model, logdir, probe=..., scan=True) (README, 'Your own training loop').")
    first = sel["run"] if sel["run"] in names else names[0]
    partner = next((n for n in names if n != first and n.replace("-bn", "-mn") == first.replace("-bn", "-mn")), None)
    state.ensure("scan_runs", names, [first] + ([partner] if partner else []), many=True)
    c1, c2, c3 = st.columns([4, 2, 3])
    chosen = c1.multiselect("Runs (one, or two side by side)", names, key="scan_runs", max_selections=2,
                            help="Recorded runs (cbnorm.watch, or python -m cbnorm.record); e.g. BN and MN in the "
                                 "same network")
    view = c2.radio("Values", ["input", "x_hat"], key="scan_view", format_func=S.VIEW_LABELS.get,
                    help="The layer's input (is it multi-modal?) or x̂, what the normalizer aims at N(0, 1)")
    stat = c3.radio("Colour", list(M.STATS), key="scan_stat", format_func=lambda s: M.STATS[s][0],
                    help="\n\n".join(f"**{v[0]}**: {v[2]}" for v in M.STATS.values()))
    if not chosen:
        st.info("Choose at least one run.")
        st.stop()
    scans = {}
    bar = st.progress(0.0, text="Scanning…")
    for i, name in enumerate(chosen):
        scans[name] = M.run_scan(name, view, progress=lambda f, t, i=i: bar.progress(
            min(1.0, (i + f) / len(chosen)), text=t))
    bar.empty()
    fig = M.heatmap(scans, stat, view)
    st.plotly_chart(fig, key="scan_heatmap", config={"displaylogo": False})
    sources = {(r["source"], r["values"]) for rows in scans.values() for r in rows}
    st.caption("Each cell: one layer at one recorded step; its channels each fitted with 1-D Gaussian mixtures of "
               "K = 1..4 (batched EM from k-means++, as sklearn's GaussianMixture), the K with the lowest BIC kept. "
               "Computed " + "; ".join(f"{'at record time' if s == 'recorded' else 'here, from the kept values'} "
                                       f"on {n:,} values per channel" for s, n in sorted(sources))
               + ". Fewer values give BIC less power to see a second mode.")
    S.download_frame(M.table(scans), f"scan_{'_'.join(chosen)}_{view}.csv", key="scan_dl",
                     label="Download the scan (CSV: every cell of every run)")

    st.subheader("One cell: its histograms")
    d1, d2, d3 = st.columns([2, 4, 3])
    run_name = d1.selectbox("Run", chosen, key="scan_cell_run")
    rows = scans[run_name]
    layers, steps, z = M.grid(rows, stat)
    best = max(rows, key=lambda r: (r["step"] == steps[-1], r["share_multimodal"] or 0.0, r["median_bic_gain"] or 0))
    state.ensure("scan_cell_layer", layers, best["layer"])
    state.ensure("scan_cell_step", steps, steps[-1])
    layer = d2.selectbox("Layer", layers, key="scan_cell_layer")
    step = d3.select_slider("Step", steps, key="scan_cell_step")
    run = S.run_by_name(run_name)
    per = M.channel_scan(str(run.path), step, layer, view)
    channels = M.top_channels(per, 8)
    cell = next((r for r in rows if r["layer"] == layer and r["step"] == step), None)
    if cell is None or not channels:
        raise S.NothingToShow(f"{layer} at step {step} of {run_name}: no channel could be fitted "
                              f"({'not recorded' if cell is None else str(cell['nonfinite_channels']) + ' non-finite'})")
    k = int(min(4, max(2, per["best_k"][channels].max())))
    st.markdown(f"`{layer}` at step {step}: K > 1 wins in **{cell['share_multimodal']:.0%}** of {cell['channels']} "
                f"channels (median ΔBIC {cell['median_bic_gain']:.1f}). Shown: the {len(channels)} channels with the "
                f"largest BIC gain (best K: {', '.join(str(int(per['best_k'][c])) for c in channels)}), with a "
                f"{k}-component fit" + (" or the layer's own mixture." if view == "input" else "."))
    panel = H.histogram_panel(str(run.path), S.device(), layer, max(SRC.recorded_probe_size(run), 1), sel["seed"],
                              "predicted", tuple(channels), k, "x_hat", step)
    if view == "input":
        cfig = F.histogram_grid(panel["input"], panel["channels"], mixture=panel["mix_in"],
                                component_names=panel["names_in"], x_title="input activation")
    else:
        cfig = F.histogram_grid(panel["output"], panel["channels"], mixture=panel["mix_out"],
                                component_names=panel["names_out"], mixture_name="fitted mixture",
                                reference_normal=True, subtitles=H.subtitle_stats(panel), x_title="x̂ (before the affine)")
    st.plotly_chart(cfig, key="scan_cell_chart", config={"displaylogo": False})
    S.download_figure(cfig, f"{run_name}_{layer}_step{step}_{view}.csv", key="scan_cell_dl")

with S.guard("Verdicts on the premise"):
    v = M.verdicts()
    st.subheader("The papers' premise, measured (committed runs)")
    if v is None:
        st.info("No premise.json in the benchmark results: run python bench/premise.py (README, 'Where would a "
                "mixture help?').")
    else:
        for key in ("P1", "P2", "P3"):
            p = v.get("verdicts", {}).get(key)
            if p:
                st.markdown(f"**{key} — {p['claim']}** · *{p['verdict']}*  \n{p['text']}")
        st.caption(v.get("protocol", ""))
