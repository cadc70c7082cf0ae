"""Drawing one image of a person: skeleton, body parts painted from the texture map, scene.

Coordinates are continuous pixel coordinates: the image's top-left corner is (0, 0) and pixel
(row i, column j) covers [j, j+1) x [i, i+1). Keypoints are named anatomically: in a front view the
person's left shoulder is at the larger x, in a back view at the smaller x; a side view faces +x
before flipping (its left side, away from the camera, is hidden). A horizontal flip maps x to
W - x and swaps the left/right names, so these invariants hold for flipped images too.

Body parts are vectorised masks (capsules, ellipses, trapezoids) evaluated only inside their
bounding boxes; each painted pixel stores an index into the texture map, and one gather at the end
colours the whole image. :func:`draw` is a pure function of its arguments, which is what makes the
set reproducible in any process.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
from PIL import Image

from .camera import Camera, Shot
from .people import (
    ARMS,
    BAG,
    HAIR,
    HEAD_BACK,
    HEAD_FRONT,
    HEAD_SIDE,
    LEGS_BACK,
    LEGS_FRONT,
    SHOES,
    SKIN,
    TEX_H,
    TEX_W,
    TORSO_BACK,
    TORSO_FRONT,
    Identity,
)

KEYPOINTS = (
    "head",
    "neck",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_hand",
    "right_hand",
    "pelvis",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_foot",
    "right_foot",
)
MIRROR = {
    k: k.replace("left", "right") if "left" in k else k.replace("right", "left") for k in KEYPOINTS
}
FRONT, BACK, SIDE = 0, 1, 2
_TEX = TEX_H * TEX_W  # canvas indices below this are the person's texture, above the background


def skeleton(ident: Identity, shot: Shot) -> dict[str, tuple[float, float]]:
    """Joint positions in the unflipped frame, named anatomically."""
    ph, cx, top, phase = shot.height_px, shot.cx, shot.top, shot.phase
    side = shot.view == SIDE
    lx = (1.0, -1.0, 0.25)[shot.view]  # image-x direction of the person's left side
    sw, hw = 0.12 * ph * ident.build, 0.07 * ph * ident.build
    ys, yh, yk, yf = top + 0.19 * ph, top + 0.5 * ph, top + 0.725 * ph, top + 0.955 * ph
    j = {"head": (cx, top + 0.075 * ph), "neck": (cx, top + 0.15 * ph), "pelvis": (cx, yh)}
    for name, s in (("left", 1.0), ("right", -1.0)):
        sx, hx = cx + s * lx * sw, cx + s * lx * hw
        swing = s * phase  # an arm swings against the leg of its side
        if side:
            fx = hx + 0.13 * ph * swing
            j[f"{name}_knee"] = ((hx + fx) / 2 + 0.02 * ph, yk)
            j[f"{name}_foot"] = (fx, yf - 0.01 * ph * abs(swing))
            hand = (sx - 0.1 * ph * swing, ys + 0.3 * ph)
            elbow = ((sx + hand[0]) / 2 - 0.02 * ph, ys + 0.15 * ph)
        else:  # walking towards or away from the camera: a lifted foot, a raised hand
            foot = (hx + s * lx * 0.01 * ph, yf - 0.03 * ph * max(swing, 0.0))
            j[f"{name}_knee"] = ((hx + foot[0]) / 2, (yh + foot[1]) / 2)  # straight limbs
            j[f"{name}_foot"] = foot
            hand = (sx + s * lx * 0.03 * ph, ys + 0.3 * ph - 0.03 * ph * max(-swing, 0.0))
            elbow = ((sx + hand[0]) / 2, (ys + hand[1]) / 2)
        j[f"{name}_shoulder"] = (sx, ys)
        j[f"{name}_elbow"] = elbow
        j[f"{name}_hand"] = hand
        j[f"{name}_hip"] = (hx, yh)
    return j


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xs = np.arange(w, dtype=np.float32) + 0.5
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    background = (_TEX + np.arange(h * w, dtype=np.int32)).reshape(h, w)
    return xs, ys, background


class _Canvas:
    """Per pixel: an index into (texture map ++ background) and the across-part coordinate that
    shades it (cylinder-like). Parts are painted back to front, each only inside its bounding box.
    """

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.xs, self.ys, background = _grid(h, w)
        self.index = background.copy()
        self.across = np.zeros((h, w), np.float32)

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[int, int, int, int] | None:
        bx0, bx1 = max(int(x0), 0), min(int(x1) + 2, self.w)
        by0, by1 = max(int(y0), 0), min(int(y1) + 2, self.h)
        return (bx0, bx1, by0, by1) if bx0 < bx1 and by0 < by1 else None

    def _paint(self, box, mask, rows, cols, s) -> None:
        bx0, bx1, by0, by1 = box
        index = rows.astype(np.int32) * TEX_W + cols.astype(np.int32)
        np.copyto(self.index[by0:by1, bx0:bx1], index, where=mask)
        np.copyto(self.across[by0:by1, bx0:bx1], s, where=mask)

    def capsule(self, p0, p1, r: float, region, t0: float = 0.0, t1: float = 1.0) -> None:
        """A limb: points within ``r`` of segment p0-p1; rows follow the limb, columns cross it."""
        (x0, y0), (x1, y1) = p0, p1
        box = self.box(min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r)
        if box is None:
            return
        bx0, bx1, by0, by1 = box
        dx, dy = x1 - x0, y1 - y0
        length = max((dx * dx + dy * dy) ** 0.5, 1e-3)
        ux, uy = dx / length, dy / length
        X, Y = self.xs[bx0:bx1] - x0, self.ys[by0:by1] - y0
        along = X * ux + Y * uy
        across = Y * ux - X * uy
        t = np.minimum(np.maximum(along, 0.0), length)
        e = along - t
        mask = e * e + across * across <= r * r
        s = across * (1.0 / r)  # in [-1, 1] wherever the mask is set, garbage elsewhere
        r0, r1, c0, c1 = region
        rows = t * ((t1 - t0) * (r1 - r0 - 1) / length) + (r0 + t0 * (r1 - r0 - 1) + 0.5)
        cols = s * (0.5 * (c1 - c0 - 1)) + (0.5 * (c0 + c1 - 1) + 0.5)
        self._paint(box, mask, rows, cols, s)

    def ellipse(self, cx, cy, rx, ry, region, mirror=False) -> None:
        """A head or a shoe: the texture region stretched over the ellipse's bounding box."""
        box = self.box(cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            return
        bx0, bx1, by0, by1 = box
        u = (self.xs[bx0:bx1] - cx) * ((-1.0 if mirror else 1.0) / rx)
        v = (self.ys[by0:by1] - cy) * (1.0 / ry)
        mask = u * u + v * v <= 1.0
        r0, r1, c0, c1 = region
        rows = v * (0.5 * (r1 - r0 - 1)) + 0.5 * (r0 + r1)  # |u|, |v| <= 1 inside the mask
        cols = u * (0.5 * (c1 - c0 - 1)) + 0.5 * (c0 + c1)
        self._paint(box, mask, rows, cols, u * 0.9)

    def trapezoid(self, cx, y0, y1, hw0, hw1, region, round_top=0.0) -> None:
        """A torso, a bag: half-width hw0 at y0 changing linearly to hw1 at y1."""
        box = self.box(cx - max(hw0, hw1), cx + max(hw0, hw1), y0, y1)
        if box is None:
            return
        bx0, bx1, by0, by1 = box
        t = (self.ys[by0:by1] - y0) * (1.0 / (y1 - y0))
        s = (self.xs[bx0:bx1] - cx) * (1.0 / (hw0 + (hw1 - hw0) * t))
        limit = 1.0 - round_top * np.maximum(1.0 - t * 6.0, 0.0) ** 2
        mask = (np.abs(s) <= limit) & ((t >= 0) & (t <= 1))
        r0, r1, c0, c1 = region
        rows = t * (r1 - r0 - 1) + (r0 + 0.5)  # 0 <= t <= 1 and |s| <= 1 inside the mask
        cols = s * (0.5 * (c1 - c0 - 1)) + (0.5 * (c0 + c1 - 1) + 0.5)
        self._paint(box, mask, rows, cols, s)


def _paint_person(c: _Canvas, ident: Identity, shot: Shot, j: dict) -> None:
    """The body parts in depth order for the view: limbs, torso, head, hair, bag."""
    ph, view, b = shot.height_px, shot.view, ident.build
    ra, rl = 0.036 * ph * b, 0.05 * ph * b
    torso, legs = (TORSO_BACK, LEGS_BACK) if view == BACK else (TORSO_FRONT, LEGS_FRONT)
    (hx, hy), (nx, ny), py = j["head"], j["neck"], j["pelvis"][1]
    hip_w = abs(j["left_hip"][0] - j["right_hip"][0]) / 2 + rl
    sh_w = abs(j["left_shoulder"][0] - j["right_shoulder"][0]) / 2 + ra
    if view == SIDE:
        hip_w, sh_w = 0.09 * ph * b, 0.085 * ph * b

    def limb(start, mid, end, r, region):  # straight limbs in one piece, bent ones in two
        if view == SIDE:
            c.capsule(j[start], j[mid], r, region, 0.0, 0.5)
            c.capsule(j[mid], j[end], r * 0.9, region, 0.5, 1.0)
        else:
            c.capsule(j[start], j[end], r * 0.95, region)

    def arm(name):
        limb(f"{name}_shoulder", f"{name}_elbow", f"{name}_hand", ra, ARMS)

    def leg(name):
        limb(f"{name}_hip", f"{name}_knee", f"{name}_foot", rl, legs)
        fx, fy = j[f"{name}_foot"]
        c.ellipse(fx + (0.025 * ph if view == SIDE else 0.0), fy, 0.048 * ph, 0.025 * ph, SHOES)

    def hair():
        if ident.long_hair:
            c.trapezoid(hx, hy - 0.01 * ph, hy + 0.21 * ph, 0.056 * ph, 0.078 * ph, HAIR)

    def bag():
        if ident.bag == 1 and view != FRONT:  # backpack, seen from behind or the side
            x = hx if view == BACK else hx - sh_w
            c.trapezoid(x, hy + 0.13 * ph, hy + 0.37 * ph, sh_w * 0.8, sh_w * 0.75, BAG, 0.4)
        elif ident.bag == 2:  # shoulder bag hanging at one hip
            x = j["left_hip" if ident.bag_side > 0 else "right_hip"][0]
            x += (x - hx) * 0.8 + (0.0 if view == SIDE else np.sign(x - hx) * rl)
            c.trapezoid(x, hy + 0.36 * ph, hy + 0.5 * ph, 0.045 * ph, 0.05 * ph, BAG, 0.2)

    if view == SIDE:
        arm("left")
    elif view == FRONT:
        hair()
    leg("left")
    leg("right")
    c.trapezoid(hx, py - 0.03 * ph, py + 0.08 * ph, hip_w, hip_w, legs)
    c.trapezoid(hx, ny + 0.01 * ph, py + 0.03 * ph, sh_w, hip_w, torso, 0.5)
    if view == SIDE:
        bag()
        arm("right")
    else:
        if view == BACK:
            bag()
        arm("left")
        arm("right")
    c.capsule((hx, hy), (nx, ny + 0.02 * ph), 0.025 * ph, SKIN)
    region = (HEAD_FRONT, HEAD_BACK, HEAD_SIDE)[view]
    c.ellipse(hx, hy, 0.056 * ph * (0.9 + 0.1 * b), 0.07 * ph, region, mirror=view == SIDE)
    if view != FRONT:
        hair()
    if view == FRONT:
        bag()


def _keypoints(joints: dict, shot: Shot, h: int, w: int) -> dict[str, list]:
    keypoints = {}
    for name, (x, y) in joints.items():
        if shot.flip:
            name, x = MIRROR[name], w - x
        keypoints[name] = [x, y, 0 <= x < w and 0 <= y < h]
    if shot.view == SIDE:  # the left side of a person facing +x is turned away from the camera
        for part in ("shoulder", "hip"):
            keypoints[MIRROR[f"left_{part}"] if shot.flip else f"left_{part}"][2] = False
    if shot.occluder is not None:
        x0, y0, x1, y1, ellipse = shot.occluder[:5]
        for kp in keypoints.values():
            u = (kp[0] - (x0 + x1) / 2) / ((x1 - x0) / 2)
            v = (kp[1] - (y0 + y1) / 2) / ((y1 - y0) / 2)
            if (u * u + v * v <= 1) if ellipse else (abs(u) <= 1 and abs(v) <= 1):
                kp[2] = False
    return {
        k: [round(float(x), 2), round(float(y), 2), bool(v)] for k, (x, y, v) in keypoints.items()
    }


def draw(ident: Identity, cam: Camera, shot: Shot, height: int, width: int):
    """Render one image: (PIL RGB image, keypoints {name: [x, y, visible]}).

    The scene is drawn at the camera's sensor resolution and up-sampled to height x width, which
    blurs it as poor optics would; keypoints are computed in the output frame.
    """
    (h, w), joints = cam.sensor, skeleton(ident, shot)
    fx, fy = w / width, h / height
    if (h, w) != (height, width):
        clutter = tuple(
            (x0 * fx, y0 * fy, x1 * fx, y1 * fy, *c) for x0, y0, x1, y1, *c in shot.clutter
        )
        occluder = shot.occluder
        if occluder is not None:
            x0, y0, x1, y1, *rest = occluder
            occluder = (x0 * fx, y0 * fy, x1 * fx, y1 * fy, *rest)
        sensor_shot = replace(
            shot,
            height_px=shot.height_px * fy,
            cx=shot.cx * fx,
            top=shot.top * fy,
            clutter=clutter,
            occluder=occluder,
        )
    else:
        sensor_shot = shot
    canvas = _Canvas(h, w)
    _paint_person(canvas, ident, sensor_shot, skeleton(ident, sensor_shot))
    img = _compose(canvas, ident, cam, sensor_shot)
    out = Image.fromarray(img)
    if (h, w) != (height, width):
        out = out.resize((width, height), Image.BILINEAR)
    return out, _keypoints(joints, shot, height, width)


def _compose(canvas: _Canvas, ident: Identity, cam: Camera, shot: Shot) -> np.ndarray:
    """Texture, shading, background, occluder, illumination and noise: an h x w x 3 uint8 array."""
    h, w = canvas.h, canvas.w

    # one gather from the texture map followed by this shot's background
    table = np.empty((_TEX + h * w, 3), np.float32)
    table[:_TEX] = ident.flat
    bg = table[_TEX:].reshape(h, w, 3)
    bg[...] = cam.backgrounds[shot.background, shot.bg_y : shot.bg_y + h, shot.bg_x : shot.bg_x + w]
    for x0, y0, x1, y1, *colour in shot.clutter:
        bg[max(int(y0), 0) : max(int(y1), 0), max(int(x0), 0) : max(int(x1), 0)] = colour
    index, across = canvas.index, canvas.across
    if shot.flip:
        index, across = index[:, ::-1], across[:, ::-1]
    img = table.take(index, axis=0)
    img *= (1.0 - 0.3 * across * across)[..., None]

    if shot.occluder is not None:
        x0, y0, x1, y1, ellipse, *colour = shot.occluder
        box = canvas.box(x0, x1, y0, y1)
        if box is not None:
            bx0, bx1, by0, by1 = box
            u = (canvas.xs[bx0:bx1] - (x0 + x1) / 2) * (2 / (x1 - x0))
            v = (canvas.ys[by0:by1] - (y0 + y1) / 2) * (2 / (y1 - y0))
            inside = (u * u + v * v <= 1) if ellipse else (np.abs(u) <= 1) & (np.abs(v) <= 1)
            paint = np.asarray(colour, np.float32) * (1.0 - 0.25 * v * v)[..., None]
            np.copyto(img[by0:by1, bx0:bx1], paint, where=inside[..., None])

    img = (img.reshape(-1, 3) @ np.diag(np.asarray(shot.gain, np.float32))).reshape(h, w, 3)
    if shot.noise:
        img += cam.noise[shot.noise_y : shot.noise_y + h, shot.noise_x : shot.noise_x + w]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)
