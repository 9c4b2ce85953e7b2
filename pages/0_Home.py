"""Home: what the app is for, the runs it read (and those it cannot), and a tour of the pages."""
import streamlit as st

from cbnorm.app import shared as S
from cbnorm.app.navigation import PAGES

S.page_setup()  # inside app.py's frame, also when the page is opened directly

st.title("cbnorm: what normalizers do to activations")
st.markdown(
    "Batch normalization standardizes every channel with **one** mean and variance. The layers studied "
    "here use **several**: Mixture Normalization fits a Gaussian mixture to each minibatch, Context "
    "Normalization keeps one Gaussian per known context (e.g. a garment superclass), ACN / UCB-Norm "
    "learns the mixture as weights, Mode Normalization gates between modes. This app loads trained runs "
    "and shows, on real test images, what these layers see and what they output, how the learned "
    "representation forms during training, and how the normalizers compare.")
with S.guard("Reading the runs"):
    runs = S.runs_overview()
    ok = [r for r in runs if r["ok"]]
    bad = [r for r in runs if not r["ok"]]
    c1, c2, c3 = st.columns(3)
    c1.metric("Device in use", S.device_label().split(" (")[0], help=S.device_label())
    c2.metric("Runs loaded", len(ok))
    c3.metric("Runs that cannot be loaded", len(bad))
    st.caption(f"Runs directory: `{S.runs_root()}` (set `{S.RUNS_ENV}` to use another). "
               f"Device: {S.device_label()}.")
    for r in bad:
        st.error(f"Run **{r['name']}** cannot be loaded: {r['error']}")
    if not runs:
        st.warning(f"No runs found in `{S.runs_root()}` (nor in its folders). Record one from your own "
                   f"training loop with `cbnorm.watch(model, \"{S.runs_root()}/NAME\", probe=...)` or train one "
                   f"with `python -m cbnorm.train --out {S.runs_root()}/NAME ...` (see README.md), or choose "
                   f"another runs directory in the sidebar.")
    classify = [r for r in ok if r["task"] in ("classify", "record")]
    if classify:
        st.subheader("Loaded runs")
        pct = lambda label, help: st.column_config.NumberColumn(label, format="percent", help=help)  # noqa: E731
        st.dataframe(
            [{"run": r["name"], "norm": r["norm"], "test_acc": r["test_acc"], "oracle": r["test_acc_oracle"],
              "mixed": r["test_acc_mixed"], "best": r["best_test_acc"], "dataset": r["dataset"],
              "model": f"{r['model']} ({', '.join(r['layers'])})", "contexts": r["contexts"],
              "epochs": r["epochs"], "steps": r["steps"], "snapshots": r["snapshots"], "recorded": r["recorded"],
              "state": r["state"] or "", "params": r["params"]}
             for r in classify],
            hide_index=True, key="home_runs",
            column_config={
                "model": st.column_config.TextColumn("model (studied layers)"),
                "test_acc": pct("test acc (honest)", "Last-epoch test accuracy; context layers get the context "
                                "their own predictor infers from the image, never the label"),
                "oracle": pct("oracle acc (leaks label)", "Test accuracy when context layers are given the "
                              "true superclass, which is derived from the label: an upper bound, not a result"),
                "mixed": pct("CN+ mixed acc", "Context layers mix every context by posterior (CN+), no "
                             "predictor"),
                "best": pct("best test acc", "Best honest test accuracy over the epochs"),
                "recorded": st.column_config.NumberColumn(
                    "recorded steps", help="Steps with recorded summaries (cbnorm.watch): what every page can "
                                           "show without running the model"),
                "state": st.column_config.TextColumn("recording", help="running: still being written (the "
                                                     "pages can follow it); finished; stopped: never closed"),
                "params": st.column_config.NumberColumn("params", format="%d")})
        st.caption(
            "**Test accuracy** is the honest number: context layers get the context their own predictor infers "
            "from the image (or CN+ mixing), never the label. **Oracle accuracy** feeds the true superclass, "
            "which is derived from the label, so it is an upper bound, not a result.")
    other = [r for r in ok if r["task"] not in ("classify", "gan", "record")]
    if other:
        st.caption("Other runs: " + ", ".join(f"`{r['name']}` ({r['task']}, {r['norm']})" for r in other)
                   + " — see the day ↔ night page.")


st.subheader("The pages")
for page in PAGES[1:]:
    st.page_link(page.file, label=page.title, icon=page.icon)
    st.markdown(page.about)
