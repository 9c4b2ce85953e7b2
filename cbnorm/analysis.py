"""Analysis behind the app: per-channel mixture fits for histograms, normality statistics, embeddings.

* Histograms with mixtures (MN paper Fig. 1, CB-Norm paper Fig. 4): ``channel_values`` takes the values of
  chosen channels, ``fit_channel_mixtures`` fits K 1-D Gaussians per channel with ``cbnorm.gmm`` (all
  channels in one batched call), ``layer_channel_mixtures`` reads a layer's own mixture and marginalises its
  diagonal Gaussians to each channel, ``mixture_curves`` evaluates the weighted component densities.
* ``multimodality``: per channel, the number of 1-D Gaussian components with the lowest BIC and the BIC
  gain over one Gaussian (the scan of where a mixture could help; all channels in one batched fit per K).
* ``normality_stats``: skewness, excess kurtosis and distances to N(0, 1) (Kolmogorov-Smirnov statistic,
  1-Wasserstein) per channel — the papers' "closer to normal, less skewed" claim, in numbers.
* ``embed_snapshots``: PCA / t-SNE (openTSNE) / UMAP of the activations at every training snapshot,
  aligned from one snapshot to the next (PCA fitted on the last snapshot; t-SNE and UMAP initialised with
  the previous snapshot's embedding, then rotated onto it by orthogonal Procrustes).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor

from . import gmm

__all__ = ["channel_values", "fit_channel_mixtures", "multimodality", "layer_channel_mixtures", "mixture_curves",
           "normality_stats", "shape_stats", "standardize_rows", "view_stats", "VIEWS", "flatten_features",
           "embed_snapshots", "Embedding", "EMBED_METHODS"]

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


def _mean_log_likelihood_1d(z: Tensor, w: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """Mean over the M points of log sum_k w_k N(z | mu_k, var_k) (MN eq. 26), per row: z (G, M), w, mu, var
    (G, K) -> (G,). In the (G, K, M) layout with the log-sum-exp written out (max-subtracted): cheaper than
    ``gmm.mean_log_likelihood``'s general (G, M, K) path for one dimension."""
    wlp = (z.unsqueeze(1) - mu.unsqueeze(-1)).square_().div_(var.unsqueeze(-1)).mul_(-0.5)
    wlp += (torch.log(w) - 0.5 * torch.log(2 * math.pi * var)).unsqueeze(-1)
    mx = wlp.amax(1, keepdim=True)
    return (wlp.sub_(mx).exp_().sum(1).log_() + mx[:, 0]).mean(-1)


