"""The embedded synthetic dataset: procedurally drawn objects with the 20 VOC class names, in VOCdevkit layout.

Classes. Each of the 20 names in ``VOC_CLASSES`` is a small drawing defined by its shape, in a side
view facing right (flipped at random): aeroplane (top view: fuselage, swept wings, tail), bicycle
(two thin rings joined by a frame), bird (body, head, beak, tail, wing; sometimes flying), boat
(hull with mast and sails, or a motor boat with a cabin), bottle (body, shoulders, neck, cap,
label), bus (long box, row(s) of windows, door, two wheels), car (short body, cabin with two
windows, two wheels), cat (small body, round head with pointed ears, long curled tail), chair
(back, seat, legs), cow (boxy body, horns, spots or not, short straight legs, udder), diningtable
(top in perspective, four legs), dog (body, head with snout, floppy ear, short tail), horse (long
neck and head, mane, long legs, flowing tail), motorbike (thick tyres, engine block, tank, seat,
fork), person (stick figure with a head, random pose), pottedplant (pot and leaves), sheep (woolly
cloud body, small head, thin legs), sofa (back, seat, arm rests, cushions), train (two to four
linked carriages with windows and small wheels, a locomotive with a sloped nose), tvmonitor (frame,
inner screen, stand). Some pairs are similar on purpose: cat/dog, cow/horse/sheep,
bus/train/car, bicycle/motorbike, chair/sofa/diningtable.

Colour never tells a class: every object takes up to three colours (its "tones": main, secondary,
detail) drawn at random from one palette shared by all classes and by the background clutter, and
its main tone carries a random texture (solid, stripes, dots or checker). Only shape is informative.

Images. Square RGB (``image_size``, 128 px by default), ``min_objects``..``max_objects`` objects of
classes drawn uniformly from all 20, so any class appears with any other (a class split then leaves
the others in the pixels, unlabelled, as background). The longest side of an object is drawn
log-uniformly between ``min_object_size`` px and ``max_object_frac`` of the image, with aspect
jitter, random flips and small rotations. Objects are drawn roughly largest first, over a
background of gradients, low-frequency noise and clutter (lines, polygons, blobs that are no
class); later objects occlude earlier ones and a little clutter may fall in front of objects.

Annotations follow Pascal VOC. A box is the tight box of the object's *visible* pixels (as VOC's
guidelines ask) in 1-based inclusive integer coordinates: pixel columns 0..9 (0-based) give
``xmin=1, xmax=10``; always ``1 <= xmin <= xmax <= width``. Objects lie wholly inside the image
(``truncated`` is 0). An object is ``difficult`` when more than ``occluded_difficult`` of it is
hidden or its visible box is small (``sqrt(w*h) < difficult_size`` px); an object more than
``occluded_drop`` hidden is not annotated at all (it stays in the pixels).

Layout under a VOC "year folder" ROOT: ``ROOT/JPEGImages/<id>.jpg``, ``ROOT/Annotations/<id>.xml``,
``ROOT/ImageSets/Main/{train,val,test,trainval}.txt`` and the per-class lists
``ROOT/ImageSets/Main/<class>_<split>.txt`` (1 present, -1 absent, 0 only difficult). Ids are
``000001``, ``000002``, ... in the order train, val, test. ``ROOT/synthetic.json`` records the
settings and a format version; it is written last, so its presence marks a complete folder.

Determinism. Image ``i`` (0-based) is drawn from ``np.random.default_rng([seed, i])`` alone, so
the same config gives byte-identical files whatever the number of worker processes. JPEGs carry
no timestamp or metadata and use a fixed quality.

Cache. ``ensure_synthetic(cache_dir, config)`` keeps one folder per config, named
``synthetic-voc-<12 hex digits of the SHA-256 of the settings and format version>``, generated
into a temporary sibling and renamed into place at the end. ``default_cache_dir()`` is
``$DIREDI_SIM_CACHE`` if set, else ``<repository>/.cache/diredi-sim`` (``<cwd>/.cache/diredi-sim``
when the package does not sit in a source checkout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from diredi_sim.data import VOC_CLASSES

FORMAT_VERSION = 1
SETTINGS_FILE = "synthetic.json"
SPLITS = ("train", "val", "test")

logger = logging.getLogger(__name__)

# Colours shared by every class and by the background; drawn per object, so they carry no class.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (240, 130, 30), (240, 215, 50), (130, 200, 60), (35, 120, 55), (40, 175, 175),
    (60, 115, 230), (30, 40, 120), (150, 70, 200), (230, 110, 180), (130, 80, 40), (205, 175, 125),
    (245, 245, 240), (165, 165, 165), (80, 80, 80), (25, 25, 25), (120, 25, 35), (175, 215, 240),
)
TEXTURES = ("solid", "stripes", "dots", "checker")


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic dataset; every field changes the generated files."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 5000  # half of each set is the manufacturer's public pool (data.public_fraction)
    num_val: int = 1000
    num_test: int = 1000
    min_objects: int = 1
    max_objects: int = 4             # 4 and 18 px below: measured to let the cpu edge model learn in minutes
    min_object_size: int = 18        # px, longest side of an object's box, smallest draw
    max_object_frac: float = 0.7     # longest side of an object's box, largest draw, of the image side
    difficult_size: float = 10.0     # px: a visible box with sqrt(w*h) below this is difficult
    occluded_difficult: float = 0.6  # hidden fraction above which an object is difficult
    occluded_drop: float = 0.9       # hidden fraction above which an object is not annotated
    max_overlap: float = 0.5         # placement tries to keep box overlaps below this (of the smaller box)
    clutter: float = 3.0             # mean number of background clutter shapes per image
    front_clutter: float = 0.4       # mean number of clutter shapes drawn over the objects
    noise: float = 6.0               # max std of the per-pixel Gaussian noise (0..255 scale)
    jpeg_quality: int = 90

    @property
    def num_images(self) -> int:
        return self.num_train + self.num_val + self.num_test


# ----------------------------------------------------------------------------------------------
# Geometry helpers. A drawing is a list of primitives in a frame x in [0, A], y in [0, 1] (y down,
# the ground at y = 1, facing right):
#   ("fill", tone, points)         a filled polygon of tone 0, 1 or 2
#   ("line", tone, points, width)  a polyline of the given width (frame units)
#   ("erase", points)              a polygon cut out of what was drawn before (holes of rings)
# ----------------------------------------------------------------------------------------------


def make_ellipse(cx, cy, rx, ry, angle=0.0, n=20):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def make_rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def make_rounded_rect(x0, y0, x1, y1, r, n=4):
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    pts = []
    for cx, cy, a0 in ((x1 - r, y0 + r, -np.pi / 2), (x1 - r, y1 - r, 0.0),
                       (x0 + r, y1 - r, np.pi / 2), (x0 + r, y0 + r, np.pi)):
        t = np.linspace(a0, a0 + np.pi / 2, n)
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def make_points(*xy):
    return np.array(xy, dtype=float).reshape(-1, 2)


def make_fill(tone, pts):
    return ("fill", tone, np.asarray(pts, dtype=float))


def make_line(tone, pts, width):
    return ("line", tone, np.asarray(pts, dtype=float), width)


def make_legs(tone, xs, top, bottom, width):
    """Vertical lines (legs, posts) at each x from ``top`` to ``bottom``."""
    return [make_line(tone, [(x, top), (x, bottom)], width) for x in xs]


def make_slab(x0, x1, level, thickness, front_xs, width):
    """A seat or table top seen from the front: a slab at ``level`` on its front legs."""
    return [make_fill(0, make_rect(x0, level, x1, level + thickness)),
            *make_legs(0, front_xs, level + thickness, 1.0 - width / 2, width)]


def make_disk(tone, cx, cy, r, n=18):
    return make_fill(tone, make_ellipse(cx, cy, r, r, n=n))


def make_ring(tone, cx, cy, r_out, r_in, n=24):
    return [make_fill(tone, make_ellipse(cx, cy, r_out, r_out, n=n)),
            ("erase", make_ellipse(cx, cy, r_in, r_in, n=n))]


def make_wheel(cx, cy, r, hub=0.45):
    return [make_disk(2, cx, cy, r), make_disk(1, cx, cy, r * hub, n=12)]


# ----------------------------------------------------------------------------------------------
# The 20 classes. Each draw_<class>(rng) returns (frame width A, primitives, max rotation in rad).
# ----------------------------------------------------------------------------------------------


def draw_aeroplane(rng):
    a = 1.25
    ry = rng.uniform(0.06, 0.09)
    body = make_points((0.02, 0.5 - ry * 0.7), (a - 0.2, 0.5 - ry), (a - 0.05, 0.5 - ry * 0.6), (a, 0.5),
                       (a - 0.05, 0.5 + ry * 0.6), (a - 0.2, 0.5 + ry), (0.02, 0.5 + ry * 0.7))
    root_le, root_te = rng.uniform(0.55, 0.7) * a, rng.uniform(0.38, 0.45) * a
    sweep = rng.uniform(0.1, 0.3)
    tip_le, tip_te = root_le - sweep, root_le - sweep - rng.uniform(0.08, 0.15)
    prims = []
    for sgn in (-1, 1):
        y_tip = 0.5 + sgn * 0.48
        prims.append(make_fill(1, make_points((root_le, 0.5), (tip_le, y_tip), (tip_te, y_tip), (root_te, 0.5))))
        prims.append(make_fill(1, make_points((0.2, 0.5), (0.07, 0.5 + sgn * 0.2), (0.02, 0.5 + sgn * 0.2), (0.04, 0.5))))
    prims.append(make_fill(0, body))
    if rng.random() < 0.6:  # engines under the wings
        for sgn in (-1, 1):
            prims.append(make_fill(2, make_ellipse(root_le - sweep * 0.45, 0.5 + sgn * 0.22, 0.09, 0.035)))
    prims.append(make_fill(2, make_ellipse(a - 0.12, 0.5, 0.06, ry * 0.5)))
    return a, prims, 0.7


def draw_bicycle(rng):
    a = 1.7
    r = rng.uniform(0.28, 0.33)
    rear, front = (0.35, 1.0 - r), (a - 0.35, 1.0 - r)
    w = rng.uniform(0.045, 0.06)
    crank = (0.8, 1.0 - r + 0.03)
    seat = (0.68, 0.22)
    head = (a - 0.5, 0.22)
    prims = make_ring(2, *rear, r, r - w) + make_ring(2, *front, r, r - w)
    fw = w * 0.9
    prims += [
        make_line(0, [rear, seat, crank, rear], fw),
        make_line(0, [seat, head, crank], fw),
        make_line(0, [head, front], fw),
        make_line(1, [(head[0] - 0.02, head[1]), (head[0] - 0.05, 0.05), (head[0] + 0.08, 0.05)], fw),
        make_line(1, [(seat[0] - 0.12, 0.14), (seat[0] + 0.08, 0.14)], w * 1.4),
        make_line(0, [seat, (seat[0] - 0.02, 0.14)], fw),
    ]
    return a, prims, 0.15


def draw_bird(rng):
    a = 1.3
    prims = []
    flying = rng.random() < 0.35
    body = make_ellipse(0.62, 0.55, 0.36, 0.18, angle=rng.uniform(-0.3, 0.0))
    prims.append(make_fill(0, make_points((0.35, 0.5), (0.0, 0.38 + rng.uniform(-0.1, 0.1)), (0.05, 0.62), (0.35, 0.62))))
    if flying:
        prims.append(make_fill(1, make_points((0.5, 0.5), (0.35, 0.0), (0.6, 0.1), (0.75, 0.5))))
    else:
        prims += [make_line(2, [(0.6, 0.7), (0.56, 1.0)], 0.03), make_line(2, [(0.72, 0.7), (0.74, 1.0)], 0.03)]
    prims.append(make_fill(0, body))
    prims.append(make_disk(0, 0.98, 0.36, 0.15))
    prims.append(make_fill(2, make_points((1.1, 0.3), (1.3, 0.38), (1.1, 0.44))))
    prims.append(make_disk(2, 1.02, 0.32, 0.03, n=8))
    if flying:
        prims.append(make_fill(1, make_points((0.5, 0.55), (0.3, 1.0), (0.55, 0.95), (0.75, 0.55))))
    else:
        prims.append(make_fill(1, make_ellipse(0.58, 0.52, 0.25, 0.1, angle=-0.2)))
    return a, prims, 0.3


def draw_boat(rng):
    a = 1.25
    deck = rng.uniform(0.62, 0.72)
    prims = []
    if rng.random() < 0.7:  # sailing boat
        mast = rng.uniform(0.5, 0.65)
        prims.append(make_fill(1, make_points((mast + 0.04, 0.05), (mast + 0.04, deck - 0.05), (a - 0.1, deck - 0.05))))
        if rng.random() < 0.7:
            prims.append(make_fill(1, make_points((mast - 0.04, 0.15), (mast - 0.04, deck - 0.05), (0.12, deck - 0.05))))
        prims.append(make_line(2, [(mast, 0.0), (mast, deck)], 0.035))
    else:  # motor boat with a cabin
        prims.append(make_fill(1, make_rect(0.35, deck - 0.3, 0.85, deck + 0.02)))
        for i in range(3):
            x0 = 0.4 + i * 0.15
            prims.append(make_fill(2, make_rect(x0, deck - 0.24, x0 + 0.1, deck - 0.12)))
        prims.append(make_line(2, [(0.45, deck - 0.3), (0.45, deck - 0.5)], 0.03))
    prims.append(make_fill(0, make_points((0.0, deck), (a, deck - 0.05), (a - 0.22, 1.0), (0.15, 1.0))))
    prims.append(make_fill(2, make_points((0.03, deck + 0.04), (a - 0.03, deck - 0.01), (a - 0.06, deck + 0.08), (0.06, deck + 0.11))))
    return a, prims, 0.2


def draw_bottle(rng):
    a = rng.uniform(0.32, 0.42)
    neck = rng.uniform(0.09, 0.12)
    shoulder = rng.uniform(0.3, 0.45)
    m = a / 2
    prims = [
        make_fill(0, make_rounded_rect(0.0, shoulder, a, 1.0, 0.05)),
        make_fill(0, make_points((0.0, shoulder + 0.05), (m - neck / 2, shoulder - 0.12), (m + neck / 2, shoulder - 0.12), (a, shoulder + 0.05))),
        make_fill(0, make_rect(m - neck / 2, 0.06, m + neck / 2, shoulder - 0.08)),
        make_fill(2, make_rect(m - neck / 2 - 0.01, 0.0, m + neck / 2 + 0.01, 0.08)),
        make_fill(1, make_rect(0.0, shoulder + 0.18, a, shoulder + 0.18 + rng.uniform(0.2, 0.3))),
    ]
    return a, prims, 0.25


def draw_bus(rng):
    a = rng.uniform(2.1, 2.5)
    top, bottom = 0.02, 0.84
    prims = [make_fill(0, make_rounded_rect(0.0, top, a, bottom, 0.07))]
    rows = 2 if rng.random() < 0.3 else 1
    n = int(rng.integers(5, 8))
    x0, x1 = 0.1, a - 0.3
    step = (x1 - x0) / n
    for row in range(rows):
        y0 = 0.1 + row * 0.3
        for i in range(n):
            prims.append(make_fill(1, make_rect(x0 + i * step + 0.03, y0, x0 + (i + 1) * step - 0.03, y0 + 0.2)))
    prims.append(make_fill(1, make_rect(a - 0.22, 0.1, a - 0.04, 0.5)))
    prims.append(make_fill(1, make_rect(a - 0.52, 0.38 if rows == 1 else 0.66, a - 0.32, bottom - 0.05)))
    prims.append(make_fill(2, make_rect(0.02, 0.55 if rows == 1 else 0.7, a - 0.56, 0.6 if rows == 1 else 0.74)))
    prims += make_wheel(0.45, bottom, 0.15) + make_wheel(a - 0.75, bottom, 0.15)
    return a, prims, 0.1


def draw_car(rng):
    a = rng.uniform(1.75, 2.05)
    roof = rng.uniform(0.05, 0.15)
    prims = [
        make_fill(0, make_points((a * 0.25, 0.42), (a * 0.36, roof), (a * 0.68, roof), (a * 0.82, 0.42))),
        make_fill(0, make_rounded_rect(0.0, 0.38, a, 0.8, 0.12)),
        make_fill(1, make_points((a * 0.3, 0.4), (a * 0.38, roof + 0.06), (a * 0.51, roof + 0.06), (a * 0.51, 0.4))),
        make_fill(1, make_points((a * 0.54, 0.4), (a * 0.54, roof + 0.06), (a * 0.66, roof + 0.06), (a * 0.76, 0.4))),
        make_fill(2, make_rect(a - 0.1, 0.45, a - 0.01, 0.53)),
    ]
    prims += make_wheel(0.42, 0.8, 0.18) + make_wheel(a - 0.42, 0.8, 0.18)
    return a, prims, 0.12


def draw_quadruped(body, leg_top, legs, leg_w, hoof=False):
    """Body polygon plus legs from ``leg_top`` (list of (x_top, x_foot)), the far legs in the detail tone."""
    prims = []
    for i, (xt, xf) in enumerate(legs):
        tone = 2 if i % 2 else 0
        prims.append(make_line(tone, [(xt, leg_top), (xf, 1.0 - leg_w / 2)], leg_w))
        if hoof:
            prims.append(make_fill(2, make_rect(xf - leg_w * 0.6, 1.0 - leg_w * 0.8, xf + leg_w * 0.6, 1.0)))
    prims.append(make_fill(0, body))
    return prims


def draw_cat(rng):
    a = 1.3
    by = rng.uniform(0.52, 0.6)
    prims = [make_line(0, [(0.34, by), (0.18, by - 0.05), (0.08, by - 0.25), (0.1, by - 0.45), (0.2, by - 0.5)], 0.05)]
    prims += draw_quadruped(make_ellipse(0.62, by, 0.3, 0.13), by + 0.05, [(0.42, 0.4), (0.48, 0.5), (0.8, 0.8), (0.86, 0.9)],
                            0.06)
    hx, hy, hr = 1.02, by - 0.2, 0.14
    prims += [
        make_fill(0, make_points((hx - hr, hy - 0.02), (hx - hr * 0.8, hy - hr - 0.14), (hx - 0.02, hy - hr * 0.7))),
        make_fill(0, make_points((hx + hr, hy - 0.02), (hx + hr * 0.8, hy - hr - 0.14), (hx + 0.02, hy - hr * 0.7))),
        make_fill(0, make_points((0.85, by - 0.08), (hx - 0.05, hy), (hx, hy + 0.12), (0.85, by + 0.05))),
        make_disk(0, hx, hy, hr),
        make_disk(2, hx - 0.05, hy - 0.02, 0.025, n=8), make_disk(2, hx + 0.06, hy - 0.02, 0.025, n=8),
        make_line(1, [(hx + 0.04, hy + 0.06), (a, hy + 0.02)], 0.012),
        make_line(1, [(hx + 0.04, hy + 0.07), (a, hy + 0.11)], 0.012),
    ]
    return a, prims, 0.1


def draw_dog(rng):
    a = 1.4
    by = rng.uniform(0.4, 0.48)
    prims = [make_line(0, [(0.3, by - 0.05), (0.12, by - 0.3)], 0.06)]
    prims += draw_quadruped(make_ellipse(0.6, by, 0.36, 0.15), by + 0.06, [(0.33, 0.3), (0.4, 0.42), (0.82, 0.84), (0.88, 0.93)],
                            0.08)
    hx, hy = 1.08, by - 0.22
    prims += [
        make_fill(0, make_points((0.82, by - 0.1), (hx - 0.08, hy - 0.05), (hx + 0.02, hy + 0.1), (0.9, by + 0.1))),
        make_disk(0, hx, hy, 0.13),
        make_fill(0, make_rounded_rect(hx, hy - 0.02, a, hy + 0.11, 0.04)),
        make_disk(2, a - 0.03, hy + 0.01, 0.035, n=8),
        make_fill(1, make_ellipse(hx - 0.08, hy + 0.08, 0.05, 0.12, angle=0.25)),
        make_disk(2, hx + 0.03, hy - 0.05, 0.022, n=8),
    ]
    return a, prims, 0.1


def draw_cow(rng):
    a = 1.6
    prims = [make_line(0, [(0.16, 0.25), (0.08, 0.65)], 0.03), make_fill(2, make_ellipse(0.08, 0.68, 0.035, 0.06))]
    body = make_rounded_rect(0.15, 0.2, 1.25, 0.66, 0.08)
    prims += draw_quadruped(body, 0.6, [(0.25, 0.25), (0.33, 0.35), (1.07, 1.07), (1.15, 1.17)], 0.1, hoof=True)
    prims.append(make_fill(1, make_ellipse(0.72, 0.68, 0.1, 0.06)))
    if rng.random() < 0.7:  # spots
        for _ in range(int(rng.integers(2, 6))):
            prims.append(make_fill(1, make_ellipse(rng.uniform(0.3, 1.1), rng.uniform(0.3, 0.55), rng.uniform(0.06, 0.12),
                                              rng.uniform(0.05, 0.09), angle=rng.uniform(0, np.pi))))
    prims += [
        make_fill(0, make_points((1.2, 0.22), (1.36, 0.14), (1.4, 0.4), (1.22, 0.45))),
        make_fill(0, make_rounded_rect(1.3, 0.1, 1.52, 0.5, 0.05)),
        make_fill(1, make_rounded_rect(1.38, 0.36, a, 0.52, 0.05)),
        make_line(2, [(1.35, 0.12), (1.3, 0.0)], 0.035),
        make_line(2, [(1.47, 0.12), (1.52, 0.0)], 0.035),
        make_fill(0, make_ellipse(1.27, 0.17, 0.07, 0.035, angle=0.3)),
    ]
    return a, prims, 0.08


def draw_horse(rng):
    a = 1.45
    by = rng.uniform(0.36, 0.42)
    prims = [make_fill(1, make_points((0.22, by - 0.08), (0.05, by + 0.3), (0.0, by + 0.45), (0.15, by + 0.4), (0.25, by + 0.05)))]
    prims += draw_quadruped(make_ellipse(0.6, by, 0.4, 0.14), by + 0.06, [(0.3, 0.26), (0.38, 0.4), (0.85, 0.85), (0.92, 0.98)],
                            0.06, hoof=True)
    prims += [
        make_fill(0, make_points((0.82, by - 0.12), (1.08, 0.06), (1.2, 0.1), (1.02, by + 0.1))),
        make_fill(0, make_points((1.06, 0.02), (1.16, 0.0), (a, 0.24), (a - 0.05, 0.32), (1.08, 0.16))),
        make_fill(0, make_points((1.1, 0.02), (1.1, -0.07), (1.16, 0.02))),
        make_line(1, [(0.82, by - 0.14), (1.06, 0.04), (1.12, -0.02)], 0.05),
        make_disk(2, 1.2, 0.1, 0.02, n=8),
    ]
    return a, prims, 0.08


def draw_sheep(rng):
    a = 1.4
    prims = []
    legs = [(0.35, 0.6, 0.33), (0.45, 0.6, 0.47), (0.9, 0.6, 0.9), (1.0, 0.6, 1.02)]
    for i, (xt, yt, xf) in enumerate(legs):
        prims.append(make_line(1 if i % 2 == 0 else 2, [(xt, yt), (xf, 0.98)], 0.05))
    n = int(rng.integers(8, 12))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)
    rr = rng.uniform(0.1, 0.15, size=n)
    for ti, ri in zip(t, rr):
        prims.append(make_disk(0, 0.68 + 0.4 * math.cos(ti), 0.42 + 0.2 * math.sin(ti), ri, n=12))
    prims.append(make_fill(0, make_ellipse(0.68, 0.42, 0.42, 0.22)))
    prims += [
        make_fill(1, make_ellipse(1.2, 0.36, 0.15, 0.09, angle=0.5)),
        make_fill(1, make_ellipse(1.08, 0.28, 0.08, 0.035, angle=-0.4)),
        make_disk(2, 1.22, 0.3, 0.02, n=8),
    ]
    return a, prims, 0.08


def draw_chair(rng):
    a, seat, w = rng.uniform(0.6, 0.75), rng.uniform(0.5, 0.58), 0.07
    back = [make_line(0, [(0.05, 0.0), (0.05, 1.0 - w / 2)], w),
            make_fill(1, make_rect(0.03, 0.06, 0.16, seat - 0.08))]
    seat_face = make_fill(0, make_points((0.02, seat), (a - 0.12, seat), (a, seat - 0.05), (0.14, seat - 0.05)))
    return a, [*make_legs(2, (0.2, a - 0.05), seat, 0.95, w * 0.8), *back, seat_face,
               *make_slab(0.02, a - 0.12, seat, 0.06, (a - 0.16,), w)], 0.1


def draw_diningtable(rng):
    a = rng.uniform(1.6, 2.0)
    top = rng.uniform(0.2, 0.32)
    far_legs = make_legs(2, (0.3, a - 0.3), top, 0.85, 0.08 * 0.8)
    top_face = make_fill(1, make_points((0.15, 0.0), (a - 0.15, 0.0), (a, top), (0.0, top)))
    return a, [*far_legs, top_face, *make_slab(0.0, a, top, 0.1, (0.08, a - 0.08), 0.08)], 0.08


def draw_motorbike(rng):
    a = 1.6
    r = rng.uniform(0.24, 0.28)
    cy = 1.0 - r
    prims = [
        make_line(2, [(a - 0.3, cy), (a - 0.45, 0.12)], 0.06),
        make_line(2, [(a - 0.55, 0.1), (a - 0.38, 0.08)], 0.05),
        make_line(2, [(0.3, cy), (0.6, 0.5)], 0.05),
    ]
    prims += make_wheel(0.3, cy, r, hub=0.5) + make_wheel(a - 0.3, cy, r, hub=0.5)
    prims += [
        make_fill(0, make_points((0.55, 0.45), (1.0, 0.4), (1.05, 0.62), (0.9, 0.82), (0.62, 0.78))),
        make_fill(0, make_ellipse(0.88, 0.36, 0.2, 0.1, angle=-0.15)),
        make_fill(1, make_points((0.3, 0.38), (0.72, 0.38), (0.7, 0.46), (0.35, 0.48))),
        make_line(1, [(0.4, 0.7), (0.05, 0.62)], 0.05),
        make_disk(1, a - 0.4, 0.22, 0.06, n=10),
    ]
    return a, prims, 0.12


def draw_person(rng):
    a = 0.5
    cx = a / 2
    shoulder, hip = (cx, 0.24), (cx, 0.56)
    prims = []
    for side in (-1, 1):  # legs
        foot = (cx + side * rng.uniform(0.05, 0.2), 1.0 - 0.04)
        knee = ((hip[0] + foot[0]) / 2 + rng.uniform(-0.05, 0.05), 0.78)
        prims.append(make_line(2, [hip, knee, foot], 0.085))
    prims.append(make_line(0, [(cx, 0.2), hip], 0.15))
    for side in (-1, 1):  # arms
        ang = rng.uniform(-0.5, 2.6)  # 0: down, pi/2: sideways, > pi/2: raised
        elbow = (shoulder[0] + side * 0.15 * math.sin(ang), shoulder[1] + 0.15 * math.cos(ang))
        ang2 = ang + rng.uniform(-0.3, 0.8)
        hand = (elbow[0] + side * 0.14 * math.sin(ang2), elbow[1] + 0.14 * math.cos(ang2))
        prims.append(make_line(0, [shoulder, elbow, hand], 0.06))
    prims.append(make_disk(1, cx, 0.09, 0.09, n=14))
    return a, prims, 0.12


def draw_pottedplant(rng):
    a = 0.8
    m = a / 2
    prims = []
    n = int(rng.integers(4, 8))
    for i in range(n):
        ang = -np.pi / 2 + (i / (n - 1) - 0.5) * rng.uniform(1.8, 2.6) + rng.uniform(-0.1, 0.1)
        length = rng.uniform(0.25, 0.38)
        cx, cy = m + math.cos(ang) * length, 0.58 + math.sin(ang) * length
        prims.append(make_line(2, [(m, 0.6), (cx, cy)], 0.025))
        prims.append(make_fill(0, make_ellipse(cx, cy, length * 0.5, 0.065, angle=ang, n=14)))
    prims += [
        make_fill(1, make_points((m - 0.2, 0.62), (m + 0.2, 0.62), (m + 0.14, 1.0), (m - 0.14, 1.0))),
        make_fill(1, make_rect(m - 0.24, 0.57, m + 0.24, 0.66)),
    ]
    return a, prims, 0.1


def draw_sofa(rng):
    a = rng.uniform(1.8, 2.2)
    prims = [
        make_fill(2, make_rect(0.1, 0.85, 0.18, 1.0)), make_fill(2, make_rect(a - 0.18, 0.85, a - 0.1, 1.0)),
        make_fill(0, make_rounded_rect(0.08, 0.05, a - 0.08, 0.6, 0.08)),
        make_fill(0, make_rect(0.05, 0.55, a - 0.05, 0.87)),
    ]
    n = int(rng.integers(2, 4))
    step = (a - 0.5) / n
    for i in range(n):
        x0 = 0.25 + i * step
        prims.append(make_fill(1, make_rounded_rect(x0 + 0.02, 0.14, x0 + step - 0.02, 0.56, 0.06)))
        prims.append(make_fill(1, make_rounded_rect(x0 + 0.02, 0.58, x0 + step - 0.02, 0.7, 0.04)))
    prims += [make_fill(0, make_rounded_rect(0.0, 0.32, 0.24, 0.87, 0.06)),
              make_fill(0, make_rounded_rect(a - 0.24, 0.32, a, 0.87, 0.06))]
    return a, prims, 0.08


def draw_train(rng):
    n = int(rng.integers(2, 5))
    car_w, gap = 1.0, 0.08
    a = n * car_w + (n - 1) * gap + 0.25
    prims = []
    for i in range(n - 1):  # couplings
        x = (i + 1) * car_w + i * gap
        prims.append(make_line(2, [(x - 0.05, 0.7), (x + gap + 0.05, 0.7)], 0.05))
    for i in range(n):
        x0 = i * (car_w + gap)
        loco = i == n - 1
        x1 = x0 + car_w + (0.25 if loco else 0.0)
        if loco:
            prims.append(make_fill(0, make_points((x0, 0.08), (x1 - 0.35, 0.08), (x1, 0.45), (x1, 0.78), (x0, 0.78))))
            prims.append(make_fill(1, make_points((x1 - 0.4, 0.16), (x1 - 0.32, 0.16), (x1 - 0.1, 0.42), (x1 - 0.4, 0.42))))
        else:
            prims.append(make_fill(0, make_rounded_rect(x0, 0.1, x1, 0.78, 0.05)))
            prims.append(make_fill(2, make_rect(x0 + 0.02, 0.06, x1 - 0.02, 0.12)))
        k = 2 if loco else 3
        for j in range(k):
            wx = x0 + 0.1 + j * 0.28
            prims.append(make_fill(1, make_rect(wx, 0.2, wx + 0.18, 0.42)))
        prims += [make_disk(2, x0 + 0.2, 0.86, 0.12, n=12), make_disk(2, x1 - 0.2 - (0.25 if loco else 0.0), 0.86, 0.12, n=12)]
    return a, prims, 0.06


def draw_tvmonitor(rng):
    a = rng.uniform(1.15, 1.45)
    m = a / 2
    bottom = rng.uniform(0.72, 0.8)
    b = rng.uniform(0.06, 0.1)
    prims = [
        make_fill(0, make_rect(m - 0.06, bottom - 0.05, m + 0.06, 0.93)),
        make_fill(0, make_rounded_rect(m - 0.3, 0.9, m + 0.3, 1.0, 0.03)),
        make_fill(0, make_rounded_rect(0.0, 0.0, a, bottom, 0.04)),
        make_fill(1, make_rect(b, b, a - b, bottom - b * 1.3)),
        make_line(2, [(b + 0.08, bottom - b * 1.3 - 0.1), (b + 0.25, b + 0.08)], 0.03),
        make_disk(2, a - b - 0.03, bottom - b * 0.6, 0.02, n=8),
    ]
    return a, prims, 0.1


DRAWERS = MappingProxyType({
    "aeroplane": draw_aeroplane, "bicycle": draw_bicycle, "bird": draw_bird, "boat": draw_boat,
    "bottle": draw_bottle, "bus": draw_bus, "car": draw_car, "cat": draw_cat, "chair": draw_chair,
    "cow": draw_cow, "diningtable": draw_diningtable, "dog": draw_dog, "horse": draw_horse,
    "motorbike": draw_motorbike, "person": draw_person, "pottedplant": draw_pottedplant,
    "sheep": draw_sheep, "sofa": draw_sofa, "train": draw_train, "tvmonitor": draw_tvmonitor,
})
if tuple(DRAWERS) != VOC_CLASSES:
    raise RuntimeError("the synthetic drawers must follow VOC_CLASSES")


# ----------------------------------------------------------------------------------------------
# Rasterising, colouring and composing.
# ----------------------------------------------------------------------------------------------


def transform_prims(prims, a, rng, max_rotation):
    """Aspect jitter, flip and rotation of a drawing, in frame units; returns the moved primitives."""
    sx, sy = np.exp(rng.uniform(-0.15, 0.15, size=2))
    flip = rng.random() < 0.5
    theta = rng.uniform(-max_rotation, max_rotation)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    center = np.array([a * sx / 2, sy / 2])
    width_scale = math.sqrt(sx * sy)
    moved = []
    for p in prims:
        pts = p[-1] if p[0] == "erase" else p[2]
        q = pts * [sx, sy]
        if flip:
            q[:, 0] = a * sx - q[:, 0]
        q = (q - center) @ rot.T + center
        if p[0] == "line":
            moved.append(("line", p[1], q, p[3] * width_scale))
        elif p[0] == "fill":
            moved.append(("fill", p[1], q))
        else:
            moved.append(("erase", q))
    return moved


def rasterize_prims(prims, scale):
    """Draw primitives scaled to pixels into a tone map (0: empty, t + 1: tone t), cropped tight."""
    lo = np.full(2, np.inf)
    hi = np.full(2, -np.inf)
    for p in prims:
        if p[0] == "erase":
            continue
        pts = p[2] * scale
        half = p[3] * scale / 2 if p[0] == "line" else 0.0
        lo = np.minimum(lo, pts.min(axis=0) - half)
        hi = np.maximum(hi, pts.max(axis=0) + half)
    offset = 2.0 - lo
    w, h = (np.ceil(hi - lo) + 5).astype(int)
    canvas = Image.new("L", (int(w), int(h)), 0)
    draw = ImageDraw.Draw(canvas)
    for p in prims:
        pts = p[-1] if p[0] == "erase" else p[2]
        xy = (pts * scale + offset).ravel().tolist()
        if p[0] == "fill":
            draw.polygon(xy, fill=p[1] + 1)
        elif p[0] == "erase":
            draw.polygon(xy, fill=0)
        else:
            width = max(1, int(round(p[3] * scale)))
            draw.line(xy, fill=p[1] + 1, width=width, joint="curve" if width > 2 else None)
    tones = np.asarray(canvas)
    rows = np.flatnonzero(tones.any(axis=1))
    cols = np.flatnonzero(tones.any(axis=0))
    return tones[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def measure_extent(prims):
    """Width and height of a drawing in frame units (line widths included)."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for p in prims:
        if p[0] == "erase":
            continue
        half = p[3] / 2 if p[0] == "line" else 0.0
        lo = np.minimum(lo, p[2].min(axis=0) - half)
        hi = np.maximum(hi, p[2].max(axis=0) + half)
    return hi - lo


