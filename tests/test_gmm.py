"""Tests for cbnorm.gmm: batched diagonal GMMs (mixture-normalization.txt eq. 26-27, 31)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from cbnorm import gmm as G
from cbnorm.gmm import GMM

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def blobs(seed: int, d: int, n_per: int = 150, k: int = 3, sep: float = 8.0) -> np.ndarray:
    """Well-separated synthetic clusters (centers >= sep*sqrt(3) apart, spreads <= 1.5), d >= 2."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
    centers = rng.normal(0.0, 2.0, (k, d)) + rng.normal(0.0, 5.0, d)
    centers[:, :2] += sep * np.stack([np.cos(angles), np.sin(angles)], 1)
    scales = rng.uniform(0.3, 1.5, (k, d))
    sizes = [n_per + 40 * i for i in range(k)]
    x = np.concatenate([rng.normal(centers[i], scales[i], (sizes[i], d)) for i in range(k)])
    return x[rng.permutation(len(x))]


def sk_fit(x: np.ndarray, k: int = 3, seed: int = 0) -> GaussianMixture:
    return GaussianMixture(n_components=k, covariance_type="diag", n_init=1, max_iter=100,
                           random_state=seed).fit(x)


def from_sklearn(models: list[GaussianMixture]) -> GMM:
    return GMM(torch.tensor(np.stack([m.weights_ for m in models])),
               torch.tensor(np.stack([m.means_ for m in models])),
               torch.tensor(np.stack([m.covariances_ for m in models])))


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 4])
def test_component_log_prob_matches_scipy(d):
    rng = np.random.default_rng(1)
    g, m, k = 2, 40, 3
    x = rng.normal(0, 2, (g, m, d))
    means = rng.normal(0, 2, (g, k, d))
    vars_ = rng.uniform(0.1, 3.0, (g, k, d))
    out = G.component_log_prob(torch.tensor(x), torch.tensor(means), torch.tensor(vars_))
    assert out.shape == (g, m, k) and out.dtype == torch.float64
    ref = np.empty((g, m, k))
    for gi in range(g):
        for ki in range(k):
            ref[gi, :, ki] = multivariate_normal(means[gi, ki], np.diag(vars_[gi, ki])).logpdf(x[gi]).reshape(m)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-9)
    # plain numpy formula (with the normaliser)
    diff = x[:, :, None, :] - means[:, None, :, :]
    ref2 = -0.5 * ((diff ** 2 / vars_[:, None]).sum(-1) + np.log(2 * np.pi * vars_).sum(-1)[:, None, :])
    np.testing.assert_allclose(out.numpy(), ref2, rtol=1e-6, atol=1e-9)


def test_component_log_prob_group_broadcast_and_half_upcast():
    x = torch.randn(4, 10, 3)
    means, vars_ = torch.randn(1, 2, 3), torch.rand(1, 2, 3) + 0.5
    full = G.component_log_prob(x, means.expand(4, 2, 3), vars_.expand(4, 2, 3))
    torch.testing.assert_close(G.component_log_prob(x, means, vars_), full)
    half = G.component_log_prob(x.half(), means.half(), vars_.half())
    assert half.dtype == torch.float32


def test_component_log_prob_far_from_origin_float32():
    # matmul expansion on raw values would lose everything at 1e4 (x^2 ~ 1e8 >> 1/eps * var)
    rng = np.random.default_rng(2)
    x = rng.normal(1e4, 1.0, (1, 64, 3))
    means = 1e4 + rng.normal(0, 1.0, (1, 2, 3))
    vars_ = rng.uniform(0.5, 2.0, (1, 2, 3))
    ref = G.component_log_prob(torch.tensor(x), torch.tensor(means), torch.tensor(vars_))
    out = G.component_log_prob(torch.tensor(x, dtype=torch.float32), torch.tensor(means, dtype=torch.float32),
                               torch.tensor(vars_, dtype=torch.float32))
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), atol=0.05)


