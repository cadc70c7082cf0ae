"""A person walking through a tracklet: the per-frame shots of one detection track.

A tracklet of a video set (MARS, Zheng et al., ECCV 2016) is a detector's and a tracker's output:
the box follows the person, so the person stays roughly centred and the scene moves behind them.
What a tracklet fixes, drawn once by :func:`~hpc_reid.data.synthetic.camera.sample_shot`: the
person's view and flip, size, scene and clutter, illumination. What changes from frame to frame:

- gait: the walking phase cycles (``Shot.phase`` is a sine of the stride), with a vertical bob
  of the body twice per stride (highest when the legs pass each other);
- position: the box drifts slowly and jitters (the detector's noise) in x, y and scale;
- scene: the background and its clutter scroll past as the box follows the person, faster in a
  side view (the person crosses the scene) than towards or away from the camera;
- occlusion: in some tracklets an object (a passer-by, a pole, a car) crosses the frame, entering
  at one side and leaving at the other, possibly before the first or after the last frame;
- sensor: the noise pattern and a slight illumination flicker change with every frame.

Every random number comes from the tracklet's generator in a fixed order, so the frames are a
pure function of it, whichever process draws them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .camera import Camera, Shot, sample_shot
from .people import CLOTHING, Identity
from .render import SIDE

STRIDE_FRAMES = (8.0, 14.0)  # frames per gait cycle (two steps)
OCCLUSION_PROB = 0.4  # tracklets an object crosses
# the most of the scene's spare width a tracklet scrolls over: crossing it, walking to or away
SCROLL_SIDE, SCROLL_FRONT_BACK = 1.0, 0.35


def walk(
    rng: np.random.Generator,
    ident: Identity,
    cam: Camera,
    frames: int,
    height: int,
    width: int,
    junk: bool = False,
) -> list[Shot]:
    """The shots of a tracklet of ``frames`` frames (module docstring), in temporal order."""
    h, w, n = height, width, frames
    base = sample_shot(rng, ident, cam, h, w, junk)
    t = np.arange(n, dtype=np.float64)
    centred = t - (n - 1) / 2  # drifts are centred: the middle frame is the image set's shot

    angle = rng.uniform(0, 2 * np.pi) + 2 * np.pi * t / rng.uniform(*STRIDE_FRAMES)
    bob = 0.012 * base.height_px * np.cos(2 * angle)
    cx = base.cx + rng.uniform(-0.006, 0.006) * w * centred + rng.normal(0, 0.015 * w, n)
    top = base.top + rng.uniform(-0.003, 0.003) * h * centred - bob + rng.normal(0, 0.01 * h, n)
    scale = 1 + rng.uniform(-0.004, 0.004) * centred + rng.normal(0, 0.01, n)
    height_px = base.height_px * np.clip(scale, 0.85, 1.15)

    # the scene scrolls by whole sensor pixels within its spare width; clutter moves with it
    ws, spare = cam.sensor[1], cam.backgrounds.shape[2] - cam.sensor[1]
    most = SCROLL_SIDE if base.view == SIDE else SCROLL_FRONT_BACK
    span = most * rng.uniform(0.3, 1.0) * spare
    start = rng.uniform(0, spare - span)
    bg_x = start + span * t / max(n - 1, 1)
    if rng.random() < 0.5:
        bg_x = bg_x[::-1]
    bg_x = np.clip(np.rint(bg_x), 0, spare).astype(int)
    shift = (bg_x - bg_x[0]) * (w / ws)

    occluders = _crossing(rng, cam, n, h, w)
    gain = np.asarray(base.gain)[None, :] * (1 + rng.normal(0, 0.01, n))[:, None]
    noise_x, noise_y = rng.integers(0, 17, n), rng.integers(0, 17, n)
    return [
        replace(
            base,
            phase=float(np.sin(angle[i])),
            cx=float(cx[i]),
            top=float(top[i]),
            height_px=float(height_px[i]),
            bg_x=int(bg_x[i]),
            clutter=tuple(
                (x0 - shift[i], y0, x1 - shift[i], y1, *c) for x0, y0, x1, y1, *c in base.clutter
            ),
            occluder=occluders[i],
            gain=tuple(float(g) for g in gain[i]),
            noise_x=int(noise_x[i]),
            noise_y=int(noise_y[i]),
        )
        for i in range(n)
    ]


def _crossing(
    rng: np.random.Generator, cam: Camera, n: int, h: int, w: int
) -> list[tuple[float, ...] | None]:
    """Per frame, the box of an object crossing the frame, or None when it is out of view.

    The object moves from just outside one side (frame t0) to just outside the other (frame t1);
    t0 may precede the first frame and t1 follow the last, so a tracklet may start or end occluded.
    """
    if rng.random() >= OCCLUSION_PROB:
        return [None] * n
    if rng.random() < 0.5:  # a passer-by or a pole: a band over most of the height
        size, y0 = rng.uniform(0.2, 0.45) * w, rng.uniform(-0.2, 0.3) * h
    else:  # a car, a bench, a railing in front of the legs
        size, y0 = rng.uniform(0.5, 1.0) * w, rng.uniform(0.5, 0.8) * h
    source = CLOTHING if rng.random() < 0.5 else cam.palette
    colour = (source[rng.integers(len(source))] * rng.uniform(0.7, 1.2)).tolist()
    t0 = rng.uniform(-0.3, 0.6) * n
    t1 = t0 + max(rng.uniform(0.4, 1.0) * n, 3.0)
    rightwards = rng.random() < 0.5
    out: list[tuple[float, ...] | None] = []
    for i in range(n):
        f = (i - t0) / (t1 - t0)
        if not 0 < f < 1:
            out.append(None)
            continue
        x0 = -size + f * (w + size) if rightwards else w - f * (w + size)
        out.append((float(x0), float(y0), float(x0 + size), h + 1.0, 0.0, *colour))
    return out