def pick_colours(rng, k):
    """k distinct palette colours with brightness and hue jitter, float RGB."""
    idx = rng.choice(len(PALETTE), size=k, replace=False)
    base = np.array([PALETTE[i] for i in idx], dtype=np.float32)
    gain = rng.uniform(0.8, 1.15, size=(k, 1))
    return np.clip(base * gain + rng.normal(0, 10, size=(k, 3)), 0, 255).astype(np.float32)


def paint_texture(rng, h, w, colour, other):
    """An (h, w, 3) patch of colour with a random texture mixing in other."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    out = np.empty((h, w, 3), dtype=np.float32)
    out[:] = colour
    if kind == "solid":
        return out
    second = colour * 0.45 + other * 0.55
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(np.clip(max(h, w) * rng.uniform(0.05, 0.14), 2.5, 9.0))  # texture scales with the object
    if kind == "stripes":
        ang = rng.uniform(0, np.pi)
        mask = ((xx * math.cos(ang) + yy * math.sin(ang)) % period) < period / 2
    elif kind == "dots":
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        mask = dx * dx + dy * dy < (period * rng.uniform(0.2, 0.35)) ** 2
    else:
        cell = max(2.0, period / 2 + 1)
        mask = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) == 1
    out[mask] = second
    return out


def paint_background(rng, size):
    """Gradient between two palette colours plus low-frequency colour noise."""
    c0, c1 = pick_colours(rng, 2)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    mix = rng.uniform(0.2, 0.8)
    t = t * mix
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    grid = rng.normal(0, rng.uniform(5, 25), size=(4, 4, 3)).astype(np.float32)
    low = np.stack([np.asarray(Image.fromarray(grid[..., k], mode="F").resize((size, size), Image.BILINEAR))
                    for k in range(3)], axis=-1)
    return img + low


def draw_clutter(rng, size):
    """One random non-class shape (polyline, irregular polygon, blob): a cropped 0/1 mask."""
    kind = int(rng.integers(3))
    radius = size * math.exp(rng.uniform(math.log(0.03), math.log(0.3)))
    if kind == 0:
        k = int(rng.integers(2, 5))
        pts = np.cumsum(rng.normal(0, radius, size=(k, 2)), axis=0)
        prims = [("line", 0, pts, float(rng.uniform(1, 3.5)))]
    elif kind == 1:
        k = int(rng.integers(3, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        r = radius * rng.uniform(0.4, 1.0, size=k)
        prims = [("fill", 0, np.stack([r * np.cos(t), r * np.sin(t)], axis=1))]
    else:
        prims = [("fill", 0, make_ellipse(0, 0, radius, radius * rng.uniform(0.3, 1.0), angle=rng.uniform(0, np.pi)))]
    mask = rasterize_prims(prims, 1.0) > 0
    if mask.shape[0] > size or mask.shape[1] > size:
        mask = mask[:size, :size]
    return mask


def paste_clutter(rng, img, owner, size, keep=-2):
    """Paint one textured clutter shape at random, sparing the pixels of object `keep`."""
    mask = draw_clutter(rng, size)
    h, w = mask.shape
    y0, x0 = int(rng.integers(-h // 2, size - h // 2)), int(rng.integers(-w // 2, size - w // 2))
    ys, xs = slice(max(0, y0), min(size, y0 + h)), slice(max(0, x0), min(size, x0 + w))
    sub = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    if sub.size == 0:
        return
    sub = sub & (owner[ys, xs] != keep)
    c0, c1 = pick_colours(rng, 2)
    patch = paint_texture(rng, sub.shape[0], sub.shape[1], c0, c1)
    region = img[ys, xs]
    region[sub] = patch[sub]
    owner[ys, xs][sub] = -1


def place_box(rng, h, w, size, boxes, max_overlap):
    """Top-left corner for an h x w object inside the image, avoiding heavy overlap when it can."""
    best, best_cost = None, np.inf
    for _ in range(10):
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        cost = 0.0
        for by0, bx0, bh, bw in boxes:
            ih = min(y0 + h, by0 + bh) - max(y0, by0)
            iw = min(x0 + w, bx0 + bw) - max(x0, bx0)
            if ih > 0 and iw > 0:
                cost = max(cost, ih * iw / min(h * w, bh * bw))
        if cost < best_cost:
            best, best_cost = (y0, x0), cost
        if cost <= max_overlap:
            break
    return best


def find_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """VOC box (xmin, ymin, xmax, ymax), 1-based inclusive, of the True pixels of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1