def test_component_log_prob_gradcheck():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    means = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    vars_ = (torch.rand(2, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(G.component_log_prob, (x, means, vars_))


def test_log_prob_and_posteriors_match_sklearn():
    xs = [blobs(s, d=3) for s in (0, 1)]
    models = [sk_fit(x) for x in xs]
    model = from_sklearn(models)
    x = torch.tensor(np.stack([xi[:300] for xi in xs]))
    np.testing.assert_allclose(G.log_prob(model, x).numpy(),
                               np.stack([m.score_samples(xi[:300]) for m, xi in zip(models, xs)]),
                               rtol=1e-6, atol=1e-8)
    post = G.posteriors(model, x)
    np.testing.assert_allclose(post.numpy(), np.stack([m.predict_proba(xi[:300]) for m, xi in zip(models, xs)]),
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(post.sum(-1), torch.ones(2, 300, dtype=torch.float64))
    np.testing.assert_allclose(G.mean_log_likelihood(model, x).numpy(),
                               [m.score(xi[:300]) for m, xi in zip(models, xs)], rtol=1e-8)
    lwp = G.weighted_log_prob(model, x)
    torch.testing.assert_close(torch.logsumexp(lwp, -1), G.log_prob(model, x))


# ---------------------------------------------------------------------------------------------------------
# fit vs sklearn
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3, 4])
def test_fit_reaches_sklearn_log_likelihood(d):
    x = blobs(10 + d, d)
    sk = sk_fit(x).score(x)
    model = G.fit(torch.tensor(x)[None], 3, iters=30, generator=gen(d))
    ours = G.mean_log_likelihood(model, torch.tensor(x)[None]).item()
    assert ours >= sk - 1e-2, (ours, sk)


def test_fit_float32_reaches_sklearn_log_likelihood():
    x = blobs(3, 2)
    sk = sk_fit(x).score(x)
    model = G.fit(torch.tensor(x, dtype=torch.float32)[None], 3, iters=30, generator=gen(3))
    assert model.means.dtype == torch.float32
    ours = G.mean_log_likelihood(model.to(torch.float64), torch.tensor(x)[None]).item()
    assert ours >= sk - 1e-2, (ours, sk)


def test_batched_groups_each_match_sklearn():
    n_groups = 8
    xs = np.stack([blobs(100 + i, 2, n_per=100) for i in range(n_groups)])  # (8, 420, 2)
    model = G.fit(torch.tensor(xs), 3, iters=40, generator=gen(1))
    assert model.num_groups == n_groups and model.num_components == 3 and model.dim == 2
    ours = G.mean_log_likelihood(model, torch.tensor(xs)).numpy()
    sk = np.array([sk_fit(xs[i]).score(xs[i]) for i in range(n_groups)])
    assert np.all(ours >= sk - 1e-2), (ours, sk)
    # each group's model, selected alone, scores its own data the same way
    for i in (0, n_groups - 1):
        one = model.select(i)
        assert one.num_groups == 1
        np.testing.assert_allclose(G.mean_log_likelihood(one, torch.tensor(xs[i:i + 1])).numpy(), ours[i:i + 1])


def test_fit_one_dimensional_groups():
    # the MN "G = C groups of scalars" / app histogram case
    rng = np.random.default_rng(5)
    xs = np.stack([np.concatenate([rng.normal(-4, 0.5, 200), rng.normal(0, 1, 300), rng.normal(5, 0.7, 250)])
                   for _ in range(4)])[..., None]
    model = G.fit(torch.tensor(xs), 3, iters=40, generator=gen(2))
    ours = G.mean_log_likelihood(model, torch.tensor(xs)).numpy()
    sk = np.array([sk_fit(xs[i]).score(xs[i]) for i in range(4)])
    assert np.all(ours >= sk - 1e-2), (ours, sk)


def test_fit_with_point_weights_ignores_padding():
    x = blobs(7, 2)
    pad = np.random.default_rng(0).normal(500.0, 50.0, (100, 2))  # garbage far away
    xp = torch.tensor(np.concatenate([x, pad]))[None]
    w = torch.cat([torch.ones(len(x)), torch.zeros(len(pad))])[None].double()
    model = G.fit(xp, 3, iters=30, weights=w, generator=gen(0))
    assert model.means.abs().max() < 100  # no component went to the padding
    ours = G.mean_log_likelihood(model, torch.tensor(x)[None]).item()
    assert ours >= sk_fit(x).score(x) - 1e-2


def test_kmeans_iters_and_zero_em_iterations():
    x = torch.tensor(blobs(8, 2))[None]
    m0 = G.fit(x, 3, iters=0, kmeans_iters=10, generator=gen(0))
    m1 = G.fit(x, 3, iters=10, kmeans_iters=10, generator=gen(0))
    assert torch.isfinite(m0.means).all() and torch.isfinite(m1.means).all()
    assert G.mean_log_likelihood(m1, x) >= G.mean_log_likelihood(m0, x) - 1e-9


# ---------------------------------------------------------------------------------------------------------
# Properties and edge cases
# ---------------------------------------------------------------------------------------------------------
def test_fit_properties():
    x = torch.randn(3, 200, 5, generator=gen(0))
    model = G.fit(x, 4, iters=5, generator=gen(1))
    assert model.weights.shape == (3, 4) and model.means.shape == (3, 4, 5) and model.vars.shape == (3, 4, 5)
    torch.testing.assert_close(model.weights.sum(-1), torch.ones(3))
    assert (model.weights > 0).all() and (model.vars > 0).all()
    post = G.posteriors(model, x)
    torch.testing.assert_close(post.sum(-1), torch.ones(3, 200))
    assert not model.means.requires_grad


@pytest.mark.parametrize("iters", [0, 3])
def test_single_component_is_sample_mean_and_biased_variance(iters):
    x = torch.randn(2, 100, 3, dtype=torch.float64, generator=gen(0)) * 3 + 2
    model = G.fit(x, 1, iters=iters, reg_covar=1e-6)
    torch.testing.assert_close(model.weights, torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(model.means[:, 0], x.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.vars[:, 0], x.var(1, unbiased=False) + 1e-6, rtol=1e-12, atol=1e-12)


def test_empty_component_stays_finite():
    # k = 3 on two distinct points: one component has nothing to explain
    x = torch.tensor([[0.0, 0.0]] * 30 + [[1.0, 2.0]] * 30)[None]
    model = G.fit(x, 3, iters=10, generator=gen(0))
    for t in (model.weights, model.means, model.vars):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(model.weights.sum(-1), torch.ones(1))
    assert (model.vars > 0).all()
    assert torch.isfinite(G.log_prob(model, x)).all()


@pytest.mark.parametrize("d", [1, 3])
def test_constant_data(d):
    x = torch.full((2, 50, d), 3.25)
    model = G.fit(x, 3, iters=5, reg_covar=1e-6, generator=gen(0))
    for t in (model.weights, model.means, model.vars):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(model.means, torch.full((2, 3, d), 3.25))
    torch.testing.assert_close(model.vars, torch.full((2, 3, d), 1e-6))
    assert torch.isfinite(G.log_prob(model, x)).all()


def test_deterministic_with_generator_seed():
    x = torch.randn(4, 300, 3, generator=gen(0))
    a = G.fit(x, 3, iters=5, generator=gen(42))
    b = G.fit(x, 3, iters=5, generator=gen(42))
    for ta, tb in zip((a.weights, a.means, a.vars), (b.weights, b.means, b.vars)):
        assert torch.equal(ta, tb)


def test_dtypes():
    x = torch.randn(2, 100, 2, generator=gen(0))
    assert G.fit(x.double(), 2, generator=gen(0)).means.dtype == torch.float64
    assert G.fit(x, 2, generator=gen(0)).means.dtype == torch.float32
    for low in (torch.float16, torch.bfloat16):
        model = G.fit(x.to(low), 2, generator=gen(0))
        assert model.means.dtype == torch.float32 and torch.isfinite(model.vars).all()
    with pytest.raises(TypeError, match="floating"):
        G.fit(torch.ones(1, 10, 2, dtype=torch.int64), 2)


def test_huge_offset_stays_accurate():
    base = blobs(9, 2)
    x32 = torch.tensor(base + 1e4, dtype=torch.float32)[None]
    x64 = x32.double()  # the same (float32-rounded) values
    model = G.fit(x32, 3, iters=30, generator=gen(0))
    for t in (model.weights, model.means, model.vars):
        assert torch.isfinite(t).all()
    ours = G.mean_log_likelihood(model.to(torch.float64), x64).item()
    sk = sk_fit(x64[0].numpy()).score(x64[0].numpy())
    assert ours >= sk - 1e-2, (ours, sk)


# ---------------------------------------------------------------------------------------------------------
# k-means++
# ---------------------------------------------------------------------------------------------------------
def test_kmeans_plus_plus_picks_one_point_per_cluster():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    xs = np.stack([np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in centers]) for _ in range(5)])
    x = torch.tensor(xs)
    seeds = G.kmeans_plus_plus(x, 3, generator=gen(0))
    assert seeds.shape == (5, 3, 2)
    # every seed is a data point, and the three seeds sit in three different clusters
    d2 = (seeds[:, :, None, :] - x[:, None, :, :]).square().sum(-1)
    assert torch.equal(d2.min(-1).values, torch.zeros(5, 3, dtype=torch.float64))
    label = torch.cdist(seeds, torch.tensor(centers)[None].expand(5, 3, 2)).argmin(-1)
    assert all(sorted(row) == [0, 1, 2] for row in label.tolist())
    # plain (single-trial) k-means++ too
    seeds1 = G.kmeans_plus_plus(x, 3, generator=gen(1), n_local_trials=1)
    label1 = torch.cdist(seeds1, torch.tensor(centers)[None].expand(5, 3, 2)).argmin(-1)
    assert all(sorted(row) == [0, 1, 2] for row in label1.tolist())


