"""Plotly figure builders for the app (pages only lay them out).

Every builder takes numpy arrays (passed to Plotly as arrays, which it ships as typed binary arrays) and
returns a ``plotly.graph_objects.Figure`` with axis titles and a legend. ``figure_frame`` turns any figure's
traces into a long table for the CSV download buttons.

* ``histogram_grid``: per-channel histograms (density) with a mixture overlaid — each component's weighted
  density dashed in its own colour, the mixture density solid (MN paper Fig. 1, CB-Norm paper Fig. 4) and,
  optionally, the N(0, 1) density dotted as the target of a normalizer.
* ``curves_figure``: lines (accuracy / error / loss against epochs or steps) for several runs.
* ``embedding_figure`` / ``embedding_animation``: 2-D projections of activations (Scattergl, one trace per
  colour group, fixed axis ranges); the animation has one frame per snapshot and its own play button/slider.
* ``distributions_figure``: side-by-side histograms of several layers' outputs with N(0, 1) overlaid.
* ``seed_band_figure``: runs grouped by recipe, mean over seeds with a ±1 sd band (MN paper Fig. 2), on the
  compare page's "Seeds" section and its reproduction of the MN paper's claim.
* ``speed_ratio_figure`` / ``convergence_figure``: the benchmark results (bench/results) on the compare page.
* ``context_bars``: each context's per-channel mean and standard deviation (day <-> night page).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from cbnorm.analysis import mixture_curves

__all__ = ["COLORS", "color", "histogram_grid", "curves_figure", "embedding_figure", "embedding_animation",
           "distributions_figure", "figure_frame", "frame_csv", "normal_pdf", "speed_ratio_figure",
           "convergence_figure", "seed_band_figure", "context_bars"]

#: categorical colours: Plotly's 10, then Dark24 for more groups
COLORS: list[str] = list(qualitative.Plotly) + list(qualitative.Dark24)
MIXTURE_COLOR = "#222222"
NORMAL_COLOR = "#7f7f7f"
HIST_COLOR = "rgba(99, 110, 250, 0.45)"


def color(i: int) -> str:
    return COLORS[int(i) % len(COLORS)]


def normal_pdf(x: np.ndarray) -> np.ndarray:
    """Density of N(0, 1) at ``x``."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _grid_shape(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(int(cols), n))
    return int(math.ceil(n / cols)), cols


