"""Scores of generated images that work offline: Fréchet distance in a classifier's feature space, k-NN
precision / recall, and a mode count.

* :func:`frechet_distance` (features_a (N, D), features_b (M, D)) -> float: the Fréchet distance between the
  Gaussians fitted to two feature sets, ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al.
  2017, eq. 6; Dowson & Landau 1982). With the features of Inception-v3's pool3 layer this is FID. Here the
  features are those of a Fashion-MNIST classifier trained by this project (:class:`ClassifierFeatures`:
  the input of its last linear layer), so the score is called **"FD in classifier features"**: its values
  are not comparable with any published FID, only with each other (same classifier, same sample sizes).
* :func:`precision_recall`: the k-NN manifold precision and recall of Kynkäänniemi et al. 2019 (Sec. 3):
  each real feature gets a ball reaching its k-th nearest real neighbour; precision = share of generated
  samples inside some real ball (quality), recall = share of real samples inside some generated ball
  (generated balls from the generated k-NN; coverage of the real data).
* :func:`class_coverage`: the classifier's predicted classes of the generated samples: how many of the
  classes get at least ``min_share`` of their uniform share, the normalized entropy of the class histogram
  (1 = every class equally often) and its KL divergence from the uniform distribution.

Real FID (optional, not shipped): compute Inception-v3 pool3 features (2048-d) of both image sets with
weights you have on disk, e.g. ``pytorch-fid``'s ``InceptionV3([3])`` with its FID weights file, resize
grey 28x28 images to 299x299 RGB, and pass the two (N, 2048) arrays to :func:`frechet_distance`; nothing
here downloads weights. :func:`score_samples` takes any ``features`` callable for that purpose.

Library code: numpy, scipy-free (the tests compare with scipy.linalg.sqrtm), torch for the feature passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_from_stats", "knn_radii", "precision_recall",
           "class_coverage", "ClassifierFeatures", "to_uint8", "generate", "RealReference", "score_samples",
           "SCORE_NAME"]

#: what the Fréchet distance of this module is called wherever it is shown
SCORE_NAME = "FD in classifier features"


# ============================================================================ Fréchet distance
def _as_features(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{what} must be a (N, D) array of features with N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or inf values")
    return a


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, ``np.cov``) of features (N, D), float64."""
    a = _as_features(features, "features")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a: Any, cov_a: Any, mu_b: Any, cov_b: Any) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))``.

    ``Tr((S_a S_b)^(1/2))`` is computed as ``sum sqrt(eig(A^(1/2) S_b A^(1/2)))`` with A = S_a (the same
    eigenvalues as S_a S_b, but of a symmetric PSD matrix: no complex parts, no singular-matrix retries);
    negative round-off eigenvalues are clipped at 0. The result is clipped at 0.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64).reshape(-1), np.asarray(mu_b, np.float64).reshape(-1)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"statistics do not match: means {mu_a.shape} and {mu_b.shape}, covariances "
                         f"{cov_a.shape} and {cov_b.shape}")
    root_a = _sqrt_psd(cov_a)
    m = root_a @ cov_b @ root_a
    tr_cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross))


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to features_a (N, D) and features_b (M, D) (see module)."""
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same dimension, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# ============================================================================ precision / recall
def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)
    return d.clamp_min_(0.0)


def knn_radii(features: Any, k: int = 3, chunk: int = 2048) -> np.ndarray:
    """Distance (N,) of every row to its k-th nearest other row (Euclidean; the row itself excluded)."""
    a = torch.as_tensor(_as_features(features, "features"))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < a.shape[0]:
        raise ValueError(f"k must be an int in [1, N - 1] = [1, {a.shape[0] - 1}], got {k!r}")
    out = []
    for i in range(0, a.shape[0], chunk):
        d = _sq_dists(a[i:i + chunk], a)
        # k + 1 smallest: the row itself (distance 0) is among them
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out).sqrt().numpy()


def _inside_any(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    hit = torch.zeros(points.shape[0], dtype=torch.bool)
    r2 = radii * radii
    for i in range(0, points.shape[0], chunk):
        d = _sq_dists(points[i:i + chunk], centres)
        hit[i:i + chunk] = (d <= r2).any(dim=1)
    return hit


def precision_recall(real: Any, fake: Any, k: int = 3, chunk: int = 2048,
                     real_radii: Optional[np.ndarray] = None) -> dict[str, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of ``fake`` (M, D) against ``real`` (N, D).

    ``real_radii``: the real set's k-NN radii when already computed (:func:`knn_radii`). Returns
    {"precision", "recall", "k"}."""
    r = _as_features(real, "real")
    f = _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features must have the same dimension, got {r.shape[1]} and {f.shape[1]}")
    rr = knn_radii(r, k, chunk) if real_radii is None else np.asarray(real_radii, np.float64)
    if rr.shape != (r.shape[0],):
        raise ValueError(f"real_radii must have shape ({r.shape[0]},), got {rr.shape}")
    fr = knn_radii(f, k, chunk)
    rt, ft = torch.as_tensor(r), torch.as_tensor(f)
    precision = float(_inside_any(ft, rt, torch.as_tensor(rr), chunk).double().mean())
    recall = float(_inside_any(rt, ft, torch.as_tensor(fr), chunk).double().mean())
    return {"precision": precision, "recall": recall, "k": int(k)}


