"""Plotly figures of the "Across runs and training" page (cbnorm.app.training computes what they draw).

Every trace carries a ``meta`` string naming what it is ("step 94 · histogram", "fmnist-bn · histogram",
"fmnist-mn · step 470 · Coat", "fmnist-bn · knn_accuracy", "fmnist-bn mean · silhouette"), which
``figures.figure_frame`` uses as the trace label of the CSV downloads and the tests count.

* ``ridge_figure``: TensorBoard's "offset" histograms, one row per step, the step's mixture components on it.
* ``step_multiples_figure``: one panel per step, histogram + components (dashed) + mixture (solid): MN
  paper Fig. 8 at every snapshot.
* ``overlay_figure``: every step's histogram as a line on the same axes, coloured by step.
* ``percentile_figure``: TensorBoard's "distributions": min / 7 / 16 / 31 / 50 / 69 / 84 / 93 % / max over steps.
* ``runs_overlay_figure`` / ``runs_multiples_figure``: the same histogram of several runs, overlaid and in
  aligned small multiples (shared x and y).
* ``embedding_grid_figure``: runs as rows, snapshots as columns, shared axes per row (CB-Norm Fig. 3); one
  trace per cell, coloured point by point (330 traces of 3 x 11 cells x 10 classes took 1.3 s to build).
* ``quality_figure``: cluster-quality metrics against training step, a line per run and a mean ± sd band
  per group of seeds.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from cbnorm import analysis

from .figures import MIXTURE_COLOR, NORMAL_COLOR, color, normal_pdf, rgba

__all__ = ["ridge_figure", "step_multiples_figure", "overlay_figure", "percentile_figure", "runs_overlay_figure",
           "runs_multiples_figure", "embedding_grid_figure", "quality_figure", "step_colors"]

MAX_LEGEND_COMPONENTS = 8
MIN_WEIGHT = 0.01


def step_colors(n: int) -> list[str]:
    """``n`` colours along Viridis (first step dark blue, last yellow-green)."""
    if n <= 1:
        return sample_colorscale("Viridis", [0.0])
    return sample_colorscale("Viridis", [0.9 * i / (n - 1) for i in range(n)])


def _centers(edges: np.ndarray) -> tuple[np.ndarray, float]:
    e = np.asarray(edges, dtype=np.float64)
    return 0.5 * (e[:-1] + e[1:]), float(e[1] - e[0])


def _outside(below: int, above: int) -> str:
    return f" · {below + above:,} outside the range ({below:,} below, {above:,} above)" if below + above else ""


def _component_traces(panel: dict, grid: np.ndarray, label: str, base: float = 0.0, *, first: bool,
                      xaxis: Optional[str] = None, yaxis: Optional[str] = None) -> list[go.Scatter]:
    """The pooled components of ``panel`` (dashed, each in its colour) and their sum (solid) on ``grid``,
    shifted up by ``base``. Components weighing less than 1% are left out."""
    w, m, v = panel["mixture"]
    comps, total = analysis.pooled_component_curves(grid, w, m, v)
    names = panel["names"]
    many = comps.shape[0] > MAX_LEGEND_COMPONENTS
    weight = np.asarray(w, dtype=np.float64).mean(axis=0)
    out = []
    shown_first = False
    for kk in range(comps.shape[0]):
        if weight[kk] < MIN_WEIGHT:
            continue
        name = names[kk] if kk < len(names) else f"component {kk + 1}"
        out.append(go.Scatter(
            x=grid, y=base + comps[kk], mode="lines", name=f"{comps.shape[0]} components" if many else name,
            meta=f"{label} · {name}", legendgroup="components" if many else f"comp{kk}",
            showlegend=first and (not many or not shown_first), line=dict(color=color(kk), dash="dash", width=1.4),
            hovertemplate=f"{label} · {name} (weight {weight[kk]:.2f})<br>%{{x:.3g}}<extra></extra>",
            **({"xaxis": xaxis, "yaxis": yaxis} if xaxis else {})))
        shown_first = True
    out.append(go.Scatter(x=grid, y=base + total, mode="lines", name="mixture", meta=f"{label} · mixture",
                          legendgroup="mixture", showlegend=first, line=dict(color=MIXTURE_COLOR, width=1.8),
                          hovertemplate=f"{label} · mixture<br>%{{x:.3g}}<extra></extra>",
                          **({"xaxis": xaxis, "yaxis": yaxis} if xaxis else {})))
    return out


# ============================================================================ distributions over training
def ridge_figure(dist: dict, bins: dict, *, components: bool = True, x_title: str = "value",
                 row_height: int = 46) -> go.Figure:
    """One histogram per step (bars from its own baseline), the first step at the top; with ``components``
    the step's mixture components and their sum drawn on it. Traces per step: the histogram, then (with
    components) one per component of weight >= 1% and the mixture."""
    steps, panels = dist["steps"], dist["panels"]
    centers, width = _centers(bins["edges"])
    peak = [float(np.max(d)) if np.size(d) else 0.0 for d in bins["density"]]
    offset = 0.8 * (float(np.quantile(peak, 0.9)) if peak else 1.0) or 1.0
    grid = np.linspace(bins["lo"], bins["hi"], 240)
    cols = step_colors(len(steps))
    n = len(steps)
    fig = go.Figure()
    for i, (s, p) in enumerate(zip(steps, panels)):
        base = (n - 1 - i) * offset
        label = f"step {s}"
        below, above = bins["below"][i], bins["above"][i]
        fig.add_trace(go.Bar(x=centers, y=bins["density"][i], base=base, width=width, name=label,
                             meta=f"{label} · histogram", marker=dict(color=cols[i], line_width=0), opacity=0.7,
                             legendgroup="hist", showlegend=False,
                             hovertemplate=f"{label}<br>value %{{x:.3g}}<br>density %{{y:.3g}}"
                                           f"{_outside(below, above)}<extra></extra>"))
        if components:
            for t in _component_traces(p, grid, label, base, first=i == 0):
                fig.add_trace(t)
    fig.update_layout(height=max(360, 110 + row_height * n), bargap=0, barmode="overlay",
                      margin=dict(l=70, r=10, t=40, b=45), hovermode="closest",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0))
    fig.update_yaxes(tickvals=[(n - 1 - i) * offset for i in range(n)], ticktext=[f"step {s}" for s in steps],
                     zeroline=False, showgrid=True, title_text="training step (offset density)")
    fig.update_xaxes(range=[bins["lo"], bins["hi"]], title_text=x_title)
    return fig


def step_multiples_figure(dist: dict, bins: dict, *, log_y: bool = False, cols: int = 4, x_title: str = "value",
                          height_per_row: int = 200) -> go.Figure:
    """One panel per step (shared x range and bins): the histogram (density), the step's mixture
    components dashed and their sum solid (MN paper Fig. 8). Traces per step: histogram, components of
    weight >= 1%, mixture."""
    steps, panels = dist["steps"], dist["panels"]
    n = len(steps)
    cols = max(1, min(cols, n))
    rows = int(math.ceil(n / cols))
    titles = [f"step {s}" + (f" · {b + a:,} outside" if b + a else "")
              for s, b, a in zip(steps, bins["below"], bins["above"])]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes="all",
                        horizontal_spacing=0.05, vertical_spacing=min(0.12, 0.45 / max(rows, 1)))
    centers, width = _centers(bins["edges"])
    grid = np.linspace(bins["lo"], bins["hi"], 200)
    colors = step_colors(n)
    for i, (s, p) in enumerate(zip(steps, panels)):
        r, c = i // cols + 1, i % cols + 1
        label = f"step {s}"
        fig.add_trace(go.Bar(x=centers, y=bins["density"][i], width=width, name=label, meta=f"{label} · histogram",
                             marker=dict(color=colors[i], line_width=0), opacity=0.55, showlegend=False,
                             hovertemplate=f"{label}<br>value %{{x:.3g}}<br>density %{{y:.3g}}<extra></extra>"),
                      row=r, col=c)
        for t in _component_traces(p, grid, label, first=i == 0):
            fig.add_trace(t, row=r, col=c)
    fig.update_layout(height=max(320, 70 + height_per_row * rows), bargap=0, margin=dict(l=45, r=10, t=60, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + 40 / max(320, 70 + height_per_row * rows),
                                  x=0))
    fig.update_xaxes(range=[bins["lo"], bins["hi"]])
    fig.update_xaxes(title_text=x_title, title_font_size=11, row=rows)
    fig.update_yaxes(title_text="density", title_font_size=11, col=1)
    if log_y:
        fig.update_yaxes(type="log")
    fig.update_annotations(font_size=11)
    return fig


def overlay_figure(dist: dict, bins: dict, *, log_y: bool = False, x_title: str = "value",
                   height: int = 420) -> go.Figure:
    """Every step's histogram as a stepped line on one pair of axes, coloured from dark (first) to light
    (last). One trace per step."""
    centers, _ = _centers(bins["edges"])
    colors = step_colors(len(dist["steps"]))
    fig = go.Figure()
    for i, s in enumerate(dist["steps"]):
        label = f"step {s}"
        fig.add_trace(go.Scatter(x=centers, y=bins["density"][i], mode="lines", line_shape="hvh", name=label,
                                 meta=f"{label} · histogram", line=dict(color=colors[i], width=1.8),
                                 hovertemplate=f"{label}<br>value %{{x:.3g}}<br>density %{{y:.3g}}"
                                               f"{_outside(bins['below'][i], bins['above'][i])}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=20, b=45), xaxis_title=x_title,
                      yaxis_title="density", legend=dict(title_text="snapshot"), hovermode="closest")
    fig.update_xaxes(range=[bins["lo"], bins["hi"]])
    if log_y:
        fig.update_yaxes(type="log")
    return fig


PERCENTILE_BANDS = ((0, 8, "min – max"), (1, 7, "7 – 93 %"), (2, 6, "16 – 84 %"), (3, 5, "31 – 69 %"))


def percentile_figure(dist: dict, *, y_title: str = "value", height: int = 400, base_color: str = "#636efa"
                      ) -> go.Figure:
    """TensorBoard's "distributions" over steps: nested bands min–max, 7–93 %, 16–84 %, 31–69 % (each
    its lower edge, then its upper edge filled down to it) and the median line: 9 traces."""
    steps = np.asarray(dist["steps"])
    pct = np.stack([p["percentiles"] for p in dist["panels"]])  # (S, 9)
    fig = go.Figure()
    for j, (lo, hi, name) in enumerate(PERCENTILE_BANDS):
        alpha = 0.12 + 0.13 * j
        fig.add_trace(go.Scatter(x=steps, y=pct[:, lo], mode="lines", line=dict(width=0.5, color=base_color),
                                 name=f"{name} (lower)", meta=f"{name} · lower", legendgroup=name, showlegend=False,
                                 hovertemplate=f"step %{{x}}<br>{name.split(' – ')[0]}: %{{y:.3g}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=steps, y=pct[:, hi], mode="lines", line=dict(width=0.5, color=base_color),
                                 fill="tonexty", fillcolor=rgba(base_color, alpha), name=name, meta=f"{name} · upper",
                                 legendgroup=name,
                                 hovertemplate=f"step %{{x}}<br>{name.split(' – ')[-1]}: %{{y:.3g}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=steps, y=pct[:, 4], mode="lines+markers", line=dict(color=MIXTURE_COLOR, width=2),
                             marker=dict(size=5), name="median", meta="median",
                             hovertemplate="step %{x}<br>median %{y:.3g}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=20, b=45), xaxis_title="training step",
                      yaxis_title=y_title, legend=dict(title_text="percentiles"), hovermode="x unified")
    return fig


# ============================================================================ the same histogram across runs
def _run_label(name: str, norm: str) -> str:
    return f"{name} ({norm})"


def runs_overlay_figure(res: dict, bins: dict, *, log_y: bool = False, reference_normal: bool = False,
                        x_title: str = "value", height: int = 440) -> go.Figure:
    """Each run's histogram as a stepped line on the same axes, one trace per run (legend: the run and
    the number of its values outside the shown range), N(0, 1) dotted with ``reference_normal``."""
    centers, _ = _centers(bins["edges"])
    fig = go.Figure()
    for i, (name, norm) in enumerate(zip(res["runs"], res["norms"])):
        b, a = bins["below"][i], bins["above"][i]
        legend = _run_label(name, norm) + (f" · {b + a:,} outside" if b + a else "")
        fig.add_trace(go.Scatter(x=centers, y=bins["density"][i], mode="lines", line_shape="hvh", name=legend,
                                 meta=f"{name} · histogram", line=dict(color=color(i), width=2),
                                 hovertemplate=f"{name}<br>value %{{x:.3g}}<br>density %{{y:.3g}}"
                                               f"{_outside(b, a)}<extra></extra>"))
    if reference_normal:
        grid = np.linspace(bins["lo"], bins["hi"], 200)
        fig.add_trace(go.Scatter(x=grid, y=normal_pdf(grid), mode="lines", name="N(0, 1)", meta="N(0, 1)",
                                 line=dict(color=NORMAL_COLOR, dash="dot", width=1.6), hoverinfo="skip"))
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=20, b=45), xaxis_title=x_title, yaxis_title="density",
                      legend=dict(title_text="run"), hovermode="closest")
    fig.update_xaxes(range=[bins["lo"], bins["hi"]])
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def runs_multiples_figure(res: dict, bins: dict, *, log_y: bool = False, reference_normal: bool = False,
                          cols: int = 3, x_title: str = "value", height_per_row: int = 250) -> go.Figure:
    """One panel per run with shared x AND y axes (aligned small multiples): the run's histogram (bars),
    N(0, 1) dotted with ``reference_normal``; panel titles give skewness, excess kurtosis and KS to N(0, 1) (the std for the output after the affine,
    which has no distance to N(0, 1))."""
    n = len(res["runs"])
    cols = max(1, min(cols, n))
    rows = int(math.ceil(n / cols))
    titles = []
    for i, (name, p) in enumerate(zip(res["runs"], res["panels"])):
        st_ = p["stats"]
        out = bins["below"][i] + bins["above"][i]
        titles.append(f"{name}<br><span style='font-size:10px'>skew {st_['skewness']:+.2f} · ex. kurt "
                      f"{st_['excess_kurtosis']:+.2f}"
                      + (f" · KS {st_['ks_to_normal']:.3f}" if "ks_to_normal" in st_ else f" · std {st_['std']:.3f}")
                      + (f" · {out:,} outside" if out else "") + "</span>")
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes="all", shared_yaxes="all",
                        horizontal_spacing=0.04, vertical_spacing=min(0.2, 0.6 / max(rows, 1)))
    centers, width = _centers(bins["edges"])
    grid = np.linspace(bins["lo"], bins["hi"], 200)
    for i, (name, norm) in enumerate(zip(res["runs"], res["norms"])):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Bar(x=centers, y=bins["density"][i], width=width, name=_run_label(name, norm),
                             meta=f"{name} · histogram", marker=dict(color=color(i), line_width=0), opacity=0.7,
                             hovertemplate=f"{name}<br>value %{{x:.3g}}<br>density %{{y:.3g}}<extra></extra>"),
                      row=r, col=c)
        if reference_normal:
            fig.add_trace(go.Scatter(x=grid, y=normal_pdf(grid), mode="lines", name="N(0, 1)", meta="N(0, 1)",
                                     legendgroup="normal", showlegend=i == 0,
                                     line=dict(color=NORMAL_COLOR, dash="dot", width=1.4), hoverinfo="skip"),
                          row=r, col=c)
    height = max(320, 90 + height_per_row * rows)
    fig.update_layout(height=height, bargap=0, margin=dict(l=45, r=10, t=80, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0 + 60 / height, x=0))
    fig.update_xaxes(range=[bins["lo"], bins["hi"]])
    fig.update_xaxes(title_text=x_title, title_font_size=11, row=rows)
    fig.update_yaxes(title_text="density", title_font_size=11, col=1)
    if log_y:
        fig.update_yaxes(type="log")
    else:  # one y range for every panel: the highest bar (and N(0, 1)'s peak)
        top = max([float(np.max(d)) for d in bins["density"] if np.size(d)] + [0.4 if reference_normal else 0.0])
        fig.update_yaxes(range=[0.0, 1.05 * top if top > 0 else 1.0])
    fig.update_annotations(font_size=12)
    return fig


# ============================================================================ embedding grid
def embedding_grid_figure(grid: dict, groups: Sequence[Sequence[Optional[np.ndarray]]], group_names: Sequence[str],
                          *, legend_title: str = "", hover: Optional[np.ndarray] = None, marker_size: float = 3.5,
                          cell_height: int = 240) -> go.Figure:
    """Runs as rows, snapshots as columns (each cell titled with its step), shared axis ranges along a row.
    ``groups[row][cell]``: (N,) group ids, or None (a row without that colouring: grey).

    Traces: ONE Scattergl per cell (meta "RUN · step S"; every point coloured by its group, hover naming it),
    so a 3 x 11 grid is 33 traces, not 330; then one legend-only trace per group name (meta "legend · NAME",
    no points) and "(no such colouring in this run)" when some row lacks it."""
    rows = grid["rows"]
    n_rows = len(rows)
    n_cols = max(len(r["steps"]) for r in rows)
    height = max(340, 90 + cell_height * n_rows)
    layout = _cell_layout(rows, n_cols, h_space=0.02, v_space=min(0.1, 0.35 / max(n_rows, 1)))
    k_groups = max(1, len(group_names))
    # group ids as numbers on a stepped colour scale (a list of colour strings is validated point by point)
    scale = []
    for k in range(k_groups):
        scale += [[k / k_groups, color(k)], [(k + 1) / k_groups, color(k)]]
    names = np.asarray([str(n) for n in group_names] or ["?"], dtype=object)
    traces, grey = [], False
    for ri, r in enumerate(rows):
        for ci, s in enumerate(r["steps"]):
            n = ri * n_cols + ci + 1
            ax = "" if n == 1 else str(n)
            c = np.asarray(r["coords"][ci], dtype=np.float32)
            g = groups[ri][ci]
            if g is None:
                marker = dict(color="#bbbbbb")
                label = np.full(len(c), "(no such colouring in this run)", dtype=object)
                grey = True
            else:
                g = np.clip(np.asarray(g, dtype=np.int64), 0, len(names) - 1)
                marker = dict(color=g.astype(np.float32), colorscale=scale, cmin=-0.5, cmax=k_groups - 0.5,
                              showscale=False)
                label = names[g]
            text = label if hover is None else np.char.add(np.asarray(hover, dtype=str), np.char.add(
                "<br>", np.asarray(label, dtype=str)))
            traces.append(go.Scattergl(x=c[:, 0], y=c[:, 1], mode="markers", name=f"{r['run']} · step {s}",
                                       meta=f"{r['run']} · step {s}", showlegend=False, xaxis=f"x{ax}", yaxis=f"y{ax}",
                                       marker=dict(size=marker_size, opacity=0.8, **marker), text=text,
                                       hovertemplate="%{text}<extra>" + f"{r['run']} · step {s}" + "</extra>"))
        for ci in range(n_cols):
            n = ri * n_cols + ci + 1
            ax = "" if n == 1 else str(n)
            layout[f"xaxis{ax}"]["range"] = list(r["xlim"])
            layout[f"yaxis{ax}"]["range"] = list(r["ylim"])
    for k, name in enumerate(group_names):  # the legend: one entry per group, no points
        traces.append(go.Scattergl(x=[None], y=[None], mode="markers", name=str(name), meta=f"legend · {name}",
                                   marker=dict(color=color(k), size=8), hoverinfo="skip"))
    if grey:
        traces.append(go.Scattergl(x=[None], y=[None], mode="markers", name="(no such colouring in this run)",
                                   meta="legend · none", marker=dict(color="#bbbbbb", size=8), hoverinfo="skip"))
    layout.update(height=height, margin=dict(l=10, r=30, t=60, b=10),
                  legend=dict(title=dict(text=legend_title), itemsizing="constant", orientation="h", yanchor="bottom",
                              y=1.0 + 45 / height, x=0))
    return go.Figure(data=traces, layout=layout)  # one validation pass (make_subplots + updates: 3x slower)


def _cell_layout(rows: Sequence[dict], n_cols: int, *, h_space: float, v_space: float) -> dict:
    """Layout of a rows x n_cols grid of cells as a plain dict: axes (domains, no tick labels, fixed
    ranges set by the caller), a title "step S" over each cell and the row's run at its right."""
    n_rows = len(rows)
    w = (1.0 - h_space * (n_cols - 1)) / n_cols
    h = (1.0 - v_space * (n_rows - 1)) / n_rows
    clip = lambda v: float(min(1.0, max(0.0, v)))  # noqa: E731
    layout: dict = {"annotations": []}
    for ri, r in enumerate(rows):
        y1 = 1.0 - ri * (h + v_space)
        for ci in range(n_cols):
            n = ri * n_cols + ci + 1
            ax = "" if n == 1 else str(n)
            x0 = ci * (w + h_space)
            common = dict(autorange=False, showticklabels=False, zeroline=False, range=[0.0, 1.0])
            layout[f"xaxis{ax}"] = dict(domain=[clip(x0), clip(x0 + w)], anchor=f"y{ax}", **common)
            layout[f"yaxis{ax}"] = dict(domain=[clip(y1 - h), clip(y1)], anchor=f"x{ax}", **common)
            if ci < len(r["steps"]):
                layout["annotations"].append(dict(text=f"step {r['steps'][ci]}", x=x0 + w / 2, y=clip(y1),
                                                  xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                                                  showarrow=False, font=dict(size=11)))
        layout["annotations"].append(dict(text=f"{r['run']} ({r['norm']})", x=1.0, y=clip(y1 - h / 2), xref="paper",
                                          yref="paper", xanchor="left", yanchor="middle", xshift=6, textangle=90,
                                          showarrow=False, font=dict(size=12)))
    return layout