def multimodality(values, max_components: int = 4, seed: int = 0, *, iters: int = 100, tol: float = 1e-3,
                  kmeans_iters: int = 3, reg_covar: float = 1e-6,
                  fit_dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """The evidence for more than one mode in each row of ``values`` (G, M) — G channels, M values each, a
    tensor or array — by the Bayesian information criterion of 1-D Gaussian mixtures with K = 1 ..
    ``max_components`` components (the MN paper's premise, its Sec. 1 and Fig. 1: a normalization layer's
    input is "better approximated by a mixture model rather than a single Gaussian").

    Every channel is fitted at once for each K (``cbnorm.gmm.fit``: k-means++ seeding with ``seed``,
    ``kmeans_iters`` Lloyd iterations, EM until no channel's mean log-likelihood moves by ``tol``, at most
    ``iters`` iterations — sklearn's ``GaussianMixture`` defaults, except that its k-means runs to
    convergence); K = 1 is the closed form. The fits run on
    each channel standardized (so that ``reg_covar`` is relative to its spread, as 1e-6 of a unit variance);
    EM runs in ``fit_dtype`` (float32: the standardized values need no more, and it is ~1.5x faster on CPU);
    every log-likelihood is then evaluated in float64 and taken back to the values as given (minus M log std,
    the Jacobian), so
    ``bic`` is sklearn's ``GaussianMixture(K).bic`` of the same row: -2 M mean log p(x) + (3K - 1) log M
    (K means, K variances, K - 1 free weights).

    Returns a dict of arrays:

    * ``best_k`` (G,) int: the K with the lowest BIC;
    * ``bic_gain`` (G,): BIC of K = 1 minus the lowest BIC (>= 0; 0 where one Gaussian wins). In nats, times
      2: a gain of 10 is strong evidence on Kass and Raftery's scale;
    * ``min_weight`` (G,): the smallest component's weight in the best fit (1 where K = 1);
    * ``skewness`` (G,): the sample skewness (biased, scipy's default; 0 for a constant row);
    * ``bic`` (G, max_components): the BIC of every K;
    * ``constant`` (G,) bool: rows with no spread (best_k 1, gain 0; nothing to fit).

    Raises ``ValueError`` for values that are not (G, M) with M >= max(2, max_components), hold NaN or inf
    (naming the channels), or a max_components < 1.
    """
    v = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values),
                        dtype=torch.float64)
    if isinstance(max_components, bool) or not isinstance(max_components, int) or max_components < 1:
        raise ValueError(f"max_components must be an int >= 1, got {max_components!r}")
    if v.dim() != 2 or v.shape[0] < 1 or v.shape[1] < max(2, max_components):
        raise ValueError(f"values must be (G, M): G channels of M >= {max(2, max_components)} values each, got "
                         f"shape {tuple(v.shape)}")
    bad = ~torch.isfinite(v)
    if bad.any():
        rows = torch.nonzero(bad.any(1)).flatten().tolist()
        raise ValueError(f"values hold {int(bad.sum())} NaN or inf entries, in channel(s) {rows[:10]}"
                         + (" …" if len(rows) > 10 else "") + ": drop them (or the channels) first")
    g, m = v.shape
    mean = v.mean(1, keepdim=True)
    std = v.std(1, unbiased=False, keepdim=True)
    constant = (std <= 1e-12 * (1.0 + mean.abs()))[:, 0]
    z = (v - mean) / torch.where(constant[:, None], torch.ones_like(std), std)
    log_m = math.log(m)
    # K = 1 in closed form: mean 0, variance 1 (+ reg_covar) on the standardized rows
    var1 = z.var(1, unbiased=False) + reg_covar
    ll = [-0.5 * (math.log(2 * math.pi) + torch.log(var1) + z.square().mean(1) / var1)]
    weights = [torch.ones(g, 1, dtype=torch.float64)]
    gen = torch.Generator().manual_seed(int(seed))
    zf = z.to(fit_dtype).unsqueeze(-1)
    for k in range(2, max_components + 1):
        fitted = gmm.fit(zf, k, iters=iters, kmeans_iters=kmeans_iters, generator=gen, reg_covar=reg_covar,
                         tol=tol, check_finite=False)
        w, mu, var = (t.to(torch.float64) for t in (fitted.weights, fitted.means[..., 0], fitted.vars[..., 0]))
        ll.append(_mean_log_likelihood_1d(z, w, mu, var))
        weights.append(w)
    jac = torch.log(torch.where(constant, torch.ones_like(std[:, 0]), std[:, 0]))
    bic = torch.stack([-2.0 * m * (l - jac) + (3 * (i + 1) - 1) * log_m for i, l in enumerate(ll)], 1)
    bic[constant] = bic[constant, :1]  # nothing to fit: every K ties with one Gaussian, which wins
    best = bic.argmin(1)
    min_weight = torch.stack([weights[int(b)][i].min() for i, b in enumerate(best)])
    skew = torch.where(constant, torch.zeros_like(var1), z.pow(3).mean(1))
    return {"best_k": (best + 1).numpy(), "bic_gain": (bic[:, 0] - bic.min(1).values).numpy(),
            "min_weight": min_weight.numpy(), "skewness": skew.numpy(), "bic": bic.numpy(),
            "constant": constant.numpy()}


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


