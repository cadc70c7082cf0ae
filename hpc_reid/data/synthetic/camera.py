"""Cameras and per-image nuisances of the synthetic set.

A camera fixes what all its images share: illumination gain and colour cast, sensor resolution
(drawn small and up-sampled: blur), typical framing, the viewpoints people pass it in, and a set of
cluttered scenes in its own palette. A shot is everything random about one image: viewpoint,
horizontal flip, scale and position jitter, walking phase, scene crop, extra clutter, an occluding
object, illumination jitter and sensor noise. Only these two ``make``/``sample`` functions draw
random numbers; drawing a shot is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .people import CLOTHING, Identity


@dataclass(frozen=True, eq=False)
class Camera:
    """What a camera does to every image it takes: light, optics, scene, typical viewpoint."""

    gain: np.ndarray  # (3,) brightness x colour cast
    sensor: tuple[int, int]  # (h, w) drawn, then up-sampled to the box: optics and resolution
    scale: float  # typical person height as a fraction of the box
    view_p: np.ndarray  # probabilities of front, back, side views
    palette: np.ndarray  # (k, 3) colours of the scene
    backgrounds: np.ndarray  # (n, h + h/4, w + w/2, 3) float32 scenes at sensor resolution
    noise: np.ndarray  # (h + 16, w + 16, 3) float32 sensor noise to crop from


@dataclass(frozen=True)
class Shot:
    """Everything random about one image; :func:`draw` renders it deterministically."""

    view: int
    flip: bool
    height_px: float
    cx: float
    top: float
    phase: float  # walking phase in [-1, 1]
    background: int
    bg_x: int
    bg_y: int
    clutter: tuple[tuple[float, ...], ...]  # (x0, y0, x1, y1, r, g, b), unflipped frame
    occluder: tuple[float, ...] | None  # (x0, y0, x1, y1, is_ellipse, r, g, b), final frame
    gain: tuple[float, float, float]
    noise_x: int
    noise_y: int
    noise: bool = True


def _smooth_noise(rng: np.random.Generator, h: int, w: int, amplitude: float) -> np.ndarray:
    small = rng.uniform(-amplitude, amplitude, (6, 4, 3)).astype(np.float32)
    up = [Image.fromarray(small[..., c], "F").resize((w, h), Image.BILINEAR) for c in range(3)]
    return np.stack([np.asarray(u) for u in up], axis=-1)


def _scene(rng: np.random.Generator, palette: np.ndarray, h: int, w: int) -> np.ndarray:
    """A background: a wall above a floor, both cluttered with doors, windows, poles, plants."""
    wall, floor = palette[rng.choice(len(palette), 2, replace=False)]
    img = np.empty((h, w, 3), np.float32)
    horizon = int(rng.uniform(0.3, 0.75) * h)
    img[:horizon] = wall
    img[horizon:] = floor * np.linspace(0.85, 1.1, h - horizon, dtype=np.float32)[:, None, None]
    for _ in range(int(rng.integers(5, 12))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(2, w // 2), y0 + rng.integers(2, h // 3)
        img[y0:y1, x0:x1] = palette[rng.integers(len(palette))] * rng.uniform(0.6, 1.3)
    return img + _smooth_noise(rng, h, w, 25)


def make_camera(rng: np.random.Generator, height: int, width: int, scenes: int = 8) -> Camera:
    """Draw a camera: illumination gain and cast, sharpness, framing, viewpoints, scenes."""
    cast = rng.uniform(0.75, 1.25, 3)
    # scenes are mostly greyish (concrete, glass, foliage), with some clothing-like colours
    scene = rng.uniform(40, 210, (5, 3))
    scene = scene.mean(1, keepdims=True) + rng.uniform(0.2, 0.7, (5, 1)) * (
        scene - scene.mean(1, keepdims=True)
    )
    palette = np.concatenate([scene, CLOTHING[rng.choice(len(CLOTHING), 2, replace=False)]])
    palette = palette.astype(np.float32)
    sharpness = float(rng.choice((1.0, 0.85, 0.7, 0.55)))
    h, w = round(height * sharpness), round(width * sharpness)
    noise = rng.standard_normal((h + 16, w + 16, 3)) * rng.uniform(3, 10)
    return Camera(
        gain=(rng.uniform(0.6, 1.25) * cast / cast.mean()).astype(np.float32),
        sensor=(h, w),
        scale=float(rng.uniform(0.8, 0.95)),
        view_p=rng.dirichlet((2.0, 2.0, 1.5)),
        palette=palette,
        backgrounds=np.stack([_scene(rng, palette, h + h // 4, w + w // 2) for _ in range(scenes)]),
        noise=noise.astype(np.float32),
    )


def sample_shot(
    rng: np.random.Generator, ident: Identity, cam: Camera, height: int, width: int, junk=False
) -> Shot:
    """Draw the per-image nuisances: viewpoint, flip, framing, scene crop, clutter, occluder."""
    h, w = height, width
    height_px = h * cam.scale * ident.height * rng.uniform(0.9, 1.06)
    top = (h - height_px) * rng.uniform(0.15, 0.85)
    cx = w / 2 + rng.normal(0, 0.07 * w)
    if junk:  # a bad detection: mostly background, a body part, or a far-away person
        mode = rng.integers(3)
        if mode == 0:
            cx = w / 2 + rng.choice((-1, 1)) * rng.uniform(0.6, 1.0) * w
        elif mode == 1:
            height_px = h * rng.uniform(1.6, 2.6)
            top = -height_px * rng.uniform(0.1, 0.6)
        else:
            height_px = h * rng.uniform(0.25, 0.45)
            top = rng.uniform(0, h - height_px)
            cx = rng.uniform(0.1, 0.9) * w
    (hs, ws), (_, hb, wb, _) = cam.sensor, cam.backgrounds.shape
    clutter = []
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        colour = cam.palette[rng.integers(len(cam.palette))] * rng.uniform(0.6, 1.3)
        sx, sy = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.4) * h
        clutter.append((x0, y0, x0 + sx, y0 + sy, *colour.tolist()))
    occluder = None
    if rng.random() < 0.3:
        kind = rng.integers(3)
        if kind == 0:  # a car, a bench, a railing in front of the legs
            y0 = rng.uniform(0.5, 0.8) * h
            box = (rng.uniform(-0.3, 0.3) * w, y0, rng.uniform(0.7, 1.3) * w, h + 1.0)
        elif kind == 1:  # a pole or a passer-by at one side
            half = rng.uniform(0.2, 0.45) * w
            x = rng.choice((0.0, w - half))
            box = (x, rng.uniform(-0.2, 0.3) * h, x + half, h + 1.0)
        else:  # a blob: a head, an umbrella, a bag
            sx, sy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.35) * h
            x0, y0 = rng.uniform(-0.2, 0.8) * w, rng.uniform(0.0, 0.8) * h
            box = (x0, y0, x0 + sx, y0 + sy)
        source = CLOTHING if rng.random() < 0.5 else cam.palette
        colour = source[rng.integers(len(source))] * rng.uniform(0.7, 1.2)
        occluder = (*(float(b) for b in box), float(kind == 2), *colour.tolist())
    gain = cam.gain * rng.uniform(0.85, 1.15) * (1 + rng.normal(0, 0.03, 3))
    return Shot(
        view=min(int(np.searchsorted(np.cumsum(cam.view_p), rng.random(), "right")), 2),
        flip=bool(rng.random() < 0.5),
        height_px=float(height_px),
        cx=float(cx),
        top=float(top),
        phase=float(rng.uniform(-1, 1)),
        background=int(rng.integers(len(cam.backgrounds))),
        bg_x=int(rng.integers(0, wb - ws + 1)),
        bg_y=int(rng.integers(0, hb - hs + 1)),
        clutter=tuple(clutter),
        occluder=occluder,
        gain=tuple(float(g) for g in gain),
        noise_x=int(rng.integers(0, 17)),
        noise_y=int(rng.integers(0, 17)),
    )
