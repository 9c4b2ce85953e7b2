"""Mode Normalization (Deecke et al.), the multi-mode baseline (prior-knowledge-normalization.txt eq. 15-16).

A gating network assigns each sample n a soft mode g_n in the simplex: g_n = softmax(W avgpool(x_n) + b).
Each mode k has statistics weighted by the gates (eq. 16),

    N_k = sum_n g_nk * P,  mu_k = sum_n g_nk sum_p x_np / N_k,  sigma_k^2 = sum_n g_nk sum_p (x_np - mu_k)^2 / N_k,

and every sample is normalized by all modes (eq. 15): x_hat_n = sum_k g_nk (x_n - mu_k) / sqrt(sigma_k^2 + eps),
followed by one per-channel affine. Running statistics per mode follow BatchNorm's convention; eval uses them
with the gates of the sample itself. K = 1 is BatchNorm. Gradients flow through the gates (they are part of
the network).

Unbiased running variance. sigma_k^2 is a weighted variance over the N*P points (n, p) with weights
w_np = g_nk, which are reliability weights (how much a point belongs to mode k), not frequencies. Its
unbiased version is sigma_k^2 * V1^2 / (V1^2 - V2) with V1 = sum w = N_k and V2 = sum w^2 = P sum_n g_nk^2:
N P / (N P - 1) for unit gates (BatchNorm's m / (m - 1)), and unchanged when all gates of a mode are scaled,
so a mode whose gate mass N_k is below 1 keeps its variance (the frequency-weights correction
N_k / (N_k - 1), clamped, would shrink it by a factor N_k). V1 and V2 are all-reduced under DDP.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import RunningStatsNorm, affine_params, allreduce_sum, check_positive_int

__all__ = ["ModeNorm", "centered_square_sums"]


class _CenteredSquareSums(torch.autograd.Function):
    """s2 = sum_p (x - shift)^2 per (sample, channel): x3 (N, C, P), shift (C,) a constant -> (N, C), with a
    one-pass backward (dx = 2 (x - shift) ds2, one addcmul, nothing of the size of x saved beyond the input);
    autograd through pow would save x - shift and take two passes of multiplications. The backward is made of
    differentiable ops on the saved input x3 only, so under ``create_graph=True`` autograd differentiates it
    exactly (second derivatives gradgradcheck-tested); the shift is a constant (the layer's output does not
    depend on it)."""

    @staticmethod
    def forward(ctx, x3, shift):
        ctx.save_for_backward(x3, shift)
        return (x3 - shift[None, :, None]).square_().sum(dim=2)

    @staticmethod
    def backward(ctx, g):
        x3, shift = ctx.saved_tensors
        g2 = (2.0 * g).unsqueeze(-1)  # (N, C, 1)
        return torch.addcmul(-shift[None, :, None] * g2, x3, g2), None


def centered_square_sums(x3: Tensor, shift: Tensor) -> Tensor:
    """sum over positions of (x3 - shift)^2: x3 (N, C, P), shift (C,) a constant -> (N, C)."""
    return _CenteredSquareSums.apply(x3, shift.detach())


class ModeNorm(RunningStatsNorm):
    """ModeNorm (eq. 15-16). x (N, C, *S) or (N, L, D) with channel_last; ``num_components`` K modes; no context.

    Gate ``gate`` = Linear(C, K); running per-mode means and unbiased variances (K, C), mode weights (K,).
    """

    names = ("mode", "modenorm")
    has_mixture = True

    def __init__(self, num_features: int, *, num_components: int = 3, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, channel_last: bool = False,
                 sync_stats: bool = True, validate: str = "auto") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, channel_last=channel_last,
                         validate=validate)
        self.num_components = check_positive_int("num_components", num_components)
        self.sync_stats = sync_stats
        affine_params(self, (num_features,), affine)
        self.gate = nn.Linear(num_features, num_components)
        self._register_running("running_mean", (num_components, num_features), 0.0)
        self._register_running("running_var", (num_components, num_features), 1.0)
        self._register_running("running_weights", (num_components,), 1.0 / num_components)

    def _reset_extra_parameters(self) -> None:
        self.gate.reset_parameters()

    def _needs_batch_statistics(self) -> bool:
        return True

    def gates(self, x3: Tensor, sums: Optional[Tensor] = None) -> Tensor:
        """g (N, K): softmax over the K modes of the gate applied to the per-sample channel means
        (``sums``: x3.sum(dim=2) when the caller has it already)."""
        w, b = self.gate.weight.to(x3.dtype), self.gate.bias.to(x3.dtype)
        means = x3.mean(dim=2) if sums is None else sums / x3.shape[2]
        return torch.softmax(means @ w.t() + b, dim=-1)

    def mixture_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """(running mode weights (K,), running means (K, C), running variances (K, C))."""
        return (self.running_weights.detach().clone(), self.running_mean.detach().clone(),
                self.running_var.detach().clone())

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        n, c, p = x3.shape
        sums = x3.sum(dim=2)  # (N, C), one pass shared by the gates, the means and the shift
        g = self.gates(x3, sums)  # (N, K)
        if self.training:
            # V1 = N_k = P sum_n g_nk (differentiable) and V2 = P sum_n g_nk^2 (for the running variance)
            v1, v2 = allreduce_sum(torch.stack([g.sum(0), g.detach().square().sum(0)]) * p, self.sync_stats)
            nk = v1  # (K,)
            mean = allreduce_sum(g.t() @ sums, self.sync_stats) / nk.clamp_min(1e-12)[:, None]
            # sum_p (x - mu_k)^2 = S2 - 2 mu_k S1 + P mu_k^2, computed around the batch mean for accuracy
            # the shift must be the same on every DDP rank for the all-reduced sums to cancel it
            total = allreduce_sum(x3.new_full((), float(n * p)), self.sync_stats)  # a fill: no H2D copy
            shift = allreduce_sum(sums.detach().sum(dim=0), self.sync_stats) / total
            s1 = sums - p * shift  # (N, C) = (x - shift).sum(dim=2)
            s2 = centered_square_sums(x3, shift)
            mc = mean - shift
            sq = allreduce_sum(g.t() @ s2 - 2 * mc * (g.t() @ s1), self.sync_stats) + nk[:, None] * mc * mc
            var = (sq / nk.clamp_min(1e-12)[:, None]).clamp_min(0)
            ok = self._refuse_nonfinite(mean, var, nk)
            with torch.no_grad():
                v1sq = v1.detach().square()
                denom = v1sq - v2  # > 0 unless all the weight sits on one point
                unbiased = torch.where(denom > 0, v1sq / denom.clamp_min(torch.finfo(denom.dtype).tiny), 1.0)
                self._update_running((self.running_mean, mean), (self.running_var, var * unbiased[:, None]),
                                     (self.running_weights, nk / nk.sum()), valid=ok)
        else:
            mean, var = self.running_mean.to(x3.dtype), self.running_var.to(x3.dtype)
        inv = torch.rsqrt(var + self.eps)  # (K, C)
        a = g @ inv  # (N, C)
        b = -(g @ (mean * inv))
        if self.weight is not None:
            w, bias = self.weight.to(x3.dtype), self.bias.to(x3.dtype)
            a, b = a * w, b * w + bias
        return torch.addcmul(b.unsqueeze(-1), x3, a.unsqueeze(-1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_components={self.num_components}"
