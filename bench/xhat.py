"""x_hat (normalized, before the affine) of the committed runs' studied layer against N(0, 1), beside the
input standardized per channel and the output after the affine (the README's x_hat table).

    python bench/xhat.py [--runs checkpoints] [--size 256] [--seed 0] [--out bench/results/xhat.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cbnorm  # noqa: E402
from cbnorm import analysis, probe  # noqa: E402
from cbnorm.data import load_dataset  # noqa: E402

RUNS = ["fmnist-bn", "fmnist-mode", "fmnist-gn", "fmnist-ln", "fmnist-mn", "fmnist-cn", "fmnist-acn"]


def measure(run_dir: Path, size: int, seed: int, layer: str = "blocks.conv3.norm") -> dict:
    run = cbnorm.load_run(run_dir)
    ds = load_dataset(run.config["dataset"]["name"], "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size, replace=False))
    cap = probe.capture(run.model, run.preprocess(ds.images[idx]), [layer])[layer]
    chans = list(range(cap.x_hat.shape[1]))
    xi, xh, xo = (analysis.channel_values(t, chans) for t in (cap.input, cap.x_hat, cap.output))
    si, sh, so = analysis.view_stats(xi, "input"), analysis.view_stats(xh, "x_hat"), analysis.view_stats(xo, "output")
    med = lambda d, k: float(np.median(np.abs(d[k])))  # noqa: E731
    var = xh.var(axis=1)
    return {"run": run_dir.name, "norm": run.norm, "layer": layer, "x_hat_var_median": float(np.median(var)),
            "x_hat_var_p10": float(np.percentile(var, 10)), "x_hat_var_p90": float(np.percentile(var, 90)),
            "x_hat_abs_mean_median": med(sh, "mean"), "ks_x_hat": med(sh, "ks_to_normal"),
            "ks_input_standardized": med(si, "ks_to_normal"), "skew_input": med(si, "skewness"),
            "skew_x_hat": med(sh, "skewness"), "kurt_input": med(si, "excess_kurtosis"),
            "kurt_x_hat": med(sh, "excess_kurtosis"), "output_std_median": float(np.median(so["std"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "checkpoints"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "xhat.json"))
    a = p.parse_args(argv)
    rows = [measure(Path(a.runs) / name, a.size, a.seed) for name in RUNS if (Path(a.runs) / name).is_dir()]
    for r in rows:
        print(f"{r['run']:12s} var(x_hat) {r['x_hat_var_median']:7.2f}  KS x_hat {r['ks_x_hat']:.3f}  "
              f"KS input (std.) {r['ks_input_standardized']:.3f}  output std {r['output_std_median']:.2f}")
    Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "size": a.size, "seed": a.seed,
                                       "method": "median over the layer's channels; input standardized per channel",
                                       "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
