"""Convergence as the MN paper measures it: steps to reach BatchNorm's best test accuracy, for every norm.

    python bench/convergence.py [--seeds 0 1 2] [--train 12000] [--test 2000] [--epochs 2] [--width 0.25]

Fashion-MNIST, shallow CNN (conv3's norm replaced, K=3 mixtures, superclass contexts for context layers),
AdamW lr 2e-3, batch 128 — the recipe of the committed runs on a budget that fits a 2-core CPU: a
stratified subset of the training set, test accuracy on a fixed stratified test subset every
``--eval-every`` steps. For context layers the accuracy is the honest one (CN+ inference, no context
given at test time); the oracle accuracy (true superclass given) is recorded beside it.

For each norm and seed: accuracy curve, best accuracy, and the first step at which the accuracy reaches
BatchNorm's best accuracy of the same seed (``null`` when it never does) — Tables 3 and 5 of the MN paper.
Writes ``bench/results/convergence.json`` with the budget and machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.speed import machine  # noqa: E402
from cbnorm import analysis, data  # noqa: E402
from cbnorm.models import ShallowCNN  # noqa: E402

NORMS = {"bn": {}, "ln": {}, "gn": {}, "mn": {"num_components": 3}, "mode": {"num_components": 3},
         "acn": {"num_components": 3}, "cn": {"num_contexts": 4}, "cnx": {"num_contexts": 4},
         "cn-embed": {"num_contexts": 4}}


#: same layer, another setting: name -> (norm, kwargs). acn-data: ACN's components fitted to the first
#: minibatch (init="data") instead of the paper's random initialisation.
VARIANTS = {"acn-data": ("acn", {"num_components": 3, "init": "data"})}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First step of ``curve`` [(step, acc)] at or above ``target`` (cbnorm.analysis.steps_to_reach)."""
    return analysis.steps_to_reach([st for st, _ in curve], [a for _, a in curve], target)


def tensors(ds: data.ArrayDataset, mean: float, std: float):
    x = torch.from_numpy(ds.images).float().div(255.0).sub(mean).div(std).unsqueeze(1)
    return x, torch.from_numpy(ds.labels), torch.from_numpy(ds.contexts)


@torch.no_grad()
def accuracy(model, x, y, ctx, uses_context: bool, oracle: bool) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        c = ctx[i:i + 1000] if (uses_context and oracle) else None
        correct += int((model(x[i:i + 1000], context=c).argmax(1) == y[i:i + 1000]).sum())
    model.train()
    return correct / len(x)


def run_one(norm: str, seed: int, train, test, a) -> dict:
    torch.manual_seed(seed)
    base, kw = VARIANTS.get(norm, (norm, NORMS.get(norm)))
    model = ShallowCNN(1, 10, width=a.width, norm=base, norm_layers=("conv3",), norm_kwargs=kw)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    uses = model.uses_context
    x, y, ctx = train
    g = torch.Generator().manual_seed(seed)
    curve, oracle_curve, step, t0 = [], [], 0, time.perf_counter()
    for _ in range(a.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - a.batch_size + 1, a.batch_size):
            idx = perm[i:i + a.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx], context=ctx[idx] if uses else None), y[idx])
            loss.backward()
            opt.step()
            step += 1
            if step % a.eval_every == 0:
                curve.append((step, accuracy(model, *test, uses, oracle=False)))
                if uses:
                    oracle_curve.append((step, accuracy(model, *test, uses, oracle=True)))
    if not curve or curve[-1][0] != step:
        curve.append((step, accuracy(model, *test, uses, oracle=False)))
    return {"norm": norm, "seed": seed, "curve": curve, "oracle_curve": oracle_curve or None,
            "best_acc": max(a_ for _, a_ in curve), "final_acc": curve[-1][1], "steps": step,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--norms", nargs="+", default=list(NORMS) + list(VARIANTS))
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/convergence.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tr = data.load_dataset("fashion-mnist", "train")
    te = data.load_dataset("fashion-mnist", "test")
    sup = data.FASHION_SUPERCLASSES
    tr = data.subset(tr, a.train, seed=123).with_contexts(data.superclass_contexts(
        data.subset(tr, a.train, seed=123).labels, sup), data.FASHION_SUPERCLASS_NAMES)
    te = data.subset(te, a.test, seed=123)
    te = te.with_contexts(data.superclass_contexts(te.labels, sup), data.FASHION_SUPERCLASS_NAMES)
    mean, std = (float(v[0]) for v in data.compute_mean_std(tr.images))
    train, test = tensors(tr, mean, std), tensors(te, mean, std)
    runs = []
    for seed in a.seeds:  # seeds outermost: BN's target exists before the others of that seed finish
        for norm in a.norms:
            r = run_one(norm, seed, train, test, a)
            runs.append(r)
            print(f"seed {seed} {norm:9s} best {r['best_acc']:.4f} final {r['final_acc']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    summary = summarize(runs)
    result = {"machine": machine("cpu"),
              "budget": {"dataset": "fashion-mnist", "train_images": a.train, "test_images": a.test,
                         "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "optimizer": "adamw",
                         "width": a.width, "eval_every_steps": a.eval_every, "seeds": a.seeds,
                         "placement": "conv3", "note": "reduced budget for a 2-core CPU; accuracy of context "
                                                       "layers is CN+ inference (no context at test time)"},
              "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("wrote", a.out)


def summarize(runs: list[dict]) -> dict:
    """Per norm (in order of appearance): best accuracy mean/sd and steps to BN's best of the same seed;
    sets each run's ``bn_best_acc`` and ``steps_to_bn_best``."""
    by_seed_bn = {r["seed"]: r["best_acc"] for r in runs if r["norm"] == "bn"}
    for r in runs:
        target = by_seed_bn.get(r["seed"])
        r["bn_best_acc"] = target
        r["steps_to_bn_best"] = None if target is None else steps_to_reach(r["curve"], target)
    summary = {}
    for norm in dict.fromkeys(r["norm"] for r in runs):
        rs = [r for r in runs if r["norm"] == norm]
        best = [r["best_acc"] for r in rs]
        reach = [r["steps_to_bn_best"] for r in rs]
        hit = [s for s in reach if s is not None]
        summary[norm] = {"best_acc_mean": statistics.mean(best),
                         "best_acc_std": statistics.pstdev(best) if len(best) > 1 else 0.0,
                         "steps_to_bn_best": reach, "reached_bn_best": f"{len(hit)}/{len(reach)}",
                         "steps_to_bn_best_median": statistics.median(hit) if hit else None,
                         "seconds_per_run": statistics.mean(r["seconds"] for r in rs)}
    return summary


if __name__ == "__main__":
    main()
