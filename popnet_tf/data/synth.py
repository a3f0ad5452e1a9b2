"""Synthetic ATR-format dataset: one standing, dressed person per image.

Writes the real ATR layout, so the ATR-OS builder reads it exactly as it reads
ATR (DESIGN "Data on disk"):

    OUT/JPEGImages/synth_000000.jpg            RGB JPEG, quality 92
    OUT/SegmentationClassAug/synth_000000.png  8-bit 'L' PNG, pixel = raw ATR id 0-17

Each image shows one person facing the camera, like a fashion photo: varied
position, scale (50-95 % of the image height), lean, arm and leg angles; an
outfit of upper-clothes + pants, upper-clothes + skirt, or a dress (sometimes
under a jacket); hair in several styles; optional hat, sunglasses, belt, scarf
and bag. Left/right labels follow the person's own point of view: the person's
LEFT arm, leg and shoe appear on the IMAGE's right. Every garment, the skin,
the hair and every background object draw their own colours and texture
(solid, stripes, checks, dots, fabric noise, gradient), and backgrounds are
cluttered, sometimes in the person's colours, so that a class can only be told
by shape, position and context.

How an image is made: every shape is drawn once, with hard edges and no
supersampling, into a map of *material* ids (one id per garment, skin area,
background object...). The mask is a lookup of each material's raw label, so
it is exact and the occlusion order of image and mask is the same by
construction. The image is rendered from the material map (texture per
material, vectorised over its pixels), and only the pixels at material
boundaries are then softened (3x3 mean), which anti-aliases the image while
the mask stays untouched.

Determinism: image i depends only on (seed, i), through
`np.random.default_rng([seed, i])`, so runs can be split into parallel or
restarted pieces with `start_index`; the same seed gives byte-identical files
(with the same NumPy and Pillow/libjpeg versions).

Speed: 56-65 images/s at 400x600 on one core, in CPU time per image
(drawing, JPEG/PNG encoding and writing), measured with
`taskset -c 0 python -m pytest -m benchmark -s tests/test_synth.py` on the
shared 2-core development machine at load average 3-5, so these figures are
conservative; best-of-repeat stage timings suggest about 80 images/s on an
idle core.
Larger sizes cost in proportion to their pixels. Rendering is NumPy-vectorised
over the pixels of each material; shapes are drawn by PIL.ImageDraw.

Example:
    python -m popnet_tf.data.synth --out /tmp/synth_atr --num_images 2000 --seed 0

    >>> import numpy as np
    >>> from popnet_tf.data import synth
    >>> ids = synth.generate("/tmp/synth_atr", num_images=10, seed=0)
    >>> image, mask = synth.draw_person(np.random.default_rng(0), 600, 400)
"""

from __future__ import annotations

import colorsys
import io
import os
import threading
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging
from PIL import Image
from PIL import ImageDraw

from popnet_tf import classes, cli

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClassAug"
JPEG_QUALITY = 92  # fixed, so files are reproducible byte for byte
ID_FORMAT = "synth_{:06d}"

# (width, height). ATR is mostly 400x600 portrait; ~20 % of images take
# another size so that the pipeline never assumes one.
DEFAULT_SIZE = (400, 600)
OTHER_SIZES = ((300, 450), (480, 640), (512, 512), (600, 800), (640, 480))
OTHER_SIZE_FRACTION = 0.2
# Person height (hat top to soles) as a fraction of the image height. Drawn a
# little inside the 50-95 % promise so that rasterisation cannot leave it.
HEIGHT_FRACTION = (0.52, 0.93)

_ID = {name: i for i, name in enumerate(classes.RAW_ATR_NAMES)}
BG, HAT, HAIR, SUNGLASSES = _ID["background"], _ID["hat"], _ID["hair"], _ID["sunglasses"]
UPPER, SKIRT, PANTS, DRESS = _ID["upper-clothes"], _ID["skirt"], _ID["pants"], _ID["dress"]
BELT, FACE, BAG, SCARF = _ID["belt"], _ID["face"], _ID["bag"], _ID["scarf"]
# Indexed by side s: +1 is the person's left (image right), -1 the person's right.
ARM = {+1: _ID["left-arm"], -1: _ID["right-arm"]}
LEG = {+1: _ID["left-leg"], -1: _ID["right-leg"]}
SHOE = {+1: _ID["left-shoe"], -1: _ID["right-shoe"]}

# Texture kinds, drawn per material.
SOLID, STRIPES, CHECKS, DOTS, FABRIC, GRADIENT = range(6)
_GARMENT_KINDS = (SOLID, STRIPES, CHECKS, DOTS, FABRIC, GRADIENT)
_GARMENT_KIND_P = (0.3, 0.16, 0.13, 0.11, 0.15, 0.15)

_TILE = 1024  # side of the fixed noise tiles (fabric texture, sensor grain)
_CACHE: dict = {}


# ----------------------------------------------------------------------------
# Colours and textures.


def _pick(rng, options, p=None):
    """One of `options`, with probabilities p (default uniform). Much cheaper
    than Generator.choice for the few-element lists drawn here."""
    if p is None:
        return options[int(rng.integers(len(options)))]
    r = rng.random() * sum(p)
    for option, weight in zip(options, p):
        r -= weight
        if r < 0:
            return option
    return options[-1]


