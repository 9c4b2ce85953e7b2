"""Train a day<->night translator: ``python -m cbnorm.train.daynight ... --out checkpoints/NAME`` writes a run
directory (cbnorm.runs, task "daynight") that ``cbnorm.load_run`` reads and ``cbnorm.daynight.transfer.translate``
uses (``python -m cbnorm.train_daynight``, the old path, still works for one version).

    python -m cbnorm.train.daynight --translator input --norm cnx --out checkpoints/daynight-input
    python -m cbnorm.train.daynight --translator feature --norm cn --out checkpoints/daynight-feature

Data (cbnorm.daynight): the training photos (day) and their night renderings (NightParams, stored in the
run's config under "renderer"; ``--renderer '{"scotopic": 0.8}'`` changes them); every step draws
``--batch-size`` random crop locations of ``--crop`` pixels and takes the day and the night crop at each, with
the same random horizontal flip. The held-out photos are never seen.

* ``--translator input`` (context-normalization.txt IV-E): model ``daynight_siamese``: CN on the RGB channels
  (``--norm``: cnx learns per-context mean and log-variance; cn uses per-context batch statistics; no affine,
  no prior scale, so the layer's parameters are exactly (mu_k, sigma_k)) in front of a small CNN. Siamese
  pairs: the day crop embedded with context 0 and the night crop with context 1; same location = positive,
  the night crop of another location of the batch = negative; contrastive loss (Hadsell et al. 2006)
  ``y d^2 + (1 - y) max(0, margin - d)^2`` on Euclidean distances of the embeddings. ``--init data`` starts
  the CN parameters of cnx at each context's pixel statistics (CN's eq. 23-24 over the training photos),
  ``--init identity`` at mean 0, variance 1 (the library's default). ``--norm-lr-mult`` scales the learning
  rate of the norm's parameters.
* ``--translator feature``: model ``daynight_ae``: a conv autoencoder with context layers (``--norm``);
  each step reconstructs day->day and night->night and translates day->night and night->day (encoder
  context = the input's, decoder context = the target's), mean squared error in [0, 1] pixel units.

Metrics: the loss every ``--log-every`` steps; at the end the translation PSNR on the *training* photos (both
directions; the held-out numbers are the bench's, bench/daynight.py) and, for the siamese network, pair
verification accuracy on held-out crops at distance threshold margin / 2.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._version import __version__
from ..daynight.render import CONTEXTS, HOLDOUT_PHOTOS, TRAIN_PHOTOS, DayNightPairs, NightParams
from ..daynight.scores import (CHECK_TOL, check_run, contrastive, psnr, recompute, to_tensor,  # noqa: F401
                               train_psnrs, verification)
from ..norms import ContextNormX, NormBase, resolve_name
from .options import given_options, json_opt
from ..runs import (CONFIG_NAME, DEFAULT_FILES, FORMAT_VERSION, build_model_from_config, count_parameters, load_run,
                   save_run, validate_config)

__all__ = ["train_daynight", "main", "build_parser", "DEFAULTS", "make_config", "command_of"]

DEFAULTS: dict[str, Any] = {
    "translator": "input", "norm": None, "init": "data", "width": 16, "embed_dim": 32, "steps": 1500,
    "batch_size": None, "crop": None, "lr": 3e-3, "norm_lr_mult": 1.0, "weight_decay": 1e-4, "margin": 1.0,
    "renderer": None, "seed": 0, "log_every": 25, "out": None, "threads": 1, "quiet": False,
}
_RUNTIME = ("out", "threads", "quiet")
#: per-translator defaults of the options left at None
_PER_TRANSLATOR = {"input": {"norm": "cnx", "batch_size": 32, "crop": 48},
                   "feature": {"norm": "cn", "batch_size": 8, "crop": 32}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cbnorm.train.daynight", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--translator", choices=("input", "feature"), default=d["translator"])
    p.add_argument("--norm", help="context layer: cnx | cn | cn-embed (input: cnx, feature: cn)")
    p.add_argument("--init", choices=("data", "identity"), default=d["init"],
                   help="start of the input-level cnx/cn-embed statistics (data)")
    p.add_argument("--width", type=int, default=d["width"], help=f"channels of the first conv ({d['width']})")
    p.add_argument("--embed-dim", type=int, default=d["embed_dim"], help="siamese embedding size")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, help="crop locations per step (input: 32, feature: 8)")
    p.add_argument("--crop", type=int, help="crop size in pixels (input: 48, feature: 32)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--norm-lr-mult", type=float, default=d["norm_lr_mult"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--margin", type=float, default=d["margin"], help="contrastive margin")
    p.add_argument("--renderer", help="JSON object of NightParams overrides, e.g. '{\"scotopic\": 0.8}'")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--out", required=True, help="run directory to write (must not hold a run)")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads (1)")
    p.add_argument("--quiet", action="store_true")
    return p


def _options(given: Any) -> dict:
    a = given_options(given, build_parser, DEFAULTS, "train_daynight()")
    a = {**DEFAULTS, **{k: v for k, v in a.items() if v is not None}}
    if a["translator"] not in _PER_TRANSLATOR:
        raise ValueError(f"--translator must be 'input' or 'feature', got {a['translator']!r}")
    for k, v in _PER_TRANSLATOR[a["translator"]].items():
        if a[k] is None:
            a[k] = v
    for k in ("steps", "batch_size", "crop", "width", "embed_dim", "log_every"):
        if isinstance(a[k], bool) or not isinstance(a[k], int) or a[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {a[k]!r}")
    if a["batch_size"] < 2:
        raise ValueError("--batch-size must be >= 2 (negatives are other locations of the batch)")
    if a["translator"] == "feature" and a["crop"] % 4:
        raise ValueError(f"--crop must be a multiple of 4 for the autoencoder, got {a['crop']}")
    for k in ("lr", "norm_lr_mult", "margin"):
        if not (isinstance(a[k], (int, float)) and a[k] > 0 and math.isfinite(a[k])):
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {a[k]!r}")
    if a["weight_decay"] < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {a['weight_decay']!r}")
    if not a["out"]:
        raise ValueError("the output run directory 'out' is required")
    return a


def make_config(a: dict) -> dict:
    """The run's config.json for the options ``a`` (after :func:`_options`)."""

    renderer = NightParams.from_dict(json_opt(a["renderer"], "renderer")).to_dict()
    norm = resolve_name(a["norm"])
    if a["translator"] == "input":
        model = {"name": "daynight_siamese", "kwargs": {"in_channels": 3, "num_contexts": 2, "width": a["width"],
                                                        "embed_dim": a["embed_dim"]}}
        norm_kwargs = {"num_contexts": 2, "affine": False, "prior_scaling": False}
        layers = ["input_norm"]
    else:
        model = {"name": "daynight_ae", "kwargs": {"in_channels": 3, "num_contexts": 2, "width": a["width"]}}
        norm_kwargs = {"num_contexts": 2}
        layers = ["blocks.enc1.norm", "blocks.enc2.norm", "blocks.enc3.norm", "blocks.dec2.norm",
                  "blocks.dec1.norm"]
    config = {
        "format_version": FORMAT_VERSION, "task": "daynight", "cbnorm_version": __version__,
        "translator": a["translator"], "model": model, "norm": norm, "norm_kwargs": norm_kwargs,
        "layers": layers, "input_norm": None,
        "contexts": {"spec": "daynight", "num_contexts": 2, "names": list(CONTEXTS), "label_derived": False,
                     "label_to_context": None, "kmeans": None},
        "renderer": renderer,
        "dataset": {"name": "daynight-photos", "train_photos": list(TRAIN_PHOTOS),
                    "holdout_photos": list(HOLDOUT_PHOTOS), "crop": a["crop"]},
        # image_size = the training crop; translation works at any size
        "preprocessing": {"channels": 3, "image_size": [a["crop"], a["crop"]], "mean": [0.0, 0.0, 0.0],
                          "std": [1.0, 1.0, 1.0]},
        "training": {k: a[k] for k in DEFAULTS if k not in _RUNTIME},
        "files": dict(DEFAULT_FILES),
    }
    return validate_config(config)


