"""Image metrics: known answers, agreement with scikit-image's SSIM, LPIPS with fixed local weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.core import image_metrics as im
from stages.core.errors import InputError, ModelError


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.standard_normal((48, 40, 3)), axis=0), axis=1)
    return (smooth - smooth.min()) / np.ptp(smooth)


def test_identical_images_have_infinite_psnr_and_ssim_one(image):
    assert im.psnr(image, image) == math.inf
    assert im.ssim(image, image) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value_and_uint8_scaling(image):
    offset = np.clip(image, 0, 0.9) + 0.1 * (image <= 0.9)  # exactly +0.1 where it stays in range
    mse = np.mean((offset - image) ** 2)
    assert im.psnr(offset, image) == pytest.approx(10 * np.log10(1 / mse))
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255 // 10, np.uint8)  # MSE = (25/255)^2
    assert im.psnr(a, b) == pytest.approx(20 * np.log10(255 / 25))


@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_matches_scikit_image(image, noise):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    other = np.clip(image + noise * rng.standard_normal(image.shape), 0, 1)
    expected = structural_similarity(
        other, image, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
    )
    assert im.ssim(other, image) == pytest.approx(expected, abs=1e-10)


def test_shifted_image_scores_worse(image):
    shifted = np.roll(image, 3, axis=1)
    assert im.psnr(shifted, image) < 40 and im.ssim(shifted, image) < 0.95
    assert im.psnr(np.roll(image, 1, axis=1), image) > im.psnr(shifted, image)


def test_mask_restricts_psnr_and_ssim(image):
    changed = image.copy()
    changed[:, 20:] = 1 - changed[:, 20:]
    mask = np.zeros(image.shape[:2], bool)
    mask[:, :14] = True  # away from the change by more than the 5 px SSIM radius
    assert im.psnr(changed, image, mask) == math.inf
    assert im.ssim(changed, image, mask) == pytest.approx(1.0)
    assert im.ssim(changed, image) < 0.9
    with pytest.raises(InputError, match="no pixel"):
        im.psnr(changed, image, np.zeros_like(mask))


def test_composite_on_white():
    out = im.composite_on_white(np.zeros((2, 2, 3), np.uint8), np.array([[True, False], [False, True]]))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [1, 1, 1]


def test_shape_mismatch_is_input_error(image):
    with pytest.raises(InputError, match="one size"):
        im.psnr(image, image[:-1])


def test_lpips_skip_reason_names_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reason = im.lpips_unavailable("alex")
    assert reason is not None and "alexnet-owt-7be5be79.pth" in reason and "weights='DEFAULT'" in reason
    with pytest.raises(ModelError, match="not in the local cache"):
        im.LpipsScorer("alex")


def seed_random_alexnet(torch_home) -> None:
    """A random (seeded) AlexNet in the hub cache, as DESIGN.md suggests for offline tests."""
    import torch
    import torchvision

    path = im.lpips_weights_path("alex")
    assert torchvision.models.AlexNet_Weights.DEFAULT.url.endswith("/" + path.name)  # the name nvf looks for
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)


def test_lpips_zero_for_identical_and_positive_for_shift(image, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed_random_alexnet(tmp_path / "torch")
    assert im.lpips_unavailable("alex") is None
    scorer = im.LpipsScorer("alex")
    values = scorer([image, np.roll(image, 3, axis=1), np.roll(image, 8, axis=1)], [image, image, image])
    assert values[0] == 0.0
    assert 0 < values[1] < values[2]


def test_cosine_helpers():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # pairs: (0,1)=0, (0,2)=1/sqrt2, (1,2)=1/sqrt2
    assert im.mean_pairwise_cosine(emb) == pytest.approx(2 / np.sqrt(2) / 3)
    assert np.allclose(im.cosine_to([2.0, 0.0], emb), [1.0, 0.0, 1 / np.sqrt(2)])
    assert np.allclose(im.cosine_paired(emb, emb), 1.0)
    assert math.isnan(im.mean_pairwise_cosine(emb[:1]))


def test_fid_skip_reasons(tmp_path, monkeypatch):
    assert "fewer than fid_min_images=100" in im.fid_unavailable(12, 100)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert im.FID_WEIGHTS_FILE in im.fid_unavailable(500, 100)


def test_arcface_skip_reason_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    reason = im.arcface_unavailable()
    assert reason is not None and "buffalo_l" in reason  # empty model root: never available
