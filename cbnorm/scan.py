"""Where would a mixture help? The multimodality scan of every recorded normalization layer over training.

For each recorded layer and step, each channel's values (of the layer's input, or x_hat) are fitted with 1-D
Gaussian mixtures of K = 1 .. ``max_components`` and the K with the lowest BIC is kept
(:func:`cbnorm.analysis.multimodality`). A cell of the scan (one layer at one step) summarises its channels:
the share where more than one component wins, the median BIC gain over one Gaussian, the median smallest
weight among those channels and the median absolute skewness.

The scan is computed at record time (``cbnorm.watch(..., scan=True)``, ``python -m cbnorm.record RUN
--scan``: on ``scan_values`` values per channel, more than the summary keeps) and stored in the summary as
``{layer}::scan_{view}_{stat}`` (C,) tensors, so a viewer only reads it; for summaries recorded without it,
:func:`layer_scan` computes it from the values the summary kept (fewer values: less power to see modes; the
rows say which). Channels holding NaN or inf are not fitted: they get best_k 0 and are counted apart.

``python -m cbnorm.scan RUN_DIR [--view input] [--write]`` prints a run's scan (and stores it with --write).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from .analysis import multimodality
from .runs import Run, Summary, atomic_write_bytes, list_summaries, load_run, read_summary

__all__ = ["SCAN_VIEWS", "SCAN_STATS", "scan_values", "scan_tensors", "stored_scan", "layer_scan", "cell",
           "scan_run", "add_scan", "MAX_COMPONENTS"]

#: the views scanned: what enters the layer, and x_hat (what the normalizer aims at N(0, 1))
SCAN_VIEWS = ("input", "x_hat")
#: per-channel arrays of a scan
SCAN_STATS = ("best_k", "bic_gain", "min_weight", "skewness")
MAX_COMPONENTS = 4


def scan_values(values: Any, max_components: int = MAX_COMPONENTS, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`cbnorm.analysis.multimodality` of ``values`` (C, M), per channel, with channels that hold NaN
    or inf left out of the fit: their best_k is 0 and their other statistics 0. Returns the
    :data:`SCAN_STATS` arrays (C,) and ``finite`` (C,) bool."""
    v = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values),
                        dtype=torch.float64)
    if v.dim() != 2:
        raise ValueError(f"values must be (C, M), got shape {tuple(v.shape)}")
    finite = torch.isfinite(v).all(1).numpy()
    c = v.shape[0]
    out = {"best_k": np.zeros(c, np.int64), "bic_gain": np.zeros(c), "min_weight": np.zeros(c),
           "skewness": np.zeros(c), "finite": finite}
    if finite.any():
        mm = multimodality(v[torch.from_numpy(finite)], max_components=max_components, seed=seed)
        for k in SCAN_STATS:
            out[k][finite] = mm[k]
    return out


def scan_tensors(values: Mapping[str, Mapping[str, Any]], max_components: int = MAX_COMPONENTS,
                 seed: int = 0) -> dict[str, Tensor]:
    """The summary entries of a scan: ``values[layer][view]`` (C, M) -> ``{layer}::scan_{view}_{stat}``
    (C,) tensors (best_k int64, the others float32) for every view given."""
    out: dict[str, Tensor] = {}
    for layer, views in values.items():
        for view, v in views.items():
            s = scan_values(v, max_components, seed)
            for k in SCAN_STATS:
                t = torch.from_numpy(np.ascontiguousarray(s[k]))
                out[f"{layer}::scan_{view}_{k}"] = t if k == "best_k" else t.float()
    return out


def scan_meta_entry(values: int, max_components: int, seed: int) -> str:
    """The summary metadata entry "scan" (JSON): what the stored scan was computed on (:func:`scan_meta`)."""
    return json.dumps({"values": int(values), "max_components": int(max_components), "seed": int(seed)})