def render_scene(config: SyntheticConfig, index: int):
    """Draw image `index`: returns (uint8 H x W x 3 image, owner map, annotations).

    The owner map holds, per pixel, the position in draw order of the object seen there (-1:
    background or clutter); each annotation dict has name, difficult, bbox and that position.
    """
    rng = np.random.default_rng([config.seed, index])
    size = config.image_size
    img = paint_background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)
    for _ in range(int(rng.poisson(config.clutter))):
        paste_clutter(rng, img, owner, size)

    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    lo, hi = math.log(config.min_object_size), math.log(max(config.min_object_size, config.max_object_frac * size))
    sides = np.exp(rng.uniform(lo, hi, size=n))
    order = np.argsort(-(sides * np.exp(rng.normal(0, 0.3, size=n))), kind="stable")
    objects, boxes = [], []
    for k, i in enumerate(order):
        name = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
        a, prims, max_rot = DRAWERS[name](rng)
        prims = transform_prims(prims, a, rng, max_rot)
        scale = float(sides[i]) / float(measure_extent(prims).max())
        tones = rasterize_prims(prims, scale)
        if max(tones.shape) > size:
            tones = rasterize_prims(prims, scale * (size - 1) / max(tones.shape))
        h, w = tones.shape
        y0, x0 = place_box(rng, h, w, size, boxes, config.max_overlap)
        boxes.append((y0, x0, h, w))
        colours = pick_colours(rng, 3)
        other = pick_colours(rng, 1)[0]
        region, own = img[y0:y0 + h, x0:x0 + w], owner[y0:y0 + h, x0:x0 + w]
        main = paint_texture(rng, h, w, colours[0], other)
        for t in range(3):
            sel = tones == t + 1
            region[sel] = main[sel] if t == 0 else colours[t]
        own[tones > 0] = k
        objects.append({"name": name, "area": int((tones > 0).sum())})
    for _ in range(int(rng.poisson(config.front_clutter))):  # never over the topmost object: one stays seen
        paste_clutter(rng, img, owner, size, keep=len(objects) - 1)

    gain, bias = rng.uniform(0.85, 1.1), rng.uniform(-12, 12)
    img = (img - 128.0) * gain + 128.0 + bias + rng.normal(0, rng.uniform(1.0, config.noise), size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    annotations = []
    for k, obj in enumerate(objects):
        vis = owner == k
        visible = int(vis.sum())
        hidden = 1.0 - visible / obj["area"]
        if visible == 0 or hidden > config.occluded_drop:
            continue
        xmin, ymin, xmax, ymax = find_box(vis)
        small = math.sqrt((xmax - xmin + 1) * (ymax - ymin + 1)) < config.difficult_size
        annotations.append({"name": obj["name"], "difficult": int(small or hidden > config.occluded_difficult),
                            "bbox": (xmin, ymin, xmax, ymax), "order": k})
    return img, owner, annotations


def render_image(config: SyntheticConfig, index: int):
    """Draw image `index`: returns (uint8 H x W x 3 array, list of annotation dicts)."""
    img, _, annotations = render_scene(config, index)
    return img, annotations


def format_annotation(image_id: str, size: int, annotations) -> str:
    """A VOC-style annotation XML document."""
    lines = ["<annotation>", "\t<folder>SYN</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", "\t\t<database>diredi-sim synthetic</database>", "\t</source>",
             "\t<size>", f"\t\t<width>{size}</width>", f"\t\t<height>{size}</height>", "\t\t<depth>3</depth>",
             "\t</size>", "\t<segmented>0</segmented>"]
    for obj in annotations:
        xmin, ymin, xmax, ymax = obj["bbox"]
        lines += ["\t<object>", f"\t\t<name>{obj['name']}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>", f"\t\t<difficult>{obj['difficult']}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{xmin}</xmin>", f"\t\t\t<ymin>{ymin}</ymin>",
                  f"\t\t\t<xmax>{xmax}</xmax>", f"\t\t\t<ymax>{ymax}</ymax>", "\t\t</bndbox>", "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def format_image_id(index: int) -> str:
    return f"{index + 1:06d}"


def write_image(args):
    """Worker: render image `index` and write its JPEG and XML under root; returns its objects."""
    root, config, index = args
    img, annotations = render_image(config, index)
    image_id = format_image_id(index)
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=config.jpeg_quality)
    (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buf.getvalue())
    (root / "Annotations" / f"{image_id}.xml").write_text(format_annotation(image_id, config.image_size, annotations))
    return [(obj["name"], obj["difficult"]) for obj in annotations]


# ----------------------------------------------------------------------------------------------
# Writing and caching the dataset.
# ----------------------------------------------------------------------------------------------


def describe_settings(config: SyntheticConfig) -> dict:
    """What synthetic.json records (JSON-normalised, so it compares equal to what is read back)."""
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, "config": dataclasses.asdict(config)}, sort_keys=True))


