"""Single-mode baselines: BatchNorm in the papers' general form, LayerNorm and GroupNorm adapters.

BatchNorm (mixture-normalization.txt eq. 1-3; prior-knowledge-normalization.txt eq. 1-4): in train mode each
channel is normalized by the mean and biased variance over the set B = [1, N] x [1, H*W] of its positions,
and the running averages are updated (momentum = weight of the new batch, unbiased running variance, exactly
as ``torch.nn.BatchNorm2d``); in eval mode the running statistics are used.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import NormBase, RunningStatsNorm, affine_params, allreduce_sum, check_positive_int, ddp_active

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm"]


class BatchNorm(RunningStatsNorm):
    """BatchNorm, general form (eq. 1-3). ``x``: (N, C, *spatial) or (N, L, D) with ``channel_last``.

    Running mean / unbiased variance (C,) as ``torch.nn.BatchNorm2d``; ``sync_stats=True`` all-reduces the
    statistics across DDP ranks (SyncBatchNorm semantics).
    """

    names = ("bn", "batchnorm")

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, channel_last: bool = False, sync_stats: bool = True,
                 validate: str = "auto") -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, channel_last=channel_last,
                         validate=validate)
        self.sync_stats = sync_stats
        affine_params(self, (num_features,), affine)
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)

    def _needs_batch_statistics(self) -> bool:
        return True

    def _distributed(self) -> bool:
        return self.sync_stats and ddp_active()

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x3.dtype)
        bias = None if self.bias is None else self.bias.to(x3.dtype)
        if not self._distributed():  # one process: PyTorch's native kernels (2.3x faster fwd+bwd on CPU)
            if not self.training:
                return F.batch_norm(x3, self.running_mean.to(x3.dtype), self.running_var.to(x3.dtype), weight,
                                    bias, False, 0.0, self.eps)
            # the kernel's own batch statistics (mean, 1/sqrt(var + eps)); buffers are updated here, after the
            # non-finite check, not by the kernel (var_mean over (0, 2) alone costs as much as the whole step)
            y, mean, invstd = torch.native_batch_norm(x3, weight, bias, None, None, True, 0.0, self.eps)
            with torch.no_grad():
                var = (invstd.double().pow(-2) - self.eps).clamp_min(0).to(mean.dtype)
                ok = self._refuse_nonfinite(mean, var)  # before any buffer changes
                count = x3.shape[0] * x3.shape[2]
                self._update_running((self.running_mean, mean),
                                     (self.running_var, var * (count / max(count - 1, 1))), valid=ok)
            return y
        if self.training:  # DDP: statistics from differentiable all-reduced sums (SyncBatchNorm)
            count = allreduce_sum(x3.new_full((), float(x3.shape[0] * x3.shape[2])), self.sync_stats)  # no H2D copy
            mean = allreduce_sum(x3.sum(dim=(0, 2)), self.sync_stats) / count
            centred = x3 - mean[None, :, None]
            var = allreduce_sum(centred.square().sum(dim=(0, 2)), self.sync_stats) / count
            ok = self._refuse_nonfinite(mean, var)
            self._update_running((self.running_mean, mean),
                                 (self.running_var, var * count / (count - 1).clamp_min(1)), valid=ok)
        else:
            mean = self.running_mean.to(x3.dtype)
            var = self.running_var.to(x3.dtype)
            centred = x3 - mean[None, :, None]
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            return torch.addcmul(bias[None, :, None], centred, (scale * weight)[None, :, None])
        return centred * scale[None, :, None]


class LayerNorm(NormBase):
    """LayerNorm baseline (mixture-normalization.txt eq. 8): statistics per sample over all of (C, H, W).

    For channels-first input this is ``GroupNorm(1, C)`` with a per-channel affine (as in the GroupNorm
    paper); for tokens (N, L, D) with ``channel_last=True`` it is ``torch.nn.LayerNorm(D)`` per token.
    """

    names = ("ln", "layernorm")

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True,
                 channel_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, affine=affine, channel_last=channel_last)
        affine_params(self, (num_features,), affine)

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        w = None if self.weight is None else self.weight.to(x3.dtype)
        b = None if self.bias is None else self.bias.to(x3.dtype)
        if self.channel_last:  # x3 is (N, D, L): normalize each token over D
            return F.layer_norm(x3.transpose(1, 2), (self.num_features,), w, b, self.eps).transpose(1, 2)
        return F.group_norm(x3, 1, w, b, self.eps)


def _default_groups(c: int, limit: int = 32) -> int:
    return max(g for g in range(1, min(c, limit) + 1) if c % g == 0)


class GroupNorm(NormBase):
    """GroupNorm baseline (mixture-normalization.txt eq. 10), wrapping ``torch.nn.functional.group_norm``.

    ``num_groups`` defaults to the largest divisor of C that is at most 32. With ``channel_last=True`` the
    D features of each token are split into groups.
    """

    names = ("gn", "groupnorm")

    def __init__(self, num_features: int, *, num_groups: Optional[int] = None, eps: float = 1e-5,
                 affine: bool = True, channel_last: bool = False) -> None:
        super().__init__(num_features, eps=eps, affine=affine, channel_last=channel_last)
        g = _default_groups(num_features) if num_groups is None else check_positive_int("num_groups", num_groups)
        if num_features % g:
            raise ValueError(f"num_groups={g} must divide num_features={num_features}")
        self.num_groups = g
        affine_params(self, (num_features,), affine)

    def _normalize(self, x3: Tensor, context: Optional[Tensor]) -> Tensor:
        per_group = (self.num_features // self.num_groups) * (1 if self.channel_last else x3.shape[2])
        if per_group == 1:  # (torch's own message says "when training", in eval too, and only for some N)
            raise ValueError(
                f"GroupNorm with num_groups={self.num_groups} on {self.num_features} features leaves one value per "
                f"group for input of shape {tuple(x3.shape)}: normalizing one value gives 0 whatever the input; "
                f"use fewer groups (or spatial input)")
        w = None if self.weight is None else self.weight.to(x3.dtype)
        b = None if self.bias is None else self.bias.to(x3.dtype)
        if self.channel_last:  # (N, D, L) -> treat each token as a sample
            n, d, l = x3.shape
            tokens = x3.transpose(1, 2).reshape(n * l, d, 1)
            out = F.group_norm(tokens, self.num_groups, w, b, self.eps)
            return out.reshape(n, l, d).transpose(1, 2)
        return F.group_norm(x3, self.num_groups, w, b, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"
