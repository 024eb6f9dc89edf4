"""The evaluation kit's Frechet distance (NumPy only) against scipy's matrix square root, the
formula it replaces, and against the closed form for Gaussians whose covariances commute."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from guidance_engine.pipelines.toy.evaluation import frechet_distance

linalg = pytest.importorskip("scipy.linalg")


def scipy_frechet(a: np.ndarray, b: np.ndarray, ridge: float = 0.0) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eye = np.eye(len(s1)) * ridge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = np.real(linalg.sqrtm((s1 + eye) @ (s2 + eye)))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("samples, dim, seed", [(400, 8, 0), (200, 32, 1), (1000, 3, 2)])
def test_equals_scipy_sqrtm_on_full_rank_covariances(samples, dim, seed) -> None:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim))
    a = rng.normal(size=(samples, dim)) @ mix
    b = rng.normal(size=(samples, dim)) @ mix.T * 1.3 + 0.5
    want = scipy_frechet(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_few_samples_singular_covariances_agree_with_a_ridged_sqrtm() -> None:
    """16 samples of 64 features (the evaluation kit's small runs): rank-deficient covariances.
    scipy's sqrtm needs a ridge there (the old code's fallback); the eigendecomposition does not,
    and agrees with a tiny-ridge sqrtm to the ridge's order."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(16, 64)), rng.normal(size=(16, 64)) + 0.2
    got = frechet_distance(a, b)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(scipy_frechet(a, b, ridge=1e-9), rel=1e-5)


def test_closed_form_for_diagonal_gaussians_and_zero_for_identical_sets() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200000, 3))
    a, b = x * np.array([1.0, 2.0, 3.0]), x * np.array([2.0, 2.0, 1.0]) + np.array([1.0, 0.0, 0.0])
    # |mu|^2 + sum (sigma1 - sigma2)^2 for diagonal covariances, up to the sample covariances
    assert frechet_distance(a, b) == pytest.approx(1.0 + 1.0 + 0.0 + 4.0, rel=1e-2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