def normality_stats(values: np.ndarray, *, reference: bool = True) -> dict[str, np.ndarray]:
    """Per row of ``values`` (G, M): skewness, excess kurtosis, KS statistic and 1-Wasserstein distance
    to N(0, 1), mean and std. A constant row has skewness/kurtosis 0 (not NaN). ``reference=False`` leaves
    out the two distances to N(0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] < 2:
        raise ValueError(f"values must be (G, M) with M >= 2, got shape {v.shape}")
    std = v.std(axis=1)
    const = std < 1e-12
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant rows are handled just below
        skew = np.where(const, 0.0, sps.skew(v, axis=1))
        kurt = np.where(const, 0.0, sps.kurtosis(v, axis=1))
    if not reference:
        return {"mean": v.mean(axis=1), "std": std, "skewness": skew, "excess_kurtosis": kurt}
    ks = np.array([sps.kstest(row, "norm").statistic for row in v])
    q = sps.norm.ppf((np.arange(v.shape[1]) + 0.5) / v.shape[1])
    w1 = np.abs(np.sort(v, axis=1) - q[None, :]).mean(axis=1)
    return {"mean": v.mean(axis=1), "std": std, "skewness": skew, "excess_kurtosis": kurt, "ks_to_normal": ks,
            "w1_to_normal": w1}


#: what a view of a normalization layer shows: its input, x_hat (normalized, before the affine) or its output
#: (gamma * x_hat + beta). Only x_hat is aimed at N(0, 1); see :func:`view_stats`.
VIEWS = ("input", "x_hat", "output")


def standardize_rows(values: np.ndarray) -> np.ndarray:
    """Each row of ``values`` (G, M) shifted and scaled to mean 0 and standard deviation 1 (a constant row
    becomes 0): the input as a normalizer with one Gaussian per channel would see it, so its distance to
    N(0, 1) measures the shape alone, like with like beside x_hat."""
    v = np.asarray(values, dtype=np.float64)
    std = v.std(axis=1, keepdims=True)
    return np.where(std < 1e-12, 0.0, (v - v.mean(axis=1, keepdims=True)) / np.where(std < 1e-12, 1.0, std))


def shape_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of ``values`` (G, M): mean, std, skewness and excess kurtosis, with no reference
    distribution (for a layer's output after the affine, which gamma and beta move away from N(0, 1))."""
    return normality_stats(values, reference=False)


def view_stats(values: np.ndarray, which: str) -> dict[str, np.ndarray]:
    """The statistics a view of a layer reports, per row of ``values`` (G, M), computed like with like:

    * "x_hat": :func:`normality_stats` (distances to N(0, 1), the normalizer's target);
    * "input": the same on the input standardized per row (:func:`standardize_rows`), with the raw mean and
      std; the "vs input" deltas of the pages compare these with x_hat's;
    * "output": :func:`shape_stats` only (no N(0, 1) reference: gamma and beta move it on purpose)."""
    if which == "x_hat":
        return normality_stats(values)
    if which == "input":
        raw = np.asarray(values, dtype=np.float64)
        out = normality_stats(standardize_rows(raw))
        out["mean"], out["std"] = raw.mean(axis=1), raw.std(axis=1)
        return out
    if which == "output":
        return shape_stats(values)
    raise ValueError(f"which must be one of {VIEWS}, got {which!r}")


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
        project, info = pca_projection(last, seed)
        coords = [project(f) for f in features]
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


__all__ += ["fit_reducer", "Reducer", "pca_projection"]


@dataclass
class Reducer:
    """A PCA fitted on one snapshot, applied to any snapshot: ``reducer(features)`` -> (N, d) float64."""

    pca: Optional[object]  # sklearn PCA, or None when the features have no more than ``dims`` columns

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float32)
        out = f if self.pca is None else self.pca.transform(f)
        return np.ascontiguousarray(out, dtype=np.float64)


