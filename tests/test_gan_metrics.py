"""cbnorm.metrics against independent references: the Fréchet distance against a plain numpy / scipy
implementation (scipy.linalg.sqrtm of the covariance product), known cases (a set against itself ~0, one
repeated image far away, two Gaussians with a closed form), k-NN precision / recall against a brute-force
double loop, and the class coverage on hand-made histograms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from cbnorm import metrics as M


def fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al.'s formula as pytorch-fid writes it: scipy.linalg.sqrtm of S_a S_b, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,n,m", [(1, 50, 40), (3, 200, 150), (16, 500, 300)])
def test_frechet_distance_matches_scipy_sqrtm(d, n, m):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(m, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    ours, ref = M.frechet_distance(a, b), fd_reference(a, b)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_frechet_distance_closed_form_of_two_gaussians():
    # diagonal covariances: FD = |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2
    mu_a, mu_b = np.zeros(3), np.array([1.0, -2.0, 0.5])
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    got = M.frechet_distance_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
    want = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-12)


def test_frechet_distance_known_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(2000, 8)) * np.arange(1, 9)
    assert M.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    # two halves of the same distribution: small next to the spread (sum of variances = 204)
    assert M.frechet_distance(real[:1000], real[1000:]) < 0.05 * np.trace(np.cov(real, rowvar=False))
    # one image repeated: the covariance collapses, FD = |mu - x|^2 + Tr(S_real)
    one = np.repeat(real[:1], 500, axis=0)
    fd = M.frechet_distance(real, one)
    s = np.cov(real, rowvar=False)
    assert fd == pytest.approx(((real.mean(0) - real[0]) ** 2).sum() + np.trace(s), rel=1e-6)
    assert fd > 100 * M.frechet_distance(real[:1000], real[1000:])


def test_frechet_distance_symmetric_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 4)), rng.normal(size=(80, 4)) + 1
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="same dimension"):
        M.frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        M.frechet_distance(a[:1], b)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(bad, b)


def _brute_pr(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    rr, fr = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= fr[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(50, 3)) * 0.5 + np.array([1.5, 0, 0])
    got = M.precision_recall(real, fake, k=k, chunk=7)
    prec, rec = _brute_pr(real, fake, k)
    assert got["precision"] == pytest.approx(prec)
    assert got["recall"] == pytest.approx(rec)
    assert got["k"] == k


def test_precision_recall_known_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 4))
    same = M.precision_recall(real, real.copy(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # a collapsed generator: its samples sit on the data (precision 1) but cover almost none of it
    collapsed = np.repeat(real[:1], 200, axis=0) + 1e-6 * rng.normal(size=(200, 4))
    pr = M.precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.05
    far = M.precision_recall(real, real + 100.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_knn_radii_checks_k():
    with pytest.raises(ValueError, match="k must be"):
        M.knn_radii(np.zeros((5, 2)), k=5)


def test_class_coverage():
    uniform = M.class_coverage(np.arange(1000) % 10, 10)
    assert uniform["modes"] == 10 and uniform["evenness"] == pytest.approx(1.0) and uniform["kl_uniform"] == pytest.approx(0)
    one = M.class_coverage(np.full(500, 3), 10)
    assert one["modes"] == 1 and one["evenness"] == 0.0 and one["kl_uniform"] == pytest.approx(math.log(10))
    # 2 stray predictions of class 9 in 1000 (0.2% < 1% = 0.1 of the uniform share) are not a mode
    p = np.concatenate([np.arange(998) % 5, [9, 9]])
    cov = M.class_coverage(p, 10)
    assert cov["modes"] == 5 and cov["counts"][9] == 2
    with pytest.raises(ValueError, match="class ids"):
        M.class_coverage(np.array([0, 10]), 10)


def test_to_uint8_and_image_grid():
    import torch

    from cbnorm.train.gan import image_grid

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert M.to_uint8(x).tolist() == [[[0, 128], [255, 255]]]
    imgs = np.zeros((5, 3, 4), np.uint8)
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (3 * 4 + 1, 2 * 5 + 1)
    assert image_grid(np.zeros((2, 3, 3, 3), np.uint8)).shape == (7, 12, 3)