def _density(values: np.ndarray, bins: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Histogram as a density: bin centres, heights, bin width."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    heights, edges = np.histogram(values, bins=bins, range=(lo, hi), density=True)
    return 0.5 * (edges[:-1] + edges[1:]), heights, float(edges[1] - edges[0])


def _mixture_curves(grid: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    comps, total = mixture_curves(grid, w[None], m[None], v[None])
    return comps[0], total[0]


def histogram_grid(values: np.ndarray, channels: Sequence[int], *,
                   mixture: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                   component_names: Optional[Sequence[str]] = None, mixture_name: str = "mixture",
                   reference_normal: bool = False, subtitles: Optional[Sequence[str]] = None, bins: int = 40,
                   cols: int = 4, title: str = "", x_title: str = "activation", points: int = 200,
                   height_per_row: int = 210, max_legend_components: int = 8) -> go.Figure:
    """Grid of per-channel histograms (density) of ``values`` (G, M), one panel per entry of ``channels``.

    ``mixture`` = (weights, means, variances), each (G, K): component k's weighted density w_k N(m_k, v_k)
    is drawn dashed in colour k, the mixture (their sum) solid. ``reference_normal`` adds N(0, 1) dotted.
    The legend shows each kind of line once (clicking it toggles that line in every panel); with more than
    ``max_legend_components`` components (MN's queue of T fits x K) they share one legend entry."""
    values = np.asarray(values, dtype=np.float64)
    g = values.shape[0]
    if g != len(channels):
        raise ValueError(f"values has {g} rows but {len(channels)} channels were named")
    rows, ncols = _grid_shape(g, cols)
    titles = [subtitles[i] if subtitles else f"channel {int(c)}" for i, c in enumerate(channels)]
    two_lines = any("<br>" in t for t in titles)
    height = max(320, 60 + (height_per_row + (25 if two_lines else 0)) * rows)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=min(0.3, (110 if two_lines else 75) / height))
    for i in range(g):
        r, c = i // ncols + 1, i % ncols + 1
        row = values[i][np.isfinite(values[i])]
        lo, hi = (float(row.min()), float(row.max())) if row.size else (-1.0, 1.0)
        if reference_normal:
            lo, hi = min(lo, -3.0), max(hi, 3.0)
        if mixture is not None:  # show every component that carries weight, even far from the data
            w, m, v = (np.asarray(a, dtype=np.float64)[i] for a in mixture)
            keep = (w >= 0.01) & np.isfinite(m) & np.isfinite(v)
            if keep.any():
                sd = np.sqrt(np.maximum(v[keep], 0.0))
                lo, hi = min(lo, float((m[keep] - 2.5 * sd).min())), max(hi, float((m[keep] + 2.5 * sd).max()))
        centers, heights, width = _density(row, bins, lo, hi)
        first = i == 0
        fig.add_trace(go.Bar(x=centers, y=heights, width=width, marker_color=HIST_COLOR, name="histogram",
                             legendgroup="histogram", showlegend=first, marker_line_width=0,
                             hovertemplate="value %{x:.3g}<br>density %{y:.3g}<extra>channel " + str(int(channels[i]))
                             + "</extra>"), row=r, col=c)
        grid = np.linspace(lo, hi, points)
        if mixture is not None:
            w, m, v = (np.asarray(a, dtype=np.float64)[i] for a in mixture)
            comps, total = _mixture_curves(grid, w, m, v)
            many = comps.shape[0] > max_legend_components  # one legend entry for all of them
            for k in range(comps.shape[0]):
                name = component_names[k] if component_names and k < len(component_names) else f"component {k + 1}"
                fig.add_trace(go.Scatter(x=grid, y=comps[k], mode="lines",
                                         name=f"{comps.shape[0]} components" if many else name, meta=name,
                                         legendgroup="components" if many else f"comp{k}",
                                         showlegend=first and (not many or k == 0),
                                         line=dict(color=color(k), dash="dash", width=1.6),
                                         hovertemplate=f"{name} (weight {w[k]:.2f})<br>%{{x:.3g}}: %{{y:.3g}}"
                                                       "<extra></extra>"), row=r, col=c)
            fig.add_trace(go.Scatter(x=grid, y=total, mode="lines", name=mixture_name, legendgroup="mixture",
                                     showlegend=first, line=dict(color=MIXTURE_COLOR, width=2.2),
                                     hovertemplate=mixture_name + "<br>%{x:.3g}: %{y:.3g}<extra></extra>"),
                          row=r, col=c)
        if reference_normal:
            fig.add_trace(go.Scatter(x=grid, y=normal_pdf(grid), mode="lines", name="N(0, 1)", legendgroup="normal",
                                     showlegend=first, line=dict(color=NORMAL_COLOR, dash="dot", width=1.6),
                                     hoverinfo="skip"), row=r, col=c)
    fig.update_layout(title=title or None, height=height, bargap=0,
                      margin=dict(l=40, r=10, t=(70 if title else 40) + (30 if two_lines else 0), b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + (55 if two_lines else 30) / height, x=0))
    fig.update_xaxes(title_text=x_title, title_font_size=11, row=rows)
    fig.update_yaxes(title_text="density", title_font_size=11, col=1)
    fig.update_annotations(font_size=12)
    return fig


def range_past_start(curves: Sequence[tuple[Any, Any]], extra: Sequence[float] = ()) -> Optional[list[float]]:
    """A y range for (x, y) curves over their points after each curve's first step (step 0, the untrained
    network at chance, would squeeze every curve into a sliver; a curve of 2 points or fewer counts whole),
    plus ``extra`` values, with a 5% margin; None when no finite value is left."""
    vals = [np.asarray(extra, dtype=np.float64).ravel()]
    for x, y in curves:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        vals.append(y[x > x.min()] if x.size > 2 else y)
    v = np.concatenate(vals)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * max(hi - lo, 1e-3)
    return [lo - pad, hi + pad]


def curves_figure(series: Sequence[dict], *, x_title: str, y_title: str, title: str = "",
                  y_range: Optional[Sequence[float]] = None, height: int = 420,
                  zoom_past_start: bool = False) -> go.Figure:
    """Lines for several runs. ``series``: dicts with ``name``, ``x``, ``y`` (arrays) and optional ``color``
    index, ``dash``, ``markers`` (bool) or ``mode`` (plotly's), ``group`` (legend group), ``showlegend``.
    ``zoom_past_start`` (without ``y_range``): the y range of :func:`range_past_start`."""
    fig = go.Figure()
    for i, s in enumerate(series):
        x, y = np.asarray(s["x"]), np.asarray(s["y"], dtype=np.float64)
        fig.add_trace(go.Scatter(
            x=x, y=y, name=s["name"], mode=s.get("mode") or ("lines+markers" if s.get("markers") else "lines"),
            legendgroup=s.get("group", s["name"]), showlegend=s.get("showlegend", True),
            line=dict(color=color(s.get("color", i)), dash=s.get("dash", "solid"), width=s.get("width", 2)),
            marker=dict(size=7),
            hovertemplate=s["name"] + "<br>" + x_title + " %{x}<br>" + y_title + " %{y:.4g}<extra></extra>"))
    fig.update_layout(title=title or None, height=height, margin=dict(l=50, r=10, t=50 if title else 20, b=45),
                      xaxis_title=x_title, yaxis_title=y_title, hovermode="closest",
                      legend=dict(title_text="run"))
    if y_range is None and zoom_past_start:
        y_range = range_past_start([(t["x"], t["y"]) for t in series])
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return fig


def _group_traces(coords: np.ndarray, groups: np.ndarray, group_names: Sequence[str], hover: Optional[np.ndarray],
                  marker_size: float) -> list[go.Scattergl]:
    traces = []
    for k, name in enumerate(group_names):
        sel = np.nonzero(groups == k)[0]
        traces.append(go.Scattergl(
            x=coords[sel, 0], y=coords[sel, 1], mode="markers", name=str(name), legendgroup=str(name),
            marker=dict(color=color(k), size=marker_size, opacity=0.8),
            text=None if hover is None else hover[sel],
            hovertemplate=("%{text}<extra>" + str(name) + "</extra>") if hover is not None else
            (str(name) + "<extra></extra>")))
    return traces


def _axes_titles(info: Optional[dict], method: str) -> tuple[str, str]:
    label = {"pca": "PC", "tsne": "t-SNE ", "umap": "UMAP "}.get(method, "dim ")
    pct = (info or {}).get("explained_variance_pct")
    if method == "pca" and pct:
        return f"PC1 ({pct[0]:.1f}% of variance)", f"PC2 ({pct[1]:.1f}% of variance)"
    return f"{label}1", f"{label}2"


def embedding_figure(coords: np.ndarray, groups: np.ndarray, group_names: Sequence[str], *,
                     xlim: Sequence[float], ylim: Sequence[float], method: str = "pca", info: Optional[dict] = None,
                     title: str = "", legend_title: str = "", hover: Optional[np.ndarray] = None,
                     marker_size: float = 5, height: int = 560) -> go.Figure:
    """One snapshot's 2-D projection (N, 2), one Scattergl trace per group, fixed axis ranges."""
    coords = np.asarray(coords, dtype=np.float32)
    groups = np.asarray(groups)
    fig = go.Figure(_group_traces(coords, groups, group_names, hover, marker_size))
    xt, yt = _axes_titles(info, method)
    fig.update_layout(title=title or None, height=height, margin=dict(l=50, r=10, t=50 if title else 20, b=45),
                      xaxis=dict(range=list(xlim), title=xt, autorange=False, zeroline=False),
                      yaxis=dict(range=list(ylim), title=yt, autorange=False, zeroline=False),
                      legend=dict(title_text=legend_title, itemsizing="constant"))
    return fig


def embedding_animation(coords: Sequence[np.ndarray], groups: Sequence[np.ndarray], group_names: Sequence[str],
                        steps: Sequence[int], *, xlim: Sequence[float], ylim: Sequence[float], method: str = "pca",
                        info: Optional[dict] = None, title: str = "", legend_title: str = "",
                        hover: Optional[np.ndarray] = None, marker_size: float = 5, frame_ms: int = 700,
                        height: int = 600) -> go.Figure:
    """Plotly animation over snapshots: one frame per step (same traces = groups in each frame), fixed axes,
    a play/pause button and a step slider. ``groups`` holds one (N,) array per snapshot (a colouring may
    change with training, e.g. predictions)."""
    if not (len(coords) == len(groups) == len(steps)) or not coords:
        raise ValueError(f"coords, groups and steps must have the same non-zero length, got "
                         f"{len(coords)}, {len(groups)}, {len(steps)}")
    frames = []
    for c, g, s in zip(coords, groups, steps):
        frames.append(go.Frame(data=_group_traces(np.asarray(c, dtype=np.float32), np.asarray(g), group_names,
                                                  hover, marker_size), name=f"step {int(s)}"))
    fig = go.Figure(data=frames[0].data, frames=frames)
    xt, yt = _axes_titles(info, method)
    play = dict(frame=dict(duration=frame_ms, redraw=True), fromcurrent=True, transition=dict(duration=0))
    fig.update_layout(
        title=title or None, height=height, margin=dict(l=50, r=10, t=50 if title else 20, b=130),
        xaxis=dict(range=list(xlim), title=xt, autorange=False, zeroline=False),
        yaxis=dict(range=list(ylim), title=yt, autorange=False, zeroline=False),
        legend=dict(title_text=legend_title, itemsizing="constant"),
        updatemenus=[dict(type="buttons", direction="left", x=0.12, y=0, xanchor="right", yanchor="top",
                          pad=dict(r=10, t=80), showactive=False,
                          buttons=[dict(label="▶ play", method="animate", args=[None, play]),
                                   dict(label="❚❚ pause", method="animate",
                                        args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])])],
        sliders=[dict(active=0, x=0.12, y=0, len=0.88, xanchor="left", yanchor="top", pad=dict(b=10, t=55),
                      currentvalue=dict(prefix="training step ", font=dict(size=13), xanchor="right"),
                      steps=[dict(label=str(int(s)), method="animate",
                                  args=[[f"step {int(s)}"], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                                                 transition=dict(duration=0))])
                             for s in steps])])
    return fig


