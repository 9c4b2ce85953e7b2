"""Analysis behind the app: per-channel mixture fits for histograms, normality statistics, embeddings.

* Histograms with mixtures (MN paper Fig. 1, CB-Norm paper Fig. 4): ``channel_values`` takes the values of
  chosen channels, ``fit_channel_mixtures`` fits K 1-D Gaussians per channel with ``cbnorm.gmm`` (all
  channels in one batched call), ``layer_channel_mixtures`` reads a layer's own mixture and marginalises its
  diagonal Gaussians to each channel, ``mixture_curves`` evaluates the weighted component densities.
* ``normality_stats``: skewness, excess kurtosis and distances to N(0, 1) (Kolmogorov-Smirnov statistic,
  1-Wasserstein) per channel — the papers' "closer to normal, less skewed" claim, in numbers.
* ``embed_snapshots``: PCA / t-SNE (openTSNE) / UMAP of the activations at every training snapshot,
  aligned from one snapshot to the next (PCA fitted on the last snapshot; t-SNE and UMAP initialised with
  the previous snapshot's embedding, then rotated onto it by orthogonal Procrustes).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from . import gmm

__all__ = ["channel_values", "fit_channel_mixtures", "layer_channel_mixtures", "mixture_curves",
           "normality_stats", "flatten_features", "embed_snapshots", "Embedding", "EMBED_METHODS"]

EMBED_METHODS = ("pca", "tsne", "umap")


def channel_values(acts: Tensor, channels: Sequence[int], *, channel_last: bool = False) -> np.ndarray:
    """Values of ``channels`` over all samples and positions: acts (N, C, *S) (or (N, L, D) with
    ``channel_last``) -> (len(channels), N * positions) float64."""
    if acts.dim() < 2:
        raise ValueError(f"activations must be (N, C, ...), got shape {tuple(acts.shape)}")
    a = acts.detach().float().cpu()
    a = a.movedim(-1, 1) if channel_last else a
    c = a.shape[1]
    bad = [ch for ch in channels if not 0 <= int(ch) < c]
    if bad:
        raise ValueError(f"channels {bad} out of range [0, {c - 1}]")
    idx = torch.as_tensor([int(ch) for ch in channels], dtype=torch.long)
    return a.index_select(1, idx).transpose(0, 1).reshape(len(idx), -1).double().numpy()


def fit_channel_mixtures(values: np.ndarray, k: int, *, iters: int = 30, seed: int = 0,
                         max_points: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K-component 1-D GMM per row of ``values`` (G, M), in one batched ``gmm.fit`` call.

    Returns weights, means, variances, each (G, K). Rows longer than ``max_points`` are subsampled.
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if v.dim() != 2 or v.shape[1] < k:
        raise ValueError(f"values must be (G, M) with M >= k={k}, got shape {tuple(v.shape)}")
    g = torch.Generator().manual_seed(seed)
    if v.shape[1] > max_points:
        v = v[:, torch.randperm(v.shape[1], generator=g)[:max_points]]
    fitted = gmm.fit(v.unsqueeze(-1), k, iters=iters, kmeans_iters=5, generator=g)
    return fitted.weights.numpy(), fitted.means[..., 0].numpy(), fitted.vars[..., 0].numpy()


def layer_channel_mixtures(layer, channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's own mixture (``mixture_parameters()``) marginalised to each channel: (G, K) each.

    The marginal of a diagonal Gaussian on channel c is N(mu_kc, var_kc); the weights are the layer's
    (per-channel weights for MN with ``posterior="channel"``).
    """
    try:
        params = layer.mixture_parameters(per_channel=True)
    except TypeError:
        params = layer.mixture_parameters()
    w, mu, var = (t.detach().float().cpu().numpy().astype(np.float64) for t in params)
    ch = np.asarray([int(c) for c in channels])
    weights = w[:, ch].T if w.ndim == 2 else np.tile(w, (len(ch), 1))
    return weights, mu[:, ch].T, var[:, ch].T


