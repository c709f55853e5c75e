"""A synthetic concept dataset with pixel-exact labels, written in the Broden layout.

Network Dissection (Bau et al., CVPR 2017) scores units against images whose pixels are
labelled with concepts; Broden is that dataset, and it cannot be downloaded here.  This module
draws its own: every image has one *dominant* object (a shape) and up to a few smaller
*distractors* of other shapes, painted with named colours, procedural textures or crops of
the photos bundled with scikit-image, over a background of one to two regions (flat colour,
texture, or a photo crop).  Because everything is drawn from coordinate grids, the masks say
exactly which pixel shows which concept:

* ``color``   (pixel-level): the 11 basic colour names used by Broden (van de Weijer et al.
  2009), wherever a flat colour or one of a texture's two colours was painted;
* ``object``  (pixel-level): circle, square, triangle, star, cross, ring, hexagon, crescent;
* ``texture`` (pixel-level here, image-level in real Broden): stripes at four orientations and
  two frequencies, dots, checkerboard, zigzag, and crops of the brick, grass and gravel photos;
* ``scene``   (image-level): the dominant object's class, named ``<shape>-s`` (Broden's suffix
  for scenes), so a classifier can learn it; distractors are always of other classes, smaller.

Photos and photo-crops carry no colour label (0).  Each image's target object (the dominant
one, fully visible since it is drawn last) is recorded in ``target.csv`` for saliency scoring.
Images are a pure function of ``(seed, index)``, so any subset can be regenerated and worker
processes give the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from convscope.data.broden import (
    BrodenRow,
    BrodenSample,
    save_sample,
    write_broden,
    write_targets,
)
from convscope.errors import DataError, closest

from ..core.io import atomic_write_bytes

__all__ = ["HELD_OUT_START", "SHAPES", "SynthArrays", "SynthConfig", "SynthSample", "generate", "photo_paths",
           "render_arrays", "render_sample"]

# Indices from here on are never used for training: ``convscope train-demo`` renders 0 .. n_train + n_test.
HELD_OUT_START = 100_000

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")

DEFAULT_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (20, 20, 20)),
    ("blue", (35, 70, 215)),
    ("brown", (125, 75, 35)),
    ("green", (40, 165, 55)),
    ("grey", (128, 128, 128)),
    ("orange", (245, 140, 25)),
    ("pink", (245, 155, 200)),
    ("purple", (125, 45, 170)),
    ("red", (215, 30, 35)),
    ("white", (240, 240, 240)),
    ("yellow", (240, 220, 45)),
)

# name -> (package, file) of the photos shipped with scikit-image and scikit-learn
_PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "brick": ("skimage", "brick.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}
_PACKAGE_DATA = {"skimage": ("data",), "sklearn": ("datasets", "images")}
_REF_SIZE = 112.0  # texture periods are given in pixels at this image size and scale with it


@dataclass(frozen=True)
class SynthConfig:
    """Concept vocabulary and drawing parameters of the synthetic dataset.

    Sizes are fractions of the image side; texture periods are pixels at 112 px and scale with
    the image.  ``distractor_counts[k]`` is the probability of k distractors.  Label numbers
    are assigned in order color, object, scene, texture (see :meth:`label_names`).

    ``centre_at_chance`` (a distance, as a fraction of the side; None: off): place the dominant object, fully
    visible, so that a saliency map peaked at the image centre scores a uniformly random map's expected value per
    image on two measures: the pointing game with that tolerance (the centre lies within that distance of the
    object as often as a random pixel would) and the mask IoU of its top pixels (the centred disc of the object's
    area overlaps it as much as a random region would; not reachable for the largest round objects, which stay
    slightly above).  See :func:`_place_at_chance`.  Every object must then be able to clear the
    centre: ``target_radius`` high end at most ``(0.5 - distance) / 1.65`` (then only from the corners).
    """

    colors: tuple[tuple[str, tuple[int, int, int]], ...] = DEFAULT_COLORS
    shapes: tuple[str, ...] = SHAPES
    stripe_orientations: tuple[tuple[str, float], ...] = (
        ("horizontal", 0.0),
        ("diagonal", 45.0),
        ("vertical", 90.0),
        ("antidiagonal", 135.0),
    )
    stripe_periods: tuple[tuple[str, float, float], ...] = (("coarse", 14.0, 22.0), ("fine", 5.0, 9.0))
    patterns: tuple[str, ...] = ("dots", "checkerboard", "zigzag")
    photo_textures: tuple[str, ...] = ("brick", "grass", "gravel")
    photos: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower")
    target_radius: tuple[float, float] = (0.22, 0.36)
    distractor_radius: tuple[float, float] = (0.07, 0.11)
    distractor_counts: tuple[float, ...] = (0.25, 0.35, 0.25, 0.15)
    color_jitter: int = 12
    noise_sigma: float = 3.0
    angle_jitter: float = 7.0
    val_fraction: float = 0.2
    scene_suffix: str = "-s"
    centre_at_chance: float | None = None

    def __post_init__(self) -> None:
        if len(self.colors) < 4:
            raise DataError(
                "SynthConfig.colors needs at least 4 named colours (two-colour textures avoid the background's)"
            )
        for name, rgb in self.colors:
            if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                raise DataError(f"colour {name!r} must be an (r, g, b) triple in 0..255, got {rgb!r}")
        if len(self.shapes) < 2:
            raise DataError("SynthConfig.shapes needs at least 2 shapes (distractors are of another class)")
        for s in self.shapes:
            if s not in SHAPES:
                hint = closest(s, SHAPES)
                raise DataError(
                    f"unknown shape {s!r}; known: {', '.join(SHAPES)}" + (f" (did you mean {hint[0]}?)" if hint else "")
                )
        for p in self.patterns:
            if p not in ("dots", "checkerboard", "zigzag"):
                raise DataError(f"unknown pattern {p!r}; known: dots, checkerboard, zigzag")
        for p in (*self.photo_textures, *self.photos):
            if p not in _PHOTO_FILES:
                raise DataError(f"unknown photo {p!r}; bundled: {', '.join(_PHOTO_FILES)}")
        for what, (lo, hi) in (("target_radius", self.target_radius), ("distractor_radius", self.distractor_radius)):
            if not 0.02 <= lo <= hi < 0.5:
                raise DataError(f"SynthConfig.{what} must satisfy 0.02 <= low <= high < 0.5, got {(lo, hi)}")
        if self.distractor_radius[1] >= self.target_radius[0]:
            raise DataError(
                "SynthConfig.distractor_radius must stay below target_radius so the dominant object is largest"
            )
        if not self.distractor_counts or min(self.distractor_counts) < 0 or abs(sum(self.distractor_counts) - 1) > 1e-6:
            raise DataError(
                f"SynthConfig.distractor_counts must be probabilities summing to 1, got {self.distractor_counts}"
            )
        if self.centre_at_chance is not None:
            t = self.centre_at_chance
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t < 0.25:
                raise DataError(f"SynthConfig.centre_at_chance must be None or a fraction of the side in [0, 0.25), "
                                f"got {t!r}")
            if self.target_radius[1] > (0.5 - t) / 1.65:
                raise DataError(f"SynthConfig.target_radius {self.target_radius} is too large for centre_at_chance="
                                f"{t}: objects must fit off-centre; use a high end <= {(0.5 - t) / 1.65:.3f}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"SynthConfig.val_fraction must lie in [0, 1), got {self.val_fraction}")
        names = [n for cat in self.vocabulary.values() for n in cat]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"label names must be unique across categories (Broden merges by name); repeated: {dupes}")

    @property
    def texture_names(self) -> tuple[str, ...]:
        """Texture labels: ``stripes-<orientation>-<period>``, the patterns, the photo textures."""
        stripes = tuple(f"stripes-{o}-{p}" for o, _ in self.stripe_orientations for p, _, _ in self.stripe_periods)
        return stripes + tuple(self.patterns) + tuple(self.photo_textures)

    @property
    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        """Label names per category, in label-number order."""
        return {
            "color": tuple(n for n, _ in self.colors),
            "object": tuple(self.shapes),
            "scene": tuple(s + self.scene_suffix for s in self.shapes),
            "texture": self.texture_names,
        }

    def label_names(self) -> dict[int, str]:
        """Label number (from 1; 0 is '-') -> name."""
        return dict(_vocab(self).names)

    def category_labels(self) -> dict[str, list[int]]:
        """Category -> its label numbers."""
        return {c: list(v) for c, v in _vocab(self).categories.items()}

    def number(self, category: str, name: str) -> int:
        """Label number of ``name`` in ``category``."""
        try:
            return _vocab(self).number[(category, name)]
        except KeyError:
            raise DataError(
                f"no label {name!r} in category {category!r}; known: {', '.join(self.vocabulary.get(category, ()))}"
            ) from None

    def scene_class(self, number: int) -> int:
        """Class index (position in ``shapes``) of a scene label number, for classifiers."""
        cats = _vocab(self).categories["scene"]
        if number not in cats:
            raise DataError(f"label {number} is not a scene label (scene labels: {cats[0]}..{cats[-1]})")
        return cats.index(number)


class SynthSample(NamedTuple):
    """One rendered image: ``masks`` hold label numbers per category; ``scene`` is a label number."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    scene: int
    target_mask: np.ndarray


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class _Vocab:
    names: dict[int, str]
    categories: dict[str, tuple[int, ...]]
    number: dict[tuple[str, str], int]
    color_rgb: np.ndarray  # K x 3 float32
    color_num: tuple[int, ...]
    textures: tuple[tuple[int, str, tuple], ...]  # (label number, kind, parameters)


