"""People of the synthetic set: a semantics-aligned texture map and a body per identity.

Every person is painted from a canonical texture map, as the texture images of SAN (Jin et al.,
"Semantics-Aligned Representation Learning for Person Re-identification", AAAI 2020): a pose- and
camera-independent image in which each body part has a fixed place. The renderer maps every pixel
of every body part to a texture coordinate and gathers it, so the map is the only source of a
person's appearance. Layout (rows x columns of the 128 x 64 map):

    rows   0-15   head, front (cols 0-31) and back (cols 32-63)
    rows  16-63   upper garment: torso front (0-23), torso back (24-47), arms (48-63; rows run
                  from shoulder to hand)
    rows  64-111  lower garment: legs front (0-23), legs back (24-47); bag (48-63)
    rows 112-127  shoes
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEX_H, TEX_W = 128, 64
# (row0, row1, col0, col1) of each part's region in the texture map
HEAD_FRONT = (0, 16, 0, 32)
HEAD_BACK = (0, 16, 32, 64)
HEAD_SIDE = (0, 16, 16, 48)
HAIR = (0, 5, 36, 60)
SKIN = (13, 16, 12, 20)
TORSO_FRONT = (16, 64, 0, 24)
TORSO_BACK = (16, 64, 24, 48)
ARMS = (16, 64, 48, 64)
LEGS_FRONT = (64, 112, 0, 24)
LEGS_BACK = (64, 112, 24, 48)
BAG = (64, 112, 48, 64)
SHOES = (112, 128, 0, 64)
TEXTURE_LAYOUT = {
    "head_front": HEAD_FRONT,
    "head_back": HEAD_BACK,
    "torso_front": TORSO_FRONT,
    "torso_back": TORSO_BACK,
    "arms": ARMS,
    "legs_front": LEGS_FRONT,
    "legs_back": LEGS_BACK,
    "bag": BAG,
    "shoes": SHOES,
}

# A small clothing palette: many identities share colours, so colour alone does not identify.
CLOTHING = np.array(
    [
        (28, 28, 32), (230, 230, 225), (128, 128, 130), (35, 45, 95), (45, 95, 185),
        (175, 35, 40), (45, 120, 65), (115, 110, 55), (115, 75, 45), (200, 180, 140),
        (215, 185, 50), (110, 55, 140), (215, 125, 160), (70, 150, 160),
    ],
    dtype=np.float32,
)  # fmt: skip
SKIN_TONES = np.array(
    [(250, 215, 185), (230, 185, 150), (195, 145, 110), (150, 100, 70), (100, 68, 48)], np.float32
)
HAIR_COLOURS = np.array(
    [(22, 20, 20), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150), (125, 45, 25)],
    np.float32,
)
SHOE_COLOURS = np.array(
    [(20, 20, 22), (235, 235, 235), (100, 65, 40), (90, 90, 95), (35, 55, 115), (165, 40, 40)],
    np.float32,
)
UPPER_KINDS = (0.35, 0.2, 0.15, 0.15, 0.15)  # solid, stripes, checks, dots, gradient
LOWER_KINDS = (0.6, 0.15, 0.1, 0.05, 0.1)


@dataclass(frozen=True, eq=False)
class Identity:
    """What stays the same for a person across cameras."""

    texture: np.ndarray  # TEX_H x TEX_W x 3 uint8, the canonical appearance
    flat: np.ndarray  # the same map as (TEX_H * TEX_W, 3) float32, what drawing gathers from
    height: float  # fraction of a full-height box
    build: float  # width multiplier
    long_hair: bool
    bag: int  # 0 none, 1 backpack, 2 shoulder bag
    bag_side: float  # +1 on the person's left, -1 on the right


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float) -> np.ndarray:
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _pattern(rng: np.random.Generator, h: int, w: int, kinds: tuple[float, ...]) -> np.ndarray:
    """A garment: solid, stripes, checks, dots or gradient in two palette colours."""
    kind = rng.choice(5, p=kinds)
    i, j = rng.choice(len(CLOTHING), 2, replace=False)
    c1, c2 = _jitter(rng, CLOTHING[i], 12), _jitter(rng, CLOTHING[j], 12)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    period = float(rng.integers(4, 10))
    if kind == 0:
        m = np.zeros((h, w), np.float32)
    elif kind == 1:
        axis = y if rng.random() < 0.7 else x
        m = np.broadcast_to((axis % period) < period * rng.uniform(0.3, 0.6), (h, w))
    elif kind == 2:
        m = ((y // period + x // period) % 2).astype(np.float32)
    elif kind == 3:
        half = period / 2
        m = ((y % period - half) ** 2 + (x % period - half) ** 2) < (period * 0.3) ** 2
    else:
        m = np.broadcast_to(y / (h - 1), (h, w))
    m = np.asarray(m, np.float32)[..., None]
    return c1 * (1 - m) + c2 * m


def make_identity(rng: np.random.Generator) -> Identity:
    """Draw a person: body, skin, hair, garments, shoes and bag, painted into a texture map."""
    tex = np.zeros((TEX_H, TEX_W, 3), np.float32)
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 10)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10)
    hair_length = int(rng.integers(3))  # short, medium, long
    head = tex[0:16]
    head[:] = skin
    head[: 3 + hair_length, :32] = hair
    head[: (9, 12, 16)[hair_length], 32:] = hair
    if hair_length == 2:
        head[:14, :4] = hair
        head[:14, 28:32] = hair
    head[7:9, 10:12] = head[7:9, 20:22] = skin * 0.3  # eyes
    head[11, 13:19] = skin * 0.7

    tex[16:64] = _pattern(rng, 48, 64, UPPER_KINDS)
    sleeve = 16 + (18 if rng.random() < 0.35 else 42)
    tex[sleeve:64, 48:64] = skin
    tex[58:64, 48:64] = skin  # hands
    tex[16:19, 8:16] = skin  # neckline
    if rng.random() < 0.35:  # a print on the chest, seen only from the front
        tex[24:32, 6:18] = _jitter(rng, CLOTHING[rng.integers(len(CLOTHING))], 12)

    tex[64:112, 0:48] = _pattern(rng, 48, 48, LOWER_KINDS)
    if rng.random() < 0.2:  # shorts
        tex[90:112, 0:48] = skin
    bag = int(rng.choice(3, p=(0.45, 0.3, 0.25)))
    bag_colour = _jitter(rng, CLOTHING[rng.integers(len(CLOTHING))], 15)
    tex[64:112, 48:64] = bag_colour
    tex[72:74, 48:64] = bag_colour * 0.6  # flap seam
    tex[112:128] = _jitter(rng, SHOE_COLOURS[rng.integers(len(SHOE_COLOURS))], 10)
    tex[124:128] *= 0.6  # soles
    texture = np.clip(tex + 0.5, 0, 255).astype(np.uint8)
    return Identity(
        texture=texture,
        flat=texture.reshape(-1, 3).astype(np.float32),
        height=float(rng.uniform(0.86, 1.0)),
        build=float(rng.uniform(0.8, 1.2)),
        long_hair=hair_length == 2,
        bag=bag,
        bag_side=float(rng.choice((-1.0, 1.0))),
    )