def distributions_figure(values: Sequence[np.ndarray], names: Sequence[str], *, bins: int = 60,
                         x_range: Optional[Sequence[float]] = None, subtitles: Optional[Sequence[str]] = None,
                         cols: int = 3, reference_normal: bool = True, x_title: str = "output value",
                         height_per_row: int = 280) -> go.Figure:
    """Side-by-side histograms (density) of several 1-D samples (one panel each, shared x range), each
    with the N(0, 1) density dotted for reference."""
    n = len(values)
    if n == 0 or n != len(names):
        raise ValueError(f"need one name per sample, got {n} samples and {len(names)} names")
    arrs = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    arrs = [a[np.isfinite(a)] for a in arrs]
    if x_range is None:
        nonempty = [a for a in arrs if a.size]
        lo = min([float(np.quantile(a, 0.001)) for a in nonempty] + [-3.0])
        hi = max([float(np.quantile(a, 0.999)) for a in nonempty] + [3.0])
        x_range = (lo, hi)
    lo, hi = float(x_range[0]), float(x_range[1])
    rows, ncols = _grid_shape(n, cols)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=list(subtitles or names), shared_xaxes=False,
                        horizontal_spacing=0.06, vertical_spacing=min(0.15, 0.6 / max(rows, 1)))
    grid = np.linspace(lo, hi, 200)
    for i, (a, name) in enumerate(zip(arrs, names)):
        r, c = i // ncols + 1, i % ncols + 1
        centers, heights, width = _density(np.clip(a, lo, hi), bins, lo, hi)
        fig.add_trace(go.Bar(x=centers, y=heights, width=width, name=str(name), marker_color=color(i),
                             opacity=0.65, marker_line_width=0, showlegend=False,
                             hovertemplate=str(name) + "<br>value %{x:.3g}<br>density %{y:.3g}<extra></extra>"),
                      row=r, col=c)
        if reference_normal:
            fig.add_trace(go.Scatter(x=grid, y=normal_pdf(grid), mode="lines", name="N(0, 1)", legendgroup="normal",
                                     showlegend=i == 0, line=dict(color=NORMAL_COLOR, dash="dot", width=1.6),
                                     hoverinfo="skip"), row=r, col=c)
        fig.update_xaxes(range=[lo, hi], row=r, col=c)
    fig.update_layout(height=max(320, 60 + height_per_row * rows), bargap=0, margin=dict(l=40, r=10, t=50, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02 + 0.1 / max(rows, 1), x=0))
    fig.update_xaxes(title_text=x_title, title_font_size=11, row=rows)
    fig.update_yaxes(title_text="density", title_font_size=11, col=1)
    return fig


