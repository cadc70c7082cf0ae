"""ReID image transforms with explicit semantics, shared by the torch and DALI loaders.

Training follows the "bag of tricks" baseline (Luo et al., "Bag of Tricks and a Strong Baseline
for Deep Person Re-identification", CVPRW 2019, section 3), in this order:

1. resize to (H, W), bilinear (PIL's, which low-pass filters when shrinking);
2. horizontal flip with probability ``flip_prob``;
3. optional colour jitter (off in BoT): brightness, then contrast, then saturation, each factor
   uniform in [0.8, 1.2], computed as torchvision's tensor ops on [0, 1] floats (clamped after
   each step); hue is left alone;
4. zero padding of ``pad`` pixels on every side, then a crop back to (H, W) whose top and left
   offsets into the padded image are uniform integers in [0, 2 pad]. Padding is black in pixel
   space, as BoT's ``T.Pad(10)`` on the PIL image before ``ToTensor``;
5. to float in [0, 1], then ``(x - mean) / std`` per channel;
6. random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020, Alg. 1) with
   probability ``random_erasing_prob``: up to 100 attempts draw a target area uniform in
   ``erasing_area`` x H W and an aspect ratio h / w log-uniform in [r1, 1 / r1]
   (r1 = ``erasing_aspect``); h = round(sqrt(area x aspect)), w = round(sqrt(area / aspect));
   the first draw with 0 < h < H and 0 < w < W is placed with top uniform in [0, H - h] and
   left uniform in [0, W - w]; if none fits nothing is erased. The rectangle is filled with 0
   in normalised space, i.e. the configured mean pixel. (BoT writes its CIFAR means 0.4914,
   0.4822, 0.4465 into the normalised tensor, which is neither the mean pixel nor the paper's
   random values; we take the mean pixel, which the normalised-space zero makes exact and
   backend independent.)

Test time: resize, to float, normalise.

Randomness. All random decisions of one sample are drawn first, in a fixed order, into a
:class:`TrainParams` by :meth:`TrainTransform.sample_params` from a numpy ``Generator``; they are
then applied by :meth:`TrainTransform.apply`. The draw order is: flip (one ``random()``), jitter
(three ``uniform``, only when enabled), crop (one ``integers`` call of size 2: top, left), erase
(one ``random()``, then per attempt ``uniform`` area and ``uniform`` log-aspect, and for the
fitting attempt ``integers`` top and left). Each sample's generator is
:func:`sample_rng` (seed, epoch, position), where position is the sample's place in the epoch's
global plan, so augmentation depends neither on the number of loader workers nor on where a run
was resumed. The DALI loader draws the same parameters on the CPU and feeds them to its
operators: both backends make identical random decisions, and pixels differ only by the JPEG
decoder's and resizer's rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hpc_reid.config import AugmentConfig, ConfigError

#: Colour jitter strength: each factor is uniform in [1 - JITTER, 1 + JITTER].
JITTER = 0.2
#: Random erasing gives up after this many rectangles that do not fit (Zhong et al., Alg. 1).
ERASE_ATTEMPTS = 100
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at ``position`` of ``epoch``'s global plan."""
    return np.random.default_rng([seed, epoch, position])


@dataclass(frozen=True, slots=True)
class TrainParams:
    """The random decisions of one training sample (see the module docstring for the ranges)."""

    flip: bool
    #: (brightness, contrast, saturation) factors, or None without colour jitter.
    jitter: tuple[float, float, float] | None
    #: Offsets of the (H, W) crop into the image padded by ``pad`` on each side, in [0, 2 pad].
    crop_top: int
    crop_left: int
    #: (top, left, height, width) of the erased rectangle on the (H, W) output, or None.
    erase: tuple[int, int, int, int] | None


def resize_to_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of an RGB PIL image to a (3, height, width) uint8 tensor."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (3, H, W) to ``(x - mean) / std``, contiguous float32."""
    pixels = x.dtype == torch.uint8
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return (x.div_(255.0) if pixels else x).sub_(mean).div_(std)


