"""Each layer against torch.nn.BatchNorm2d (reductions) and a slow loop over its paper equation (numpy, float64)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import cbnorm
from conftest import call, contexts_for, make_layer, randomize, warm_up

torch.set_default_dtype(torch.float32)


def bn_pair(c=4, momentum=0.1):
    ours = cbnorm.BatchNorm(c, momentum=momentum)
    ref = nn.BatchNorm2d(c, momentum=momentum)
    randomize(ours)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    return ours, ref


# ------------------------------------------------------------------- reductions to nn.BatchNorm2d
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_bn_equals_batchnorm2d_train_eval_running(momentum):
    ours, ref = bn_pair(momentum=momentum)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(6, 4, 5, 5, generator=g) * 3 + 2
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)  # unbiased, momentum = weight of new batch
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    ours.eval(), ref.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("cn", {"num_contexts": 1}), ("mn", {"num_components": 1}),
                                     ("mode", {"num_components": 1}),
                                     ("acn", {"num_components": 1, "update": "moving_average"})])
def test_single_mode_layers_equal_batchnorm2d_in_train(name, kw):
    layer = make_layer(name, 4, **kw)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2, 4).reshape(layer.weight.shape))
        layer.bias.copy_(torch.linspace(-1, 1, 4).reshape(layer.bias.shape))
        ref.weight.copy_(torch.linspace(0.5, 2, 4))
        ref.bias.copy_(torch.linspace(-1, 1, 4))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 4, 4, 4, generator=g) * 2 - 1
        ctx = torch.zeros(8, dtype=torch.long) if layer.uses_context else None
        torch.testing.assert_close(layer(x, context=ctx), ref(x), rtol=1e-4, atol=1e-4)
    if name in ("cn", "mode"):
        torch.testing.assert_close(layer.running_mean[0], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var[0], ref.running_var, rtol=1e-5, atol=1e-6)


def test_ln_gn_equal_torch():
    x = torch.randn(5, 6, 4, 4)
    ln, gn = randomize(make_layer("ln", 6)), randomize(make_layer("gn", 6, num_groups=3))
    torch.testing.assert_close(ln(x), nn.functional.group_norm(x, 1, ln.weight, ln.bias, 1e-5))
    torch.testing.assert_close(gn(x), nn.functional.group_norm(x, 3, gn.weight, gn.bias, 1e-5))
    tok = randomize(make_layer("ln", 6, channel_last=True))
    t = torch.randn(5, 7, 6)
    torch.testing.assert_close(tok(t), nn.functional.layer_norm(t, (6,), tok.weight, tok.bias, 1e-5))


# ------------------------------------------------------------------------------- numpy helpers
def npoints(x):
    """(N, C, H, W) -> list over samples of (P, C) float64 arrays."""
    x = x.detach().double().numpy()
    return [x[n].reshape(x.shape[1], -1).T for n in range(x.shape[0])]


def gauss_logpdf(v, mean, var):
    """log N(v | mean, diag var), loop-free per point but independent of the library (numpy)."""
    return -0.5 * np.sum((v - mean) ** 2 / var + np.log(2 * np.pi * var))


def assemble(out, x):
    n, c = x.shape[:2]
    return torch.tensor(np.stack([o.T.reshape(c, *x.shape[2:]) for o in out]), dtype=torch.float64)


# ----------------------------------------------------------------------------------- CN eq. 22-26
def test_cn_train_and_eval_against_loop():
    layer = randomize(make_layer("cn", 3, num_contexts=3, priors=[0.5, 0.3, 0.2])).double()
    x = torch.randn(9, 3, 2, 2, dtype=torch.float64) * 2
    ctx = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    y = layer(x, context=ctx)
    pts = npoints(x)
    lam = np.array([0.5, 0.3, 0.2])
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = [None] * 9
    run_mean, run_var = np.zeros((3, 3)), np.ones((3, 3))
    for k in range(3):
        members = [i for i in range(9) if ctx[i] == k]
        allp = np.concatenate([pts[i] for i in members])
        mu, var = allp.mean(0), allp.var(0)  # eq. 23-24 (biased)
        for i in members:
            out[i] = w[k] * (pts[i] - mu) / np.sqrt(var + 1e-5) / np.sqrt(lam[k]) + b[k]  # eq. 22
        run_mean[k] = 0.9 * 0 + 0.1 * mu  # eq. 25 with momentum 0.1 as weight of the new batch
        run_var[k] = 0.9 * 1 + 0.1 * allp.var(0, ddof=1)
    torch.testing.assert_close(y, assemble(out, x))
    torch.testing.assert_close(layer.running_mean, torch.tensor(run_mean))
    torch.testing.assert_close(layer.running_var, torch.tensor(run_var))
    layer.eval()  # eq. 26
    ye = layer(x, context=ctx)
    out = [w[ctx[i]] * (pts[i] - run_mean[ctx[i]]) / np.sqrt(run_var[ctx[i]] + 1e-5) / np.sqrt(lam[ctx[i]])
           + b[ctx[i]] for i in range(9)]
    torch.testing.assert_close(ye, assemble(out, x))


def cn_plus_loop(x, lam, mean, var, scale, w, b, eps=1e-5):
    """CN+ (eq. 9, our reading): sample-level posterior over contexts, mix of full per-context transforms."""
    out = []
    for p in npoints(x):
        logp = np.array([np.log(lam[k]) + sum(gauss_logpdf(v, mean[k], var[k] + eps) for v in p)
                         for k in range(len(lam))])
        tau = np.exp(logp - logp.max())
        tau /= tau.sum()
        out.append(sum(tau[k] * (w[k] * scale[k] * (p - mean[k]) / np.sqrt(var[k] + eps) + b[k])
                       for k in range(len(lam))))
    return out


@pytest.mark.parametrize("name", ["cn", "cnx", "cn-embed"])
def test_cn_plus_against_loop(name):
    layer = randomize(warm_up(make_layer(name, 3, num_contexts=3), c=3)).double().eval()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    lam, mean, var = (t.numpy() for t in layer.mixture_parameters())
    scale = 1 / np.sqrt(lam) if layer.prior_scaling else np.ones(3)
    w = layer.weight.detach().numpy()
    b = layer.bias.detach().numpy()
    if w.ndim == 1:
        w, b = np.tile(w, (3, 1)), np.tile(b, (3, 1))
    torch.testing.assert_close(layer(x), assemble(cn_plus_loop(x, lam, mean, var, scale, w, b), x))


def test_cn_plus_one_hot_posterior_gives_cn_output():
    layer = randomize(make_layer("cnx", 2, num_contexts=2)).eval()
    with torch.no_grad():
        layer.mean.copy_(torch.tensor([[-20.0, -20.0], [20.0, 20.0]]))
    x = torch.randn(4, 2, 3, 3) + torch.tensor([-20.0, -20.0, 20.0, 20.0]).view(4, 1, 1, 1)
    ctx = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(layer(x), layer(x, context=ctx))


# ----------------------------------------------------------------------------- CN-X and embedder
def test_cnx_against_loop_and_gradient_sign():
    layer = randomize(make_layer("cnx", 3, num_contexts=2)).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ctx = torch.tensor([1, 0, 1, 1])
    y = layer(x, context=ctx)
    mu, var = layer.mean.detach().numpy(), layer.log_var.detach().exp().numpy()
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = [w[k] * (p - mu[k]) / np.sqrt(var[k] + 1e-5) * np.sqrt(2) + b[k] for p, k in zip(npoints(x), ctx)]
    torch.testing.assert_close(y, assemble(out, x))
    # d y / d sigma^2 = -gamma (x - mu) / (2 (sigma^2 + eps)^{3/2}) / sqrt(lambda): the papers print (mu + x)
    var_t = layer.log_var.detach().exp().requires_grad_(True)
    k = 1
    xs = x[0, :, 0, 0]
    yk = layer.weight[k] * (xs - layer.mean[k]) * torch.rsqrt(var_t[k] + 1e-5) * math.sqrt(2)
    (g,) = torch.autograd.grad(yk.sum(), var_t)
    expected = -layer.weight[k] * (xs - layer.mean[k]) / (2 * (var_t[k] + 1e-5) ** 1.5) * math.sqrt(2)
    torch.testing.assert_close(g[k], expected.detach())
    # and the layer's own autograd gradient w.r.t. log_var agrees through the chain rule
    layer.zero_grad()
    layer(x[:1], context=ctx[:1])[0, :, 0, 0].sum().backward()
    chain = expected.detach() * var_t[k].detach()  # d/d log_var = d/d var * var
    torch.testing.assert_close(layer.log_var.grad[k], chain)


def test_cn_embed_against_loop():
    layer = randomize(make_layer("cn-embed", 3, num_contexts=4, embed_dim=5)).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    ctx = torch.tensor([0, 3, 2, 1, 3, 0])
    y = layer(x, context=ctx)
    we, be = layer.embedder.weight.detach().numpy(), layer.embedder.bias.detach().numpy()
    wm, bm = layer.head_mean.weight.detach().numpy(), layer.head_mean.bias.detach().numpy()
    wv, bv = layer.head_log_var.weight.detach().numpy(), layer.head_log_var.bias.detach().numpy()
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = []
    for p, k in zip(npoints(x), ctx):
        alpha = we @ np.eye(4)[k] + be  # Algorithm 1: identifier embedding of onehot(r)
        mu, var = wm @ alpha + bm, np.exp(wv @ alpha + bv)
        out.append(g * (p - mu) / np.sqrt(var + 1e-5) + b)  # eq. 8, shared affine
    torch.testing.assert_close(y, assemble(out, x))


# ------------------------------------------------------------------------------ ACN / UCB-Norm
@pytest.mark.parametrize("posterior", ["joint", "channel"])
def test_acn_weight_update_against_loop(posterior):
    torch.manual_seed(0)
    layer = randomize(make_layer("acn", 3, num_components=3, posterior=posterior)).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y = layer(x)
    lam = torch.softmax(layer.logits, 0).detach().numpy()
    mu, var = layer.mean.detach().numpy(), layer.log_var.detach().exp().numpy()
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    eps = 1e-5
    out = []
    for p in npoints(x):
        o = np.zeros_like(p)
        for i, v in enumerate(p):
            if posterior == "joint":
                logp = np.array([np.log(lam[k]) + gauss_logpdf(v, mu[k], var[k] + eps) for k in range(3)])
                tau = np.exp(logp - logp.max())
                tau = (tau / tau.sum())[:, None]
            else:
                logp = np.array([[np.log(lam[k]) + gauss_logpdf(v[c], mu[k, c], var[k, c] + eps) for c in range(3)]
                                 for k in range(3)])
                tau = np.exp(logp - logp.max(0))
                tau = tau / tau.sum(0)
            o[i] = g * sum(tau[k] / np.sqrt(lam[k]) * (v - mu[k]) / np.sqrt(var[k] + eps) for k in range(3)) + b
        out.append(o)
    torch.testing.assert_close(y, assemble(out, x))
    layer.eval()
    torch.testing.assert_close(layer(x), y)  # weights are the parameters: train and eval agree


def test_acn_moving_average_against_loop():
    torch.manual_seed(0)
    layer = make_layer("acn", 2, num_components=2, update="moving_average", momentum=0.25, init="random").double()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    layer.initialize_from(layer._to_ncp(x))  # what the first training step does with init="data"
    lam0, mu0, var0 = (t.numpy().copy() for t in layer.component_parameters())
    y = layer(x)
    pts = np.concatenate(npoints(x))
    eps = 1e-5
    logp = np.array([[np.log(lam0[k]) + gauss_logpdf(v, mu0[k], var0[k] + eps) for k in range(2)] for v in pts])
    tau = np.exp(logp - logp.max(1, keepdims=True))
    tau /= tau.sum(1, keepdims=True)
    nk = tau.sum(0)
    lam_b = nk / len(pts)
    mu_b = (tau.T @ pts) / nk[:, None]
    var_b = np.stack([(tau[:, k:k + 1] * (pts - mu_b[k]) ** 2).sum(0) / nk[k] for k in range(2)])
    out = sum(tau[:, k:k + 1] / np.sqrt(lam_b[k]) * (pts - mu_b[k]) / np.sqrt(var_b[k] + eps) for k in range(2))
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, 2), torch.tensor(out))
    torch.testing.assert_close(layer.running_mean, torch.tensor(0.75 * mu0 + 0.25 * mu_b))
    torch.testing.assert_close(layer.running_var, torch.tensor(0.75 * var0 + 0.25 * var_b))
    torch.testing.assert_close(layer.running_weights, torch.tensor(0.75 * lam0 + 0.25 * lam_b))


# ------------------------------------------------------------------------------------- ModeNorm
def test_mode_against_loop():
    torch.manual_seed(0)
    layer = randomize(make_layer("mode", 3, num_components=2)).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * 2
    y = layer(x)
    pts = npoints(x)
    W, bg = layer.gate.weight.detach().numpy(), layer.gate.bias.detach().numpy()
    gates = []
    for p in pts:
        z = W @ p.mean(0) + bg
        gates.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
    gates = np.array(gates)
    mus, vars_ = [], []
    for k in range(2):
        nk = sum(gates[n, k] * len(p) for n, p in enumerate(pts))
        mu = sum(gates[n, k] * p.sum(0) for n, p in enumerate(pts)) / nk  # eq. 16
        var = sum(gates[n, k] * ((p - mu) ** 2).sum(0) for n, p in enumerate(pts)) / nk
        mus.append(mu), vars_.append(var)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = [g * sum(gates[n, k] * (p - mus[k]) / np.sqrt(vars_[k] + 1e-5) for k in range(2)) + b  # eq. 15
           for n, p in enumerate(pts)]
    torch.testing.assert_close(y, assemble(out, x))


# ------------------------------------------------------------------------------ MixtureNorm
def mn_posteriors_loop(pts, w, m, v):
    """eq. 31 in numpy: nu (M, K) of points (M, C) under the diagonal GMM (w (K,), m (K, C), v (K, C))."""
    logp = np.array([[np.log(w[k]) + gauss_logpdf(p, m[k], v[k]) for k in range(len(w))] for p in pts])
    nu = np.exp(logp - logp.max(1, keepdims=True))
    return nu / nu.sum(1, keepdims=True)


def mn_train_loop(pts, nu, g, b, eps=1e-5):
    """eq. 34-36 in numpy: output (M, C) and the moments lambda (K,), mu (K, C), sigma^2 (K, C)."""
    lam = nu.mean(0)
    nu_hat = nu / nu.sum(0)  # eq. 36
    mus = np.stack([(nu_hat[:, k:k + 1] * pts).sum(0) for k in range(nu.shape[1])])  # eq. 35
    var = np.stack([(nu_hat[:, k:k + 1] * (pts - mus[k]) ** 2).sum(0) for k in range(nu.shape[1])])
    out = sum(nu[:, k:k + 1] / np.sqrt(lam[k]) * (pts - mus[k]) / np.sqrt(var[k] + eps)  # eq. 34
              for k in range(nu.shape[1]))
    return g * out + b, lam, mus, var


def test_mn_train_against_loop_given_fit(monkeypatch):
    """eq. 31 + 34-36 from a given GMM fit (w, m, v), in numpy; the queue stores the fit and the moments."""
    layer = randomize(make_layer("mn", 3, num_components=3)).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    w = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    v = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.5
    monkeypatch.setattr(layer, "fit_mixture", lambda x3: (w.log(), m, v))
    y = layer(x)
    pts = np.concatenate(npoints(x))
    nu = mn_posteriors_loop(pts, w.numpy(), m.numpy(), v.numpy())
    out, lam, mus, var = mn_train_loop(pts, nu, layer.weight.detach().numpy(), layer.bias.detach().numpy())
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, 3), torch.tensor(out))
    assert int(layer.queue_count) == 1
    for buf, ref in ((layer.queue_weights, lam), (layer.queue_means, mus), (layer.queue_vars, var),
                     (layer.queue_fit_weights, w), (layer.queue_fit_means, m), (layer.queue_fit_vars, v)):
        torch.testing.assert_close(buf[0], torch.as_tensor(ref))


def mn_eval_loop(pts, fits, moments, tau, eps=1e-5):
    """eq. 38 in numpy, our reading: posteriors over every (t, k) from the stored fits (weights tau^t w_k^t),
    component (t, k) normalized by the stored moments with scale 1 / sqrt(lambda_k^t)."""
    out = np.zeros_like(pts)
    for i, p in enumerate(pts):
        logp = {(t, k): np.log(tau[t] * fits[t][0][k]) + gauss_logpdf(p, fits[t][1][k], fits[t][2][k])
                for t in range(len(tau)) for k in range(len(fits[t][0]))}
        mx = max(logp.values())
        z = sum(np.exp(l - mx) for l in logp.values())
        for (t, k), l in logp.items():
            lam, mu, var = (a[k] for a in moments[t])
            out[i] += np.exp(l - mx) / z / np.sqrt(lam) * (p - mu) / np.sqrt(var + eps)
    return out


def test_mn_eval_against_loop_eq38():
    torch.manual_seed(0)
    layer = randomize(warm_up(make_layer("mn", 2, num_components=2, queue_size=3, zeta=0.5), c=2, steps=5))
    layer = layer.double().eval()
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    y = layer(x)
    T = 3
    ptr = int(layer.queue_ptr)
    tau = np.array([(1 - 0.5) / (1 - 0.5 ** T) * 0.5 ** (T - t - 1) for t in range(T)])  # eq. 39, t=T-1 newest
    order = [(ptr + t) % T for t in range(T)]  # slot of the t-th oldest step
    q = {n: b.numpy() for n, b in layer.named_buffers()}
    fits = [(q["queue_fit_weights"][s], q["queue_fit_means"][s], q["queue_fit_vars"][s]) for s in order]
    moments = [(q["queue_weights"][s], q["queue_means"][s], q["queue_vars"][s]) for s in order]
    out = mn_eval_loop(np.concatenate(npoints(x)), fits, moments, tau)
    g, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, 2), torch.tensor(g * out + b))


def test_mn_fit_uses_real_gmm_and_separates_modes():
    """Bimodal channel: MN normalizes each mode by itself, so both modes come out centred."""
    torch.manual_seed(0)
    layer = make_layer("mn", 1, num_components=2, affine=False, em_iters=5)
    x = torch.cat([torch.randn(16, 1, 4, 4) * 0.5 - 4, torch.randn(16, 1, 4, 4) * 0.5 + 4])
    y = layer(x)
    lam = layer.queue_weights[0]
    torch.testing.assert_close(lam, torch.tensor([0.5, 0.5]), rtol=0.05, atol=0.05)
    left, right = y[:16], y[16:]
    # each mode standardized by its own statistics, times 1/sqrt(lambda) = sqrt(2) (eq. 34)
    assert abs(float(left.mean())) < 0.1 and abs(float(right.mean())) < 0.1
    assert abs(float(left.std()) - math.sqrt(2)) < 0.15


# ------------------------------------------------------------------------------------- gradcheck
GRAD_CASES = [("bn", {}), ("ln", {}), ("gn", {"num_groups": 2}), ("mode", {"num_components": 2}),
              ("cn", {"num_contexts": 2}), ("cnx", {"num_contexts": 2}), ("cn-embed", {"num_contexts": 2}),
              ("acn", {"num_components": 2}), ("acn", {"num_components": 2, "posterior": "channel"}),
              ("acn", {"num_components": 2, "update": "moving_average"}), ("mn", {"num_components": 2})]


@pytest.mark.parametrize("name,kw", GRAD_CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in GRAD_CASES])
def test_gradcheck_float64(name, kw, monkeypatch):
    torch.manual_seed(0)
    layer = randomize(make_layer(name, 4, **kw)).double()
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    ctx = torch.tensor([0, 1, 0, 1, 1, 0]) if layer.uses_context else None
    if name == "mn":  # posteriors come from a fit outside the graph; freeze it for the finite differences
        frozen = layer.fit_posteriors(layer._to_ncp(x))
        monkeypatch.setattr(layer, "fit_posteriors", lambda x3: frozen)
    if kw.get("update") == "moving_average":
        state = {n: b.clone() for n, b in layer.named_buffers()}
        import cbnorm.norms.adaptive as adaptive

        fixed = adaptive.log_posteriors(layer._to_ncp(x.detach()), *layer.component_parameters()[1:],
                                        layer.component_parameters()[0].log(), "joint")
        # train-mode posteriors are detached (as MN's); freeze them for the finite differences
        monkeypatch.setattr(adaptive, "log_posteriors", lambda *a, **k: fixed)

        def f(inp):
            with torch.no_grad():  # forward updates buffers; keep them fixed between evaluations
                for n, b in layer.named_buffers():
                    b.copy_(state[n])
            return layer(inp)
    else:
        def f(inp):
            return layer(inp, context=ctx)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    layer.eval()
    if name not in ("mn",):
        assert torch.autograd.gradcheck(lambda inp: layer(inp, context=ctx), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_mn_fit_on_subsample_still_separates_modes():
    torch.manual_seed(0)
    layer = make_layer("mn", 1, num_components=2, affine=False, em_iters=5, fit_fraction=0.25)
    x = torch.cat([torch.randn(16, 1, 4, 4) * 0.5 - 4, torch.randn(16, 1, 4, 4) * 0.5 + 4])
    y = layer(x)
    assert abs(float(y[:16].mean())) < 0.1 and abs(float(y[16:].mean())) < 0.1
    with pytest.raises(ValueError, match="fit_fraction"):
        make_layer("mn", 1, fit_fraction=0.0)


# ----------------------------------------------------------------------------- ACN initialisation
def acn_far_from_zero_batch(seed=0):
    """Two modes centred near -10 (as the committed conv3 activations are), 3 channels."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(32, 3, 4, 4, generator=g) * 0.5 - 12
    right = torch.randn(32, 3, 4, 4, generator=g) * 0.5 - 8
    return torch.cat([left, right])


