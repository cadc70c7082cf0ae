"""Train and test transforms: shapes, normalisation, rates and ranges of the random decisions,
and the applied pixels against an independent torchvision reference.

Rates are checked over thousands of per-sample generators with fixed seeds, within 4 binomial
standard deviations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from hpc_reid.config import AugmentConfig, ConfigError
from hpc_reid.data.transforms import (
    ERASE_ATTEMPTS,
    TestTransform,
    TrainParams,
    TrainTransform,
    sample_rng,
)

H, W = 32, 16
DRAWS = 4000


def random_image(seed: int, width: int = 20, height: int = 36) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def draw_params(augment: AugmentConfig, n: int = DRAWS, seed: int = 7) -> list[TrainParams]:
    t = TrainTransform(augment, H, W)
    return [t.sample_params(sample_rng(seed, 0, i)) for i in range(n)]


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def reference_train(img: Image.Image, augment: AugmentConfig, p: TrainParams) -> torch.Tensor:
    """BoT's pipeline from torchvision functional ops, with our drawn decisions."""
    img = img.resize((W, H), Image.Resampling.BILINEAR)
    if p.flip:
        img = TF.hflip(img)
    if p.jitter is not None:
        b, c, s = p.jitter
        x = TF.to_tensor(img)
        x = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
        x = TF.crop(TF.pad(x, augment.pad, fill=0), p.crop_top, p.crop_left, H, W)
    else:
        x = TF.to_tensor(TF.crop(TF.pad(img, augment.pad, fill=0), p.crop_top, p.crop_left, H, W))
    x = TF.normalize(x, augment.mean, augment.std)
    if p.erase is not None:
        top, left, h, w = p.erase
        x = TF.erase(x, top, left, h, w, torch.zeros(3, 1, 1))
    return x


def test_train_and_test_outputs_are_normalised_float_chw_of_the_configured_size():
    img = random_image(0)
    train = TrainTransform(AugmentConfig(), H, W)(img, sample_rng(0, 0, 0))
    test = TestTransform(AugmentConfig(), H, W)(img)
    for x in (train, test):
        assert x.shape == (3, H, W) and x.dtype == torch.float32 and x.is_contiguous()


