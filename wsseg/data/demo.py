"""The demo dataset: small synthetic scenes in the PASCAL VOC 2012 devkit layout.

`wsseg demo-data` calls `generate_demo`. The scenes are built so that the demo exercises
what makes learning segmentation from image tags hard, not only that the code runs:

- **boat** (id 1): brown hull, mast, white sails. Sits on *water* in ~80 % of its images,
  and water is rare without a boat, while water is background in the ground truth: the
  boat-on-water co-occurrence that makes CAMs leak onto the background.
- **crate** (id 2): tan wooden box with planks, frame and an X brace. Often several per
  image, overlapping each other: instance separation, occlusion between same-class
  objects (VOC draws a void band between them in the class map too).
- **truck** (id 3): a cargo box painted exactly like a crate plus a small red cab and two
  black wheels. The cab and wheels (~28 % of the area) are the only cue that separates
  it from a crate, so its CAM fires on the cab and under-covers the box: the condition
  IRN's propagation over the inter-pixel affinities is meant to fix.
- **ring** (id 4): a purple-and-white life ring with a hole the background shows
  through: thin structure and holes, which blob-like CAMs and CRFs fill in.
- **ball** (id 5): a yellow ball with a red band; compact and easy, a sanity baseline.
  It is the class most often placed across the image border (truncation).

Every image holds 1-3 classes and 1-6 objects; objects lower in the image are nearer
and occlude those behind them (consistently in pixels and both masks), each keeping at
least 45 % of its area; backgrounds are textures (water, grass, sand, wall,
clouds; water scenes may show a cloudy sky above a horizon). Images are non-square:
the long side is `size`, the short side 0.7-1.0 x `size`, landscape or portrait. As in
VOC, a void band (255) of width ~size/64 px runs along every object outline (against
the background and between objects) in both SegmentationClass and SegmentationObject.

Every image also gets a depth map, `Depth/<id>.png` (16-bit, millimetres, larger = farther,
0 = no reading; for RGB-D segmenters, `data.depth_dir: Depth`), drawn from the same scene: the
ground is a plane seen from above whose depth grows towards the top of the image (1.5 m at the
bottom row), a wall or a cloud backdrop is a flat far plane (6 m), the sky above a water
horizon has no reading (0), and each object is a flat face standing on the ground at its
lowest row, a little nearer than the ground there, each drawn object nearer than every object
drawn before it (which it may hide); 1 % multiplicative noise and 0.5 % dropped pixels (0).

Everything derives from the seed: image `i` is drawn from `numpy.random.default_rng([seed,
i])`, so it does not depend on `num_images`, and two runs with the same arguments write
byte-identical files. The depth map's noise has its own stream, `default_rng([seed, i,
DEPTH_STREAM])`, so adding it changed no image, label or tag. Each file is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from wsseg.data.images import write_depth_png, write_label_png
from wsseg.errors import UserError

# ---- dataset-level constants

DEMO_CLASSES: tuple[str, ...] = ("boat", "crate", "truck", "ring", "ball")  # class id = index + 1
BACKGROUNDS: tuple[str, ...] = ("water", "grass", "sand", "wall", "clouds")
# `--classes N` (up to 20, VOC's count) adds classes in this order after the five above, and
# the backgrounds they need. They are built in the same spirit: look-alikes (car and truck
# share wheels, star and ball their yellow, bicycle wheels are thin rings, tree and cactus
# are green on green), thin parts and holes (lamp, chair, bicycle), and context: most of
# them sit on their own background most of the time (CONTEXT), as the boat sits on water.
EXTRA_CLASSES: tuple[str, ...] = (
    "kite", "cactus", "car", "flower", "bottle", "lamp", "chair", "tree", "fish", "star",
    "house", "snowman", "umbrella", "bicycle", "sign",
)
ALL_CLASSES: tuple[str, ...] = DEMO_CLASSES + EXTRA_CLASSES
EXTRA_BACKGROUNDS: tuple[str, ...] = ("road", "snow", "tiles")
# class -> (its background, P(that background | the class is in the image))
CONTEXT: dict[str, tuple[str, float]] = {
    "boat": ("water", 0.8),
    "kite": ("clouds", 0.75),
    "cactus": ("sand", 0.75),
    "car": ("road", 0.7),
    "flower": ("grass", 0.7),
    "fish": ("water", 0.7),
    "snowman": ("snow", 0.85),
    "umbrella": ("sand", 0.5),
    "sign": ("road", 0.6),
}
DEFAULT_NUM_CLASSES = len(DEMO_CLASSES)

DEFAULT_NUM_IMAGES = 240  # 180 train + 60 val: a CPU run of the whole pipeline stays in minutes
DEFAULT_SIZE = 128  # long side in px; the demo config trains at this scale, not VOC's 512 crops
ID_PREFIX = "2026_"  # ids look like VOC's (2007_000032): strings with leading zeros
VAL_EVERY = 4  # every 4th image goes to val: train 75 %, val 25 %
JPEG_QUALITY = 90
MARKER = "wsseg_demo.json"  # marks a folder as written by generate_demo (and holds its summary)

# ---- scene statistics

NUM_CLASSES_PROBS = (0.5, 0.35, 0.15)  # P(1, 2, 3 classes in an image)
INSTANCE_COUNT_PROBS = {  # P(1, 2, 3, 4 instances of the class | class present)
    "boat": (0.8, 0.2),
    "crate": (0.3, 0.3, 0.25, 0.15),  # the multi-instance class
    "truck": (0.85, 0.15),
    "ring": (0.75, 0.25),
    "ball": (0.6, 0.3, 0.1),
    "kite": (0.6, 0.3, 0.1),
    "cactus": (0.5, 0.3, 0.2),
    "car": (0.6, 0.3, 0.1),
    "flower": (0.3, 0.3, 0.25, 0.15),
    "bottle": (0.4, 0.3, 0.2, 0.1),
    "lamp": (0.8, 0.2),
    "chair": (0.5, 0.3, 0.2),
    "tree": (0.5, 0.3, 0.2),
    "fish": (0.4, 0.3, 0.2, 0.1),
    "star": (0.5, 0.3, 0.2),
    "house": (0.8, 0.2),
    "snowman": (0.8, 0.2),
    "umbrella": (0.7, 0.3),
    "bicycle": (0.85, 0.15),
    "sign": (0.85, 0.15),
}
MAX_OBJECTS = 6
BOAT_ON_WATER = 0.8  # P(water background | boat in image): the co-occurrence to leak onto
WATER_WITHOUT_BOAT = 0.1  # P(water | no boat): rare, so water predicts "boat" for a classifier
HORIZON_PROB = 0.5  # P(a cloudy sky above the water | water background)
OVERLAP_PROB = 0.45  # P(an object is placed against an earlier one | not the first object)
TRUNCATE_PROB = {"ball": 0.2}  # P(placed across the image border); others use the default
TRUNCATE_PROB_DEFAULT = 0.04
MIN_VISIBLE_FRACTION = 0.45  # an occluded object keeps at least this share of its pixels
PLACEMENT_TRIES = 20  # attempts per object before it is dropped (the first never fails)

# ---- object sizes, as fractions of the image's short side

SIZE_RANGE = {
    "boat": (0.45, 0.7),  # hull length
    "crate": (0.22, 0.38),  # side
    "truck": (0.55, 0.85),  # length
    "ring": (0.26, 0.42),  # outer diameter
    "ball": (0.18, 0.32),  # diameter
    "kite": (0.3, 0.45),  # height of the diamond
    "cactus": (0.4, 0.6),  # height
    "car": (0.45, 0.65),  # length
    "flower": (0.25, 0.4),  # height with the stem
    "bottle": (0.3, 0.45),  # height
    "lamp": (0.5, 0.75),  # height
    "chair": (0.35, 0.5),  # height of the backrest
    "tree": (0.45, 0.7),  # height
    "fish": (0.3, 0.45),  # length
    "star": (0.22, 0.35),  # diameter
    "house": (0.4, 0.6),  # height with the roof
    "snowman": (0.45, 0.65),  # height
    "umbrella": (0.4, 0.6),  # canopy width
    "bicycle": (0.5, 0.7),  # length
    "sign": (0.45, 0.65),  # height with the pole
}
MAX_TILT_DEGREES = {"boat": 8.0, "crate": 20.0, "truck": 5.0, "ring": 180.0, "ball": 180.0,
                    "kite": 25.0, "cactus": 5.0, "car": 5.0, "flower": 15.0, "bottle": 15.0, "lamp": 3.0,
                    "chair": 5.0, "tree": 5.0, "fish": 25.0, "star": 180.0, "house": 3.0, "snowman": 5.0,
                    "umbrella": 15.0, "bicycle": 5.0, "sign": 3.0}

# ---- colours (RGB 0..255)

HULL = (110, 62, 32)
SAIL = (238, 236, 226)
SAIL_STRIPE = (200, 40, 40)
WOOD = (196, 142, 72)  # crate and truck cargo box: the shared body
WOOD_DARK = (128, 84, 40)
CAB = (205, 32, 40)
CAB_WINDOW = (170, 215, 240)
WHEEL = (28, 28, 30)
HUB = (150, 150, 155)
RING_A = (140, 52, 182)
RING_B = (240, 240, 240)
BALL = (240, 204, 36)
BALL_BAND = (215, 50, 30)

NOISE_SIGMA = 3.0  # sensor noise added to the whole image, in 0..255 units

# ---- depth maps (Depth/<id>.png, uint16 millimetres; 0 = no reading)

DEPTH_STREAM = 0x64657074  # "dept": the depth noise's generator is default_rng([seed, index, DEPTH_STREAM])
DEPTH_NEAR_MM = 1500.0  # the ground at the bottom image row
DEPTH_HORIZON = -0.6  # the ground's vanishing row, as a share of the height (< 0: above the image, no sky)
DEPTH_FAR_MM = 15000.0  # the ground's depth is clipped here (near a water horizon it grows without bound)
DEPTH_BACKDROP_MM = 6000.0  # wall and clouds: a flat backdrop, farther than any object (at most ~4 m)
BACKDROPS = ("wall", "clouds")
DEPTH_OBJECT_FACTOR = 0.97  # an object's face: this share of the ground's depth at its lowest row ...
DEPTH_ORDER_STEP = 0.01  # ... less this share per object drawn before it: an occluder is always nearer
DEPTH_NOISE = 0.01  # multiplicative N(0, 1 %) noise
DEPTH_DROPOUT = 0.005  # share of pixels without a reading (0)


# ---- background textures: (rng, height, width, unit) -> (H, W, 3) float32 in 0..255
# `unit` is the short side / 100, so textures look alike at every `size`.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise: an N(0, 1) grid with one node every `cell` px, bilinearly upsampled; (H, W) float32."""
    cell = max(cell, 1.0)
    grid = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    fine = ndimage.zoom(grid, cell, order=1)
    return fine[:height, :width]


