"""Second derivatives (``create_graph=True``: gradient penalties, ``gradgradcheck``) of every layer, in float64.

The hand-written backwards (``_PosteriorBatchNorm`` for MN and ACN(moving_average), ``_JointMixtureTransform``
for ACN(weight) and ACN/MN eval, ModeNorm's ``_CenteredSquareSums``) used tensors computed inside their
forward, which are not part of the graph: their second derivatives came out wrong without an error. Each is
checked here against finite differences of its own first derivative, with respect to the input *and* the
layer's parameters (mixed second derivatives, as a gradient penalty on the input needs for the weights).
"""
import pytest
import torch

import cbnorm.norms.adaptive as adaptive
from cbnorm import MixtureNorm
from cbnorm.norms.functional import joint_mixture_transform, posterior_batch_norm
from cbnorm.norms.mode import centered_square_sums
from conftest import make_layer, randomize

CASES = [("bn", {}), ("ln", {}), ("gn", {"num_groups": 3}), ("mn", {"num_components": 2}),
         ("mn", {"num_components": 2, "posterior": "channel"}), ("mode", {"num_components": 2}),
         ("cn", {"num_contexts": 2}), ("cnx", {"num_contexts": 2}), ("cn-embed", {"num_contexts": 2}),
         ("acn", {"num_components": 2}), ("acn", {"num_components": 2, "posterior": "channel"}),
         ("acn", {"num_components": 2, "update": "moving_average"}),
         ("acn", {"num_components": 2, "update": "moving_average", "posterior": "channel"})]
#: eval where it is another path than train: running statistics / queue, and CN+ (context=None)
SAME_IN_EVAL = ("ln", "gn", "cnx", "cn-embed")
RUNS = [(n, kw, "train") for n, kw in CASES] + \
    [(n, kw, "eval") for n, kw in CASES if n not in SAME_IN_EVAL and not (n == "acn" and "update" not in kw)] + \
    [(n, kw, "eval-mixed") for n, kw in CASES if n in ("cn", "cnx", "cn-embed")]
IDS = [f"{mode}-{n}-{'-'.join(map(str, kw.values()))}" for n, kw, mode in RUNS]
TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4)


def frozen_call(layer, x, ctx, monkeypatch):
    """f(x, *params) = layer(x) with the parameters as inputs, the buffers restored before every training call, and
    the train-mode posteriors that the methods hold constant (MN's fit, ACN's moving-average E-step) frozen
    at their value for x, so that finite differences see what autograd differentiates."""
    names = [n for n, _ in layer.named_parameters()]
    state = {n: b.clone() for n, b in layer.named_buffers()}
    if layer.training and isinstance(layer, MixtureNorm):
        frozen = layer.fit_posteriors(layer._to_ncp(x.detach()))
        monkeypatch.setattr(layer, "fit_posteriors", lambda x3: frozen)
    if layer.training and getattr(layer, "update", None) == "moving_average":
        lam, mu, var = layer.component_parameters()
        fixed = adaptive.log_posteriors(layer._to_ncp(x.detach()), mu, var + layer.eps, lam.log(), layer.posterior)
        monkeypatch.setattr(adaptive, "log_posteriors", lambda *a, **k: fixed)

    def f(inp, *params):
        if layer.training:  # (eval reads the buffers into the graph: never write them then)
            with torch.no_grad():
                for n, b in layer.named_buffers():
                    b.copy_(state[n])
        return torch.func.functional_call(layer, dict(zip(names, params)), (inp,), {"context": ctx})

    return f, (x, *(p.detach().clone().requires_grad_() for _, p in layer.named_parameters()))


@pytest.mark.parametrize("name,kw,mode", RUNS, ids=IDS)
def test_gradgradcheck_every_layer(name, kw, mode, monkeypatch):
    torch.manual_seed(0)
    layer = randomize(make_layer(name, 3, **kw)).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * 1.5
    ctx = torch.tensor([0, 1, 0, 1, 1, 0]) if layer.uses_context else None
    if mode != "train":
        with torch.no_grad():  # running statistics / a queue that are not their initial values
            for seed in range(3):
                layer(torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                      * 2 + 0.5, context=ctx)
        layer.eval()
        if mode == "eval-mixed":  # CN+ (context=None)
            ctx = None
    f, inputs = frozen_call(layer, x.requires_grad_(), ctx, monkeypatch)
    assert torch.autograd.gradcheck(f, inputs, **TOL)
    assert torch.autograd.gradgradcheck(f, inputs, **TOL)


def test_gradient_penalty_matches_the_composed_formula():
    """A gradient penalty ||d loss / d x||^2 through MN's train step: d/d(gain) equals the one through the
    autograd composition of the same formula (the hand-written backward's second derivative used to miss the
    terms through the centred input and the coefficients)."""
    from cbnorm.norms.functional import posterior_batch_norm_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64) * 2 + 3
    resp = torch.softmax(torch.randn(5, 2, 4, generator=g, dtype=torch.float64), 1)
    w = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    grads = []
    for fn in (posterior_batch_norm, posterior_batch_norm_reference):
        xi = x.clone().requires_grad_()
        gain = torch.linspace(0.5, 1.5, 3, dtype=torch.float64).requires_grad_()
        bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        y, _, mean, var = fn(xi, resp, gain, bias, 1e-5)
        (gx,) = torch.autograd.grad((y * w).sum() + mean.sum() + var.sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (xi, gain)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_gradgradcheck_hand_written_ops():
    g = torch.Generator().manual_seed(1)
    d = dict(dtype=torch.float64)
    x = (torch.randn(3, 4, 5, generator=g, **d) * 2 + 1).requires_grad_()
    resp = torch.softmax(torch.randn(3, 2, 5, generator=g, **d), dim=1)
    gain = (torch.rand(4, generator=g, **d) + 0.5).requires_grad_()
    bias = torch.randn(4, generator=g, **d).requires_grad_()

    def pbn(x, gain, bias):
        y, _, mean, var = posterior_batch_norm(x, resp, gain, bias, 1e-5)
        return y, mean, var

    assert torch.autograd.gradgradcheck(pbn, (x, gain, bias), **TOL)
    assert torch.autograd.gradgradcheck(lambda x: posterior_batch_norm(x, resp, None, None, 1e-5)[0], (x,), **TOL)
    means = torch.randn(2, 4, generator=g, **d).requires_grad_()
    vars_ = (torch.rand(2, 4, generator=g, **d) + 0.5).requires_grad_()
    logw = torch.log(torch.tensor([0.3, 0.7], **d)).requires_grad_()
    a, b = torch.randn(2, 4, generator=g, **d).requires_grad_(), torch.randn(2, 4, generator=g, **d).requires_grad_()
    assert torch.autograd.gradgradcheck(joint_mixture_transform, (x, means, vars_, logw, a, b), **TOL)
    shift = x.detach().mean(dim=(0, 2))
    assert torch.autograd.gradgradcheck(lambda t: centered_square_sums(t, shift), (x,), **TOL)
