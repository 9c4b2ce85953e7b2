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

Speed options (opt-in; they change the numbers, tests/test_sync_compile.py bounds by how much):
``warm_start=True`` starts each minibatch's EM from the previous step's fit (the newest queue slot) instead of
k-means++ seeding (the first step after construction, a reset or loading an empty queue still seeds), with
components that lost their points restarted at random points (``cbnorm.gmm.fit(init=...)``).

Everything in training and eval runs without reading a value back to the host (k-means++ by Gumbel-max
sampling, fixed EM iteration counts, the queue slot as a one-hot mask), so ``torch.compile(fullgraph=True)``
traces the fit too; non-finite statistics are refused at once or, deferred, leave the queue unchanged
(``validate``, ``cbnorm.norms.base``).

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
    that number; None = no cap), ``posterior`` ("joint" | "channel"), ``warm_start`` (False: EM from the
    previous step's fit instead of k-means++), ``validate`` ("auto" | "now" | "deferred", see
    ``cbnorm.norms.base``). No ``momentum``: the running state is the queue of the last T steps (weights and
    means (T, K[, C]), (T, K, C) for fits and moments alike).
    """

    names = ("mn", "mixture", "mixnorm")
    has_mixture = True
    takes_momentum = False

    def __init__(self, num_features: int, *, num_components: int = 3, em_iters: int = 2, kmeans_iters: int = 0,
                 queue_size: int = 10, zeta: float = 0.9, fit_points: Optional[int] = None, fit_fraction: float = 1.0,
                 posterior: str = "joint", warm_start: bool = False, eps: float = 1e-5, affine: bool = True,
                 channel_last: bool = False, validate: str = "auto") -> None:
        super().__init__(num_features, eps=eps, momentum=None, affine=affine, channel_last=channel_last,
                         validate=validate)
        self.num_components = k = check_positive_int("num_components", num_components)
        self.em_iters = check_positive_int("em_iters", em_iters, 0)
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, 0)
        self.queue_size = t = check_positive_int("queue_size", queue_size)
        if not 0.0 < float(zeta) <= 1.0:
            raise ValueError(f"zeta must be in (0, 1], got {zeta!r}")
        self.zeta = float(zeta)
        self.fit_points = None if fit_points is None else check_positive_int("fit_points", fit_points, k)
        self.fit_fraction = fit_fraction
        self.posterior = check_posterior(posterior, ("joint", "channel"))
        self.warm_start = bool(warm_start)
        self._warm_ready = False  # host-side: whether the newest queue slot holds a fit to start EM from
        #: take the posteriors, and their weighted moments (eq. 35-36), from one more E-step and M-step's sums
        #: on the fit's [x^2; x; 1] when the fit saw every point (the same numbers up to rounding as fresh
        #: passes over x3, three passes fewer); False: the fresh passes
        self.posteriors_from_fit = True
        affine_params(self, (num_features,), affine)
        c = num_features
        wshape = (t, k) if self.posterior == "joint" else (t, k, c)
        for part in ("", "fit_"):  # moments (lambda, mu, sigma^2) and fits (w, m, v) of the last T steps
            self._register_running(f"queue_{part}weights", wshape, 1.0 / k)
            self._register_running(f"queue_{part}means", (t, k, c), 0.0)
            self._register_running(f"queue_{part}vars", (t, k, c), 1.0)
        self._register_running("queue_count", (), 0, dtype=torch.long)
        self._register_running("queue_ptr", (), 0, dtype=torch.long)

    @property
    def fit_fraction(self) -> float:
        """Share of the points the GMM is fitted on (0, 1]."""
        return float(self._fit_fraction)

    @fit_fraction.setter
    def fit_fraction(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"fit_fraction must be in (0, 1], got {value!r}")
        # held as its repr: torch.compile guards on a string as a constant, while a float that differs between
        # two layers would become symbolic and the subsample could not be sized (found by bench/speed.py)
        self._fit_fraction = repr(float(value))

    def _needs_batch_statistics(self) -> bool:
        return True

    def _reset_extra_running(self) -> None:
        self._warm_ready = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        count = state_dict.get(prefix + "queue_count")  # read once here, never in forward
        self._warm_ready = isinstance(count, Tensor) and count.numel() == 1 and int(count) > 0

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
    def _fit_budget(self, m: int) -> int:
        """Number of points the GMM is fitted on for a minibatch of m points (a Python int from shapes)."""
        budget = max(self.num_components, int(round(m * self.fit_fraction)))
        return budget if self.fit_points is None else min(budget, self.fit_points)

    def _warm_init(self) -> Optional[gmm.GMM]:
        """The newest queue slot's fit as EM's starting point (``warm_start``), in gmm's (G, K, D) layout; None
        before the first step. An empty queue (a first step refused on the device) gives weights 0: every
        component restarts at a random point."""
        if not (self.warm_start and self._warm_ready):
            return None
        t = ((self.queue_ptr - 1) % self.queue_size).view(1)
        w, m, v = (b.index_select(0, t)[0] for b in (self.queue_fit_weights, self.queue_fit_means, self.queue_fit_vars))
        w = torch.where(self.queue_count > 0, w, torch.zeros_like(w))
        if self.posterior == "channel":  # (K, C) -> (C, K[, 1])
            return gmm.GMM(w.t(), m.t().unsqueeze(-1), v.t().unsqueeze(-1))
        return gmm.GMM(w[None], m[None], v[None])

    def _fit(self, x3: Tensor, posteriors: bool) -> tuple[tuple[Tensor, Tensor, Tensor], Optional[Tensor],
                                                       Optional[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """The fit (log weights, means, variances) on x3 (N, C, P) and, when ``posteriors`` and the fit saw
        every point of a "joint" layer, the posteriors (N, K, P) from one more E-step on the fit's data and
        their weighted sums (center (C,), s1 (K, C), s2 (K, C), nk (K,)) for ``posterior_batch_norm``."""
        n, c, p = x3.shape
        m = n * p
        if m < self.num_components:
            raise ValueError(f"MixtureNorm needs at least num_components={self.num_components} points "
                             f"(N x positions) per minibatch, got {m}")
        budget = self._fit_budget(m)
        # Points as (C, M') contiguous: gmm.fit works on the transposed layout, so handing it the transpose
        # of a contiguous (C, M') tensor spares it a strided copy (4 ms of a 23 ms fit at M=16384, C=128).
        pts_t = x3.transpose(0, 1).reshape(c, m)  # (C, N*P), sample-major
        if budget < m:  # fit on a random subsample, posteriors on every point
            idx = torch.randperm(m, device=x3.device)[:budget].sort().values  # sorted: sequential reads
            pts_t = pts_t.index_select(1, idx)  # (C, budget)
        pts = pts_t.unsqueeze(-1) if self.posterior == "channel" else pts_t.t().unsqueeze(0)
        # NaN/inf input gives non-finite statistics, refused in _normalize before the queue is touched
        kw = dict(iters=self.em_iters, kmeans_iters=self.kmeans_iters, check_finite=False, init=self._warm_init())
        resp = sums = None
        if posteriors and budget == m and self.posterior == "joint":
            out = gmm.fit_with_statistics(pts, self.num_components, **kw)  # resp (1, K, N*P)
            fitted = out.gmm
            resp = out.resp[0].view(-1, n, p).transpose(0, 1).to(x3.dtype).contiguous()  # (N, K, P)
            sums = tuple(t.to(x3.dtype) for t in (out.shift[0, 0], out.sx[0], out.sxx[0], out.nk[0]))
        else:
            fitted = gmm.fit(pts, self.num_components, **kw)
        if self.posterior == "channel":  # (C, K, 1) -> (K, C)
            means, vars, logw = fitted.means[..., 0].t(), fitted.vars[..., 0].t(), torch.log(fitted.weights).t()
        else:
            means, vars, logw = fitted.means[0], fitted.vars[0], torch.log(fitted.weights[0])
        return (logw.to(x3.dtype), means.to(x3.dtype), vars.to(x3.dtype)), resp, sums

    @torch.no_grad()
    def fit_mixture(self, x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """GMM fit on the minibatch x3 (N, C, P): (log weights (K,) joint or (K, C) channel, means (K, C),
        variances (K, C)) in x3's dtype; the posteriors of eq. 31 come from these. k-means++ seeding (or the
        previous fit with ``warm_start``) and ``em_iters`` EM iterations on ``fit_fraction`` of the points
        (at most ``fit_points``), with no host synchronisation (traced whole by torch.compile)."""
        return self._fit(x3, posteriors=False)[0]

    @torch.no_grad()
    def fit_posteriors(self, x3: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The fit (``fit_mixture``) and the posteriors nu (eq. 31) of every point of x3 (N, C, P) under it:
        (nu (N, K, P) for "joint" or (N, C, P, K) for "channel", (log weights, means, variances)). Constants
        for autograd, as MN prescribes."""
        return self._compute_posteriors(x3)[:2]

    def _overridden(self, name: str) -> bool:
        """Whether method ``name`` is replaced, by a subclass or on the instance (as the reference tests do)."""
        return getattr(type(self), name) is not getattr(MixtureNorm, name) or name in vars(self)

    @torch.no_grad()
    def _fit_posteriors(self, x3: Tensor):
        """What training uses: ``fit_posteriors`` (or its replacement) and, when the fit computed them, the
        posteriors' weighted sums (else None)."""
        if self._overridden("fit_posteriors"):
            return (*self.fit_posteriors(x3), None)
        return self._compute_posteriors(x3)

    @torch.no_grad()
    def _compute_posteriors(self, x3: Tensor):
        """(posteriors, fit, sums or None); with ``fit_mixture`` replaced, its fit and a fresh pass."""
        if self._overridden("fit_mixture"):  # its fit, and the posteriors from a fresh pass
            fit, resp, sums = self.fit_mixture(x3), None, None
        else:
            fit, resp, sums = self._fit(x3, posteriors=self.posteriors_from_fit)
        if resp is None:
            resp = log_posteriors(x3, fit[1], fit[2], fit[0], self.posterior).exp()
        return resp, fit, sums

    @torch.no_grad()
    def _push(self, fit: tuple[Tensor, Tensor, Tensor], moments: tuple[Tensor, Tensor, Tensor],
              valid: Optional[Tensor] = None) -> None:
        """Store one step in the queue slot ``queue_ptr``: fit (w, m, v) and moments (lambda, mu, sigma^2).
        ``valid`` (0-dim bool, a deferred check) False leaves the queue as it was."""
        t = self.queue_ptr % self.queue_size
        onehot = torch.arange(self.queue_size, device=t.device) == t  # (F.one_hot reads t back to the host)
        if valid is not None:
            onehot = onehot & valid
        bufs = (self.queue_fit_weights, self.queue_fit_means, self.queue_fit_vars, self.queue_weights,
                self.queue_means, self.queue_vars)
        for buf, new in zip(bufs, (*fit, *moments)):
            mask = onehot.view(-1, *([1] * (buf.dim() - 1)))
            buf.copy_(torch.where(mask, new.detach().to(buf.dtype).unsqueeze(0), buf))
        step = 1 if valid is None else valid.long()
        self.queue_ptr.copy_((self.queue_ptr + step) % self.queue_size)
        self.queue_count.add_(step)
        if self.warm_start:
            self._warm_ready = True

    # ----------------------------------------------------------------- inference
    def queue_mixture(self) -> QueueMixture:
        """The inference mixture of eq. 38 over the T*K queued components (see ``QueueMixture``).

        Before the first step (empty queue) slot 0 holds K copies of N(0, 1) with weight 1 / K, unit scale
        and moments (0, 1): the transform of an untrained BatchNorm, chosen on the device (no host read)."""
        t, k, c = self.queue_size, self.num_components, self.num_features
        dtype = self.queue_means.dtype
        slots = torch.arange(t, device=self.queue_ptr.device)
        ages = (self.queue_ptr - 1 - slots) % t
        empty = self.queue_count == 0
        valid = torch.where(empty, slots == 0, ages < self.queue_count.clamp(max=t))
        ages = torch.where(empty, torch.zeros_like(ages), ages)
        tau = torch.where(valid, self.zeta ** ages.to(dtype), torch.zeros((), dtype=dtype, device=valid.device))
        tau = tau / tau.sum().clamp_min(1e-30)  # eq. 39, renormalised over filled slots

        def fill(buf: Tensor, value: float) -> Tensor:  # the untrained values while the queue is empty
            return torch.where(empty, torch.full_like(buf, value), buf)

        w = fill(self.queue_fit_weights, 1.0 / k).clamp_min(1e-12)
        tau_b = tau.view(t, *([1] * (w.dim() - 1)))
        logw = torch.where(valid.view_as(tau_b), torch.log(tau_b.clamp_min(1e-30)) + torch.log(w),
                           torch.full_like(w, float("-inf")))
        scale = torch.where(empty, torch.ones_like(self.queue_weights),
                            torch.rsqrt(self.queue_weights.clamp_min(1e-12)))
        shape = (t * k,) if w.dim() == 2 else (t * k, c)
        return QueueMixture(logw.reshape(shape), fill(self.queue_fit_means, 0.0).reshape(t * k, c),
                            fill(self.queue_fit_vars, 1.0).reshape(t * k, c), scale.reshape(t * k, -1),
                            fill(self.queue_means, 0.0).reshape(t * k, c), fill(self.queue_vars, 1.0).reshape(t * k, c))

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
            resp, fit, sums = self._fit_posteriors(x3)
            if self.posterior == "joint":  # eq. 34-36 with a hand-written backward (same numbers)
                y, lam, mean, var = posterior_batch_norm(x3, resp, gain, shift, self.eps, sums)
            else:
                lam, mean, var = weighted_moments(x3, resp, self.posterior)  # eq. 35-36
            ok = self._refuse_nonfinite(lam, mean, var, *fit)  # finite but huge input can overflow the fit
            self._update_running(valid=ok)
            self._push((fit[0].exp(), fit[1], fit[2]), (lam, mean, var), valid=ok)
            if self.posterior == "joint":
                return y
            scale = torch.rsqrt(lam.clamp_min(1e-12))
            a, b = normalizing_coefficients(mean, var, self.eps, scale, gain, shift)  # eq. 34
            return mix_affine(x3, resp, a, b, self.posterior)
        mix = QueueMixture(*(v.to(x3.dtype) for v in self.queue_mixture()))
        resp = log_posteriors(x3, mix.means, mix.vars, mix.log_weights, self.posterior).exp()  # eq. 38
        a, b = normalizing_coefficients(mix.norm_means, mix.norm_vars, self.eps, mix.scale, gain, shift)
        return mix_affine(x3, resp, a, b, self.posterior)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_components={self.num_components}, em_iters={self.em_iters}, "
                                       f"queue_size={self.queue_size}, zeta={self.zeta}, posterior={self.posterior!r}")
