"""ACN / UCB-Norm / UAN: an unsupervised mixture whose parameters are part of the network.

prior-knowledge-normalization.txt Algorithm 5 (ACN), cluster-based-normalization.txt eq. 6 and Algorithm 2
(UCB-Norm), the UAN slides. K components theta_k = (lambda_k, mu_k, sigma_k^2); every point is normalized by
all components weighted by its posterior (eq. 19 / CB-Norm eq. 6):

    y_i = gamma * sum_k tau_k(x_i) / sqrt(lambda_k) * (x_i - mu_k) / sqrt(sigma_k^2 + eps) + beta,
    tau_k(x) = lambda_k N(x | mu_k, sigma_k^2 + eps) / sum_j lambda_j N(x | mu_j, sigma_j^2 + eps).

Readings chosen where the papers are ambiguous or wrong:
* "dimension d": with ``posterior="joint"`` (default) a point is the C-vector at one position and each
  component is a diagonal Gaussian over C channels (mu_k, sigma_k^2 in R^C, lambda_k scalar: 2KC + K
  parameters, as CB-Norm Table VIII counts); ``posterior="channel"`` gives each scalar its own posterior.
* ``update="weight"`` (Algorithm 2 lines 5-7): lambda = softmax(logits) stays on the simplex, sigma^2 =
  exp(log_var) stays positive; gradients reach all three through the normalizer and the posteriors.
  Train and eval apply the same transform.
* ``update="moving_average"`` (Algorithm 2 lines 9-15): the papers average "mean(x_hat^k)" and
  "variance(x_hat^k)" of the *normalized* activations, which are ~0 and ~1 by construction, and the slides
  write alpha_k = sum_n p(k|x_n) x_n without dividing by sum_n p(k|x_n). We take the sound reading: an
  M-step with the current posteriors, lambda_k = mean_i tau_ik, mu_k = sum_i tau_ik x_i / sum_i tau_ik,
  sigma_k^2 the tau-weighted variance. In train mode the minibatch is normalized with these weighted batch
  statistics (differentiable in x, posteriors detached, like MN eq. 35), and theta is updated by
  ``theta <- (1 - momentum) theta + momentum theta_batch`` (PyTorch's convention; the paper's m is
  1 - momentum). Eval uses theta.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import gmm

from .base import DataInitialized, RunningStatsNorm, affine_params, check_positive_int, ddp_active
from .functional import (check_posterior, flat_posteriors, joint_mixture_transform, log_posteriors, mix_affine,
                         normalizing_coefficients, posterior_batch_norm, weighted_moments)

__all__ = ["AdaptiveContextNorm", "INIT_VAR_FLOOR"]

#: init="data": each fitted component's variance is at least this share of its channel's minibatch variance
INIT_VAR_FLOOR = 0.01


class AdaptiveContextNorm(DataInitialized, RunningStatsNorm):
    """ACN / UCB-Norm / UAN (PKN eq. 19, CB-Norm eq. 6). x (N, C, *S) or (N, L, D) with channel_last; no context.

    ``num_components`` K; ``update`` in {"weight", "moving_average"}; ``posterior`` in {"joint", "channel"};
    ``init``: "data" (default) sets lambda, mu, sigma^2 from a GMM fitted (k-means++ and EM, ``cbnorm.gmm``)
    to the first training minibatch, so the components start where the activations are and the layer
    standardizes from step 0 (each variance floored at ``INIT_VAR_FLOOR`` of its channel's); "random" (PKN
    Algorithm 5 line 1, "randomly initialized"; the default before the depth study) draws the means from
    N(0, init_std^2), with unit variances and uniform weights, whatever the scale of the activations: in
    every layer of a ResNet-20 the first loss is 3e4 (README, "Depth"). The buffer ``data_initialized`` records that the fit happened (it is saved, so a
    loaded or resumed model is never re-initialised); under DDP rank 0's fit is broadcast. Neither is clearly
    better on Fashion-MNIST (bench/results/convergence.json).

    ``momentum`` (BatchNorm's convention, None = cumulative average) is the weight of the new minibatch's
    M-step in ``update="moving_average"``; ``update="weight"`` has no running statistics and ignores it.
    ``reset_parameters()`` redraws (or, with init="data", refits on the next training step) the components.

    With ``update="weight"`` only the task loss moves the components afterwards; nothing makes them follow
    the activations as the layers before change (in the committed Fashion-MNIST run they stay near their
    initial fit while conv3's inputs drift), so the trained layer is a learned posterior-weighted affine map
    more than a normalizer. ``update="moving_average"`` tracks the activations.
    """

    names = ("acn", "ucb", "uan", "ucb-norm")
    has_mixture = True

    def __init__(self, num_features: int, *, num_components: int = 3, update: str = "weight",
                 posterior: str = "joint", init: str = "data", init_std: float = 1.0, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, channel_last: bool = False,
                 validate: str = "auto") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, channel_last=channel_last,
                         validate=validate)
        self.num_components = check_positive_int("num_components", num_components)
        self.init_std = float(init_std)
        if update not in ("weight", "moving_average"):
            raise ValueError(f"update must be 'weight' or 'moving_average', got {update!r}")
        self.update = update
        # learned components: every norm of a width-64 ResNet-18 diverges, ResNet-20's train (README, "Depth")
        self.max_stacked = 6 if update == "weight" else None
        self.posterior = check_posterior(posterior, ("joint", "channel"))
        if init not in ("data", "random"):
            raise ValueError(f"init must be 'data' or 'random', got {init!r}")
        self.init = init
        affine_params(self, (num_features,), affine)
        self._register_data_init()
        k, c = num_components, num_features
        if update == "weight":
            self.logits = nn.Parameter(torch.zeros(k))
            self.mean = nn.Parameter(self._initial_means())
            self.log_var = nn.Parameter(torch.zeros(k, c))
        else:
            self._register_running("running_weights", (k,), 1.0 / k)
            self._register_running("running_mean", (k, c), 0.0)
            self.running_mean.copy_(self._initial_means())
            self._register_running("running_var", (k, c), 1.0)

    def _initial_means(self) -> Tensor:
        """Means drawn from N(0, init_std^2) (K, C) (PKN Algorithm 5 line 1); zeros for K = 1."""
        k, c = self.num_components, self.num_features
        return torch.randn(k, c) * self.init_std if k > 1 else torch.zeros(k, c)

    def _reset_extra_running(self) -> None:
        if self.update == "moving_average":
            self.running_mean.copy_(self._initial_means())
            self._forget_initialisation()

    def _reset_extra_parameters(self) -> None:
        if self.update == "weight":
            self.logits.zero_()
            self.mean.copy_(self._initial_means())
            self.log_var.zero_()
            self._forget_initialisation()

    def _needs_batch_statistics(self) -> bool:
        return self.update == "moving_average"

    @torch.no_grad()
    def initialize_from(self, x3: Tensor) -> None:
        """Set (lambda, mu, sigma^2) from a GMM fitted to the points of x3 (N, C, P) (at most 8192 of them).
        No host read (torch.compile traces it; the Python flag that runs it once costs one recompile)."""
        n, c, p = x3.shape
        k = self.num_components
        pts_t = x3.detach().transpose(0, 1).reshape(c, n * p)
        if n * p > 8192:
            pts_t = pts_t.index_select(1, torch.randperm(n * p, device=x3.device)[:8192].sort().values)
        if pts_t.shape[1] < k:
            raise ValueError(f"AdaptiveContextNorm(init='data') needs at least num_components={k} points "
                             f"(N x positions) in its first training minibatch, got {pts_t.shape[1]}")
        now = not self._defers(x3)  # else non-finite input is counted and leaves the components as they are
        try:
            if self.posterior == "channel":  # C independent 1-D fits; lambda shared: averaged over channels
                fitted = gmm.fit(pts_t.unsqueeze(-1), k, iters=3, check_finite=now)
                weights, means, vars = fitted.weights.mean(0), fitted.means[..., 0].t(), fitted.vars[..., 0].t()
            else:
                fitted = gmm.fit(pts_t.t().unsqueeze(0), k, iters=3, check_finite=now)
                weights, means, vars = fitted.weights[0], fitted.means[0], fitted.vars[0]
        except ValueError as err:
            raise ValueError(f"AdaptiveContextNorm: cannot initialise from this minibatch: {err}") from None
        weights = weights / weights.sum()
        # a component fitted to many identical points (zero padding, a black background) gets a variance of ~0:
        # its 1/sigma then turns the first step's gradients into 1e5 (measured: bench/depth_causes.py). Floor
        # every component's variance at INIT_VAR_FLOOR of its channel's variance in the minibatch.
        floor = (INIT_VAR_FLOOR * pts_t.float().var(dim=1)).to(vars.dtype)  # (C,)
        vars = torch.maximum(vars.clamp_min(self.eps), floor[None, :])
        if ddp_active():
            for t in (weights, means, vars):  # every rank starts from rank 0's components
                torch.distributed.broadcast(t, src=0)
        ok = None if now else self._refuse_nonfinite(weights, means, vars)
        targets = ((self.logits, torch.log(weights)), (self.mean, means), (self.log_var, torch.log(vars))) \
            if self.update == "weight" else \
            ((self.running_weights, weights), (self.running_mean, means), (self.running_var, vars))
        for target, value in targets:
            target.copy_(value if ok is None else torch.where(ok, value.to(target.dtype), target))
        self.data_initialized.copy_(torch.ones_like(self.data_initialized) if ok is None else ok.long())

    def component_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(lambda (K,), mu (K, C), sigma^2 (K, C)), differentiable for update='weight'."""
        if self.update == "weight":
            return torch.softmax(self.logits, dim=0), self.mean, self.log_var.exp()
        return self.running_weights, self.running_mean, self.running_var

    def mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(lambda (K,), mu (K, C), sigma^2 (K, C)): the components the posteriors come from."""
        with torch.no_grad():
            lam, mu, var = self.component_parameters()
            return lam.detach().clone(), mu.detach().clone(), var.detach().clone()

    def posteriors(self, x: Tensor) -> Tensor:
        """tau (M, K) for "joint" or (C, M, K) for "channel", M = N * positions (sample-major)."""
        self._check_input(x)
        with torch.no_grad():
            x3 = self._to_ncp(x).float()
            lam, mu, var = (t.float() for t in self.component_parameters())
            resp = log_posteriors(x3, mu, var + self.eps, lam.log(), self.posterior).exp()
            return flat_posteriors(resp, self.posterior)

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        if self.training and self.update == "weight":  # no batch statistics, but a non-finite batch is refused
            # one reduction suffices: the mean square is non-finite for NaN, inf and squares that overflow
            self._refuse_nonfinite(x3.detach().square().mean(dim=(0, 2)))
        if self.training and not self._init_checked:  # init="data": the one-off fit of the first step
            self.initialize_from(x3)
            self._init_checked = True
        lam, mu, var = (t.to(x3.dtype) for t in self.component_parameters())
        log_lam = torch.log(lam)
        gain = None if self.weight is None else self.weight.to(x3.dtype)
        bias = None if self.bias is None else self.bias.to(x3.dtype)
        if self.update == "moving_average" and self.training:
            with torch.no_grad():
                resp = log_posteriors(x3, mu, var + self.eps, log_lam, self.posterior).exp()
            if self.posterior == "joint":
                y, lam_b, mu_b, var_b = posterior_batch_norm(x3, resp, gain, bias, self.eps)
            else:
                lam_b, mu_b, var_b = weighted_moments(x3, resp, self.posterior)
            ok = self._refuse_nonfinite(lam_b, mu_b, var_b)
            lam_k = lam_b if lam_b.dim() == 1 else lam_b.mean(dim=1)
            self._update_running((self.running_weights, lam_k / lam_k.sum()), (self.running_mean, mu_b),
                                 (self.running_var, var_b), valid=ok)
            if self.posterior == "joint":
                return y
            lam_n, mu_n, var_n = lam_b.clamp_min(1e-12), mu_b, var_b
        else:
            lam_n, mu_n, var_n = lam, mu, var
            if self.posterior == "joint":  # posteriors differentiable: one op with a hand-written backward
                a, b = normalizing_coefficients(mu, var, self.eps, torch.rsqrt(lam)[:, None], gain, bias)
                return joint_mixture_transform(x3, mu, var + self.eps, log_lam, a, b)
            resp = log_posteriors(x3, mu, var + self.eps, log_lam, self.posterior).exp()
        scale = torch.rsqrt(lam_n)
        scale = scale[:, None] if scale.dim() == 1 else scale
        a, b = normalizing_coefficients(mu_n, var_n, self.eps, scale, gain, bias)
        return mix_affine(x3, resp, a, b, self.posterior)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_components={self.num_components}, update={self.update!r}"
                                       f", posterior={self.posterior!r}, init={self.init!r}")
