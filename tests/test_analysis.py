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
