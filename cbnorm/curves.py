"""Learning curves of runs and their summary over seeds: each run's dense test curve, mean ± sd curves per
norm, the reference (the maximum of BatchNorm's mean curve, the MN paper's Table 3), the steps each norm needs
to reach it (per seed, with a 95% bootstrap interval) and whether best accuracies differ beyond the seed spread
(Welch's t-test). Shared by sweeps (``cbnorm.train.sweep``), the app's Compare page and
``checkpoints/table.py``; it imports no trainer. The summary's fields are described in ``cbnorm.train.sweep``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["curve_of", "summarize_groups"]


def curve_of(metrics: Mapping) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, test accuracy, source) of a run: its dense subset curve ("evals") or its epoch ends."""
    ev = metrics.get("evals") or []
    if ev:
        return (np.array([e["step"] for e in ev], dtype=np.int64), np.array([e["test_acc"] for e in ev]), "evals")
    ep = metrics.get("epochs") or []
    return (np.array([e["step"] for e in ep], dtype=np.int64), np.array([e["test_acc"] for e in ep]), "epochs")


def _first_reach(steps: np.ndarray, acc: np.ndarray, ref: float) -> Optional[int]:
    hit = np.nonzero(acc >= ref - 1e-12)[0]
    return int(steps[hit[0]]) if hit.size else None


def _bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Optional[list[float]]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _group(runs: Sequence[tuple[int, dict]]) -> dict:
    """Mean +- sd curve over seeds on the steps every seed has."""
    curves = {seed: curve_of(m) for seed, m in runs}
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves.values())))
    mat = np.array([[dict(zip(c[0].tolist(), c[1].tolist()))[s] for s in common] for c in curves.values()])
    return {"seeds": [s for s, _ in runs], "steps": common, "curves": mat.tolist(),
            "mean": mat.mean(axis=0).tolist(), "sd": (mat.std(axis=0, ddof=1) if len(runs) > 1
                                                      else np.zeros(len(common))).tolist(),
            "source": next(iter(curves.values()))[2],
            "best_acc": [float(c[1].max()) for c in curves.values()],
            "final_test_acc": [m.get("test_acc") for _, m in runs],
            "wall_s": [(m.get("epochs") or [{}])[-1].get("wall") for _, m in runs],
            "steps_done": [m.get("steps_done") for _, m in runs]}


def summarize_groups(settings: Mapping[str, Mapping[str, Sequence[tuple[int, Mapping]]]], reference: str = "bn"
                     ) -> dict:
    """The summary (module docstring) of runs grouped as {setting: {norm: [(seed, metrics.json dict), ...]}}."""
    result: dict[str, Any] = {"reference_norm": reference, "settings": {}}
    for name, groups in settings.items():
        setting = {norm: _group(runs) for norm, runs in groups.items() if runs}
        if not setting:
            continue
        ref = setting.get(reference)
        entry: dict[str, Any] = {"norms": setting}
        if ref is not None:
            ref_mean = np.asarray(ref["mean"])
            ref_acc = float(ref_mean.max())
            ref_step = int(ref["steps"][int(ref_mean.argmax())])
            entry.update(reference_acc=ref_acc, reference_step=ref_step)
            for norm, g in setting.items():
                steps = np.asarray(g["steps"])
                mean_step = _first_reach(steps, np.asarray(g["mean"]), ref_acc)
                per_seed = [_first_reach(steps, np.asarray(c), ref_acc) for c in g["curves"]]
                reached = [s for s in per_seed if s is not None]
                b_x, b_r = np.asarray(g["best_acc"]), np.asarray(ref["best_acc"])
                diff = float(b_x.mean() - b_r.mean())
                se = float(np.sqrt((b_x.var(ddof=1) / b_x.size if b_x.size > 1 else 0.0)
                                   + (b_r.var(ddof=1) / b_r.size if b_r.size > 1 else 0.0)))
                p = (float(stats.ttest_ind(b_x, b_r, equal_var=False).pvalue)
                     if norm != reference and b_x.size > 1 and b_r.size > 1 and se > 0 else None)
                all_reached = len(reached) == len(per_seed)
                g.update(steps_to_reference=mean_step, steps_to_reference_per_seed=per_seed,
                         steps_to_reference_mean=float(np.mean(reached)) if all_reached else None,
                         steps_to_reference_ci95=_bootstrap_mean(reached) if all_reached else None,
                         seeds_reaching_reference=len(reached),
                         reduction_vs_reference_pct=(100.0 * (1 - mean_step / ref_step)
                                                     if mean_step is not None and ref_step else None),
                         best_acc_mean=float(b_x.mean()), best_acc_sd=float(b_x.std(ddof=1)) if b_x.size > 1 else 0.0,
                         best_acc_diff_to_reference=diff, best_acc_diff_se=se, welch_p=p,
                         difference_exceeds_seed_spread=(abs(diff) > 2 * se) if norm != reference and se > 0 else None)
        result["settings"][name] = entry
    return result