def pca_projection(last: np.ndarray, seed: int = 0) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The 2-D PCA of :func:`embed_snapshots`' "pca" method, fitted on the last snapshot's features (N, F), to
    apply one snapshot at a time (a caller then never holds every snapshot's features at once) -> (project:
    (N, F) -> (N, 2) float32, info: % variance explained per axis)."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(np.asarray(last, dtype=np.float32))
    info = {"explained_variance_pct": [float(v) * 100 for v in pca.explained_variance_ratio_]}
    return (lambda f: pca.transform(np.asarray(f, dtype=np.float32))), info


def fit_reducer(last: np.ndarray, dims: int = 50, seed: int = 0) -> Reducer:
    """The PCA of :func:`reduce_features` (fitted on the last snapshot), to apply one snapshot at a time."""
    from sklearn.decomposition import PCA

    last = np.asarray(last, dtype=np.float32)
    d = int(min(dims, last.shape[1], last.shape[0]))
    if d >= last.shape[1]:
        return Reducer(None)
    return Reducer(PCA(n_components=d, random_state=seed).fit(last))


# ============================================================================ across runs and training
# Behind the "Across runs and training" page: distributions of a layer at every snapshot (TensorBoard's
# offset and distribution modes, with the fitted mixture components per step: MN paper Fig. 8), the same
# histogram across runs (bins from the values shown, robust ranges with the values outside counted), and
# clustering quality of a layer's features as numbers (silhouette, k-NN accuracy, NMI / ARI of the layer's
# mixture components), each checked against scikit-learn in tests/test_analysis.py.
__all__ += ["DISTRIBUTION_PERCENTILES", "distribution_percentiles", "robust_range", "shared_bin_edges",
            "histogram_density", "pooled_component_curves", "mixture_assignments", "silhouette",
            "knn_accuracy", "normalized_mutual_info", "adjusted_rand", "cluster_quality"]

#: TensorBoard's "distributions" view: min, the percentiles at -1.5, -1, -0.5, 0, 0.5, 1, 1.5 sd of a
#: normal (7, 16, 31, 50, 69, 84, 93 %) and max
DISTRIBUTION_PERCENTILES = (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)


