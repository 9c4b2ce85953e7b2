"""The speed levers of bench/speed.py compute the same numbers as the plain formulations they replace.

* ``posterior_batch_norm`` (hand-written backward, MN eq. 34-36) against autograd through
  ``weighted_moments`` + ``normalizing_coefficients`` + ``mix_affine``, and gradcheck in float64;
* the broadcast formulation used under ``torch.compile`` against the eager bmm formulation;
* ACN compiled in train mode (forward and every gradient) against eager;
* BatchNorm's native single-process path against its all-reduce (DDP) path.
"""
import pytest
import torch

import cbnorm
import cbnorm.norms.functional as functional
from cbnorm.norms.functional import posterior_batch_norm, weighted_moments
from conftest import make_layer, randomize


def reference_posterior_bn(x3, resp, gain, bias, eps):
    lam, mean, var = weighted_moments(x3, resp, "joint")
    a, b = functional.normalizing_coefficients(mean, var, eps, torch.rsqrt(lam)[:, None], gain, bias)
    return functional.mix_affine(x3, resp, a, b, "joint"), lam, mean, var


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_posterior_batch_norm_matches_autograd_reference(affine, offset):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 5, 6, generator=g) * 2 + offset).requires_grad_()
    resp = torch.softmax(torch.randn(8, 3, 6, generator=g) * 2, dim=1)
    gain = (torch.rand(5, generator=g) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(5, generator=g).requires_grad_() if affine else None
    # upstream gradients on all three differentiable outputs (y, mean, var)
    gy, gm, gv = torch.randn(8, 5, 6, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    inputs = [x] + ([gain, bias] if affine else [])
    outs = []
    for fn in (posterior_batch_norm, reference_posterior_bn):
        y, lam, mean, var = fn(x, resp, gain, bias, 1e-5)
        grads = torch.autograd.grad((y * gy).sum() + (mean * gm).sum() + (var * gv).sum(), inputs)
        outs.append((y, lam, mean, var, *grads))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_posterior_batch_norm_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    resp = torch.softmax(torch.randn(4, 2, 5, generator=g, dtype=torch.float64), dim=1)
    gain = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, gain, bias):
        y, _, mean, var = posterior_batch_norm(x, resp, gain, bias, 1e-5)
        return y, mean, var

    assert torch.autograd.gradcheck(f, (x, gain, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_posterior_batch_norm_constant_channel_is_finite():
    x = torch.ones(4, 2, 3, requires_grad=True)
    resp = torch.full((4, 2, 3), 0.5)
    y, _, _, var = posterior_batch_norm(x, resp, None, None, 1e-5)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and (var == 0).all()


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_compile_formulation_equals_eager_formulation(offset, monkeypatch):
    """The (N, K, C, P) broadcast reductions (what inductor fuses) give the bmm formulation's numbers."""
    g = torch.Generator().manual_seed(2)
    x3 = torch.randn(6, 7, 9, generator=g) * 3 + offset
    means = torch.randn(4, 7, generator=g) * 3 + offset
    vars_ = torch.rand(4, 7, generator=g) * 4 + 0.5
    logw = torch.log_softmax(torch.randn(4, generator=g), 0)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    eager = [functional.log_posteriors(x3, means, vars_, logw, p) for p in ("joint", "sample")]
    eager.append(functional.mix_affine(x3, eager[0].exp(), a, b, "joint"))
    monkeypatch.setattr(functional, "_compiling", lambda: True)
    fused = [functional.log_posteriors(x3, means, vars_, logw, p) for p in ("joint", "sample")]
    fused.append(functional.mix_affine(x3, fused[0].exp(), a, b, "joint"))
    for e, f in zip(eager, fused):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-3)


def test_acn_compiled_train_step_matches_eager():
    torch.manual_seed(0)
    layer = randomize(make_layer("acn", 6, num_components=3)).train()
    x = torch.randn(8, 6, 4, 4) * 2 + 1
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = layer(xe)
    (ye * ye).sum().backward()
    grads_e = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    yc = torch.compile(layer)(xc)  # inductor: the broadcast formulation
    (yc * yc).sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-3)
    for ge, p in zip(grads_e, layer.parameters()):
        torch.testing.assert_close(p.grad, ge, rtol=1e-3, atol=1e-3)


def test_batchnorm_native_path_equals_allreduce_path(monkeypatch):
    g = torch.Generator().manual_seed(3)
    fast = randomize(cbnorm.BatchNorm(5))
    slow = randomize(cbnorm.BatchNorm(5))
    slow.load_state_dict(fast.state_dict())
    monkeypatch.setattr(slow, "_distributed", lambda: True)  # the SyncBatchNorm code path, one process
    for _ in range(3):
        x = torch.randn(6, 5, 3, 3, generator=g) * 4 - 2
        xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, ys = fast(xf), slow(xs)
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-5)
        w = torch.randn(yf.shape, generator=g)
        (yf * w).sum().backward()
        (ys * w).sum().backward()
        torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-4, atol=1e-5)
    for name, buf in fast.named_buffers():
        torch.testing.assert_close(buf, slow.get_buffer(name))
    torch.testing.assert_close(fast.weight.grad, slow.weight.grad, rtol=1e-4, atol=1e-5)
    fast.eval(), slow.eval()
    x = torch.randn(2, 5, 3, 3, generator=g)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