@pytest.mark.parametrize("update", ["weight", "moving_average"])
def test_acn_data_init_puts_components_on_the_data(update):
    x = acn_far_from_zero_batch()
    torch.manual_seed(0)
    data = make_layer("acn", 3, num_components=2, update=update, affine=False, init="data")
    torch.manual_seed(0)
    rand = make_layer("acn", 3, num_components=2, update=update, affine=False, init="random")
    y = data(x).detach()
    lam, mu, var = data.mixture_parameters()
    assert int(data.data_initialized) == 1
    got = sorted(float(m) for m in mu.mean(1))
    assert abs(got[0] + 12) < 0.3 and abs(got[1] + 8) < 0.3, f"component means {got}, modes at -12 and -8"
    torch.testing.assert_close(lam, torch.full((2,), 0.5), atol=0.05, rtol=0)
    assert float(var.max()) < 1.0  # each mode's own spread (0.25), not the pooled one (4.25)
    # normalized: each mode centred and scaled by its own component (eq. 19: std sqrt(2) with lambda = 1/2)
    assert abs(float(y.mean())) < 0.1 and abs(float(y[:32].std()) - math.sqrt(2)) < 0.3
    if update == "weight":  # (moving_average normalizes with batch statistics in train mode either way)
        yr = rand(x).detach()  # random means near 0: the activations are not centred
        assert abs(float(yr.mean())) > 1.0