# ============================================================================ modes
def class_coverage(predictions: Any, num_classes: int, min_share: float = 0.1) -> dict[str, Any]:
    """How the predicted classes (N,) of generated samples spread over ``num_classes`` classes.

    ``modes``: classes predicted for at least ``min_share`` of the uniform share (``min_share / num_classes``
    of the samples; 0.1 -> 1% with 10 classes, so a few stray predictions do not count as a mode);
    ``evenness``: entropy of the class histogram over ``log(num_classes)`` (1 = uniform, 0 = one class);
    ``kl_uniform``: KL(histogram || uniform) in nats; ``counts`` per class."""
    p = np.asarray(predictions.detach().cpu().numpy() if isinstance(predictions, Tensor) else predictions)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= num_classes:
        raise ValueError(f"predictions must be a non-empty (N,) array of class ids in [0, {num_classes - 1}]")
    counts = np.bincount(p, minlength=num_classes)
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {"modes": int((share >= min_share / num_classes).sum()), "num_classes": int(num_classes),
            "evenness": max(0.0, entropy / math.log(num_classes)), "kl_uniform": max(0.0, math.log(num_classes) - entropy),
            "counts": counts.astype(int).tolist(), "min_share": float(min_share)}


# ============================================================================ feature passes
def to_uint8(x: Tensor) -> np.ndarray:
    """Generator output (N, C, H, W) in [-1, 1] -> uint8 images (N, H, W) for C = 1, else (N, H, W, C): the
    samples as a saved image holds them (the classifier sees exactly these)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {type(x).__name__}")
    u = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return (u[:, 0] if u.shape[1] == 1 else u.permute(0, 2, 3, 1)).contiguous().numpy()


@torch.no_grad()
def generate(generator: nn.Module, latents: Tensor, batch_size: int = 1000) -> Tensor:
    """``generator(z)`` in eval mode (deterministic, running statistics), in batches; (N, C, H, W) on CPU."""
    was = generator.training
    generator.eval()
    dev = next(generator.parameters()).device
    try:
        out = [generator(latents[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(latents), batch_size)]
    finally:
        generator.train(was)
    return torch.cat(out)


class ClassifierFeatures:
    """Features and predicted classes of uint8 images under a classifier run (task "classify"): the input of
    the model's last linear layer ``head`` (for the shallow CNN: the global average pool of conv4, after ReLU).

    ``run``: a loaded :class:`cbnorm.runs.Run`. Call ``(images uint8 (N, H, W[, C]))`` -> (features (N, D)
    float64, predictions (N,) int64)."""

    def __init__(self, run, batch_size: int = 1000) -> None:
        head = dict(run.model.named_modules()).get("head")
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the feature classifier {run.path} has no linear layer named 'head' (its features "
                             f"are the input of that layer)")
        self.run, self.head, self.batch_size = run, head, int(batch_size)
        self.dim = head.in_features
        self.class_names = list(run.class_names)

    @torch.no_grad()
    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        feats: list[Tensor] = []
        preds: list[Tensor] = []
        hook = self.head.register_forward_hook(lambda m, a, out: feats.append(a[0].detach().double().cpu()))
        model = self.run.model
        was = model.training
        model.eval()
        try:
            for i in range(0, len(images), self.batch_size):
                x = self.run.preprocess(np.asarray(images[i:i + self.batch_size]))
                preds.append(model(x).argmax(1).cpu())
        finally:
            hook.remove()
            model.train(was)
        if not feats:
            raise ValueError("no images to score")
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()


@dataclass
class RealReference:
    """What every score compares with: the real images' features, their Gaussian, the k-NN radii of a fixed
    subset (precision / recall) and the classifier's class histogram on them."""

    features: np.ndarray
    mu: np.ndarray
    cov: np.ndarray
    pr_index: np.ndarray
    pr_radii: np.ndarray
    predictions: np.ndarray
    k: int

    @classmethod
    def build(cls, features_fn: Callable[[Any], tuple[np.ndarray, np.ndarray]], images: Any, pr_samples: int = 5000,
              k: int = 3, seed: int = 0) -> "RealReference":
        feats, preds = features_fn(images)
        n = feats.shape[0]
        idx = np.sort(np.random.default_rng(seed).choice(n, size=min(int(pr_samples), n), replace=False))
        mu, cov = gaussian_stats(feats)
        return cls(feats, mu, cov, idx, knn_radii(feats[idx], k), preds, int(k))


def score_samples(features_fn: Callable[[Any], tuple[np.ndarray, np.ndarray]], images: Any, ref: RealReference,
                  num_classes: int, min_share: float = 0.1) -> dict[str, Any]:
    """Every score of uint8 generated ``images`` against ``ref``: {"fd", "precision", "recall", "modes",
    "evenness", "kl_uniform", "counts", "n"} ("fd" = :data:`SCORE_NAME`)."""
    feats, preds = features_fn(images)
    if not np.isfinite(feats).all():
        return {"fd": float("nan"), "precision": float("nan"), "recall": float("nan"), "modes": 0,
                "evenness": float("nan"), "kl_uniform": float("nan"), "counts": [], "n": int(len(feats))}
    fd = frechet_distance_from_stats(ref.mu, ref.cov, *gaussian_stats(feats))
    pr = precision_recall(ref.features[ref.pr_index], feats, ref.k, real_radii=ref.pr_radii)
    cov = class_coverage(preds.astype(np.int64), num_classes, min_share)
    return {"fd": fd, "precision": pr["precision"], "recall": pr["recall"], "modes": cov["modes"],
            "evenness": cov["evenness"], "kl_uniform": cov["kl_uniform"], "counts": cov["counts"],
            "n": int(len(feats))}


def summary_of(scores: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of a :func:`score_samples` result."""
    return {k: v for k, v in scores.items() if not isinstance(v, (list, tuple, np.ndarray))}
