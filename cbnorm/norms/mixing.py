"""Posterior-weighted mixing of per-component affine transforms, shared by MN, ACN/UCB-Norm and CN+.

Every multi-mode transform of the papers has the form (mixture-normalization.txt eq. 34/38,
cluster-based-normalization.txt eq. 6, context-normalization.txt eq. 9)

    y_i = sum_k tau_k(x_i) * (A_k * x_i + B_k),         tau_k(x) = lambda_k N(x | mu_k, var_k) / sum_j (...)

with per-component, per-channel coefficients A, B of shape (K, C). We never build an (M, K, C) tensor:
``y = x * (tau @ A) + tau @ B`` is two matmuls on (M, K) posteriors. Posteriors are computed in log space
with the Gaussian normaliser (``cbnorm.gmm.component_log_prob``) and a softmax over the component axis.

``posterior`` says what a "point" is:
* ``"joint"``   one diagonal Gaussian over the C channels at each position (the MN paper's reading of
                "dimension D"; default);
* ``"channel"`` one posterior per scalar activation (each channel its own 1-D mixture);
* ``"sample"``  one posterior per sample: the joint log-densities summed over its positions (for
                image-level contexts in CN+).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import gmm

POSTERIORS = ("joint", "channel", "sample")


def check_posterior(posterior: str, allowed: tuple[str, ...] = POSTERIORS) -> str:
    if posterior not in allowed:
        raise ValueError(f"posterior must be one of {allowed}, got {posterior!r}")
    return posterior


def log_posteriors(x3: Tensor, means: Tensor, vars: Tensor, log_weights: Tensor, posterior: str) -> Tensor:
    """Log posteriors log tau_k(x) (eq. 31 / CB-Norm eq. 5) for x3 (N, C, P).

    means, vars: (K, C); log_weights: (K,) or (K, C) (the latter only for ``posterior="channel"``).
    Returns (N*P, K) for "joint", (C, N*P, K) for "channel", (N, K) for "sample".
    """
    n, c, p = x3.shape
    if posterior == "channel":
        pts = x3.permute(1, 0, 2).reshape(c, n * p, 1)
        lp = gmm.component_log_prob(pts, means.t().unsqueeze(-1), vars.t().unsqueeze(-1))  # (C, M, K)
        lw = log_weights.t().unsqueeze(1) if log_weights.dim() == 2 else log_weights
        return torch.log_softmax(lp + lw, dim=-1)
    pts = x3.transpose(1, 2).reshape(1, n * p, c)
    lp = gmm.component_log_prob(pts, means.unsqueeze(0), vars.unsqueeze(0))[0]  # (M, K)
    if posterior == "sample":
        lp = lp.reshape(n, p, -1).sum(dim=1)
    return torch.log_softmax(lp + log_weights, dim=-1)


def mix_affine(x3: Tensor, resp: Tensor, a: Tensor, b: Tensor, posterior: str) -> Tensor:
    """y = sum_k resp_k * (a_k * x + b_k) for x3 (N, C, P), resp as returned (exp'd) by log_posteriors."""
    n, c, p = x3.shape
    if posterior == "channel":  # resp (C, M, K)
        coef_a = torch.einsum("cmk,kc->cm", resp, a).reshape(c, n, p).transpose(0, 1)
        coef_b = torch.einsum("cmk,kc->cm", resp, b).reshape(c, n, p).transpose(0, 1)
    elif posterior == "sample":  # resp (N, K)
        coef_a = (resp @ a).unsqueeze(-1)
        coef_b = (resp @ b).unsqueeze(-1)
    else:  # resp (M, K)
        coef_a = (resp @ a).reshape(n, p, c).transpose(1, 2)
        coef_b = (resp @ b).reshape(n, p, c).transpose(1, 2)
    return torch.addcmul(coef_b, x3, coef_a)


def normalizing_coefficients(means: Tensor, vars: Tensor, eps: float, scale: Tensor | None = None,
                             gain: Tensor | None = None, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A, B (K, C) such that A*x + B = gain * scale * (x - mu) / sqrt(var + eps) + shift.

    ``scale`` broadcastable to (K, C) (e.g. 1/sqrt(lambda_k) as (K, 1)); ``gain``/``shift`` (K, C) or (C,).
    """
    inv = torch.rsqrt(vars + eps)
    if scale is not None:
        inv = inv * scale
    if gain is not None:
        inv = inv * gain
    a = inv
    b = -means * inv
    if shift is not None:
        b = b + shift
    return a, b
