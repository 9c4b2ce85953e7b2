"""What the day <-> night page calls: cached translators, translation of uploaded bytes, context bar charts.

Thin wrappers over ``cbnorm.transfer`` / ``cbnorm.images`` with Streamlit caches (bounded, never mutated:
``transfer.translate`` works on a copy of the shared model). Uploaded bytes only ever pass through
``cbnorm.images.load_image``; nothing is written to disk.
"""
from __future__ import annotations

import io
import json
from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from . import app_state as S
from . import images, transfer
from .daynight import PHOTOS

__all__ = ["TRANSLATORS", "translator_runs", "translate_bytes", "bundled_png", "context_bars", "bench_table",
           "fit_own_contexts", "translate_own", "png_bytes"]

#: page label -> run directory name under the runs root ("stats" = CN statistics of the training photos)
TRANSLATORS = {"input-level CN (learned, the paper's CN-Channels)": "daynight-input",
               "feature-level autoencoder (context norms inside)": "daynight-feature",
               "CN statistics of the training photos (no learning)": "stats"}
BUNDLED = tuple(PHOTOS)


def translator_runs() -> dict[str, str]:
    """Label -> run path for the translators present in the runs directory (plus the statistics one)."""
    root = S.runs_root()
    out = {}
    for label, name in TRANSLATORS.items():
        if name == "stats" or (root / name / "config.json").is_file():
            out[label] = name if name == "stats" else str(root / name)
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def bundled_png(name: str, context: str) -> bytes:
    """A library photo in the day context, or rendered by the day-for-night model of the input run."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled photo {name!r}; choose one of {list(BUNDLED)}")
    params = None
    root = S.runs_root() / "daynight-input" / "config.json"
    if root.is_file():
        params = json.loads(root.read_text()).get("renderer")
    return png_bytes(transfer.bundled_image(name, context, params))


@st.cache_data(max_entries=32, ttl=3600, show_spinner=False)
def translate_bytes(data: bytes, run_path: str, source: str, target: str, strength: float) -> bytes:
    """Translate uploaded/bundled image bytes; returns PNG bytes of the same size (any mode handled)."""
    image = images.load_image(data)
    if run_path == "stats":
        out = transfer.translate_with_stats(image, transfer.training_stats(), source, target, strength)
    else:
        run = S.get_run(run_path, S.device())
        out = transfer.translate(run, image, source=source, target=target, strength=strength)
    return png_bytes(out)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def context_parameters(run_path: str) -> dict:
    if run_path == "stats":
        return transfer.training_stats().parameters()
    return transfer.context_parameters(S.get_run(run_path, S.device()))


def context_bars(layer: dict) -> go.Figure:
    """Grouped bars of the per-channel mean and standard deviation of each context for one layer."""
    from plotly.subplots import make_subplots

    channels = [str(c) for c in layer["channels"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean per channel", "standard deviation per channel"))
    colours = {"day": "#f2a900", "night": "#2b4c9b"}
    for col, key in ((1, "mean"), (2, "std")):
        for ctx, values in layer[key].items():
            fig.add_trace(go.Bar(x=channels, y=np.asarray(values, dtype=float), name=ctx,
                                 marker_color=colours.get(ctx), legendgroup=ctx, showlegend=col == 1), row=1, col=col)
    fig.update_layout(barmode="group", height=350, margin=dict(t=80, b=30, l=40, r=10),
                      title=f"{layer['name']} ({layer.get('units', '')})")
    fig.update_xaxes(title_text="channel")
    return fig


def bench_table() -> Optional[dict]:
    """bench/results/daynight.json as rows for a table, with its machine; None when absent."""
    path = S.bench_dir() / "daynight.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = [{"method": r["method"], "day→night PSNR (dB)": r["day_to_night_psnr"],
             "day→night SSIM": r["day_to_night_ssim"], "night→day PSNR (dB)": r["night_to_day_psnr"],
             "night→day SSIM": r["night_to_day_ssim"], "s / megapixel": r["seconds_per_megapixel"]}
            for r in data.get("table", [])]
    return {"rows": rows, "machine": data.get("machine", {}), "holdout": data.get("holdout_photos", [])}


def fit_own_contexts(day: Sequence[bytes], night: Sequence[bytes]) -> transfer.ContextStats:
    """Per-context statistics (CN eq. 23-24) of the user's own photos; every file through the image door."""
    if not day or not night:
        raise ValueError("upload at least one day photo and one night photo")
    return transfer.fit_contexts([images.load_image(b) for b in day], [images.load_image(b) for b in night])


def translate_own(data: bytes, stats: transfer.ContextStats, source: str, target: str, strength: float) -> bytes:
    return png_bytes(transfer.translate_with_stats(images.load_image(data), stats, source, target, strength))