def _colour(rng, s=(0.0, 1.0), v=(0.12, 1.0)) -> np.ndarray:
    """A random RGB colour (float32 0..255) from HSV ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return np.array(rgb, np.float32) * 255.0


_SKIN_ANCHORS = np.array([(255, 224, 200), (236, 190, 160), (205, 145, 110),
                          (160, 105, 72), (112, 72, 50), (70, 46, 34)], np.float32)
_HAIR_ANCHORS = np.array([(22, 18, 16), (55, 38, 28), (100, 68, 42), (150, 110, 70),
                          (215, 185, 125), (150, 62, 30), (165, 160, 155)], np.float32)


def _skin_colour(rng) -> np.ndarray:
    t = rng.uniform(0, len(_SKIN_ANCHORS) - 1)
    i = min(int(t), len(_SKIN_ANCHORS) - 2)
    c = _SKIN_ANCHORS[i] + (t - i) * (_SKIN_ANCHORS[i + 1] - _SKIN_ANCHORS[i])
    return np.clip(c + rng.normal(0, 6, 3), 0, 255).astype(np.float32)


def _hair_colour(rng) -> np.ndarray:
    if rng.random() < 0.1:  # dyed
        return _colour(rng, s=(0.4, 1.0), v=(0.3, 0.9))
    c = _HAIR_ANCHORS[rng.integers(len(_HAIR_ANCHORS))]
    return np.clip(c * rng.uniform(0.8, 1.2) + rng.normal(0, 6, 3), 0, 255).astype(np.float32)


def _texture(rng, c0, kind=None, kinds=_GARMENT_KINDS, p=_GARMENT_KIND_P,
             contrast=(0.3, 1.0), period=(0.006, 0.05), shade=(0.05, 0.25)) -> dict:
    """A texture spec: colours and pattern geometry. Lengths are in *units*
    (person height = 1 for person materials, pixels for background ones)."""
    if kind is None:
        kind = _pick(rng, kinds, p)
    if rng.random() < 0.5:
        c1 = _colour(rng)
    else:  # a darker or lighter shade of the same colour
        c1 = np.clip(c0 * rng.uniform(0.3, 1.7), 0, 255)
    r = rng.random(11)
    c1 = c0 + (contrast[0] + r[0] * (contrast[1] - contrast[0])) * (c1 - c0)
    return {
        "kind": kind, "c0": c0, "c1": c1.astype(np.float32),
        "period": period[0] + r[1] * (period[1] - period[0]), "angle": r[2] * np.pi,
        "phase": r[3], "duty": 0.2 + 0.4 * r[4], "radius": 0.15 + 0.25 * r[5],
        "shade": shade[0] + r[6] * (shade[1] - shade[0]), "zoom": 1 + int(r[7] < 0.5),
        "offset": r[8:10], "grad_period": 0.2 + 0.8 * r[10],
    }


def _scaled(spec: dict, scale: float) -> dict:
    out = dict(spec)
    out["period"] = max(3.0, spec["period"] * scale)
    out["grad_period"] = max(20.0, spec["grad_period"] * scale)
    return out


def _tiles() -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise tiles, identical in every process: a smooth 'fabric' field
    (zero mean, unit variance, ~4 px grain) and per-pixel sensor grain."""
    if "fabric" not in _CACHE:
        g = np.random.default_rng(20210205)
        coarse = g.standard_normal((_TILE // 4, _TILE // 4)).astype(np.float32)
        fabric = np.asarray(Image.fromarray(coarse).resize((_TILE, _TILE), Image.BILINEAR))
        _CACHE["fabric"] = (fabric / fabric.std()).astype(np.float32)
        _CACHE["grain"] = g.standard_normal((_TILE, _TILE)).astype(np.float32)
    return _CACHE["fabric"], _CACHE["grain"]


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 pixel coordinates (x, y), cached per size."""
    key = ("grid", height, width)
    if key not in _CACHE:
        ys, xs = np.divmod(np.arange(height * width, dtype=np.int32), width)
        _CACHE[key] = (xs.astype(np.float32), ys.astype(np.float32))
    return _CACHE[key]


_WORKSPACE = threading.local()


def _workspace(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A reusable per-thread buffer. Rendering writes every element it reads,
    so reuse cannot leak one image into the next; it saves allocating (and
    page-faulting) megabytes of temporaries per image, which costs as much
    as the arithmetic itself."""
    size = int(np.prod(shape))
    buffers = _WORKSPACE.__dict__
    buf = buffers.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = buffers[name] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def _soft_stripes(u, period, phase, duty, tmp):
    """In place: u becomes the coverage (0..1) of stripes of width
    duty * period along u, with a 1-pixel ramp at each edge, so pattern edges
    are anti-aliased too. tmp is scratch of u's size."""
    u *= np.float32(1.0 / period)
    u += np.float32(phase)
    np.floor(u, out=tmp)
    u -= tmp  # fractional part: several times faster than np.mod
    u -= np.float32(0.5)  # stripes are centred on 0.5
    np.abs(u, out=u)
    # Signed distance to the stripe edge in pixels, plus half a pixel.
    u *= np.float32(-period)
    u += np.float32(duty / 2 * period + 0.5)
    return np.clip(u, 0.0, 1.0, out=u)


def _pattern(spec, xs, ys, tmp):
    """Blend factor t in 0..1 (colour = c0 + t * (c1 - c0)) of one patterned
    material at pixel coordinates xs, ys [n] (float32). tmp: three float32
    scratch arrays [n]; the result is tmp[0]."""
    kind = spec["kind"]
    t, a, b = tmp
    if kind == FABRIC:
        fabric = _tiles()[0].ravel()
        inv_zoom = np.float32(1.0 / spec["zoom"])
        for w, z in ((a, xs), (b, ys)):  # floor(z / zoom); np.floor_divide is slow
            np.multiply(z, inv_zoom, out=w)
            np.floor(w, out=w)
        room = _TILE - int(max(a.max(), b.max())) - 1
        if room > 0:
            oy, ox = (spec["offset"] * room).astype(np.int64)
            a += np.float32(ox)
            b += np.float32(oy)
        else:  # an image larger than the tile: wrap around
            np.mod(a, _TILE, out=a)
            np.mod(b, _TILE, out=b)
        b *= np.float32(_TILE)
        b += a  # flat tile index, exact in float32 (< 2**24)
        index = _workspace("fabric_index", (xs.size,), np.intp)
        np.copyto(index, b, casting="unsafe")
        np.take(fabric, index, out=t)
        t *= np.float32(0.3)
        t += np.float32(0.5)
        return np.clip(t, 0.0, 1.0, out=t)
    ca, sa = np.float32(np.cos(spec["angle"])), np.float32(np.sin(spec["angle"]))
    np.multiply(xs, ca, out=t)
    np.multiply(ys, sa, out=a)
    t += a  # u: coordinate across the pattern
    p = spec["period"]
    if kind == STRIPES:
        return _soft_stripes(t, p, spec["phase"], spec["duty"], a)
    if kind in (CHECKS, DOTS):
        np.multiply(ys, ca, out=b)
        np.multiply(xs, sa, out=a)
        b -= a  # v: the coordinate along the pattern
    if kind == CHECKS:
        _soft_stripes(t, p, spec["phase"], 0.5, a)
        _soft_stripes(b, p, spec["phase"], 0.5, a)
        np.multiply(t, b, out=a)
        t += b
        a *= np.float32(2.0)
        t -= a  # xor of the two stripe sets: tu + tv - 2 tu tv
        return t
    if kind == DOTS:
        for w in (t, b):  # offset from the nearest dot centre, in periods
            w *= np.float32(1.0 / p)
            w += np.float32(spec["phase"])
            np.floor(w, out=a)
            w -= a
            w -= np.float32(0.5)
            w *= w
        t += b  # squared distance
        r = spec["radius"]
        # Inside the dot where d^2 < r^2, with a ramp of about one pixel.
        t *= np.float32(-p / (2 * r))
        t += np.float32(r * r * p / (2 * r) + 0.5)
        return np.clip(t, 0.0, 1.0, out=t)
    # GRADIENT: a slow triangle wave across the material.
    t *= np.float32(1.0 / spec["grad_period"])
    t += np.float32(spec["phase"])
    np.floor(t, out=a)
    t -= a
    t *= np.float32(2.0)
    t -= np.float32(1.0)
    return np.abs(t, out=t)


# ----------------------------------------------------------------------------
# Geometry helpers (points are [N, 2] arrays of (x, y), y down).


def _unit_arc(n, t0, t1):
    key = ("arc", n, t0, t1)
    if key not in _CACHE:
        t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * np.pi - 1e-6)
        _CACHE[key] = (np.cos(t), np.sin(t))
    return _CACHE[key]


def _ellipse(cx, cy, rx, ry, angle=0.0, n=20, t0=0.0, t1=2 * np.pi):
    cos, sin = _unit_arc(n, t0, t1)
    x, y = rx * cos, ry * sin
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = c * x - s * y, s * x + c * y
    return np.stack([cx + x, cy + y], axis=1)


def _segment(a, b, wa, wb):
    """Quadrilateral around segment a-b with half-widths wa at a, wb at b."""
    d = b - a
    n = np.array([-d[1], d[0]]) / (np.hypot(d[0], d[1]) + 1e-9)
    return np.array([a + n * wa, b + n * wb, b - n * wb, a - n * wa])


def _chain(points, widths, caps=(True, True)):
    """Polygons of a limb: one quad per segment, discs at joints and ends."""
    polys = [_segment(points[i], points[i + 1], widths[i], widths[i + 1])
             for i in range(len(points) - 1)]
    for i in range(len(points)):
        if 0 < i < len(points) - 1 or (i == 0 and caps[0]) or (i == len(points) - 1 and caps[1]):
            polys.append(_ellipse(points[i][0], points[i][1], widths[i], widths[i], n=14))
    return polys


def _sub_chain(points, widths, t0, t1):
    """The part of a polyline between arc-length fractions t0 < t1."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.concatenate([[t0 * cum[-1]], cum[(cum > t0 * cum[-1]) & (cum < t1 * cum[-1])],
                        [t1 * cum[-1]]])
    px = np.interp(s, cum, points[:, 0])
    py = np.interp(s, cum, points[:, 1])
    return np.stack([px, py], axis=1), np.interp(s, cum, widths)


def _rotate(points, angle, centre):
    c, s = np.cos(angle), np.sin(angle)
    d = points - centre
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1) + centre


def _direction(angle, side):
    """Unit vector `angle` radians away from straight down, outward on `side`."""
    return np.array([side * np.sin(angle), np.cos(angle)])


# ----------------------------------------------------------------------------
# The person, in units of height (y = 0 near the head top, y = 1 near the soles).


class _Person:
    """Collects materials and polygons in drawing order (back to front)."""

    def __init__(self, rng):
        self.rng = rng
        self.materials: list[tuple[int, dict]] = []  # (raw label, texture spec)
        self.shapes: list[tuple[int, np.ndarray]] = []  # (material index, [N, 2])

    def material(self, label, spec) -> int:
        self.materials.append((label, spec))
        return len(self.materials) - 1

    def add(self, mat, *polys):
        for poly in polys:
            self.shapes.append((mat, np.asarray(poly, np.float64)))

    def garment(self, label, colour=None) -> int:
        rng = self.rng
        return self.material(label, _texture(rng, _colour(rng) if colour is None else colour))


def _build_person(rng) -> _Person:
    person = _Person(rng)
    u = rng.uniform

    # --- Materials shared by several parts.
    skin_c = _skin_colour(rng)
    skin_spec = _texture(rng, skin_c, kind=SOLID, shade=(0.03, 0.12))
    hair_spec = _texture(rng, _hair_colour(rng), kinds=(SOLID, FABRIC, STRIPES, GRADIENT),
                         p=(0.3, 0.35, 0.15, 0.2), contrast=(0.05, 0.3),
                         period=(0.004, 0.01), shade=(0.05, 0.2))
    hair_spec["angle"] = np.pi / 2 + u(-0.3, 0.3)  # streaks run down
    face = person.material(FACE, skin_spec)
    arm = {s: person.material(ARM[s], skin_spec) for s in (1, -1)}
    leg = {s: person.material(LEG[s], skin_spec) for s in (1, -1)}
    hair = person.material(HAIR, hair_spec)

    # --- Body proportions.
    hh = u(0.056, 0.066)                     # head half-height
    hw = hh * u(0.74, 0.84)                  # head half-width
    head_c = np.array([u(-0.01, 0.01), hh])
    neck_w = hw * u(0.42, 0.52)
    sh_y = 2 * hh + u(0.03, 0.045)
    sh_w = u(0.085, 0.11)
    waist_y = sh_y + u(0.17, 0.2)
    waist_w = sh_w * u(0.6, 0.75)
    hip_y = waist_y + u(0.08, 0.1)
    hip_w = sh_w * u(0.8, 1.0)
    leg_top = hip_y + 0.01
    ankle_y = u(0.93, 0.95)

    # --- Legs: chains hip -> knee -> mid-shin -> ankle.
    legs = {}
    for s in (1, -1):
        a1 = u(-0.05, 0.12)
        a2 = a1 + u(-0.08, 0.08)
        half = (ankle_y - leg_top) / 2
        hip_j = np.array([s * hip_w * 0.5, leg_top])
        knee = hip_j + half * _direction(a1, s) / max(np.cos(a1), 0.9)
        ankle = knee + half * _direction(a2, s) / max(np.cos(a2), 0.9)
        wt = hip_w * u(0.47, 0.55)
        wk = wt * u(0.5, 0.6)
        pts = np.array([hip_j, knee, (knee + ankle) / 2, ankle])
        legs[s] = (pts, np.array([wt, wk, wk * u(0.85, 1.05), wk * u(0.5, 0.62)]))

    # --- Arms: chains shoulder -> elbow -> wrist, and the hand.
    arms = {}
    for s in (1, -1):
        pose = _pick(rng, ["down", "down", "bent", "hip", "front"])
        if pose == "down":
            a_up = u(0.04, 0.3)
            a_fore = a_up + u(-0.05, 0.3)
        elif pose == "bent":
            a_up = u(0.05, 0.3)
            a_fore = a_up + u(0.3, 0.9)
        elif pose == "hip":
            a_up = u(0.45, 0.75)
            a_fore = -u(0.6, 1.0)
        else:  # forearm across the body
            a_up = u(0.0, 0.15)
            a_fore = -u(0.6, 1.2)
        up_len = u(0.15, 0.17)
        fore_len = u(0.13, 0.15) * u(0.7, 1.0)  # foreshortened when bent towards us
        ws = sh_w * u(0.24, 0.3)
        # The shoulder disc (radius ws) just meets the shoulder line.
        shoulder = np.array([s * (sh_w - ws * 0.85), sh_y + ws * 0.85])
        elbow = shoulder + up_len * _direction(a_up, s)
        d_fore = _direction(a_fore, s)
        wrist = elbow + fore_len * d_fore
        widths = np.array([ws, ws * u(0.65, 0.75), ws * u(0.45, 0.55)])
        hand_len = u(0.045, 0.055)
        hand = _ellipse(*(wrist + d_fore * hand_len * 0.45), widths[2] * 1.3, hand_len * 0.5,
                        angle=np.arctan2(d_fore[1], d_fore[0]) - np.pi / 2, n=16)
        arms[s] = (np.array([shoulder, elbow, wrist]), widths, hand, pose)

    # --- Outfit and accessories.
    outfit = _pick(rng, ["pants", "skirt", "dress"], [0.4, 0.3, 0.3])
    jacket = rng.random() < (0.25 if outfit != "dress" else 0.15)
    hair_style = _pick(rng, ["short", "bob", "long", "long", "ponytail", "bun", "buzz"])
    has_hat = rng.random() < 0.3
    has_glasses = rng.random() < 0.25
    has_belt = rng.random() < 0.35
    has_scarf = rng.random() < 0.2
    bag_kind = _pick(rng, ["none", "hand", "shoulder", "cross"], [0.55, 0.15, 0.15, 0.15])

    # 1. Hair behind the body.
    if hair_style == "long":
        end_y = sh_y + u(0.04, 0.25)
        wide = hw * u(1.25, 1.7)
        back = np.concatenate([
            _ellipse(head_c[0], head_c[1] - 0.1 * hh, hw * 1.15, hh * 1.05, n=12, t0=np.pi, t1=2 * np.pi),
            [[hw * 1.2, head_c[1] + hh * 0.5], [wide, end_y - 0.03]],
            _ellipse(0, end_y - 0.03, wide, 0.03, n=10, t0=0, t1=np.pi),
            [[-wide, end_y - 0.03], [-hw * 1.2, head_c[1] + hh * 0.5]],
        ])
        person.add(hair, back)
    elif hair_style == "ponytail":
        s = _pick(rng, (-1, 1))
        top = head_c + [s * hw * 0.7, -hh * 0.2]
        end = np.array([s * hw * u(1.2, 1.8), sh_y + u(0.0, 0.12)])
        mid = (top + end) / 2 + [s * hw * 0.5, 0]
        person.add(hair, *_chain(np.array([top, mid, end]), np.array([hw * 0.35, hw * 0.4, hw * 0.12])))

    # 2. Legs (skin), shoes, neck.
    for s in (1, -1):
        person.add(leg[s], *_chain(*legs[s], caps=(False, True)))
    shoe_spec = _texture(rng, _colour(rng, v=(0.05, 0.95)), kinds=(SOLID, FABRIC, GRADIENT, STRIPES),
                         p=(0.5, 0.2, 0.2, 0.1))
    shoe_style = _pick(rng, ["flat", "flat", "heel", "boot"])
    boot_from = u(0.15, 0.7)
    for s in (1, -1):
        shoe = person.material(SHOE[s], shoe_spec)
        pts, widths = legs[s]
        ankle, wa = pts[-1], widths[-1]
        foot_h = u(0.018, 0.026)
        rx = wa * (u(1.1, 1.4) if shoe_style == "heel" else u(1.4, 1.9))
        foot_c = ankle + [s * 0.004, 0.012 + foot_h]
        person.add(shoe, _ellipse(*foot_c, rx, foot_h, n=16),
                   _segment(ankle - [0, 0.012], foot_c, wa * 1.1, rx * 0.9))
        if shoe_style == "boot":
            sp, sw = _sub_chain(pts[1:], widths[1:], boot_from, 1.0)
            person.add(shoe, *_chain(sp, sw * 1.12, caps=(False, False)))
    person.add(face, _segment(head_c + [0, hh * 0.6], np.array([head_c[0] * 0.5, sh_y + 0.01]),
                              neck_w * 0.92, neck_w))

    # 3. Garments. Upper torso outline (hem at `hem_y`).
    def torso(hem_y, flare=1.0):
        jitter = u(-0.004, 0.004, 2)
        right = [(-neck_w * 1.05, sh_y - 0.012), (-sh_w, sh_y + 0.004 + jitter[0]),
                 (-sh_w + 0.012, sh_y + 0.07), (-waist_w, waist_y + jitter[1]),
                 (-hip_w * flare, min(hip_y, hem_y)), (-hip_w * flare * 1.02, hem_y)]
        left = [(-x, y) for x, y in reversed(right)]
        collar = [(0, sh_y - 0.004)]
        return np.array(right + left + collar)

    upper_colour = _colour(rng)
    sleeve_t = _pick(rng, [0.0, u(0.2, 0.45), u(0.5, 0.6), u(0.7, 0.85), 1.0])
    sleeve_w = u(1.15, 1.45)

    def sleeve(s, length):
        """Polygons of a sleeve over arm s, covering `length` of the arm."""
        pts, widths, _, _ = arms[s]
        sp, sw = _sub_chain(pts, widths, 0.0, length)
        sw = sw * np.interp(np.linspace(0, 1, len(sw)), [0, 1], [1.05, sleeve_w])
        return _chain(sp, sw, caps=(True, length < 1))

    sleeve_polys = []  # drawn after the arms

    def sleeves(mat):
        if sleeve_t > 0:
            for s in (1, -1):
                sleeve_polys.append((mat, sleeve(s, sleeve_t)))

    lower_len = u(0.15, 0.97)
    tucked = rng.random() < 0.5

    def lower(dress=None):
        if outfit == "pants":
            pants = person.garment(PANTS)
            flare = u(1.1, 1.45)
            t_len = _pick(rng, [u(0.18, 0.35), u(0.45, 0.55), u(0.7, 0.85), 1.0, 1.0, 1.0])
            person.add(pants, [(-waist_w * 1.02, waist_y), (waist_w * 1.02, waist_y),
                               (hip_w * 1.03, hip_y), (hip_w * 0.95, leg_top + 0.05),
                               (-hip_w * 0.95, leg_top + 0.05), (-hip_w * 1.03, hip_y)])
            for s in (1, -1):
                pts, widths = legs[s]
                sp, sw = _sub_chain(pts, widths, 0.0, t_len)
                grow = np.interp(np.linspace(0, 1, len(sw)), [0, 1], [1.05, flare])
                person.add(pants, *_chain(sp, np.maximum(sw * grow, widths[0] * 0.55 * grow),
                                          caps=(False, False)))
        else:
            mat = dress if outfit == "dress" else person.garment(SKIRT)
            hem_y = min(leg_top + lower_len * (ankle_y - leg_top), ankle_y - 0.02)
            hem_w = hip_w * u(1.0, 1.2) + (hem_y - hip_y) * u(0.1, 0.5)
            sag = u(0.0, 0.015)
            pts = [(-waist_w * 1.02, waist_y), (waist_w * 1.02, waist_y), (hip_w * 1.04, hip_y)]
            pts += list(_ellipse(0, hem_y, hem_w, sag, n=12, t0=0, t1=np.pi))
            pts += [(-hip_w * 1.04, hip_y)]
            person.add(mat, np.array(pts))

    neckline = _pick(rng, ["round", "v", "high"])

    def add_neckline():
        if neckline == "round":
            person.add(face, _ellipse(0, sh_y - 0.012, neck_w * u(1.05, 1.7), u(0.01, 0.04), n=16,
                                      t0=0, t1=np.pi))
        elif neckline == "v":
            d = u(0.03, 0.08)
            person.add(face, [(-neck_w * 1.1, sh_y - 0.013), (neck_w * 1.1, sh_y - 0.013), (0, sh_y + d)])

    dress = None
    if outfit == "dress":
        dress = person.garment(DRESS, upper_colour)
        lower(dress)
        person.add(dress, torso(hip_y))
        add_neckline()
        if not jacket:
            sleeves(dress)
    else:
        upper = person.garment(UPPER, upper_colour)
        if tucked:
            person.add(upper, torso(hip_y))
            lower()
        else:
            lower()
            person.add(upper, torso(hip_y + u(0.0, 0.09), flare=u(1.0, 1.12)))
        add_neckline()
        if not jacket:
            sleeves(upper)
    if jacket:
        jk = person.garment(UPPER)
        open_w = neck_w * u(0.6, 1.6)
        hem = hip_y + u(-0.05, 0.12)
        outline = torso(hem, flare=u(1.0, 1.15))
        person.add(jk, outline)
        # The shirt or dress shows between the open lapels.
        inner = dress if outfit == "dress" else person.garment(UPPER)
        person.add(inner, [(-open_w * 0.8, sh_y - 0.01), (open_w * 0.8, sh_y - 0.01),
                           (open_w * u(0.2, 1.0), hem), (-open_w * u(0.2, 1.0), hem)])
        add_neckline()
        jacket_sleeve = max(sleeve_t, u(0.75, 1.0))
        for s in (1, -1):
            sleeve_polys.append((jk, sleeve(s, jacket_sleeve)))

    # 4. Belt over the waist, scarf around the neck.
    if has_belt:
        belt = person.garment(BELT, _colour(rng, v=(0.05, 0.8)))
        bw = u(0.008, 0.016)
        y = waist_y + u(-0.005, 0.02)
        xw = waist_w * 1.04 + (y - waist_y) * (hip_w - waist_w) / (hip_y - waist_y)
        person.add(belt, [(-xw, y - bw), (xw, y - bw), (xw, y + bw), (-xw, y + bw)])
        if rng.random() < 0.7:
            buckle = person.garment(BELT, _colour(rng, s=(0, 0.3), v=(0.4, 1.0)))
            person.add(buckle, _ellipse(0, y, bw * u(1.0, 2.0), bw * 1.2, n=12))
    if has_scarf:
        scarf = person.garment(SCARF)
        person.add(scarf, _ellipse(0, sh_y - 0.012, neck_w * u(1.4, 2.0), u(0.018, 0.03), n=18))
        for _ in range(int(rng.integers(1, 3))):
            x0 = u(-neck_w, neck_w)
            end = np.array([x0 + u(-0.03, 0.03), sh_y + u(0.08, 0.25)])
            person.add(scarf, _segment(np.array([x0, sh_y - 0.01]), end, u(0.012, 0.022), u(0.012, 0.025)))

    # 5. Long hair falling in front of the shoulders.
    if hair_style == "long" and rng.random() < 0.5:
        for s in (1, -1):
            if rng.random() < 0.7:
                top = head_c + [s * hw * 0.95, 0]
                end = np.array([s * hw * u(1.0, 1.5), sh_y + u(0.03, 0.18)])
                person.add(hair, _segment(top, end, hw * 0.22, hw * u(0.1, 0.25)))

    # 6. Bags, arms (skin, then sleeves), hands.
    bag = person.garment(BAG) if bag_kind != "none" else None
    bag_side = _pick(rng, (-1, 1))
    bag_in_front = rng.random() < 0.5
    strap_w = u(0.004, 0.008)

    def body_bag():
        if bag_kind == "shoulder":
            bx = bag_side * (hip_w + u(-0.02, 0.04))
            top = sh_y + 0.005
            strap_from = np.array([bag_side * sh_w * 0.65, top])
        else:  # crossbody: strap from one shoulder to the other hip
            bx = -bag_side * (hip_w * u(0.6, 1.1))
            strap_from = np.array([bag_side * sh_w * 0.6, sh_y + 0.005])
        bw, bh = u(0.035, 0.07), u(0.03, 0.06)
        by = hip_y + u(-0.06, 0.03)
        person.add(bag, _segment(strap_from, np.array([bx, by - bh]), strap_w, strap_w))
        person.add(bag, [(bx - bw, by - bh), (bx + bw, by - bh), (bx + bw * 1.05, by + bh),
                         (bx - bw * 1.05, by + bh)])

    if bag_kind in ("shoulder", "cross") and not bag_in_front:
        body_bag()
    for s in (1, -1):
        pts, widths, hand, _ = arms[s]
        person.add(arm[s], *_chain(pts, widths, caps=(True, False)), hand)
    for mat, polys in sleeve_polys:
        person.add(mat, *polys)
    if bag_kind in ("shoulder", "cross") and bag_in_front:
        body_bag()
    if bag_kind == "hand":
        pts, widths, hand, _ = arms[bag_side]
        wrist = pts[-1]
        bw, bh = u(0.04, 0.08), u(0.035, 0.07)
        top = wrist[1] + u(0.03, 0.05)
        person.add(bag, _ellipse(wrist[0], top, bw * 0.5, top - wrist[1] + 0.005, n=16, t0=np.pi,
                                 t1=2 * np.pi))
        person.add(bag, [(wrist[0] - bw, top), (wrist[0] + bw, top),
                         (wrist[0] + bw * 1.1, top + 2 * bh), (wrist[0] - bw * 1.1, top + 2 * bh)])
        person.add(arm[bag_side], hand)  # the hand holds the handle, in front of it

    # 7. Head: hair cap, face, details, fringe, sunglasses, hat; tilted as one.
    first_head = len(person.shapes)
    if hair_style != "buzz":
        person.add(hair, _ellipse(head_c[0], head_c[1] - hh * u(0.05, 0.12), hw * u(1.06, 1.16),
                                  hh * u(1.0, 1.08), n=24))
    else:
        person.add(hair, _ellipse(head_c[0], head_c[1] - hh * 0.06, hw * 1.05, hh * 1.03, n=24))
    if hair_style == "bob":
        low = head_c[1] + hh * u(0.5, 0.95)
        for s in (1, -1):
            person.add(hair, [(head_c[0] + s * hw * 0.6, head_c[1] - hh * 0.4),
                              (head_c[0] + s * hw * 1.16, head_c[1]),
                              (head_c[0] + s * hw * 1.12, low), (head_c[0] + s * hw * 0.7, low)])
    if hair_style == "bun":
        bx = head_c[0] + u(-0.4, 0.4) * hw
        person.add(hair, _ellipse(bx, head_c[1] - hh * u(0.95, 1.15), hw * u(0.35, 0.5),
                                  hh * u(0.3, 0.4), n=16))
    person.add(face, _ellipse(*head_c, hw, hh, n=28))
    eye_y = head_c[1] + hh * u(-0.05, 0.1)
    if not has_glasses:
        eyes = person.material(FACE, _texture(rng, _colour(rng, s=(0, 0.5), v=(0.05, 0.3)),
                                              kind=SOLID, shade=(0, 0.05)))
        for s in (1, -1):
            person.add(eyes, _ellipse(head_c[0] + s * hw * 0.38, eye_y, hw * 0.13, hh * 0.055, n=10))
        brows = person.material(FACE, dict(hair_spec, kind=SOLID))
        for s in (1, -1):
            person.add(brows, _ellipse(head_c[0] + s * hw * 0.38, eye_y - hh * 0.17, hw * 0.2,
                                       hh * 0.035, n=10))
    lips = person.material(FACE, _texture(
        rng, np.clip(skin_c * np.array([1.0, 0.6, 0.6]) * u(0.6, 1.0), 0, 255).astype(np.float32),
        kind=SOLID, shade=(0, 0.05)))
    person.add(lips, _ellipse(head_c[0], head_c[1] + hh * u(0.5, 0.6), hw * u(0.2, 0.3), hh * 0.06, n=12))
    # Fringe: the part of the face above a (possibly slanted) hairline. The
    # kept points are the top arc of the ellipse, contiguous in its order.
    face_pts = _ellipse(*head_c, hw * 1.01, hh * 1.01, n=40)
    depth = u(0.6, 0.8) if hair_style == "buzz" else u(0.3, 0.65)
    line = head_c[1] - hh * depth + u(-0.3, 0.3) * (face_pts[:, 0] - head_c[0])
    fringe = face_pts[face_pts[:, 1] < line]
    if len(fringe) >= 3:
        person.add(hair, fringe)
    if has_glasses:
        glasses = person.garment(SUNGLASSES, _colour(rng, v=(0.02, 0.4)))
        gw, gh = hw * u(0.3, 0.38), hh * u(0.16, 0.24)
        for s in (1, -1):
            cx = head_c[0] + s * hw * 0.42
            if rng.random() < 0.5:
                person.add(glasses, _ellipse(cx, eye_y, gw, gh, n=16))
            else:
                person.add(glasses, [(cx - gw, eye_y - gh), (cx + gw, eye_y - gh),
                                     (cx + gw * 0.9, eye_y + gh), (cx - gw * 0.9, eye_y + gh)])
        person.add(glasses, _segment(head_c + [-hw * 0.15, eye_y - head_c[1] - gh * 0.5],
                                     head_c + [hw * 0.15, eye_y - head_c[1] - gh * 0.5],
                                     hh * 0.03, hh * 0.03))
    if has_hat:
        hat = person.garment(HAT)
        kind = _pick(rng, ["beanie", "brim", "cap"])
        base = head_c[1] - hh * u(0.3, 0.55)
        if kind == "brim":
            top = head_c[1] - hh * u(1.3, 1.8)
            cw = hw * u(0.9, 1.05)
            x = head_c[0]
            person.add(hat, [(x - cw, base), (x - cw * 0.9, top), (x + cw * 0.9, top), (x + cw, base)],
                       _ellipse(x, base, hw * u(1.5, 2.4), hh * u(0.1, 0.22), n=24))
            if rng.random() < 0.6:  # a hat band of its own colour, still label hat
                band = person.garment(HAT)
                b0, b1 = base - hh * u(0.01, 0.03), base - hh * u(0.12, 0.3)
                person.add(band, [(x - cw, b0), (x + cw, b0), (x + cw * 0.98, b1), (x - cw * 0.98, b1)])
        else:
            cap = _ellipse(head_c[0], head_c[1] - hh * 0.08, hw * u(1.1, 1.18), hh * u(1.05, 1.15), n=32)
            person.add(hat, cap[cap[:, 1] < base])
            if kind == "cap":
                person.add(hat, _ellipse(head_c[0], base, hw * u(0.9, 1.15), hh * u(0.12, 0.22), n=16,
                                         t0=0, t1=np.pi))
    tilt = u(-0.12, 0.12)
    pivot = np.array([head_c[0], 2 * hh])
    head = person.shapes[first_head:]
    rotated = _rotate(np.concatenate([poly for _, poly in head]), tilt, pivot)
    ends = np.cumsum([len(poly) for _, poly in head])
    person.shapes[first_head:] = [(mat, rotated[e - len(poly):e])
                                  for (mat, poly), e in zip(head, ends)]
    return person


# ----------------------------------------------------------------------------
# Background, in pixels.


def _background(rng, height, width, feet_y, palette):
    """Background materials (all label 0) and their pixel-space polygons."""
    materials, shapes = [], []

    def mat(colour=None, **kw):
        if colour is None:
            colour = palette[rng.integers(len(palette))] if rng.random() < 0.25 else _colour(rng)
        spec = _texture(rng, np.asarray(colour, np.float32), period=(3, 40), **kw)
        spec["grad_period"] = rng.uniform(100, 1500)
        materials.append((BG, spec))
        return len(materials) - 1

    shapes.append((mat(shade=(0.05, 0.5)), np.array([(0, 0), (width, 0), (width, height), (0, height)])))
    if rng.random() < 0.65:  # floor, near the feet
        y0 = np.clip(feet_y - rng.uniform(0.02, 0.3) * height, 0.3 * height, height - 1)
        y1 = y0 + rng.uniform(-0.1, 0.1) * height
        shapes.append((mat(shade=(0.05, 0.4)), np.array([(0, y0), (width, y1), (width, height), (0, height)])))
    size = max(height, width)
    for _ in range(int(rng.integers(2, 13))):
        m = mat()
        kind = rng.integers(5)
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        rx, ry = rng.uniform(0.03, 0.4, 2) * size
        if kind == 0:  # rectangle (windows, panels, furniture)
            poly = [(cx - rx, cy - ry), (cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
        elif kind == 1:
            poly = _ellipse(cx, cy, rx, ry, angle=rng.uniform(0, np.pi), n=24)
        elif kind == 2:  # random polygon
            n = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(0.4, 1.0, n)
            poly = np.stack([cx + rx * r * np.cos(ang), cy + ry * r * np.sin(ang)], 1)
        elif kind == 3:  # a pole or beam
            a = np.array([cx, cy])
            b = a + rng.uniform(-1, 1, 2) * size
            poly = _segment(a, b, rx * 0.15, rx * 0.15)
        else:  # a full-height vertical band (door, curtain, pillar)
            poly = [(cx - rx * 0.5, 0), (cx + rx * 0.5, 0), (cx + rx * 0.5, height), (cx - rx * 0.5, height)]
        shapes.append((m, np.asarray(poly, np.float64)))
    return materials, shapes


# ----------------------------------------------------------------------------
# Rendering.


def _smooth_curve(rng, length, knots):
    """A random 1-D curve in [-1, 1], piecewise linear through `knots` knots."""
    return np.interp(np.arange(length, dtype=np.float32), np.linspace(0, length - 1, knots),
                     rng.uniform(-1, 1, knots)).astype(np.float32)


def _light_field(rng, height, width) -> np.ndarray:
    """Low-frequency light field [H, W] in about [-1, 1] (folds, shadows,
    uneven lighting), in a workspace buffer. Built from 1-D curves by
    broadcasting: a 2-D resize of a coarse noise grid costs several times more."""
    ky, kx = max(2, height // 60), max(2, width // 60)
    gy, gx = _smooth_curve(rng, height, ky), _smooth_curve(rng, width, kx)
    hy, hx = _smooth_curve(rng, height, ky), _smooth_curve(rng, width, kx)
    field = _workspace("light_field", (height, width))
    tmp = _workspace("light_tmp", (height, width))
    np.add(gy[:, None] * np.float32(0.4), gx[None, :] * np.float32(0.4), out=field)
    np.multiply(hy[:, None] * np.float32(0.6), hx[None, :], out=tmp)
    field += tmp
    return field


def _render(mat_map, counts, specs, rng) -> np.ndarray:
    """Image [H, W, 3] uint8 from the material map [H, W] (with its pixel
    count per material id) and per-material textures.

    Pixels are grouped by material (one stable sort); each group is coloured
    from its scalar texture parameters in contiguous slices; light and grain
    are applied there too, and the three uint8 colour planes are scattered
    back once. Far cheaper than per-pixel table lookups in NumPy.
    """
    height, width = mat_map.shape
    n = height * width
    xs_all, ys_all = _grid(height, width)
    _, grain = _tiles()
    flat = mat_map.ravel()
    order = np.argsort(flat, kind="stable")  # pixels grouped by material, ascending inside

    # Per pixel, in sorted order: light = 1 + amplitude * field + grain. The
    # grain is i.i.d., so any contiguous run of the tile serves, unsorted.
    light = _workspace("light", (n,))
    np.take(_light_field(rng, height, width).ravel(), order, out=light)
    grain = grain.ravel()
    amp = np.float32(rng.uniform(0.0, 0.03))
    noise = _workspace("noise", (n,))
    if n <= grain.size:
        first = int(rng.integers(0, grain.size - n + 1))
        np.multiply(grain[first:first + n], amp, out=noise)
    else:
        np.multiply(np.resize(grain, n), amp, out=noise)

    colour = _workspace("colour", (3, n))
    scratch = [_workspace(f"scratch{i}", (n,)) for i in range(5)]
    start = 0
    for m in np.flatnonzero(counts):
        spec = specs[m]
        count = int(counts[m])
        end = start + count
        light_m = light[start:end]
        light_m *= np.float32(spec["shade"])
        light_m += noise[start:end]
        light_m += np.float32(1.0)
        c0 = spec["c0"]
        if spec["kind"] == SOLID:
            for c in range(3):
                np.multiply(light_m, c0[c], out=colour[c, start:end])
        else:
            idx = order[start:end]
            xs, ys = np.take(xs_all, idx, out=scratch[3][:count]), np.take(ys_all, idx, out=scratch[4][:count])
            t = _pattern(spec, xs, ys, [buf[:count] for buf in scratch[:3]])
            t *= light_m
            tmp = scratch[1][:count]
            diff = spec["c1"] - c0
            for c in range(3):
                out = colour[c, start:end]
                np.multiply(light_m, c0[c], out=out)
                np.multiply(t, diff[c], out=tmp)
                out += tmp
        start = end
    np.clip(colour, 0, 255, out=colour)
    colour_u8 = _workspace("colour_u8", (3, n), np.uint8)
    np.copyto(colour_u8, colour, casting="unsafe")
    planes = _workspace("planes", (3, n), np.uint8)
    for c in range(3):  # three 1-D scatters are much faster than one 2-D one
        planes[c][order] = colour_u8[c]

    # Anti-alias: replace pixels whose 4-neighbourhood holds another material
    # by their 3x3 mean (image borders excluded, so every neighbour exists).
    edge = np.zeros((height, width), bool)
    inner = edge[1:-1, 1:-1]
    dx = mat_map[1:-1, 2:] != mat_map[1:-1, 1:-1]
    dy = mat_map[2:, 1:-1] != mat_map[1:-1, 1:-1]
    inner |= dx
    inner[:, 1:] |= dx[:, :-1]
    inner |= dy
    inner[1:, :] |= dy[:-1, :]
    inner[:, 0] |= mat_map[1:-1, 0] != mat_map[1:-1, 1]  # pairs across the frame
    inner[0, :] |= mat_map[0, 1:-1] != mat_map[1, 1:-1]
    e = np.flatnonzero(edge)
    neighbours = [e + d for d in (-width - 1, -width, -width + 1, -1, 1,
                                  width - 1, width, width + 1)]
    for plane in planes:  # 1-D takes: much faster than 2-D fancy indexing
        acc = plane.take(e).astype(np.uint16)
        for nb in neighbours:
            acc += plane.take(nb)
        plane[e] = (acc * np.float32(1.0 / 9.0) + np.float32(0.5)).astype(np.uint8)
    return np.stack([planes[0], planes[1], planes[2]], axis=-1).reshape(height, width, 3)


def draw_person(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws one synthetic fashion photo and its raw ATR mask.

    Args:
        rng: the random generator; all randomness of the image comes from it.
        height, width: image size in pixels.
    Returns:
        image [height, width, 3] uint8 RGB, and mask [height, width] uint8 of
        raw ATR ids 0-17 (classes.RAW_ATR_NAMES), exactly what is visible.

    Example:
        >>> image, mask = draw_person(np.random.default_rng([0, 7]), 600, 400)
        >>> image.shape, mask.shape, int(mask.max()) <= 17
        ((600, 400, 3), (600, 400), True)
    """
    if height < 32 or width < 32:
        raise ValueError(f"draw_person: image must be at least 32x32 pixels, got {width}x{height}")
    person = _build_person(rng)

    # Lean the whole body about the feet, then fit its extent to the image.
    lean = rng.uniform(-0.07, 0.07)
    pivot = np.array([0.0, 1.0])
    pts = _rotate(np.concatenate([poly for _, poly in person.shapes]), lean, pivot)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    frac = rng.uniform(*HEIGHT_FRACTION)
    scale = frac * height / (y1 - y0)
    if (x1 - x0) * scale > 0.98 * width:  # a very wide pose in a narrow image
        scale = 0.98 * width / (x1 - x0)
    top = rng.uniform(0, height - (y1 - y0) * scale)
    left = rng.uniform(0, width - (x1 - x0) * scale)
    offset = np.array([left - x0 * scale, top - y0 * scale])

    person_specs = [(label, _scaled(spec, scale)) for label, spec in person.materials]
    palette = [spec["c0"] for _, spec in person.materials]
    bg_materials, bg_shapes = _background(rng, height, width, top + (y1 - y0) * scale, palette)

    materials = bg_materials + person_specs
    if len(materials) > 256:
        raise AssertionError(f"draw_person: {len(materials)} materials do not fit a uint8 map")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for m, poly in bg_shapes:
        draw.polygon(poly.ravel().tolist(), fill=m)
    n_bg = len(bg_materials)
    coords = (pts * scale + offset).ravel().tolist()
    start = 0
    for m, poly in person.shapes:
        end = start + 2 * len(poly)
        draw.polygon(coords[start:end], fill=n_bg + m)
        start = end
    mat_map = np.asarray(canvas)

    # PIL's C lookup and histogram are much faster than NumPy's on uint8.
    labels = [label for label, _ in materials]
    mask = np.asarray(canvas.point(labels + [0] * (256 - len(labels))))
    counts = canvas.histogram()[:len(materials)]
    image = _render(mat_map, np.array(counts), [spec for _, spec in materials], rng)
    return image, mask


# ----------------------------------------------------------------------------
# Files.


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image: mostly 600x400 portrait, sometimes other."""
    if rng.random() < OTHER_SIZE_FRACTION:
        width, height = OTHER_SIZES[rng.integers(len(OTHER_SIZES))]
    else:
        width, height = DEFAULT_SIZE
    return height, width


def _write_atomic(path: str, data: bytes) -> None:
    """Writes to a hidden temp file in the same folder, then renames, so an
    interrupted run never leaves a half-written file under the final name."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def encode(image: np.ndarray, mask: np.ndarray) -> tuple[bytes, bytes]:
    """JPEG bytes of the image (quality JPEG_QUALITY) and PNG bytes of the mask ('L')."""
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=JPEG_QUALITY)
    Image.fromarray(mask).save(png, format="PNG", compress_level=3)  # fast; masks are simple
    return jpg.getvalue(), png.getvalue()


