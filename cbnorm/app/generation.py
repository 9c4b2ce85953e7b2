"""Page 5, image generation: the GAN runs (task "gan", cbnorm.train.gan) side by side — the same fixed latent
vectors drawn by each run's generator at a chosen snapshot (sample grids), an animation over snapshots,
the score curves (FD in classifier features, k-NN precision / recall, modes) and the class histogram of the
samples; plus the latent minibatches through which the histogram and cluster pages reach the generator's
norm layers (:func:`latent_batch`, :func:`latent_sample`).

Caching: grids per (run, snapshot) in ``st.cache_data`` (small uint8 arrays); the feature classifier that
names the class of a latent's sample is a shared resource (``st.cache_resource``). Plotly figures of this
page are built here (they are specific to it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from cbnorm.metrics import SCORE_NAME, generate, to_uint8
from cbnorm.runs import Run
from cbnorm.gan import fixed_latents, image_grid, load_classifier, resolve_classifier

from . import shared as S
from .figures import color

__all__ = ["gan_runs", "run_label", "snapshot_steps", "common_steps", "sample_grid", "grid_animation", "score_figure",
           "class_bar_figure", "score_table", "eval_at", "norm_index", "NORM_ORDER", "bench_rows", "latent_batch", "latent_sample", "bench_result", "METRICS"]

#: score name -> (label, lower is better)
METRICS = {"fd": (SCORE_NAME, True), "precision": ("precision (k-NN)", False), "recall": ("recall (k-NN)", False),
           "modes": ("modes (classes with ≥ 1% of the samples)", False),
           "evenness": ("evenness (normalized entropy of the classes)", False)}


def _task_of(path: Path) -> Optional[str]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return cfg.get("task") if isinstance(cfg, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def gan_runs() -> list[dict]:
    """Inventory entries of the GAN runs: loadable runs of task "gan", and damaged run directories whose
    config.json says task "gan" (so that choosing one shows its error)."""
    out = []
    for r in S.runs_overview():
        if r["ok"] and r.get("task") == "gan":
            out.append(r)
        elif not r["ok"] and _task_of(Path(r["path"])) == "gan":
            out.append(r)
    return out


def run_label(run: Run) -> str:
    seed = (run.config.get("training") or {}).get("seed")
    return f"{run.path.name} · {run.norm} at {','.join(run.config.get('layers') or [])} · seed {seed}"


def snapshot_steps(run: Run) -> list[int]:
    return [s for s, _ in run.snapshots]


def common_steps(runs: Sequence[Run]) -> list[int]:
    """Snapshot steps every run has (the animation's frames); the union when they share none."""
    sets = [set(snapshot_steps(r)) for r in runs]
    if not sets:
        return []
    common = set.intersection(*sets)
    return sorted(common or set.union(*sets))


@st.cache_data(max_entries=256, ttl=S.TTL, show_spinner=False)
def sample_grid(run_path: str, dev: str, step: Optional[int], nrow: int = 8) -> np.ndarray:
    """The run's fixed latents drawn by its generator at snapshot ``step`` (None: the final weights), as one
    uint8 grid image (H, W) or (H, W, 3)."""
    run = S.get_run(run_path, dev)
    z = fixed_latents(run)
    model = run.model if step is None else run.load_snapshot(int(step))
    lock = S.model_lock(run_path, dev) if step is None else None
    if lock is not None:
        lock.acquire()
    try:
        x = generate(model, z)
    finally:
        if lock is not None:
            lock.release()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the generator of {run.path.name} at step {step} produced NaN or inf values")
    return image_grid(to_uint8(x), nrow=nrow)


def nearest_step(run: Run, step: int) -> Optional[int]:
    """The run's last snapshot at or before ``step`` (its first when none)."""
    steps = snapshot_steps(run)
    if not steps:
        return None
    before = [s for s in steps if s <= step]
    return before[-1] if before else steps[0]


def evals(run: Run) -> list[dict]:
    return [e for e in run.metrics.get("evals", []) if isinstance(e, dict) and "step" in e]


def eval_at(run: Run, step: int) -> Optional[dict]:
    """The evaluation at ``step`` or the last one before it."""
    ev = [e for e in evals(run) if e["step"] <= step]
    return ev[-1] if ev else None


def _finite(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


#: colour order of the norms on this page: BatchNorm first (the baseline), then the papers' layers
NORM_ORDER = ("bn", "mn", "acn")


def norm_index(norm: str, norms: Sequence[str]) -> int:
    """Colour index of ``norm`` among the shown ``norms``: BN, MN, ACN first, others after."""
    order = [n for n in NORM_ORDER if n in norms] + sorted(n for n in norms if n not in NORM_ORDER)
    return order.index(norm)


def score_figure(runs: Sequence[Run], metric: str = "fd", step: Optional[int] = None) -> go.Figure:
    """``metric`` against generator updates, one line per run (colour per norm, dash per seed; FD on a log
    axis, step 0's untrained generator is ~10x the rest); a dotted vertical line at the shown snapshot."""
    label, lower = METRICS[metric]
    norms = sorted({r.norm for r in runs})
    fig = go.Figure()
    for r in runs:
        ev = evals(r)
        seed = (r.config.get("training") or {}).get("seed", 0)
        fig.add_trace(go.Scatter(
            x=np.array([e["step"] for e in ev]), y=np.array([_finite(e.get(metric)) for e in ev], dtype=float),
            mode="lines+markers", name=run_label(r),
            line={"color": color(norm_index(r.norm, norms)), "dash": ["solid", "dash", "dot", "dashdot"][int(seed) % 4]}))
    if step is not None:
        fig.add_vline(x=step, line_dash="dot", line_color="#888888")
    fig.update_layout(xaxis_title="generator updates", yaxis_title=label + (" (lower is better)" if lower else ""),
                      yaxis_type="log" if metric == "fd" else "linear", height=380, margin={"t": 30, "b": 40, "l": 60, "r": 10}, legend={"font": {"size": 11}})
    return fig


def class_bar_figure(runs: Sequence[Run], step: int, class_names: Sequence[str]) -> go.Figure:
    """Share of the scored samples the classifier puts in each class, per run, at the evaluation at or
    before ``step`` (mode collapse: bars piling into few classes)."""
    fig = go.Figure()
    norms = sorted({r.norm for r in runs})
    for r in runs:
        e = eval_at(r, step)
        counts = np.asarray((e or {}).get("counts") or [], float)
        if counts.size != len(class_names) or counts.sum() <= 0:
            continue
        fig.add_trace(go.Bar(x=list(class_names), y=counts / counts.sum(), name=f"{r.path.name} (step {e['step']})",
                             marker_color=color(norm_index(r.norm, norms))))
    fig.add_hline(y=1.0 / max(1, len(class_names)), line_dash="dot", line_color="#888888",
                  annotation_text="uniform", annotation_position="top right")
    fig.update_layout(barmode="group", yaxis_title="share of samples", yaxis_tickformat=".0%", height=340,
                      margin={"t": 30, "b": 60, "l": 60, "r": 10}, legend={"font": {"size": 11}})
    return fig


def grid_animation(runs: Sequence[Run], steps: Sequence[int], dev: str) -> go.Figure:
    """One frame per snapshot step: the runs' sample grids side by side (same latents), with a play button
    (every snapshot from the first) and a slider; the last snapshot is shown first."""
    frames_img = []
    for s in steps:
        tiles = [sample_grid(str(r.path), dev, nearest_step(r, s)) for r in runs]
        h = max(t.shape[0] for t in tiles)
        gap = np.full((h, 6) + tiles[0].shape[2:], 255, np.uint8)
        row = []
        for i, t in enumerate(tiles):
            if t.shape[0] < h:
                t = np.pad(t, [(0, h - t.shape[0])] + [(0, 0)] * (t.ndim - 1), constant_values=255)
            row += [t] + ([gap] if i < len(tiles) - 1 else [])
        img = np.concatenate(row, axis=1)
        frames_img.append(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img)
    width = frames_img[0].shape[1]
    titles = [r.path.name for r in runs]
    tile_w = (width - 6 * (len(runs) - 1)) / max(1, len(runs))
    annotations = [{"x": i * (tile_w + 6) + tile_w / 2, "y": -8, "xref": "x", "yref": "y", "text": t,
                    "showarrow": False, "font": {"size": 12}} for i, t in enumerate(titles)]
    last = len(steps) - 1  # shown first: the trained generators; Play runs every snapshot from the first
    fig = go.Figure(data=[go.Image(z=frames_img[last])],
                    frames=[go.Frame(data=[go.Image(z=f)], name=str(s)) for f, s in zip(frames_img, steps)])
    play = {"frame": {"duration": 700, "redraw": True}, "fromcurrent": False, "transition": {"duration": 0}}
    fig.update_layout(
        annotations=annotations, height=int(380 * max(1.0, frames_img[0].shape[0] / 300)),
        margin={"t": 60, "b": 10, "l": 10, "r": 10}, xaxis={"visible": False},
        yaxis={"visible": False, "range": [frames_img[0].shape[0], -20]},
        updatemenus=[{"type": "buttons", "direction": "left", "showactive": False, "x": 0, "y": 1.0,
                      "xanchor": "left", "yanchor": "bottom", "pad": {"b": 8},
                      "buttons": [{"label": "▶ Play", "method": "animate", "args": [[str(s) for s in steps], play]},
                                  {"label": "❚❚ Pause", "method": "animate",
                                   "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]}]}],
        sliders=[{"active": last, "currentvalue": {"prefix": "generator updates: "}, "pad": {"t": 10},
                  "steps": [{"label": str(s), "method": "animate",
                             "args": [[str(s)], {"frame": {"duration": 0, "redraw": True}, "mode": "immediate"}]}
                            for s in steps]}])
    return fig


def score_table(runs: Sequence[Run]) -> list[dict]:
    """One row per run: best and final scores, time per step, sizes."""
    rows = []
    for r in runs:
        ev = evals(r)
        last = ev[-1] if ev else {}
        m = r.metrics
        rows.append({"run": r.path.name, "norm": r.norm, "layers": ", ".join(r.config.get("layers") or []),
                     "seed": (r.config.get("training") or {}).get("seed"), "steps": m.get("steps_done"),
                     "best FD": _finite(m.get("best_fd")), "at step": m.get("best_fd_step"),
                     "final FD": _finite(last.get("fd")), "precision": _finite(last.get("precision")),
                     "recall": _finite(last.get("recall")), "modes": last.get("modes"),
                     "evenness": _finite(last.get("evenness")),
                     "wall ms / step": None if _finite(m.get("time_per_step_s")) is None
                     else 1000 * float(m["time_per_step_s"]),
                     "generator params": m.get("params")})
    return rows


def bench_rows(bench: dict) -> list[dict]:
    """The benchmark table of page 5: per norm, best FD over seeds (mean, sd), the steps its mean curve needs
    to reach BN's best, and the CPU time per step measured with the norms interleaved (``step_timing``; the
    runs' own wall times are inflated by whatever else ran on the machine)."""
    rows = []
    timing = bench.get("step_timing") or {}
    for n, o in (bench.get("by_norm") or {}).items():
        best = o.get("best_fd") or {}
        t = (timing.get(n) or {}).get("cpu_s_per_step_mean")
        rows.append({"norm": n, "seeds": len(o.get("seeds", [])), "best FD mean": _finite(best.get("mean")),
                     "sd": _finite(best.get("sd")), "steps to BN's best (mean curve)": o.get("steps_to_bn_best_mean_curve"),
                     "fewer steps than BN (%)": _finite(o.get("reduction_vs_bn_pct")),
                     "CPU ms / step": None if _finite(t) is None else 1000 * float(t),
                     "vs BN": _finite((timing.get(n) or {}).get("ratio_to_bn"))})
    return rows


def bench_result() -> Optional[dict]:
    """bench/results/gan.json (python bench/gan.py report), or None."""
    p = S.bench_dir() / "gan.json"
    if not p.is_file():
        return None
    try:
        out = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


# ============================================================================ latents for the probe pages
@st.cache_resource(max_entries=4, ttl=S.TTL, show_spinner="Loading the feature classifier…")
def _classifier(path: str, sha: Optional[str]):
    return load_classifier(path, sha)[0]


def _latents(run: Run, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(int(size), int(run.config["latent"]["dim"]), generator=g)


@st.cache_data(max_entries=32, ttl=S.TTL, show_spinner=False)
def _sample_classes(run_path: str, dev: str, size: int, seed: int) -> np.ndarray:
    """The feature classifier's class of the final generator's sample of each latent of the batch."""
    run = S.get_run(run_path, dev)
    ev = run.config.get("evaluation") or {}
    feats = _classifier(str(resolve_classifier(run.path, run.config)), ev.get("classifier_sha256"))
    with S.model_lock(run_path, dev):
        x = generate(run.model, _latents(run, size, seed))
    return feats(to_uint8(x))[1].astype(np.int64)


def latent_batch(run: Run, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """What ``activations.test_batch`` gives for a GAN run: ``size`` latent vectors drawn with ``seed`` (the
    generator's input), their indices 0..size-1 and as "labels" the class the feature classifier gives the
    final generator's sample of each latent (so the cluster page colours latents by what they become)."""
    z = _latents(run, size, seed).to(run.device)
    return z, np.arange(int(size)), _sample_classes(str(run.path), S.device(), int(size), int(seed))


def latent_sample(run: Run, size: int, seed: int) -> dict:
    """What ``evolution.evolution_sample`` gives for a GAN run (see :func:`latent_batch`)."""
    _, idx, labels = latent_batch(run, size, seed)
    return {"indices": idx, "labels": labels, "contexts": None, "total": int(size)}