def figure_frame(fig: go.Figure):
    """The data of every trace (and of every animation frame) as one long pandas DataFrame:
    columns frame, trace (its ``meta`` when that is a string, else its name), panel (x axis id), x, y
    (+ text when the trace has hover text)."""
    import pandas as pd

    parts = []

    def add(traces, frame_name):
        for t in traces:
            x = getattr(t, "x", None)
            y = getattr(t, "y", None)
            if x is None or y is None:
                continue
            x, y = np.asarray(x), np.asarray(y)
            n = min(len(x), len(y))
            label = t.meta if isinstance(getattr(t, "meta", None), str) else (t.name or "")
            d = {"frame": frame_name, "trace": label, "panel": getattr(t, "xaxis", None) or "x",
                 "x": x[:n], "y": y[:n]}
            text = getattr(t, "text", None)
            if text is not None and not isinstance(text, str) and len(text) >= n:
                d["text"] = np.asarray(text)[:n]
            parts.append(pd.DataFrame(d))

    if fig.frames:
        for fr in fig.frames:
            add(fr.data, fr.name)
    else:
        add(fig.data, "")
    if not parts:
        return pd.DataFrame(columns=["frame", "trace", "panel", "x", "y"])
    out = pd.concat(parts, ignore_index=True)
    return out.drop(columns=["frame"]) if not fig.frames else out