def test_acn_data_init_happens_once_and_survives_state_dict():
    x = acn_far_from_zero_batch()
    layer = make_layer("acn", 3, num_components=2, init="data")
    layer(x)
    mu = layer.mean.detach().clone()
    layer(x + 100.0)  # a later step never re-initialises (only gradients move the parameters)
    torch.testing.assert_close(layer.mean.detach(), mu)
    fresh = make_layer("acn", 3, num_components=2, init="data")
    fresh.load_state_dict(layer.state_dict())
    fresh(x - 50.0)
    torch.testing.assert_close(fresh.mean.detach(), mu)  # a loaded, trained layer is not re-initialised
    untrained = make_layer("acn", 3, num_components=2, init="data")
    fresh.load_state_dict(untrained.state_dict())  # data_initialized = 0 again: the next step fits
    fresh(x)
    assert int(fresh.data_initialized) == 1 and abs(float(fresh.mean.mean()) + 10) < 1
    assert int(make_layer("acn", 3, init="random").data_initialized) == 1  # nothing left to do
    assert int(make_layer("acn", 3).data_initialized) == 0  # init="data", the default: the first step fits
    with pytest.raises(ValueError, match="init must be"):
        make_layer("acn", 3, init="kmeans")


def test_cnx_data_init_is_each_contexts_minibatch_statistics():
    """CN-X init="data" (the default): each context's mean and variance from its own samples of the first
    training minibatch (numpy reference), the whole minibatch's for a context with none; then x_hat of a
    context is its standardized values times 1/sqrt(prior) (eq. 8); once only, kept through state_dict."""
    torch.manual_seed(0)
    x = torch.randn(9, 3, 2, 2, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 4
    ctx = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1])  # context 2 absent
    layer = make_layer("cnx", 3, num_contexts=3, affine=False).double().train()
    y = layer(x, context=ctx)
    xn = x.numpy()
    for k in range(3):
        sel = xn[ctx.numpy() == k] if k < 2 else xn
        pts = sel.transpose(1, 0, 2, 3).reshape(3, -1)
        np.testing.assert_allclose(layer.mean[k].detach().numpy(), pts.mean(1), rtol=1e-10)
        np.testing.assert_allclose(layer.log_var[k].detach().exp().numpy(), pts.var(1) + 1e-5, rtol=1e-10)
    z = (xn[ctx.numpy() == 0].transpose(1, 0, 2, 3).reshape(3, -1))
    z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 2e-5) * np.sqrt(3)
    np.testing.assert_allclose(y[ctx == 0].detach().numpy().transpose(1, 0, 2, 3).reshape(3, -1), z, rtol=1e-4, atol=1e-6)
    assert int(layer.data_initialized) == 1
    mean = layer.mean.detach().clone()
    layer(x + 10, context=ctx)  # never again
    torch.testing.assert_close(layer.mean.detach(), mean)
    fresh = make_layer("cnx", 3, num_contexts=3, affine=False).double()
    fresh.load_state_dict(layer.state_dict())
    fresh.train()(x - 10, context=ctx)
    torch.testing.assert_close(fresh.mean.detach(), mean)
    zeros = make_layer("cnx", 3, num_contexts=3, init="zeros")
    assert int(zeros.data_initialized) == 1 and torch.equal(zeros.mean.detach(), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="init must be 'data' or 'zeros'"):
        make_layer("cnx", 3, num_contexts=3, init="random")


def test_acn_data_init_floors_a_collapsed_components_variance():
    """Many identical points (zero padding, a black background) give a GMM component a variance of ~0; the
    data init floors every component's variance at INIT_VAR_FLOOR of its channel's minibatch variance."""
    from cbnorm.norms.adaptive import INIT_VAR_FLOOR

    torch.manual_seed(0)
    x = torch.zeros(8, 2, 4, 4)
    x[:, :, :2] = torch.randn(8, 2, 2, 4) * 2 + 3  # half the positions carry signal, half are exactly 0
    layer = make_layer("acn", 2, num_components=2)
    layer(x)
    _, _, var = layer.mixture_parameters()
    channel_var = x.transpose(0, 1).reshape(2, -1).var(dim=1)
    assert (var >= INIT_VAR_FLOOR * channel_var[None] * (1 - 1e-5)).all()
    assert float(var.min()) < 0.02 * float(channel_var.min())  # the floor is what held it (collapsed component)