def distribution_percentiles(values: np.ndarray) -> np.ndarray:
    """(9,) percentiles of ``values`` at :data:`DISTRIBUTION_PERCENTILES` (non-finite values ignored)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values")
    return np.percentile(v, DISTRIBUTION_PERCENTILES)


def robust_range(values: Sequence[np.ndarray], tail: float = 0.005, *, include: Sequence[float] = ()
                 ) -> tuple[float, float]:
    """The range every sample in ``values`` shares: from the smallest ``tail`` quantile to the largest
    ``1 - tail`` quantile over the samples (``tail`` 0: min and max), widened to cover ``include`` (e.g.
    (-3, 3) for N(0, 1)). A few outliers then no longer flatten the plot; :func:`histogram_density` counts
    the values left outside."""
    if not 0.0 <= float(tail) < 0.5:
        raise ValueError(f"tail must be in [0, 0.5), got {tail!r}")
    lows, highs = list(include), list(include)
    for v in values:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        a = a[np.isfinite(a)]
        if a.size:
            lows.append(float(np.quantile(a, tail)))
            highs.append(float(np.quantile(a, 1.0 - tail)))
    if not lows:
        return -1.0, 1.0
    lo, hi = min(lows), max(highs)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def shared_bin_edges(values: Sequence[np.ndarray], lo: float, hi: float, bins: int | str = "auto", *,
                     min_bins: int = 10, max_bins: int = 200, max_points: int = 200_000, seed: int = 0) -> np.ndarray:
    """Bin edges on [lo, hi] shared by several samples. ``bins`` "auto": the bin width of numpy's "auto"
    rule (the smaller of Sturges' and Freedman-Diaconis' widths) on the values shown — every sample's values
    inside the range, pooled (at most ``max_points``, subsampled with ``seed``) — spread over [lo, hi], the
    count clipped to [min_bins, max_bins]; an int: that many equal bins."""
    if not hi > lo:
        raise ValueError(f"need lo < hi, got {lo}, {hi}")
    if isinstance(bins, str):
        if bins != "auto":
            raise ValueError(f"bins must be an int or 'auto', got {bins!r}")
        parts = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
        a = np.concatenate(parts) if parts else np.zeros(0)
        a = a[np.isfinite(a) & (a >= lo) & (a <= hi)]
        if a.size > max_points:
            a = np.random.default_rng(seed).choice(a, max_points, replace=False)
        n = min_bins
        if a.size >= 2 and a.max() > a.min():
            e = np.histogram_bin_edges(a, bins="auto")
            n = round((len(e) - 1) * (hi - lo) / (a.max() - a.min()))
        n = int(np.clip(n, min_bins, max_bins))
    else:
        n = int(bins)
        if n < 1:
            raise ValueError(f"bins must be >= 1, got {bins!r}")
    return np.linspace(float(lo), float(hi), n + 1)


def histogram_density(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Density on ``edges`` of ALL finite values (the mass outside the edges stays counted in the total,
    so densities of samples with and without outliers are comparable), and the numbers of values below
    and above the range: (density (B,), below, above)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    edges = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(v, bins=edges)
    widths = np.diff(edges)
    dens = counts / (max(v.size, 1) * widths)
    return dens, int((v < edges[0]).sum()), int((v > edges[-1]).sum())


def pooled_component_curves(grid: np.ndarray, weights: np.ndarray, means: np.ndarray, vars: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The density of the values of G channels pooled together, split by mixture component: channel g's
    values follow sum_k w_gk N(m_gk, v_gk), so the pooled values (the same number from each channel) follow
    (1/G) sum_g sum_k w_gk N(m_gk, v_gk), and component k's part is (1/G) sum_g w_gk N(m_gk, v_gk).
    weights, means, vars (G, K) -> (components (K, B), total (B,)) on ``grid`` (B,)."""
    comps, _ = mixture_curves(grid, weights, means, vars)
    comps = comps.mean(axis=0)
    return comps, comps.sum(axis=0)


@torch.no_grad()
def mixture_assignments(layer, x: Tensor) -> Optional[np.ndarray]:
    """Each sample's component under ``layer``'s own mixture: (N,) int64, or None for layers without one.

    :func:`sample_components` where the layer has per-sample posteriors or gates (ACN, CN, ModeNorm); for
    the other layers with a mixture (MN: the inference mixture of eq. 38 over its queued fits) the
    posteriors of ``mixture_parameters()`` (diagonal Gaussians over the channels) of every position,
    averaged over the sample's positions, then the argmax."""
    comps = sample_components(layer, x)
    if comps is not None or not getattr(layer, "has_mixture", False):
        return comps
    w, mu, var = (t.detach().double().cpu() for t in layer.mixture_parameters())
    a = x.detach().double().cpu()
    a = a.movedim(-1, 1) if getattr(layer, "channel_last", False) else a
    n, c = a.shape[0], a.shape[1]
    pts = a.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # (N*P, C), sample-major
    prec = 1.0 / var.clamp_min(1e-12)  # (K, C)
    # log N(x; mu_k, var_k) summed over channels, expanded: -(x^2 . prec_k - 2 x . mu_k prec_k + mu_k^2 . prec_k
    # + sum log(2 pi var_k)) / 2, as matrix products (no (N*P, K, C) tensor)
    const = (mu * mu * prec).sum(1) + torch.log(2 * math.pi / prec).sum(1)  # (K,)
    logp = -0.5 * ((pts * pts) @ prec.T - 2.0 * pts @ (mu * prec).T + const) + torch.log(w.clamp_min(1e-300))
    post = torch.softmax(logp, dim=-1).reshape(n, -1, logp.shape[-1]).mean(dim=1)
    return post.argmax(dim=1).numpy().astype(np.int64)


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{what} must have one entry per sample ({n}), got {y.shape[0]}")
    return np.unique(y, return_inverse=True)[1].reshape(-1)


