"""Activation capture and the analysis functions behind the app, against numpy/scipy/sklearn."""
import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.mixture import GaussianMixture

import cbnorm
from cbnorm import analysis, probe
from cbnorm.models import ShallowCNN


def test_capture_returns_layer_input_and_output_without_mutating():
    torch.manual_seed(0)
    model = ShallowCNN(1, 10, width=0.25, norm="acn", norm_kwargs={"num_components": 2}).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    caps = probe.capture(model, x, layers=["blocks.conv3.norm"])
    cap = caps["blocks.conv3.norm"]
    torch.testing.assert_close(cap.module(cap.input), cap.output)
    assert cap.input.shape[0] == 4 and cap.input.shape[1] == model.widths[2]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert set(probe.layer_names(model)) >= {"blocks.conv1.norm", "blocks.conv3.norm"}


def test_capture_refuses_train_mode_and_unknown_layers():
    model = ShallowCNN(1, 10, width=0.25)
    with pytest.raises(ValueError, match="eval mode"):
        probe.capture(model, torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="unknown layer"):
        probe.capture(model.eval(), torch.randn(2, 1, 28, 28), layers=["nope"])


def test_channel_values_layout():
    acts = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    v = analysis.channel_values(acts, [2, 0])
    np.testing.assert_array_equal(v[0], np.concatenate([acts[0, 2].flatten(), acts[1, 2].flatten()]))
    np.testing.assert_array_equal(v[1], np.concatenate([acts[0, 0].flatten(), acts[1, 0].flatten()]))
    tok = acts.flatten(2).transpose(1, 2)  # (N, L, D)
    np.testing.assert_array_equal(analysis.channel_values(tok, [2, 0], channel_last=True), v)
    with pytest.raises(ValueError, match="out of range"):
        analysis.channel_values(acts, [3])


def test_fit_channel_mixtures_matches_sklearn():
    rng = np.random.default_rng(0)
    rows = [np.concatenate([rng.normal(-3, 0.5, 700), rng.normal(2, 1.0, 300)]) for _ in range(3)]
    values = np.stack(rows)
    w, m, v = analysis.fit_channel_mixtures(values, 2, iters=50)
    for g in range(3):
        sk = GaussianMixture(2, covariance_type="diag", random_state=0).fit(values[g][:, None])
        ours = np.log((w[g] * sps.norm.pdf(values[g][:, None], m[g], np.sqrt(v[g]))).sum(1)).mean()
        assert ours >= sk.score(values[g][:, None]) - 1e-3
        np.testing.assert_allclose(np.sort(m[g]), [-3, 2], atol=0.15)


def test_mixture_curves_integrate_to_one():
    grid = np.linspace(-20, 20, 4001)
    comps, total = analysis.mixture_curves(grid, np.array([[0.3, 0.7]]), np.array([[-2.0, 3.0]]),
                                           np.array([[1.0, 4.0]]))
    dx = grid[1] - grid[0]
    np.testing.assert_allclose(total.sum() * dx, 1.0, atol=1e-6)
    np.testing.assert_allclose(comps[0].sum(1) * dx, [0.3, 0.7], atol=1e-6)


def test_layer_channel_mixtures_marginalises():
    layer = cbnorm.build_norm("acn", 5, num_components=3)
    w, mu, var = layer.mixture_parameters()
    ww, mm, vv = analysis.layer_channel_mixtures(layer, [4, 1])
    np.testing.assert_allclose(mm, mu[:, [4, 1]].T.numpy(), rtol=1e-6)
    np.testing.assert_allclose(vv, var[:, [4, 1]].T.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ww, np.tile(w.numpy(), (2, 1)), rtol=1e-6)


def test_normality_stats_against_scipy():
    rng = np.random.default_rng(1)
    values = np.stack([rng.normal(size=5000), rng.exponential(size=5000), np.full(5000, 2.0)])
    s = analysis.normality_stats(values)
    assert abs(s["skewness"][0]) < 0.1 and abs(s["excess_kurtosis"][0]) < 0.2 and s["ks_to_normal"][0] < 0.03
    np.testing.assert_allclose(s["skewness"][1], sps.skew(values[1]), rtol=1e-10)
    np.testing.assert_allclose(s["excess_kurtosis"][1], sps.kurtosis(values[1]), rtol=1e-10)
    assert s["skewness"][1] > 1.5 and s["w1_to_normal"][1] > s["w1_to_normal"][0]
    assert s["skewness"][2] == 0 and np.isfinite(s["ks_to_normal"]).all()