def command_of(config: dict, out: str) -> str:
    """The CLI command that trains the run described by ``config`` (its stored options) into ``out``."""
    opts = dict(config.get("training") or {})
    parts = ["python -m cbnorm.train.daynight"]
    for k in DEFAULTS:
        if k in _RUNTIME or k not in opts or opts[k] is None:
            continue
        v = opts[k]
        v = json.dumps(v) if isinstance(v, dict) else v
        parts.append(f"--{k.replace('_', '-')} {shlex.quote(str(v))}")
    return " ".join(parts + ["--threads 1", f"--out {shlex.quote(str(out))}"])


def _optimizer(model: nn.Module, a: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay on conv/linear weights only (as cbnorm.train), norm parameters at lr * mult."""
    in_norm = {id(p) for m in model.modules() if isinstance(m, NormBase) for p in m.parameters()}
    decay, no_decay, norm = [], [], []
    for p in model.parameters():
        if id(p) in in_norm:
            norm.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if norm:
        groups.append({"params": norm, "weight_decay": 0.0, "lr": a["lr"] * a["norm_lr_mult"]})
    return torch.optim.AdamW(groups, lr=a["lr"])


@torch.no_grad()
def _init_from_data(model: nn.Module, pairs) -> None:
    """Start the input norm (cnx) at each context's pixel mean and variance (CN eq. 23-24)."""
    layer = model.input_norm
    if not isinstance(layer, ContextNormX):
        return
    for k, ctx in enumerate(("day", "night")):
        px = pairs.pixels(ctx).astype(np.float64) / 255.0
        layer.mean[k] = torch.as_tensor(px.mean(0), dtype=layer.mean.dtype)
        layer.log_var[k] = torch.as_tensor(np.log(px.var(0)), dtype=layer.log_var.dtype)


def train_daynight(given: Any) -> Path:
    """Train a translator; returns the run directory. ``given``: a Namespace, a dict of options (the CLI's
    names with underscores) or a list of CLI arguments."""

    a = _options(given)
    out = Path(a["out"])
    if (out / CONFIG_NAME).exists():
        raise ValueError(f"{out} already holds a run; choose another --out")
    if a["threads"]:
        torch.set_num_threads(int(a["threads"]))
    config = make_config(a)
    params = NightParams.from_dict(config["renderer"])
    pairs = DayNightPairs(TRAIN_PHOTOS, params)
    torch.manual_seed(a["seed"])
    rng = np.random.default_rng(a["seed"])
    model = build_model_from_config(config)
    if a["translator"] == "input" and a["init"] == "data":
        _init_from_data(model, pairs)
    model.train()
    opt = _optimizer(model, a)
    B, crop = a["batch_size"], a["crop"]
    zeros, ones = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    losses: list[list[float]] = []
    acc, acc_n = 0.0, 0
    t0 = time.perf_counter()
    for step in range(1, a["steps"] + 1):
        day, night, _ = pairs.sample(B, crop, rng)
        flips = rng.random(B) < 0.5
        xd, xn = to_tensor(day, flips), to_tensor(night, flips)
        if a["translator"] == "input":
            emb = model(torch.cat([xd, xn]), context=torch.cat([zeros, ones]))
            loss, _, _ = contrastive(emb[:B], emb[B:], a["margin"])
        else:
            x = torch.cat([xd, xn, xd, xn])
            target = torch.cat([xd, xn, xn, xd])
            out_img = model(x, context=torch.cat([zeros, ones, zeros, ones]),
                            target_context=torch.cat([zeros, ones, ones, zeros]))
            loss = F.mse_loss(out_img, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"loss became {float(loss.detach())} at step {step}; lower --lr")
        acc, acc_n = acc + float(loss.detach()), acc_n + 1
        if step % a["log_every"] == 0 or step == a["steps"]:
            losses.append([step, acc / acc_n])
            if not a["quiet"]:
                print(f"step {step}/{a['steps']}  loss {acc / acc_n:.5f}  "
                      f"{(time.perf_counter() - t0) / step * 1000:.0f} ms/step", flush=True)
            acc, acc_n = 0.0, 0
    wall = time.perf_counter() - t0
    model.eval()
    metrics: dict[str, Any] = {"loss": losses, "steps_done": a["steps"], "wall_s": round(wall, 2),
                               "time_per_step_s": wall / a["steps"], "params": count_parameters(model)}
    if a["translator"] == "input":
        metrics.update(verification(model, DayNightPairs(HOLDOUT_PHOTOS, params), a))
    save_run(out, config, model, metrics)
    metrics.update(train_psnrs(load_run(out), pairs))
    save_run(out, config, model, metrics)
    if not a["quiet"]:
        print(json.dumps({k: v for k, v in metrics.items() if k != "loss"}, indent=1))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train_daynight(args)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
