"""Activation histograms: a layer's input and its x̂ (or output after the affine) per channel, with mixtures and shape statistics."""
import streamlit as st

from cbnorm.app import figures as F
from cbnorm.app import histograms as H
from cbnorm.app import shared as S

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("Activation histograms")
st.caption("What enters and leaves one normalization layer on a minibatch of test images (latent vectors for a "
           "generator), channel by channel "
           "(as in Fig. 1 of the MN paper and Fig. 4 of the CB-Norm paper).")

sel = S.selection()
every = None
with S.guard("Activation histograms"):
    run, layer, info = S.selected_layer(sel)
    every = S.follow_toggle(run, key="hist_follow")


@st.fragment(run_every=every)
def body() -> None:
    with S.guard("Activation histograms"):
        run, layer, info = S.selected_layer(sel)
        if every:
            S.refresh(run)
        S.run_badge(run)
        step, live = S.step_picker(run, key="hist_step", follow=bool(every), layer=layer)
        c1, c2, c3, c4 = st.columns([3, 2, 3, 3])
        size, context_mode = 256, "predicted"
        if live:
            size = c1.select_slider("Minibatch size", options=[16, 32, 64, 128, 256, 512, 1024], value=256,
                                    key="hist_size",
                                    help="Number of test images drawn (with the sidebar's seed) and run through the "
                                         "model")
            c2.button("Resample", on_click=S.next_seed, icon=":material/casino:",
                      help="Draw another minibatch (adds 1 to the seed in the sidebar)")
            if run.uses_context and run.contexts.get("label_derived"):
                context_mode = c3.radio(
                    "Context given to context layers", ["predicted", "true"], horizontal=True, key="hist_context",
                    format_func=lambda m: {"predicted": "inferred (honest)", "true": "true superclass (oracle)"}[m],
                    help="Inferred: the model's context predictor (or CN+ mixing) decides, as at test time. True: the "
                         "superclass derived from the label, which a real test image does not come with.")
        k = c4.slider("K: fitted components", 1, 6, 3, key="hist_k",
                      help="Components of the GMM fitted per channel with cbnorm.gmm: on the input of layers without "
                           "their own mixture (BN, LN, GN), and on every output")

        n_channels = info["num_features"]
        c5, c6 = st.columns([2, 5])
        mode = c5.radio("Channels", ["random", "choose"], horizontal=True, key="hist_ch_mode",
                        format_func=lambda m: {"random": "random subset", "choose": "choose"}[m])
        if mode == "random":
            count = c6.slider("How many channels", 1, min(16, n_channels), min(8, n_channels), key="hist_count",
                              help="A random subset of the layer's channels, drawn with the seed")
            channels = H.pick_channels(n_channels, count, sel["seed"])
        else:
            channels = c6.multiselect("Channels to show", list(range(n_channels)),
                                      default=list(range(min(4, n_channels))), max_selections=16, key="hist_channels")
            if not channels:
                st.info("Choose at least one channel.")
                st.stop()

        view = st.radio("What leaves the layer", list(H.OUT_VIEWS), horizontal=True, key="hist_view",
                        format_func=S.VIEW_LABELS.get, help=S.VIEW_HELP)

        with st.spinner(f"Reading {run.path.name} and fitting mixtures…"):
            panel = H.histogram_panel(str(run.path), S.device(), layer, size, sel["seed"], context_mode,
                                      tuple(int(c) for c in channels), k, view, step)
        context_note = {"predicted": " · context inferred by the model", "true": " · true superclass given (oracle)"}
        st.caption(f"Run **{run.path.name}** ({run.norm}) · layer `{layer}` ({info['class']}) · {panel['note']} · "
                   f"{panel['points_per_channel']:,} values per channel"
                   f"{context_note[context_mode] if run.uses_context and live else ''} · device {S.device_label()}")
        bad = {v: c for v, c in panel["nonfinite"].items() if c}
        if bad:
            st.warning("Non-finite values (NaN or ±inf) in this layer, left out of the histograms and statistics: "
                       + ", ".join(f"{c:,} in the {v}" for v, c in bad.items()))
        if panel["subsampled"]:
            st.info(f"Each channel's values were subsampled to {S.MAX_VALUES:,} points for the histograms and fits.")

        st.subheader("Input of the layer")
        st.caption(f"Overlaid: {panel['source_in']} — each component's weighted density dashed in its own colour, "
                   "the mixture density solid.")
        fig_in = F.histogram_grid(panel["input"], panel["channels"], mixture=panel["mix_in"],
                                  component_names=panel["names_in"], x_title="input activation")
        st.plotly_chart(fig_in, key="hist_in_chart", config={"displaylogo": False})
        S.download_figure(fig_in, f"{run.path.name}_{layer}_input_histograms.csv", key="hist_in_dl")

        st.subheader("What leaves the layer")
        metrics = H.stats_summary(panel)
        cols = st.columns(3)
        for col, m in zip(cols, metrics):
            col.metric(m["label"], m["value"], m["delta"], delta_color="inverse", help=m["help"])
        if view == "x_hat":
            st.caption(f"x̂, the normalized values before the affine γ·x̂ + β. Overlaid: N(0, 1) dotted (what a "
                       f"normalizer aims x̂ at) and a {len(panel['names_out'])}-component GMM fit of x̂ (components "
                       "dashed, mixture solid). Panel titles: skewness, excess kurtosis and Kolmogorov-Smirnov "
                       "distance to N(0, 1); the deltas compare with the input standardized per channel (like with "
                       "like). For MN "
                       "and CN with prior scaling x̂ sums per-component standardized values scaled by 1/√π_k: with "
                       "well-separated components its variance is near K, not 1, by design (README).")
        else:
            st.caption(f"The layer's output γ·x̂ + β, after the affine: γ and β move it away from N(0, 1) on "
                       f"purpose, "
                       f"so no N(0, 1) is drawn and no distance to it is given. Overlaid: a "
                       f"{len(panel['names_out'])}-component GMM fit (components dashed, mixture solid). Panel titles: "
                       "skewness, excess kurtosis (scale-free, so comparable with the input's) and standard deviation.")
        fig_out = F.histogram_grid(panel["output"], panel["channels"], mixture=panel["mix_out"],
                                   component_names=panel["names_out"], mixture_name="fitted mixture",
                                   reference_normal=view == "x_hat", subtitles=H.subtitle_stats(panel),
                                   x_title="x̂ (before the affine)" if view == "x_hat"
                                   else "output value (after the affine)")
        st.plotly_chart(fig_out, key="hist_out_chart", config={"displaylogo": False})
        S.download_figure(fig_out, f"{run.path.name}_{layer}_{view}_histograms.csv", key="hist_out_dl")

        st.subheader("Shape per channel")
        table = H.stats_table(panel)
        st.dataframe(table, hide_index=True, key="hist_stats",
                     column_config={c: st.column_config.NumberColumn(format="%.3f", help=H.STATS_HELP.get(c))
                                    for c in table.columns if c != "channel"})
        st.caption("Skewness and excess kurtosis are 0 for a Gaussian; with x̂ shown, KS is the Kolmogorov-Smirnov "
                   "statistic and W1 the 1-Wasserstein distance between the channel's x̂ values and N(0, 1), and the "
                   "input's KS is measured on its standardized values.")


body()
