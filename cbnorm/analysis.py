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
    """A layer's own mixture (``channel_mixture_parameters()``) marginalised to each channel: (G, K) each.

    The marginal of a diagonal Gaussian on channel c is N(mu_kc, var_kc); the weights are the layer's on that
    channel (they differ per channel for MN with ``posterior="channel"``). Only for ``layer.has_mixture``.
    """
    if not getattr(layer, "has_mixture", False):
        raise ValueError(f"{type(layer).__name__} has no mixture (has_mixture=False)")
    w, mu, var = (t.detach().float().cpu().numpy().astype(np.float64) for t in layer.channel_mixture_parameters())
    ch = np.asarray([int(c) for c in channels])
    return w[:, ch].T, mu[:, ch].T, var[:, ch].T


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


# ============================================================================ app support
# Small helpers behind the Streamlit app (pages stay free of numerical code): convergence measure, curve
# smoothing, per-sample mixture components, and an aligned snapshot embedding computed one snapshot at a
# time (so the app can cache each step and show progress).
__all__ += ["steps_to_reach", "smooth", "sample_components", "reduce_features", "embed_step",
            "embedding_limits", "embed_snapshots_warm"]


def steps_to_reach(steps: Sequence[int], accuracies: Sequence[float], target: float) -> Optional[int]:
    """First step whose accuracy is >= ``target``, else None — the MN paper's acceleration measure
    ("steps to reach BatchNorm's best test accuracy", Tables 3 and 5) with ``target`` = BN's best.

    ``steps`` and ``accuracies`` are matched curves (e.g. the per-epoch records of ``metrics.json``); they
    are read in increasing step order."""
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    if s.shape != a.shape:
        raise ValueError(f"steps and accuracies must have the same length, got {s.size} and {a.size}")
    order = np.argsort(s, kind="stable")
    hit = np.nonzero(a[order] >= float(target) - 1e-12)[0]
    return int(s[order][hit[0]]) if hit.size else None


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = int(window)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    if w == 1 or v.size == 0:
        return v.copy()
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - w, 0)
    return (c[idx] - c[lo]) / (idx - lo)


@torch.no_grad()
def sample_components(layer, x: Tensor) -> Optional[np.ndarray]:
    """Mixture component (or context) of each sample under ``layer``'s own mixture: (N,) int64, or None.

    ``x`` is the layer's input (N, C, *S) (or (N, L, D) for channel_last layers). The per-point posteriors
    of ``layer.posteriors(x)`` are averaged over the sample's positions (and channels for
    ``posterior="channel"``) and the argmax is taken; ModeNorm uses its gates. None when the layer has
    neither (BatchNorm, MixtureNorm whose posteriors come from a per-minibatch fit, ...)."""
    n = x.shape[0]
    if hasattr(layer, "posteriors"):
        post = layer.posteriors(x).float().cpu()
        if post.dim() == 3:  # (C, N*P, K) -> mean over channels
            post = post.mean(dim=0)
        if post.shape[0] != n:  # (N*P, K), sample-major -> mean over positions
            post = post.reshape(n, -1, post.shape[-1]).mean(dim=1)
        return post.argmax(dim=1).numpy().astype(np.int64)
    if hasattr(layer, "gates"):
        x3 = layer._to_ncp(x).float()
        return layer.gates(x3).argmax(dim=1).cpu().numpy().astype(np.int64)
    return None


def reduce_features(features: Sequence[np.ndarray], dims: int = 50, seed: int = 0) -> list[np.ndarray]:
    """PCA to ``dims`` dimensions fitted on the LAST snapshot and applied to every snapshot (float64)."""
    from sklearn.decomposition import PCA

    if not features:
        raise ValueError("no snapshots to reduce")
    last = np.asarray(features[-1], dtype=np.float32)
    d = int(min(dims, last.shape[1], last.shape[0]))
    if d >= last.shape[1]:
        return [np.ascontiguousarray(f, dtype=np.float64) for f in features]
    pca = PCA(n_components=d, random_state=seed).fit(last)
    return [np.ascontiguousarray(pca.transform(np.asarray(f, dtype=np.float32)), dtype=np.float64)
            for f in features]


