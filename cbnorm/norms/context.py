"""Context Normalization family: CN, CN-X / SCB-Norm, the embedder variant (SCB-Norm-base), CN+ inference.

A context is a known group of samples (a superclass, a domain, a k-means cluster, day/night); each sample
carries a context id k_i in [0, K). Each context is one Gaussian mode of the activations.

* ``ContextNorm`` (``cn``; prior-knowledge-normalization.txt eq. 22-26): per-context minibatch mean and
  biased variance over the positions of the samples in that context, per-context running statistics, prior
  scaling 1/sqrt(lambda_k) and per-context affine (gamma_k, beta_k). A context with fewer than 2 samples in
  the minibatch is normalized with its running statistics (and they are not updated from it). Each context
  counts the batches it was updated from (``running_batches_tracked`` (K,)), so the cumulative average
  (``momentum=None``) of a context is the plain mean of its own batch statistics, however rarely it occurs.
* ``ContextNormX`` (``cnx``/``scb``; Algorithm 3 there, cluster-based-normalization.txt eq. 8): mean and
  variance of each context are learned weights. Variance is parameterized as ``exp(log_var)`` — always
  positive, unlike the papers' raw sigma^2 with a ">= 0" constraint. Train and eval use the same transform.
* ``ContextNormEmbed`` (``cn-embed``/``scb-base``; context-normalization.txt Algorithm 1, eq. 8): one-hot
  context -> linear embedding alpha_r -> linear heads for mu_r and log sigma_r^2 (the paper's head outputs
  sigma^2 directly, which can go negative; we predict its log).

The papers write d x_hat / d sigma^2 = (mu + x) / (2 (sigma^2 + eps)^{3/2}); the correct derivative of
(x - mu)(sigma^2 + eps)^{-1/2} is -(x - mu) / (2 (sigma^2 + eps)^{3/2}). We rely on autograd, and the tests
check the gradient against this closed form and by ``gradcheck``.

CN+ (context-normalization.txt eq. 9), in eval mode with ``context=None`` and ``mixed_inference=True``: every
context is a component with prior lambda_r and Gaussian (mu_r, sigma_r^2) (running statistics for CN,
learned for CN-X/embedder), and the output is the posterior-weighted mix of each context's *full* transform,
``y = sum_r tau_r(x) (gamma_r * s_r * (x - mu_r) / sqrt(sigma_r^2 + eps) + beta_r)``, where ``s_r`` is the same
prior scale used in training. Eq. 9 writes a factor sqrt(T) and batch statistics weighted by tau; we drop
both: sqrt(T) equals 1/sqrt(lambda_r) only for uniform priors and the embedder's training transform (eq. 8)
has no such factor, and batch statistics would make one sample's output depend on the rest of the batch.
With this reading, a sample whose posterior is one-hot on its true context gets exactly its CN output.
Contexts belong to whole samples (an image's superclass or domain), so the CN+ posterior defaults to
``posterior="sample"``: one posterior per sample from the joint log-density of all its positions;
``"joint"`` (per position, as eq. 9 is written per activation) and ``"channel"`` are available.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import (DataInitialized, NormBase, RunningStatsNorm, affine_params, allreduce_sum, check_positive_int,
                   ddp_active)
from .functional import check_posterior, flat_posteriors, log_posteriors, mix_affine, normalizing_coefficients

__all__ = ["ContextNorm", "ContextNormX", "ContextNormEmbed"]


class _ContextBase(NormBase):
    """Shared by the context layers: K contexts with priors lambda (K,), per-context Gaussians (K, C) from
    ``context_statistics()``, eq. 22 / 26 with known ids and CN+ (eq. 9) without. Keywords it does not take
    (``momentum`` for ContextNorm) go on to the next base."""

    uses_context = True
    has_mixture = True

    def __init__(self, num_features: int, *, num_contexts: int, priors: Optional[Sequence[float] | Tensor] = None,
                 prior_scaling: bool = True, mixed_inference: bool = True, posterior: str = "sample",
                 eps: float = 1e-5, affine: bool = True, channel_last: bool = False,
                 per_context_affine: bool = True, **kw) -> None:
        super().__init__(num_features, eps=eps, affine=affine, channel_last=channel_last, **kw)
        self.num_contexts = check_positive_int("num_contexts", num_contexts)
        if priors is None:
            lam = torch.full((num_contexts,), 1.0 / num_contexts)
        else:
            # checked on the host, so the layer can also be built on the "meta" device (sizes without memory)
            host = torch.as_tensor(priors, dtype=torch.float32, device="cpu").flatten()
            if host.numel() != num_contexts:
                raise ValueError(f"priors must have num_contexts={num_contexts} entries, got {host.numel()}")
            if not torch.isfinite(host).all() or (host <= 0).any():
                raise ValueError("priors must be positive and finite (proportion of samples per context)")
            lam = (host / host.sum()).to(torch.empty(0).device)
        self.register_buffer("priors", lam)
        self.prior_scaling = bool(prior_scaling)
        self.mixed_inference = bool(mixed_inference)
        self.posterior = check_posterior(posterior)
        self.per_context_affine = per_context_affine
        affine_params(self, (num_contexts, num_features) if per_context_affine else (num_features,), affine)

    # per-context Gaussians (K, C) used for normalization in eval / learned layers
    def context_statistics(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(priors lambda (K,), means (K, C), variances (K, C)) of the K contexts, in activation units."""
        with torch.no_grad():
            mean, var = self.context_statistics()
            return self.priors.detach().clone(), mean.detach().clone(), var.detach().clone()

    def _prior_scale(self, dtype: torch.dtype) -> Optional[Tensor]:
        return torch.rsqrt(self.priors.to(dtype))[:, None] if self.prior_scaling else None

    def _affine(self, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if self.weight is None:
            return None, None
        w, b = self.weight.to(dtype), self.bias.to(dtype)
        if not self.per_context_affine:
            w = w.expand(self.num_contexts, -1)
            b = b.expand(self.num_contexts, -1)
        return w, b

    def _apply_known(self, x3: Tensor, context: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """Each sample n normalized with its own context's (mean, var) — eq. 22 / 26; per-sample affine.
        An id K (the sentinel of a deferred range check, ``NormBase._check_context``) gives NaN."""
        gain, shift = self._affine(x3.dtype)
        a, b = normalizing_coefficients(mean, var, self.eps, self._prior_scale(x3.dtype), gain, shift)
        a, b = (torch.cat([t, t.new_full((1, t.shape[1]), float("nan"))]) for t in (a, b))
        return torch.addcmul(b[context].unsqueeze(-1), x3, a[context].unsqueeze(-1))

    def _apply_mixed(self, x3: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """CN+ (eq. 9, sound reading in the module docstring)."""
        gain, shift = self._affine(x3.dtype)
        a, b = normalizing_coefficients(mean, var, self.eps, self._prior_scale(x3.dtype), gain, shift)
        logw = torch.log(self.priors.to(x3.dtype))
        resp = log_posteriors(x3, mean, var + self.eps, logw, self.posterior).exp()
        return mix_affine(x3, resp, a, b, self.posterior)

    def _missing_context(self) -> Tensor:
        mode = "training" if self.training else "eval with mixed_inference=False"
        raise ValueError(
            f"{type(self).__name__} needs context ids (N,) in {mode}; pass context=..., or use eval() with "
            f"mixed_inference=True for CN+ inference over all {self.num_contexts} contexts")

    def posteriors(self, x: Tensor) -> Tensor:
        """CN+ posteriors over contexts: (N, K) for posterior="sample", (N*P, K) "joint", (C, N*P, K) "channel"."""
        self._check_input(x)
        with torch.no_grad():
            x3 = self._to_ncp(x).float()
            mean, var = self.context_statistics()
            resp = log_posteriors(x3, mean.float(), var.float() + self.eps,
                                  torch.log(self.priors.float()), self.posterior).exp()
            return flat_posteriors(resp, self.posterior)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", num_contexts={self.num_contexts}, prior_scaling={self.prior_scaling}"
                                       f", posterior={self.posterior!r}")


class ContextNorm(_ContextBase, RunningStatsNorm):
    """CN: per-context minibatch statistics (eq. 22-26). x (N, C, *S) or (N, L, D); context (N,) long.

    Running means and unbiased variances (K, C), with per-context batch counts (K,) for ``momentum=None``.
    ``sync_stats=True`` all-reduces the per-context sums across DDP ranks.
    """

    names = ("cn", "context")

    def __init__(self, num_features: int, *, num_contexts: int, sync_stats: bool = True, **kw) -> None:
        super().__init__(num_features, num_contexts=num_contexts, **kw)
        self.sync_stats = sync_stats
        self._register_running("running_mean", (num_contexts, num_features), 0.0)
        self._register_running("running_var", (num_contexts, num_features), 1.0)
        self._register_running("running_batches_tracked", (num_contexts,), 0, dtype=torch.long)

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Version 1 had one global count: every context gets it (the old behaviour of momentum=None)."""
        super().upgrade_state_dict(state_dict, prefix)
        key, old = prefix + "running_batches_tracked", state_dict.get(prefix + "num_batches_tracked")
        if key not in state_dict and isinstance(old, Tensor) and old.dim() == 0:
            state_dict[key] = old.expand(self.num_contexts).clone()

    def context_statistics(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        if context is None:
            if self.training or not self.mixed_inference:
                self._missing_context()
            return self._apply_mixed(x3, self.running_mean.to(x3.dtype), self.running_var.to(x3.dtype))
        if not self.training:
            return self._apply_known(x3, context, self.running_mean.to(x3.dtype), self.running_var.to(x3.dtype))
        n, c, p = x3.shape
        k = self.num_contexts
        # (N, K) one-hot by comparison (F.one_hot reads the ids' range back to the host); the sentinel id K
        # of a deferred range check (NormBase._check_context) is in no context
        onehot = (context[:, None] == torch.arange(k, device=context.device)).to(x3.dtype)
        samples = allreduce_sum(onehot.sum(0), self.sync_stats)  # (K,) samples per context
        count = samples * p
        sums = allreduce_sum(onehot.t() @ x3.sum(dim=2), self.sync_stats)  # (K, C)   eq. 23
        mean_b = sums / count.clamp_min(1)[:, None]
        centred = x3 - torch.cat([mean_b, mean_b.new_zeros(1, c)])[context].unsqueeze(-1)
        sq = allreduce_sum(onehot.t() @ centred.square().sum(dim=2), self.sync_stats)  # eq. 24
        var_b = sq / count.clamp_min(1)[:, None]
        ok = (samples >= 2)[:, None]  # a context with 0 or 1 sample falls back to running statistics
        mean = torch.where(ok, mean_b, self.running_mean.to(x3.dtype))
        var = torch.where(ok, var_b, self.running_var.to(x3.dtype))
        valid = self._refuse_nonfinite(mean_b.masked_fill(~ok, 0), var_b.masked_fill(~ok, 1))
        ids_ok = (context < k).all()  # a call with an out-of-range id (the sentinel K, deferred) changes no state
        valid = ids_ok if valid is None else valid & ids_ok
        with torch.no_grad():
            unbiased = var_b * (count / (count - 1).clamp_min(1))[:, None]
            self.running_batches_tracked.add_((ok & valid)[:, 0].long())
            self._update_running((self.running_mean, mean_b), (self.running_var, unbiased),  # eq. 25
                                 count=self.running_batches_tracked[:, None], mask=ok, valid=valid)
        return self._apply_known(x3, context, mean, var)


class ContextNormX(DataInitialized, _ContextBase):
    """CN-X / SCB-Norm (PKN Algorithm 3, CB-Norm eq. 8): per-context mean and log-variance learned as weights
    (K, C). x (N, C, *S) or (N, L, D); context (N,) long. No running statistics (no ``momentum``).

    ``init``: "data" (default) sets each context's ``mean`` and ``log_var`` from its samples in the first
    training minibatch (a context absent from it from the whole minibatch), so the layer standardizes from
    step 0; "zeros" (the default before the depth study) starts at mean 0 and variance 1 whatever the scale
    of the activations (the papers initialise randomly): in ResNet-20's last stage the first loss is 147, in
    every layer 4e5 (README, "Depth"). The buffer ``data_initialized`` records the fit (saved; a loaded
    model is never re-initialised); under DDP rank 0's statistics are broadcast.
    """

    names = ("cnx", "scb", "cn-x", "scb-norm")
    max_stacked = 6  # learned statistics: every norm of a width-64 ResNet-18 diverges (README, "Depth")

    def __init__(self, num_features: int, *, num_contexts: int, init: str = "data", **kw) -> None:
        super().__init__(num_features, num_contexts=num_contexts, **kw)
        if init not in ("data", "zeros"):
            raise ValueError(f"init must be 'data' or 'zeros', got {init!r}")
        self.init = init
        self.mean = nn.Parameter(torch.zeros(num_contexts, num_features))
        self.log_var = nn.Parameter(torch.zeros(num_contexts, num_features))
        self._register_data_init()

    def _reset_extra_parameters(self) -> None:
        self.mean.zero_()
        self.log_var.zero_()
        self._forget_initialisation()

    @torch.no_grad()
    def initialize_from(self, x3: Tensor, context: Tensor) -> None:
        """Each context's mean and log-variance from its points in x3 (N, C, P) (context (N,) long); a context
        with no sample gets the whole minibatch's. No host read; non-finite statistics leave the parameters
        as they are (and are refused or counted as everywhere)."""
        k = self.num_contexts
        onehot = torch.nn.functional.one_hot(context.clamp(0, k - 1), k).to(x3.dtype) \
            * (context < k).to(x3.dtype)[:, None]  # (N, K); the deferred-check sentinel K counts nowhere
        p = x3.shape[2]
        count = onehot.sum(0) * p  # (K,)
        s1 = onehot.t() @ x3.sum(2)  # (K, C)
        s2 = onehot.t() @ (x3 * x3).sum(2)
        all_mean = x3.mean(dim=(0, 2))
        all_var = x3.var(dim=(0, 2), unbiased=False)
        safe = count.clamp_min(1)[:, None]
        mean = torch.where(count[:, None] > 0, s1 / safe, all_mean[None])
        var = torch.where(count[:, None] > 0, (s2 / safe - mean * mean).clamp_min(0), all_var[None])
        if ddp_active():
            for t in (mean, var):
                torch.distributed.broadcast(t, src=0)
        ok = self._refuse_nonfinite(mean, var)
        log_var = torch.log(var + self.eps)
        for target, value in ((self.mean, mean), (self.log_var, log_var)):
            target.copy_(value.to(target.dtype) if ok is None else torch.where(ok, value.to(target.dtype), target))
        self.data_initialized.copy_(torch.ones_like(self.data_initialized) if ok is None else ok.long())

    def context_statistics(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.log_var.exp()

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        if self.training and not self._init_checked and context is not None:  # init="data": the first step
            self.initialize_from(x3.detach(), context)
            self._init_checked = True
        mean, var = self.mean.to(x3.dtype), self.log_var.to(x3.dtype).exp()
        if context is None:
            if self.training or not self.mixed_inference:
                self._missing_context()
            return self._apply_mixed(x3, mean, var)
        return self._apply_known(x3, context, mean, var)


class ContextNormEmbed(_ContextBase):
    """SCB-Norm-base / the CN paper's embedder layer (Algorithm 1, eq. 8): onehot(r) -> alpha_r (E,) ->
    (mu_r, log sigma_r^2) (C,). x (N, C, *S) or (N, L, D); context (N,) long. No running statistics.

    ``embed_dim`` is the size of alpha_r (default: num_features). Heads start at zero (mu=0, var=1).
    Defaults follow eq. 8: no prior scaling, one shared per-channel affine.
    """

    names = ("cn-embed", "scb-base", "cn-embedder")

    def __init__(self, num_features: int, *, num_contexts: int, embed_dim: Optional[int] = None,
                 prior_scaling: bool = False, per_context_affine: bool = False, **kw) -> None:
        super().__init__(num_features, num_contexts=num_contexts, prior_scaling=prior_scaling,
                         per_context_affine=per_context_affine, **kw)
        e = num_features if embed_dim is None else check_positive_int("embed_dim", embed_dim)
        self.embedder = nn.Linear(num_contexts, e)
        self.head_mean = nn.Linear(e, num_features)
        self.head_log_var = nn.Linear(e, num_features)
        self._zero_heads()

    def _zero_heads(self) -> None:
        for head in (self.head_mean, self.head_log_var):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def _reset_extra_parameters(self) -> None:
        self.embedder.reset_parameters()
        self._zero_heads()

    def context_statistics(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.num_contexts, device=self.embedder.weight.device, dtype=self.embedder.weight.dtype)
        alpha = self.embedder(eye)  # (K, E): the one-hot of every context at once
        return self.head_mean(alpha), self.head_log_var(alpha).exp()

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        mean, var = self.context_statistics()
        mean, var = mean.to(x3.dtype), var.to(x3.dtype)
        if context is None:
            if self.training or not self.mixed_inference:
                self._missing_context()
            return self._apply_mixed(x3, mean, var)
        return self._apply_known(x3, context, mean, var)