def test_test_transform_is_resize_then_explicit_normalisation_formula():
    augment = AugmentConfig(mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))
    img = random_image(1)
    pixels = np.asarray(img.resize((W, H), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    expected = (pixels - np.array(augment.mean)) / np.array(augment.std)
    got = TestTransform(augment, H, W)(img).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_test_transform_is_deterministic_and_ignores_the_generator():
    img, t = random_image(2), TestTransform(AugmentConfig(), H, W)
    assert torch.equal(t(img), t(img, sample_rng(0, 0, 0)))
    assert torch.equal(t(img), t(img, sample_rng(5, 3, 9)))


def test_flip_rate_matches_flip_prob_within_4_sigma():
    for prob in (0.5, 0.2):
        flips = sum(p.flip for p in draw_params(AugmentConfig(flip_prob=prob)))
        assert within_binomial(flips, DRAWS, prob), (prob, flips)
    assert not any(p.flip for p in draw_params(AugmentConfig(flip_prob=0.0), n=500))


def test_erasing_rate_matches_probability_within_4_sigma():
    for prob in (0.5, 0.3):
        erased = sum(
            p.erase is not None for p in draw_params(AugmentConfig(random_erasing_prob=prob))
        )
        # With BoT's ranges a rectangle fits within 100 attempts essentially always.
        assert within_binomial(erased, DRAWS, prob), (prob, erased)
    off = draw_params(AugmentConfig(random_erasing_prob=0.0), n=500)
    assert all(p.erase is None for p in off)


def test_erased_rectangle_fits_and_has_configured_area_and_aspect_up_to_rounding():
    augment = AugmentConfig(random_erasing_prob=1.0, erasing_area=(0.05, 0.3), erasing_aspect=0.4)
    rects = [p.erase for p in draw_params(augment) if p.erase is not None]
    assert len(rects) > DRAWS * 0.95
    for top, left, h, w in rects:
        assert 0 < h < H and 0 < w < W
        assert 0 <= top <= H - h and 0 <= left <= W - w
        # h, w are rounded square roots: |h w - area| <= (h + w) / 2 + 3/4, |h / w| within
        # [r1, 1 / r1] widened by the half-pixel rounding of each side.
        slack = (h + w) / 2 + 0.75
        assert 0.05 * H * W - slack <= h * w <= 0.3 * H * W + slack
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.4 and (h + 0.5) / (w - 0.5) >= 0.4
    areas = np.array([h * w for _, _, h, w in rects]) / (H * W)
    assert areas.min() < 0.08 and areas.max() > 0.25  # the range is used, not a corner of it


def test_erasing_gives_up_when_no_rectangle_can_fit():
    # The whole image as target area never fits strictly inside (h < H and w < W).
    augment = AugmentConfig(random_erasing_prob=1.0, erasing_area=(1.0, 1.0), erasing_aspect=1.0)
    t = TrainTransform(augment, H, W)
    rng = sample_rng(0, 0, 0)
    assert t.sample_params(rng).erase is None
    # flip, crop (2), erase coin, then 2 draws per attempt: the same stream position every time.
    twin = sample_rng(0, 0, 0)
    twin.random(), twin.integers(0, 2 * augment.pad + 1, size=2), twin.random()
    twin.uniform(size=2 * ERASE_ATTEMPTS)
    assert rng.random() == twin.random()


def test_crop_offsets_are_uniform_over_0_to_2pad():
    pad = 3
    params = draw_params(AugmentConfig(pad=pad))
    for offsets in ([p.crop_top for p in params], [p.crop_left for p in params]):
        counts = np.bincount(offsets)
        assert len(counts) == 2 * pad + 1 and min(offsets) == 0
        for c in counts:
            assert within_binomial(int(c), DRAWS, 1 / (2 * pad + 1)), counts
    assert {(p.crop_top, p.crop_left) for p in draw_params(AugmentConfig(pad=0), 50)} == {(0, 0)}


@pytest.mark.parametrize("jitter", [False, True])
def test_applied_pixels_match_torchvision_reference(jitter):
    augment = AugmentConfig(
        pad=4,
        random_erasing_prob=0.7,
        color_jitter=jitter,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.3, 0.25),
    )
    t = TrainTransform(augment, H, W)
    seen_flip = seen_erase = 0
    for i in range(30):
        img = random_image(100 + i)
        p = t.sample_params(sample_rng(3, 1, i))
        seen_flip, seen_erase = seen_flip + p.flip, seen_erase + (p.erase is not None)
        torch.testing.assert_close(
            t.apply(img, p), reference_train(img, augment, p), atol=1e-5, rtol=0
        )
    assert 0 < seen_flip < 30 and 0 < seen_erase < 30


def test_padding_is_black_in_pixel_space_and_erasing_fills_the_mean_pixel():
    augment = AugmentConfig(pad=4, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    t = TrainTransform(augment, H, W)
    white = Image.new("RGB", (W, H), (255, 255, 255))
    x = t.apply(white, TrainParams(False, None, 0, 0, (10, 6, 5, 4)))
    pixels = x * torch.tensor(augment.std).view(3, 1, 1) + torch.tensor(augment.mean).view(3, 1, 1)
    # Crop at (0, 0) of the padded image: the top 4 rows and left 4 columns are padding.
    torch.testing.assert_close(pixels[:, :4], torch.zeros(3, 4, W), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, :, :4], torch.zeros(3, H, 4), atol=1e-6, rtol=0)
    mean = torch.tensor(augment.mean).view(3, 1, 1).expand(3, 5, 4)
    torch.testing.assert_close(pixels[:, 10:15, 6:10], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, 4:10, 4:], torch.ones(3, 6, W - 4), atol=1e-6, rtol=0)


def test_train_transform_is_deterministic_given_the_generator_and_varies_across_positions():
    augment = AugmentConfig(color_jitter=True)
    t, img = TrainTransform(augment, H, W), random_image(4)
    a = t(img, sample_rng(11, 2, 5))
    assert torch.equal(a, t(img, sample_rng(11, 2, 5)))
    assert torch.equal(a, t.apply(img, t.sample_params(sample_rng(11, 2, 5))))
    others = [t(img, sample_rng(*key)) for key in ((11, 2, 6), (11, 3, 5), (12, 2, 5))]
    assert not any(torch.equal(a, o) for o in others)


def test_padding_as_large_as_the_image_is_refused():
    with pytest.raises(ConfigError, match=r"loader.augment.pad=32: .*64 x 32"):
        TrainTransform(AugmentConfig(pad=32), 64, 32)
    TrainTransform(AugmentConfig(pad=31), 64, 32)
