"""Page 4, compare normalizers: learning curves and a summary table of several runs (with the MN paper's
"steps to reach BatchNorm's best"), a live panel running every chosen run's studied layer on the same
minibatch, and the benchmark results in bench/results (the speed and convergence plots' data, and a
generic listing of every result file)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import streamlit as st
import torch

from cbnorm import analysis
from cbnorm.runs import Run

from . import activations as A
from . import shared as S


def metric_curves(run: Run) -> dict:
    """Per-epoch (epoch, step, test_acc, test error, test loss) and per-step training loss of a run."""
    m = run.metrics
    ep = [e for e in m.get("epochs", []) if isinstance(e, dict)]
    loss = [p for p in m.get("loss", []) if isinstance(p, (list, tuple)) and len(p) == 2]
    f = lambda k: np.asarray([e.get(k) if e.get(k) is not None else np.nan for e in ep], dtype=np.float64)  # noqa
    acc = f("test_acc")
    return {"epoch": f("epoch"), "step": f("step"), "test_acc": acc, "test_error": 1.0 - acc,
            "test_loss": f("test_loss"), "loss_step": np.asarray([p[0] for p in loss], dtype=np.float64),
            "loss": np.asarray([p[1] for p in loss], dtype=np.float64)}


def error_series(names: Sequence[str], x_axis: str) -> list[dict]:
    """Test-error curves (one per run) against "epoch" or "step", for figures.curves_figure."""
    out = []
    for i, name in enumerate(names):
        c = metric_curves(S.run_by_name(name))
        out.append({"name": name, "x": c[x_axis], "y": c["test_error"], "markers": True, "color": i})
    return out


def loss_series(names: Sequence[str], x_axis: str, window: int) -> list[dict]:
    """Loss curves: against steps, the training loss (moving average over ``window`` steps, solid) and the
    test loss at each epoch end (dotted, markers); against epochs, the test loss only."""
    out = []
    for i, name in enumerate(names):
        c = metric_curves(S.run_by_name(name))
        if x_axis == "step" and c["loss"].size:
            out.append({"name": name, "x": c["loss_step"], "y": analysis.smooth(c["loss"], window),
                        "color": i, "group": name, "width": 1.5})
        out.append({"name": f"{name} (test)", "x": c[x_axis], "y": c["test_loss"], "color": i, "group": name,
                    "dash": "dot", "markers": True, "showlegend": x_axis != "step" or not c["loss"].size})
    return out


def compare_table(names: Sequence[str], reference: Optional[str]):
    """The comparison table: final (honest) and oracle accuracy, best accuracy, steps to reach the
    reference (BatchNorm) run's best accuracy, time per step, parameter count."""
    import pandas as pd

    rows = []
    target = None
    if reference:
        ref = S.run_by_name(reference)
        target = ref.metrics.get("best_test_acc")
        if target is None:
            target = float(np.nanmax(metric_curves(ref)["test_acc"]))
    for name in names:
        run = S.run_by_name(name)
        m, c = run.metrics, metric_curves(run)
        ok = np.isfinite(c["test_acc"])
        reach = analysis.steps_to_reach(c["step"][ok], c["test_acc"][ok], target) if target is not None else None
        rows.append({
            "run": name, "norm": run.norm,
            "test acc": m.get("test_acc"),
            "oracle acc": m.get("test_acc_oracle"),
            "best acc": m.get("best_test_acc"),
            "steps to BN best": reach,
            "s / step": S.finite_mean([e.get("time_per_step_s") for e in m.get("epochs", []) if isinstance(e, dict)]),
            "params": m.get("params") if m.get("params") is not None else sum(p.numel() for p in run.model.parameters()),
            "steps": m.get("steps_done")})
    return pd.DataFrame(rows), target


COMPARE_HELP = {
    "test acc": "Last-epoch test accuracy, honest: context layers get the context inferred from the image",
    "oracle acc": "Test accuracy with the true superclass given to context layers; it is derived from the label, "
                  "so it leaks the answer (an upper bound, not a result)",
    "best acc": "Best honest test accuracy over the epochs",
    "steps to BN best": "First evaluated step at which the test accuracy reaches the BatchNorm reference's best "
                        "(MN paper's measure); None = never",
    "s / step": "Mean training time per optimizer step, as the trainer measured it on its machine",
    "params": "Number of parameters", "steps": "Optimizer steps trained"}


@st.cache_data(max_entries=16, ttl=S.TTL, show_spinner=False)
def live_outputs(run_paths: tuple[str, ...], dev: str, size: int, seed: int, which: str = "output") -> list[dict]:
    """The studied layer of each run on the SAME minibatch (same test images): pooled values (capped at
    MAX_VALUES) and normality statistics (pooled, and median |.| over channels)."""
    runs = [S.get_run(p, dev) for p in run_paths]
    datasets = {A.dataset_name(r) for r in runs}
    if len(datasets) > 1:
        raise ValueError(f"the chosen runs use different datasets ({sorted(datasets)}); choose runs of one dataset "
                         f"to run them on the same minibatch")
    out = []
    for path, run in zip(run_paths, runs):
        layer = S.studied_layer(run)
        acts = A.layer_activations(path, dev, layer, size, seed, "predicted")
        info = acts["layer"]
        a = acts[which]
        chans = list(range(info["num_features"]))
        per = analysis.channel_values(torch.from_numpy(np.ascontiguousarray(a)), chans, channel_last=info["channel_last"])
        pooled = per.reshape(-1)
        sub = pooled.size > S.MAX_VALUES
        if sub:
            pooled = pooled[np.random.default_rng(seed).choice(pooled.size, S.MAX_VALUES, replace=False)]
        st_pool = analysis.normality_stats(pooled[None, :])
        st_ch = analysis.normality_stats(per)
        out.append({"name": run.path.name, "norm": run.norm, "layer": layer, "values": pooled.astype(np.float32),
                    "subsampled": sub, "pooled": {k: float(v[0]) for k, v in st_pool.items()},
                    "channel_median": {k: float(np.median(np.abs(v))) for k, v in st_ch.items()}})
    return out