@functools.lru_cache(maxsize=16)
def _vocab(cfg: SynthConfig) -> _Vocab:
    names: dict[int, str] = {}
    categories: dict[str, tuple[int, ...]] = {}
    number: dict[tuple[str, str], int] = {}
    nxt = 1
    for cat, labels in cfg.vocabulary.items():
        nums = []
        for name in labels:
            names[nxt] = name
            number[(cat, name)] = nxt
            nums.append(nxt)
            nxt += 1
        categories[cat] = tuple(nums)
    textures: list[tuple[int, str, tuple]] = []
    for o, angle in cfg.stripe_orientations:
        for p, lo, hi in cfg.stripe_periods:
            textures.append((number[("texture", f"stripes-{o}-{p}")], "stripes", (angle, lo, hi)))
    for p in cfg.patterns:
        textures.append((number[("texture", p)], p, ()))
    for p in cfg.photo_textures:
        textures.append((number[("texture", p)], "photo", (p,)))
    rgb = np.array([c for _, c in cfg.colors], dtype=np.float32)
    rgb.setflags(write=False)
    return _Vocab(names, categories, number, rgb, tuple(number[("color", n)] for n, _ in cfg.colors), tuple(textures))


# --------------------------------------------------------------------------- photos


def photo_paths() -> dict[str, Path]:
    """Paths of the photos bundled with scikit-image and scikit-learn (located without importing them).

    Private to the data layer on purpose: data sits upstream of core (DESIGN.md), so it does not
    use ``convscope.core.images.sample_images``; the names match that helper's.
    """
    out: dict[str, Path] = {}
    for name, (pkg, fname) in _PHOTO_FILES.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise DataError(
                f"package {pkg} is not installed, and the synthetic dataset crops its bundled photos; "
                "install scikit-image and scikit-learn (they are convscope dependencies)"
            )
        path = Path(spec.origin).parent.joinpath(*_PACKAGE_DATA[pkg], fname)
        if not path.is_file():
            raise DataError(f"bundled photo {path} is missing; reinstall {pkg} (pip install --force-reinstall {pkg})")
        out[name] = path
    return out