def _features(features) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features must be finite")
    return f


def silhouette(features, labels, *, chunk: int = 2048) -> float:
    """Mean silhouette coefficient (Euclidean) of ``features`` (N, D) grouped by ``labels`` (N,):
    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other members of i's group, b_i the
    smallest mean distance to another group; 0 for members of a group of one (Rousseeuw 1987, as
    scikit-learn's ``silhouette_score``). NaN unless 2 <= groups <= N - 1. Distances in chunks of rows."""
    f = _features(features)
    n = f.shape[0]
    y = _as_labels(labels, n, "labels")
    groups = int(y.max()) + 1
    if not 2 <= groups <= n - 1:
        return float("nan")
    t = torch.from_numpy(f)
    onehot = torch.zeros(n, groups, dtype=torch.float64)
    onehot[torch.arange(n), torch.from_numpy(y)] = 1.0
    sizes = onehot.sum(0)
    s = torch.empty(n, dtype=torch.float64)
    sq = (t * t).sum(1)
    for i0 in range(0, n, chunk):
        rows = t[i0:i0 + chunk]
        d2 = (sq[i0:i0 + chunk, None] + sq[None, :] - 2.0 * rows @ t.T).clamp_min(0.0)
        idx = torch.arange(i0, i0 + rows.shape[0])
        d2[torch.arange(rows.shape[0]), idx] = 0.0
        sums = d2.sqrt() @ onehot  # (rows, groups): summed distance to each group
        own = torch.from_numpy(y[i0:i0 + chunk])
        own_size = sizes[own]
        a = sums[torch.arange(rows.shape[0]), own] / (own_size - 1).clamp_min(1.0)
        mean_other = sums / sizes
        mean_other[torch.arange(rows.shape[0]), own] = float("inf")
        b = mean_other.min(dim=1).values
        si = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
        si[own_size <= 1] = 0.0
        s[i0:i0 + rows.shape[0]] = si
    return float(s.mean())


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 5) -> float:
    """Accuracy of the ``k``-nearest-neighbour vote (Euclidean, uniform weights; a tied vote goes to the
    smallest label, as scikit-learn's ``KNeighborsClassifier``) on held-out samples."""
    a, b = _features(train_features), np.asarray(test_features, dtype=np.float64)
    ya, yb = np.asarray(train_labels).reshape(-1), np.asarray(test_labels).reshape(-1)
    if b.ndim != 2 or b.shape[1] != a.shape[1] or yb.shape[0] != b.shape[0] or ya.shape[0] != a.shape[0]:
        raise ValueError(f"train (N, D) / test (M, D) features with one label each, got {a.shape}, {b.shape}, "
                         f"{ya.shape}, {yb.shape}")
    if b.shape[0] == 0:
        return float("nan")
    k = int(min(max(1, k), a.shape[0]))
    classes, yi = np.unique(ya, return_inverse=True)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    d2 = ((tb * tb).sum(1)[:, None] + (ta * ta).sum(1)[None, :] - 2.0 * tb @ ta.T).clamp_min(0.0)
    nn_idx = torch.topk(d2, k, dim=1, largest=False).indices.numpy()
    votes = np.zeros((b.shape[0], classes.size), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(b.shape[0]), k), yi[nn_idx].reshape(-1)), 1)
    pred = classes[votes.argmax(axis=1)]  # argmax: the first (smallest) label among tied votes
    return float((pred == yb).mean())


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ia, ib = np.unique(a, return_inverse=True)[1].reshape(-1), np.unique(b, return_inverse=True)[1].reshape(-1)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.float64)
    np.add.at(table, (ia, ib), 1.0)
    return table


