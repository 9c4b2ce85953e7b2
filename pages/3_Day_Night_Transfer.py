"""Day <-> night transfer (placeholder until the feature lands)."""
import streamlit as st

from cbnorm import app_state as S

st.title("Day ↔ night transfer")
st.info("Coming soon: turn a day photo into a night one (and back) by normalizing it with one context's learned "
        "statistics and de-normalizing with the other's — at the input channels or inside an autoencoder. This "
        "page is a placeholder until that feature is finished.", icon=":material/construction:")

with S.guard("Day ↔ night runs"):
    runs = [r for r in S.runs_overview() if r["ok"] and r.get("task") == "daynight"]
    if runs:
        st.markdown("Translator runs already present in the runs directory:")
        st.dataframe([{"run": r["name"], "norm": r["norm"], "model": r["model"], "layers": ", ".join(r["layers"])}
                      for r in runs], hide_index=True, key="dn_runs")
    else:
        st.caption(f"No day ↔ night runs in `{S.runs_root()}` yet.")