@functools.cache
def _photo(name: str) -> Image.Image:
    """A bundled photo, decoded once per process (read-only use: crops are new images)."""
    path = photo_paths()[name]
    try:
        with Image.open(path) as im:
            return im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB")
    except OSError as exc:
        raise DataError(f"bundled photo {path} cannot be read ({exc}); reinstall its package") from None


def _crop(rng: np.random.Generator, name: str, size: int, scale: tuple[float, float]) -> np.ndarray:
    """A random square crop of a photo, side ``scale`` x its shorter side, resized to size x size."""
    im = _photo(name)
    w, h = im.size
    side = rng.uniform(*scale) * min(w, h)
    x0 = rng.uniform(0, w - side)
    y0 = rng.uniform(0, h - side)
    out = im.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.indices((size, size), dtype=np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _rotated(yy: np.ndarray, xx: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along the direction ``angle``, v across it); angle 0 is the x axis."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return xx * c + yy * s, -xx * s + yy * c


def _polygon(u: np.ndarray, v: np.ndarray, n: int, r: float) -> np.ndarray:
    """Regular n-gon with circumradius r: inside every edge's half-plane."""
    apothem = r * math.cos(math.pi / n)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        a = 2 * math.pi * k / n
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray, r: float, inner: float = 0.45, points: int = 5) -> np.ndarray:
    """Star with ``points`` outer vertices at radius r and inner vertices at ``inner * r``."""
    sector = 2 * math.pi / points
    phi = np.mod(np.arctan2(v, u), sector)
    a = np.minimum(phi, sector - phi)  # 0 at an outer vertex, sector/2 at an inner one
    rho = np.hypot(u, v)
    px, py = rho * np.cos(a), rho * np.sin(a)
    ox, oy = r, 0.0
    ix, iy = inner * r * math.cos(sector / 2), inner * r * math.sin(sector / 2)
    ex, ey = ix - ox, iy - oy
    # the origin lies on the negative side of the edge O->I; keep points on that side
    return ex * (py - oy) - ey * (px - ox) >= 0