def frame_csv(df) -> bytes:
    """CSV bytes of a DataFrame (for st.download_button)."""
    return df.to_csv(index=False).encode("utf-8")


# ============================================================================ seeds
def rgba(hex_color: str, alpha: float) -> str:
    """"#rrggbb" as "rgba(r, g, b, alpha)"."""
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def seed_band_figure(series: Sequence[dict], *, x_title: str = "optimizer step",
                     y_title: str = "test error (1 − accuracy)", title: str = "",
                     reference_y: Optional[float] = None, reference_name: str = "BN's best (mean curve)",
                     height: int = 440, zoom_past_start: bool = True) -> go.Figure:
    """Mean curves over seeds with a ±1 sd band (the MN paper's Fig. 2 shading). ``series``: dicts with
    ``name`` (legend text, e.g. "mn (3 seeds)"), ``x``, ``mean`` (arrays), ``sd`` (array, or None for one
    seed: a plain line, no band), optional ``color`` index, ``reference`` (bool: a thicker line) and
    ``seeds`` [(seed, y), ...] (each seed's curve, thin and dotted).

    Traces of a series, in order: the band as two traces, "NAME − 1 sd" (no line) then "NAME + 1 sd"
    (``fill="tonexty"`` down to the first); then the seeds' curves; then the mean line "NAME". They share a
    legend group, so clicking the legend entry toggles the band too. ``reference_y`` adds a dotted
    horizontal line (BatchNorm's best). ``zoom_past_start``: the y range spans every value after each curve's
    first point (step 0, the untrained network at chance, would squeeze the curves into a sliver); the
    modebar's autoscale shows it (:func:`range_past_start`)."""
    fig = go.Figure()
    for i, s in enumerate(series):
        x = np.asarray(s["x"])
        mean = np.asarray(s["mean"], dtype=np.float64)
        c = color(s.get("color", i))
        group = s["name"]
        sd = s.get("sd")
        if sd is not None:
            sd = np.asarray(sd, dtype=np.float64)
            fig.add_trace(go.Scatter(x=x, y=mean - sd, mode="lines", line=dict(width=0, color=c), name=f"{group} − 1 sd",
                                     legendgroup=group, showlegend=False, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=x, y=mean + sd, mode="lines", line=dict(width=0, color=c), name=f"{group} + 1 sd",
                                     legendgroup=group, showlegend=False, fill="tonexty", fillcolor=rgba(c, 0.2),
                                     hoverinfo="skip"))
        for seed, y in s.get("seeds") or ():
            fig.add_trace(go.Scatter(x=x, y=np.asarray(y, dtype=np.float64), mode="lines", name=f"{group} seed {seed}",
                                     legendgroup=group, showlegend=False, line=dict(color=c, width=1, dash="dot"),
                                     hovertemplate=f"{group} seed {seed}<br>{x_title} %{{x}}<br>{y_title} %{{y:.4g}}"
                                                   "<extra></extra>"))
        hover = f"{group}<br>{x_title} %{{x}}<br>mean %{{y:.4g}}"
        extra = {}
        if sd is not None:
            hover += " ± %{customdata:.3g}"
            extra["customdata"] = sd
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=group, legendgroup=group,
                                 line=dict(color=c, width=3.5 if s.get("reference") else 2),
                                 hovertemplate=hover + "<extra></extra>", **extra))
    if zoom_past_start:
        curves = []
        for s in series:
            mean, sd = np.asarray(s["mean"], dtype=np.float64), s.get("sd")
            sd = None if sd is None else np.asarray(sd, dtype=np.float64)
            ys = [mean] if sd is None else [mean - sd, mean + sd]
            curves += [(s["x"], y) for y in ys + [y for _, y in s.get("seeds") or ()]]
        extra = [float(reference_y)] if reference_y is not None and np.isfinite(reference_y) else []
        y_range = range_past_start(curves, extra)
        if y_range is not None:
            fig.update_yaxes(range=y_range)
    if reference_y is not None and np.isfinite(reference_y):
        fig.add_hline(y=float(reference_y), line_dash="dot", line_color="gray", annotation_text=reference_name,
                      annotation_position="top right", annotation_font_size=11)
    fig.update_layout(title=title or None, height=height, margin=dict(l=50, r=10, t=50 if title else 20, b=45),
                      xaxis_title=x_title, yaxis_title=y_title, hovermode="closest",
                      legend=dict(title_text="group (seeds)"))
    return fig


