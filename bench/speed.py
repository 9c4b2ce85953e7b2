"""Speed of every layer against torch.nn.BatchNorm2d, and of the whole shallow CNN train step.

    python bench/speed.py [--threads 2] [--reps 7] [--quick] [--out bench/results/speed.json]

* Per layer: forward + backward time on the papers' shapes, as a ratio to ``nn.BatchNorm2d`` on the same
  input, K in {2, 3, 5}. Repetitions are interleaved (layer, BN, layer, BN, ...) and the medians of the
  per-repetition ratios are reported, so machine noise hits both sides alike.
* Whole network: one AdamW train step of the shallow CNN (width 0.25, batch 128, 28x28, as the committed
  runs) with each layer in place of conv3's BatchNorm, as a ratio to the all-BatchNorm network (Table 7 analogue).

Writes JSON with the machine (CPU model, threads, torch version, device) so the app can show where the
numbers come from. On a CUDA machine run it with ``--device cuda`` (synchronised timings).
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cbnorm  # noqa: E402
from cbnorm.models import ShallowCNN  # noqa: E402

SHAPES = [(256, 128, 8, 8), (64, 448, 4, 4)]
LAYERS = [("mn", {"num_components": None}), ("mn-fit25", {"num_components": None}),
          ("acn", {"num_components": None}), ("mode", {"num_components": None}),
          ("cn", {"num_contexts": None}), ("cnx", {"num_contexts": None}),
          ("cn-embed", {"num_contexts": None}), ("bn", {}), ("ln", {}), ("gn", {})]


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make(name: str, c: int, k: int, device: str) -> nn.Module:
    if name == "bn-torch":
        return nn.BatchNorm2d(c).to(device)
    kw = {}
    base = name
    if name == "mn-fit25":
        base = "mn"
    for n, spec in LAYERS:
        if n == name:
            kw = {key: k for key in spec}
    if base == "mn" and name == "mn-fit25":
        kw["fit_fraction"] = 0.25
    return cbnorm.build_norm(base, c, **kw).to(device)


def step_fn(layer: nn.Module, x: torch.Tensor, ctx: torch.Tensor):
    takes = getattr(layer, "uses_context", False)

    def run():
        y = layer(x, context=ctx) if takes else layer(x)
        y.sum().backward()
    return run


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_layers(device: str, reps: int, ks: list[int], shapes: list[tuple]) -> list[dict]:
    out = []
    for shape in shapes:
        n, c = shape[:2]
        x = torch.randn(*shape, device=device, requires_grad=True)
        for k in ks:
            ctx = (torch.arange(n, device=device) % k)
            ref = step_fn(make("bn-torch", c, k, device), x, ctx)
            for name, _ in LAYERS:
                layer = make(name, c, k, device)
                fn = step_fn(layer, x, ctx)
                fn(), ref()  # warm-up
                ratios, t_layer, t_ref = [], [], []
                for _ in range(reps):
                    a = timed(fn, device)
                    b = timed(ref, device)
                    t_layer.append(a), t_ref.append(b), ratios.append(a / b)
                rec = {"layer": name, "shape": list(shape), "K": k, "ratio_to_bn": statistics.median(ratios),
                       "layer_ms": 1e3 * statistics.median(t_layer), "bn_ms": 1e3 * statistics.median(t_ref)}
                out.append(rec)
                print(f"{name:9s} {str(shape):18s} K={k} {rec['ratio_to_bn']:6.2f}x  ({rec['layer_ms']:.1f} ms vs "
                      f"{rec['bn_ms']:.1f} ms)", flush=True)
    return out


def bench_network(device: str, reps: int, k: int = 3) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    ctx = y % 4

    def trainer(norm: str, kw: dict):
        model = ShallowCNN(1, 10, width=0.25, norm=norm, norm_layers=("conv3",), norm_kwargs=kw).to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        uses = model.uses_context

        def run():
            opt.zero_grad(set_to_none=True)
            logits = model(x, context=ctx if uses else None)
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()
        return run

    ref = trainer("bn", {})
    out = []
    for name, kw in [("mn", {"num_components": k}), ("mn-fit25", {"num_components": k, "fit_fraction": 0.25}),
                     ("acn", {"num_components": k}), ("mode", {"num_components": k}), ("cn", {"num_contexts": 4}),
                     ("cnx", {"num_contexts": 4}), ("cn-embed", {"num_contexts": 4}), ("ln", {}), ("gn", {})]:
        fn = trainer("mn" if name == "mn-fit25" else name, kw)
        fn(), ref()
        ratios = []
        for _ in range(reps):
            a = timed(fn, device)
            b = timed(ref, device)
            ratios.append(a / b)
        rec = {"layer": name, "K": k, "ratio_to_bn_network": statistics.median(ratios)}
        out.append(rec)
        print(f"network with {name:9s} at conv3: {rec['ratio_to_bn_network']:.3f}x", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="one shape, K=3 only")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ks = [3] if a.quick else [2, 3, 5]
    shapes = SHAPES[:1] if a.quick else SHAPES
    result = {"machine": machine(a.device), "method": "forward+backward, interleaved with nn.BatchNorm2d, "
              f"median of {a.reps} per-repetition ratios", "layers": bench_layers(a.device, a.reps, ks, shapes),
              "network": bench_network(a.device, a.reps)}
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = Path(a.out or f"bench/results/speed{'' if a.device == 'cpu' else '_' + a.device.replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