def composed_joint_mixture(x3, means, vars_, logw, a, b):
    return functional.mix_affine(x3, functional.log_posteriors(x3, means, vars_, logw, "joint").exp(), a, b, "joint")


@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_joint_mixture_transform_matches_autograd_composition(offset):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 5, 7, generator=g) * 2 + offset).requires_grad_()
    means = (torch.randn(3, 5, generator=g) * 2 + offset).requires_grad_()
    vars_ = (torch.rand(3, 5, generator=g) * 3 + 0.5).requires_grad_()
    logw = torch.log_softmax(torch.randn(3, generator=g), 0).detach().requires_grad_()
    a, b = torch.randn(3, 5, generator=g).requires_grad_(), torch.randn(3, 5, generator=g).requires_grad_()
    w = torch.randn(6, 5, 7, generator=g)
    inputs = (x, means, vars_, logw, a, b)
    outs = []
    for fn in (functional.joint_mixture_transform, composed_joint_mixture):
        y = fn(*inputs)
        outs.append((y, *torch.autograd.grad((y * w).sum(), inputs)))
    for name, ours, ref in zip(("y", "x", "means", "vars", "log_weights", "a", "b"), *outs):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_joint_mixture_transform_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 4, 5, generator=g, **d).requires_grad_()
    means = torch.randn(2, 4, generator=g, **d).requires_grad_()
    vars_ = (torch.rand(2, 4, generator=g, **d) + 0.5).requires_grad_()
    logw = torch.log(torch.tensor([0.3, 0.7], **d)).requires_grad_()
    a, b = torch.randn(2, 4, generator=g, **d).requires_grad_(), torch.randn(2, 4, generator=g, **d).requires_grad_()
    assert torch.autograd.gradcheck(functional.joint_mixture_transform, (x, means, vars_, logw, a, b),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_joint_mixture_transform_huge_activation_is_finite_with_finite_gradients():
    x = torch.randn(4, 3, 2)
    x[0, :, 0] = 1e20  # squares overflow float32
    x.requires_grad_()
    means, vars_ = torch.randn(2, 3, requires_grad=True), torch.ones(2, 3, requires_grad=True)
    a, b = torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)
    y = functional.joint_mixture_transform(x, means, vars_, torch.log(torch.tensor([0.5, 0.5])), a, b)
    assert torch.isfinite(y).all()
    y[1:].sum().backward()  # the other samples' gradients are untouched by the capped one
    assert torch.isfinite(means.grad).all() and torch.isfinite(vars_.grad).all() and torch.isfinite(x.grad).all()


def test_mn_compiled_train_step_matches_eager_for_two_fit_fractions():
    """Two MixtureNorms with different fit_fraction compiled whole (fullgraph, inductor: the one inductor case
    of the compile tests; k-means++ and EM are traced too) in one process (the second used to fail: dynamo
    made the fraction a symbolic float and could not size the subsample). ``fallback_random``: inductor then
    draws the random numbers of k-means++ and the subsample with torch's generator, as eager does."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        _mn_compiled_matches_eager()


def _mn_compiled_matches_eager():
    x = torch.randn(8, 4, 4, 4) * 2 + 1
    for fraction in (1.0, 0.25):
        torch.manual_seed(0)
        layer = make_layer("mn", 4, num_components=2, fit_fraction=fraction)
        eager_layer = make_layer("mn", 4, num_components=2, fit_fraction=fraction)
        eager_layer.load_state_dict(layer.state_dict())
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(1)
        ye = eager_layer(xe)
        ye.square().sum().backward()
        torch.manual_seed(1)
        yc = torch.compile(layer, fullgraph=True)(xc)  # the fit traced, with the same random draws
        yc.square().sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(layer.queue_means, eager_layer.queue_means)


def test_centered_square_sums_matches_autograd_and_gradchecks():
    from cbnorm.norms.mode import centered_square_sums

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 3 + 20).requires_grad_()
    shift = x.detach().mean(dim=(0, 2))
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ours = centered_square_sums(x, shift)
    (gx,) = torch.autograd.grad((ours * w).sum(), x)
    ref = (x - shift[None, :, None]).pow(2).sum(dim=2)
    (gr,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gx, gr)
    assert torch.autograd.gradcheck(lambda t: centered_square_sums(t, shift), (x,))
