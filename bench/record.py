"""What recording costs a training loop: ``cbnorm.watch`` at every=10 and every=100 against the same loop
without it, on the shallow CNN and ResNet-20 (Fashion-MNIST-sized inputs, batch 128, AdamW), CPU.

Protocol: one process, one thread per process as the trainer's tests use (``--threads``); for each model the
three loops (none, every=100, every=10) run in blocks of ``--steps`` optimizer steps, interleaved and repeated
``--reps`` times, so a change in the machine's load hits all three alike; the overhead of a mode is its median
block time over the median block time without recording, minus 1. The recorder is created before the timed
blocks (its step-0 probe is not timed) with ``early=0`` (the early log-spaced probes are a one-off cost at the
start of training, reported apart as the time of one probe). Probe: 256 inputs, 2,048 values per channel (the
defaults), every normalization layer. Also reported: the time of one probe, and the overhead predicted from it
(probe time / (every x step time)), so a reader can size ``every`` for another model.

    python bench/record.py [--steps 200] [--reps 3] [--threads 1]  ->  bench/results/record.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import cbnorm
from cbnorm.models import build_model

from common import ROOT, cpu_model

GOAL = 0.03  # at every=100


def _batches(n: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, g


def measure(model_name: str, steps: int, reps: int, batch: int) -> dict:
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "num_classes": 10}
    model = build_model(model_name, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y, g = _batches(4096, batch, 0)
    probe = (x[:256], y[:256])
    tmp = Path(tempfile.mkdtemp(prefix="bench-record-"))
    recs = {"none": None,
            "every=100": cbnorm.watch(model, tmp / "e100", probe=probe, every=100, early=0),
            "every=10": cbnorm.watch(model, tmp / "e10", probe=probe, every=10, early=0)}
    step = {k: 0 for k in recs}
    times: dict[str, list[float]] = {k: [] for k in recs}

    def block(mode: str) -> float:
        rec = recs[mode]
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(len(y), (batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step[mode] += 1
            if rec is not None:
                rec.step(step[mode], loss=loss.item())
            else:
                loss.item()  # the same one host read per step as the recorded loops
        return time.perf_counter() - t0

    block("none")  # warm-up (allocator, kernels)
    for _ in range(reps):
        for mode in recs:
            times[mode].append(block(mode))
    # one probe, timed alone (median of 5)
    probe_s = []
    for i in range(5):
        t0 = time.perf_counter()
        recs["every=10"].probe(10_000_000 + i)
        probe_s.append(time.perf_counter() - t0)
    for rec in recs.values():
        if rec is not None:
            rec.close()
    base = statistics.median(times["none"])
    step_s = base / steps
    out = {"model": model_name, "params": sum(p.numel() for p in model.parameters()),
           "norm_layers": len(recs["every=10"].layers), "step_s": step_s,
           "probe_s": statistics.median(probe_s), "blocks_s": times}
    for mode in ("every=100", "every=10"):
        every = int(mode.split("=")[1])
        out[mode] = {"overhead": statistics.median(times[mode]) / base - 1.0,
                     "predicted": statistics.median(probe_s) / (every * step_s)}
    out["goal_met"] = out["every=100"]["overhead"] <= GOAL
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per timed block (200)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the three loops (3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="shallow_cnn,resnet20")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "record.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    for name in a.models.split(","):
        r = measure(name, a.steps, a.reps, a.batch_size)
        print(f"{name}: step {r['step_s'] * 1000:.1f} ms, probe {r['probe_s'] * 1000:.0f} ms, overhead every=100 "
              f"{r['every=100']['overhead']:+.2%} (predicted {r['every=100']['predicted']:.2%}), every=10 "
              f"{r['every=10']['overhead']:+.2%} (predicted {r['every=10']['predicted']:.2%})", flush=True)
        results.append(r)
    doc = {"benchmark": "bench/record.py", "date": date.today().isoformat(), "machine": cpu_model(),
           "torch": torch.__version__, "threads": a.threads, "steps_per_block": a.steps, "reps": a.reps,
           "batch_size": a.batch_size, "goal": f"overhead <= {GOAL:.0%} at every=100", "results": results}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
