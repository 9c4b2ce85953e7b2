"""Every layer vs layer3.* vs all-BatchNorm, for each multi-mode layer type, on our ResNet-20 (Fashion-MNIST):
does the layer train at depth, and what does it cost?

    python bench/depth.py [--seeds 0,1] [--limit 8192] [--width 1] [--reps 7] [--out bench/results/depth.json]

Protocol: ResNet-20 (He et al., option-A shortcuts, ``cbnorm.models.resnet20``, width 1) on Fashion-MNIST
28 x 28 (1 channel); the norm layers matched by ``--layers`` ("*": every one, 19; "layer3.*": the last stage's
6) are the layer type, the others BatchNorm. One pass over ``--limit`` training images (an epoch of that
subset), batch 32, SGD lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter (the user's recipe of the
depth issue), K = 3 components; CN / CN-X get Fashion-MNIST's 4 superclasses as contexts (training and test:
the oracle contexts; the accuracy column says so). A step whose batch is not finite is skipped
(``cbnorm.StepGuard``); 10 in a row end the run ("diverged"). Reported per run: the mean training loss over
the last 20 steps, the loss of the first step, test accuracy on 2,000 test images, skipped steps; and per
configuration the time of one training step divided by the all-BN network's, interleaved in one run (median
of ``--reps`` repetitions, 1 thread).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cbnorm  # noqa: E402
from cbnorm.data import FASHION_SUPERCLASSES, load_dataset  # noqa: E402
from cbnorm.models import resnet20  # noqa: E402

NORMS = {"mn": {"num_components": 3}, "acn": {"num_components": 3}, "mode": {"num_components": 3},
         "cn": {"num_contexts": 4}, "cnx": {"num_contexts": 4}}
PLACEMENTS = {"every": ("*",), "layer3": ("layer3.*",)}
SUPER = torch.tensor([FASHION_SUPERCLASSES[i] for i in range(10)])


def configs() -> list[tuple[str, str, str]]:
    """(label, norm, placement): all-BN first, then each layer type in every layer and in layer3.* only."""
    out = [("bn", "bn", "every")]
    for norm in NORMS:
        out += [(f"{norm} every layer", norm, "every"), (f"{norm} layer3.*", norm, "layer3")]
    return out


def build(norm: str, placement: str, seed: int, width: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return resnet20(in_channels=1, num_classes=10, width=width, norm=norm, norm_layers=PLACEMENTS[placement],
                    norm_kwargs=NORMS.get(norm, {}))


def arrays(split: str, limit: int, seed: int):
    ds = load_dataset("fashion-mnist", split)
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(limit, len(ds)), replace=False))
    x = (torch.from_numpy(ds.images[idx]).float().div(255) - 0.2860) / 0.3530
    y = torch.from_numpy(ds.labels[idx].astype(np.int64))
    return x[:, None], y


def train_one(norm: str, placement: str, seed: int, limit: int, batch: int = 32, width: float = 1.0,
              steps: int | None = None) -> dict:
    """One pass over ``limit`` training images (or ``steps`` steps); the record described in the module."""
    model = build(norm, placement, seed, width).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    guard = cbnorm.StepGuard(model)
    x_all, y_all = arrays("train", limit, seed)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    uses_ctx = norm in ("cn", "cnx")
    losses, diverged, t0 = [], None, time.perf_counter()
    n_steps = len(order) // batch if steps is None else steps
    for s in range(n_steps):
        idx = order[(s * batch) % (len(order) - batch + 1):][:batch]
        x, y = x_all[idx], y_all[idx]
        guard.begin()
        try:
            loss = F.cross_entropy(model(x, context=SUPER[y] if uses_ctx else None), y)
            opt.zero_grad()
            loss.backward()
            ok = guard.finite(loss)
        except cbnorm.NonFiniteError:
            ok = False
        if ok:
            opt.step()
            losses.append(float(loss.detach()))
            continue
        try:
            guard.skip(opt)
        except cbnorm.NonFiniteError:
            diverged = s + 1
            break
    model.eval()
    xt, yt = arrays("test", 2000, 0)
    with torch.no_grad():
        logits = torch.cat([model(xt[i:i + 500], context=SUPER[yt[i:i + 500]] if uses_ctx else None)
                            for i in range(0, len(yt), 500)])
    finite = bool(torch.isfinite(logits).all())
    return {"steps": n_steps, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
            "test_acc": float((logits.argmax(1) == yt).float().mean()) if finite else None,
            "skipped": guard.skipped, "diverged_at": diverged, "seconds": time.perf_counter() - t0,
            "loss_curve": losses[::4]}


def step_ratios(reps: int, width: float = 1.0, batch: int = 32) -> dict:
    """Median (and quartiles) of (config step time / all-BN step time), interleaved in one run."""
    x, y = arrays("train", batch, 123)
    steps = {}
    for label, norm, placement in configs():
        model = build(norm, placement, 0, width).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same work as a real step; weights stay put
        ctx = SUPER[y] if norm in ("cn", "cnx") else None

        def step(model=model, opt=opt, ctx=ctx):
            opt.zero_grad()
            try:
                F.cross_entropy(model(x, context=ctx), y).backward()
            except cbnorm.NonFiniteError:  # a configuration that does not train at all: its time still counts
                return
            opt.step()
        step()  # warm-up (MN's first fit, ACN's data init)
        steps[label] = step
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            t = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t)
    out = {}
    for k in steps:
        ratios = [a / b for a, b in zip(times[k], times["bn"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[k] = {"ratio_to_bn": statistics.median(ratios), "q1": q[0], "q3": q[2],
                  "ms": 1000 * statistics.median(times[k])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--limit", type=int, default=8192)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "depth.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out_path = Path(a.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update({"date": datetime.date.today().isoformat(), "protocol": __doc__.split("Protocol: ")[1].strip(),
                   "limit": a.limit, "width": a.width, "threads": a.threads,
                   "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                               "loadavg_start": os.getloadavg()[0]}})
    runs = result.setdefault("runs", [])
    done = {(r["label"], r["seed"]) for r in runs}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for label, norm, placement in configs():
            if (label, seed) in done:  # resumable: a rerun continues where it stopped
                continue
            rec = {"label": label, "norm": norm, "placement": placement, "seed": seed,
                   **train_one(norm, placement, seed, a.limit, width=a.width)}
            runs.append(rec)
            print(f"{label:20s} seed {seed}: first loss {rec['first_loss']}, final loss {rec['final_loss']}, "
                  f"test acc {rec['test_acc']}, skipped {rec['skipped']}, diverged at {rec['diverged_at']} "
                  f"({rec['seconds']:.0f} s)", flush=True)
            out_path.write_text(json.dumps(result, indent=1))
    if a.reps:
        result["step_time"] = step_ratios(a.reps, a.width)
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
        out_path.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict) -> str:
    """The README's table: per configuration, mean ± sd over seeds, and the step-time ratio."""
    lines = ["| configuration | final train loss | test acc | diverged / skipped | step time vs BN |",
             "|---|---|---|---|---|"]
    for label, _, _ in configs():
        rs = [r for r in result.get("runs", []) if r["label"] == label]
        if not rs:
            continue
        def ms(key):
            v = [r[key] for r in rs if r[key] is not None and math.isfinite(r[key])]
            if not v:
                return "—"
            return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
        div = sum(r["diverged_at"] is not None for r in rs)
        st = (result.get("step_time") or {}).get(label)
        lines.append(f"| {label} | {ms('final_loss')} | {ms('test_acc')} | {div}/{len(rs)} diverged, "
                     f"{sum(r['skipped'] for r in rs)} steps skipped | "
                     + (f"{st['ratio_to_bn']:.2f}× [{st['q1']:.2f}, {st['q3']:.2f}]" if st else "—") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
