"""What a day <-> night run (task "daynight") is scored on: the translation PSNR of the training photos (both
directions, against the renderer's own image) and, for an input translator, pair verification on held-out
crops. The trainer (``cbnorm.train.daynight``) stores them; ``python -m cbnorm.evaluate RUN --check``
recomputes them here (:func:`check_run`) without importing the trainer.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import HOLDOUT_PHOTOS, TRAIN_PHOTOS, DayNightPairs, NightParams
from .transfer import translate_array

__all__ = ["to_tensor", "contrastive", "verification", "psnr", "train_psnrs", "recompute", "CHECK_TOL", "check_run"]


def to_tensor(batch: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], flipped left-right where ``flips``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    if flips.any():
        f = torch.from_numpy(flips)
        x[f] = x[f].flip(-1)
    return x


def contrastive(e_a: torch.Tensor, e_b: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    d_pos = (e_a - e_b).pow(2).sum(1).add(1e-9).sqrt()
    d_neg = (e_a - e_b.roll(1, dims=0)).pow(2).sum(1).add(1e-9).sqrt()
    loss = 0.5 * (d_pos.pow(2).mean() + F.relu(margin - d_neg).pow(2).mean())
    return loss, d_pos, d_neg


@torch.no_grad()
def verification(model: nn.Module, pairs, a: dict, n: int = 256) -> dict:
    rng = np.random.default_rng(12345)
    day, night, _ = pairs.sample(n, a["crop"], rng)
    no = np.zeros(n, bool)
    e_d = model(to_tensor(day, no), context=torch.zeros(n, dtype=torch.long))
    e_n = model(to_tensor(night, no), context=torch.ones(n, dtype=torch.long))
    _, d_pos, d_neg = contrastive(e_d, e_n, a["margin"])
    thr = a["margin"] / 2
    return {"holdout_pair_acc": float(((d_pos < thr).float().mean() + (d_neg >= thr).float().mean()) / 2),
            "holdout_pos_dist": float(d_pos.mean()), "holdout_neg_dist": float(d_neg.mean())}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def train_psnrs(run, pairs) -> dict[str, float]:
    """Mean PSNR (dB) of a saved run translating each training photo's day rendering to night and back
    against the renderer's own image: {"train_psnr_day_to_night", "train_psnr_night_to_day"}."""
    return {f"train_psnr_{src}_to_{tgt}": float(np.mean([psnr(translate_array(run, im, src, tgt), ref)
                                                         for im, ref in zip(imgs, refs)]))
            for src, tgt, imgs, refs in (("day", "night", pairs.day, pairs.night),
                                         ("night", "day", pairs.night, pairs.day))}


def recompute(run) -> dict[str, float]:
    """The scores ``cbnorm.train.daynight`` stored, recomputed from a loaded run's weights: the mean PSNR (dB) of
    translating each training photo's day rendering to night and back against the renderer's own image, and for
    an input translator the hold-out verification (pair accuracy, mean distances of 256 seeded crop pairs)."""
    cfg = run.config
    params = NightParams.from_dict(cfg["renderer"])
    pairs = DayNightPairs(TRAIN_PHOTOS, params)
    out: dict[str, float] = {}
    run.model.eval()
    with torch.no_grad():
        if cfg["translator"] == "input":
            a = {"crop": int(cfg["training"]["crop"]), "margin": float(cfg["training"]["margin"])}
            out.update(verification(run.model, DayNightPairs(HOLDOUT_PHOTOS, params), a))
        out.update(train_psnrs(run, pairs))
    return out


#: tolerances of ``check_run``: PSNR in dB, distances relative, the pair accuracy absolute
CHECK_TOL = {"train_psnr_day_to_night": 0.05, "train_psnr_night_to_day": 0.05, "holdout_pair_acc": 0.002,
             "holdout_pos_dist": 0.002, "holdout_neg_dist": 0.002}


def check_run(run, check: bool = False, as_json: bool = False) -> int:
    """``python -m cbnorm.evaluate RUN [--check]`` for a day-night run: ``recompute`` beside metrics.json; with
    ``check``, status 1 when a score differs by more than ``CHECK_TOL`` (distances relative to max(1, value))."""
    got = recompute(run)
    mismatches, rows = [], []
    for key, value in got.items():
        want = run.metrics.get(key)
        rows.append(f"{key:24s} {value:.4f}  (metrics.json: {'n/a' if want is None else format(want, '.4f')})")
        lim = CHECK_TOL[key] * (max(1.0, abs(float(want))) if key.endswith("_dist") and want is not None else 1.0)
        if want is None or abs(float(want) - value) > lim:
            mismatches.append(f"{key}: recomputed {value:.4f}, metrics.json {want}")
    if as_json:
        print(json.dumps({**got, "run": str(run.path), "mismatches": mismatches}))
    else:
        print(f"{run.path}: day-night {run.config['translator']} translator / {run.norm}, "
              f"{len(run.config.get('dataset', {}).get('train_photos', [])) or 'the'} training photos")
        print("\n".join(rows))
    if check and mismatches:
        print("check FAILED: " + "; ".join(mismatches), file=sys.stderr)
        return 1
    if check and not as_json:
        print("check passed (PSNR within 0.05 dB, verification within 0.002)")
    return 0