def generate(out_dir: str, num_images: int, seed: int, *, start_index: int = 0,
             progress: bool = True) -> list[str]:
    """Writes images start_index .. start_index + num_images - 1 in ATR layout.

    Args:
        out_dir: root folder; `JPEGImages/` and `SegmentationClassAug/` are
            created under it.
        num_images: how many images to write.
        seed: non-negative int; image i is drawn from
            `np.random.default_rng([seed, i])`, so pieces can run in parallel.
        start_index: index of the first image (ids are `synth_%06d`).
        progress: log progress with absl.logging.
    Returns:
        The ids written, in order.

    Example:
        >>> generate("/tmp/synth_atr", num_images=4, seed=0)
        ['synth_000000', 'synth_000001', 'synth_000002', 'synth_000003']
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synth: seed must be a non-negative int, got {seed!r}")
    if num_images < 0 or start_index < 0:
        raise ValueError(f"synth: num_images ({num_images}) and start_index ({start_index}) "
                         "must be non-negative")
    image_dir = os.path.join(out_dir, IMAGE_DIR)
    mask_dir = os.path.join(out_dir, MASK_DIR)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    ids = []
    t0 = time.perf_counter()
    log_every = max(1, min(500, num_images // 10))
    for i in range(start_index, start_index + num_images):
        rng = np.random.default_rng([int(seed), i])
        height, width = image_size(rng)
        image, mask = draw_person(rng, height, width)
        jpg, png = encode(image, mask)
        image_id = ID_FORMAT.format(i)
        _write_atomic(os.path.join(image_dir, image_id + ".jpg"), jpg)
        _write_atomic(os.path.join(mask_dir, image_id + ".png"), png)
        ids.append(image_id)
        done = len(ids)
        if progress and (done % log_every == 0 or done == num_images):
            rate = done / max(time.perf_counter() - t0, 1e-9)
            logging.info("synth: %d/%d images written to %s (%.1f images/s)",
                         done, num_images, out_dir, rate)
    return ids


# ----------------------------------------------------------------------------
# CLI.


def _define_flags():
    # Defined only when run as a program, so importing the library never
    # registers flags that could clash with another CLI's.
    flags.DEFINE_string("out", None, "Output root folder; JPEGImages/ and "
                        "SegmentationClassAug/ are created under it.")
    flags.DEFINE_integer("num_images", 100, "Number of images to write.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Non-negative seed; image i depends only on (seed, i).",
                         lower_bound=0)
    flags.DEFINE_integer("start_index", 0, "Index of the first image (ids synth_%06d); use it "
                         "to resume an interrupted run or to split one over processes.",
                         lower_bound=0)
    flags.mark_flag_as_required("out")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    t0 = time.perf_counter()
    ids = generate(f.out, f.num_images, f.seed, start_index=f.start_index)
    seconds = time.perf_counter() - t0
    logging.info("synth: wrote %d images to %s in %.1f s (%.1f images/s)", len(ids), f.out,
                 seconds, len(ids) / max(seconds, 1e-9))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