def shape_mask(shape: str, size: int, cy: float, cx: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cy, cx) with outer radius r (pixel centres are integers)."""
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    u, v = _rotated(dy, dx, math.degrees(angle))
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.6 * r) ** 2)
    if shape == "square":
        half = r / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        return _polygon(u, v, 3, r)
    if shape == "hexagon":
        return _polygon(u, v, 6, r)
    if shape == "star":
        return _star(u, v, r)
    if shape == "cross":
        w = 0.32 * r
        arm = math.sqrt(r * r - w * w)  # arm corners stay within radius r
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))
    if shape == "crescent":
        d2 = dx * dx + dy * dy
        ou, ov = u - 0.45 * r, v
        return (d2 <= r * r) & (ou * ou + ov * ov > (0.8 * r) ** 2)
    raise DataError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


class _Fill(NamedTuple):
    rgb: np.ndarray  # H x W x 3 or 1 x 1 x 3, float32
    color: np.ndarray | int  # label numbers
    texture: np.ndarray | int
    colors: frozenset[int]  # colour indices used
    texture_num: int


class _Painter:
    """Per-sample drawing state: the canvas, the label maps and the random stream."""

    def __init__(self, rng: np.random.Generator, size: int, cfg: SynthConfig) -> None:
        self.rng, self.size, self.cfg, self.voc = rng, size, cfg, _vocab(cfg)
        self.scale = size / _REF_SIZE
        self.rgb = np.zeros((size, size, 3), dtype=np.float32)
        self.color = np.zeros((size, size), dtype=np.int32)
        self.texture = np.zeros((size, size), dtype=np.int32)
        self.object = np.zeros((size, size), dtype=np.int32)

    def _color(self, idx: int) -> np.ndarray:
        j = self.cfg.color_jitter
        jitter = self.rng.integers(-j, j + 1, size=3) if j > 0 else np.zeros(3)
        return np.clip(self.voc.color_rgb[idx] + jitter, 0, 255).astype(np.float32)

    def _pick_colors(self, k: int, avoid: frozenset[int]) -> list[int]:
        pool = [i for i in range(len(self.voc.color_num)) if i not in avoid]
        if len(pool) < k:
            pool = list(range(len(self.voc.color_num)))
        return [int(i) for i in self.rng.choice(pool, size=k, replace=False)]

    def _two_tone(self, on: np.ndarray, avoid: frozenset[int], tex: int) -> _Fill:
        a, b = self._pick_colors(2, avoid)
        ca, cb = self._color(a), self._color(b)
        rgb = np.where(on[..., None], cb, ca)
        color = np.where(on, self.voc.color_num[b], self.voc.color_num[a]).astype(np.int32)
        return _Fill(rgb, color, tex, frozenset((a, b)), tex)

    def fill(self, allow_photo: bool, avoid_colors: frozenset[int], avoid_texture: frozenset[int]) -> _Fill:
        """A random fill: a photo crop (backgrounds only), a flat named colour, or a texture."""
        rng, size = self.rng, self.size
        r = rng.random()
        if allow_photo and r < 0.15:
            name = self.cfg.photos[int(rng.integers(len(self.cfg.photos)))]
            return _Fill(_crop(rng, name, size, (0.35, 1.0)), 0, 0, frozenset(), 0)
        if r < 0.55:
            (idx,) = self._pick_colors(1, avoid_colors)
            return _Fill(self._color(idx)[None, None, :], self.voc.color_num[idx], 0, frozenset((idx,)), 0)
        choices = [t for t in self.voc.textures if t[0] not in avoid_texture]
        tex, kind, params = choices[int(rng.integers(len(choices)))]
        yy, xx = _grid(size)
        s = self.scale
        if kind == "photo":
            g = _crop(rng, params[0], size, (0.2, 0.5))
            mean = float(g.mean())
            g = (g - mean) * rng.uniform(0.8, 1.25) + mean + rng.uniform(-20, 20)
            return _Fill(np.repeat(g[..., None], 3, axis=2), 0, tex, frozenset(), tex)
        if kind == "stripes":
            angle, lo, hi = params
            angle += rng.uniform(-self.cfg.angle_jitter, self.cfg.angle_jitter)
            _, v = _rotated(yy, xx, angle)  # stripes run along `angle`, so they vary across it
            on = np.mod(v / (rng.uniform(lo, hi) * s) + rng.random(), 1.0) < 0.5
        elif kind == "dots":
            period = rng.uniform(10.0, 16.0) * s
            radius = period * rng.uniform(0.22, 0.32)
            u, v = _rotated(yy, xx, rng.uniform(0.0, 90.0))
            du = (np.mod(u / period + rng.random(), 1.0) - 0.5) * period
            dv = (np.mod(v / period + rng.random(), 1.0) - 0.5) * period
            on = du * du + dv * dv <= radius * radius
        elif kind == "checkerboard":
            period = rng.uniform(8.0, 16.0) * s
            u, v = _rotated(yy, xx, rng.uniform(-15.0, 15.0))
            on = (np.floor(u / period + rng.random()) + np.floor(v / period + rng.random())) % 2 == 0
        else:  # zigzag: stripes whose centre line follows a triangle wave
            wavelength = rng.uniform(12.0, 20.0) * s
            amplitude = wavelength * rng.uniform(0.25, 0.5)
            period = rng.uniform(9.0, 14.0) * s
            u, v = _rotated(yy, xx, rng.uniform(0.0, 180.0))
            tri = 2.0 * np.abs(2.0 * np.mod(u / wavelength + rng.random(), 1.0) - 1.0) - 1.0
            on = np.mod((v + amplitude * tri) / period + rng.random(), 1.0) < 0.5
        return self._two_tone(on, avoid_colors, tex)

    def paint(self, mask: np.ndarray, f: _Fill, obj: int | None = None) -> None:
        self.rgb = np.where(mask[..., None], f.rgb, self.rgb)
        self.color = np.where(mask, f.color, self.color).astype(np.int32, copy=False)
        self.texture = np.where(mask, f.texture, self.texture).astype(np.int32, copy=False)
        if obj is not None:
            self.object[mask] = obj


def _background(p: _Painter) -> tuple[frozenset[int], frozenset[int]]:
    """Paint one to two regions (whole, split by a line, or a band); return colours/textures used."""
    rng, size = p.rng, p.size
    yy, xx = _grid(size)
    layout = rng.choice(3, p=(0.5, 0.35, 0.15))
    if layout == 0:
        regions = [np.ones((size, size), dtype=bool)]
    else:
        a = rng.uniform(0, 2 * math.pi)
        cy, cx = rng.uniform(0.25, 0.75, size=2) * size
        d = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        inside = d > 0 if layout == 1 else np.abs(d) < rng.uniform(0.12, 0.25) * size
        regions = [np.ones((size, size), dtype=bool), inside]
    colors: frozenset[int] = frozenset()
    textures: frozenset[int] = frozenset()
    for region in regions:
        f = p.fill(allow_photo=True, avoid_colors=colors, avoid_texture=textures)
        p.paint(region, f)
        colors |= f.colors
        textures |= {f.texture_num} - {0}
    return colors, textures


def _centre_distance(mask: np.ndarray) -> float:
    """Distance in pixels from the image's centre pixel (the first maximum of a centred map, ``size // 2 - 1`` for
    even sizes) to the nearest pixel of ``mask``."""
    c = (mask.shape[0] - 1) // 2
    ys, xs = np.nonzero(mask)
    return float(np.sqrt(((ys - c) ** 2 + (xs - c) ** 2).min())) if len(ys) else math.inf


@functools.lru_cache(maxsize=8)
def _centre_order(size: int) -> np.ndarray:
    """Pixel indices (raster) by increasing distance from the image's centre point ``((size - 1) / 2, ...)``,
    ties in raster order: the first ``k`` are the top ``k`` pixels of a centred Gaussian map (mask IoU's region)."""
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2).ravel()
    return np.argsort(d, kind="stable")