def assign_splits(config: SyntheticConfig) -> dict[str, list[str]]:
    counts = (config.num_train, config.num_val, config.num_test)
    starts = np.cumsum((0,) + counts)
    return {split: [format_image_id(i) for i in range(starts[k], starts[k + 1])] for k, split in enumerate(SPLITS)}


def count_workers(workers: int | None, jobs: int) -> int:
    """Processes to use: as asked (at most one per image), or by default the available cores,
    with at least 50 images each (a pool costs more than it saves on a handful of images)."""
    if workers is not None:
        return max(1, min(int(workers), jobs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, jobs // 50))


def validate_config(config: SyntheticConfig) -> None:
    """ValueError naming the settings and their values when they cannot make a dataset."""
    c = config
    if c.seed < 0:
        raise ValueError(f"seed = {c.seed}: must be >= 0")
    if not 1 <= c.min_objects <= c.max_objects:
        raise ValueError(f"min_objects = {c.min_objects}, max_objects = {c.max_objects}: need 1 <= min_objects <= max_objects")
    if min(c.num_train, c.num_val, c.num_test) < 0:
        raise ValueError(f"num_train / num_val / num_test = {c.num_train} / {c.num_val} / {c.num_test}: must be >= 0")
    if c.image_size < 16 or not 4 <= c.min_object_size <= c.image_size:
        raise ValueError(f"image_size = {c.image_size}, min_object_size = {c.min_object_size}: "
                         "need image_size >= 16 and 4 <= min_object_size <= image_size")
    if not 0.0 < c.max_object_frac <= 1.0 or not 0.0 <= c.occluded_difficult <= c.occluded_drop <= 1.0:
        raise ValueError(f"max_object_frac = {c.max_object_frac}, occluded_difficult = {c.occluded_difficult}, occluded_drop = "
                         f"{c.occluded_drop}: need 0 < max_object_frac <= 1 and 0 <= occluded_difficult <= occluded_drop <= 1")


def clear_root(root: Path) -> None:
    """Make root an empty-enough folder to write into, refusing to touch foreign content."""
    ours = {"JPEGImages", "Annotations", "ImageSets", SETTINGS_FILE}
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(f"{root} holds files that are not a synthetic dataset: {foreign[:5]}")
        (root / SETTINGS_FILE).unlink(missing_ok=True)
        for name in ("JPEGImages", "Annotations", "ImageSets"):
            shutil.rmtree(root / name, ignore_errors=True)


def write_dataset(root: Path, config: SyntheticConfig, workers: int | None) -> dict:
    """Write every file of the dataset under root, settings file last; returns counts and timing."""
    validate_config(config)
    start = time.perf_counter()
    clear_root(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    total = config.num_images
    jobs = [(root, config, i) for i in range(total)]
    n_workers = count_workers(workers, total)
    if n_workers == 1:
        results = [write_image(job) for job in jobs]
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(n_workers) as pool:
            results = pool.map(write_image, jobs, chunksize=max(1, min(64, total // (4 * n_workers))))

    ids = assign_splits(config)
    main = root / "ImageSets" / "Main"
    lists = dict(ids, trainval=ids["train"] + ids["val"])
    objects_of = {format_image_id(i): objs for i, objs in enumerate(results)}
    for split, members in lists.items():
        (main / f"{split}.txt").write_text("".join(f"{m}\n" for m in members))
        for name in VOC_CLASSES:
            rows = []
            for m in members:
                flags = [d for n, d in objects_of[m] if n == name]
                flag = -1 if not flags else (0 if all(flags) else 1)
                rows.append(f"{m} {flag:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(rows))

    stats = {"images": total, "objects": sum(len(r) for r in results),
             "difficult": sum(d for r in results for _, d in r)}
    record = dict(describe_settings(config), stats=stats)
    tmp = root / (SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / SETTINGS_FILE)
    return dict(stats, seconds=time.perf_counter() - start, workers=n_workers)


def report_generation(root: Path, config: SyntheticConfig, info: dict) -> None:
    n = max(1, info["images"])
    logger.info("generated synthetic VOC data in %.1f s (%d process(es)): %d images of %d px, %.2f objects (%.2f difficult) "
                "per image -> %s", info["seconds"], info["workers"], info["images"], config.image_size, info["objects"] / n,
                info["difficult"] / n, root)


def generate_synthetic(root: Path, config: SyntheticConfig, workers: int | None = None) -> Path:
    """Write the dataset into root (a VOC year folder) and return root.

    root must be missing, empty or a previous synthetic dataset (which is replaced). Uses
    `workers` processes (default: the available cores); the files do not depend on it.
    """
    root = Path(root)
    report_generation(root, config, write_dataset(root, config, workers))
    return root


def check_complete(root: Path, config: SyntheticConfig) -> bool:
    """Cheap check: settings file (written last) matches, and every image and annotation is there."""
    try:
        record = json.loads((root / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return False
    expected = describe_settings(config)
    if any(record.get(k) != v for k, v in expected.items()):
        return False
    total = config.num_images
    try:
        jpgs = sum(1 for e in os.scandir(root / "JPEGImages") if e.name.endswith(".jpg"))
        xmls = sum(1 for e in os.scandir(root / "Annotations") if e.name.endswith(".xml"))
    except OSError:
        return False
    main = root / "ImageSets" / "Main"
    return jpgs == total and xmls == total and all((main / f"{s}.txt").is_file() for s in SPLITS + ("trainval",))


def name_folder(config: SyntheticConfig) -> str:
    digest = hashlib.sha256(json.dumps(describe_settings(config), sort_keys=True).encode()).hexdigest()
    return f"synthetic-voc-{digest[:12]}"


def remove_stale_temporaries(cache_dir: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders of killed generations (older than max_age_s) for this dataset name."""
    now = time.time()
    for entry in cache_dir.glob(f".{name}.*-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def ensure_synthetic(cache_dir: Path, config: SyntheticConfig, workers: int | None = None) -> Path:
    """Return a ready dataset folder under cache_dir for this config, generating it when needed.

    A folder whose settings file matches and whose files are all there is reused. Otherwise the
    dataset is generated into a temporary sibling and renamed into place, so an interrupted run
    never leaves a folder that looks complete; concurrent callers end up sharing one folder.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / name_folder(config)
    if check_complete(root, config):
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir, root.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache_dir))
    try:
        info = write_dataset(tmp, config, workers)
        if root.exists():
            if check_complete(root, config):  # another process finished first
                return root
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=cache_dir))
            try:
                os.replace(root, trash / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not check_complete(root, config):
                raise
            return root
        report_generation(root, config, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_cache_dir() -> Path:
    """$DIREDI_SIM_CACHE if set, else <repository>/.cache/diredi-sim (or <cwd>/.cache/diredi-sim)."""
    env = os.environ.get("DIREDI_SIM_CACHE")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "setup.cfg").is_file() and (repo / "diredi_sim").is_dir() else Path.cwd()
    return base / ".cache" / "diredi-sim"
