"""The GAN experiment: DCGAN on Fashion-MNIST with BN, MN and ACN in the generator (MN paper Sec. 4.5 /
Fig. 6, PKN paper Sec. IV-B / Fig. 5), trained on this CPU, and its report.

    python bench/gan.py train [--names bn-s0 mn-s0 ...] [--threads 1]   # the committed runs, one after another
    python bench/gan.py report                                          # -> bench/results/gan.json

``train`` skips finished runs, resumes interrupted ones (``--resume`` from the last evaluation) and deletes
each finished run's resume.safetensors (discriminator and optimizer state: not committed, the app never
reads it). ``report`` reads the runs' metrics.json (it trains nothing), recomputes nothing, and writes per
run the score at each evaluation, the steps to reach BN's best score (the MN paper's "~58% faster"
measure) and the time per step; per norm the mean and spread over seeds; the papers' numbers beside ours.

Protocol (the same for every run; see RECIPE): Fashion-MNIST train split (60,000 images, [-1, 1]), DCGAN
generator width 8 (linear -> 64x3x3, deconvolutions to 32x7x7, 16x14x14, 8x28x28, 1x28x28; 66k parameters),
discriminator width 8, latent 64, batch 64, Adam lr 2e-4 betas (0, 0.9) for both, non-saturating loss,
2,500 generator updates, scores every 250 updates on 5,000 samples (generator in eval mode, the same
latents for every run) against the 10,000 test images in the features of checkpoints/gan-features/classifier
(a frozen copy of checkpoints/fmnist-bn: the shallow CNN at width 0.25, test accuracy 0.8917; features = its
64-d global-average-pooled conv4 output). MN (K = 3, "EM iter. 2" = 1 k-means + 1 EM step, as
bench/reproduce_mn.py reads the paper) and ACN (K = 3, the library's defaults) replace the norms after the
first two deconvolutions (norm1, norm2; the MN paper's placement), BatchNorm elsewhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gan.json"
CHECKPOINTS = ROOT / "checkpoints"

RECIPE = ["--dataset", "fashion-mnist", "--width", "8", "--latent-dim", "64", "--batch-size", "64", "--lr", "2e-4",
          "--beta1", "0", "--beta2", "0.9", "--steps", "2500", "--eval-every", "250", "--eval-samples", "5000",
          "--pr-samples", "5000", "--pr-k", "3", "--snapshot-every", "500", "--num-fixed", "64", "--quiet"]
NORMS = {
    "bn": ["--norm", "bn", "--layers", "*"],
    "mn": ["--norm", "mn", "--layers", "norm1,norm2", "--components", "3",
           "--norm-kwargs", json.dumps({"em_iters": 1, "kmeans_iters": 1})],
    "acn": ["--norm", "acn", "--layers", "norm1,norm2", "--components", "3"],
}
SEEDS = (0, 1)
#: training order: one run of each norm first, so that a cut-short budget still has all three
ORDER = [f"{n}-s{s}" for s in SEEDS for n in NORMS]

PAPERS = {
    "mixture-normalization.txt Sec. 4.5 / Fig. 6": {
        "setting": "DCGAN on CIFAR-10, MN (K=3, 2 EM iterations) at the generator's first two deconvolutions, "
                   "Adam 2e-4 (0, 0.9), 100k updates, FID (Inception) every 10k",
        "fid_bn_best": 37.56, "fid_bn_best_step": 60000, "fid_mn_best": 33.35, "mn_steps_to_bn_best": 25000,
        "reduction": "~58%"},
    "prior-knowledge-normalization.txt Sec. IV-B / Fig. 5": {
        "setting": "DCGAN on CIFAR-100, BN / MixNorm / ACN (K=3) in the generator, Adam 2e-4 (0, 0.9), 200 "
                   "epochs, FID every 10 epochs",
        "claim": "ACN converges fastest and reaches the lowest FID; MixNorm and ACN samples more diverse (Fig. 6)",
        "numbers": "none in the text (curves only)"},
}


def run_dir(name: str) -> Path:
    return CHECKPOINTS / f"gan-fmnist-{name}"


def _done(d: Path) -> bool:
    try:
        m = json.loads((d / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    steps = int(RECIPE[RECIPE.index("--steps") + 1])
    return m.get("steps_done") == steps and not (d / "resume.safetensors").exists()


def train(names, threads: int) -> None:
    for name in names:
        norm, seed = name.rsplit("-s", 1)
        d = run_dir(name)
        if _done(d):
            print(f"== {d.name}: done", flush=True)
            continue
        cmd = [sys.executable, "-m", "cbnorm.train.gan", *RECIPE, *NORMS[norm], "--seed", seed,
               "--threads", str(threads), "--out", str(d)]
        if (d / "resume.safetensors").exists():
            cmd.append("--resume")
        elif d.exists():
            shutil.rmtree(d)
        print(f"== {d.name}: {' '.join(cmd[1:])}", flush=True)
        t0, c0 = time.time(), os.times()
        subprocess.run(cmd, check=True, cwd=ROOT)
        c1 = os.times()
        print(f"   {time.time() - t0:.0f} s wall, {c1.children_user - c0.children_user + c1.children_system - c0.children_system:.0f} s CPU",
              flush=True)
        (d / "resume.safetensors").unlink(missing_ok=True)


# ============================================================================ time per step
def step_timing(steps: int = 40, repeats: int = 3, warmup: int = 5) -> dict:
    """CPU seconds per training step (discriminator + generator update, batch 64, the recipe's networks) of
    each norm, measured in this process at 1 thread, the norms interleaved ``repeats`` times so that the
    load of a shared machine falls on all of them alike; process CPU time, not wall time."""
    import torch
    import torch.nn.functional as F

    from cbnorm.models.dcgan import DCGANDiscriminator, DCGANGenerator

    torch.set_num_threads(1)
    out: dict[str, list[float]] = {n: [] for n in NORMS}
    kw = {"bn": ({}, ("*",)), "mn": ({"num_components": 3, "em_iters": 1, "kmeans_iters": 1}, ("norm1", "norm2")),
          "acn": ({"num_components": 3}, ("norm1", "norm2"))}
    for _ in range(repeats):
        for norm in NORMS:
            torch.manual_seed(0)
            g = DCGANGenerator(64, 1, 28, width=8, norm=norm, norm_layers=kw[norm][1], norm_kwargs=kw[norm][0])
            d = DCGANDiscriminator(1, 28, width=8)
            og = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.0, 0.9))
            od = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.0, 0.9))
            real = torch.rand(64, 1, 28, 28) * 2 - 1
            for i in range(warmup + steps):
                if i == warmup:
                    t0 = time.process_time()
                fake = g(torch.randn(64, 64))
                ld = F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()
                od.zero_grad()
                ld.backward()
                od.step()
                lg = F.softplus(-d(fake)).mean()
                og.zero_grad()
                lg.backward()
                og.step()
            out[norm].append((time.process_time() - t0) / steps)
    return {n: {"cpu_s_per_step_mean": float(np.mean(v)), "cpu_s_per_step_sd": float(np.std(v, ddof=1)),
                "repeats": v, "ratio_to_bn": float(np.mean(v) / np.mean(out["bn"]))} for n, v in out.items()}


# ============================================================================ report
def steps_to_reach(evals: list[dict], target: float):
    """First evaluated step whose FD is <= target (None when never)."""
    for e in evals:
        if math.isfinite(e["fd"]) and e["fd"] <= target:
            return e["step"]
    return None


def verdict(by_norm: dict, target: dict) -> str:
    """One plain sentence per norm against BN, from the numbers (no threshold tuned to any claim): the best FD
    (mean +- sd over seeds), whether the mean curve reaches BN's best and when, and the CPU-time ratio."""
    if "bn" not in by_norm or not target:
        return "no BN runs: nothing to compare with"
    bn = by_norm["bn"]["best_fd"]
    out = [f"BN's best FD {bn['mean']:.2f} +- {bn['sd'] or 0:.2f} at step {target['bn_best_step_mean_curve']}"]
    for n, o in by_norm.items():
        if n == "bn":
            continue
        b = o["best_fd"]
        diff = b["mean"] - bn["mean"]
        spread = math.hypot(b["sd"] or 0.0, bn["sd"] or 0.0)
        where = ("within the seeds' spread of" if abs(diff) <= spread else "worse than" if diff > 0 else "better than")
        s = o.get("steps_to_bn_best_mean_curve")
        reach = (f"its mean curve reaches BN's best at step {s} ({o['reduction_vs_bn_pct']:.0f}% fewer steps)"
                 if s is not None else "its mean curve never reaches BN's best")
        out.append(f"{n.upper()}: best FD {b['mean']:.2f} +- {b['sd'] or 0:.2f}, {where} BN's; {reach}")
    return "; ".join(out) + "."


def report() -> dict:
    runs = {}
    for name in ORDER:
        d = run_dir(name)
        if not (d / "metrics.json").exists():
            continue
        m = json.loads((d / "metrics.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
        runs[name] = {"run": f"checkpoints/{d.name}", "norm": cfg["norm"], "layers": cfg["layers"],
                      "seed": cfg["training"]["seed"], "steps": m.get("steps_done"),
                      "evals": [{k: e[k] for k in ("step", "fd", "precision", "recall", "modes", "evenness",
                                                    "kl_uniform", "counts")} for e in m["evals"]],
                      "best_fd": m.get("best_fd"), "best_fd_step": m.get("best_fd_step"), "final_fd": m.get("fd"),
                      "time_per_step_s": m.get("time_per_step_s"), "train_s": m.get("train_s"),
                      "cpu_s": m.get("cpu_s"), "params": m.get("params"), "disc_params": m.get("disc_params")}
    bn = [r for r in runs.values() if r["norm"] == "bn"]
    # BN's best: the best FD of the mean BN curve (over seeds) and of each BN seed
    out_norms = {}
    steps_axis = sorted({e["step"] for r in runs.values() for e in r["evals"]})
    for norm in NORMS:
        rs = [r for r in runs.values() if r["norm"] == norm]
        if not rs:
            continue
        curves = np.array([[next((e["fd"] for e in r["evals"] if e["step"] == s), np.nan) for s in steps_axis]
                           for r in rs])
        mean = np.nanmean(curves, axis=0)
        sd = np.nanstd(curves, axis=0, ddof=1) if len(rs) > 1 else np.full(len(steps_axis), np.nan)

        def stat(key, rs=rs):
            v = np.array([r[key] for r in rs if r[key] is not None], float)
            return {"mean": float(v.mean()) if v.size else None,
                    "sd": float(v.std(ddof=1)) if v.size > 1 else None, "values": v.tolist()}

        last = [r["evals"][-1] for r in rs]

        def curve(key, rs=rs):
            return [{"step": s, "values": [next((e[key] for e in r["evals"] if e["step"] == s), None) for r in rs]}
                    for s in steps_axis]

        out_norms[norm] = {
            "seeds": [r["seed"] for r in rs], "mean_curve": [{"step": s, "fd_mean": float(a), "fd_sd": float(b)}
                                                               for s, a, b in zip(steps_axis, mean, sd)],
            "best_fd": stat("best_fd"), "final_fd": stat("final_fd"), "time_per_step_s": stat("time_per_step_s"),
            "final_precision": [e["precision"] for e in last], "final_recall": [e["recall"] for e in last],
            "final_modes": [e["modes"] for e in last], "final_evenness": [e["evenness"] for e in last],
            "modes_curve": curve("modes"), "evenness_curve": curve("evenness"), "recall_curve": curve("recall"),
            "precision_curve": curve("precision"),
            "best_of_mean_curve": float(np.nanmin(mean)), "best_of_mean_curve_step": int(steps_axis[int(np.nanargmin(mean))])}
    if bn and "bn" in out_norms:
        target = out_norms["bn"]["best_of_mean_curve"]
        bn_step = out_norms["bn"]["best_of_mean_curve_step"]
        for norm, o in out_norms.items():
            mc = [{"step": c["step"], "fd": c["fd_mean"]} for c in o["mean_curve"]]
            s = steps_to_reach(mc, target)
            o["steps_to_bn_best_mean_curve"] = s
            o["reduction_vs_bn_pct"] = None if s is None else 100.0 * (1 - s / bn_step)
            o["per_seed_steps_to_bn_best"] = {r["seed"]: steps_to_reach(r["evals"], target)
                                               for r in runs.values() if r["norm"] == norm}
        out_target = {"bn_best_fd_mean_curve": target, "bn_best_step_mean_curve": bn_step}
    else:
        out_target = {}
    import torch

    from cbnorm.data import load_dataset
    from cbnorm.metrics import frechet_distance
    from cbnorm.gan import load_classifier

    feats, _ = load_classifier(CHECKPOINTS / "gan-features" / "classifier")
    test_f, test_p = feats(load_dataset("fashion-mnist", "test").images)
    floor = None
    try:  # real training images scored like a generator: the FD a perfect generator would get at n = 5,000
        tr = load_dataset("fashion-mnist", "train")
        idx = np.random.default_rng(0).choice(len(tr), 5000, replace=False)
        tr_f, _ = feats(tr.images[np.sort(idx)])
        floor = frechet_distance(test_f, tr_f)
    except Exception as err:  # noqa: BLE001 - no train split here
        print(f"(no floor: {err})")
    from cbnorm.metrics import class_coverage

    real_cov = class_coverage(test_p.astype(np.int64), 10)
    # what the sample grids show: the classifier's classes of the 64 fixed latents' samples at every snapshot
    from cbnorm.metrics import generate, to_uint8
    from cbnorm.runs import load_run
    from cbnorm.gan import fixed_latents

    for name, r in runs.items():
        run = load_run(ROOT / r["run"])
        z = fixed_latents(run)
        r["grid_classes"] = []
        for step, _ in run.snapshots:
            _, pred = feats(to_uint8(generate(run.load_snapshot(step), z)))
            counts = np.bincount(pred, minlength=10)
            r["grid_classes"].append({"step": step, "distinct": int((counts > 0).sum()), "counts": counts.tolist()})
    res = {
        "what": "DCGAN on Fashion-MNIST, BN / MN / ACN in the generator; FD in classifier features (not FID)",
        "protocol": __doc__.split("Protocol")[1].strip(),
        "recipe": RECIPE, "norms": NORMS, "score": "FD in classifier features (lower is better), k-NN precision/"
        "recall (k=3, Kynkaenniemi et al. 2019), modes = classes with >= 1% of the samples, evenness = normalized "
        "entropy of the predicted-class histogram",
        "reference": {"fd_real_train_5000_vs_test": floor, "test_set_modes": real_cov["modes"],
                      "test_set_evenness": real_cov["evenness"], "classifier": "checkpoints/gan-features/classifier",
                      "classifier_test_acc": 0.8917},
        "target": out_target, "by_norm": out_norms, "verdict": verdict(out_norms, out_target), "runs": runs,
        "papers": PAPERS,
        "step_timing": step_timing(),
        "budget": {"cpu_s_total": float(sum(r["cpu_s"] or 0 for r in runs.values())),
                   "train_wall_s_total": float(sum(r["train_s"] or 0 for r in runs.values())),
                   "note": "cpu_s: process CPU time of each trainer from its first evaluation on (data loading and "
                           "the real-feature reference excluded, ~10 s a run); train_wall_s: wall time of the "
                           "updates alone, inflated by the other jobs on this shared 2-core machine"},
        "machine": {"threads": 1, "torch": torch.__version__, "cpu_count": os.cpu_count()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--names", nargs="*", default=ORDER, choices=ORDER)
    t.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    a = p.parse_args(argv)
    if a.cmd == "train":
        train(a.names, a.threads)
    else:
        res = report()
        for norm, o in res["by_norm"].items():
            print(norm, "best FD", o["best_fd"], "steps to BN's best", o.get("steps_to_bn_best_mean_curve"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
