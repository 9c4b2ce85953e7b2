"""cbnorm.analysis.multimodality: BIC of 1-D Gaussian mixtures per channel, against scikit-learn's
GaussianMixture on the same arrays and on mixtures whose number of modes is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.mixture import GaussianMixture

from cbnorm.analysis import multimodality


def modes(rng: np.random.Generator, k: int, m: int, sep: float = 6.0) -> np.ndarray:
    """M values of a 1-D mixture of k unit Gaussians ``sep`` apart with unequal weights."""
    w = np.arange(1, k + 1, dtype=float)
    comp = rng.choice(k, size=m, p=w / w.sum())
    return rng.normal(comp * sep, 1.0)


def sk_bic(row: np.ndarray, max_k: int = 4, seed: int = 0) -> np.ndarray:
    x = row[:, None]
    return np.array([GaussianMixture(k, random_state=seed).fit(x).bic(x) for k in range(1, max_k + 1)])


def test_same_choice_and_bic_as_sklearn_on_clear_cases():
    """Gaussian, 2- and 3-mode channels (scaled and shifted as activations are): the same best K as
    scikit-learn; BIC = -2 M mean log p + (3K - 1) log M, so differences are compared per point (in nats,
    BIC / 2M): K = 1 to 1e-6 (closed form; sklearn's reg_covar is absolute, ours relative to the channel's
    variance, which moves the 0.01-scaled row's likelihood by 6e-7), the chosen K to 1e-4, every other K to 3e-3 (where K is too
    large, EM's local optima differ: a few BIC units at M = 3,000)."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 1, 3000), modes(rng, 2, 3000), modes(rng, 3, 3000), rng.normal(0, 1, 3000),
            modes(rng, 2, 3000, sep=5.0)]
    v = np.stack([r * s + o for r, s, o in zip(rows, (0.2, 3.0, 1.0, 50.0, 0.01), (5.0, -2.0, 0.0, 1e3, 0.3))])
    out = multimodality(v, max_components=4, seed=0)
    for i, row in enumerate(v):
        ref = sk_bic(row)
        assert out["best_k"][i] == np.argmin(ref) + 1, (i, out["bic"][i], ref)
        per_point = np.abs(out["bic"][i] - ref) / (2 * v.shape[1])
        assert per_point[0] <= 1e-6 and per_point[out["best_k"][i] - 1] <= 1e-4, (i, out["bic"][i], ref)
        assert (per_point <= 3e-3).all(), (i, out["bic"][i], ref)
    assert list(out["best_k"]) == [1, 2, 3, 1, 2]
    np.testing.assert_allclose(out["bic_gain"], out["bic"][:, 0] - out["bic"].min(1))
    assert (out["bic_gain"][[0, 3]] == 0).all() and (out["bic_gain"][[1, 2, 4]] > 100).all()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_known_number_of_well_separated_modes_is_found_within_one(k):
    rng = np.random.default_rng(k)
    v = np.stack([modes(rng, k, 4096, sep=7.0) for _ in range(6)])
    out = multimodality(v, max_components=4, seed=k)
    assert (np.abs(out["best_k"] - k) <= 1).all(), out["best_k"]
    assert (out["best_k"] == k).mean() >= 0.8  # and most often exactly


def test_gaussian_channels_are_one_mode_in_at_least_95_percent_of_seeds():
    hits = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        v = rng.normal(rng.normal(0, 3, (20, 1)), rng.uniform(0.1, 5, (20, 1)), (20, 2048))
        out = multimodality(v, max_components=4, seed=seed)
        hits += list(out["best_k"] == 1)
    assert np.mean(hits) >= 0.95, np.mean(hits)


def test_min_weight_skewness_and_invariance():
    rng = np.random.default_rng(3)
    comp = rng.random(8000) < 0.25
    row = np.where(comp, rng.normal(-4, 0.7, 8000), rng.normal(2, 1.0, 8000))
    v = np.stack([row, rng.gamma(2.0, 1.0, 8000)])
    out = multimodality(v, max_components=3)
    assert out["best_k"][0] == 2 and abs(out["min_weight"][0] - comp.mean()) < 0.01
    np.testing.assert_allclose(out["skewness"], sps.skew(v, axis=1), rtol=1e-9)
    moved = multimodality(-3.0 * v + 7.0, max_components=3)  # the evidence does not depend on units
    np.testing.assert_array_equal(moved["best_k"], out["best_k"])
    np.testing.assert_allclose(moved["bic_gain"], out["bic_gain"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moved["skewness"], -out["skewness"], rtol=1e-9)
    as_tensor = multimodality(torch.tensor(v, dtype=torch.float32), max_components=3)
    np.testing.assert_array_equal(as_tensor["best_k"], out["best_k"])


def test_constant_channels_and_a_point_mass_beside_spread():
    rng = np.random.default_rng(1)
    v = np.stack([np.full(500, 2.5), np.zeros(500), rng.normal(0, 1, 500)])
    out = multimodality(v)
    assert list(out["constant"]) == [True, True, False]
    assert list(out["best_k"][:2]) == [1, 1] and (out["bic_gain"][:2] == 0).all()
    assert (out["skewness"][:2] == 0).all() and np.isfinite(out["bic"]).all()


def test_bad_values_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"\(G, M\)"):
        multimodality(np.zeros(10))
    with pytest.raises(ValueError, match=r"M >= 4"):
        multimodality(np.zeros((3, 3)))
    v = np.random.default_rng(0).normal(size=(4, 100))
    v[2, 5] = np.nan
    v[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN or inf entries, in channel\(s\) \[2, 3\]"):
        multimodality(v)
    with pytest.raises(ValueError, match="max_components"):
        multimodality(np.zeros((2, 10)), max_components=0)