def _centre_excess(mask: np.ndarray, tol: float) -> tuple[float, float]:
    """How much a centre prior beats a random map on this object mask: (pointing hit of the centre pixel minus the
    hit rate of a uniformly random pixel, i.e. the share of the image within ``tol`` of the object; mask IoU of the
    ``k`` most central pixels, ``k`` the object's area, minus a random ``k``-pixel region's expected ``f / (2 - f)``,
    ``f = k / size^2``)."""
    from scipy.ndimage import distance_transform_edt

    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return 0.0, 0.0
    pad = int(math.ceil(tol)) + 1  # the object's bounding box grown by tol holds every pixel within tol of it
    y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    near = distance_transform_edt(~mask[y0:ys.max() + pad + 1, x0:xs.max() + pad + 1]) <= tol
    k = len(ys)
    f = k / mask.size
    inter = int(mask.ravel()[_centre_order(size)[:k]].sum())
    iou = inter / max(2 * k - inter, 1)
    return float(_centre_distance(mask) <= tol) - float(near.sum()) / mask.size, iou - f / (2 - f)


def _place_at_chance(rng: np.random.Generator, shape: str, size: int, r: float, angle: float,
                     tol: float, candidates: int = 3) -> tuple[float, float]:
    """Centre of the dominant object (``SynthConfig.centre_at_chance``), fully inside the image, drawn so that a
    centre prior scores chance in expectation on both the pointing game (tolerance ``tol`` px) and the mask IoU.

    Candidates: ``candidates`` positions where the image centre is within ``tol`` of the object ("cover", uniform
    in a disc) and ``3 * candidates`` where it is not ("off": two thirds uniform in the image, one third near its
    corners), each with its excess
    ``(a, b)`` over a random map (:func:`_centre_excess`).  A cover/off pair mixed with weight
    ``w = -a_off / (a_cover - a_off)`` on the cover has pointing excess 0; of all pairs, the two whose IoU excess
    is nearest to 0 from below and from above are mixed to IoU excess 0 and one position is drawn from that
    distribution.  Where no pair reaches IoU excess <= 0 (the largest round objects cannot leave a central disc of
    their own area) the pair of least IoU excess is used."""
    c = (size - 1) // 2
    lo, hi = r + 1, size - 2 - r

    def draw(cover: bool, corner: bool = False) -> tuple[float, float, np.ndarray]:
        for _ in range(200):
            if cover:  # offsets that can bring the object within tol of the centre, uniform in a disc
                rho, phi = (r + tol + 1) * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                cy, cx = c + rho * math.sin(phi), c + rho * math.cos(phi)
            elif corner:  # the outer 15 % of the range on both axes: far from a central disc
                inward = (hi - lo) * 0.15 * rng.random(2)
                cy, cx = np.where(rng.random(2) < 0.5, lo + inward, hi - inward)
            else:
                cy, cx = rng.uniform(lo, hi, size=2)
            if lo <= cy <= hi and lo <= cx <= hi:
                m = shape_mask(shape, size, cy, cx, r, angle)
                if (_centre_distance(m) <= tol) == cover:
                    return float(cy), float(cx), m
        cy, cx = (float(c), float(c)) if cover else (float(lo), float(lo))
        return cy, cx, shape_mask(shape, size, cy, cx, r, angle)

    covers = [draw(True) for _ in range(candidates)]
    offs = [draw(False, corner=k % 3 == 2) for k in range(3 * candidates)]
    ex_c = [_centre_excess(m, tol) for *_, m in covers]
    ex_o = [_centre_excess(m, tol) for *_, m in offs]
    pairs = []  # (IoU excess of the pointing-balanced pair, cover index, off index, weight on the cover)
    for i, (a_c, b_c) in enumerate(ex_c):
        for j, (a_o, b_o) in enumerate(ex_o):
            w = -a_o / (a_c - a_o) if a_c - a_o > 0 else 0.0
            pairs.append((w * b_c + (1 - w) * b_o, i, j, w))
    below = [p for p in pairs if p[0] <= 0]
    above = [p for p in pairs if p[0] > 0]
    if below and above:
        low, high = max(below), min(above)
        pick = low if rng.random() < high[0] / (high[0] - low[0]) else high
    else:
        pick = min(pairs) if not below else max(below)
    _, i, j, w = pick
    cy, cx, _ = covers[i] if rng.random() < w else offs[j]
    return cy, cx


