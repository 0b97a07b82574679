"""Synthetic ultrasound degradation for the enhancement task."""

from __future__ import annotations

import numpy as np
import pytest

from usfm_edge.core.metrics import psnr, ssim
from usfm_edge.data.degrade import DegradeConfig, degrade, gaussian_blur


@pytest.fixture(scope="module")
def clean(sample_frames) -> list[np.ndarray]:
    return [f.astype(np.float32) / 255.0 for f in sample_frames[:3]]


def test_degrade_reduces_quality(clean):
    for i, frame in enumerate(clean):
        out = degrade(frame, np.random.default_rng(i))
        assert out.shape == frame.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert psnr(out, frame) < 35.0 and ssim(out, frame) < 0.95
        assert psnr(out, frame) > 10.0  # degraded, not destroyed


def test_degrade_is_deterministic(clean):
    frame = clean[0]
    a, pa = degrade(frame, np.random.default_rng(7), return_params=True)
    b, pb = degrade(frame, np.random.default_rng(7), return_params=True)
    np.testing.assert_array_equal(a, b)
    assert pa == pb and set(pa) == set(DegradeConfig().__dataclass_fields__)
    c = degrade(frame, np.random.default_rng(8))
    assert not np.array_equal(a, c)


def test_degrade_config_and_inputs(clean):
    fixed = DegradeConfig(psf_sigma_axial=(1.0, 1.0), psf_sigma_lateral=(2.0, 2.0), looks=(4.0, 4.0),
                          speckle_corr=(1.0, 1.0), gain=(0.8, 0.8), gamma=(1.0, 1.0), offset=(0.0, 0.0),
                          noise_std=(0.01, 0.01))
    _, params = degrade(clean[0], np.random.default_rng(0), fixed, return_params=True)
    assert params["gain"] == 0.8 and params["psf_sigma_lateral"] == 2.0
    milder = DegradeConfig(looks=(50.0, 50.0), noise_std=(0.0, 0.0), gain=(1.0, 1.0), gamma=(1.0, 1.0),
                           offset=(0.0, 0.0), psf_sigma_axial=(0.3, 0.3), psf_sigma_lateral=(0.3, 0.3))
    assert psnr(degrade(clean[0], np.random.default_rng(0), milder), clean[0]) > psnr(
        degrade(clean[0], np.random.default_rng(0)), clean[0])
    with pytest.raises(ValueError):
        DegradeConfig(gain=(0.9, 0.5))
    with pytest.raises(ValueError):
        degrade(np.zeros((2, 8, 8)), np.random.default_rng(0))


def test_gaussian_blur_preserves_mean_and_constants():
    img = np.random.default_rng(0).random((32, 40))
    out = gaussian_blur(img, 1.5, 2.5)
    assert out.shape == img.shape and abs(out.mean() - img.mean()) < 0.01 and out.std() < img.std()
    np.testing.assert_allclose(gaussian_blur(np.full((10, 10), 0.3), 1.0), 0.3)