def _snapshots(n=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    base = rng.normal(size=(n, 10)) + labels[:, None] * 4.0
    return [base * s + rng.normal(size=base.shape) * 0.1 for s in (0.5, 1.0, 1.5)], labels


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_embed_snapshots_aligned_and_separating(method):
    feats, labels = _snapshots()
    emb = analysis.embed_snapshots(feats, method, perplexity=15, n_neighbors=10)
    assert len(emb.coords) == 3 and all(c.shape == (80, 2) for c in emb.coords)
    for c in emb.coords:
        assert emb.xlim[0] <= c[:, 0].min() and c[:, 0].max() <= emb.xlim[1]
        # the two classes are separated in every snapshot
        d = np.linalg.norm(c[labels == 0].mean(0) - c[labels == 1].mean(0))
        spread = c[labels == 0].std(0).mean() + c[labels == 1].std(0).mean()
        assert d > spread
    if method == "pca":
        assert 0 < sum(emb.info["explained_variance_pct"]) <= 100
    else:  # consecutive snapshots stay aligned: class centroids point the same way
        a = emb.coords[1][labels == 1].mean(0) - emb.coords[1][labels == 0].mean(0)
        b = emb.coords[2][labels == 1].mean(0) - emb.coords[2][labels == 0].mean(0)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.8


def test_embed_errors():
    with pytest.raises(ValueError, match="method"):
        analysis.embed_snapshots([np.zeros((10, 3))], "lda")
    with pytest.raises(ValueError, match="same number"):
        analysis.embed_snapshots([np.zeros((10, 3)), np.zeros((9, 3))], "pca")
    with pytest.raises(ValueError, match="no snapshots"):
        analysis.embed_snapshots([], "pca")


# ----------------------------------------------------------------------------------------------- cluster quality
def _clustered(seed, n=240, d=12, groups=4, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, groups, n)
    centres = rng.normal(0, 3, (groups, d))
    return centres[y] + rng.normal(0, spread, (n, d)), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_quality_matches_sklearn(seed):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    f, y = _clustered(seed, spread=1.0 + seed)
    rng = np.random.default_rng(seed + 10)
    comps = np.where(rng.random(len(y)) < 0.7, y % 3, rng.integers(0, 5, len(y)))  # partly agreeing components
    ctx = y // 2
    q = analysis.cluster_quality(f, y, components=comps, contexts=ctx, seed=seed, k=5)
    assert q["silhouette"] == pytest.approx(silhouette_score(f, y), rel=1e-9, abs=1e-12)
    assert q["silhouette_context"] == pytest.approx(silhouette_score(f, ctx), rel=1e-9, abs=1e-12)
    perm = np.random.default_rng(seed).permutation(len(y))
    test, train = perm[:len(y) // 2], perm[len(y) // 2:]
    knn = KNeighborsClassifier(n_neighbors=5).fit(f[train], y[train]).score(f[test], y[test])
    assert q["knn_accuracy"] == pytest.approx(knn) and q["n_heldout"] == len(test)
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(y, comps), abs=1e-12)
    assert q["ari"] == pytest.approx(adjusted_rand_score(y, comps), abs=1e-12)
    assert q["nmi_context"] == pytest.approx(normalized_mutual_info_score(ctx, comps), abs=1e-12)
    assert q["ari_context"] == pytest.approx(adjusted_rand_score(ctx, comps), abs=1e-12)
    assert "nmi" not in analysis.cluster_quality(f, y, seed=seed)  # no components, no agreement


def test_cluster_quality_edge_cases_as_sklearn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    f, y = _clustered(3, n=60, groups=3)
    y = y.copy()
    y[0] = 7  # a group of one: its silhouette is 0
    assert analysis.silhouette(f, y) == pytest.approx(silhouette_score(f, y), rel=1e-9)
    assert analysis.silhouette(f, y, chunk=7) == pytest.approx(silhouette_score(f, y), rel=1e-9)  # row chunks
    assert np.isnan(analysis.silhouette(f, np.zeros(60)))  # one group: undefined
    for a, b in ((np.zeros(10), np.zeros(10)), (np.zeros(10), np.arange(10) % 2), (np.arange(10), np.arange(10)),
                 (np.arange(10) % 3, (np.arange(10) + 1) % 3)):
        assert analysis.normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
        assert analysis.adjusted_rand(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    # k-NN: tied votes go to the smallest label; k=1; string labels
    rng = np.random.default_rng(4)
    tr, te = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
    ytr = rng.integers(0, 4, 40)
    for k in (1, 2, 4, 6):
        sk = KNeighborsClassifier(n_neighbors=k).fit(tr, ytr).predict(te)
        assert analysis.knn_accuracy(tr, ytr, te, sk, k=k) == 1.0, k
    names = np.array(["a", "b", "c", "d"])[ytr]
    sk = KNeighborsClassifier(n_neighbors=3).fit(tr, names).predict(te)
    assert analysis.knn_accuracy(tr, names, te, sk, k=3) == 1.0
    with pytest.raises(ValueError, match="one entry per sample"):
        analysis.cluster_quality(f, y[:-1])
    with pytest.raises(ValueError, match="components"):
        analysis.cluster_quality(f, y, components=y[:-1])


def test_mixture_assignments_use_the_layers_mixture():
    torch.manual_seed(0)
    acn = cbnorm.build_norm("acn", 3, num_components=2).eval()
    x = torch.randn(6, 3, 4, 4)
    np.testing.assert_array_equal(analysis.mixture_assignments(acn, x), analysis.sample_components(acn, x))
    assert analysis.mixture_assignments(cbnorm.build_norm("bn", 3).eval(), x) is None
    mn = cbnorm.build_norm("mn", 3, num_components=2)
    mn.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # two well separated modes per channel
        mn(torch.cat([torch.randn(8, 3, 4, 4, generator=g) - 4, torch.randn(8, 3, 4, 4, generator=g) + 4]))
    mn.eval()
    assert analysis.sample_components(mn, x) is None
    xs = torch.cat([torch.randn(5, 3, 4, 4, generator=g) - 4, torch.randn(5, 3, 4, 4, generator=g) + 4])
    comps = analysis.mixture_assignments(mn, xs)
    w, mu, var = (t.double() for t in mn.mixture_parameters())
    pts = xs.double().reshape(10, 3, -1).transpose(1, 2)  # (N, P, C)
    logp = torch.stack([torch.distributions.Normal(mu[k], var[k].sqrt()).log_prob(pts).sum(-1) + w[k].log()
                        for k in range(len(w))], dim=-1)
    np.testing.assert_array_equal(comps, logp.softmax(-1).mean(1).argmax(1).numpy())
    assert len(set(comps[:5])) == 1 and len(set(comps[5:])) == 1 and comps[0] != comps[5]


def test_distribution_helpers():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(0, 1, 5000), [80.0, -60.0]])  # two outliers
    b = rng.normal(2, 0.5, 3000)
    p = analysis.distribution_percentiles(a)
    np.testing.assert_allclose(p, np.percentile(a, analysis.DISTRIBUTION_PERCENTILES))
    assert p[0] == -60 and p[-1] == 80
    lo, hi = analysis.robust_range([a, b], 0.005)
    assert lo == pytest.approx(np.quantile(a, 0.005)) and hi == pytest.approx(max(np.quantile(a, 0.995),
                                                                                 np.quantile(b, 0.995)))
    assert analysis.robust_range([a], 0.0) == (-60.0, 80.0)
    assert analysis.robust_range([b], 0.01, include=(-3, 3))[0] == -3
    edges = analysis.shared_bin_edges([a, b], lo, hi)
    both = np.concatenate([a, b])
    inside = both[(both >= lo) & (both <= hi)]  # the values shown, pooled: numpy's bin width over the range
    own = np.diff(np.histogram_bin_edges(inside, bins="auto"))[0]
    assert np.diff(edges)[0] == pytest.approx(own, rel=0.02) and edges[0] == lo and edges[-1] == hi
    assert len(analysis.shared_bin_edges([np.full(50, 1.0)], 0.0, 2.0)) == 11  # nothing to go by: min_bins
    assert len(analysis.shared_bin_edges([a], lo, hi, 25)) == 26
    dens, below, above = analysis.histogram_density(a, edges)
    assert below == int((a < lo).sum()) and above == int((a > hi).sum()) and below >= 1 and above >= 1
    assert (dens * np.diff(edges)).sum() == pytest.approx(1 - (below + above) / a.size)  # outliers keep their mass
    # pooled components: (1/G) sum over channels of each component, integrating to 1 in all
    grid = np.linspace(-30, 30, 6001)
    w = np.array([[0.3, 0.7], [0.5, 0.5]])
    m = np.array([[-2.0, 1.0], [0.0, 4.0]])
    v = np.array([[1.0, 0.5], [2.0, 1.0]])
    comps, total = analysis.pooled_component_curves(grid, w, m, v)
    assert comps.shape == (2, grid.size)
    assert np.trapezoid(total, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(comps[0], grid) == pytest.approx(0.4, abs=1e-6)
    single, _ = analysis.mixture_curves(grid, w, m, v)
    np.testing.assert_allclose(comps, single.mean(axis=0))


def test_tsne_step_does_not_depend_on_threads():
    """The app runs t-SNE with n_jobs = its cores (shared.PROJECTION_JOBS): the coordinates must not change."""
    feats, _ = _snapshots(n=120)
    a, _ = analysis.embed_step(feats[0], None, "tsne", perplexity=15, n_jobs=1)
    b, _ = analysis.embed_step(feats[0], None, "tsne", perplexity=15, n_jobs=2)
    np.testing.assert_array_equal(a, b)
    a2, _ = analysis.embed_step(feats[1], a, "tsne", perplexity=15, n_jobs=1)
    b2, _ = analysis.embed_step(feats[1], b, "tsne", perplexity=15, n_jobs=2)
    np.testing.assert_array_equal(a2, b2)