def _render(index: int, size: int, seed: int, cfg: SynthConfig) -> tuple[SynthSample, int]:
    """Render sample ``index``; also return the target object's label number."""
    rng = np.random.default_rng([seed, index])
    p = _Painter(rng, size, cfg)
    voc = p.voc
    bg_colors, bg_textures = _background(p)

    n_shapes = len(cfg.shapes)
    cls = int(rng.integers(n_shapes))
    big_r = rng.uniform(*cfg.target_radius) * size
    if cfg.centre_at_chance is None:
        target_angle = None
        cy, cx = rng.uniform(big_r + 1, size - 2 - big_r, size=2)
    else:
        target_angle = rng.uniform(0, 2 * math.pi)
        cy, cx = _place_at_chance(rng, cfg.shapes[cls], size, big_r, target_angle, cfg.centre_at_chance * size)
    placed = [(cy, cx, big_r)]
    distractors = []
    for _ in range(int(rng.choice(len(cfg.distractor_counts), p=cfg.distractor_counts))):
        other = [k for k in range(n_shapes) if k != cls]
        d_cls = other[int(rng.integers(len(other)))]
        r = rng.uniform(*cfg.distractor_radius) * size
        for _try in range(20):
            y, x = rng.uniform(r + 1, size - 2 - r, size=2)
            gap = [
                math.hypot(y - py, x - px) - (pr + (0.5 if k == 0 else 1.0) * r)
                for k, (py, px, pr) in enumerate(placed)
            ]
            if min(gap) >= 0:
                placed.append((y, x, r))
                distractors.append((d_cls, y, x, r, rng.uniform(0, 2 * math.pi)))
                break
    for d_cls, y, x, r, angle in distractors:
        mask = shape_mask(cfg.shapes[d_cls], size, y, x, r, angle)
        p.paint(mask, p.fill(False, bg_colors, bg_textures), voc.number[("object", cfg.shapes[d_cls])])
    shape = cfg.shapes[cls]
    target = shape_mask(shape, size, cy, cx, big_r, rng.uniform(0, 2 * math.pi) if target_angle is None
                         else target_angle)
    obj_num = voc.number[("object", shape)]
    p.paint(target, p.fill(False, bg_colors, bg_textures), obj_num)

    img = p.rgb
    if cfg.noise_sigma > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_sigma)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = {"color": p.color, "object": p.object, "texture": p.texture}
    scene = voc.number[("scene", shape + cfg.scene_suffix)]
    return SynthSample(image, masks, scene, target), obj_num


