"""cbnorm's Streamlit app: `streamlit run app.py`.

The frame: page config, the shared sidebar (run, layer, seed in st.session_state; "Reload runs") and the
navigation over the pages in pages/ (cbnorm.app.navigation: Home first). Runs are read from $CBNORM_RUNS (default:
checkpoints/ next to this file). Every number shown comes from cbnorm.app (its services call the library).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from cbnorm.app import evolution as E
from cbnorm.app import shared as S
from cbnorm.app import state
from cbnorm.app.navigation import PAGES

HERE = Path(__file__).resolve().parent
S.set_app_dir(HERE)

st.set_page_config(page_title="cbnorm · normalizers at work", page_icon=":material/stacked_bar_chart:",
                   layout="wide")
E.umap_warmup()  # compile UMAP once per process, in the background, long before the evolution page needs it

def _set_root() -> None:
    """Widget callback: switch the runs directory (the selected run and layer start over)."""
    path = Path(st.session_state["w_runs_dir"].strip()).expanduser()
    if not path.is_dir():
        st.session_state["runs_dir_error"] = f"`{path}` is not a directory; the runs directory is unchanged."
        return
    st.session_state.pop("runs_dir_error", None)
    st.session_state["runs_dir"] = str(path)
    st.session_state["run"] = st.session_state["layer"] = None


def sidebar() -> None:
    """Run, layer and seed. The selection lives in session keys "run", "layer", "seed" (read by every page);
    the widgets ("w_run", ...) are re-seeded from them on each run, so the choice survives page switches."""
    ss = st.session_state
    with st.sidebar:
        st.button("Reload runs", icon=":material/refresh:", on_click=S.clear_caches,
                  help="Forget every cached run, activation and projection and read the runs directory again")
        ss.setdefault("seed", 0)
        ss["w_runs_dir"] = str(S.runs_root())
        st.text_input("Runs directory", key="w_runs_dir", on_change=_set_root,
                      help="A folder of runs (searched in nested folders, as tensorboard --logdir) or one run. "
                           "cbnorm-view LOGDIR starts the app on one.")
        if ss.get("runs_dir_error"):
            st.error(ss["runs_dir_error"])
        with S.guard("Runs"):
            runs = S.probe_runs()
            names = [r["name"] for r in runs]
            if not names:
                st.warning(f"No classification runs in `{S.runs_root()}`.")
                ss["run"] = None
            else:
                by_name = {r["name"]: r for r in runs}
                if ss.get("run") not in names:
                    ss["run"] = next((r["name"] for r in runs if r["ok"]), names[0])
                ss["w_run"] = ss["run"]
                st.selectbox("Run", names, key="w_run", on_change=state.keep, args=("run",),
                             format_func=lambda n: f"{n} · {by_name[n]['norm']}" if by_name[n]["ok"]
                             else f"{n} · cannot load",
                             help="A trained run directory (config.json, metrics.json, weights, snapshots)")
                entry = by_name[ss["run"]]
                if not entry["ok"]:
                    st.error(f"Run {entry['name']} cannot be loaded: {entry['error']}")
                else:
                    run = S.run_by_name(ss["run"])
                    layers = S.layer_choices(run)
                    if ss.get("layer") not in layers:
                        ss["layer"] = layers[0]
                    ss["w_layer"] = ss["layer"]
                    st.selectbox("Layer", layers, key="w_layer", on_change=state.keep, args=("layer",),
                                 format_func=lambda n: S.layer_label(run, n),
                                 help="A normalization layer of the run; the studied one (the run's norm) comes first")
        ss["w_seed"] = int(ss["seed"])
        st.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="w_seed", on_change=state.keep,
                        args=("seed",), help="Draws the minibatch / sample of test images (and random channel subsets)")
        st.caption(f"Device: {S.device_label()}")


nav = st.navigation([st.Page(p.file, title=p.title, icon=p.icon, default=p.key == "home") for p in PAGES])
sidebar()
nav.run()