# ============================================================================ benchmark results
def speed_ratio_figure(layers: Sequence[dict], goals: Optional[dict] = None, *, k: int = 3,
                       height: int = 380) -> go.Figure:
    """Per-layer forward+backward time as a ratio to BatchNorm2d (bench/results/speed.json ``layers``
    records: ``layer``, ``shape``, ``K``, ``ratio_to_bn``) at ``k`` components: one bar per shape, the
    goal of each layer (``goals`` {layer: ratio}) as a black tick, and 1x dotted."""
    rows = [r for r in layers if int(r.get("K", k)) == k]
    names = list(dict.fromkeys(r["layer"] for r in rows))
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    fig = go.Figure()
    for i, shape in enumerate(shapes):
        by = {r["layer"]: float(r["ratio_to_bn"]) for r in rows if tuple(r["shape"]) == shape}
        label = "N={}, C={}, {}".format(shape[0], shape[1], "x".join(str(s) for s in shape[2:]))
        fig.add_trace(go.Bar(x=names, y=[by.get(n) for n in names], name=label, marker_color=color(i),
                             hovertemplate="%{x}<br>" + label + "<br>%{y:.2f}x BatchNorm2d<extra></extra>"))
    if goals:
        gx = [n for n in names if n in goals]
        fig.add_trace(go.Scatter(x=gx, y=[float(goals[n]) for n in gx], mode="markers", name="goal",
                                 marker=dict(symbol="line-ew-open", size=34, color="black", line=dict(width=3)),
                                 hovertemplate="%{x}: goal %{y}x<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    fig.update_layout(barmode="group", height=height, margin=dict(l=50, r=10, t=20, b=45),
                      yaxis_title=f"time / BatchNorm2d (K={k})", legend=dict(title_text="input"))
    return fig


def convergence_figure(runs: Sequence[dict], *, height: int = 420) -> go.Figure:
    """Test accuracy against optimizer steps, the mean over seeds of each norm (bench/results/convergence.json
    ``runs`` records: ``norm``, ``seed``, ``curve`` [[step, accuracy], ...]); seeds are aligned by step."""
    series = []
    for i, norm in enumerate(dict.fromkeys(r["norm"] for r in runs)):
        curves = [dict((int(s), float(a)) for s, a in r["curve"]) for r in runs if r["norm"] == norm]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [float(np.mean([c[s] for c in curves])) for s in steps]
        series.append({"name": f"{norm} ({len(curves)} seeds)", "x": steps, "y": mean, "color": i,
                       "width": 4 if norm == "bn" else 2})
    fig = curves_figure(series, x_title="optimizer step", y_title="test accuracy (mean over seeds)",
                        height=height)
    fig.update_layout(legend=dict(title_text="norm"))
    return fig


# ============================================================================ day <-> night
def context_bars(layer: dict) -> go.Figure:
    """Grouped bars of the per-channel mean and standard deviation of each context for one layer."""
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