def stored_scan(summary: Summary, layer: str, view: str) -> Optional[dict[str, np.ndarray]]:
    """The scan stored in ``summary`` for ``layer`` and ``view`` (per-channel arrays), or None."""
    parts = {k: summary.tensors.get(f"{layer}::scan_{view}_{k}") for k in SCAN_STATS}
    if any(p is None for p in parts.values()):
        return None
    out = {k: p.numpy() for k, p in parts.items()}
    out["best_k"] = out["best_k"].astype(np.int64)
    out["finite"] = out["best_k"] > 0
    return out


def scan_meta(summary: Summary) -> dict:
    """What the stored scan was computed on ({"values", "max_components", "seed"}), {} when none."""
    try:
        return dict(json.loads(summary.meta.get("scan", "{}")))
    except ValueError:
        return {}


def layer_scan(summary: Summary, layer: str, view: str, max_components: int = MAX_COMPONENTS,
               seed: int = 0) -> tuple[dict[str, np.ndarray], str, int]:
    """The scan of ``layer``'s ``view`` at ``summary``'s step: (per-channel arrays, source, values per
    channel). Source "recorded" (stored at record time, on more values) or "computed" (here, from the values
    the summary kept)."""
    if view not in SCAN_VIEWS:
        raise ValueError(f"view must be one of {SCAN_VIEWS}, got {view!r}")
    s = stored_scan(summary, layer, view)
    if s is not None:
        return s, "recorded", int(scan_meta(summary).get("values", 0))
    v = summary.values(layer, view)
    return scan_values(v, max_components, seed), "computed", int(v.shape[1])


def cell(per_channel: Mapping[str, np.ndarray]) -> dict:
    """One cell of the scan from its per-channel arrays: channels (fitted), nonfinite_channels,
    share_multimodal (share of fitted channels where K > 1 wins), median_bic_gain, mean_best_k,
    median_min_weight (over the multimodal channels; None where there are none), median_abs_skewness."""
    ok = np.asarray(per_channel["finite"], bool)
    k = np.asarray(per_channel["best_k"])[ok]
    n = int(ok.sum())
    multi = k > 1
    if n == 0:
        return {"channels": 0, "nonfinite_channels": int((~ok).sum()), "share_multimodal": None,
                "median_bic_gain": None, "mean_best_k": None, "median_min_weight": None,
                "median_abs_skewness": None}
    mw = np.asarray(per_channel["min_weight"])[ok][multi]
    return {"channels": n, "nonfinite_channels": int((~ok).sum()), "share_multimodal": float(multi.mean()),
            "median_bic_gain": float(np.median(np.asarray(per_channel["bic_gain"])[ok])),
            "mean_best_k": float(k.mean()), "median_min_weight": float(np.median(mw)) if mw.size else None,
            "median_abs_skewness": float(np.median(np.abs(np.asarray(per_channel["skewness"])[ok])))}


