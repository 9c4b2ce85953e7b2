"""Mixture Normalization (MN; mixture-normalization.txt section 3.2-3.3, eq. 34-39).

Training, on every minibatch:
1. fit a diagonal GMM to the points (k-means++ seeding + ``em_iters`` EM iterations, ``cbnorm.gmm.fit``),
   outside the autograd graph; ``fit_points`` optionally fits on a random subsample (the paper fits on at
   least 25% of the points) while posteriors nu (eq. 31) are evaluated on every point;
2. posterior-weighted statistics (eq. 35-36): nu_hat_k = nu_k / sum_i nu_ik, mu_k = nu_hat_k^T x,
   sigma_k^2 = nu_hat_k^T (x - mu_k)^2, lambda_k = mean_i nu_ik — differentiable in x, not through nu;
3. x_hat_i = sum_k nu_k(x_i) / sqrt(lambda_k) * (x_i - mu_k) / sqrt(sigma_k^2 + eps)  (eq. 34), then a
   per-channel affine (eq. 37 folds gamma/beta into the statistics; we apply them after, as BatchNorm does);
4. push theta = (lambda, mu, sigma^2) into a queue of the last T fits.

Inference (eq. 38-39): all T x K stored components form one mixture with weights tau^t lambda_k^t,
tau^t = (1 - zeta) / (1 - zeta^T) zeta^(T - t - 1) (renormalised over the filled slots before T fits exist);
components are *not* averaged across fits (their order is arbitrary). Eq. 38 prints the scale as
1 / sqrt(tau^t lambda_k^t); with T identical fits that inflates the output by 1/sqrt(tau) ~ sqrt(T) compared
with training, so we scale each component by 1 / sqrt(lambda_k^t), its weight within its own fit: with all
stored fits equal, eval reproduces the training transform exactly (tested). Before the first fit, eval
normalizes with mean 0 and variance 1, like an untrained BatchNorm.

``posterior="joint"`` (default): one diagonal Gaussian over the C channels per position (the paper);
``posterior="channel"``: an independent 1-D mixture per channel (G = C groups in one batched fit).
With K = 1, MN is BatchNorm in train mode.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import gmm
from .base import NormBase, affine_params, check_positive_int
from .functional import (check_posterior, log_posteriors, mix_affine, normalizing_coefficients,
                         posterior_batch_norm, weighted_moments)

__all__ = ["MixtureNorm"]


class MixtureNorm(NormBase):
    """MN. x (N, C, *S) or (N, L, D) with channel_last; ``num_components`` K; no context.

    ``em_iters`` (2), ``kmeans_iters`` (0), ``queue_size`` T (10), ``zeta`` (0.9), ``fit_fraction`` (share of
    the points the GMM is fitted on; 1.0 = all, the paper uses >= 0.25), ``fit_points`` (cap on that number;
    None = no cap), ``posterior`` ("joint" | "channel"). ``momentum`` is accepted for a uniform constructor but
    MN's inference statistics come from the queue.
    """

    names = ("mn", "mixture", "mixnorm")
    has_mixture = True

    def __init__(self, num_features: int, *, num_components: int = 3, em_iters: int = 2, kmeans_iters: int = 0,
                 queue_size: int = 10, zeta: float = 0.9, fit_points: Optional[int] = None, fit_fraction: float = 1.0,
                 posterior: str = "joint", eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, channel_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, channel_last=channel_last)
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
        self.register_buffer("queue_weights", torch.full(wshape, 1.0 / k))
        self.register_buffer("queue_means", torch.zeros(t, k, c))
        self.register_buffer("queue_vars", torch.ones(t, k, c))
        self.register_buffer("queue_count", torch.tensor(0, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.tensor(0, dtype=torch.long))

    def _needs_batch_statistics(self) -> bool:
        return True

    # ------------------------------------------------------------------ training
    @torch.compiler.disable  # data-dependent sampling and sizes: always eager, also inside torch.compile
    @torch.no_grad()
    def fit_posteriors(self, x3: Tensor) -> Tensor:
        """GMM fit on the minibatch and posteriors nu of every point: (N, K, P) joint or (N, C, P, K) channel.

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
        if budget < m:  # fit on a random subsample, posteriors on every point below
            idx = torch.randperm(m, device=x3.device)[:budget].sort().values  # sorted: sequential reads
            pts_t = pts_t.index_select(1, idx)  # (C, budget)
        pts = pts_t.unsqueeze(-1) if self.posterior == "channel" else pts_t.t().unsqueeze(0)
        try:  # NaN/inf input gives non-finite statistics, refused in _normalize before the queue is touched
            fitted = gmm.fit(pts, self.num_components, iters=self.em_iters, kmeans_iters=self.kmeans_iters,
                             check_finite=False)
        except ValueError as err:
            raise ValueError(f"MixtureNorm: cannot fit a mixture to this minibatch: {err}") from None
        if self.posterior == "channel":  # (C, K, 1) -> (K, C)
            means, vars = fitted.means[..., 0].t(), fitted.vars[..., 0].t()
            logw = torch.log(fitted.weights).t()
        else:
            means, vars, logw = fitted.means[0], fitted.vars[0], torch.log(fitted.weights[0])
        return log_posteriors(x3, means.to(x3.dtype), vars.to(x3.dtype), logw.to(x3.dtype), self.posterior).exp()

    @torch.no_grad()
    def _push(self, lam: Tensor, mean: Tensor, var: Tensor) -> None:
        t = self.queue_ptr % self.queue_size
        onehot = torch.nn.functional.one_hot(t, self.queue_size).bool()
        for buf, new in ((self.queue_weights, lam if lam.dim() == 1 else lam), (self.queue_means, mean),
                         (self.queue_vars, var)):
            mask = onehot.view(-1, *([1] * (buf.dim() - 1)))
            buf.copy_(torch.where(mask, new.detach().to(buf.dtype).unsqueeze(0), buf))
        self.queue_ptr.copy_((self.queue_ptr + 1) % self.queue_size)
        self.queue_count.add_(1)

    # ----------------------------------------------------------------- inference
    def queue_mixture(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The inference mixture of eq. 38: log mixture weights log(tau^t lambda_k^t) ((T*K,) or (T*K, C)),
        per-component scale 1/sqrt(lambda_k^t), means (T*K, C), variances (T*K, C). Empty slots get -inf."""
        t, k = self.queue_size, self.num_components
        ages = (self.queue_ptr - 1 - torch.arange(t, device=self.queue_ptr.device)) % t
        valid = ages < self.queue_count.clamp(max=t)
        tau = torch.where(valid, self.zeta ** ages.to(self.queue_means.dtype), torch.zeros((), dtype=self.queue_means.dtype, device=valid.device))
        tau = tau / tau.sum().clamp_min(1e-30)  # eq. 39, renormalised over filled slots
        lam = self.queue_weights.clamp_min(1e-12)
        tau_b = tau.view(t, *([1] * (lam.dim() - 1)))
        logw = torch.where(valid.view_as(tau_b), torch.log(tau_b.clamp_min(1e-30)) + torch.log(lam),
                           torch.full_like(lam, float("-inf")))
        c = self.num_features
        scale = torch.rsqrt(lam)
        if lam.dim() == 2:
            logw, scale = logw.reshape(t * k), scale.reshape(t * k, 1)
        else:
            logw, scale = logw.reshape(t * k, c), scale.reshape(t * k, c)
        return logw, scale, self.queue_means.reshape(t * k, c), self.queue_vars.reshape(t * k, c)

    def mixture_parameters(self, per_channel: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Inference mixture (eq. 38) over the filled queue: weights (T'K,) (or (T'K, C) with per_channel and
        posterior="channel"), means (T'K, C), variances (T'K, C). Before any fit: one N(0, 1) component."""
        with torch.no_grad():
            if int(self.queue_count) == 0:
                c = self.num_features
                w = torch.ones(1, c) if per_channel else torch.ones(1)
                return w, torch.zeros(1, c), torch.ones(1, c)
            logw, _, mean, var = self.queue_mixture()
            keep = torch.isfinite(logw) if logw.dim() == 1 else torch.isfinite(logw[:, 0])
            w = logw[keep].exp()
            if w.dim() == 2 and not per_channel:
                w = w.mean(dim=1)
            elif w.dim() == 1 and per_channel:
                w = w[:, None].expand(-1, self.num_features)
            return w.clone(), mean[keep].clone(), var[keep].clone()

    # ------------------------------------------------------------------ forward
    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        gain = None if self.weight is None else self.weight.to(x3.dtype)
        shift = None if self.bias is None else self.bias.to(x3.dtype)
        if self.training:
            resp = self.fit_posteriors(x3).to(x3.dtype)
            if self.posterior == "joint":  # eq. 34-36 with a hand-written backward (same numbers)
                y, lam, mean, var = posterior_batch_norm(x3, resp, gain, shift, self.eps)
            else:
                lam, mean, var = weighted_moments(x3, resp, self.posterior)  # eq. 35-36
            self._refuse_nonfinite(lam, mean, var)  # finite but huge input can overflow the fit
            self.num_batches_tracked.add_(1)
            self._push(lam, mean, var)
            if self.posterior == "joint":
                return y
            scale = torch.rsqrt(lam.clamp_min(1e-12))
            scale = scale[:, None] if scale.dim() == 1 else scale
            a, b = normalizing_coefficients(mean, var, self.eps, scale, gain, shift)  # eq. 34
            return mix_affine(x3, resp, a, b, self.posterior)
        if int(self.queue_count) == 0:
            mean = torch.zeros(1, self.num_features, dtype=x3.dtype, device=x3.device)
            a, b = normalizing_coefficients(mean, torch.ones_like(mean), self.eps, None, gain, shift)
            return x3 * a[0][None, :, None] + b[0][None, :, None]
        logw, scale, mean, var = (v.to(x3.dtype) for v in self.queue_mixture())
        resp = log_posteriors(x3, mean, var + self.eps, logw, self.posterior).exp()  # eq. 38
        a, b = normalizing_coefficients(mean, var, self.eps, scale, gain, shift)
        return mix_affine(x3, resp, a, b, self.posterior)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_components={self.num_components}, em_iters={self.em_iters}, "
                                       f"queue_size={self.queue_size}, zeta={self.zeta}, posterior={self.posterior!r}")