def _check_args(size: int, seed: int, index: int | None = None) -> None:
    if not isinstance(size, int | np.integer) or size < 32:
        raise DataError(f"size must be an int >= 32 (pixels per side), got {size!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative int, got {seed!r}")
    if index is not None and (not isinstance(index, int | np.integer) or index < 0):
        raise DataError(f"index must be a non-negative int, got {index!r}")


def render_sample(index: int, size: int = 112, seed: int = 0, config: SynthConfig | None = None) -> SynthSample:
    """Render image ``index`` of the dataset with ``seed``: (image, masks, scene, target_mask).

    ``image`` is uint8 H x W x 3; ``masks`` maps ``color``, ``object`` and ``texture`` to int32
    H x W maps of label numbers (0 = unlabeled); ``scene`` is the scene label number;
    ``target_mask`` is the dominant object's boolean mask.  A pure function of its arguments.
    """
    _check_args(size, seed, index)
    return _render(int(index), int(size), int(seed), config or SynthConfig())[0]


def _split_of(index: int, seed: int, val_fraction: float) -> str:
    """Train/val assignment of one index, from its own random stream (independent of drawing)."""
    return "val" if np.random.default_rng([seed, index, 1]).random() < val_fraction else "train"


def _write_one(index: int, root: str, size: int, seed: int, cfg: SynthConfig, width: int) -> tuple[BrodenRow, int]:
    sample, target = _render(index, size, seed, cfg)
    row = save_sample(
        root,
        BrodenSample(
            name=f"synth/{index:0{width}d}",
            image=sample.image,
            seg=sample.masks,
            image_labels={"scene": [sample.scene]},
            split=_split_of(index, seed, cfg.val_fraction),
        ),
    )
    return row, target