def scan_run(run: Run, view: str = "input", layers: Optional[Sequence[str]] = None,
             steps: Optional[Sequence[int]] = None, max_components: int = MAX_COMPONENTS, seed: int = 0,
             progress: Optional[Callable[[float, str], None]] = None) -> list[dict]:
    """The scan of ``run`` (its recorded summaries): one row per (layer, step) with :func:`cell`'s figures and
    "run", "layer", "depth" (the layer's index in the recorded order, from the input), "step", "view",
    "source", "values". ``layers`` / ``steps``: a subset (default all recorded). ``ValueError`` for a run
    without recorded summaries, or a layer or step it did not record."""
    if not run.summaries:
        raise ValueError(f"run {run.path.name} has no recorded summaries: record it with cbnorm.watch(..., "
                         f"scan=True), or python -m cbnorm.record {run.path} --scan for a run with snapshots")
    recorded = [li.get("path") for li in (run.config.get("recorder") or {}).get("layers", [])]
    chosen = list(layers) if layers is not None else recorded
    missing = [ly for ly in chosen if ly not in recorded]
    if missing:
        raise ValueError(f"run {run.path.name} did not record {missing} (recorded: {recorded})")
    paths = dict(run.summaries)
    todo = [int(s) for s in (steps if steps is not None else paths)]
    absent = [s for s in todo if s not in paths]
    if absent:
        raise ValueError(f"run {run.path.name} has no summary at step(s) {absent} (recorded: {sorted(paths)})")
    rows = []
    for i, step in enumerate(todo):
        if progress is not None:
            progress(i / max(len(todo), 1), f"{run.path.name}: step {step} ({i + 1}/{len(todo)})")
        s = read_summary(paths[step])
        for layer in chosen:
            if layer not in s.layers():
                continue  # a layer not recorded at this step (the run changed): no cell
            per, source, n_values = layer_scan(s, layer, view, max_components, seed)
            rows.append({"run": run.path.name, "layer": layer, "depth": recorded.index(layer), "step": step,
                         "view": view, "source": source, "values": n_values, **cell(per)})
    if progress is not None:
        progress(1.0, "done")
    return rows


def add_scan(run_dir: Any, max_components: int = MAX_COMPONENTS, seed: int = 0, force: bool = False) -> int:
    """Store the scan in every summary of ``run_dir`` that lacks it (all with ``force``), computed from the
    values each summary kept; each file is rewritten whole (temporary file + rename). Returns the number of
    files written."""
    written = 0
    for _, path in list_summaries(Path(run_dir)):
        s = read_summary(path)
        if not force and all(stored_scan(s, ly, v) is not None for ly in s.layers() for v in SCAN_VIEWS):
            continue
        values = {ly: {v: s.values(ly, v) for v in SCAN_VIEWS} for ly in s.layers()}
        m = min((x.shape[1] for views in values.values() for x in views.values()), default=0)
        tensors = {k: t for k, t in s.tensors.items() if "::scan_" not in k}
        tensors.update(scan_tensors(values, max_components, seed))
        meta = dict(s.meta, scan=scan_meta_entry(m, max_components, seed))
        atomic_write_bytes(path, save(tensors, metadata=meta))
        written += 1
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cbnorm.scan RUN_DIR [...]``: print each run's scan (layers x steps: share of channels
    where a mixture wins, median BIC gain); ``--write`` stores it in the summaries that lack it."""
    p = argparse.ArgumentParser(prog="python -m cbnorm.scan", description=main.__doc__)
    p.add_argument("runs", nargs="+", help="recorded run directories")
    p.add_argument("--view", choices=SCAN_VIEWS, default="input")
    p.add_argument("--max-components", type=int, default=MAX_COMPONENTS)
    p.add_argument("--write", action="store_true", help="store the scan in summaries without one")
    a = p.parse_args(argv)
    status = 0
    for d in a.runs:
        try:
            if a.write:
                print(f"{d}: scan stored in {add_scan(d, a.max_components)} summaries", flush=True)
            rows = scan_run(load_run(d), a.view, max_components=a.max_components)
        except (ValueError, OSError) as err:
            print(f"{d}: {err}", file=sys.stderr)
            status = 1
            continue
        steps = sorted({r["step"] for r in rows})
        layers = sorted({(r["depth"], r["layer"]) for r in rows})
        by = {(r["layer"], r["step"]): r for r in rows}
        print(f"{d} ({a.view}): share of channels where K > 1 wins / median BIC gain")
        print(f"{'layer':28s}" + "".join(f"{s:>14d}" for s in steps))
        for _, ly in layers:
            cells = [by.get((ly, s)) for s in steps]
            print(f"{ly:28s}" + "".join(
                f"{'':>14s}" if c is None or c['share_multimodal'] is None
                else f"{c['share_multimodal']:>6.2f}/{c['median_bic_gain']:<7.1f}" for c in cells))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
