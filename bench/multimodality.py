"""Time cbnorm.analysis.multimodality (every channel in one batched fit per K) against a loop over channels of
scikit-learn GaussianMixture fits (K = 1 .. 4 each, BIC), on the same float64 data; goal: at least 10x faster.

Data: 64 channels x 4,096 values, 16 channels each of 1, 2, 3 and 4 modes (random centres, spreads and
weights: the modes overlap in many channels, as activations do). Both sides use their defaults of
multimodality / GaussianMixture (k-means initialisation, EM to tol = 1e-3, at most 100 iterations,
reg_covar 1e-6) and pick the K with the lowest BIC. Repetitions interleave (ours, sklearn, ...) after one
warm-up each; medians reported. Both sides are limited to the same threads (torch.set_num_threads,
threadpoolctl). Agreement: the share of channels where both choose the same K, and the largest per-point
difference of the chosen K's BIC (|BIC_ours - BIC_sklearn| / 2M, nats).

Caveat: on a shared 2-core machine another busy process stalls torch's parallel regions; the JSON records
the load average at start and end. Rerun on a quiet machine.

Usage: python bench/multimodality.py [--threads 2] [--reps 3] [--out bench/results/multimodality.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model  # noqa: E402
from cbnorm.analysis import multimodality  # noqa: E402

G, M, MAX_K = 64, 4096, 4


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(G, M) float64 values and the true number of modes per channel (16 channels each of 1..4)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(1, MAX_K + 1), G // MAX_K)
    out = np.empty((G, M))
    for g, k in enumerate(truth):
        centers = rng.normal(0.0, 4.0, k)
        scales = rng.uniform(0.5, 1.5, k)
        labels = rng.choice(k, size=M, p=rng.dirichlet(np.full(k, 5.0)))
        out[g] = (centers[labels] + scales[labels] * rng.normal(size=M)) * rng.uniform(0.1, 10) + rng.normal(0, 5)
    return out, truth


def ours(v: np.ndarray, seed: int) -> dict:
    return multimodality(v, max_components=MAX_K, seed=seed)


def sklearn_loop(v: np.ndarray, seed: int) -> dict:
    bic = np.array([[GaussianMixture(k, random_state=seed).fit(row[:, None]).bic(row[:, None])
                     for k in range(1, MAX_K + 1)] for row in v])
    return {"best_k": bic.argmin(1) + 1, "bic": bic}


def probe_cost(reps: int) -> dict:
    """One probe of a ResNet-20 (19 BatchNorm layers, Fashion-MNIST-shaped input) on 32 images by
    ``cbnorm.watch``: 64 values per channel kept, without and with the scan on 1,024 values per channel
    (interleaved, medians): what ``scan=True`` adds to a probe step."""
    import tempfile

    import cbnorm
    from cbnorm.models import resnet20

    torch.manual_seed(0)
    model = resnet20(in_channels=1, num_classes=10)
    x = torch.randn(32, 1, 28, 28)
    out = {"without_scan": [], "with_scan": []}
    with tempfile.TemporaryDirectory() as d:
        recs = {"without_scan": cbnorm.watch(model, Path(d) / "a", probe=x, every=10 ** 6, values_per_channel=64),
                "with_scan": cbnorm.watch(model, Path(d) / "b", probe=x, every=10 ** 6, values_per_channel=64,
                                          scan=True, scan_values=1024)}
        for i in range(reps):
            for name, rec in recs.items():
                t0 = time.perf_counter()
                rec.probe(i + 1)
                out[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"model": "ResNet-20, 19 BatchNorm layers (688 channels), 32 images 1x28x28, 64 values kept",
            "seconds": {k: round(v, 3) for k, v in med.items()},
            "scan_adds_s": round(med["with_scan"] - med["without_scan"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multimodality.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    v, truth = make_data()
    load0 = os.getloadavg()[0]
    times = {"ours": [], "sklearn": []}
    with threadpool_limits(a.threads):
        res = {"ours": ours(v, 0), "sklearn": sklearn_loop(v, 0)}  # warm-up (and the results compared)
        for _ in range(a.reps):
            for name, fn in (("ours", ours), ("sklearn", sklearn_loop)):
                t0 = time.perf_counter()
                fn(v, 0)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    probe = probe_cost(a.reps)
    chosen = res["ours"]["best_k"] - 1
    diff = np.abs(res["ours"]["bic"][np.arange(G), chosen] - res["sklearn"]["bic"][np.arange(G), chosen]) / (2 * M)
    out = {
        "benchmark": "cbnorm.analysis.multimodality vs a loop of sklearn GaussianMixture over channels",
        "config": {"channels": G, "values": M, "max_components": MAX_K, "dtype": "float64", "threads": a.threads,
                   "reps": a.reps, "data": "16 channels each of 1, 2, 3, 4 modes (bench/multimodality.py)"},
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "sklearn": sklearn.__version__, "python": platform.python_version(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]},
        "seconds": {k: {"median": round(v_, 4), "all": [round(t, 4) for t in times[k]]} for k, v_ in med.items()},
        "speedup": round(med["sklearn"] / med["ours"], 1),
        "goal": "at least 10x faster than the sklearn loop", "meets_goal": med["sklearn"] / med["ours"] >= 10,
        "record_time_probe": probe,
        "agreement": {
            "same_k_share": float((res["ours"]["best_k"] == res["sklearn"]["best_k"]).mean()),
            "max_bic_diff_per_point_at_chosen_k": float(diff.max()),
            "ours_within_one_of_truth": float((np.abs(res["ours"]["best_k"] - truth) <= 1).mean()),
            "sklearn_within_one_of_truth": float((np.abs(res["sklearn"]["best_k"] - truth) <= 1).mean()),
            "ours_exact": float((res["ours"]["best_k"] == truth).mean()),
            "sklearn_exact": float((res["sklearn"]["best_k"] == truth).mean()),
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
