"""The scan page's services: where would a mixture help? (``cbnorm.scan`` on recorded runs).

* :func:`run_scan`: a run's scan, one row per (layer, step), read from the summaries (stored at record time)
  or computed from the values they kept; cached per run, view and the summaries' modification times, so a
  run that is still being recorded is scanned again when it gains a step.
* :func:`channel_scan`: one cell's per-channel arrays (which channels a mixture fits best).
* :func:`heatmap`: layers x steps of one statistic for one or two runs (plotly), :func:`table`: the rows
  as a frame for the download.
* :func:`verdicts`: the premise verdicts (P1-P3) measured by ``bench/premise.py`` (``premise.json``).
"""
from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from cbnorm import scan as SC

from . import shared as S

#: the statistics a heat map can show: (label, colour-bar title, help)
STATS = {
    "share_multimodal": ("share of channels where K > 1 wins", "share K > 1",
                         "Of the layer's channels at that step, the share whose values are fitted best (lowest BIC) "
                         "by a mixture of two or more Gaussians"),
    "median_bic_gain": ("median BIC gain over one Gaussian", "median ΔBIC",
                        "Median over channels of BIC(1 Gaussian) − BIC(best K): 0 where one Gaussian wins; above 10 "
                        "is strong evidence for the mixture (Kass and Raftery)"),
}
PREMISE_FILE = "premise.json"


def recorded_runs(names: Sequence[str]) -> list[str]:
    """The runs among ``names`` that hold recorded summaries."""
    out = []
    for n in names:
        try:
            if S.run_by_name(n).summaries:
                out.append(n)
        except Exception:  # noqa: BLE001 - a run that cannot be loaded is left out here, said on Home
            continue
    return out


def _freshness(run) -> tuple:
    out = []
    for step, p in run.summaries:
        try:
            out.append((int(step), p.stat().st_mtime_ns))
        except OSError:
            out.append((int(step), 0))
    return tuple(out)


def run_scan(name: str, view: str, progress: Optional[Callable[[float, str], None]] = None) -> list[dict]:
    """The scan rows of run ``name`` (:func:`cbnorm.scan.scan_run`), step by step (each step cached apart,
    keyed by its summary's modification time, so a run still being recorded only scans its new steps);
    :class:`shared.NothingToShow` for a run with no recorded summaries."""
    run = S.refresh(S.run_by_name(name))
    if not run.summaries:
        raise S.NothingToShow(f"run {name} has no recorded summaries to scan. Record one with "
                              f"cbnorm.watch(model, logdir, probe=..., scan=True), or add them to a trained run "
                              f"with python -m cbnorm.record {run.path} --scan")
    rows = []
    todo = _freshness(run)
    for i, (step, mtime) in enumerate(todo):
        if progress is not None:
            progress(i / len(todo), f"{name}: step {step} ({i + 1}/{len(todo)})")
        rows += _step_rows(str(run.path), step, mtime, view)
    return rows


@st.cache_data(max_entries=2048, ttl=S.TTL, show_spinner=False)
def _step_rows(run_path: str, step: int, mtime_ns: int, view: str) -> list[dict]:
    """One step's rows of the scan (small: a dict per layer)."""
    return SC.scan_run(S.get_run(run_path, S.device()), view, steps=[int(step)])


@st.cache_data(max_entries=64, ttl=S.TTL, show_spinner=False)
def channel_scan(run_path: str, step: int, layer: str, view: str) -> dict:
    """Per-channel arrays of one cell (``cbnorm.scan.layer_scan``) with its source and values per channel."""
    run = S.get_run(run_path, S.device())
    per, source, n = SC.layer_scan(run.read_summary(int(step)), layer, view)
    return {**{k: np.asarray(v) for k, v in per.items()}, "source": source, "values": n}


def grid(rows: Sequence[dict], stat: str) -> tuple[list[str], list[int], np.ndarray]:
    """(layers from the input down, steps, z (L, T)) of ``stat``; NaN where a cell is missing or nothing
    could be fitted."""
    layers = [ly for _, ly in sorted({(r["depth"], r["layer"]) for r in rows})]
    steps = sorted({int(r["step"]) for r in rows})
    z = np.full((len(layers), len(steps)), np.nan)
    li, si = {ly: i for i, ly in enumerate(layers)}, {s: j for j, s in enumerate(steps)}
    for r in rows:
        v = r.get(stat)
        if v is not None:
            z[li[r["layer"]], si[int(r["step"])]] = float(v)
    return layers, steps, z


def heatmap(scans: dict[str, list[dict]], stat: str, view: str) -> go.Figure:
    """Layers (rows, from the input down) x steps (columns) of ``stat`` for each run in ``scans``, side by
    side on one colour scale; hover gives the cell's channels and both statistics."""
    label, bar, _ = STATS[stat]
    names = list(scans)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.12)
    grids = {n: grid(scans[n], stat) for n in names}
    zmax = 1.0 if stat == "share_multimodal" else max(
        [float(np.nanmax(z)) for _, _, z in grids.values() if np.isfinite(z).any()] + [1.0])
    for i, n in enumerate(names):
        layers, steps, z = grids[n]
        by = {(r["layer"], int(r["step"])): r for r in scans[n]}
        text = [[_hover(by.get((ly, s))) for s in steps] for ly in layers]
        fig.add_trace(go.Heatmap(
            z=z, x=[str(s) for s in steps], y=layers, text=text, hovertemplate="%{text}<extra></extra>",
            zmin=0.0, zmax=zmax, colorscale="Viridis", name=n, showscale=i == len(names) - 1,
            colorbar=dict(title=bar), xgap=1, ygap=1), row=1, col=i + 1)
        fig.update_xaxes(title_text="step", type="category", row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=i + 1,
                         title_text="layer (from the input down)" if i == 0 else None)
    height = 160 + 22 * max(len(g[0]) for g in grids.values())
    fig.update_layout(title=f"{label} — {S.VIEW_LABELS[view]}", height=min(max(height, 320), 1200),
                      margin=dict(l=10, r=10, t=80, b=40))
    return fig


def _hover(r: Optional[dict]) -> str:
    if r is None:
        return "not recorded"
    if r["share_multimodal"] is None:
        return f"{r['layer']} · step {r['step']}<br>no channel could be fitted ({r['nonfinite_channels']} non-finite)"
    mw = "—" if r["median_min_weight"] is None else f"{r['median_min_weight']:.2f}"
    return (f"{r['layer']} · step {r['step']}<br>K > 1 wins in {r['share_multimodal']:.0%} of {r['channels']} "
            f"channels<br>median ΔBIC {r['median_bic_gain']:.1f} · mean best K {r['mean_best_k']:.2f}<br>"
            f"median smallest weight (K > 1) {mw} · median |skew| {r['median_abs_skewness']:.2f}<br>"
            f"{r['source']} on {r['values']:,} values per channel")


def table(scans: dict[str, list[dict]]):
    """Every row of every run's scan as one frame (the download)."""
    import pandas as pd

    return pd.DataFrame([r for rows in scans.values() for r in rows])


def top_channels(per: dict, n: int = 8) -> list[int]:
    """The ``n`` fitted channels with the largest BIC gain (the ones a mixture fits best), largest first."""
    gain = np.where(per["finite"], per["bic_gain"], -np.inf)
    order = np.argsort(-gain, kind="stable")
    return [int(c) for c in order[:n] if np.isfinite(gain[c])]


def verdicts() -> Optional[dict]:
    """``premise.json`` from the benchmark results (``bench/premise.py``), or None when absent or unreadable."""
    p = S.bench_dir() / PREMISE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
