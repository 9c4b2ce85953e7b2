"""Day <-> night translation against the rendered ground truth on the held-out photos.

    python bench/daynight.py [--input checkpoints/daynight-input] [--feature checkpoints/daynight-feature] \\
        [--threads 1] [--out bench/results/daynight.json]

For every held-out photo (cbnorm.daynight.HOLDOUT_PHOTOS, never cropped for training) and both directions:

* day -> night: input = the photo, ground truth = its night rendering (the runs' renderer parameters and the
  photo's seed, exactly as in training);
* night -> day: input = the rendering, ground truth = the photo;

PSNR (dB, data range 255) and SSIM (``skimage.metrics.structural_similarity``, channel_axis=-1, data range
255) of each method's output against the ground truth, then the mean over the photos. Methods:

* ``identity``: the input itself;
* ``reinhard``: Reinhard et al. 2001 colour transfer in CIELAB to the global Lab statistics of the training
  photos of the target context;
* ``histogram``: ``skimage.exposure.match_histograms`` to all pixels of the training photos of the target
  context;
* ``cn_statistics``: CN's per-context statistics (eq. 23-24) of the training photos, no learning
  (``cbnorm.daynight.transfer.training_stats``, i.e. ``fit_contexts`` of the training photos; what the page's "fit
  your own contexts" does with uploads);
* ``cn_input``: the input-level run (CN-Channels learned in front of the siamese network; paper IV-E);
* ``autoencoder``: the feature-level run, ``D_t(E_s(x))``;
* ``autoencoder_residual``: the feature-level run as ``x + D_t(E_s(x)) - D_s(E_s(x))`` (the original's
  detail kept), for comparison.

``noise_ceiling`` (day -> night only): the PSNR/SSIM of the noise-free rendering against the noisy ground
truth: no deterministic translator can expect to do better than about this.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cbnorm.daynight import (HOLDOUT_PHOTOS, TRAIN_PHOTOS, DayNightPairs, NightParams,  # noqa: E402
                             load_photo, photo_seed, render_night)
from bench.speed import machine as speed_machine  # noqa: E402
from cbnorm.runs import load_run  # noqa: E402
from cbnorm.train.daynight import command_of  # noqa: E402
from cbnorm.daynight.transfer import (histogram_match_array, lab_stats, reinhard_array, training_stats,  # noqa: E402
                             translate_array, translate_with_stats)

METHODS = ("identity", "reinhard", "histogram", "cn_statistics", "cn_input", "autoencoder",
           "autoencoder_residual")
DIRECTIONS = (("day", "night"), ("night", "day"))


def machine() -> dict:
    return {**speed_machine("cpu"), "platform": platform.platform()}


def scores(out: np.ndarray, gt: np.ndarray) -> dict:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return {"psnr": float(peak_signal_noise_ratio(gt, out, data_range=255)),
            "ssim": float(structural_similarity(gt, out, channel_axis=-1, data_range=255))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="checkpoints/daynight-input")
    p.add_argument("--feature", default="checkpoints/daynight-feature")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/daynight.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    run_in, run_ae = load_run(args.input), load_run(args.feature)
    if run_in.config["renderer"] != run_ae.config["renderer"]:
        raise SystemExit("the two runs were trained with different renderer parameters; the ground truth "
                         "would differ")
    params = NightParams.from_dict(run_in.config["renderer"])
    train = DayNightPairs(TRAIN_PHOTOS, params)
    ref = {"day": train.day, "night": train.night}
    lab = {c: lab_stats(ref[c]) for c in ref}
    pix = {c: train.pixels(c) for c in ref}
    stats = training_stats(params)
    clean = replace(params, noise_shot=0.0, noise_read=0.0)

    def method(name: str, x: np.ndarray, src: str, tgt: str) -> np.ndarray:
        if name == "identity":
            return x.copy()
        if name == "reinhard":
            return reinhard_array(x, *lab[tgt])
        if name == "histogram":
            return histogram_match_array(x, pix[tgt])
        if name == "cn_statistics":
            return np.asarray(translate_with_stats(Image.fromarray(x), stats, src, tgt))
        if name == "cn_input":
            return translate_array(run_in, x, src, tgt)
        if name == "autoencoder":
            return translate_array(run_ae, x, src, tgt)
        return translate_array(run_ae, x, src, tgt, residual=True)

    results: dict = {m: {} for m in METHODS}
    seconds: dict = {m: 0.0 for m in METHODS}
    megapixels = 0.0
    photos = {}
    for name in HOLDOUT_PHOTOS:
        day = np.array(load_photo(name))
        night = render_night(day, params, seed=photo_seed(params, name))
        photos[name] = {"day": day, "night": night,
                        "clean": render_night(day, clean, seed=photo_seed(params, name))}
        megapixels += 2 * day.shape[0] * day.shape[1] / 1e6
    for m in METHODS:
        for src, tgt in DIRECTIONS:
            per = {}
            for name, ph in photos.items():
                t0 = time.perf_counter()
                out = method(m, ph[src], src, tgt)
                seconds[m] += time.perf_counter() - t0
                assert out.shape == ph[tgt].shape and out.dtype == np.uint8
                per[name] = scores(out, ph[tgt])
            results[m][f"{src}_to_{tgt}"] = {
                "psnr": float(np.mean([v["psnr"] for v in per.values()])),
                "ssim": float(np.mean([v["ssim"] for v in per.values()])), "per_photo": per}
    ceiling = {name: scores(ph["clean"], ph["night"]) for name, ph in photos.items()}
    table = [{"method": m, **{f"{d}_{k}": round(results[m][d][k], 4 if k == "ssim" else 2)
                              for d in ("day_to_night", "night_to_day") for k in ("psnr", "ssim")},
              "seconds_per_megapixel": round(seconds[m] / megapixels, 4)} for m in METHODS]
    out = {
        "benchmark": "day<->night translation vs the rendered ground truth on held-out photos",
        "description": __doc__.split("\n\n", 2)[2].strip(),
        "holdout_photos": list(HOLDOUT_PHOTOS), "train_photos": list(TRAIN_PHOTOS),
        "renderer": params.to_dict(),
        "runs": {"cn_input": args.input, "autoencoder": args.feature},
        "table": table,
        "results": results,
        "noise_ceiling": {"day_to_night": {
            "psnr": float(np.mean([v["psnr"] for v in ceiling.values()])),
            "ssim": float(np.mean([v["ssim"] for v in ceiling.values()])), "per_photo": ceiling}},
        "machine": machine(),
        "commands": [command_of(run_in.config, args.input), command_of(run_ae.config, args.feature),
                     "python bench/daynight.py " + " ".join(
                         f"--{k} {v}" for k, v in vars(args).items())],
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    w = max(len(m) for m in METHODS)
    print(f"{'method':<{w}}  d->n PSNR  d->n SSIM  n->d PSNR  n->d SSIM  s/MP")
    for r in table:
        print(f"{r['method']:<{w}}  {r['day_to_night_psnr']:9.2f}  {r['day_to_night_ssim']:9.4f}  "
              f"{r['night_to_day_psnr']:9.2f}  {r['night_to_day_ssim']:9.4f}  {r['seconds_per_megapixel']:.3f}")
    c = out["noise_ceiling"]["day_to_night"]
    print(f"{'noise_ceiling':<{w}}  {c['psnr']:9.2f}  {c['ssim']:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