def _blend(img: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float
) -> torch.Tensor:
    """Brightness, contrast, saturation on a [0, 1] float (3, H, W) tensor, torchvision style."""
    luma = torch.tensor(LUMA, dtype=x.dtype).view(3, 1, 1)
    x = _blend(x, 0.0, brightness)
    x = _blend(x, (x * luma).sum(0).mean(), contrast)
    return _blend(x, (x * luma).sum(0, keepdim=True), saturation)


def shift_with_zeros(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved down by ``dy`` and right by ``dx`` pixels, zeros where nothing lands.

    Zero padding by ``pad`` followed by a crop at (top, left) equals a shift by
    (pad - top, pad - left); this avoids building the padded image.
    """
    out = torch.zeros_like(x)
    h, w = x.shape[-2] - abs(dy), x.shape[-1] - abs(dx)
    if h > 0 and w > 0:
        ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
        out[:, ty : ty + h, tx : tx + w] = x[:, sy : sy + h, sx : sx + w]
    return out


class TrainTransform:
    """BoT training augmentation of a PIL image, reproducible given a numpy ``Generator``.

    ``transform(img, rng)`` returns a normalised float32 (3, height, width) tensor; it equals
    ``transform.apply(img, transform.sample_params(rng))``.
    """

    def __init__(self, augment: AugmentConfig, height: int, width: int) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height} x {width}")
        if augment.pad >= min(height, width):
            raise ConfigError(
                f"loader.augment.pad={augment.pad}: must be smaller than the image's height "
                f"and width ({height} x {width}); a larger padding can crop to pure padding"
            )
        self.augment, self.height, self.width = augment, int(height), int(width)
        self.mean = torch.tensor(augment.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(augment.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        if rng is None:
            raise ValueError("TrainTransform needs the sample's generator (sample_rng), got None")
        return self.apply(img, self.sample_params(rng))

    def sample_params(self, rng: np.random.Generator) -> TrainParams:
        """Draw one sample's decisions, in the order the module docstring fixes."""
        a = self.augment
        flip = bool(rng.random() < a.flip_prob)
        jitter = None
        if a.color_jitter:
            b, c, s = rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=3).tolist()
            jitter = (b, c, s)
        top, left = rng.integers(0, 2 * a.pad + 1, size=2).tolist()
        return TrainParams(flip, jitter, top, left, self._sample_erase(rng))

    def _sample_erase(self, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        a, height, width = self.augment, self.height, self.width
        if not rng.random() < a.random_erasing_prob:
            return None
        lo, hi = a.erasing_area
        log_lo, log_hi = math.log(a.erasing_aspect), math.log(1.0 / a.erasing_aspect)
        for _ in range(ERASE_ATTEMPTS):
            area = rng.uniform(lo, hi) * height * width
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if 0 < h < height and 0 < w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        return None

    def apply(self, img: Image.Image, params: TrainParams) -> torch.Tensor:
        """Apply the decisions ``params`` to ``img``; deterministic."""
        x = resize_to_tensor(img, self.height, self.width)
        if params.flip:
            x = x.flip(-1)
        if params.jitter is not None:
            x = color_jitter(x.to(torch.float32).div_(255.0), *params.jitter)
        pad = self.augment.pad
        x = shift_with_zeros(x, pad - params.crop_top, pad - params.crop_left)
        x = _normalise(x, self.mean, self.std)
        if params.erase is not None:
            top, left, h, w = params.erase
            x[:, top : top + h, left : left + w] = 0.0
        return x


class TestTransform:
    """Test-time transform: bilinear resize to (height, width), to [0, 1] float, normalise.

    Takes (and ignores) a generator so that loaders call both transforms alike.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, augment: AugmentConfig, height: int, width: int) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height} x {width}")
        self.height, self.width = int(height), int(width)
        self.mean = torch.tensor(augment.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(augment.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return _normalise(resize_to_tensor(img, self.height, self.width), self.mean, self.std)
