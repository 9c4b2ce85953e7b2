"""Math shared by several layers: posterior-weighted moments, posterior mixing, hand-written backwards.

Used by MixtureNorm (``mixture.py``), ACN / UCB-Norm (``adaptive.py``) and CN+ (``context.py``); no layer
module imports another. Shapes: x3 is the canonical (N, C, P) view (P positions per sample); K components.

Posterior-weighted moments (MN eq. 35-36, ACN's moving-average M-step): ``weighted_moments`` (autograd) and
``posterior_batch_norm`` (the whole eq. 34-36 transform with a hand-written backward).

Posterior mixing. Every multi-mode transform of the papers has the form (mixture-normalization.txt eq. 34/38,
cluster-based-normalization.txt eq. 6, context-normalization.txt eq. 9)

    y_i = sum_k tau_k(x_i) * (A_k * x_i + B_k),         tau_k(x) = lambda_k N(x | mu_k, var_k) / sum_j (...)

with per-component, per-channel coefficients A, B of shape (K, C). We never build an (M, K, C) tensor:
``y = x * (tau @ A) + tau @ B`` is two matmuls on (M, K) posteriors. Posteriors are computed in log space
with the Gaussian normaliser and a softmax over the component axis, on the channels-first layout.

Two formulations of the same numbers (``_compiling()`` picks one; both are tested against each other):
* eager: batched matmuls ``torch.bmm(W.expand(N, K, C), x3)`` — an explicit bmm over the N samples, because
  ``torch.matmul((K, C), (N, C, P))`` folds a transposed copy of x3 in forward and backward (2.3x slower
  for fwd+bwd at N=256, C=128, P=64, K=3 on one CPU thread);
* under ``torch.compile``: broadcast reductions over an (N, K, C, P) expression, which inductor fuses into
  one loop over the data without materialising it (ACN fwd+bwd at the shape above: 4.3x BatchNorm eager,
  1.25x compiled). In eager mode that expression would be an (M, K, C) temporary, so it is never used there.

``posterior`` says what a "point" is:
* ``"joint"``   one diagonal Gaussian over the C channels at each position (the MN paper's reading of
                "dimension D"; default);
* ``"channel"`` one posterior per scalar activation (each channel its own 1-D mixture);
* ``"sample"``  one posterior per sample: the joint log-densities summed over its positions (for
                image-level contexts in CN+).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)

POSTERIORS = ("joint", "channel", "sample")


def check_posterior(posterior: str, allowed: tuple[str, ...] = POSTERIORS) -> str:
    if posterior not in allowed:
        raise ValueError(f"posterior must be one of {allowed}, got {posterior!r}")
    return posterior


def _compiling() -> bool:
    """True while dynamo traces (torch.compile): use the fusable broadcast formulation."""
    return torch.compiler.is_compiling()


def batched_left(w: Tensor, x3: Tensor) -> Tensor:
    """(R, S) @ (N, S, P) -> (N, R, P) as one explicit bmm over N (no transposed copy of x3)."""
    return torch.bmm(w.expand(x3.shape[0], *w.shape), x3)


def joint_log_prob(x3: Tensor, means: Tensor, vars: Tensor) -> Tensor:
    """log N(x_np | mu_k, diag var_k) over the C channels of every position: x3 (N, C, P) -> (N, K, P).

    Matmul expansion sum_c x^2/var - 2 x mu/var + mu^2/var on the channels-first layout (no transposed
    copy of x, no (N, K, C, P) tensor), after shifting by the mean of the component means so float32 stays
    accurate far from 0; the Mahalanobis term is clamped to [0, finfo.max] (so activations whose squares
    overflow give a very unlikely point, never NaN posteriors). Includes the Gaussian normaliser.
    """
    prec = torch.reciprocal(vars)  # (K, C)
    lognorm = -0.5 * (vars.shape[-1] * _LOG_2PI + torch.log(vars).sum(-1))  # (K,)
    big = torch.finfo(x3.dtype).max  # |x| > ~1e19 overflows x^2 in float32: cap, never inf - inf = NaN
    if _compiling():  # exact squared distances; fused by inductor, never materialised
        d = x3[:, None, :, :] - means[None, :, :, None]  # (N, K, C, P) expression
        return lognorm[None, :, None] - 0.5 * (d * d * prec[None, :, :, None]).sum(dim=2).clamp_max(big)
    shift = means.mean(dim=0)  # (C,)
    xs = x3 - shift[None, :, None]
    mu = means - shift
    mp = mu * prec
    maha = batched_left(prec, xs * xs) - 2.0 * batched_left(mp, xs) + (mu * mp).sum(-1)[None, :, None]
    return lognorm[None, :, None] - 0.5 * maha.clamp(0.0, big)


def log_posteriors(x3: Tensor, means: Tensor, vars: Tensor, log_weights: Tensor, posterior: str) -> Tensor:
    """Log posteriors log tau_k(x) (MN eq. 31 / CB-Norm eq. 5) for x3 (N, C, P), softmax over components.

    means, vars: (K, C); log_weights: (K,) or (K, C) (the latter only for ``posterior="channel"``).
    Returns (N, K, P) for "joint", (N, C, P, K) for "channel", (N, K) for "sample".
    """
    if posterior == "channel":
        mu = means.t()[None, :, None, :]  # (1, C, 1, K)
        var = vars.t()[None, :, None, :]
        lp = -0.5 * ((x3.unsqueeze(-1) - mu).square() / var).clamp_max(torch.finfo(x3.dtype).max) \
            - 0.5 * torch.log(2 * math.pi * var)
        lw = log_weights.t()[None, :, None, :] if log_weights.dim() == 2 else log_weights
        return torch.log_softmax(lp + lw, dim=-1)
    lp = joint_log_prob(x3, means, vars)  # (N, K, P)
    if posterior == "sample":  # the sum over positions can overflow to -inf for huge x: keep it finite
        return torch.log_softmax(lp.sum(dim=2).clamp_min(torch.finfo(x3.dtype).min) + log_weights, dim=-1)
    return torch.log_softmax(lp + log_weights[None, :, None], dim=1)


def flat_posteriors(resp: Tensor, posterior: str) -> Tensor:
    """Public layout of posteriors: (M, K) for "joint" (M = N*P, sample-major), (C, M, K) for "channel",
    (N, K) for "sample"."""
    if posterior == "joint":
        return resp.transpose(1, 2).reshape(-1, resp.shape[1])
    if posterior == "channel":
        n, c, p, k = resp.shape
        return resp.permute(1, 0, 2, 3).reshape(c, n * p, k)
    return resp


def mix_affine(x3: Tensor, resp: Tensor, a: Tensor, b: Tensor, posterior: str) -> Tensor:
    """y = sum_k resp_k * (a_k * x + b_k) for x3 (N, C, P), resp as returned (exp'd) by log_posteriors."""
    if posterior == "channel":  # resp (N, C, P, K)
        coef_a = (resp * a.t()[None, :, None, :]).sum(-1)
        coef_b = (resp * b.t()[None, :, None, :]).sum(-1)
    elif posterior == "sample":  # resp (N, K)
        coef_a = (resp @ a).unsqueeze(-1)
        coef_b = (resp @ b).unsqueeze(-1)
    elif _compiling():  # fused by inductor: sum over K of an (N, K, C, P) expression
        r = resp[:, :, None, :]
        return (r * (a[None, :, :, None] * x3[:, None, :, :] + b[None, :, :, None])).sum(dim=1)
    else:  # resp (N, K, P): (C, K) @ (N, K, P) -> (N, C, P), channels-first like x3
        coef_a = batched_left(a.t(), resp)
        coef_b = batched_left(b.t(), resp)
    return torch.addcmul(coef_b, x3, coef_a)


def _double_backward(fn, inputs: tuple, grad_outputs: tuple, needs: tuple) -> tuple:
    """The backward of a hand-written Function when a second derivative is wanted (``create_graph=True``,
    gradient penalties, ``gradgradcheck``): ``fn(*inputs)`` recomputed with autograd from the saved *inputs*
    and differentiated with ``create_graph=True``. Each input is differentiated through an alias
    (``view_as``), so the result is the partial derivative even when one input is computed from another
    (ACN's m = mu / var and 1 / var), while second derivatives still reach the originals. ``needs``:
    ``ctx.needs_input_grad``."""
    with torch.enable_grad():
        alias = tuple(t.view_as(t) if n else t for t, n in zip(inputs, needs))
        outputs = fn(*alias)
    want = [t for t, n in zip(alias, needs) if n]
    got = iter(torch.autograd.grad(outputs, want, grad_outputs, create_graph=True, allow_unused=True))
    return tuple(next(got) if n else None for n in needs)


def _joint_mixture(x3, shift, prec, m, const, c0, a, b, fast: bool):
    """The forward of ``_JointMixtureTransform``: (y (N, C, P), xs, xs2, tau (N, K, P), live (N, K, P)).

    ``fast`` (inside the Function's forward, no autograd): in-place clamps. Otherwise out-of-place, so that
    autograd differentiates it (the double-backward path); the clamps then give zero gradient where clamped,
    as the hand-written backward does."""
    big = torch.finfo(x3.dtype).max
    xs = x3 - shift[None, :, None]
    xs2 = xs * xs
    xs2 = xs2.clamp_max_(big) if fast else xs2.clamp_max(big)  # finite: 0 * x^2 stays 0 in the matmuls
    maha = batched_left(prec, xs2) - 2.0 * batched_left(m, xs) + const[None, :, None]
    live = (maha >= 0) & (maha <= big) if fast else None
    maha = maha.clamp_(0, big) if fast else maha.clamp(0, big)
    tau = torch.softmax(c0[None, :, None] - 0.5 * maha, dim=1)  # (N, K, P)
    y = torch.addcmul(batched_left(b.t(), tau), x3, batched_left(a.t(), tau))
    return y, xs, xs2, tau, live


class _JointMixtureTransform(torch.autograd.Function):
    """y = sum_k tau_k(x) (A_k x + B_k) with tau = softmax_k(c0_k - maha_k / 2) for the "joint" posterior
    (CB-Norm eq. 6 / PKN eq. 19), x3 (N, C, P), coefficients (K, C), differentiable in x and in every
    coefficient. The first backward is hand-written (the same numbers as ``log_posteriors`` + ``mix_affine``
    under autograd, tested): it reuses the saved centred x and x^2 instead of re-deriving the matmul
    expansion's graph. maha_k = prec_k . xs^2 - 2 m_k . xs + const_k on xs = x - shift (see
    ``joint_log_prob``), clamped to [0, finfo.max] with zero gradient where clamped. Under
    ``create_graph=True`` the backward differentiates the same formula recomputed from the saved inputs
    with autograd, so second derivatives are exact (gradgradcheck-tested)."""

    @staticmethod
    def forward(ctx, x3, shift, prec, m, const, c0, a, b):
        y, xs, xs2, tau, live = _joint_mixture(x3, shift, prec, m, const, c0, a, b, fast=True)
        ctx.save_for_backward(x3, shift, prec, m, const, c0, a, b, xs, xs2, tau, live)
        return y

    @staticmethod
    def backward(ctx, gy):
        x3, shift, prec, m, const, c0, a, b, xs, xs2, tau, live = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return _double_backward(lambda *t: _joint_mixture(*t, fast=False)[0],
                                    (x3, shift, prec, m, const, c0, a, b), (gy,), ctx.needs_input_grad)
        gx = gy * x3
        rt = tau.transpose(1, 2)
        dtau = batched_left(a, gx) + batched_left(b, gy)  # (N, K, P)
        da = torch.bmm(gx, rt).sum(0).t()  # (K, C)
        db = torch.bmm(gy, rt).sum(0).t()
        dl = tau * (dtau - (tau * dtau).sum(1, keepdim=True))  # softmax backward
        dmaha = torch.where(live, -0.5 * dl, torch.zeros_like(dl))
        dmt = dmaha.transpose(1, 2)
        dprec = torch.bmm(xs2, dmt).sum(0).t()
        dm = -2.0 * torch.bmm(xs, dmt).sum(0).t()
        dx = torch.addcmul(batched_left(-2.0 * m.t(), dmaha), gy, batched_left(a.t(), tau))
        dx.addcmul_(xs, batched_left(2.0 * prec.t(), dmaha))
        return dx, None, dprec, dm, dmaha.sum(dim=(0, 2)), dl.sum(dim=(0, 2)), da, db


def joint_mixture_transform(x3: Tensor, means: Tensor, vars: Tensor, log_weights: Tensor, a: Tensor,
                            b: Tensor) -> Tensor:
    """``mix_affine(x3, log_posteriors(x3, means, vars, log_weights, "joint").exp(), a, b, "joint")`` for x3
    (N, C, P), means/vars/a/b (K, C), log_weights (K,): CB-Norm eq. 6 / PKN eq. 19 with the posteriors
    differentiated too (ACN's ``update="weight"``). Under torch.compile the composed (fusable) form is used."""
    if _compiling():
        return mix_affine(x3, log_posteriors(x3, means, vars, log_weights, "joint").exp(), a, b, "joint")
    prec = torch.reciprocal(vars)
    shift = means.detach().mean(dim=0)  # (C,) constant: keeps the expansion accurate far from 0
    mu = means - shift
    m = mu * prec
    c0 = -0.5 * (vars.shape[-1] * _LOG_2PI + torch.log(vars).sum(-1)) + log_weights
    return _JointMixtureTransform.apply(x3, shift, prec, m, (mu * m).sum(-1), c0, a, b)


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


# ------------------------------------------------------------------------- posterior-weighted moments
def weighted_moments(x3: Tensor, resp: Tensor, posterior: str) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior-weighted statistics (MN eq. 35-36): lambda (K,) or (K, C), mean (K, C), biased var (K, C).

    x3 (N, C, P); resp (N, K, P) for "joint" or (N, C, P, K) for "channel". lambda_k = mean_i nu_ik,
    mu_k = sum_i nu_hat_ik x_i, sigma_k^2 = sum_i nu_hat_ik (x_i - mu_k)^2 with nu_hat_ik = nu_ik / sum_j nu_jk.
    Differentiable in x3. Moments are taken around the detached batch mean (limits cancellation in
    E[x^2] - E[x]^2), with batched matmuls on the channels-first layout, never an (M, K, C) tensor.
    """
    n, c, p = x3.shape
    shift = x3.detach().mean(dim=(0, 2))  # (C,)
    xc = x3 - shift[None, :, None]
    if posterior == "channel":
        nk = resp.sum(dim=(0, 2))  # (C, K)
        inv = torch.reciprocal(nk.clamp_min(1e-12))
        m1 = (xc.unsqueeze(-1) * resp).sum(dim=(0, 2)) * inv  # (C, K)
        m2 = (xc.square().unsqueeze(-1) * resp).sum(dim=(0, 2)) * inv
        lam, m1, m2 = (nk / (n * p)).t(), m1.t(), m2.t()
    else:
        nk = resp.sum(dim=(0, 2))  # (K,)
        rt = resp.transpose(1, 2)  # (N, P, K) view
        inv = torch.reciprocal(nk.clamp_min(1e-12))[:, None]
        m1 = torch.bmm(xc, rt).sum(0).t() * inv  # (K, C)
        m2 = torch.bmm(xc * xc, rt).sum(0).t() * inv
        lam = nk / (n * p)
    var = (m2 - m1 * m1).clamp_min(0)
    return lam, m1 + shift, var


def posterior_batch_norm_reference(x3: Tensor, resp: Tensor, gain: Optional[Tensor], bias: Optional[Tensor],
                                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``posterior_batch_norm`` composed of autograd ops (``weighted_moments`` + ``normalizing_coefficients``
    + ``mix_affine``): what its double backward differentiates, and the tests' reference."""
    lam, mean, var = weighted_moments(x3, resp, "joint")
    scale = torch.rsqrt(lam.clamp_min(1e-12))[:, None]
    a, b = normalizing_coefficients(mean, var, eps, scale, gain, bias)
    return mix_affine(x3, resp, a, b, "joint"), lam, mean, var


class _PosteriorBatchNorm(torch.autograd.Function):
    """MN eq. 34-36 (and ACN's moving-average train step) for ``posterior="joint"``, x3 (N, C, P), posteriors
    (N, K, P) constant (detached, as MN prescribes), with a hand-written first backward: the same numbers as
    ``posterior_batch_norm_reference`` under autograd (tested, and gradchecked in float64) in about half the
    passes over the (N, C, P) data: forward 2 moment reads, 2 coefficient writes and one fused output;
    backward 2 reads for the coefficient gradients and one stacked (N, 3C, P) bmm for everything that flows
    back to x (on the saved centred copy xs). The input x3 is saved as well (one more activation held
    when nothing else keeps the input alive) for the double backward: under ``create_graph=True`` it
    differentiates ``posterior_batch_norm_reference`` recomputed from the saved inputs, so second derivatives
    are exact (gradgradcheck-tested)."""

    @staticmethod
    def forward(ctx, x3, resp, gain, bias, eps, sums=None):
        n, c, p = x3.shape
        if sums is None:
            center = x3.sum(dim=2).mean(dim=0) / p  # (C,) batch mean, a constant: limits cancellation below
            xs = x3 - center[None, :, None]
            rt = resp.transpose(1, 2)  # (N, P, K) view
            nk = resp.sum(dim=(0, 2))  # (K,)
            s1, s2 = torch.bmm(xs, rt).sum(0).t(), torch.bmm(xs * xs, rt).sum(0).t()  # (K, C), around center
        else:  # the same sums, computed elsewhere (MN: by the GMM fit, on its [x^2; x; 1])
            center, s1, s2, nk = sums
            xs = x3 - center[None, :, None]
        inv_nk = torch.reciprocal(nk.clamp_min(1e-12))[:, None]
        m1 = s1 * inv_nk
        raw_var = s2 * inv_nk - m1 * m1
        var = raw_var.clamp_min(0)
        lam = nk / (n * p)
        scale = torch.rsqrt(lam.clamp_min(1e-12))[:, None]  # 1 / sqrt(lambda_k), eq. 34
        inv = torch.rsqrt(var + eps)
        a = inv * scale if gain is None else inv * scale * gain
        b = -m1 * a if bias is None else bias - m1 * a
        y = torch.addcmul(batched_left(b.t(), resp), xs, batched_left(a.t(), resp))  # eq. 34 / 37
        empty = inv.new_empty(0)
        # the inputs for the double backward, and the centred copy xs for the fast one
        ctx.save_for_backward(x3, resp, gain if gain is not None else empty, bias if bias is not None else empty,
                              xs, a, m1, inv, scale, inv_nk, raw_var >= 0)
        ctx.has_gain, ctx.has_bias, ctx.eps = gain is not None, bias is not None, eps
        ctx.mark_non_differentiable(lam)
        return y, lam, m1 + center, var

    @staticmethod
    def backward(ctx, gy, _glam, gmean, gvar):
        x3, resp, gain, bias, xs, a, m1, inv, scale, inv_nk, var_live = ctx.saved_tensors
        gain = gain if ctx.has_gain else None
        bias = bias if ctx.has_bias else None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            def composed(*t):
                y, _, mean, var = posterior_batch_norm_reference(*t, ctx.eps)
                return y, mean, var

            return (*_double_backward(composed, (x3, resp, gain, bias), (gy, gmean, gvar),
                                      ctx.needs_input_grad[:4]), None, None)
        c = x3.shape[1]
        rt = resp.transpose(1, 2)
        da = torch.bmm(gy * xs, rt).sum(0).t()  # dL/dA (K, C)
        db = torch.bmm(gy, rt).sum(0).t()  # dL/dB (K, C)
        dgain = dbias = None
        if ctx.has_bias:
            dbias = db.sum(0)
        da_tot = da - db * m1  # B = bias - m1 * A
        dm1 = -db * a + gmean  # the returned mean m1 + center is differentiable too
        dinv = da_tot * scale
        if ctx.has_gain:
            dgain = (dinv * inv).sum(0)
            dinv = dinv * gain
        dvar = torch.where(var_live, dinv * (-0.5) * inv * inv * inv + gvar, torch.zeros_like(dinv))
        ds2 = dvar * inv_nk  # var = s2 / n_k - m1^2,  m1 = s1 / n_k
        ds1 = (dm1 - 2.0 * m1 * dvar) * inv_nk
        coef = batched_left(torch.cat([a, 2.0 * ds2, ds1], dim=1).t(), resp)  # (N, 3C, P)
        dx = torch.addcmul(coef[:, 2 * c:], gy, coef[:, :c])
        dx.addcmul_(xs, coef[:, c:2 * c])
        return dx, None, dgain, dbias, None, None


def posterior_batch_norm(x3: Tensor, resp: Tensor, gain: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, sums: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = gain * sum_k tau_k / sqrt(lambda_k) (x - mu_k) / sqrt(sigma_k^2 + eps) + bias with the
    posterior-weighted minibatch statistics of MN eq. 34-36, for x3 (N, C, P) and constant posteriors resp
    (N, K, P). Returns (y (N, C, P), lambda (K,), mu (K, C), sigma^2 (K, C)); y, mu, sigma^2 are
    differentiable in x3 (and y in gain, bias (C,)), to any order.

    ``sums`` = (center (C,), s1 (K, C), s2 (K, C), nk (K,)): sum_i nu_ik (x_i - center) and
    sum_i nu_ik (x_i - center)^2 over all points and nk = sum_i nu_ik, already computed (center a constant
    near the batch mean, MN's GMM fit gives them); the forward then skips its two moment passes. The
    gradients are those of the moments of x3, as without."""
    if sums is not None:
        sums = tuple(t.detach() for t in sums)
    return _PosteriorBatchNorm.apply(x3, resp.detach(), gain, bias, eps, sums)