def _run(job: functools.partial, n: int, workers: int) -> Iterator[tuple[BrodenRow, int]]:
    if workers == 1 or n < 2 * workers:
        yield from map(job, range(n))
        return
    # fork avoids re-importing the package (and torch) in each worker; the workers only run numpy/PIL
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as ex:
        yield from ex.map(job, range(n), chunksize=max(1, min(32, n // (8 * workers))))


class SynthArrays(NamedTuple):
    """Images ``start .. start+n-1`` in memory: ``images`` uint8 ``N x H x W x 3``, ``scenes`` the scene class
    indices (positions in ``SynthConfig.shapes``), ``target_masks`` bool ``N x H x W`` (or None when not asked),
    ``objects`` int8 ``N x H x W``: the shape class drawn at each pixel (dominant object or distractor; the
    position in ``SynthConfig.shapes``, ``len(shapes)`` for background; None when not asked)."""

    images: np.ndarray
    scenes: np.ndarray
    target_masks: np.ndarray | None
    objects: np.ndarray | None = None


def object_classes(sample: SynthSample, cfg: SynthConfig) -> np.ndarray:
    """int8 ``H x W`` shape class per pixel of ``sample`` (``len(cfg.shapes)``: no object), from its object mask."""
    voc = _vocab(cfg)
    lut = np.full(max(voc.names) + 1, len(cfg.shapes), np.int8)
    for k, shape in enumerate(cfg.shapes):
        lut[voc.number[("object", shape)]] = k
    return lut[sample.masks["object"]]


def _arrays_one(i: int, start: int, size: int, seed: int, cfg: SynthConfig, masks: bool,
                objects: bool = False) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None]:
    s = _render(start + i, size, seed, cfg)[0]
    return (s.image, cfg.scene_class(s.scene), s.target_mask if masks else None,
            object_classes(s, cfg) if objects else None)


def render_arrays(start: int, n: int, size: int = 112, seed: int = 0, workers: int = 1,
                  progress: bool | None = True, masks: bool = False, config: SynthConfig | None = None,
                  objects: bool = False) -> SynthArrays:
    """Render images ``start .. start+n-1`` into arrays (no files), in ``workers`` processes with identical
    output; for training (``train-demo``) and for held-out evaluation sets (from :data:`HELD_OUT_START`).
    ``progress``: a bar with an ETA (``True``: from the start for 50 images or more, else once rendering has run
    2 s; ``None``: once it has run 2 s; ``False``: never)."""
    cfg = config or SynthConfig()
    _check_args(size, seed, start)
    if not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"n must be a positive int, got {n!r}")
    job = functools.partial(_arrays_one, start=int(start), size=int(size), seed=int(seed), cfg=cfg, masks=masks,
                            objects=objects)
    from convscope.core.progress import progress_bar

    show = None if progress is True and n < 50 else progress  # a few images: only when they are slow
    items = list(progress_bar(_run(job, int(n), int(workers)), total=n, desc="render", unit="img", progress=show))
    return SynthArrays(np.stack([it[0] for it in items]), np.array([it[1] for it in items], dtype=np.int64),
                       np.stack([it[2] for it in items]) if masks else None,
                       np.stack([it[3] for it in items]) if objects else None)


def generate(
    out: str | os.PathLike[str],
    n: int = 2000,
    size: int = 112,
    seed: int = 0,
    workers: int = 1,
    progress: bool | None = True,
    config: SynthConfig | None = None,
) -> Path:
    """Generate ``n`` synthetic images into a Broden-layout folder ``out`` and return its path.

    Writes ``images/synth/<index>.png`` with ``_color``, ``_object`` and ``_texture`` label PNGs,
    ``index.csv`` (columns image,split,ih,iw,sh,sw,color,object,scene,texture; scene as label
    numbers, split train/val), ``label.csv``, ``category.csv``, ``c_<category>.csv``,
    ``target.csv`` and ``synth.json`` (the parameters).  Every file is written atomically and
    ``index.csv`` last.  ``workers`` > 1 renders in processes, with identical output.  Into an
    existing folder, files of the same names are replaced and other files left alone.  ``progress``: a bar with
    an ETA (``True``, ``False``, or ``None``: once the work has run 2 s).
    """
    cfg = config or SynthConfig()
    _check_args(size, seed)
    if not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"n must be a positive int, got {n!r}")
    if not isinstance(workers, int | np.integer) or workers < 1:
        raise DataError(f"workers must be a positive int, got {workers!r}")
    photo_paths()  # fail early, with the fix, if a bundled photo is missing
    root = Path(out).expanduser()
    (root / "images" / "synth").mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n - 1)))
    job = functools.partial(_write_one, root=str(root), size=int(size), seed=int(seed), cfg=cfg, width=width)
    rows: list[BrodenRow] = []
    targets: list[tuple[str, str, int]] = []
    from convscope.core.progress import progress_bar

    with progress_bar(total=n, desc="synth", unit="img", progress=progress) as bar:
        for row, target in _run(job, int(n), int(workers)):
            rows.append(row)
            targets.append((row.image, "object", target))
            bar.update()
    write_targets(root, targets)
    meta = {
        "generator": "convscope.data.synthetic",
        "n": int(n),
        "size": int(size),
        "seed": int(seed),
        "config": {k: v for k, v in asdict(cfg).items() if not (k == "centre_at_chance" and v is None)},
    }
    atomic_write_bytes(root / "synth.json", json.dumps(meta, indent=1).encode("utf-8"))
    voc = _vocab(cfg)
    write_broden(root, rows, voc.names, voc.categories)
    return root