# ============================================================================ cluster quality
def quality_figure(q: dict, metrics: Sequence[str], labels: dict, bands: dict[str, list[dict]], *, cols: int = 2,
                   height_per_row: int = 300) -> go.Figure:
    """A panel per metric against training step. In each panel: every run's line (markers at its
    snapshots; thin when its group has other runs), and for each group of several runs a ±1 sd band (its
    lower edge, then the upper edge filled down to it) and the mean line with error bars, on the steps the
    group's runs share; where they share fewer than 3 steps (extra seeds with their first and last snapshot
    only), the mean ± sd as markers with error bars and no band (a band would bridge the training between).
    Colours by group; legends once."""
    metrics = list(metrics)
    n = len(metrics)
    cols = max(1, min(cols, n))
    rows = int(math.ceil(n / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[labels[m] for m in metrics], shared_xaxes="all",
                        horizontal_spacing=0.08, vertical_spacing=min(0.18, 0.5 / max(rows, 1)))
    group_of = {m: gi for gi, g in enumerate(q["groups"]) for m in g["members"]}
    sizes = {gi: len(g["members"]) for gi, g in enumerate(q["groups"])}
    for mi, metric in enumerate(metrics):
        r, c = mi // cols + 1, mi % cols + 1
        for b in bands.get(metric, []):
            gi = next(i for i, g in enumerate(q["groups"]) if g["label"] == b["label"])
            col = color(gi)
            name = f"{b['label']} mean ± sd ({len(b['members'])} runs)"
            x = np.asarray(b["steps"])
            sparse = len(x) < 3  # e.g. the extra seeds' first and last snapshot only: no band across the gap
            if not sparse:
                fig.add_trace(go.Scatter(x=x, y=b["mean"] - b["sd"], mode="lines", line=dict(width=0, color=col),
                                         name=f"{name} − 1 sd", meta=f"{b['label']} − 1 sd · {metric}",
                                         legendgroup=f"g{gi}", showlegend=False, hoverinfo="skip"), row=r, col=c)
                fig.add_trace(go.Scatter(x=x, y=b["mean"] + b["sd"], mode="lines", line=dict(width=0, color=col),
                                         fill="tonexty", fillcolor=rgba(col, 0.18), name=f"{name} + 1 sd",
                                         meta=f"{b['label']} + 1 sd · {metric}", legendgroup=f"g{gi}",
                                         showlegend=False, hoverinfo="skip"), row=r, col=c)
            fig.add_trace(go.Scatter(x=x, y=b["mean"], mode="markers" if sparse else "lines+markers", name=name,
                                     meta=f"{b['label']} mean · {metric}", legendgroup=f"g{gi}", showlegend=mi == 0,
                                     line=dict(color=col, width=3), marker=dict(size=9 if sparse else 7,
                                                                                symbol="diamond" if sparse else "circle"),
                                     error_y=dict(type="data", array=b["sd"], visible=True, color=col, width=4),
                                     hovertemplate=f"{b['label']} mean<br>step %{{x}}<br>%{{y:.4g}} ± %{{error_y.array:.3g}}"
                                                   "<extra></extra>"), row=r, col=c)
        for ri_, run in enumerate(q["runs"]):
            gi = group_of.get(run["run"], len(q["groups"]) + ri_)
            many = sizes.get(gi, 1) > 1
            y = run["metrics"][metric]
            fig.add_trace(go.Scatter(x=np.asarray(run["steps"]), y=y,
                                     mode="lines+markers" if len(run["steps"]) >= 3 else "markers",  # no bridging
                                     name=f"{run['run']} ({run['norm']})", meta=f"{run['run']} · {metric}",
                                     legendgroup=f"r{run['run']}", showlegend=mi == 0,
                                     line=dict(color=color(gi), width=1.2 if many else 2, dash="dot" if many else "solid"),
                                     marker=dict(size=4 if many else 6),
                                     hovertemplate=f"{run['run']}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>"),
                          row=r, col=c)
    height = max(340, 80 + height_per_row * rows)
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=50, b=45), hovermode="closest",
                      legend=dict(title_text="run / group"))
    fig.update_xaxes(title_text="training step", title_font_size=11, row=rows)
    fig.update_annotations(font_size=12)
    return fig
