"""Batched diagonal-covariance Gaussian mixtures in torch.

Fits ``G`` independent GMMs in one call, on any device, with the same code on CPU and CUDA:

* Mixture Normalization fits a GMM on every training minibatch: ``G = 1`` group of ``M = N*H*W`` points
  in ``D = C`` dimensions, or ``G = C`` groups of 1-D points;
* the app fits per-channel histograms (``G = C``, ``D = 1``).

The model is the mixture of mixture-normalization.txt eq. 26,

    p(x) = sum_k lambda_k p_k(x),      lambda_k >= 0,  sum_k lambda_k = 1,

with diagonal Gaussian components (eq. 27 with Sigma_k = diag(var_k)),

    log p_k(x) = -1/2 [ D log(2 pi) + sum_d log var_kd + sum_d (x_d - mu_kd)^2 / var_kd ],

and posteriors (responsibilities) nu_k(x) = lambda_k p_k(x) / sum_j lambda_j p_j(x) (eq. 31), computed in
log space (``log_softmax`` over the component axis).

Shapes: ``x`` is ``(G, M, D)``; a :class:`GMM` holds ``weights (G, K)``, ``means (G, K, D)``,
``vars (G, K, D)``.

Speed rules followed here: no Python loop over groups, points or dimensions (only over EM iterations, Lloyd
iterations and the ``K`` seeding steps of k-means++); no host synchronisation after the optional input
check at the start of :func:`fit` (no ``.item()``, no data-dependent shapes or Python branches on tensor
values; sampling is the Gumbel-max / exponential-race trick on ``torch.rand(generator=...)``, which is
what ``torch.multinomial`` does internally minus its argument checks, which synchronise on some torch
versions); no ``(G, M, K, D)`` temporaries: the Mahalanobis term is the matmul expansion

    sum_d (x_d - mu_kd)^2 / var_kd = x^2 @ (1/var)^T - 2 x @ (mu/var)^T + sum_d mu_kd^2 / var_kd

(clamped at >= 0), and the M-step sufficient statistics ``sum_m r_mk [x_m^2, x_m, 1]`` are one batched
matmul. To keep the expansion accurate far from the origin, data are centred per group before it is
applied (a translation changes neither the likelihood nor the posteriors).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GMM",
    "component_log_prob",
    "weighted_log_prob",
    "log_prob",
    "posteriors",
    "mean_log_likelihood",
    "kmeans_plus_plus",
    "fit",
    "fit_with_posteriors",
    "fit_with_statistics",
    "FitStatistics",
]

_LOG_2PI = math.log(2.0 * math.pi)
_WEIGHT_FLOOR = 1e-12  # mixture weights are floored at this, then renormalised (empty components)


# ----------------------------------------------------------------------------------------------------------
# Model container
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GMM:
    """``G`` independent diagonal GMMs with ``K`` components in ``D`` dimensions (eq. 26-27).

    Attributes:
        weights: ``(G, K)`` mixture weights lambda_k, each row sums to 1.
        means:   ``(G, K, D)`` component means mu_k.
        vars:    ``(G, K, D)`` component variances (diagonal of Sigma_k), > 0.

    Only shapes are checked at construction (checking values would need a host sync).
    """

    weights: Tensor
    means: Tensor
    vars: Tensor

    def __post_init__(self) -> None:
        for name in ("weights", "means", "vars"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"GMM.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.weights.dim() != 2:
            raise ValueError(f"GMM.weights must be 2-D (G, K), got shape {tuple(self.weights.shape)}")
        if self.means.dim() != 3:
            raise ValueError(f"GMM.means must be 3-D (G, K, D), got shape {tuple(self.means.shape)}")
        if self.vars.shape != self.means.shape:
            raise ValueError(f"GMM.vars must have the shape of GMM.means {tuple(self.means.shape)}, "
                             f"got {tuple(self.vars.shape)}")
        if self.weights.shape != self.means.shape[:2]:
            raise ValueError(f"GMM.weights shape {tuple(self.weights.shape)} does not match (G, K) = "
                             f"{tuple(self.means.shape[:2])} of GMM.means")

    @property
    def num_groups(self) -> int:
        """G."""
        return self.means.shape[0]

    @property
    def num_components(self) -> int:
        """K."""
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def to(self, *args, **kwargs) -> "GMM":
        """A new GMM with every tensor passed through ``Tensor.to(*args, **kwargs)`` (device and/or dtype)."""
        return GMM(self.weights.to(*args, **kwargs), self.means.to(*args, **kwargs),
                   self.vars.to(*args, **kwargs))

    def select(self, index) -> "GMM":
        """The groups picked by ``index`` along the group axis, as a new GMM.

        An ``int`` keeps the group axis (``G = 1``); a slice, list or index tensor selects several groups.
        """
        if not isinstance(index, (Tensor, slice)) and hasattr(index, "__index__"):
            index = operator.index(index)
            if not -self.num_groups <= index < self.num_groups:
                raise IndexError(f"group index {index} out of range for {self.num_groups} groups")
            index = slice(index, index + 1 if index != -1 else None)
        return GMM(self.weights[index], self.means[index], self.vars[index])


# ----------------------------------------------------------------------------------------------------------
# Densities and posteriors
# ----------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"expected floating-point tensors, got {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def _check_points(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (G, M, D) = (groups, points, dims), got shape {tuple(x.shape)}")


def _check_params(x: Tensor, means: Tensor, vars: Tensor) -> None:
    _check_points(x)
    for name, t in (("means", means), ("vars", vars)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (G, K, D), got shape {tuple(t.shape)}")
    if vars.shape != means.shape:
        raise ValueError(f"vars shape {tuple(vars.shape)} must equal means shape {tuple(means.shape)}")
    if x.shape[-1] != means.shape[-1]:
        raise ValueError(f"x has D = {x.shape[-1]} dims but means/vars have D = {means.shape[-1]}")
    gx, gm = x.shape[0], means.shape[0]
    if gx != gm and gx != 1 and gm != 1:
        raise ValueError(f"x has G = {gx} groups but means/vars have G = {gm} (they must match or one be 1)")


def _mahalanobis(x: Tensor, means: Tensor, prec: Tensor) -> Tensor:
    """sum_d (x_d - mu_kd)^2 * prec_kd, shape (G, M, K), never building (G, M, K, D).

    D = 1 is computed directly (a (G, M, K) broadcast, exact); otherwise by the matmul expansion
    x^2 @ prec^T - 2 x @ (mu prec)^T + sum_d mu^2 prec, clamped at 0 (rounding can make it slightly < 0).
    """
    d = x.shape[-1]
    if d == 1:
        return (x - means.transpose(-1, -2)).square() * prec.transpose(-1, -2)
    mp = means * prec
    const = (means * mp).sum(-1).unsqueeze(-2)  # (G, 1, K)
    out = torch.matmul(x * x, prec.transpose(-1, -2))
    out = out - 2.0 * torch.matmul(x, mp.transpose(-1, -2)) + const
    return out.clamp_min(0.0)


def _log_normaliser(vars: Tensor) -> Tensor:
    """-1/2 [D log(2 pi) + sum_d log var_kd], shape (G, 1, K)."""
    d = vars.shape[-1]
    return (-0.5 * (d * _LOG_2PI + torch.log(vars).sum(-1))).unsqueeze(-2)


def component_log_prob(x: Tensor, means: Tensor, vars: Tensor) -> Tensor:
    """log N(x | mu_k, diag var_k) for every point and component (mixture-normalization.txt eq. 27).

    Args:
        x: ``(G, M, D)`` points.
        means: ``(G, K, D)`` component means.
        vars: ``(G, K, D)`` component variances (> 0).
        A group axis of size 1 broadcasts against the other.

    Returns:
        ``(G, M, K)`` log densities, including the normaliser ``-1/2 sum_d log(2 pi var_kd)``.
        Computed in the promoted dtype of the inputs, at least float32. Differentiable.
    """
    _check_params(x, means, vars)
    dtype = _compute_dtype(x, means, vars)
    x, means, vars = x.to(dtype), means.to(dtype), vars.to(dtype)
    # Translate so the expansion works near the origin (exact identity; keeps float32 accurate for
    # data far from 0, e.g. a 1e4 offset).
    shift = means.mean(dim=-2, keepdim=True)
    maha = _mahalanobis(x - shift, means - shift, torch.reciprocal(vars))
    return _log_normaliser(vars) - 0.5 * maha


def _check_gmm(gmm: GMM) -> None:
    if not isinstance(gmm, GMM):
        raise TypeError(f"gmm must be a cbnorm.gmm.GMM, got {type(gmm).__name__}")


def weighted_log_prob(gmm: GMM, x: Tensor) -> Tensor:
    """log lambda_k + log p_k(x) (the summands of eq. 26 in log space): ``x (G, M, D) -> (G, M, K)``."""
    _check_gmm(gmm)
    lp = component_log_prob(x, gmm.means, gmm.vars)
    return lp + torch.log(gmm.weights.to(lp.dtype)).unsqueeze(-2)


def log_prob(gmm: GMM, x: Tensor) -> Tensor:
    """log p(x) of eq. 26 (logsumexp over components): ``x (G, M, D) -> (G, M)``.

    Equals sklearn's ``GaussianMixture.score_samples`` for the same parameters.
    """
    return torch.logsumexp(weighted_log_prob(gmm, x), dim=-1)


def posteriors(gmm: GMM, x: Tensor) -> Tensor:
    """Posteriors nu_k(x) of eq. 31: ``x (G, M, D) -> (G, M, K)``, rows sum to 1.

    Softmax over K of :func:`weighted_log_prob` (max-subtracted, never exponentiated before normalising).
    Equals sklearn's ``GaussianMixture.predict_proba``.
    """
    return torch.softmax(weighted_log_prob(gmm, x), dim=-1)


def mean_log_likelihood(gmm: GMM, x: Tensor) -> Tensor:
    """Mean over points of log p(x): ``x (G, M, D) -> (G,)`` (what sklearn's ``GaussianMixture.score`` gives)."""
    return log_prob(gmm, x).mean(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------
def _sample_index(p: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` independent draws (with replacement) of an index in [0, M) with probability proportional to
    the nonnegative ``p (G, M)``; returns ``(G, n)`` int64. Every row must have a positive entry.

    Exponential race: argmax_m p_m / E_m with E_m = -log(U_m) ~ Exp(1) is distributed as p / sum(p) (what
    ``torch.multinomial`` does internally, without its host-synchronising argument checks; ``torch.rand``
    is several times faster than ``Tensor.exponential_`` on CPU). Done in log space (Gumbel-max) so that
    p_m = 0 is never picked and huge ratios cannot overflow.
    """
    g, m = p.shape
    u = torch.rand((g, n, m), dtype=p.dtype, device=p.device, generator=generator)
    e = u.log_().neg_().clamp_min_(torch.finfo(p.dtype).tiny)  # Exp(1); U = 0 gives +inf (never picked)
    key = torch.log(p).unsqueeze(1) - e.log_()
    return key.argmax(dim=-1)


def _sq_dist(xt: Tensor, sq: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances ``(G, T, M)`` from c (G, T, D) to the points xt (G, D, M), sq = |x|^2 (G, M).

    Internally points are stored transposed, (G, D, M), and per-point quantities as (G, K, M): matmuls
    and reductions over the small K axis are then fast (a last-axis softmax/argmin over K = 3 is slow).
    """
    if xt.shape[-2] == 1:
        return (c - xt).square_()
    d2 = torch.matmul(c, xt).mul_(-2.0)
    d2 += sq.unsqueeze(-2)
    d2 += (c * c).sum(-1).unsqueeze(-1)
    return d2.clamp_min_(0.0)


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """x (G, M, D), idx (G, T) -> (G, T, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _gather_columns(xt: Tensor, idx: Tensor) -> Tensor:
    """xt (G, D, M), idx (G, T) -> points (G, T, D)."""
    return xt.gather(2, idx.unsqueeze(1).expand(-1, xt.shape[1], -1)).transpose(-1, -2)


def _positive_rows(p: Tensor, fallback: Tensor) -> Tensor:
    """p where its row has a positive sum, else ``fallback`` (a row that sums to > 0)."""
    return torch.where(p.sum(-1, keepdim=True) > 0, p, fallback)


def _kmeans_pp_indices(xt: Tensor, sq: Tensor, k: int, base: Tensor, generator: torch.Generator | None,
                       n_local_trials: int) -> Tensor:
    """Greedy k-means++ (sklearn's variant) on centred points xt (G, D, M); returns ``(G, K)`` point indices.

    ``base (G, M)`` are the per-point sampling weights, rows with a positive sum.
    """
    g, _, m = xt.shape
    first = _sample_index(base, 1, generator)  # (G, 1)
    closest = _sq_dist(xt, sq, _gather_columns(xt, first)).squeeze(-2)  # (G, M)
    closest.scatter_(1, first, 0.0)
    chosen = [first]
    for _ in range(1, k):
        # D^2 weighting; if every remaining distance is 0 (duplicates / identical points) sample by base.
        p = _positive_rows(closest * base, base)
        cand = _sample_index(p, n_local_trials, generator)  # (G, T)
        d2 = _sq_dist(xt, sq, _gather_columns(xt, cand))  # (G, T, M)
        d2.scatter_(2, cand.unsqueeze(-1), 0.0)  # a candidate is at distance 0 from itself
        d2 = torch.minimum(d2, closest.unsqueeze(-2))
        potential = (d2 * base.unsqueeze(-2)).sum(-1)  # (G, T)
        best = potential.argmin(dim=-1, keepdim=True)  # (G, 1)
        chosen.append(cand.gather(1, best))
        closest = d2.gather(1, best.unsqueeze(-1).expand(g, 1, m)).squeeze(-2)
    return torch.cat(chosen, dim=1)


def _default_trials(k: int) -> int:
    return 2 + int(math.log(k))  # sklearn's choice


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_generator(generator, x: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}; "
                         f"create it with torch.Generator(device=x.device)")


def _check_point_weights(weights, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if weights.shape != x.shape[:2]:
        raise ValueError(f"weights must have shape (G, M) = {tuple(x.shape[:2])}, got {tuple(weights.shape)}")
    if weights.device != x.device:
        raise ValueError(f"weights is on {weights.device} but x is on {x.device}")
    if weights.is_complex():
        raise TypeError(f"weights must be real, got {weights.dtype}")
    return weights.detach().to(dtype)


def kmeans_plus_plus(x: Tensor, k: int, *, generator: torch.Generator | None = None,
                     weights: Tensor | None = None, n_local_trials: int | None = None) -> Tensor:
    """k-means++ seeding, batched over groups: ``x (G, M, D) -> (G, K, D)`` initial centers (rows of x).

    The first center is drawn uniformly (proportionally to ``weights`` if given), each next one
    proportionally to the squared distance to the nearest chosen center (times ``weights``). As in sklearn,
    ``n_local_trials`` candidates (default ``2 + int(log k)``) are drawn per step and the one that most
    reduces the potential is kept (``n_local_trials=1`` is plain k-means++). When all distances are 0
    (duplicated or identical points) the draw falls back to uniform (never NaN).

    Args:
        x: ``(G, M, D)`` points, ``M >= k``.
        k: number of centers.
        generator: optional ``torch.Generator`` on x's device, for reproducible draws.
        weights: optional ``(G, M)`` nonnegative per-point weights (0 = never picked, e.g. padding).
        n_local_trials: candidates per step (>= 1).
    """
    _check_points(x)
    k = _check_int(k, "k", 1)
    if x.shape[1] < k:
        raise ValueError(f"x has M = {x.shape[1]} points per group (x.shape[1]) but k = {k}; need M >= k")
    trials = _default_trials(k) if n_local_trials is None else _check_int(n_local_trials, "n_local_trials", 1)
    _check_generator(generator, x)
    dtype = _compute_dtype(x)
    w = _check_point_weights(weights, x, dtype)
    with torch.no_grad():
        xd = x.detach().to(dtype)
        xt = (xd - xd.mean(dim=1, keepdim=True)).transpose(-1, -2).contiguous()  # centred, (G, D, M)
        sq = (xt * xt).sum(1)
        base = _point_base(w, xd)
        idx = _kmeans_pp_indices(xt, sq, k, base, generator, trials)
        return _gather_points(x.detach(), idx)


def _point_base(w: Tensor | None, x: Tensor) -> Tensor:
    ones = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    return ones if w is None else _positive_rows(w, ones)


# ----------------------------------------------------------------------------------------------------------
# EM
# ----------------------------------------------------------------------------------------------------------
def _hard_resp(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """(G, M) labels -> (G, K, M) one-hot (scatter; ``F.one_hot`` checks its input on the host)."""
    g, m = labels.shape
    out = torch.zeros((g, k, m), dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), 1.0)


def _nearest(xt: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest center for points xt (G, D, M): (G, M). (|x|^2 is common to all centers.)

    ``min(dim=1).indices`` rather than ``argmin(dim=1)``: the latter is ~10x slower on CPU for this layout.
    """
    if xt.shape[-2] == 1:
        return (centers - xt).abs_().min(dim=1).indices
    score = torch.matmul(centers, xt).mul_(-2.0)  # (G, K, M)
    score += (centers * centers).sum(-1).unsqueeze(-1)
    return score.min(dim=1).indices


def _sufficient_stats(feats: Tensor, resp: Tensor, w: Tensor | None, d: int):
    """sum_m r_km w_m [x_m^2, x_m, 1] for resp (G, K, M) and feats = [x^2; x; 1] (G, 2D+1, M)
    -> (sxx (G,K,D), sx (G,K,D), nk (G,K)), in one batched matmul."""
    r = resp if w is None else resp * w.unsqueeze(-2)
    # einsum, not matmul(r, feats.transpose(-1, -2)): on CPU the matmul of that transposed view is ~100x
    # slower for one group (G=1, M=20,000: 16 ms against 0.1 ms) and no faster for many
    stats = torch.einsum("gkm,gdm->gkd", r, feats)  # (G, K, 2D+1)
    return stats[..., :d], stats[..., d:2 * d], stats[..., 2 * d]


def _m_step(feats: Tensor, resp: Tensor, w: Tensor | None, prev_means: Tensor, prev_vars: Tensor,
            reg_covar: float):
    """Maximisation step (sklearn's diag estimator); empty components keep their previous mean/variance."""
    stats = _sufficient_stats(feats, resp, w, prev_means.shape[-1])
    return _m_step_from_stats(*stats, feats.shape[-1], prev_means, prev_vars, reg_covar)


def _m_step_from_stats(sxx: Tensor, sx: Tensor, nk: Tensor, m: int, prev_means: Tensor, prev_vars: Tensor,
                       reg_covar: float):
    """The M-step from sufficient statistics (G,K,D), (G,K,D), (G,K) over m points."""
    total = nk.sum(-1, keepdim=True)  # (G, 1): total point weight
    eps = torch.finfo(nk.dtype).eps
    alive = nk > (10.0 * eps / m) * total  # (G, K); relative to the mean point weight
    safe = torch.where(alive, nk, torch.ones_like(nk)).unsqueeze(-1)
    means = sx / safe
    vars = (sxx / safe - means * means).clamp_min_(0.0).add_(reg_covar)
    alive3 = alive.unsqueeze(-1)
    means = torch.where(alive3, means, prev_means)
    vars = torch.where(alive3, vars, prev_vars)
    weights = (nk / total.clamp_min(torch.finfo(nk.dtype).tiny)).clamp_min_(_WEIGHT_FLOOR)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights, means, vars


def _weighted_log_prob_t(feats: Tensor, weights: Tensor, means: Tensor, vars: Tensor) -> Tensor:
    """log lambda_k + log p_k(x) (eq. 26's summands) in the internal (G, K, M) layout, from
    feats = [x^2; x; 1] (G, 2D+1, M)."""
    d = means.shape[-1]
    prec = torch.reciprocal(vars)
    if d == 1:
        maha = (means - feats[:, 1:2]).square_().mul_(prec)  # (G, K, M), exact
    else:
        mp = means * prec
        coef = torch.cat([prec, -2.0 * mp, (means * mp).sum(-1, keepdim=True)], dim=-1)  # (G, K, 2D+1)
        maha = torch.matmul(coef, feats).clamp_min_(0.0)  # (G, K, M)
    const = _log_normaliser(vars).transpose(-1, -2) + torch.log(weights).unsqueeze(-1)  # (G, K, 1)
    return maha.mul_(-0.5).add_(const)


def _normalise_k(wlp: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over K (dim 1) of ``wlp`` (G, K, M), in place, max-subtracted (never exponentiated before
    normalising), and the log of the normaliser, log p(x) (G, 1, M). Written out, not ``torch.softmax`` /
    ``torch.logsumexp``: over the middle dim those are 1.4-3x (float64) and 3.4x (float32) slower on CPU."""
    mx = wlp.amax(dim=1, keepdim=True)
    e = wlp.sub_(mx).exp_()
    total = e.sum(1, keepdim=True)
    return e.div_(total), total.log_().add_(mx)


def _e_step(feats: Tensor, weights: Tensor, means: Tensor, vars: Tensor) -> Tensor:
    """Posteriors (eq. 31) in the internal (G, K, M) layout: softmax over K of log lambda_k + log p_k(x)
    (max-subtracted, so never exponentiated before normalising). feats = [x^2; x; 1] (G, 2D+1, M)."""
    return _normalise_k(_weighted_log_prob_t(feats, weights, means, vars))[0]


def _e_step_ll(feats: Tensor, weights: Tensor, means: Tensor, vars: Tensor, w: Tensor | None
               ) -> tuple[Tensor, Tensor]:
    """:func:`_e_step` and the mean log-likelihood (G,) of the points under the parameters it was given
    (weighted by ``w`` when given)."""
    resp, lse = _normalise_k(_weighted_log_prob_t(feats, weights, means, vars))
    lse = lse[:, 0]
    ll = lse.mean(-1) if w is None else (lse * w).sum(-1) / w.sum(-1).clamp_min(torch.finfo(lse.dtype).tiny)
    return resp, ll


def _check_finite_inputs(x: Tensor, w: Tensor | None) -> None:
    """The single host synchronisation of :func:`fit`."""
    bad_x = ~torch.isfinite(x).all()
    if w is None:
        flags = bad_x.reshape(1)
    else:
        bad_w = ~(torch.isfinite(w).all() & (w >= 0).all())
        flags = torch.stack([bad_x, bad_w])
    flags = flags.tolist()
    if flags[0]:
        raise ValueError("x contains NaN or inf")
    if len(flags) > 1 and flags[1]:
        raise ValueError("weights must be finite and nonnegative (got NaN, inf or a negative value)")


@torch.no_grad()
def fit(x: Tensor, k: int, *, iters: int = 2, kmeans_iters: int = 0, generator: torch.Generator | None = None,
        reg_covar: float = 1e-6, weights: Tensor | None = None, check_finite: bool = True,
        init: GMM | None = None, tol: float | None = None) -> GMM:
    """Fit ``G`` independent diagonal GMMs (eq. 26-27) by EM, batched: ``x (G, M, D) -> GMM``.

    1. k-means++ seeding (:func:`kmeans_plus_plus`), then ``kmeans_iters`` Lloyd iterations;
    2. initial GMM from the hard assignment of every point to its nearest center (sklearn's initialisation
       from k-means labels): weights = cluster fractions, means = cluster means,
       vars = cluster variances + ``reg_covar``;
    3. ``iters`` EM iterations: E-step posteriors nu_k(x) (eq. 31) in log space; M-step
       N_k = sum_m nu_mk, mu_k = sum_m nu_mk x_m / N_k, var_k = sum_m nu_mk x_m^2 / N_k - mu_k^2
       (clamped at 0) + ``reg_covar`` (sklearn's diag estimator).

    With ``init`` (a GMM of weights (G, K), means and vars (G, K, D), e.g. the previous minibatch's fit:
    a warm start) steps 1-2 are skipped and EM starts from it; a component whose weight is below 1e-3 / K
    (it lost its points) is first moved to a random point with the mixture's variance, so that none stays
    dead.

    Without ``tol`` there is no convergence test (it would need a host sync): exactly ``iters`` iterations
    run. With ``tol`` (sklearn's ``tol``), EM stops before ``iters`` once every group's mean log-likelihood
    changed by less than ``tol`` from one iteration to the next (one host sync per iteration).
    An empty component (N_k ~ 0) keeps its previous mean and variance and gets a floored weight (1e-12,
    then renormalised); constant data give vars = ``reg_covar``; no NaN either way.

    Args:
        x: ``(G, M, D)`` float points, ``M >= k``. float16/bfloat16 are computed (and returned) in float32,
            float64 stays float64.
        k: number of components (int >= 1).
        iters: EM iterations (>= 0; 0 returns the k-means initialisation).
        kmeans_iters: Lloyd iterations after seeding (>= 0).
        generator: optional ``torch.Generator`` on x's device (seeding is the only random step).
        reg_covar: added to every variance (>= 0).
        weights: optional ``(G, M)`` nonnegative per-point weights (e.g. a 0/1 padding mask), used in the
            seeding, the initialisation and every M-step.
        check_finite: check that x (and weights) are finite (and nonnegative). This is the only host
            synchronisation; pass False in hot loops where inputs are known to be valid.
        init: optional starting GMM (warm start), shapes (G, K), (G, K, D) on x's device.
        tol: optional convergence threshold (> 0) on the change of the mean log-likelihood (see above).

    Returns:
        :class:`GMM` with weights ``(G, K)``, means ``(G, K, D)``, vars ``(G, K, D)`` on x's device.

    Raises:
        TypeError: x not a floating tensor, k/iters not ints, bad generator/weights/init types.
        ValueError: x not 3-D, k < 1, M < k, iters/kmeans_iters < 0, reg_covar < 0, weights or init of the
            wrong shape, "x contains NaN or inf".
    """
    return _fit(x, k, iters, kmeans_iters, generator, reg_covar, weights, check_finite, init, 0, tol).gmm


class FitStatistics(NamedTuple):
    """What :func:`fit_with_statistics` returns: the fit, the posteriors nu (G, K, M) of every point under it
    (one more E-step), and the nu-weighted sums of the points centred at ``shift`` (G, 1, D), their mean:
    ``sxx`` = sum_m nu_mk (x_m - shift)^2 (G, K, D), ``sx`` = sum_m nu_mk (x_m - shift) (G, K, D),
    ``nk`` = sum_m nu_mk (G, K) (the sufficient statistics of one more M-step)."""

    gmm: GMM
    resp: Tensor
    shift: Tensor
    sxx: Tensor
    sx: Tensor
    nk: Tensor


_FIT_KEYS = ("iters", "kmeans_iters", "generator", "reg_covar", "weights", "check_finite", "init")
_FIT_DEFAULTS = dict(iters=2, kmeans_iters=0, generator=None, reg_covar=1e-6, weights=None, check_finite=True,
                     init=None)


def _fit_args(kwargs: dict, name: str) -> tuple:
    unknown = set(kwargs) - set(_FIT_KEYS)
    if unknown:
        raise TypeError(f"{name} got unexpected keywords {sorted(unknown)}")
    a = {**_FIT_DEFAULTS, **kwargs}
    return tuple(a[key] for key in _FIT_KEYS)


@torch.no_grad()
def fit_with_posteriors(x: Tensor, k: int, **kwargs) -> tuple[GMM, Tensor]:
    """:func:`fit`, and the posteriors nu_k(x) (eq. 31) of every point under the returned GMM, in the internal
    layout ``(G, K, M)`` (one more E-step on the data the fit already holds as [x^2; x; 1], instead of a
    fresh pass over x). Same keywords as :func:`fit`."""
    out = _fit(x, k, *_fit_args(kwargs, "fit_with_posteriors"), 1)
    return out.gmm, out.resp


@torch.no_grad()
def fit_with_statistics(x: Tensor, k: int, **kwargs) -> FitStatistics:
    """:func:`fit`, the posteriors of every point under the fit and their weighted sums of the centred points
    (:class:`FitStatistics`): MN's posterior-weighted moments (eq. 35-36) from the [x^2; x; 1] the fit holds,
    in one matmul, instead of passes over x. Same keywords as :func:`fit`."""
    return _fit(x, k, *_fit_args(kwargs, "fit_with_statistics"), 2)


def _check_init(init, g: int, k: int, d: int, x: Tensor) -> None:
    if init is None:
        return
    if not isinstance(init, GMM):
        raise TypeError(f"init must be a cbnorm.gmm.GMM or None, got {type(init).__name__}")
    if tuple(init.means.shape) != (g, k, d):
        raise ValueError(f"init must have means/vars of shape (G, K, D) = {(g, k, d)}, got {tuple(init.means.shape)}")
    if init.device != x.device:
        raise ValueError(f"init is on {init.device} but x is on {x.device}")


def _fit(x: Tensor, k: int, iters: int, kmeans_iters: int, generator, reg_covar, weights, check_finite: bool,
         init: GMM | None, extra: int, tol: float | None = None) -> FitStatistics:
    """The fit; ``extra`` 1: with the posteriors under it, 2: and their weighted sums (else None)."""
    _check_points(x)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0
                            or not math.isfinite(tol)):
        raise ValueError(f"tol must be a finite float > 0 or None, got {tol!r}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    k = _check_int(k, "k", 1)
    iters = _check_int(iters, "iters", 0)
    kmeans_iters = _check_int(kmeans_iters, "kmeans_iters", 0)
    g, m, d = x.shape
    if g < 1 or d < 1:
        raise ValueError(f"x must have at least one group and one dim, got shape {tuple(x.shape)}")
    if m < k:
        raise ValueError(f"x has M = {m} points per group (x.shape[1]) but k = {k}; need M >= k")
    if isinstance(reg_covar, bool) or not isinstance(reg_covar, (int, float)) or not reg_covar >= 0 \
            or not math.isfinite(reg_covar):
        raise ValueError(f"reg_covar must be a finite float >= 0, got {reg_covar!r}")
    _check_generator(generator, x)
    _check_init(init, g, k, d, x)
    dtype = _compute_dtype(x)
    x = x.detach().to(dtype)
    w = _check_point_weights(weights, x, dtype)
    if check_finite:
        _check_finite_inputs(x, w)
    reg_covar = float(reg_covar)

    # Centre each group (weighted mean) so the matmul expansions stay accurate far from the origin.
    if w is None:
        shift = x.mean(dim=1, keepdim=True)
    else:
        wsum = w.sum(1).clamp_min(torch.finfo(dtype).tiny)
        shift = (torch.matmul(w.unsqueeze(1), x) / wsum[:, None, None])  # (G, 1, D)
    # feats = [x^2; x; 1] (G, 2D+1, M), centred x stored transposed (see _sq_dist for why); built by one
    # cat (no out= into views, so that torch.compile traces it whole)
    if torch.compiler.is_compiling():  # one cat, which inductor fuses (out= into views does not trace)
        xt = x.transpose(-1, -2) - shift.transpose(-1, -2)  # (G, D, M)
        feats = torch.cat([xt * xt, xt, torch.ones((g, 1, m), dtype=dtype, device=x.device)], dim=1)
    else:  # eager: written in place, no copies
        feats = torch.empty((g, 2 * d + 1, m), dtype=dtype, device=x.device)
        torch.sub(x.transpose(-1, -2), shift.transpose(-1, -2), out=feats[:, d:2 * d])
        torch.mul(feats[:, d:2 * d], feats[:, d:2 * d], out=feats[:, :d])
        feats[:, 2 * d].fill_(1.0)
    xt = feats[:, d:2 * d]

    if init is None:
        sq = feats[:, :d].sum(1)  # (G, M)
        # 1. k-means++ seeding (+ Lloyd).
        base = _point_base(w, x)
        centers = _gather_columns(xt, _kmeans_pp_indices(xt, sq, k, base, generator, _default_trials(k)))
        for _ in range(kmeans_iters):
            _, sx, nk = _sufficient_stats(feats, _hard_resp(_nearest(xt, centers), k, dtype), w, d)
            alive = (nk > 0).unsqueeze(-1)
            centers = torch.where(alive, sx / torch.where(alive, nk.unsqueeze(-1), torch.ones_like(sx)), centers)

        # 2. Initial GMM from hard assignments; an empty cluster keeps its center and the group's variance.
        #    The clusters partition the points, so the group's statistics are the sums of the clusters' ones.
        sxx, sx, nk = _sufficient_stats(feats, _hard_resp(_nearest(xt, centers), k, dtype), w, d)
        n_all = nk.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny).unsqueeze(-1)  # (G, 1, 1)
        mean_all = sx.sum(1, keepdim=True) / n_all
        group_vars = (sxx.sum(1, keepdim=True) / n_all - mean_all * mean_all).clamp_min_(0.0).add_(reg_covar)
        mix, means, vars = _m_step_from_stats(sxx, sx, nk, m, centers, group_vars.expand(g, k, d), reg_covar)
    else:
        mix, means, vars = _warm_start(init, feats, xt, w, shift, k, d, reg_covar, generator)

    # 3. EM.
    prev = None
    for _ in range(iters):
        if tol is None:
            resp = _e_step(feats, mix, means, vars)
        else:
            resp, ll = _e_step_ll(feats, mix, means, vars, w)
            if prev is not None and bool(((ll - prev).abs() < tol).all()):
                break  # the parameters of the last M-step changed no group's likelihood by tol
            prev = ll
        mix, means, vars = _m_step(feats, resp, w, means, vars, reg_covar)

    resp = _e_step(feats, mix, means, vars) if extra else None
    stats = _sufficient_stats(feats, resp, w, d) if extra == 2 else (None, None, None)
    return FitStatistics(GMM(mix, means + shift, vars), resp, shift, *stats)


def _warm_start(init: GMM, feats: Tensor, xt: Tensor, w: Tensor | None, shift: Tensor, k: int, d: int,
                reg_covar: float, generator) -> tuple[Tensor, Tensor, Tensor]:
    """EM's starting point from ``init`` (in the centred frame): weights renormalised, variances at least
    ``reg_covar``; components with weight < 1e-3 / K restart at a random point (uniform, or by ``w``) with
    the variance of the whole mixture and weight 1 / K."""
    dtype = feats.dtype
    g, _, m = feats.shape
    mix = init.weights.detach().to(dtype).clamp_min(_WEIGHT_FLOOR)
    mix = mix / mix.sum(-1, keepdim=True)
    means = init.means.detach().to(dtype) - shift
    vars = init.vars.detach().to(dtype).clamp_min(max(reg_covar, torch.finfo(dtype).tiny))
    dead = (mix < 1e-3 / k).unsqueeze(-1)  # (G, K, 1)
    if w is None:  # uniform draws: no pass over the data
        idx = torch.randint(0, m, (g, k), device=feats.device, generator=generator)
    else:
        idx = _sample_index(_point_base(w, feats[:, 0]), k, generator)
    pick = _gather_columns(xt, idx)  # (G, K, D) random points
    # the variance of the whole mixture (law of total variance), from the parameters alone
    wk = mix.unsqueeze(-1)
    centre = (wk * means).sum(1, keepdim=True)
    group_vars = (wk * (vars + (means - centre).square())).sum(1, keepdim=True).clamp_min(reg_covar)
    means = torch.where(dead, pick, means)
    vars = torch.where(dead, group_vars.expand(g, k, d), vars)
    mix = torch.where(dead[..., 0], torch.full_like(mix, 1.0 / k), mix)
    return mix / mix.sum(-1, keepdim=True), means, vars