def test_kmeans_plus_plus_identical_and_duplicated_points():
    same = torch.full((3, 20, 2), 7.0)
    seeds = G.kmeans_plus_plus(same, 4, generator=gen(0))
    assert torch.equal(seeds, torch.full((3, 4, 2), 7.0))
    dup = torch.tensor([[1.0], [1.0], [1.0], [5.0], [5.0]])[None]
    seeds = G.kmeans_plus_plus(dup, 3, generator=gen(0))
    assert torch.isfinite(seeds).all() and set(seeds.flatten().tolist()) == {1.0, 5.0}


def test_kmeans_plus_plus_respects_zero_weights():
    x = torch.arange(20.0).reshape(1, 20, 1)
    w = torch.zeros(1, 20)
    w[0, :5] = 1.0
    seeds = G.kmeans_plus_plus(x, 3, generator=gen(0), weights=w)
    assert (seeds < 5).all()


# ---------------------------------------------------------------------------------------------------------
# GMM container and validation
# ---------------------------------------------------------------------------------------------------------
def test_gmm_container():
    model = GMM(torch.full((2, 3), 1 / 3), torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    assert (model.num_groups, model.num_components, model.dim) == (2, 3, 4)
    m64 = model.to(torch.float64)
    assert isinstance(m64, GMM) and m64.vars.dtype == torch.float64 and model.vars.dtype == torch.float32
    assert model.select(-1).means.shape == (1, 3, 4)
    assert model.select(slice(0, 2)).num_groups == 2
    with pytest.raises(ValueError, match="GMM.vars"):
        GMM(torch.ones(2, 3), torch.zeros(2, 3, 4), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="GMM.weights"):
        GMM(torch.ones(2, 2), torch.zeros(2, 3, 4), torch.ones(2, 3, 4))


def test_input_validation():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"x must be 3-D \(G, M, D\).*\(10, 3\)"):
        G.fit(x[0], 2)
    with pytest.raises(ValueError, match=r"M = 10 .*k = 11"):
        G.fit(x, 11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        G.fit(x, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        G.fit(x, 2.5)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        G.fit(x, 2, iters=-1)
    with pytest.raises(ValueError, match="reg_covar"):
        G.fit(x, 2, reg_covar=-1.0)
    bad = x.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        G.fit(bad, 2)
    bad[1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        G.fit(bad, 2)
    with pytest.raises(ValueError, match=r"weights must have shape \(G, M\)"):
        G.fit(x, 2, weights=torch.ones(2, 9))
    with pytest.raises(ValueError, match="nonnegative"):
        G.fit(x, 2, weights=-torch.ones(2, 10))
    with pytest.raises(ValueError, match="x must be 3-D"):
        G.component_log_prob(x[0], torch.zeros(2, 2, 3), torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match="D = 3"):
        G.component_log_prob(x, torch.zeros(2, 2, 4), torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="x must be 3-D"):
        G.kmeans_plus_plus(x[0], 2)


def test_no_python_level_host_sync(monkeypatch):
    """CPU proxy for the CUDA sync check: with check_finite=False, fit never converts a tensor to Python."""
    x = torch.randn(2, 100, 3, generator=gen(0))

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside fit")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    model = G.fit(x, 3, iters=3, kmeans_iters=2, generator=gen(0), check_finite=False)
    G.fit_with_statistics(x, 3, iters=2, generator=gen(0), check_finite=False, init=model)
    monkeypatch.undo()
    assert torch.isfinite(model.vars).all()


def test_warm_start_from_the_previous_fit():
    """init= starts EM from a given GMM (no seeding): from the true parameters of a well-separated mixture EM
    stays there; from a fit of a shifted batch it reaches the log-likelihood of a fresh fit."""
    xs = torch.tensor(np.stack([blobs(7, 3)]), dtype=torch.float64)
    fresh = G.fit(xs, 3, iters=20, generator=gen(0))
    warm = G.fit(xs + 0.1, 3, iters=20, init=G.GMM(fresh.weights, fresh.means + 0.1, fresh.vars))
    torch.testing.assert_close(warm.means, fresh.means + 0.1, rtol=1e-4, atol=1e-4)
    moved = G.fit(xs + 0.5, 3, iters=3, init=fresh)
    ref = G.fit(xs + 0.5, 3, iters=20, generator=gen(0))
    assert float(G.mean_log_likelihood(moved, xs + 0.5)) >= float(G.mean_log_likelihood(ref, xs + 0.5)) - 1e-3
    with pytest.raises(ValueError, match="init must have means/vars of shape"):
        G.fit(xs, 2, init=fresh)
    with pytest.raises(TypeError, match="init must be a cbnorm.gmm.GMM"):
        G.fit(xs, 3, init=(fresh.weights, fresh.means, fresh.vars))


def test_fit_with_statistics_are_the_next_e_and_m_steps():
    """The posteriors under the returned fit and their weighted sums of the centred points, as computed from
    the fit by hand; the same fit as fit() with the same draws."""
    x = torch.randn(2, 300, 3, generator=gen(1), dtype=torch.float64) * 2 + 5
    out = G.fit_with_statistics(x, 3, iters=2, generator=gen(4))
    plain = G.fit(x, 3, iters=2, generator=gen(4))
    for a, b in zip((out.gmm.weights, out.gmm.means, out.gmm.vars), (plain.weights, plain.means, plain.vars)):
        assert torch.equal(a, b)
    resp = G.posteriors(out.gmm, x)  # (G, M, K)
    torch.testing.assert_close(out.resp.transpose(1, 2), resp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.shift, x.mean(dim=1, keepdim=True))
    xc = x - out.shift
    torch.testing.assert_close(out.nk, resp.sum(1))
    torch.testing.assert_close(out.sx, resp.transpose(1, 2) @ xc)
    torch.testing.assert_close(out.sxx, resp.transpose(1, 2) @ xc.square())
    gm, r = G.fit_with_posteriors(x, 3, iters=2, generator=gen(4))
    assert torch.equal(r, out.resp) and torch.equal(gm.means, out.gmm.means)
    with pytest.raises(TypeError, match="unexpected keywords"):
        G.fit_with_statistics(x, 3, iterations=2)


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_matches_cpu():
    xs = np.stack([blobs(200 + i, 3) for i in range(4)])
    x = torch.tensor(xs, dtype=torch.float32)
    cpu = G.fit(x, 3, iters=30, generator=gen(0))
    gpu = G.fit(x.cuda(), 3, iters=30, generator=gen(0, "cuda"))
    assert gpu.means.device.type == "cuda"
    ll_cpu = G.mean_log_likelihood(cpu.to(torch.float64), x.double())
    ll_gpu = G.mean_log_likelihood(gpu.to("cpu", torch.float64), x.double())
    torch.testing.assert_close(ll_gpu, ll_cpu, atol=1e-3, rtol=0)
    lp_cpu = G.log_prob(cpu, x)
    torch.testing.assert_close(G.log_prob(cpu.to("cuda"), x.cuda()).cpu(), lp_cpu, atol=1e-4, rtol=1e-4)


@needs_cuda
def test_cuda_fit_has_no_host_sync():
    x = torch.randn(2, 1000, 4, device="cuda")
    g = gen(0, "cuda")
    G.fit(x, 3, iters=2, generator=g, check_finite=False)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model = G.fit(x, 3, iters=3, kmeans_iters=2, generator=g, check_finite=False)
        lp = G.log_prob(model, x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(lp).all()


def test_tol_stops_em_once_no_group_improves_by_tol():
    """With tol, EM stops early once every group's mean log-likelihood moves by < tol (as sklearn), and the
    fit is then the fixed-iteration fit stopped at that iteration; without tol, exactly ``iters`` run."""
    x = torch.tensor(np.stack([blobs(s, 2, k=3, sep=2.0) for s in (1, 2)]))  # overlapping: EM has work
    calls = []
    real = G._m_step

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    import unittest.mock as um

    with um.patch.object(G, "_m_step", counting):
        early = G.fit(x, 3, iters=200, kmeans_iters=3, generator=gen(0), tol=1e-3)
    n = len(calls)
    assert 3 <= n < 200  # stopped before the cap, after some work
    same = G.fit(x, 3, iters=n, kmeans_iters=3, generator=gen(0))
    assert torch.allclose(early.means, same.means) and torch.allclose(early.weights, same.weights)
    more = G.fit(x, 3, iters=n + 1, kmeans_iters=3, generator=gen(0))
    gain = G.mean_log_likelihood(more, x) - G.mean_log_likelihood(early, x)
    assert (gain.abs() < 1e-3).all()  # one more iteration gains less than tol in every group
    with pytest.raises(ValueError, match="tol"):
        G.fit(x, 3, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        G.fit(x, 3, tol=float("nan"))
