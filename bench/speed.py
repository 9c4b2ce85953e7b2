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
import math
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
    from bench.common import cpu_model

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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


def interleaved(fns: dict, device: str, reps: int) -> dict:
    """Median ms of each zero-argument function, run round-robin ``reps`` times after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


COMPILED = ["mn", "mn-fit25", "acn", "mode", "cn", "cnx"]

#: the issue's goals at K = 3, as a ratio to nn.BatchNorm2d (forward + backward)
GOALS = {"mn": 4.0, "mn-fit25": 4.0, "acn": 3.0, "mode": 2.0, "cn": 2.0, "cnx": 2.0, "cn-embed": 2.0}


def bench_compiled(device: str, reps: int, shapes: list[tuple], k: int = 3) -> list[dict]:
    """torch.compile (inductor) of each goal layer against eager and compiled nn.BatchNorm2d, K = 3.

    Every layer shares NormBase.forward, so each one is a recompilation of the same code object: the
    recompile limit is raised so that none silently falls back to eager (dynamo's default allows 8)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    torch._dynamo.reset()
    out = []
    for shape in shapes:
        n, c = shape[:2]
        x = torch.randn(*shape, device=device, requires_grad=True)
        ctx = torch.arange(n, device=device) % k
        bn = make("bn-torch", c, k, device)
        fns = {"bn": step_fn(bn, x, ctx), "bn_compiled": step_fn(torch.compile(bn), x, ctx)}
        compile_s = {}
        for name in COMPILED:
            t = time.perf_counter()
            fns[name] = step_fn(torch.compile(make(name, c, k, device)), x, ctx)
            fns[name]()  # compiles
            compile_s[name] = time.perf_counter() - t
        ms = interleaved(fns, device, reps)
        for name in COMPILED:
            rec = {"layer": name, "shape": list(shape), "K": k, "compiled_ms": ms[name], "bn_ms": ms["bn"],
                   "compiled_bn_ms": ms["bn_compiled"], "ratio_to_bn": ms[name] / ms["bn"],
                   "ratio_to_compiled_bn": ms[name] / ms["bn_compiled"], "compile_s": compile_s[name]}
            out.append(rec)
            print(f"compiled {name:9s} {str(shape):18s} {rec['ratio_to_bn']:6.2f}x eager BN, "
                  f"{rec['ratio_to_compiled_bn']:.2f}x compiled BN (compile {compile_s[name]:.0f} s)", flush=True)
    return out


def bench_levers(device: str, reps: int, compiled: bool = True) -> list[dict]:
    """Each speed lever A/B on N=256, C=128, 8x8, K=3: the plain formulation (still in the library or
    written out here) against the one the layers use, forward+backward, interleaved."""
    from cbnorm import gmm
    from cbnorm.norms import functional
    from cbnorm.norms.functional import posterior_batch_norm, weighted_moments

    n, c, p, k = 256, 128, 64, 3
    g = torch.Generator(device=device).manual_seed(0)
    x3 = torch.randn(n, c, p, device=device, generator=g).requires_grad_()
    w = torch.randn(k, c, device=device, generator=g).requires_grad_()
    resp = torch.softmax(torch.randn(n, k, p, device=device, generator=g), dim=1)
    gain = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)

    def back(y):
        y.sum().backward()

    def plain_moments():
        lam, mean, var = weighted_moments(x3, resp, "joint")
        a, b = functional.normalizing_coefficients(mean, var, 1e-5, torch.rsqrt(lam)[:, None], gain, bias)
        back(functional.mix_affine(x3, resp, a, b, "joint"))

    pts = x3.detach().transpose(1, 2).reshape(n * p, c)[None]  # (1, M, C) contiguous
    pts_t = x3.detach().transpose(0, 1).reshape(c, n * p)  # (C, M) contiguous
    sub = torch.randperm(n * p, device=device, generator=g)[: n * p // 4].sort().values

    def bn_path(distributed: bool):
        layer = cbnorm.build_norm("bn", c).to(device)
        layer._distributed = lambda: distributed
        x4 = x3.detach().reshape(n, c, 8, 8).requires_grad_()
        return lambda: back(layer(x4))

    means = torch.randn(k, c, device=device, generator=g).requires_grad_()
    vars_ = (torch.rand(k, c, device=device, generator=g) + 0.5).requires_grad_()
    logw = torch.full((k,), -math.log(k), device=device, requires_grad=True)
    wa = torch.randn(k, c, device=device, generator=g).requires_grad_()

    def plain_mixture():
        resp = functional.log_posteriors(x3, means, vars_, logw, "joint").exp()
        back(functional.mix_affine(x3, resp, wa, w, "joint"))

    pairs = [
        ("bmm over N instead of matmul((K, C), (N, C, P))", "matmul", lambda: back(torch.matmul(w, x3)),
         "bmm", lambda: back(functional.batched_left(w, x3))),
        ("hand-written backward of MN eq. 34-36", "autograd", plain_moments,
         "posterior_batch_norm", lambda: back(posterior_batch_norm(x3, resp, gain, bias, 1e-5)[0])),
        ("hand-written backward of ACN's posterior mixing (eq. 19)", "autograd", plain_mixture,
         "joint_mixture_transform", lambda: back(functional.joint_mixture_transform(x3, means, vars_, logw, wa, w))),
        ("GMM fit on the (C, M) layout, no input check (MN)", "(M, C) + check", lambda: gmm.fit(pts, k),
         "(C, M)", lambda: gmm.fit(pts_t.t()[None], k, check_finite=False)),
        ("fit on 25% of the points (MN fit_fraction)", "all points", lambda: gmm.fit(pts_t.t()[None], k, check_finite=False),
         "25%", lambda: gmm.fit(pts_t.index_select(1, sub).t()[None], k, check_finite=False)),
        ("BatchNorm: native kernels outside DDP", "all-reduce path", bn_path(True), "native", bn_path(False)),
    ]
    if compiled:
        acn = make("acn", c, k, device)
        acn_compiled = torch.compile(acn)
        x4 = x3.detach().reshape(n, c, 8, 8).requires_grad_()
        pairs.append(("torch.compile of ACN (broadcast formulation, fused)", "eager", lambda: back(acn(x4)),
                      "compiled", lambda: back(acn_compiled(x4))))
    out = []
    for lever, a_name, a_fn, b_name, b_fn in pairs:
        ms = interleaved({a_name: a_fn, b_name: b_fn}, device, reps)
        rec = {"lever": lever, "before": a_name, "after": b_name, "before_ms": ms[a_name], "after_ms": ms[b_name],
               "speedup": ms[a_name] / ms[b_name]}
        out.append(rec)
        print(f"lever {lever:52s} {rec['before_ms']:7.2f} -> {rec['after_ms']:7.2f} ms ({rec['speedup']:.2f}x)",
              flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="one shape, K=3 only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--parts", default="layers,network,levers,compiled",
                   help="comma-separated parts to measure; with --merge, the others are kept from that file")
    p.add_argument("--merge", default=None, help="an earlier speed.json whose other parts are kept")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ks = [3] if a.quick else [2, 3, 5]
    shapes = SHAPES[:1] if a.quick else SHAPES
    parts = set(a.parts.split(","))
    result = json.loads(Path(a.merge).read_text()) if a.merge else {}
    result.update({"machine": machine(a.device), "goals": GOALS, "method": "forward+backward, interleaved with "
                   "nn.BatchNorm2d, median of the per-repetition ratios (repetitions per part in 'reps')"})
    result["reps"] = {**result.get("reps", {}), **{part: a.reps for part in parts}}
    if "layers" in parts:
        result["layers"] = bench_layers(a.device, a.reps, ks, shapes)
    if "network" in parts:
        result["network"] = bench_network(a.device, a.reps)
    if "levers" in parts:  # at 1 thread and at --threads: they do not gain alike
        result["levers"] = []
        for threads in sorted({1, a.threads}):
            torch.set_num_threads(threads)
            result["levers"] += [{"threads": threads, **r}
                                 for r in bench_levers(a.device, a.reps, compiled=not a.no_compile)]
        torch.set_num_threads(a.threads)
    if "compiled" in parts and not a.no_compile:
        result["compiled"] = bench_compiled(a.device, a.reps, shapes)
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = Path(a.out or f"bench/results/speed{'' if a.device == 'cpu' else '_' + a.device.replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