def embed_step(x: np.ndarray, prev: Optional[np.ndarray] = None, method: str = "tsne", *,
               perplexity: float = 30.0, learning_rate: float | str = "auto", n_neighbors: int = 15,
               min_dist: float = 0.1, seed: int = 0, first_iters: int = 400, refine_iters: int = 100,
               refine_theta: float = 0.8, n_jobs: int = 1) -> tuple[np.ndarray, dict]:
    """2-D embedding of one snapshot's (reduced) features ``x`` (N, D), warm-started from ``prev`` (N, 2).

    t-SNE (openTSNE, Barnes-Hut; exact affinities up to 3,000 points): without ``prev``, PCA initialisation,
    a quarter of ``first_iters`` with early exaggeration 12 then the rest; with ``prev``, ``refine_iters``
    plain iterations from ``prev`` on this snapshot's affinities (Barnes-Hut ``refine_theta``: 0.8 keeps
    the 10-nearest-neighbour preservation of 0.5 at 2/3 of the time). UMAP: exact k-nearest neighbours
    (sklearn, up to 5,000 points; faster than NN-descent there), spectral initialisation and umap's default
    epochs, or ``prev`` as initialisation and ``refine_iters`` epochs. The result is rotated onto ``prev``
    (orthogonal Procrustes), so consecutive snapshots stay aligned. Returns (coords (N, 2) float32, info)."""
    if method not in ("tsne", "umap"):
        raise ValueError(f"method must be 'tsne' or 'umap' (PCA: embed_snapshots), got {method!r}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < 5:
        raise ValueError(f"x must be (N >= 5, D), got shape {x.shape}")
    if prev is not None and np.shape(prev) != (n, 2):
        raise ValueError(f"prev must be ({n}, 2), got {np.shape(prev)}")
    info: dict = {}
    if method == "tsne":
        from openTSNE import TSNEEmbedding, affinity, initialization

        perp = float(min(perplexity, max(2.0, (n - 1) / 3.0)))
        aff = affinity.PerplexityBasedNN(x, perplexity=perp, method="exact" if n <= 3000 else "annoy",
                                         n_jobs=n_jobs, random_state=seed, verbose=False)
        lr = learning_rate
        if prev is None:
            init = initialization.pca(x, random_state=seed)
            emb = TSNEEmbedding(init, aff, negative_gradient_method="auto", n_jobs=n_jobs, random_state=seed)
            ee = max(1, int(first_iters) // 4)
            emb = emb.optimize(n_iter=ee, exaggeration=12, momentum=0.5, learning_rate=lr)
            emb = emb.optimize(n_iter=max(1, int(first_iters) - ee), momentum=0.8, learning_rate=lr)
            info["iterations"] = int(first_iters)
        else:
            init = np.ascontiguousarray(prev, dtype=np.float64)
            emb = TSNEEmbedding(init, aff, negative_gradient_method="auto", theta=float(refine_theta),
                                n_jobs=n_jobs, random_state=seed)
            emb = emb.optimize(n_iter=max(1, int(refine_iters)), momentum=0.8, learning_rate=lr)
            info["iterations"] = int(refine_iters)
        out = np.asarray(emb, dtype=np.float64)
        info["perplexity"] = perp
    else:
        import umap

        k = int(min(max(2, n_neighbors), n - 1))
        kw = dict(n_neighbors=k, min_dist=float(min_dist), random_state=seed, n_jobs=n_jobs)
        if n <= 5000:
            from sklearn.neighbors import NearestNeighbors

            dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)  # self first, as umap expects
            kw["precomputed_knn"] = (idx, dist, None)
        if prev is None:
            model = umap.UMAP(init="spectral", **kw)
        else:
            model = umap.UMAP(init=np.ascontiguousarray(prev, dtype=np.float32),
                              n_epochs=max(1, int(refine_iters)), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", precomputed_knn notes
            out = np.asarray(model.fit_transform(x), dtype=np.float64)
        info["n_neighbors"] = k
        info["iterations"] = int(refine_iters) if prev is not None else None
    if prev is not None:
        out = _procrustes_onto(out, np.asarray(prev, dtype=np.float64))
    return out.astype(np.float32), info


def embedding_limits(coords: Sequence[np.ndarray], pad: float = 0.05) -> tuple[tuple[float, float],
                                                                              tuple[float, float]]:
    """Shared axis ranges (x, y) covering every snapshot's coordinates, padded by ``pad`` of the span."""
    allc = np.concatenate([np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in coords])
    if allc.size == 0 or not np.isfinite(allc).all():
        raise ValueError("coordinates must be finite and non-empty")
    lo, hi = allc.min(0), allc.max(0)
    p = pad * (hi - lo + 1e-9)
    return (float(lo[0] - p[0]), float(hi[0] + p[0])), (float(lo[1] - p[1]), float(hi[1] + p[1]))


def embed_snapshots_warm(features: Sequence[np.ndarray], method: str = "tsne", *, pca_dims: int = 50,
                         callback=None, **kw) -> Embedding:
    """Like :func:`embed_snapshots`, but t-SNE/UMAP run in full only on the first snapshot and every later
    one is refined from the previous embedding (:func:`embed_step`), which is several times faster and keeps
    the evolution aligned. ``callback(i, total)`` is called after each snapshot. PCA: as embed_snapshots."""
    if method == "pca":
        emb = embed_snapshots(features, "pca", seed=kw.get("seed", 0))
        if callback is not None:
            callback(len(features), len(features))
        return emb
    reduced = reduce_features(features, pca_dims, kw.get("seed", 0))
    coords: list[np.ndarray] = []
    info: dict = {}
    for i, r in enumerate(reduced):
        c, info = embed_step(r, coords[-1] if coords else None, method, **kw)
        coords.append(c)
        if callback is not None:
            callback(i + 1, len(reduced))
    xlim, ylim = embedding_limits(coords)
    return Embedding(coords, method, xlim, ylim, info)


__all__ += ["fit_reducer", "Reducer"]


@dataclass
class Reducer:
    """A PCA fitted on one snapshot, applied to any snapshot: ``reducer(features)`` -> (N, d) float64."""

    pca: Optional[object]  # sklearn PCA, or None when the features have no more than ``dims`` columns

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float32)
        out = f if self.pca is None else self.pca.transform(f)
        return np.ascontiguousarray(out, dtype=np.float64)


def fit_reducer(last: np.ndarray, dims: int = 50, seed: int = 0) -> Reducer:
    """The PCA of :func:`reduce_features` (fitted on the last snapshot), to apply one snapshot at a time."""
    from sklearn.decomposition import PCA

    last = np.asarray(last, dtype=np.float32)
    d = int(min(dims, last.shape[1], last.shape[0]))
    if d >= last.shape[1]:
        return Reducer(None)
    return Reducer(PCA(n_components=d, random_state=seed).fit(last))
