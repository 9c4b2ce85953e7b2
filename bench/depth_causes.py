"""Why MN and ACN in every layer of a ResNet-18 diverge: the first steps of kuangliu/pytorch-cifar's ResNet18
(written here; torchvision does not import against this torch) with every BatchNorm converted, each suspected
cause switched off alone. Per step: the loss, every norm layer's output std and |max|, and the gradient norm of
each layer's parameters. Writes bench/results/depth_causes.json.

    python bench/depth_causes.py [--steps 12] [--width 64] [--threads 1] [--only acn,mn]

Recipe (the issue's): Fashion-MNIST padded to 32 x 32, repeated to 3 channels; SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 32; seed 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cbnorm  # noqa: E402
from bench.depth_models import ResNet18, fashion_batches  # noqa: E402
from cbnorm.data import FASHION_SUPERCLASSES  # noqa: E402

SUPER = torch.tensor([FASHION_SUPERCLASSES[i] for i in range(10)])  # Fashion-MNIST's 4 superclasses

#: (label, norm, convert kwargs, options): each ablation switches one suspected cause off
CASES = [
    ("bn", "bn", {}, {}),
    ("acn: init=random (the default before this study)", "acn", {"init": "random"}, {}),
    ("acn: init=random, no weight decay / momentum on mixture params", "acn", {"init": "random"},
     {"mixture_group": "plain"}),
    ("acn: init=random, mixture params frozen", "acn", {"init": "random"}, {"mixture_group": "frozen"}),
    ("acn: init=random, autograd backward (no hand-written)", "acn", {"init": "random"}, {"autograd": True}),
    ("acn: init=data, no variance floor", "acn", {"init": "data"}, {"no_floor": True}),
    ("acn: init=data, variance floor 0.01 (the new default)", "acn", {}, {}),
    ("acn: init=data + floor, mixture params frozen", "acn", {}, {"mixture_group": "frozen"}),
    ("acn: update=moving_average", "acn", {"update": "moving_average"}, {}),
    ("cnx", "cnx", {"num_contexts": 4}, {}),
    ("mn K=3", "mn", {"num_components": 3}, {}),
    ("mn K=1 (= BN)", "mn", {"num_components": 1}, {}),
    ("mn K=3, eps=1e-2", "mn", {"num_components": 3, "eps": 1e-2}, {}),
    ("mn K=3, batch 128", "mn", {"num_components": 3}, {"batch_size": 128}),
    ("mn K=3, no 1/sqrt(lambda_k) scale (x_hat variance 1, not ~K)", "mn", {"num_components": 3}, {"unscaled": True}),
    ("mn K=3, warm start (EM from the previous fit)", "mn", {"num_components": 3, "warm_start": True}, {}),
]


def mixture_params(model):
    return [p for n, m in model.named_modules() if isinstance(m, cbnorm.AdaptiveContextNorm)
            for k, p in m.named_parameters(recurse=False) if k in ("logits", "mean", "log_var")]


def run_case(norm: str, kw: dict, opts: dict, steps: int, width: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = ResNet18(width=width)
    if norm != "bn":
        cbnorm.convert(model, norm, **kw)
        if norm == "cnx":
            model = cbnorm.ContextModel(model)
    mix = mixture_params(model)
    ids = {id(p) for p in mix}
    rest = [p for p in model.parameters() if id(p) not in ids]
    group = opts.get("mixture_group")
    if group == "plain":
        groups = [{"params": rest}, {"params": mix, "weight_decay": 0.0, "momentum": 0.0}]
    elif group == "frozen":
        for p in mix:
            p.requires_grad_(False)
        groups = [{"params": rest}]
    else:
        groups = [{"params": list(model.parameters())}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, (cbnorm.NormBase, nn.BatchNorm2d))]
    data = fashion_batches(opts.get("batch_size", 32), seed)
    rec = {"loss": [], "out_std": [], "out_max": [], "grad_norm": [], "error": None}
    patches = []
    if opts.get("autograd"):
        from cbnorm.norms import adaptive, functional

        def composed(x3, means, vars, log_weights, a, b):
            return functional.mix_affine(x3, functional.log_posteriors(x3, means, vars, log_weights, "joint").exp(),
                                         a, b, "joint")
        patches.append((adaptive, "joint_mixture_transform", adaptive.joint_mixture_transform))
        adaptive.joint_mixture_transform = composed
    if opts.get("no_floor"):
        from cbnorm.norms import adaptive

        patches.append((adaptive, "INIT_VAR_FLOOR", adaptive.INIT_VAR_FLOOR))
        adaptive.INIT_VAR_FLOOR = 0.0
    if opts.get("unscaled"):  # MN's eq. 34 without the 1/sqrt(lambda_k) factor
        from cbnorm.norms import functional as fn, mixture

        def unscaled(x3, resp, gain, bias, eps, sums=None):
            lam, mean, var = fn.weighted_moments(x3, resp, "joint")
            a, b = fn.normalizing_coefficients(mean, var, eps, None, gain, bias)
            return fn.mix_affine(x3, resp, a, b, "joint"), lam, mean, var
        patches.append((mixture, "posterior_batch_norm", mixture.posterior_batch_norm))
        mixture.posterior_batch_norm = unscaled
    try:
        for _ in range(steps):
            x, y = next(data)
            outs = {}
            hooks = [m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach()))
                     for n, m in norms]
            try:
                loss = F.cross_entropy(model(x) if norm != "cnx" else model(x, context=SUPER[y]), y)
            finally:
                for h in hooks:
                    h.remove()
            opt.zero_grad()
            loss.backward()
            rec["loss"].append(float(loss.detach()))
            rec["out_std"].append([float(outs[n].std()) for n, _ in norms])
            rec["out_max"].append([float(outs[n].abs().max()) for n, _ in norms])
            rec["grad_norm"].append([float(torch.sqrt(sum((p.grad.detach().double() ** 2).sum()
                                                          for p in m.parameters() if p.grad is not None)))
                                     if any(p.grad is not None for p in m.parameters()) else 0.0
                                     for n, m in norms])
            if not math.isfinite(rec["loss"][-1]):
                break
            opt.step()
    except ValueError as err:  # a layer refused a non-finite batch
        rec["error"] = str(err).split(";")[0]
    finally:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
    rec["layers"] = [n for n, _ in norms]
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated norms to run (bn, acn, mn)")

    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "depth_causes.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    only = [s for s in a.only.split(",") if s]
    out = {"date": datetime.date.today().isoformat(), "steps": a.steps, "width": a.width, "threads": a.threads,
           "recipe": "ResNet18 (kuangliu), Fashion-MNIST 32x32x3, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 32, seed 0",
           "cases": []}
    for label, norm, kw, opts in CASES:
        if only and norm not in only:
            continue
        t0 = time.perf_counter()
        rec = run_case(norm, kw, opts, a.steps, a.width)
        rec.update(label=label, norm=norm, kwargs=kw, options=opts, seconds=time.perf_counter() - t0)
        out["cases"].append(rec)
        losses = ", ".join(f"{v:.3g}" for v in rec["loss"])
        print(f"{label:52s} loss [{losses}]" + (f" ERROR {rec['error']}" if rec["error"] else ""), flush=True)
        if rec["out_std"]:
            s0 = rec["out_std"][0]
            print(f"{'':52s} step-1 output std min/median/max {min(s0):.3g}/{np.median(s0):.3g}/{max(s0):.3g}; "
                  f"max grad norm {max(rec['grad_norm'][0]):.3g}", flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