def mixture_curves(grid: np.ndarray, weights: np.ndarray, means: np.ndarray, vars: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted component densities (G, K, B) and the mixture density (G, B) on ``grid`` (B,)."""
    x = np.asarray(grid, dtype=np.float64)[None, None, :]
    w, m, v = (np.asarray(a, dtype=np.float64)[..., None] for a in (weights, means, vars))
    v = np.maximum(v, 1e-12)
    comps = w * np.exp(-0.5 * (x - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
    return comps, comps.sum(axis=1)


def normality_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of ``values`` (G, M): skewness, excess kurtosis, KS statistic and 1-Wasserstein distance
    to N(0, 1), mean and std. A constant row has skewness/kurtosis 0 (not NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 2:
        raise ValueError(f"values must be (G, M) with M >= 2, got shape {v.shape}")
    std = v.std(axis=1)
    const = std < 1e-12
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant rows are handled just below
        skew = np.where(const, 0.0, sps.skew(v, axis=1))
        kurt = np.where(const, 0.0, sps.kurtosis(v, axis=1))
    ks = np.array([sps.kstest(row, "norm").statistic for row in v])
    q = sps.norm.ppf((np.arange(v.shape[1]) + 0.5) / v.shape[1])
    w1 = np.abs(np.sort(v, axis=1) - q[None, :]).mean(axis=1)
    return {"mean": v.mean(axis=1), "std": std, "skewness": skew, "excess_kurtosis": kurt, "ks_to_normal": ks,
            "w1_to_normal": w1}


def flatten_features(acts: Tensor, *, pool: bool = False, channel_last: bool = False) -> np.ndarray:
    """(N, C, *S) activations -> (N, F) features: flattened, or channel means with ``pool``."""
    a = acts.detach().float().cpu()
    if pool and a.dim() > 2:
        a = a.mean(dim=1) if channel_last else a.flatten(2).mean(dim=2)
    return a.reshape(a.shape[0], -1).numpy().astype(np.float32)


@dataclass
class Embedding:
    """2-D coordinates per snapshot (each (N, 2)), shared axis ranges, and method details."""

    coords: list[np.ndarray]
    method: str
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    info: dict = field(default_factory=dict)


def _procrustes_onto(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Rotate/reflect (and centre) ``src`` to best match ``dst`` (orthogonal Procrustes, no scaling)."""
    from scipy.linalg import orthogonal_procrustes

    a = src - src.mean(0)
    b = dst - dst.mean(0)
    r, _ = orthogonal_procrustes(a, b)
    return a @ r + dst.mean(0)


def embed_snapshots(features: Sequence[np.ndarray], method: str = "pca", *, perplexity: float = 30.0,
                    learning_rate: float | str = "auto", n_neighbors: int = 15, min_dist: float = 0.1,
                    seed: int = 0, pca_dims: int = 50, n_jobs: int = 1) -> Embedding:
    """Project each snapshot's features (N, F) (same N samples in every snapshot) to 2-D, aligned.

    pca: one PCA fitted on the last snapshot, applied to all (info: % variance explained).
    tsne: openTSNE per snapshot, the first initialised by PCA, each next by the previous embedding.
    umap: umap-learn per snapshot, initialised the same way. t-SNE and UMAP inputs are first reduced to
    ``pca_dims`` dimensions by a PCA fitted on the last snapshot.
    """
    if method not in EMBED_METHODS:
        raise ValueError(f"method must be one of {EMBED_METHODS}, got {method!r}")
    if not features:
        raise ValueError("no snapshots to embed")
    n = features[0].shape[0]
    if any(f.shape[0] != n for f in features) or n < 5:
        raise ValueError(f"every snapshot needs the same number (>= 5) of samples, got {[f.shape[0] for f in features]}")
    from sklearn.decomposition import PCA

    last = np.asarray(features[-1], dtype=np.float32)
    info: dict = {}
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(last)
        coords = [pca.transform(np.asarray(f, dtype=np.float32)) for f in features]
        info["explained_variance_pct"] = [float(v) * 100 for v in pca.explained_variance_ratio_]
    else:
        d = min(pca_dims, last.shape[1], n)
        reducer = PCA(n_components=d, random_state=seed).fit(last)
        reduced = [reducer.transform(np.asarray(f, dtype=np.float32)) for f in features]
        coords = []
        prev: Optional[np.ndarray] = None
        for r in reduced:
            if prev is None:
                init = r[:, :2] / (np.std(r[:, 0]) + 1e-12) * 1e-4 if method == "tsne" else "spectral"
            else:
                init = prev / (np.std(prev[:, 0]) + 1e-12) * (1e-4 if method == "tsne" else 1.0)
            if method == "tsne":
                from openTSNE import TSNE

                perp = float(min(perplexity, max(2.0, (n - 1) / 3.0)))
                emb = np.asarray(TSNE(perplexity=perp, learning_rate=learning_rate, initialization=init,
                                      random_state=seed, n_jobs=n_jobs, verbose=False).fit(r))
                info["perplexity"] = perp
            else:
                import umap

                model = umap.UMAP(n_neighbors=int(min(n_neighbors, n - 1)), min_dist=min_dist, init=init,
                                  random_state=seed, n_jobs=n_jobs)
                emb = model.fit_transform(r)
            coords.append(_procrustes_onto(emb, prev) if prev is not None else emb)
            prev = coords[-1]
    allc = np.concatenate(coords)
    pad = 0.05 * (allc.max(0) - allc.min(0) + 1e-9)
    lo, hi = allc.min(0) - pad, allc.max(0) + pad
    return Embedding([np.asarray(c, dtype=np.float32) for c in coords], method, (float(lo[0]), float(hi[0])),
                     (float(lo[1]), float(hi[1])), info)
