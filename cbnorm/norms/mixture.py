"""Mixture Normalization (MN; mixture-normalization.txt section 3.2-3.3, eq. 34-39).

Training, on every minibatch x (N, C, P):
1. fit a diagonal GMM theta_fit = (w, m, v) to the points (k-means++ seeding + ``em_iters`` EM iterations,
   ``cbnorm.gmm.fit``), outside the autograd graph; ``fit_fraction`` / ``fit_points`` optionally fit on a
   random subsample (the paper fits on at least 25% of the points) while the posteriors
   nu_k(x) = w_k N(x | m_k, v_k) / sum_j w_j N(x | m_j, v_j) (eq. 31) are evaluated on every point;
2. posterior-weighted statistics (eq. 35-36): nu_hat_k = nu_k / sum_i nu_ik, mu_k = nu_hat_k^T x,
   sigma_k^2 = nu_hat_k^T (x - mu_k)^2, lambda_k = mean_i nu_ik — differentiable in x, not through nu;
3. x_hat_i = sum_k nu_k(x_i) / sqrt(lambda_k) * (x_i - mu_k) / sqrt(sigma_k^2 + eps)  (eq. 34), then a
   per-channel affine (eq. 37 folds gamma/beta into the statistics; we apply them after, as BatchNorm does);
4. push both parts of that step into a queue of the last T steps: the fit theta_fit = (w, m, v) the
   posteriors came from (``queue_fit_weights``, ``queue_fit_means``, ``queue_fit_vars``) and the moments
   (lambda, mu, sigma^2) the transform used (``queue_weights``, ``queue_means``, ``queue_vars``).

The paper's queue holds one theta per step and eq. 38 uses it both for the posteriors and for the transform,
while training takes the posteriors from the fit and the transform from the moments (one more M-step: they
differ). Eval with such a queue does not reproduce the training transform even when every stored step is the
same. We store both, and eq. 38 takes each part from where training took it.

Inference (eq. 38-39): all T x K stored components form one mixture. Posteriors over the T*K components
use the fits, with weights tau^t w_k^t, tau^t = (1 - zeta) / (1 - zeta^T) zeta^(T - t - 1) (renormalised over
the filled slots before T steps exist), and no eps added to v (training adds none). Component (t, k)
normalizes with the moments of its step: (x - mu_k^t) / sqrt(sigma_k^t^2 + eps) / sqrt(lambda_k^t).
Components are *not* averaged across steps (their order is arbitrary). Eq. 38 prints the scale as
1 / sqrt(tau^t lambda_k^t); with T identical steps that inflates the output by 1/sqrt(tau) ~ sqrt(T) compared
with training, so each component is scaled by 1 / sqrt(lambda_k^t), its weight within its own step. With
this reading, a queue holding T copies of one training step reproduces that step's training transform
exactly (tested to 1e-10 in float64). Before the first step, eval normalizes with mean 0 and variance 1,
like an untrained BatchNorm.

Files from before the fit buffers existed (state-dict version 1) load with the fit buffers filled from the
moments, variances plus eps: exactly the old eval transform.

``posterior="joint"`` (default): one diagonal Gaussian over the C channels per position (the paper);
``posterior="channel"``: an independent 1-D mixture per channel (G = C groups in one batched fit), whose
weights differ per channel (``channel_mixture_parameters()``). With K = 1, MN is BatchNorm in train mode.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import gmm
from .base import RunningStatsNorm, affine_params, check_positive_int
from .functional import (check_posterior, log_posteriors, mix_affine, normalizing_coefficients,
                         posterior_batch_norm, weighted_moments)

__all__ = ["MixtureNorm", "QueueMixture"]


class QueueMixture(NamedTuple):
    """MN's eq. 38 mixture over the T*K queued components (empty slots have log weight -inf).

    log_weights (T*K,) or (T*K, C) for posterior="channel": log(tau^t w_k^t); means, vars (T*K, C): the
    fits, for the posteriors; scale (T*K, 1) or (T*K, C): 1 / sqrt(lambda_k^t); norm_means, norm_vars
    (T*K, C): the posterior-weighted moments (eq. 35-36), for the transform."""

    log_weights: Tensor
    means: Tensor
    vars: Tensor
    scale: Tensor
    norm_means: Tensor
    norm_vars: Tensor


class MixtureNorm(RunningStatsNorm):
    """MN (eq. 34-39). x (N, C, *S) or (N, L, D) with channel_last; ``num_components`` K; no context.

    ``em_iters`` (2), ``kmeans_iters`` (0), ``queue_size`` T (10), ``zeta`` (0.9, eq. 39), ``fit_fraction``
    (share of the points the GMM is fitted on; 1.0 = all, the paper uses >= 0.25), ``fit_points`` (cap on
    that number; None = no cap), ``posterior`` ("joint" | "channel"). No ``momentum``: the running state is
    the queue of the last T steps (weights and means (T, K[, C]), (T, K, C) for fits and moments alike).
    """

    names = ("mn", "mixture", "mixnorm")
    has_mixture = True
    takes_momentum = False

    def __init__(self, num_features: int, *, num_components: int = 3, em_iters: int = 2, kmeans_iters: int = 0,
                 queue_size: int = 10, zeta: float = 0.9, fit_points: Optional[int] = None, fit_fraction: float = 1.0,
                 posterior: str = "joint", eps: float = 1e-5, affine: bool = True,
                 channel_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=None, affine=affine, channel_last=channel_last)
        self.num_components = k = check_positive_int("num_components", num_components)
        self.em_iters = check_positive_int("em_iters", em_iters, 0)
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, 0)
        self.queue_size = t = check_positive_int("queue_size", queue_size)
        if not 0.0 < float(zeta) <= 1.0:
            raise ValueError(f"zeta must be in (0, 1], got {zeta!r}")
        self.zeta = float(zeta)
        self.fit_points = None if fit_points is None else check_positive_int("fit_points", fit_points, k)
        if not 0.0 < float(fit_fraction) <= 1.0:
            raise ValueError(f"fit_fraction must be in (0, 1], got {fit_fraction!r}")
        self.fit_fraction = float(fit_fraction)
        self.posterior = check_posterior(posterior, ("joint", "channel"))
        affine_params(self, (num_features,), affine)
        c = num_features
        wshape = (t, k) if self.posterior == "joint" else (t, k, c)
        for part in ("", "fit_"):  # moments (lambda, mu, sigma^2) and fits (w, m, v) of the last T steps
            self._register_running(f"queue_{part}weights", wshape, 1.0 / k)
            self._register_running(f"queue_{part}means", (t, k, c), 0.0)
            self._register_running(f"queue_{part}vars", (t, k, c), 1.0)
        self._register_running("queue_count", (), 0, dtype=torch.long)
        self._register_running("queue_ptr", (), 0, dtype=torch.long)

    def _needs_batch_statistics(self) -> bool:
        return True

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Version 1 queued the moments only and eval took its posteriors from them with variances + eps: the
        fit buffers get exactly that, so an old file evaluates as it did."""
        super().upgrade_state_dict(state_dict, prefix)
        for name in ("weights", "means", "vars"):
            old, new = prefix + f"queue_{name}", prefix + f"queue_fit_{name}"
            if new not in state_dict and isinstance(state_dict.get(old), Tensor):
                value = state_dict[old]
                if name == "vars":
                    value = value.to(torch.promote_types(value.dtype, torch.float32)) + self.eps
                state_dict[new] = value.clone()

    # ------------------------------------------------------------------ training
    @torch.compiler.disable  # data-dependent sampling and sizes: always eager, also inside torch.compile
    @torch.no_grad()
    def fit_mixture(self, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """GMM fit on the minibatch x3 (N, C, P): (log weights (K,) joint or (K, C) channel, means (K, C),
        variances (K, C)) in x3's dtype; the posteriors of eq. 31 come from these.

        Runs eagerly under torch.compile: traced, a second MixtureNorm with another ``fit_fraction`` makes
        dynamo treat the fraction as a symbolic float and the subsample size cannot be built (found by
        bench/speed.py)."""
        n, c, p = x3.shape
        m = n * p
        if m < self.num_components:
            raise ValueError(f"MixtureNorm needs at least num_components={self.num_components} points "
                             f"(N x positions) per minibatch, got {m}")
        budget = max(self.num_components, int(round(m * self.fit_fraction)))
        if self.fit_points is not None:
            budget = min(budget, self.fit_points)
        # Points as (C, M') contiguous: gmm.fit works on the transposed layout, so handing it the transpose
        # of a contiguous (C, M') tensor spares it a strided copy (4 ms of a 23 ms fit at M=16384, C=128).
        pts_t = x3.transpose(0, 1).reshape(c, m)  # (C, N*P), sample-major
        if budget < m:  # fit on a random subsample, posteriors on every point
            idx = torch.randperm(m, device=x3.device)[:budget].sort().values  # sorted: sequential reads
            pts_t = pts_t.index_select(1, idx)  # (C, budget)
        pts = pts_t.unsqueeze(-1) if self.posterior == "channel" else pts_t.t().unsqueeze(0)
        try:  # NaN/inf input gives non-finite statistics, refused in _normalize before the queue is touched
            fitted = gmm.fit(pts, self.num_components, iters=self.em_iters, kmeans_iters=self.kmeans_iters,
                             check_finite=False)
        except ValueError as err:
            raise ValueError(f"MixtureNorm: cannot fit a mixture to this minibatch: {err}") from None
        if self.posterior == "channel":  # (C, K, 1) -> (K, C)
            means, vars, logw = fitted.means[..., 0].t(), fitted.vars[..., 0].t(), torch.log(fitted.weights).t()
        else:
            means, vars, logw = fitted.means[0], fitted.vars[0], torch.log(fitted.weights[0])
        return logw.to(x3.dtype), means.to(x3.dtype), vars.to(x3.dtype)

    @torch.compiler.disable
    @torch.no_grad()
    def fit_posteriors(self, x3: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The fit (``fit_mixture``) and the posteriors nu (eq. 31) of every point of x3 (N, C, P) under it:
        (nu (N, K, P) for "joint" or (N, C, P, K) for "channel", (log weights, means, variances)). Constants
        for autograd, as MN prescribes."""
        fit = self.fit_mixture(x3)
        return log_posteriors(x3, fit[1], fit[2], fit[0], self.posterior).exp(), fit

    @torch.no_grad()
    def _push(self, fit: tuple[Tensor, Tensor, Tensor], moments: tuple[Tensor, Tensor, Tensor]) -> None:
        """Store one step in the queue slot ``queue_ptr``: fit (w, m, v) and moments (lambda, mu, sigma^2)."""
        t = self.queue_ptr % self.queue_size
        onehot = torch.nn.functional.one_hot(t, self.queue_size).bool()
        bufs = (self.queue_fit_weights, self.queue_fit_means, self.queue_fit_vars, self.queue_weights,
                self.queue_means, self.queue_vars)
        for buf, new in zip(bufs, (*fit, *moments)):
            mask = onehot.view(-1, *([1] * (buf.dim() - 1)))
            buf.copy_(torch.where(mask, new.detach().to(buf.dtype).unsqueeze(0), buf))
        self.queue_ptr.copy_((self.queue_ptr + 1) % self.queue_size)
        self.queue_count.add_(1)

    # ----------------------------------------------------------------- inference
    def queue_mixture(self) -> QueueMixture:
        """The inference mixture of eq. 38 over the T*K queued components (see ``QueueMixture``)."""
        t, k, c = self.queue_size, self.num_components, self.num_features
        dtype = self.queue_means.dtype
        ages = (self.queue_ptr - 1 - torch.arange(t, device=self.queue_ptr.device)) % t
        valid = ages < self.queue_count.clamp(max=t)
        tau = torch.where(valid, self.zeta ** ages.to(dtype), torch.zeros((), dtype=dtype, device=valid.device))
        tau = tau / tau.sum().clamp_min(1e-30)  # eq. 39, renormalised over filled slots
        w = self.queue_fit_weights.clamp_min(1e-12)
        tau_b = tau.view(t, *([1] * (w.dim() - 1)))
        logw = torch.where(valid.view_as(tau_b), torch.log(tau_b.clamp_min(1e-30)) + torch.log(w),
                           torch.full_like(w, float("-inf")))
        scale = torch.rsqrt(self.queue_weights.clamp_min(1e-12))
        shape = (t * k,) if w.dim() == 2 else (t * k, c)
        return QueueMixture(logw.reshape(shape), self.queue_fit_means.reshape(t * k, c),
                            self.queue_fit_vars.reshape(t * k, c), scale.reshape(t * k, -1),
                            self.queue_means.reshape(t * k, c), self.queue_vars.reshape(t * k, c))

    def _filled_mixture(self) -> tuple[Tensor, Tensor, Tensor]:
        """(weights (T'K,) or (T'K, C), means (T'K, C), variances (T'K, C)) of the filled slots' fits."""
        if int(self.queue_count) == 0:
            c = self.num_features
            w = torch.ones(1, c) if self.posterior == "channel" else torch.ones(1)
            return w, torch.zeros(1, c), torch.ones(1, c)
        mix = self.queue_mixture()
        keep = torch.isfinite(mix.log_weights) if mix.log_weights.dim() == 1 else torch.isfinite(mix.log_weights[:, 0])
        return mix.log_weights[keep].exp(), mix.means[keep].clone(), mix.vars[keep].clone()

    def mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """The posterior mixture of eq. 38 over the filled queue: weights tau^t w_k^t (T'K,), means (T'K, C),
        variances (T'K, C) of the stored fits; with posterior="channel" the weights are averaged over the
        channels (``channel_mixture_parameters`` has them per channel). Before any step: one N(0, 1)."""
        with torch.no_grad():
            w, mean, var = self._filled_mixture()
            return (w.mean(dim=1) if w.dim() == 2 else w), mean, var

    def channel_mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """As ``mixture_parameters`` with the weights of each channel: (T'K, C), every column sums to 1."""
        with torch.no_grad():
            w, mean, var = self._filled_mixture()
            return (w if w.dim() == 2 else w[:, None].expand(-1, self.num_features).clone()), mean, var

    # ------------------------------------------------------------------ forward
    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        gain = None if self.weight is None else self.weight.to(x3.dtype)
        shift = None if self.bias is None else self.bias.to(x3.dtype)
        if self.training:
            resp, fit = self.fit_posteriors(x3)
            if self.posterior == "joint":  # eq. 34-36 with a hand-written backward (same numbers)
                y, lam, mean, var = posterior_batch_norm(x3, resp, gain, shift, self.eps)
            else:
                lam, mean, var = weighted_moments(x3, resp, self.posterior)  # eq. 35-36
            self._refuse_nonfinite(lam, mean, var, *fit)  # finite but huge input can overflow the fit
            self._update_running()
            self._push((fit[0].exp(), fit[1], fit[2]), (lam, mean, var))
            if self.posterior == "joint":
                return y
            scale = torch.rsqrt(lam.clamp_min(1e-12))
            a, b = normalizing_coefficients(mean, var, self.eps, scale, gain, shift)  # eq. 34
            return mix_affine(x3, resp, a, b, self.posterior)
        if int(self.queue_count) == 0:
            mean = torch.zeros(1, self.num_features, dtype=x3.dtype, device=x3.device)
            a, b = normalizing_coefficients(mean, torch.ones_like(mean), self.eps, None, gain, shift)
            return x3 * a[0][None, :, None] + b[0][None, :, None]
        mix = QueueMixture(*(v.to(x3.dtype) for v in self.queue_mixture()))
        resp = log_posteriors(x3, mix.means, mix.vars, mix.log_weights, self.posterior).exp()  # eq. 38
        a, b = normalizing_coefficients(mix.norm_means, mix.norm_vars, self.eps, mix.scale, gain, shift)
        return mix_affine(x3, resp, a, b, self.posterior)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_components={self.num_components}, em_iters={self.em_iters}, "
                                       f"queue_size={self.queue_size}, zeta={self.zeta}, posterior={self.posterior!r}")
