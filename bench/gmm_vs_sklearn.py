"""Time cbnorm.gmm.fit (G groups in one batched call) against a loop of G sklearn GaussianMixture fits.

Configs: G=64 groups, M=4096 points, D in {1, 16}, K=3, 5 EM iterations, on the same float32 data.
Repetitions are interleaved (ours, sklearn, ours, sklearn, ...) after one warm-up each; medians reported.
Both sides are limited to the same number of threads (torch.set_num_threads / threadpoolctl).

The log-likelihoods are both evaluated in float64 with cbnorm.gmm.mean_log_likelihood on the same data
(mean over points, then averaged over groups; higher is better).

Note on iteration counts: sklearn's init_params="k-means++" starts from the K seed points with variance
reg_covar and then runs max_iter=5 EM iterations; ours starts from the hard assignment of all points to the
k-means++ seeds (sklearn's k-means-label initialisation) and then runs iters=5 EM iterations.

Caveat: with 2 torch threads on a 2-core machine, any other busy process makes torch's OpenMP parallel
regions stall (oversubscription) and our timings jump by 10x or more while the (mostly single-threaded)
sklearn loop is barely affected; the JSON records the load average at start and end. Rerun on a quiet machine.

Usage: python bench/gmm_vs_sklearn.py [--threads 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model  # noqa: E402
from cbnorm import gmm  # noqa: E402

G, M, K, ITERS = 64, 4096, 3, 5


def make_data(d: int, seed: int = 0) -> np.ndarray:
    """(G, M, d) float32: per group, 3 Gaussian clusters with random centers, spreads and proportions."""
    rng = np.random.default_rng(seed)
    out = np.empty((G, M, d), dtype=np.float32)
    for g in range(G):
        centers = rng.normal(0.0, 3.0, (K, d))
        scales = rng.uniform(0.5, 1.5, (K, d))
        labels = rng.choice(K, size=M, p=rng.dirichlet(np.full(K, 5.0)))
        out[g] = centers[labels] + scales[labels] * rng.normal(size=(M, d))
    return out


def fit_ours(x: torch.Tensor, seed: int) -> gmm.GMM:
    return gmm.fit(x, K, iters=ITERS, generator=torch.Generator().manual_seed(seed))


def fit_sklearn(x: np.ndarray, seed: int) -> gmm.GMM:
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for g in range(x.shape[0]):
            models.append(GaussianMixture(n_components=K, covariance_type="diag", max_iter=ITERS, n_init=1,
                                          init_params="k-means++", tol=0, random_state=seed + g).fit(x[g]))
    return gmm.GMM(torch.tensor(np.stack([m.weights_ for m in models])),
                   torch.tensor(np.stack([m.means_ for m in models])),
                   torch.tensor(np.stack([m.covariances_ for m in models])))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gmm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    configs = []
    with threadpool_limits(limits=args.threads):
        for d in (1, 16):
            xn = make_data(d, seed=d)
            xt = torch.from_numpy(xn)
            x64 = xt.double()
            fit_ours(xt, 0), fit_sklearn(xn[:2], 0)  # warm-up
            t_ours, t_sk, ll_ours, ll_sk = [], [], [], []
            for rep in range(args.reps):
                t, model = timed(fit_ours, xt, rep)
                t_ours.append(t)
                ll_ours.append(gmm.mean_log_likelihood(model.to(torch.float64), x64).mean().item())
                t, model = timed(fit_sklearn, xn, 1000 * rep)
                t_sk.append(t)
                ll_sk.append(gmm.mean_log_likelihood(model, x64).mean().item())
            row = {
                "G": G, "M": M, "D": d, "K": K, "iters": ITERS, "dtype": "float32",
                "ours_s_median": statistics.median(t_ours), "sklearn_s_median": statistics.median(t_sk),
                "ours_s_all": t_ours, "sklearn_s_all": t_sk,
                "speedup_sklearn_over_ours": statistics.median(t_sk) / statistics.median(t_ours),
                "ours_mean_loglik_median": statistics.median(ll_ours),
                "sklearn_mean_loglik_median": statistics.median(ll_sk),
                "ours_mean_loglik_all": ll_ours, "sklearn_mean_loglik_all": ll_sk,
            }
            configs.append(row)
            print(f"D={d:2d}: ours {row['ours_s_median'] * 1e3:8.1f} ms   sklearn {row['sklearn_s_median'] * 1e3:8.1f} ms"
                  f"   speedup x{row['speedup_sklearn_over_ours']:.1f}   mean loglik ours "
                  f"{row['ours_mean_loglik_median']:.4f}  sklearn {row['sklearn_mean_loglik_median']:.4f}")

    result = {
        "benchmark": "cbnorm.gmm.fit (one batched call) vs loop of sklearn GaussianMixture fits",
        "configs": configs,
        "reps": args.reps,
        "timing": "median of interleaved repetitions after one warm-up",
        "loglik": "float64 mean over points of log p(x), averaged over the G groups",
        "env": {
            "torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "threadpool_limit": args.threads, "processor": platform.processor(), "cpu_model": cpu_model(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "note": "shared machine (other developers' jobs may run concurrently); timings are indicative",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