def normalized_mutual_info(labels_a, labels_b) -> float:
    """Mutual information of two labelings divided by the arithmetic mean of their entropies (scikit-learn's
    default ``normalized_mutual_info_score``); 1 when both have one group, 0 when only one has."""
    a, b = np.asarray(labels_a).reshape(-1), np.asarray(labels_b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if a.size == 0:
        return 1.0
    t = _contingency(a, b)
    if t.shape[0] == t.shape[1] == 1:
        return 1.0
    n = t.sum()
    p = t / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    denom = 0.5 * (ha + hb)
    if mi <= 0 or denom <= 0:
        return 0.0
    return float(min(1.0, max(0.0, mi / denom)))


def adjusted_rand(labels_a, labels_b) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985) from the pair-confusion counts, with
    scikit-learn's special case: 1 when no pair is split differently (e.g. both one group)."""
    a, b = np.asarray(labels_a).reshape(-1), np.asarray(labels_b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings must have the same length, got {a.shape[0]} and {b.shape[0]}")
    n = float(a.size)
    t = _contingency(a, b)
    sum_sq = float((t ** 2).sum())
    ra, cb = t.sum(1), t.sum(0)
    tp = sum_sq - n
    fp = float((t @ cb).sum()) - sum_sq  # scikit-learn's pair confusion C[0, 1]
    fn = float((t.T @ ra).sum()) - sum_sq  # C[1, 0]
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def cluster_quality(features, labels, *, components=None, seed: int = 0, contexts=None, k: int = 5,
                    holdout: float = 0.5) -> dict[str, float]:
    """How well a layer's features (N, D) separate the classes ``labels`` (N,), in the feature space itself
    (not in a 2-D picture) — the CB-Norm paper's "clusters form / refine", as numbers:

    * ``silhouette``: mean silhouette coefficient by class (:func:`silhouette`; -1..1, higher = tighter,
      better separated classes);
    * ``knn_accuracy``: ``k``-nearest-neighbour accuracy on held-out samples: a seeded random ``holdout``
      fraction is classified by the vote of its ``k`` nearest neighbours among the others (:func:`knn_accuracy`);
    * with ``components`` (N,) (each sample's mixture component under the layer): ``nmi`` and ``ari``,
      the agreement of the components with the classes (:func:`normalized_mutual_info`, :func:`adjusted_rand`);
    * with ``contexts`` (N,): ``silhouette_context`` and, with components, ``nmi_context``, ``ari_context``.

    Also ``n`` (samples), ``k``, ``n_heldout`` and, with components, ``components_used`` (distinct ids).
    Values that do not apply (one class) are NaN."""
    f = _features(features)
    n = f.shape[0]
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels must have one entry per sample ({n}), got {y.shape[0]}")
    if not 0.0 < float(holdout) < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    out: dict[str, float] = {"n": n, "k": int(k), "silhouette": silhouette(f, y)}
    perm = np.random.default_rng(int(seed)).permutation(n)
    n_test = int(min(n - 1, max(1, round(float(holdout) * n))))
    test, train = perm[:n_test], perm[n_test:]
    out["knn_accuracy"] = knn_accuracy(f[train], y[train], f[test], y[test], k=k)
    out["n_heldout"] = n_test
    comp = None
    if components is not None:
        comp = np.asarray(components).reshape(-1)
        if comp.shape[0] != n:
            raise ValueError(f"components must have one entry per sample ({n}), got {comp.shape[0]}")
        out["components_used"] = int(np.unique(comp).size)
        out["nmi"] = normalized_mutual_info(y, comp)
        out["ari"] = adjusted_rand(y, comp)
    if contexts is not None:
        ctx = np.asarray(contexts).reshape(-1)
        if ctx.shape[0] != n:
            raise ValueError(f"contexts must have one entry per sample ({n}), got {ctx.shape[0]}")
        out["silhouette_context"] = silhouette(f, ctx)
        if comp is not None:
            out["nmi_context"] = normalized_mutual_info(ctx, comp)
            out["ari_context"] = adjusted_rand(ctx, comp)
    return out
