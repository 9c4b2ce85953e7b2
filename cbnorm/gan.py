"""GAN runs (task "gan"): their fixed latents, the feature classifier that scores them, a generator's scores,
recomputing and checking a run's last evaluation, sample grids. Used by the GAN trainer
(``cbnorm.train.gan``), the evaluator (``python -m cbnorm.evaluate``), the app and the benchmarks; it imports no
trainer. The scores themselves are ``cbnorm.metrics``'.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .data import load_dataset
from .metrics import ClassifierFeatures, RealReference, generate, score_samples, summary_of, to_uint8
from .runs import DEFAULT_FILES, Run, _inside, load_run, read_safetensors

__all__ = ["GAN_FILES", "DEFAULT_CLASSIFIER", "sha256_of", "fixed_latents", "eval_latents", "load_classifier",
           "real_reference", "evaluate_generator", "resolve_classifier", "recompute", "CHECKED", "check_run",
           "image_grid"]

#: the feature classifier of the committed runs (relative to the repository root)
DEFAULT_CLASSIFIER = "checkpoints/gan-features/classifier"
GAN_FILES = {**DEFAULT_FILES, "latents": "latents.safetensors"}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fixed_latents(run: Run) -> Tensor:
    """The run's fixed latent vectors (num_fixed, latent_dim) float32, checked (shape, finite)."""
    files = {**GAN_FILES, **(run.config.get("files") or {})}
    path = _inside(run.path, files["latents"], "files.latents")
    tensors, _ = read_safetensors(path, "latents.safetensors")
    z = tensors.get("fixed")
    dim = int(run.config["latent"]["dim"])
    if z is None or z.dim() != 2 or z.shape[1] != dim or z.shape[0] < 1 or not z.is_floating_point():
        raise ValueError(f"latents.safetensors of {run.path.name} must hold 'fixed' of shape (n, {dim}), got "
                         f"{None if z is None else tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"latents.safetensors of {run.path.name} holds NaN or inf values")
    return z.float()


def eval_latents(config: Mapping) -> Tensor:
    """The scoring latents (eval_samples, latent_dim): drawn from ``eval_seed``, the same for every run."""
    ev = config["evaluation"]
    g = torch.Generator().manual_seed(int(ev["eval_seed"]))
    return torch.randn(int(ev["eval_samples"]), int(config["latent"]["dim"]), generator=g)


def load_classifier(path: str | os.PathLike, expected_sha256: Optional[str] = None):
    """(ClassifierFeatures, classifier Run) of a classify run directory; ``ValueError`` when it is not one or
    its weights differ from ``expected_sha256`` (a retrained classifier scores on another feature space)."""
    run = load_run(path)
    if run.config.get("task", "classify") != "classify":
        raise ValueError(f"the feature classifier {path} is a {run.config.get('task')!r} run, not a classifier")
    weights = _inside(run.path, {**DEFAULT_FILES, **(run.config.get("files") or {})}["weights"], "files.weights")
    if expected_sha256 and sha256_of(weights) != expected_sha256:
        raise ValueError(f"the feature classifier at {path} is not the one this run was scored with (SHA-256 of "
                         f"its weights differs from config.json evaluation.classifier_sha256): scores would not "
                         f"be comparable")
    return ClassifierFeatures(run), run


_REFERENCES: dict[tuple, Any] = {}


def real_reference(features_fn, classifier_sha: str, dataset: str, pr_samples: int, k: int, seed: int = 0):
    """The real test split's :class:`cbnorm.metrics.RealReference` (cached per process)."""
    key = (classifier_sha, dataset, int(pr_samples), int(k), int(seed))
    if key not in _REFERENCES:
        ds = load_dataset(dataset, "test")
        _REFERENCES[key] = RealReference.build(features_fn, ds.images, pr_samples, k, seed)
    return _REFERENCES[key]


def evaluate_generator(generator: nn.Module, config: Mapping, features_fn, ref) -> dict[str, Any]:
    """Scores of ``generator`` (eval mode) on the config's scoring latents against ``ref``."""
    ev = config["evaluation"]
    imgs = to_uint8(generate(generator, eval_latents(config)))
    return score_samples(features_fn, imgs, ref, len(config["class_names"]), float(ev["min_share"]))


def resolve_classifier(run_dir: Path, config: Mapping, override: Optional[str] = None) -> Path:
    if override:
        return Path(override)
    rel = config["evaluation"]["classifier"]
    p = Path(rel)
    return p if p.is_absolute() else (Path(run_dir) / p)


def recompute(run: Run | str, classifier: Optional[str] = None) -> dict[str, Any]:
    """The last evaluation of a GAN run recomputed from its weights (model.safetensors): {"step", "scores",
    "stored"} (for ``python -m cbnorm.evaluate RUN --check``)."""
    if not isinstance(run, Run):
        run = load_run(run)
    if run.config.get("task") != "gan":
        raise ValueError(f"{run.path} is not a GAN run (task {run.config.get('task')!r})")
    ev = run.config["evaluation"]
    feats, _ = load_classifier(resolve_classifier(run.path, run.config, classifier), ev.get("classifier_sha256"))
    ref = real_reference(feats, ev.get("classifier_sha256", ""), run.config["dataset"]["name"], ev["pr_samples"],
                         ev["k"])
    evals = [e for e in run.metrics.get("evals", []) if isinstance(e, dict)]
    stored = evals[-1] if evals else None
    return {"step": run.metrics.get("steps_done"), "scores": evaluate_generator(run.model, run.config, feats, ref),
            "stored": stored}


#: the scores ``--check`` compares, with how they are compared: "rel" |a - b| <= tol * max(1, |b|), "abs"
CHECKED = {"fd": "rel", "precision": "abs", "recall": "abs", "evenness": "abs", "modes": "abs"}


def check_run(run: Run, check: bool = False, tol: float = 0.002, as_json: bool = False,
              classifier: Optional[str] = None) -> int:
    """``python -m cbnorm.evaluate RUN [--check]`` for a GAN run: recompute the last evaluation from the
    weights and print it beside metrics.json; with ``check``, status 1 when a score differs by more than
    ``tol`` (FD relative to max(1, FD), the shares absolute, the mode count exactly), 2 when it cannot be
    made (no stored evaluation at the last step, classifier missing or not the one the run was scored with)."""
    try:
        res = recompute(run, classifier)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    got, stored = res["scores"], res["stored"]
    mismatches, rows = [], []
    if stored is None or stored.get("step") != res["step"]:
        print(f"error: metrics.json has no evaluation at the last step {res['step']}", file=sys.stderr)
        return 2
    for key, how in CHECKED.items():
        want = stored.get(key)
        rows.append(f"{key:10s} {got[key]:10.4f}  (metrics.json: {'n/a' if want is None else format(want, '.4f')})")
        if want is None:
            mismatches.append(f"{key}: missing in metrics.json")
            continue
        lim = (tol * max(1.0, abs(float(want)))) if how == "rel" else (0 if key == "modes" else tol)
        if abs(float(got[key]) - float(want)) > lim:
            mismatches.append(f"{key}: recomputed {got[key]:.4f}, metrics.json {want}")
    if as_json:
        print(json.dumps({**summary_of(got), "step": res["step"], "run": str(run.path), "mismatches": mismatches}))
    else:
        print(f"{run.path}: {run.config['model']['name']} generator / {run.norm} at {run.config['layers']}, step "
              f"{res['step']}, {got['n']} samples; FD in classifier features, k-NN precision/recall, modes")
        print("\n".join(rows))
    if check and mismatches:
        print("check FAILED (tolerance %g): %s" % (tol, "; ".join(mismatches)), file=sys.stderr)
        return 1
    if check and not as_json:
        print(f"check passed (tolerance {tol})")
    return 0


def image_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, value: int = 255) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) -> one grid image (rows of ``nrow``), ``pad`` pixels apart."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or len(a) == 0:
        raise ValueError(f"images must be a non-empty uint8 array (N, H, W[, C]), got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[..., None]
    n, h, w, c = a.shape
    ncol = max(1, min(int(nrow), n))
    rows = math.ceil(n / ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = a[i]
    return out[..., 0] if c == 1 else out