def _pixel_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.standard_normal((height, width)).astype(np.float32)


def _colour(rgb: tuple[int, int, int], shade: np.ndarray | float = 0.0) -> np.ndarray:
    """A base colour plus a grey shade offset: (H, W, 3) float32 when `shade` is (H, W)."""
    return np.asarray(rgb, dtype=np.float32) + np.asarray(shade, dtype=np.float32)[..., None]


def _texture_water(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Blue horizontal waves with pale crests."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    wavelength = rng.uniform(5.0, 8.0) * unit
    wobble = np.sin(2 * np.pi * x / (rng.uniform(4, 7) * wavelength) + rng.uniform(0, 2 * np.pi))
    waves = np.sin(2 * np.pi * (y / wavelength + 0.25 * wobble) + rng.uniform(0, 2 * np.pi))
    rgb = _colour((35, 95, 165)) + waves[..., None] * np.array([10, 18, 25], np.float32)
    rgb += 6 * _smooth_noise(rng, height, width, 10 * unit)[..., None]
    rgb[waves > 0.9] += 45  # crests
    return rgb


def _texture_grass(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Green with vertical blades (noise smoothed along y) and patches."""
    blades = ndimage.uniform_filter1d(_pixel_noise(rng, height, width), size=max(3, int(4 * unit)), axis=0)
    shade = 40 * blades + 10 * _smooth_noise(rng, height, width, 15 * unit)
    return _colour((80, 142, 56), shade) * np.array([0.9, 1.0, 0.8], np.float32)


def _texture_sand(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Beige with fine speckle and soft dunes."""
    shade = 12 * _pixel_noise(rng, height, width) + 10 * _smooth_noise(rng, height, width, 14 * unit)
    return _colour((206, 186, 140), shade)


def _texture_wall(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Grey stone blocks in a running bond, dark mortar, one shade per block."""
    y, x = np.mgrid[0:height, 0:width]
    block_h = max(4, int(round(9 * unit)))
    block_w = 2 * block_h
    row = y // block_h
    x_shifted = x + (row % 2) * (block_w // 2) + int(rng.integers(block_w))
    column = x_shifted // block_w
    block_shade = rng.normal(0, 12, size=(int(row.max()) + 1, int(column.max()) + 1)).astype(np.float32)
    shade = block_shade[row, column] + 5 * _pixel_noise(rng, height, width)
    rgb = _colour((142, 140, 134), shade)
    mortar_w = max(1, block_h // 6)
    mortar = ((y % block_h) < mortar_w) | ((x_shifted % block_w) < mortar_w)
    rgb[mortar] = (80, 78, 74)
    return rgb


def _texture_clouds(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Sky gradient with soft white clouds."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = (1 - t) * np.array([100, 150, 215], np.float32) + t * np.array([180, 205, 235], np.float32)
    cloud = np.clip(_smooth_noise(rng, height, width, 22 * unit) - 0.3, 0.0, 1.0)[..., None]
    return sky * (1 - cloud) + 245 * cloud


def _texture_road(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Dark asphalt with grit and a dashed yellow lane line."""
    shade = 10 * _pixel_noise(rng, height, width) + 6 * _smooth_noise(rng, height, width, 12 * unit)
    rgb = _colour((72, 72, 76), shade)
    y, x = np.mgrid[0:height, 0:width]
    line_y = rng.uniform(0.3, 0.7) * height
    dash = max(4, int(12 * unit))
    lane = (np.abs(y - line_y) < max(1.0, 1.2 * unit)) & ((x + int(rng.integers(dash))) % (2 * dash) < dash)
    rgb[lane] = (222, 196, 60)
    return rgb


def _texture_snow(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """Bright white-blue with soft drifts."""
    shade = 8 * _smooth_noise(rng, height, width, 16 * unit) + 3 * _pixel_noise(rng, height, width)
    return _colour((232, 238, 246), shade)


def _texture_tiles(rng: np.random.Generator, height: int, width: int, unit: float) -> np.ndarray:
    """A floor of square tiles in two tones with light grout: an indoor, contextless background."""
    y, x = np.mgrid[0:height, 0:width]
    tile = max(5, int(round(14 * unit)))
    offset = int(rng.integers(tile))
    checker = ((y + offset) // tile + (x + offset) // tile) % 2
    rgb = np.where(checker[..., None] == 0, _colour((176, 160, 138)), _colour((150, 120, 96)))
    rgb += 5 * _pixel_noise(rng, height, width)[..., None]
    grout = ((y + offset) % tile == 0) | ((x + offset) % tile == 0)
    rgb[grout] = (210, 206, 196)
    return rgb


TEXTURES: dict[str, Callable] = {
    "water": _texture_water,
    "grass": _texture_grass,
    "sand": _texture_sand,
    "wall": _texture_wall,
    "clouds": _texture_clouds,
    "road": _texture_road,
    "snow": _texture_snow,
    "tiles": _texture_tiles,
}


# ---- objects: (u, v, length, rng) -> (mask (H, W) bool, rgb (H, W, 3) float32)
# u, v are each pixel's coordinates in the object's frame (px; u right, v down, origin at
# the object's centre, already rotated and mirrored); `length` is the object's long side.
# Each function paints its parts in order, the last part winning where parts overlap.


def _paint(mask: np.ndarray, rgb: np.ndarray, part: np.ndarray, colour: np.ndarray) -> None:
    mask |= part
    rgb[part] = colour[part] if colour.ndim == 3 else colour


def _empty(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(u.shape, bool), np.zeros(u.shape + (3,), np.float32)


def _crate_texture(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    """Planks along u, a darker frame and an X brace: shared by crates and truck cargo boxes."""
    plank = (v + half_v) / max(2 * half_v / 4, 1.0)  # four planks
    shade = 14 * np.cos(2 * np.pi * u / max(half_u, 1.0) * 1.5)  # grain
    rgb = _colour(WOOD, shade)
    seams = np.abs(plank - np.round(plank)) * (2 * half_v / 4) < 0.6
    frame_w = 0.14 * min(half_u, half_v)
    frame = (np.abs(u) > half_u - frame_w) | (np.abs(v) > half_v - frame_w)
    brace_w = 0.7 * frame_w
    diagonal = np.minimum(np.abs(u * half_v - v * half_u), np.abs(u * half_v + v * half_u)) / np.hypot(half_u, half_v)
    dark = seams | frame | (diagonal < brace_w)
    rgb[dark] = WOOD_DARK
    return rgb


def _draw_crate(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    aspect = rng.uniform(0.75, 1.0)
    half_u, half_v = length / 2, length * aspect / 2
    mask, rgb = _empty(u)
    box = (np.abs(u) <= half_u) & (np.abs(v) <= half_v)
    _paint(mask, rgb, box, _crate_texture(u, v, half_u, half_v))
    return mask, rgb


def _draw_truck(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cargo box (crate texture) on the left, red cab with a window on the right, two wheels."""
    L = length
    mask, rgb = _empty(u)
    box_top, box_bottom = -0.26 * L, 0.12 * L
    box_left, box_right = -0.5 * L, 0.2 * L
    box = (u >= box_left) & (u <= box_right) & (v >= box_top) & (v <= box_bottom)
    half_u, half_v = (box_right - box_left) / 2, (box_bottom - box_top) / 2
    box_u, box_v = u - (box_left + half_u), v - (box_top + half_v)
    _paint(mask, rgb, box, _crate_texture(box_u, box_v, half_u, half_v))
    # Cab: lower than the box, with a slanted front.
    cab_top = -0.1 * L
    front = 0.5 * L - 0.35 * np.clip(cab_top + 0.1 * L - v, 0, None)
    cab = (u >= box_right) & (u <= front) & (v >= cab_top) & (v <= box_bottom)
    _paint(mask, rgb, cab, _colour(CAB, 8 * np.sin(v)))
    window = (u >= box_right + 0.06 * L) & (u <= front - 0.05 * L)
    window &= (v >= cab_top + 0.03 * L) & (v <= cab_top + 0.1 * L)
    _paint(mask, rgb, window, np.asarray(CAB_WINDOW, np.float32))
    wheel_r = 0.085 * L
    for wheel_u in (-0.32 * L, 0.34 * L):
        distance = np.hypot(u - wheel_u, v - box_bottom)
        _paint(mask, rgb, distance <= wheel_r, np.asarray(WHEEL, np.float32))
        _paint(mask, rgb, distance <= 0.4 * wheel_r, np.asarray(HUB, np.float32))
    return mask, rgb


def _draw_boat(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid hull below the deck line, a thin mast, a main sail and a jib."""
    L = length
    mask, rgb = _empty(u)
    deck, keel = 0.2 * L, 0.4 * L
    top_half, bottom_half = 0.5 * L, 0.3 * L
    hull_half = top_half - (top_half - bottom_half) * (v - deck) / (keel - deck)
    hull = (v >= deck) & (v <= keel) & (np.abs(u) <= hull_half)
    planks = 12 * np.sign(np.sin(2 * np.pi * (v - deck) / max(0.07 * L, 2.0)))
    _paint(mask, rgb, hull, _colour(HULL, planks))
    mast_u, mast_top = -0.08 * L, -0.42 * L
    sail_base = deck  # the sails' foot rests on the deck: one connected object
    height = sail_base - mast_top
    along = np.clip((v - mast_top) / height, 0, 1)  # 0 at the masthead, 1 at the sail's foot
    main = (v >= mast_top + 0.02 * L) & (v <= sail_base) & (u >= mast_u) & (u <= mast_u + 0.42 * L * along)
    stripe = main & (np.abs(along - rng.uniform(0.45, 0.75)) < 0.07)
    jib = (v >= mast_top + 0.12 * L) & (v <= sail_base) & (u <= mast_u) & (u >= mast_u - 0.3 * L * (along - 0.15))
    sail_shade = 10 * along
    _paint(mask, rgb, main | jib, _colour(SAIL, -sail_shade))
    _paint(mask, rgb, stripe, np.asarray(SAIL_STRIPE, np.float32))
    mast = (np.abs(u - mast_u) <= max(0.6, 0.012 * L)) & (v >= mast_top) & (v <= deck)
    _paint(mask, rgb, mast, np.asarray(HULL, np.float32) * 0.7)
    return mask, rgb


def _draw_ring(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Annulus in eight alternating segments; the hole shows the background."""
    outer = length / 2
    inner = outer * rng.uniform(0.5, 0.62)
    radius = np.hypot(u, v)
    segment = np.floor((np.arctan2(v, u) + np.pi) / (2 * np.pi) * 8).astype(int) % 2
    shade = 18 * np.cos(np.pi * (radius - inner) / (outer - inner) - np.pi / 2)  # tube highlight
    colours = np.where(segment[..., None] == 0, _colour(RING_A, shade), _colour(RING_B, 0.6 * shade))
    mask, rgb = _empty(u)
    _paint(mask, rgb, (radius <= outer) & (radius >= inner), colours)
    return mask, rgb


def _draw_ball(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Yellow disc with a red band across it, darker towards the rim."""
    radius = length / 2
    rho = np.hypot(u, v) / radius
    band = np.abs(v) < rng.uniform(0.18, 0.3) * radius
    shading = (1 - 0.35 * rho**2)[..., None]
    colours = np.where(band[..., None], _colour(BALL_BAND), _colour(BALL)) * shading
    mask, rgb = _empty(u)
    _paint(mask, rgb, rho <= 1.0, colours)
    return mask, rgb


# ---- shapes for the classes beyond the first five


def _segment(u: np.ndarray, v: np.ndarray, start: tuple[float, float], end: tuple[float, float], half_width: float) -> np.ndarray:
    """Pixels within `half_width` of the line segment start -> end, points given as (u, v)."""
    (u0, v0), (u1, v1) = start, end
    du, dv = u1 - u0, v1 - v0
    t = np.clip(((u - u0) * du + (v - v0) * dv) / max(du * du + dv * dv, 1e-6), 0.0, 1.0)
    return np.hypot(u - (u0 + t * du), v - (v0 + t * dv)) <= max(half_width, 0.6)


def _polygon(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Pixels inside the polygon (even-odd rule), points given as (u, v); convex or not."""
    inside = np.zeros(u.shape, bool)
    for (u0, v0), (u1, v1) in zip(points, points[1:] + points[:1]):
        crosses = (v0 > v) != (v1 > v)
        at = u0 + (v - v0) * (u1 - u0) / ((v1 - v0) if v1 != v0 else 1e-9)
        inside ^= crosses & (u < at)
    return inside


def _ellipse(u: np.ndarray, v: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    return ((u - centre[0]) / max(radii[0], 0.5)) ** 2 + ((v - centre[1]) / max(radii[1], 0.5)) ** 2 <= 1.0


def _draw_kite(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A diamond in four coloured quarters with dark spars and a wavy tail."""
    L = length
    half_w, top, bottom = 0.28 * L, -0.45 * L, 0.25 * L
    cross = -0.2 * L  # where the spars cross
    diamond = _polygon(u, v, [(0, top), (half_w, cross), (0, bottom), (-half_w, cross)])
    quarter = (u >= 0).astype(int) + 2 * (v >= cross).astype(int)
    palette = np.array([(214, 40, 60), (250, 200, 40), (40, 90, 200), (250, 120, 30)], np.float32)
    mask, rgb = _empty(u)
    _paint(mask, rgb, diamond, palette[quarter])
    spars = _segment(u, v, (0, top), (0, bottom), 0.012 * L) | _segment(u, v, (-half_w, cross), (half_w, cross), 0.012 * L)
    _paint(mask, rgb, spars & diamond, np.asarray((60, 40, 30), np.float32))
    tail_v = np.linspace(bottom, 0.55 * L, 12)
    tail_u = 0.05 * L * np.sin(np.linspace(0, 3 * np.pi, 12) + rng.uniform(0, np.pi))
    tail = np.zeros(u.shape, bool)
    for k in range(11):
        tail |= _segment(u, v, (tail_u[k], tail_v[k]), (tail_u[k + 1], tail_v[k + 1]), 0.01 * L)
    _paint(mask, rgb, tail, np.asarray((214, 40, 60), np.float32))
    return mask, rgb


def _draw_cactus(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ribbed green column with two raised arms."""
    L = length
    trunk_w = 0.09 * L
    trunk = (np.abs(u) <= trunk_w) & (v >= -0.5 * L + trunk_w) & (v <= 0.5 * L) | _ellipse(u, v, (0, -0.5 * L + trunk_w), (trunk_w, trunk_w))
    arms = np.zeros(u.shape, bool)
    for side, height in ((-1, rng.uniform(-0.05, 0.1)), (1, rng.uniform(-0.15, 0.0))):
        elbow_u, arm_w = side * 0.25 * L, 0.06 * L
        arms |= _segment(u, v, (0, height * L), (elbow_u, height * L), arm_w)
        arms |= _segment(u, v, (elbow_u, height * L), (elbow_u, (height - 0.22) * L), arm_w)
    ribs = 14 * np.cos(2 * np.pi * u / max(0.05 * L, 1.0))
    mask, rgb = _empty(u)
    _paint(mask, rgb, trunk | arms, _colour((62, 128, 62), ribs))
    return mask, rgb


def _draw_car(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A low body with a cabin and windows, on the truck's wheels."""
    L = length
    colour = [(30, 70, 170), (40, 150, 80), (220, 220, 225), (120, 30, 130)][int(rng.integers(4))]
    body = (np.abs(u) <= 0.5 * L) & (v >= -0.06 * L) & (v <= 0.12 * L)
    cabin = _polygon(u, v, [(-0.28 * L, -0.06 * L), (-0.18 * L, -0.24 * L), (0.16 * L, -0.24 * L), (0.3 * L, -0.06 * L)])
    mask, rgb = _empty(u)
    _paint(mask, rgb, body | cabin, _colour(colour, 6 * np.sin(u / max(0.05 * L, 1.0))))
    windows = _polygon(u, v, [(-0.22 * L, -0.08 * L), (-0.15 * L, -0.2 * L), (0.13 * L, -0.2 * L), (0.23 * L, -0.08 * L)])
    windows &= np.abs(u + 0.01 * L) > 0.015 * L  # the pillar between the windows
    _paint(mask, rgb, windows, np.asarray(CAB_WINDOW, np.float32))
    wheel_r = 0.1 * L
    for wheel_u in (-0.3 * L, 0.3 * L):
        distance = np.hypot(u - wheel_u, v - 0.12 * L)
        _paint(mask, rgb, distance <= wheel_r, np.asarray(WHEEL, np.float32))
        _paint(mask, rgb, distance <= 0.4 * wheel_r, np.asarray(HUB, np.float32))
    return mask, rgb


def _draw_flower(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Six petals around a yellow centre on a green stem."""
    L = length
    head_v, petal = -0.25 * L, 0.13 * L
    colour = [(230, 60, 130), (250, 250, 250), (150, 70, 220)][int(rng.integers(3))]
    mask, rgb = _empty(u)
    _paint(mask, rgb, _segment(u, v, (0, head_v), (0, 0.5 * L), 0.025 * L), np.asarray((60, 120, 40), np.float32))
    turn = rng.uniform(0, np.pi / 3)
    for k in range(6):
        angle = turn + k * np.pi / 3
        centre = (1.1 * petal * np.cos(angle), head_v + 1.1 * petal * np.sin(angle))
        du, dv = u - centre[0], v - centre[1]
        along = du * np.cos(angle) + dv * np.sin(angle)
        across = -du * np.sin(angle) + dv * np.cos(angle)
        _paint(mask, rgb, (along / petal) ** 2 + (across / (0.55 * petal)) ** 2 <= 1, np.asarray(colour, np.float32))
    _paint(mask, rgb, _ellipse(u, v, (0, head_v), (0.6 * petal, 0.6 * petal)), np.asarray((245, 200, 40), np.float32))
    return mask, rgb


def _draw_bottle(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Green glass: a body, a sloping shoulder, a neck and a cap, with a paper label and a highlight."""
    L = length
    half_w = 0.14 * L
    outline = [(-half_w, 0.5 * L), (-half_w, -0.05 * L), (-0.05 * L, -0.25 * L), (-0.05 * L, -0.45 * L),
               (0.05 * L, -0.45 * L), (0.05 * L, -0.25 * L), (half_w, -0.05 * L), (half_w, 0.5 * L)]
    glass = _polygon(u, v, outline)
    mask, rgb = _empty(u)
    _paint(mask, rgb, glass, _colour((40, 110, 60), 30 * np.exp(-((u + 0.06 * L) / max(0.03 * L, 0.5)) ** 2)))
    label = glass & (v >= 0.1 * L) & (v <= 0.32 * L)
    _paint(mask, rgb, label, np.asarray((236, 226, 200), np.float32))
    cap = (np.abs(u) <= 0.06 * L) & (v >= -0.5 * L) & (v <= -0.43 * L)
    _paint(mask, rgb, cap, np.asarray((180, 150, 40), np.float32))
    return mask, rgb


def _draw_lamp(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin pole on a round base under a conical shade: mostly thin structure."""
    L = length
    mask, rgb = _empty(u)
    _paint(mask, rgb, _segment(u, v, (0, -0.3 * L), (0, 0.46 * L), 0.018 * L), np.asarray((60, 60, 64), np.float32))
    _paint(mask, rgb, _ellipse(u, v, (0, 0.47 * L), (0.14 * L, 0.035 * L)), np.asarray((60, 60, 64), np.float32))
    shade = _polygon(u, v, [(-0.09 * L, -0.5 * L), (0.09 * L, -0.5 * L), (0.2 * L, -0.28 * L), (-0.2 * L, -0.28 * L)])
    _paint(mask, rgb, shade, _colour((240, 220, 150), 10 * (v / max(L, 1.0))))
    return mask, rgb


def _draw_chair(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seat, a slatted backrest and four thin legs (seen from the side, two of them)."""
    L = length
    wood = _colour((150, 70, 40), 8 * np.sin(u / max(0.02 * L, 0.5)))
    mask, rgb = _empty(u)
    seat = (np.abs(u) <= 0.22 * L) & (v >= 0.02 * L) & (v <= 0.08 * L)
    legs = _segment(u, v, (-0.2 * L, 0.08 * L), (-0.2 * L, 0.5 * L), 0.02 * L)
    legs |= _segment(u, v, (0.2 * L, 0.08 * L), (0.2 * L, 0.5 * L), 0.02 * L)
    back = _segment(u, v, (-0.2 * L, 0.02 * L), (-0.2 * L, -0.5 * L), 0.022 * L)
    for slat_v in (-0.45 * L, -0.3 * L, -0.15 * L):
        back |= _segment(u, v, (-0.2 * L, slat_v), (-0.02 * L, slat_v), 0.02 * L)
    back |= _segment(u, v, (-0.02 * L, -0.47 * L), (-0.02 * L, 0.02 * L), 0.015 * L)
    _paint(mask, rgb, seat | legs | back, wood)
    return mask, rgb


def _draw_tree(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A brown trunk under a lumpy green canopy (green on grass: camouflage)."""
    L = length
    mask, rgb = _empty(u)
    trunk = (np.abs(u) <= 0.06 * L) & (v >= 0.0) & (v <= 0.5 * L)
    _paint(mask, rgb, trunk, _colour((105, 70, 40), 10 * np.sin(v / max(0.02 * L, 0.5))))
    canopy = np.zeros(u.shape, bool)
    for k in range(5):
        angle = 2 * np.pi * k / 5 + rng.uniform(0, 0.5)
        canopy |= _ellipse(u, v, (0.13 * L * np.cos(angle), -0.2 * L + 0.1 * L * np.sin(angle)), (0.17 * L, 0.15 * L))
    _paint(mask, rgb, canopy, _colour((52, 112, 44), 16 * np.sin(u / max(0.03 * L, 0.5)) * np.cos(v / max(0.03 * L, 0.5))))
    return mask, rgb


def _draw_fish(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An orange body with white stripes, a forked tail and an eye (it shares the water with boats)."""
    L = length
    body = _ellipse(u, v, (0.05 * L, 0), (0.36 * L, 0.17 * L))
    tail = _polygon(u, v, [(-0.28 * L, 0), (-0.5 * L, -0.17 * L), (-0.44 * L, 0), (-0.5 * L, 0.17 * L)])
    stripes = body & (np.abs(np.sin(2 * np.pi * (u - 0.05 * L) / max(0.22 * L, 1.0))) > 0.92)
    mask, rgb = _empty(u)
    _paint(mask, rgb, body | tail, _colour((240, 120, 30), -12 * (v / max(0.2 * L, 1.0))))
    _paint(mask, rgb, stripes, np.asarray((250, 250, 250), np.float32))
    _paint(mask, rgb, _ellipse(u, v, (0.28 * L, -0.04 * L), (0.03 * L, 0.03 * L)), np.asarray((20, 20, 20), np.float32))
    return mask, rgb


def _draw_star(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A five-pointed golden star (the ball's yellow, another shape)."""
    outer, inner = length / 2, length / 2 * 0.42
    points = [((outer if k % 2 == 0 else inner) * np.sin(np.pi * k / 5), -(outer if k % 2 == 0 else inner) * np.cos(np.pi * k / 5))
              for k in range(10)]
    rho = np.hypot(u, v) / outer
    mask, rgb = _empty(u)
    _paint(mask, rgb, _polygon(u, v, points), _colour(BALL, -40 * rho))
    return mask, rgb


def _draw_house(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Walls under a red roof, a door and a window."""
    L = length
    mask, rgb = _empty(u)
    walls = (np.abs(u) <= 0.3 * L) & (v >= -0.1 * L) & (v <= 0.5 * L)
    _paint(mask, rgb, walls, _colour((230, 210, 170), 4 * np.sin(v / max(0.02 * L, 0.5))))
    roof = _polygon(u, v, [(-0.38 * L, -0.1 * L), (0, -0.5 * L), (0.38 * L, -0.1 * L)])
    _paint(mask, rgb, roof, _colour((170, 50, 40), 10 * np.sign(np.sin(v / max(0.03 * L, 0.5)))))
    door = (np.abs(u - 0.12 * L) <= 0.07 * L) & (v >= 0.22 * L) & (v <= 0.5 * L)
    _paint(mask, rgb, door, np.asarray((110, 70, 40), np.float32))
    window = (np.abs(u + 0.13 * L) <= 0.08 * L) & (np.abs(v - 0.12 * L) <= 0.07 * L)
    _paint(mask, rgb, window, np.asarray(CAB_WINDOW, np.float32))
    return mask, rgb


def _draw_snowman(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three stacked white balls with a carrot nose and a black hat (white on snow)."""
    L = length
    mask, rgb = _empty(u)
    for centre_v, radius in ((0.3 * L, 0.2 * L), (-0.02 * L, 0.15 * L), (-0.26 * L, 0.11 * L)):
        ball = _ellipse(u, v, (0, centre_v), (radius, radius))
        _paint(mask, rgb, ball, _colour((246, 246, 250), -25 * np.hypot(u, v - centre_v) / radius))
    _paint(mask, rgb, _polygon(u, v, [(0.03 * L, -0.28 * L), (0.16 * L, -0.25 * L), (0.03 * L, -0.23 * L)]),
           np.asarray((240, 120, 20), np.float32))
    hat = ((np.abs(u) <= 0.08 * L) & (v >= -0.5 * L) & (v <= -0.35 * L)) | ((np.abs(u) <= 0.13 * L) & (np.abs(v + 0.35 * L) <= 0.015 * L))
    _paint(mask, rgb, hat, np.asarray((25, 25, 28), np.float32))
    return mask, rgb


def _draw_umbrella(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A half-disc canopy in alternating segments on a pole with a hooked handle."""
    L = length
    radius = L / 2
    rho = np.hypot(u, v + 0.1 * L)
    canopy = (rho <= radius) & (v <= -0.1 * L)
    segment = np.floor((np.arctan2(v + 0.1 * L, u) + np.pi) / np.pi * 6).astype(int) % 2
    colours = np.where(segment[..., None] == 0, _colour((230, 50, 50)), _colour((245, 245, 245)))
    mask, rgb = _empty(u)
    _paint(mask, rgb, canopy, colours)
    pole = _segment(u, v, (0, -0.1 * L), (0, 0.42 * L), 0.015 * L)
    hook = (np.abs(np.hypot(u - 0.05 * L, v - 0.42 * L) - 0.05 * L) <= 0.015 * L) & (v >= 0.42 * L)
    _paint(mask, rgb, pole | hook, np.asarray((70, 60, 50), np.float32))
    return mask, rgb


def _draw_bicycle(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two thin tyre rings (the ring's shape, thinner and dark) joined by a frame of bars."""
    L = length
    radius, tyre = 0.2 * L, 0.025 * L
    back, front = (-0.3 * L, 0.18 * L), (0.3 * L, 0.18 * L)
    mask, rgb = _empty(u)
    for centre in (back, front):
        ring = np.abs(np.hypot(u - centre[0], v - centre[1]) - radius) <= tyre
        _paint(mask, rgb, ring, np.asarray((30, 30, 32), np.float32))
    frame_colour = np.asarray([(200, 40, 40), (40, 90, 200), (30, 150, 90)][int(rng.integers(3))], np.float32)
    seat, head, crank = (-0.12 * L, -0.15 * L), (0.2 * L, -0.17 * L), (-0.02 * L, 0.18 * L)
    frame = np.zeros(u.shape, bool)
    for a, b in ((back, seat), (seat, crank), (crank, back), (seat, head), (head, crank), (head, front)):
        frame |= _segment(u, v, a, b, 0.015 * L)
    frame |= _segment(u, v, (head[0], head[1]), (head[0] + 0.06 * L, head[1] - 0.06 * L), 0.015 * L)  # handlebar
    frame |= _segment(u, v, (seat[0] - 0.05 * L, seat[1] - 0.03 * L), (seat[0] + 0.04 * L, seat[1] - 0.03 * L), 0.02 * L)
    _paint(mask, rgb, frame, frame_colour)
    return mask, rgb


def _draw_sign(u: np.ndarray, v: np.ndarray, length: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A red octagon with a white bar on a grey pole."""
    L = length
    mask, rgb = _empty(u)
    _paint(mask, rgb, _segment(u, v, (0, -0.1 * L), (0, 0.5 * L), 0.025 * L), np.asarray((140, 140, 146), np.float32))
    radius = 0.22 * L
    centre_v = -0.28 * L
    octagon = _polygon(u, v, [(radius * np.cos(np.pi / 8 + k * np.pi / 4), centre_v + radius * np.sin(np.pi / 8 + k * np.pi / 4))
                              for k in range(8)])
    _paint(mask, rgb, octagon, np.asarray((200, 30, 36), np.float32))
    _paint(mask, rgb, octagon & (np.abs(u) <= 0.14 * L) & (np.abs(v - centre_v) <= 0.035 * L), np.asarray((245, 245, 245), np.float32))
    return mask, rgb


DRAW: dict[str, Callable] = {
    "boat": _draw_boat,
    "crate": _draw_crate,
    "truck": _draw_truck,
    "ring": _draw_ring,
    "ball": _draw_ball,
    "kite": _draw_kite,
    "cactus": _draw_cactus,
    "car": _draw_car,
    "flower": _draw_flower,
    "bottle": _draw_bottle,
    "lamp": _draw_lamp,
    "chair": _draw_chair,
    "tree": _draw_tree,
    "fish": _draw_fish,
    "star": _draw_star,
    "house": _draw_house,
    "snowman": _draw_snowman,
    "umbrella": _draw_umbrella,
    "bicycle": _draw_bicycle,
    "sign": _draw_sign,
}


# ---- scenes


@dataclass
class DemoObject:
    """One object of a scene; `index` is its value in SegmentationObject (1..M, XML order)."""

    index: int
    name: str
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax: 1-based, inclusive (VOC)
    truncated: bool  # touches the image border
    occluded: bool  # partly hidden by a later object


@dataclass
class DemoScene:
    image: np.ndarray  # (H, W, 3) uint8 RGB, before JPEG
    class_map: np.ndarray  # (H, W) uint8: 0 background, 1..C, 255 void
    object_map: np.ndarray  # (H, W) uint8: 0 background, 1..M, 255 void
    objects: list[DemoObject]
    background: str  # the texture under the objects (water scenes may also show sky)
    horizon: int | None  # row where the sky ends in a water scene, else None
    classes: tuple[str, ...] = field(default=())  # the present class names, in class-id order
    depth: np.ndarray | None = None  # (H, W) uint16 millimetres, larger = farther, 0 = no reading


def void_width(size: int) -> int:
    """Width in px of the void band along outlines: ~size/64, at least 1 (VOC: 5 px at ~500 px)."""
    return max(1, int(round(size / 64)))


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    short = int(round(size * rng.uniform(0.7, 1.0)))
    return (short, size) if rng.random() < 0.7 else (size, short)  # (H, W), 70 % landscape


def class_names(num_classes: int = DEFAULT_NUM_CLASSES) -> tuple[str, ...]:
    """The first `num_classes` demo classes (5..20), in class-id order."""
    if not len(DEMO_CLASSES) <= num_classes <= len(ALL_CLASSES):
        raise UserError(f"--classes: {num_classes} is out of range; give {len(DEMO_CLASSES)} to {len(ALL_CLASSES)}")
    return ALL_CLASSES[:num_classes]


def backgrounds_for(classes: tuple[str, ...]) -> tuple[str, ...]:
    """The backgrounds scenes of these classes use: the five first ones, the contexts of the extra
    classes, and indoor tiles once there are more than five classes."""
    extra = {CONTEXT[name][0] for name in classes if name in CONTEXT} | ({"tiles"} if len(classes) > len(DEMO_CLASSES) else set())
    return BACKGROUNDS + tuple(name for name in EXTRA_BACKGROUNDS if name in extra)


def _choose_classes(rng: np.random.Generator, classes: tuple[str, ...]) -> list[str]:
    count = int(rng.choice(len(NUM_CLASSES_PROBS), p=NUM_CLASSES_PROBS)) + 1
    picked = rng.choice(len(classes), size=count, replace=False)
    return [classes[i] for i in sorted(picked)]


def _choose_background(rng: np.random.Generator, present: list[str], classes: tuple[str, ...]) -> str:
    """A class with a context draws its background with that context's probability (one of them,
    at random, when several are present); otherwise a context background turns up without its
    class with WATER_WITHOUT_BOAT's probability, so that it predicts the class. The rest of the
    time any background that is no class's context. With the five first classes only the boat
    has a context, and these are the draws the demo has always made."""
    contextual = [name for name in present if name in CONTEXT]
    if contextual:
        pick = contextual[0] if len(contextual) == 1 else contextual[int(rng.integers(len(contextual)))]
        background, probability = CONTEXT[pick]
    else:
        strays = sorted({CONTEXT[name][0] for name in classes if name in CONTEXT})
        background = strays[0] if len(strays) == 1 else strays[int(rng.integers(len(strays)))]
        probability = WATER_WITHOUT_BOAT
    if rng.random() < probability:
        return background
    context_backgrounds = {CONTEXT[name][0] for name in classes if name in CONTEXT}
    others = [name for name in backgrounds_for(classes) if name not in context_backgrounds]
    return others[int(rng.integers(len(others)))]


def _object_frame(
    height: int, width: int, centre: tuple[float, float], angle_degrees: float, mirror: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel object coordinates (u, v): image coordinates about `centre`, rotated, mirrored."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    dy, dx = y - centre[0], x - centre[1]
    theta = np.deg2rad(angle_degrees)
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    return (-u if mirror else u), v


def _uniform_inside(rng: np.random.Generator, margin: float, length: int) -> float:
    """A coordinate at least `margin` px from both ends of [0, length), or the middle if none is."""
    if 2 * margin >= length:
        return length / 2
    return float(rng.uniform(margin, length - margin))


def _sample_centre(
    rng: np.random.Generator, extent: float, height: int, width: int, placed: list[dict], across_border: bool
) -> tuple[float, float]:
    """Centre (y, x) of a new object of half-extent `extent`: free, against an earlier object, or across the border."""
    if across_border:
        y, x = _uniform_inside(rng, extent, height), _uniform_inside(rng, extent, width)
        inset = rng.uniform(0.3, 0.8) * extent  # distance of the centre from the cut edge
        side = int(rng.integers(4))  # top, bottom, left, right
        if side < 2:
            y = inset if side == 0 else height - inset
        else:
            x = inset if side == 2 else width - inset
        return y, x
    if placed and rng.random() < OVERLAP_PROB:
        anchor = placed[int(rng.integers(len(placed)))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(0.4, 0.8) * (extent + anchor["extent"])
        y, x = anchor["centre"][0] + distance * np.sin(angle), anchor["centre"][1] + distance * np.cos(angle)
    else:
        y, x = _uniform_inside(rng, extent, height), _uniform_inside(rng, extent, width)
    return float(np.clip(y, 0, height - 1)), float(np.clip(x, 0, width - 1))


def _visible_masks(masks: list[np.ndarray]) -> list[np.ndarray]:
    """What is left of each mask (back to front) once every later mask is drawn over it."""
    covered = np.zeros_like(masks[0])
    visible = []
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered = covered | mask
    return visible[::-1]


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _place_objects(
    rng: np.random.Generator, classes: list[str], height: int, width: int, horizon: int | None
) -> list[dict]:
    """Place the objects of `classes`; reject placements that hide too much of any object.

    Returns one dict per kept object (name, full mask, visible mask, rgb, centre, extent),
    back to front: objects whose lowest pixel is lower in the image are nearer and drawn
    later. Only objects drawn "across the border" may touch the image border.
    """
    short = min(height, width)
    min_area = max(12, int((short / 12) ** 2))
    names = []
    for name in classes:
        probs = INSTANCE_COUNT_PROBS[name]
        names += [name] * (int(rng.choice(len(probs), p=probs)) + 1)
    names = [names[i] for i in rng.permutation(len(names))][:MAX_OBJECTS]
    placed: list[dict] = []  # back to front: a lower object (nearer the camera) is drawn later
    for name in names:
        for attempt in range(PLACEMENT_TRIES):
            length = rng.uniform(*SIZE_RANGE[name]) * short
            extent = length / 2
            across_border = bool(rng.random() < TRUNCATE_PROB.get(name, TRUNCATE_PROB_DEFAULT))
            centre = _sample_centre(rng, extent, height, width, placed, across_border)
            if name == "boat" and horizon is not None:
                # The hull floats: its deck line (0.2 L = 0.4 extent below the centre) is in the water.
                centre = (max(centre[0], horizon - 0.4 * extent + rng.uniform(0.05, 0.3) * extent), centre[1])
            angle = rng.uniform(-MAX_TILT_DEGREES[name], MAX_TILT_DEGREES[name])
            u, v = _object_frame(height, width, centre, angle, mirror=bool(rng.random() < 0.5))
            mask, rgb = DRAW[name](u, v, length, rng)
            last_chance = not placed and attempt == PLACEMENT_TRIES - 1  # every image keeps an object
            if mask.sum() < min_area or (_touches_border(mask) and not across_border and not last_chance):
                continue
            rows = np.flatnonzero(mask.any(axis=1))
            new = dict(name=name, mask=mask, rgb=rgb, centre=centre, extent=extent, depth=int(rows.max()))
            candidate = sorted(placed + [new], key=lambda item: item["depth"])  # stable: ties keep the older first
            visible = _visible_masks([item["mask"] for item in candidate])
            if all(
                seen.sum() >= max(min_area, MIN_VISIBLE_FRACTION * item["mask"].sum())
                for item, seen in zip(candidate, visible)
            ):
                placed = candidate
                break
    for item, seen in zip(placed, _visible_masks([item["mask"] for item in placed])):
        item["visible"] = seen
    if not placed:
        raise RuntimeError("demo scene without objects: the object sizes no longer fit the image; fix SIZE_RANGE")
    return placed


def _void_band(object_map: np.ndarray, width: int) -> np.ndarray:
    """Pixels within the band of `width` px centred on outlines between different object ids, (H, W) bool.

    A (width + 1)-square window sees two ids for exactly `width` pixels across a straight edge.
    """
    window = width + 1
    return ndimage.maximum_filter(object_map, size=window, mode="nearest") != ndimage.minimum_filter(
        object_map, size=window, mode="nearest"
    )


def _ground_depth(height: int, width: int, horizon: int | None) -> np.ndarray:
    """(H, W) float32 millimetres of a ground plane seen from above: DEPTH_NEAR_MM at the bottom row,
    growing as 1 / (row - vanishing row) towards the top (the vanishing row is the water horizon
    when there is one, else above the image), clipped at DEPTH_FAR_MM."""
    vanishing = float(horizon) if horizon is not None else DEPTH_HORIZON * height
    rows = np.arange(height, dtype=np.float32)
    with np.errstate(divide="ignore"):
        depth = DEPTH_NEAR_MM * (height - 1 - vanishing) / np.maximum(rows - vanishing, 1e-6)
    return np.broadcast_to(np.minimum(depth, DEPTH_FAR_MM)[:, None], (height, width)).astype(np.float32)


def _depth_map(placed: list[dict], background: str, horizon: int | None, height: int, width: int,
               rng: np.random.Generator) -> np.ndarray:
    """The scene's depth, (H, W) uint16 millimetres (larger = farther, 0 = no reading), from the
    objects back to front as `_place_objects` returns them (the same order they are drawn in)."""
    ground = _ground_depth(height, width, horizon)
    depth = np.full((height, width), DEPTH_BACKDROP_MM, np.float32) if background in BACKDROPS else ground.copy()
    valid = np.ones((height, width), bool)
    if horizon is not None:
        valid[:horizon] = False  # the sky above a water horizon: out of range
    for order, item in enumerate(placed):
        lowest = int(np.flatnonzero(item["mask"].any(axis=1)).max())
        face = ground[lowest, 0] * (DEPTH_OBJECT_FACTOR - DEPTH_ORDER_STEP * order)
        depth[item["mask"]] = face
        valid[item["mask"]] = True
    depth = depth * (1.0 + DEPTH_NOISE * rng.standard_normal(depth.shape).astype(np.float32))
    valid &= rng.random(depth.shape) >= DEPTH_DROPOUT
    return np.where(valid, np.clip(np.round(depth), 1, 65535), 0).astype(np.uint16)


def make_scene(index: int, seed: int = 0, size: int = DEFAULT_SIZE, num_classes: int = DEFAULT_NUM_CLASSES) -> DemoScene:
    """Image number `index` of the dataset with this seed and class count: pixels, both label
    maps, objects."""
    names = class_names(num_classes)
    rng = np.random.default_rng([seed, index])
    height, width = _image_shape(rng, size)
    unit = min(height, width) / 100
    classes = _choose_classes(rng, names)
    background = _choose_background(rng, classes, names)
    canvas = TEXTURES[background](rng, height, width, unit)
    horizon = None
    if background == "water" and rng.random() < HORIZON_PROB:
        horizon = int(rng.uniform(0.2, 0.45) * height)
        canvas[:horizon] = _texture_clouds(rng, horizon, width, unit)

    placed = _place_objects(rng, classes, height, width, horizon)
    object_map = np.zeros((height, width), np.uint8)
    for number, item in enumerate(placed, start=1):
        brightness = rng.uniform(0.85, 1.15)  # per-object colour jitter
        canvas[item["mask"]] = item["rgb"][item["mask"]] * brightness
        object_map[item["mask"]] = number
    class_ids = np.array([0] + [names.index(item["name"]) + 1 for item in placed], np.uint8)
    class_map = class_ids[object_map]
    void = _void_band(object_map, void_width(size))
    object_map[void] = 255
    class_map[void] = 255

    canvas = canvas * rng.uniform(0.9, 1.1) + NOISE_SIGMA * rng.standard_normal(canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)

    objects = []
    for number, item in enumerate(placed, start=1):
        rows, cols = np.nonzero(item["visible"])
        truncated = rows.min() == 0 or cols.min() == 0 or rows.max() == height - 1 or cols.max() == width - 1
        bbox = (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1)
        occluded = bool(item["visible"].sum() < item["mask"].sum())
        objects.append(DemoObject(number, item["name"], bbox, bool(truncated), occluded))
    present = tuple(name for name in names if any(obj.name == name for obj in objects))
    # Its own generator: the depth map draws nothing from `rng`, so the images are what they always were.
    depth = _depth_map(placed, background, horizon, height, width, np.random.default_rng([seed, index, DEPTH_STREAM]))
    return DemoScene(image, class_map, object_map, objects, background, horizon, present, depth)


# ---- files


def image_id(index: int) -> str:
    """The id of image number `index` (0-based): 2026_000001, 2026_000002, ..."""
    return f"{ID_PREFIX}{index + 1:06d}"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` to a temporary name in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def _annotation_xml(scene: DemoScene, name: str) -> str:
    height, width = scene.class_map.shape
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "WSSEG_DEMO"
    ElementTree.SubElement(root, "filename").text = f"{name}.jpg"
    size = ElementTree.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size, tag).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "1"
    for obj in scene.objects:
        element = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(element, "name").text = obj.name
        ElementTree.SubElement(element, "pose").text = "Unspecified"
        ElementTree.SubElement(element, "truncated").text = str(int(obj.truncated))
        ElementTree.SubElement(element, "occluded").text = str(int(obj.occluded))
        ElementTree.SubElement(element, "difficult").text = "0"
        box = ElementTree.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.bbox):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.indent(root, space="\t")
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _write_scene(out: Path, name: str, scene: DemoScene, layout: str = "voc", split: str = "train") -> None:
    """The scene's files in `layout`: the same image and depth bytes in every layout (the folder
    layout's tags go to tags.csv; the COCO layout's masks to its annotation file, `_coco_objects`)."""
    if layout == "coco":
        images = COCO_SPLITS[split]
    else:
        images, classes, objects = LAYOUTS[layout][:3]
        _atomic_write(out / classes / f"{name}.png", lambda tmp: write_label_png(tmp, scene.class_map))
        _atomic_write(out / objects / f"{name}.png", lambda tmp: write_label_png(tmp, scene.object_map))
    jpeg = Image.fromarray(scene.image, mode="RGB")
    _atomic_write(out / images / f"{name}.jpg", lambda tmp: jpeg.save(tmp, format="JPEG", quality=JPEG_QUALITY))
    if layout == "voc":
        _write_text(out / "Annotations" / f"{name}.xml", _annotation_xml(scene, name))
    _atomic_write(out / DEPTH_DIR / f"{name}.png", lambda tmp: write_depth_png(tmp, scene.depth))


# The COCO layout's image folders per list, and the demo's category ids: odd numbers, so that the
# reader's mapping from COCO's ids (1..90, with gaps) to contiguous class ids is exercised.
COCO_SPLITS = {"train": "train2014", "val": "val2014"}


def coco_category_id(class_index: int) -> int:
    return 2 * class_index + 1


def _coco_objects(scene: DemoScene, image_number: int, first_id: int, names: Sequence[str]) -> list[dict]:
    """The scene's objects as COCO annotations (RLE), and its void band as one crowd region (the
    reader maps crowd to ignore, as the VOC layout's 255)."""
    from wsseg.data.coco import mask_api

    api = mask_api()

    annotations: list[dict] = []

    def add(mask: np.ndarray, category_id: int, crowd: bool) -> None:
        encoded = api.encode(np.asfortranarray(mask.astype(np.uint8)))
        ys, xs = np.nonzero(mask)
        annotations.append({"id": first_id + len(annotations), "image_id": image_number, "category_id": category_id,
                            "segmentation": {"size": [int(v) for v in encoded["size"]],
                                             "counts": encoded["counts"].decode("ascii")},
                            "area": int(mask.sum()), "iscrowd": int(crowd),
                            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})

    for obj in scene.objects:
        mask = scene.object_map == obj.index
        if mask.any():
            add(mask, coco_category_id(names.index(obj.name)), crowd=False)
    void = scene.object_map == 255
    if void.any() and annotations:
        add(void, annotations[0]["category_id"], crowd=True)
    return annotations


DEPTH_DIR = "Depth"
# per layout: the image, semantic and instance folders, then the list folder
LAYOUTS = {
    "voc": ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"),
    "folder": ("images", "masks", "instances", "lists"),
    "coco": ("train2014", "val2014", "annotations", "lists"),  # images of each split; annotations/instances_<split>.json
}
_OWN_FILE = re.compile(re.escape(ID_PREFIX) + r"\d{6}\.(jpg|png|xml)")


def _image_folders(layout: str) -> tuple[str, ...]:
    if layout == "coco":
        return (*COCO_SPLITS.values(), DEPTH_DIR)
    return (*LAYOUTS[layout][:3], *(("Annotations",) if layout == "voc" else ()), DEPTH_DIR)


def _prepare(out: Path, layout: str = "voc") -> None:
    """Refuse a non-empty folder this generator did not write; else create the layout."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a folder for the demo dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"--out: {out} is not empty and was not written by `wsseg demo-data` (no {MARKER}); "
            f"choose an empty or new folder"
        )
    for folder in (*_image_folders(layout), LAYOUTS[layout][3], *(("ImageSets/Main",) if layout == "voc" else ()),
                   *(("annotations",) if layout == "coco" else ())):
        (out / folder).mkdir(parents=True, exist_ok=True)
    _write_text(out / MARKER, json.dumps({"generator": "wsseg demo-data", "complete": False}) + "\n")


def _remove_stale(out: Path, keep: set[str], layout: str = "voc") -> None:
    """Remove images of an earlier, larger generation and temporary files of an interrupted one."""
    for folder in _image_folders(layout):
        for path in (out / folder).iterdir():
            own = _OWN_FILE.fullmatch(path.name) and path.stem not in keep
            leftover = path.name.startswith(".") and path.name.endswith(".tmp")
            if own or leftover:
                path.unlink()


def generate_demo(
    out: str | os.PathLike,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    progress: Callable[[int, int], None] | None = None,
    num_classes: int = DEFAULT_NUM_CLASSES,
    layout: str = "voc",
) -> dict:
    """Write the demo dataset under `out` in `layout` (voc: the VOC 2012 devkit's; folder: images/,
    tags.csv, masks/, instances/, lists/, as `data.format: folder` reads it); return its summary.
    The two layouts hold the same bytes for every image, mask and depth map.

    `progress(done, total)` is called after each image. The summary (also written to
    `out/wsseg_demo.json`) holds the arguments, the list sizes, images and instances per
    class, and counts of the hard cases (multi-instance, multi-class, occluded, truncated,
    boat on water, any class on its context background). `out/config.yaml` is a config
    overlay with the dataset's root, class list and depth folder, to stack on pipelines/demo.yaml.
    Rerunning into the same folder regenerates it in place.
    """
    names = class_names(num_classes)
    if num_images < VAL_EVERY:
        raise UserError(f"--images: {num_images} is too few; give at least {VAL_EVERY} so that val is not empty")
    if not 32 <= size <= 4096:
        raise UserError(f"--size: {size} px is out of range; give a long side between 32 and 4096 px")
    if seed < 0:
        raise UserError(f"--seed: {seed} is negative; give a seed >= 0")
    if layout not in LAYOUTS:
        raise UserError(f"--format: {layout} is not a layout; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    _prepare(out, layout)
    tag_lines = []
    coco: dict[str, dict] = {split: {"images": [], "annotations": []} for split in COCO_SPLITS}

    ids = [image_id(index) for index in range(num_images)]
    val = [ids[i] for i in range(num_images) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [ids[i] for i in range(num_images) if i % VAL_EVERY != VAL_EVERY - 1]
    images_per_class = dict.fromkeys(names, 0)
    instances_per_class = dict.fromkeys(names, 0)
    backgrounds = dict.fromkeys(backgrounds_for(names), 0)
    hard_cases = dict.fromkeys(
        ("multi_instance", "multi_class", "occluded", "truncated", "boat", "boat_on_water", "water_without_boat",
         "in_context"), 0
    )
    for index, name in enumerate(ids):
        scene = make_scene(index, seed, size, num_classes)
        split = "val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"
        _write_scene(out, name, scene, layout, split)
        tag_lines.append(",".join([f"{name}.jpg", *scene.classes]) + "\n")
        if layout == "coco":
            height, width = scene.class_map.shape
            coco[split]["images"].append({"id": index + 1, "file_name": f"{name}.jpg", "height": height, "width": width})
            coco[split]["annotations"] += _coco_objects(scene, index + 1, 1 + sum(len(c["annotations"]) for c in coco.values()),
                                                        names)
        object_names = [obj.name for obj in scene.objects]
        for cls in scene.classes:
            images_per_class[cls] += 1
        for cls in object_names:
            instances_per_class[cls] += 1
        backgrounds[scene.background] += 1
        hard_cases["multi_instance"] += int(len(object_names) > len(set(object_names)))
        hard_cases["multi_class"] += int(len(scene.classes) > 1)
        hard_cases["occluded"] += int(any(obj.occluded for obj in scene.objects))
        hard_cases["truncated"] += int(any(obj.truncated for obj in scene.objects))
        hard_cases["boat"] += int("boat" in scene.classes)
        hard_cases["boat_on_water"] += int("boat" in scene.classes and scene.background == "water")
        hard_cases["water_without_boat"] += int("boat" not in scene.classes and scene.background == "water")
        hard_cases["in_context"] += int(any(CONTEXT.get(cls, ("",))[0] == scene.background for cls in scene.classes))
        if progress is not None:
            progress(index + 1, num_images)

    lists = {"train": train, "val": val, "trainval": ids, "train_aug": train}
    for list_name, members in lists.items():
        _write_text(out / LAYOUTS[layout][3] / f"{list_name}.txt", "".join(f"{i}\n" for i in members))
    if layout == "voc":
        _write_text(out / "ImageSets" / "Main" / "trainval.txt", "".join(f"{i}\n" for i in ids))
    elif layout == "folder":
        _write_text(out / "tags.csv", "".join(tag_lines))
    else:
        categories = [{"id": coco_category_id(k), "name": name, "supercategory": "object"} for k, name in enumerate(names)]
        for split, folder in COCO_SPLITS.items():
            _write_text(out / "annotations" / f"instances_{folder}.json",
                        json.dumps({"info": {"description": f"wsseg demo-data, seed {seed}"}, "licenses": [],
                                    "categories": categories, **coco[split]}) + "\n")
    _remove_stale(out, set(ids), layout)

    summary = {
        "generator": "wsseg demo-data",
        "complete": True,
        "num_images": num_images,
        "layout": layout,
        "seed": seed,
        "size": size,
        "void_width": void_width(size),
        "classes": list(names),
        "lists": {list_name: len(members) for list_name, members in lists.items()},
        "images_per_class": images_per_class,
        "instances_per_class": instances_per_class,
        "backgrounds": backgrounds,
        "hard_cases": hard_cases,
    }
    # root absolute: valid from any folder; depth_dir is read only by RGB-D segmenters (acnet)
    overlay = {"data": {**({"format": layout} if layout != "voc" else {}), "root": str(out.resolve()),
                        "classes": list(names), "depth_dir": DEPTH_DIR}}
    if layout == "coco":  # the lists are the annotation files (their images with objects)
        overlay["data"].update({key: COCO_SPLITS["train"] for key in ("train_list", "label_list", "eval_list",
                                                                      "segmenter_train_list")}, val_list=COCO_SPLITS["val"])
    _write_text(out / "config.yaml", "# stack on pipelines/demo.yaml: --config pipelines/demo.yaml --config "
                f"{out / 'config.yaml'}\n" + yaml.safe_dump(overlay, default_flow_style=None, sort_keys=False))
    _write_text(out / MARKER, json.dumps(summary, indent=2) + "\n")
    return summary