def live_table(outs: Sequence[dict]):
    import pandas as pd

    return pd.DataFrame([{
        "run": o["name"], "layer": o["layer"], "mean": o["pooled"]["mean"], "std": o["pooled"]["std"],
        "skew": o["pooled"]["skewness"], "ex. kurt": o["pooled"]["excess_kurtosis"],
        "KS": o["pooled"]["ks_to_normal"],
        "med |skew| per ch.": o["channel_median"]["skewness"],
        "med |ex. kurt| per ch.": o["channel_median"]["excess_kurtosis"],
        "med KS per ch.": o["channel_median"]["ks_to_normal"]} for o in outs])


LIVE_HELP = {
    "mean": "Mean of all values (channels pooled)", "std": "Standard deviation of all values",
    "skew": "Skewness of the pooled values (0: symmetric)", "ex. kurt": "Excess kurtosis of the pooled values (0: Gaussian)",
    "KS": "Kolmogorov-Smirnov distance of the pooled values to N(0, 1)",
    "med |skew| per ch.": "Median over channels of |skewness| of each channel's values",
    "med |ex. kurt| per ch.": "Median over channels of |excess kurtosis|",
    "med KS per ch.": "Median over channels of the KS distance to N(0, 1)"}


# ============================================================================ benchmark results
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            if v and all(isinstance(x, (int, float, str, bool)) or x is None for x in v) and len(v) <= 4:
                out[key] = ", ".join(str(x) for x in v)
            # longer lists (per-repetition timings) are left out of the table
        else:
            out[key] = v
    return out


@st.cache_data(max_entries=8, ttl=300, show_spinner=False)
def bench_json(path: str) -> Optional[dict]:
    """One benchmark result file as a dict; None when it is missing or is not a readable JSON object (the
    generic listing below says why)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def bench_plot_data(bench_dir: str) -> dict:
    """What the benchmark plots need, each entry present only when its file holds it: ``speed_layers``,
    ``speed_goals``, ``speed_machine`` (speed.json) and ``convergence_runs``, ``convergence_budget``
    (convergence.json). Records that lack the fields the figures read are dropped."""
    out: dict = {}
    speed = bench_json(str(Path(bench_dir) / "speed.json")) or {}
    layers = [r for r in speed.get("layers") or [] if isinstance(r, dict)
              and {"layer", "shape", "K", "ratio_to_bn"} <= set(r) and isinstance(r["shape"], list)]
    if layers:
        out["speed_layers"] = layers
        out["speed_goals"] = {k: v for k, v in (speed.get("goals") or {}).items() if isinstance(v, (int, float))}
        out["speed_machine"] = speed.get("machine") if isinstance(speed.get("machine"), dict) else {}
    conv = bench_json(str(Path(bench_dir) / "convergence.json")) or {}
    runs = [r for r in conv.get("runs") or [] if isinstance(r, dict) and "norm" in r and "curve" in r
            and isinstance(r["curve"], list) and r["curve"]]
    if runs:
        out["convergence_runs"] = runs
        out["convergence_budget"] = conv.get("budget") if isinstance(conv.get("budget"), dict) else {}
    return out


@st.cache_data(max_entries=4, ttl=300, show_spinner=False)
def bench_results(bench_dir: str) -> list[dict]:
    """Every ``*.json`` in ``bench_dir``: its tables (lists of records), the machine it ran on
    (a "machine" or "env" object) and its other scalar fields; unreadable files come with ``error``."""
    out = []
    d = Path(bench_dir)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        entry: dict[str, Any] = {"name": p.name, "tables": [], "machine": None, "fields": {}, "error": None}
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            entry["error"] = f"{p.name} cannot be read: {err}"
            out.append(entry)
            continue
        for k, v in obj.items():
            if k in ("machine", "env") and isinstance(v, dict):
                entry["machine"] = _flat(v)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                entry["tables"].append((k, [_flat(x) for x in v]))
            elif isinstance(v, dict):
                subt = {kk: vv for kk, vv in v.items() if isinstance(vv, list) and vv and all(isinstance(x, dict) for x in vv)}
                for kk, vv in subt.items():
                    entry["tables"].append((f"{k}.{kk}", [_flat(x) for x in vv]))
                rest = {kk: vv for kk, vv in v.items() if kk not in subt}
                if rest:
                    entry["fields"].update(_flat(rest, k + "."))
            elif not isinstance(v, list):
                entry["fields"][k] = v
        out.append(entry)
    return out
