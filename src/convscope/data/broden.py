"""Read and write datasets in the Broden layout used by Network Dissection.

Broden (Bau et al., "Network Dissection: Quantifying Interpretability of Deep Visual
Representations", CVPR 2017) stores a densely labelled image set as a folder of CSV files
plus PNGs::

    index.csv       image,split,ih,iw,sh,sw,<category>,...   one row per image
    category.csv    name,first,last,count,frequency          one row per category
    label.csv       number,name,category,frequency,coverage,syns
    c_<cat>.csv     code,number,name,frequency,coverage       dense codes of one category
    images/         the images and their segmentation PNGs (paths relative to images/)

In ``index.csv`` a category field holds ``;``-separated entries. A PNG path is a pixel-level
label map (label number = R + 256 * G); a bare number is an image-level label (Broden's
``scene`` and ``texture``), or, mixed with PNGs, a label covering the whole image.  Label 0
is ``-`` (unlabeled); ``label.csv`` starts at 1.  ``label.csv``'s category field reads
``color(123);object(45)``: the categories a label belongs to, with its image count in each.

The same :class:`BrodenDataset` reads a real Broden download and the folders written by
:func:`write_broden` (used by :mod:`convscope.data.synthetic`).  An optional ``target.csv``
(``image,category,label``, a convscope extension ignored by NetDissect) names each image's
target object, for the ground-truth helpers in :mod:`convscope.data.groundtruth`.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from convscope.core.io import atomic_write_bytes
from convscope.errors import DataError, closest

if TYPE_CHECKING:  # torch is imported lazily: the generator's workers never need it
    import torch

__all__ = [
    "META_COLUMNS",
    "TARGET_FILE",
    "BrodenDataset",
    "BrodenError",
    "BrodenRow",
    "BrodenSample",
    "Label",
    "broden_collate",
    "decode_label_png",
    "decode_labels",
    "encode_labels",
    "same_extent",
    "save_sample",
    "write_broden",
    "worker_message",
    "write_targets",
]

META_COLUMNS: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")
TARGET_FILE = "target.csv"
MAX_LABEL = 256 * 256 - 1  # R + 256 G with two 8-bit channels
_REGENERATE = "regenerate it with `convscope data synth --out DIR`, or re-download Broden"


class BrodenError(DataError):
    """A Broden folder or file that cannot be used. One line, also when raised in a DataLoader worker: torch re-raises
    a worker's exception as ``type(message_with_the_worker_traceback)``, and this class keeps only the original
    message (so the CLI prints one line, not the worker's traceback)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(worker_message(str(message), type(self)))


def worker_message(text: str, cls: type[BaseException]) -> str:
    """The original one-line message inside torch's "Caught X in DataLoader worker process N. Original Traceback..."
    text (``text`` unchanged when it is not one)."""
    if not text.startswith(f"Caught {cls.__name__} ") or "Original Traceback" not in text:
        return text
    names = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        for name in names:
            if lines[i].startswith(name):
                return " ".join([lines[i][len(name):], *(ln.strip() for ln in lines[i + 1:] if ln.strip())])
    return text


# --------------------------------------------------------------------------- encoding


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """Encode a 2-D map of label numbers as an RGB image with number = R + 256 * G (Broden)."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise BrodenError(f"a label map must be 2-D (H x W), got shape {arr.shape}; pass one layer at a time")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_LABEL):
        raise BrodenError(
            f"label numbers must lie in 0..{MAX_LABEL} to fit R + 256*G, got {arr.min()}..{arr.max()}; "
            "renumber the labels"
        )
    arr = arr.astype(np.int64, copy=False)
    out = np.zeros(arr.shape + (3,), dtype=np.uint8)
    out[..., 0] = arr % 256
    out[..., 1] = arr // 256
    return out


def decode_labels(rgb: np.ndarray) -> np.ndarray:
    """Label numbers R + 256 * G of an H x W x 3 (or x 4) uint8 array, as int64."""
    a = np.asarray(rgb)
    return a[..., 0].astype(np.int64) + 256 * a[..., 1].astype(np.int64)


def decode_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Broden segmentation PNG as an int64 H x W map of label numbers.

    RGB(A) and palette PNGs decode as R + 256 * G; single-channel (L, I;16, I) PNGs are
    read as label numbers directly.  A lossy (JPEG) or floating-point mask, negative numbers or
    an unreadable file raise :class:`BrodenError` naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.format in ("JPEG", "MPO", "WEBP") or im.mode == "F":
                kind = "floating-point" if im.mode == "F" else f"lossy {im.format}"
                raise BrodenError(f"segmentation file {path} is a {kind} image, whose values are not exact label "
                                  "numbers; save label maps as PNG (label = R + 256 * G, see encode_labels)")
            if im.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.int64)
            else:
                rgb = im if im.mode in ("RGB", "RGBA") else im.convert("RGB")
                arr = decode_labels(np.asarray(rgb))
    except FileNotFoundError:
        raise BrodenError(f"segmentation file {path} is missing; {_REGENERATE}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).replace(f" {str(path)!r}", "").replace(f" {path}", "").splitlines()[0] if str(exc) else ""
        raise BrodenError(f"segmentation file {path} is corrupt or not a PNG ({reason or type(exc).__name__}); "
                          f"{_REGENERATE}") from None
    if arr.ndim != 2:
        raise BrodenError(f"segmentation file {path} decodes to shape {arr.shape}, not H x W; save it as an RGB or "
                          f"single-channel PNG, or {_REGENERATE}")
    if arr.size and arr.min() < 0:
        raise BrodenError(f"segmentation file {path} holds negative label numbers (min {arr.min()}); label numbers "
                          "are >= 0 (0 = unlabeled); fix the PNG")
    return arr


def same_extent(ih: int, iw: int, sh: int, sw: int) -> bool:
    """True when an ``sh x sw`` label map can cover an ``ih x iw`` image (one scale for both sides, up to rounding)."""
    return abs(sh * iw - sw * ih) < ih + iw  # each side rounded by less than one pixel


# --------------------------------------------------------------------------- atomic writes




def _atomic_write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"), fsync=False)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class BrodenSample:
    """One image with its labels, in memory, ready for :func:`save_sample`.

    ``name`` is the file stem relative to ``images/`` (e.g. ``"synth/000001"``); ``seg`` maps
    a pixel-level category to an H x W (or L x H x W) array of label numbers; ``image_labels``
    maps an image-level category to its label numbers.
    """

    name: str
    image: np.ndarray
    seg: Mapping[str, np.ndarray] = field(default_factory=dict)
    image_labels: Mapping[str, Sequence[int]] = field(default_factory=dict)
    split: str = "train"


@dataclass(frozen=True)
class BrodenRow:
    """One written ``index.csv`` row, plus per-category label coverage for label statistics.

    ``fields`` maps a category to its entries (PNG paths relative to ``images/`` or label
    numbers); ``coverage`` maps a category to {label: fraction of the image it covers}.
    """

    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    fields: Mapping[str, tuple[str | int, ...]]
    coverage: Mapping[str, Mapping[int, float]]


def _coverage_of(layers: np.ndarray) -> dict[int, float]:
    """Fraction of the image each nonzero label covers, summed over layers (as Broden counts)."""
    pixels = layers.shape[-2] * layers.shape[-1]
    counts = np.bincount(layers.reshape(-1))
    return {int(k): float(counts[k]) / pixels for k in np.flatnonzero(counts) if k > 0}


def save_sample(root: str | os.PathLike[str], sample: BrodenSample, image_format: str = "png") -> BrodenRow:
    """Write one sample's image and segmentation PNGs under ``root/images`` (atomically, per file).

    Files are named as Broden names them: ``<name>.<ext>``, ``<name>_<cat>.png`` for one layer,
    ``<name>_<cat>_<k>.png`` (k from 1) for several.  ``image_format`` is ``"png"`` (lossless,
    the default, so pixel values match the labels exactly) or ``"jpg"`` (as in real Broden).
    """
    if image_format not in ("png", "jpg"):
        raise BrodenError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    name = sample.name.strip("/")
    if not name or ".." in Path(name).parts:
        raise BrodenError(f"sample name {sample.name!r} must be a relative path inside images/, e.g. 'synth/000001'")
    image = np.asarray(sample.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BrodenError(f"sample {name}: image must be uint8 H x W x 3, got {image.dtype} {image.shape}")
    images_dir = Path(root) / "images"
    (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
    ih, iw = image.shape[:2]
    image_rel = f"{name}.{image_format}"
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    atomic_write_bytes(images_dir / image_rel, buf.getvalue(), fsync=False)

    fields: dict[str, tuple[str | int, ...]] = {}
    coverage: dict[str, dict[int, float]] = {}
    seg_shape: tuple[int, int] | None = None
    for cat, arr in sample.seg.items():
        layers = np.asarray(arr)
        if layers.ndim == 2:
            layers = layers[None]
        if layers.ndim != 3:
            raise BrodenError(f"sample {name}: seg[{cat!r}] must be H x W or L x H x W, got shape {layers.shape}")
        if seg_shape is None:
            seg_shape = (layers.shape[1], layers.shape[2])
        elif layers.shape[1:] != seg_shape:
            raise BrodenError(
                f"sample {name}: seg[{cat!r}] is {layers.shape[1:]} but another category is {seg_shape}; "
                "all segmentations of one image must share one size"
            )
        paths = []
        for k, layer in enumerate(layers):
            suffix = f"_{cat}.png" if len(layers) == 1 else f"_{cat}_{k + 1}.png"
            rel = f"{name}{suffix}"
            atomic_write_bytes(images_dir / rel, _png_bytes(encode_labels(layer)), fsync=False)
            paths.append(rel)
        fields[cat] = tuple(paths)
        coverage[cat] = _coverage_of(layers.astype(np.int64, copy=False))
    for cat, numbers in sample.image_labels.items():
        if cat in fields:
            raise BrodenError(f"sample {name}: category {cat!r} is given both as seg and as image_labels; pick one")
        nums = tuple(int(n) for n in numbers if int(n) != 0)
        fields[cat] = nums
        coverage[cat] = {n: 1.0 for n in nums}
    sh, sw = seg_shape if seg_shape is not None else (ih, iw)
    if not same_extent(ih, iw, sh, sw):
        raise BrodenError(f"sample {name}: segmentation {sh}x{sw} does not cover the {ih}x{iw} image (different "
                          "aspect ratio); give label maps at the image size or scaled by one factor")
    return BrodenRow(image_rel, sample.split, ih, iw, sh, sw, fields, coverage)


def write_broden(
    root: str | os.PathLike[str],
    rows: Iterable[BrodenRow | BrodenSample],
    labels: Mapping[int, str],
    categories: Mapping[str, Sequence[int]],
    syns: Mapping[int, Sequence[str]] | None = None,
) -> Path:
    """Write a Broden folder: ``index.csv``, ``label.csv``, ``category.csv`` and ``c_<cat>.csv``.

    ``rows`` are samples (written here with :func:`save_sample`) or rows already written;
    ``labels`` maps label number (>= 1; 0 is ``-``) to a unique name; ``categories`` maps each
    category, in column order, to the label numbers it may contain, in dense-code order
    (code 1 first).  Frequencies and coverages are counted from the rows.  Each CSV is
    written atomically, the index last, so a folder with an ``index.csv`` is complete.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = {int(k): str(v) for k, v in labels.items() if not (int(k) == 0 and v == "-")}
    _check_label_table(names, categories)
    cats = list(categories)
    allowed = {c: set(int(n) for n in categories[c]) for c in cats}
    freq: dict[tuple[int, str], int] = {}
    cover: dict[tuple[int, str], float] = {}
    index_rows: list[list[Any]] = []
    for item in rows:
        row = save_sample(root, item) if isinstance(item, BrodenSample) else item
        for cat in row.fields:
            if cat not in allowed:
                raise BrodenError(
                    f"image {row.image} has labels in category {cat!r}, which is not in categories "
                    f"({', '.join(cats)}); add it to categories"
                )
        for cat, cov in row.coverage.items():
            for num, frac in cov.items():
                if num not in allowed[cat]:
                    raise BrodenError(
                        f"image {row.image}: label {num} is not declared in category {cat!r}; add it to "
                        f"categories[{cat!r}] (and to labels)"
                    )
                freq[(num, cat)] = freq.get((num, cat), 0) + 1
                cover[(num, cat)] = cover.get((num, cat), 0.0) + frac
        index_rows.append(
            [row.image, row.split, row.ih, row.iw, row.sh, row.sw]
            + [";".join(str(e) for e in row.fields.get(cat, ())) for cat in cats]
        )

    label_rows = []
    for num in sorted(names):
        in_cats = [c for c in cats if num in allowed[c]]
        in_cats.sort(key=lambda c: -freq.get((num, c), 0))
        label_rows.append(
            [
                num,
                names[num],
                ";".join(f"{c}({freq.get((num, c), 0)})" for c in in_cats),
                sum(freq.get((num, c), 0) for c in in_cats),
                f"{sum(cover.get((num, c), 0.0) for c in in_cats):f}",
                ";".join(s for s in (syns or {}).get(num, ()) if s != names[num]),
            ]
        )
    _atomic_write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)
    cat_rows = []
    for cat in cats:
        nums = [int(n) for n in categories[cat]]
        cat_rows.append([cat, min(nums), max(nums), len(nums), sum(freq.get((n, cat), 0) for n in nums)])
        _atomic_write_csv(
            root / f"c_{cat}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [
                [code, n, names[n], freq.get((n, cat), 0), f"{cover.get((n, cat), 0.0):f}"]
                for code, n in enumerate(nums, start=1)
            ],
        )
    _atomic_write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], cat_rows)
    _atomic_write_csv(root / "index.csv", list(META_COLUMNS) + cats, index_rows)
    return root


def _check_label_table(names: Mapping[int, str], categories: Mapping[str, Sequence[int]]) -> None:
    if not categories:
        raise BrodenError("categories is empty; give at least one category with its label numbers")
    seen: dict[str, int] = {}
    for num, name in names.items():
        if num < 1 or num > MAX_LABEL:
            raise BrodenError(f"label number {num} ({name!r}) must lie in 1..{MAX_LABEL}; 0 is reserved for '-'")
        if not name or name in seen:
            raise BrodenError(
                f"label name {name!r} of {num} is empty or also used by {seen.get(name)}; names must be unique"
            )
        seen[name] = num
    member: set[int] = set()
    for cat, nums in categories.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", cat) or cat in META_COLUMNS:
            raise BrodenError(f"category name {cat!r} must be a word (letters, digits, _ or -) and not a meta column")
        if not nums:
            raise BrodenError(f"category {cat!r} has no labels; give it at least one label number")
        for n in nums:
            if int(n) not in names:
                raise BrodenError(f"category {cat!r} lists label {n}, which is not in labels; add it to labels")
            member.add(int(n))
    orphans = sorted(set(names) - member)
    if orphans:
        raise BrodenError(f"labels {orphans[:10]} belong to no category; list each label in at least one category")


def write_targets(root: str | os.PathLike[str], targets: Iterable[tuple[str, str, int]]) -> Path:
    """Write ``target.csv`` (``image,category,label``): each image's target object (convscope)."""
    path = Path(root) / TARGET_FILE
    _atomic_write_csv(path, ["image", "category", "label"], ([i, c, int(n)] for i, c, n in targets))
    return path


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Label:
    """One row of ``label.csv``: ``category`` is the primary category (most images)."""

    number: int
    name: str
    category: str
    categories: Mapping[str, int]
    frequency: int = 0
    coverage: float = 0.0
    syns: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Row:
    line: int
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    fields: Mapping[str, tuple[str | int, ...]]


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a CSV file; DataError on a missing file or bad row."""
    if not path.is_file():
        raise BrodenError(
            f"{path} is missing: a Broden folder holds index.csv, category.csv, label.csv and c_<category>.csv; "
            f"check the path, or {_REGENERATE}"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise BrodenError(f"{path} is empty; it needs the header {','.join(required)}; {_REGENERATE}")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise BrodenError(
                    f"{path} line 1: header lacks column(s) {', '.join(missing)} (has {','.join(header)}); "
                    f"fix the header, or {_REGENERATE}"
                )
            rows = []
            for rec in reader:
                if not rec or all(not c.strip() for c in rec):
                    continue
                if len(rec) != len(header):
                    raise BrodenError(
                        f"{path} line {reader.line_num}: {len(rec)} fields but the header has {len(header)} "
                        f"({','.join(header)}); fix that row (quote fields containing commas), or {_REGENERATE}"
                    )
                rows.append((reader.line_num, dict(zip(header, (c.strip() for c in rec)))))
    except UnicodeDecodeError as exc:
        raise BrodenError(f"{path} is not UTF-8 text ({exc}); re-save it as UTF-8") from None
    except csv.Error as exc:
        raise BrodenError(f"{path}: malformed CSV ({exc}); fix the quoting, or {_REGENERATE}") from None
    return header, rows


def _int(value: str, path: Path, line: int, column: str, minimum: int = 0) -> int:
    try:
        out = int(value)
    except ValueError:
        raise BrodenError(
            f"{path} line {line}: column {column!r} must be an integer >= {minimum}, got {value!r}; fix that row"
        ) from None
    if out < minimum:
        raise BrodenError(f"{path} line {line}: column {column!r} must be >= {minimum}, got {out}; fix that row")
    return out


def _float(value: str, path: Path, line: int, column: str) -> float:
    if value == "":
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise BrodenError(
            f"{path} line {line}: column {column!r} must be a number, got {value!r}; fix that row"
        ) from None


_CAT_ENTRY = re.compile(r"^([A-Za-z0-9_\-]+)\s*(?:\((\d+)\))?$")
_NUMBER = re.compile(r"^\d+$")


def _size_pair(size: int | tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise BrodenError(f"{what} must be a positive int or a (height, width) pair, got {size!r}")
    return (int(pair[0]), int(pair[1]))


class BrodenDataset:
    """A Broden-layout folder as a map-style dataset (works with ``torch.utils.data.DataLoader``).

    ``categories`` selects categories (default: all in ``category.csv``); ``split`` keeps rows of
    one split (``"train"``, ``"val"``); ``size`` resizes images (bilinear) and ``seg_size`` label
    maps (nearest), each an int or (h, w).  Item ``i`` is a dict with ``image`` (uint8 H x W x 3),
    ``image_path``, ``split``, ``index``, ``seg`` ({pixel category: int64 L x h x w label numbers,
    L >= 0}) and ``labels_image_level`` ({image-level category: list of label numbers, 0 dropped}).
    A category is image-level when its fields hold only bare numbers (in any split), else
    pixel-level (bare numbers among PNGs become whole-image layers, as in NetDissect).  Everything but PNG
    contents is validated on open; PNG contents are checked when read.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        categories: Sequence[str] | None = None,
        split: str | None = None,
        size: int | tuple[int, int] | None = None,
        seg_size: int | tuple[int, int] | None = None,
        check_files: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BrodenError(f"Broden folder {self.root} does not exist; check the path, or {_REGENERATE}")
        self.images_dir = self.root / "images"
        self.size = _size_pair(size, "size")
        self.seg_size = _size_pair(seg_size, "seg_size")

        all_categories = self._read_categories()
        if categories is None:
            self.categories: list[str] = list(all_categories)
        else:
            self.categories = []
            for c in categories:
                if c not in all_categories:
                    hint = closest(c, all_categories)
                    raise BrodenError(
                        f"category {c!r} is not in {self.root / 'category.csv'} (has {', '.join(all_categories)})"
                        + (f"; did you mean {', '.join(hint)}?" if hint else "")
                    )
                if c not in self.categories:
                    self.categories.append(c)
        self.labels: list[Label] = self._read_labels()
        self._known = np.zeros(len(self.labels), dtype=bool)
        for lab in self.labels:
            self._known[lab.number] = lab.number == 0 or bool(lab.name)
        self.label_names: list[str] = [lab.name for lab in self.labels]
        self.category_of_label: list[str] = [lab.category for lab in self.labels]
        self.category_labels: dict[str, list[int]] = {c: self._read_codes(c) for c in self.categories}

        rows = self._read_index()
        self.splits: list[str] = sorted({r.split for r in rows})
        # image-level: only bare numbers, in any row of any split; a category with no entries at all
        # counts as pixel-level (Broden's usual kind), so it yields empty L=0 stacks
        image_level = {
            c
            for c in self.categories
            if any(r.fields[c] for r in rows) and all(isinstance(e, int) for r in rows for e in r.fields[c])
        }
        self.pixel_categories: list[str] = [c for c in self.categories if c not in image_level]
        self.image_categories: list[str] = [c for c in self.categories if c in image_level]
        if split is not None:
            if split not in self.splits:
                raise BrodenError(
                    f"split {split!r} is not in {self.root / 'index.csv'} (splits: {', '.join(self.splits)}); "
                    "pass one of those or split=None"
                )
            rows = [r for r in rows if r.split == split]
        self.split = split
        self._rows: list[_Row] = rows
        if check_files:
            self._check_files()
        self._targets = self._read_targets()

    # ---------------------------------------------------------------- parsing

    def _read_categories(self) -> list[str]:
        path = self.root / "category.csv"
        _, rows = _read_csv(path, ["name"])
        names: list[str] = []
        for line, row in rows:
            name = row["name"]
            if not name or name in META_COLUMNS or name in names:
                raise BrodenError(
                    f"{path} line {line}: category name {name!r} is empty, reserved or repeated; fix that row"
                )
            names.append(name)
        if not names:
            raise BrodenError(f"{path} lists no categories; add rows name,first,last,count,frequency")
        return names

    def _read_labels(self) -> list[Label]:
        path = self.root / "label.csv"
        header, rows = _read_csv(path, ["number", "name", "category"])
        by_number: dict[int, Label] = {}
        for line, row in rows:
            num = _int(row["number"], path, line, "number")
            if num > MAX_LABEL:
                raise BrodenError(f"{path} line {line}: label number {num} exceeds {MAX_LABEL}; fix that row")
            if num in by_number:
                raise BrodenError(
                    f"{path} line {line}: label number {num} is repeated (first at another row); fix that row"
                )
            cats: dict[str, int] = {}
            for part in filter(None, (p.strip() for p in row["category"].split(";"))):
                m = _CAT_ENTRY.match(part)
                if m is None:
                    raise BrodenError(
                        f"{path} line {line}: category entry {part!r} should read like 'object(45)'; fix that row"
                    )
                cats[m.group(1).strip()] = int(m.group(2) or 0)
            chosen = {c: n for c, n in cats.items() if c in self.categories} or cats
            primary = max(chosen, key=lambda c: chosen[c]) if chosen else ""
            by_number[num] = Label(
                number=num,
                name=row["name"] if num else "-",
                category=primary,
                categories=cats,
                frequency=_int(row["frequency"], path, line, "frequency") if row.get("frequency") else 0,
                coverage=_float(row.get("coverage", ""), path, line, "coverage"),
                syns=tuple(s for s in row.get("syns", "").split(";") if s),
            )
        if not by_number or max(by_number) == 0:
            raise BrodenError(f"{path} lists no labels; {_REGENERATE}")
        by_number.setdefault(0, Label(0, "-", "", {}))
        return [by_number.get(n, Label(n, "", "", {})) for n in range(max(by_number) + 1)]

    def _read_codes(self, category: str) -> list[int]:
        path = self.root / f"c_{category}.csv"
        _, rows = _read_csv(path, ["code", "number"])
        numbers: list[tuple[int, int]] = []
        for line, row in rows:
            code = _int(row["code"], path, line, "code")
            num = _int(row["number"], path, line, "number")
            if not self._is_known(num):
                raise BrodenError(
                    f"{path} line {line}: label number {num} is not in {self.root / 'label.csv'}; "
                    f"add it there or fix that row"
                )
            numbers.append((code, num))
        return [n for _, n in sorted(numbers) if n != 0]

    def _is_known(self, num: int) -> bool:
        return 0 <= num < len(self._known) and bool(self._known[num])

    def _read_index(self) -> list[_Row]:
        path = self.root / "index.csv"
        header, rows = _read_csv(path, list(META_COLUMNS))
        missing = [c for c in self.categories if c not in header]
        if missing:
            raise BrodenError(
                f"{path} line 1: no column for category {', '.join(missing)} listed in category.csv; "
                f"add the column(s) or drop them from category.csv / categories="
            )
        out: list[_Row] = []
        for line, row in rows:
            if not row["image"]:
                raise BrodenError(f"{path} line {line}: empty image path; fix or delete that row")
            ih, iw, sh, sw = (_int(row[c], path, line, c, minimum=1) for c in ("ih", "iw", "sh", "sw"))
            if not same_extent(ih, iw, sh, sw):
                raise BrodenError(
                    f"{path} line {line}: segmentation size sh={sh}, sw={sw} does not cover the image "
                    f"ih={ih}, iw={iw} (different aspect ratio); fix sh/sw (or ih/iw) in that row"
                )
            fields: dict[str, tuple[str | int, ...]] = {}
            for cat in self.categories:
                entries: list[str | int] = []
                for e in filter(None, (p.strip() for p in row[cat].split(";"))):
                    if _NUMBER.match(e):
                        num = int(e)
                        if not self._is_known(num):
                            raise BrodenError(
                                f"{path} line {line}: {cat} label {num} is not in {self.root / 'label.csv'}; "
                                "add it there or fix that row"
                            )
                        entries.append(num)
                    else:
                        entries.append(e)
                fields[cat] = tuple(entries)
            out.append(_Row(line, row["image"], row["split"], ih, iw, sh, sw, fields=fields))
        if not out:
            raise BrodenError(f"{path} has no image rows; {_REGENERATE}")
        return out

    def _check_files(self) -> None:
        index = self.root / "index.csv"
        for r in self._rows:
            for rel in (r.image, *(e for c in self.categories for e in r.fields[c] if isinstance(e, str))):
                if not (self.images_dir / rel).is_file():
                    raise BrodenError(
                        f"{index} line {r.line}: file {self.images_dir / rel} is missing; restore it, "
                        f"delete that row, or {_REGENERATE}"
                    )

    def _read_targets(self) -> list[tuple[str, int] | None] | None:
        path = self.root / TARGET_FILE
        if not path.is_file():
            return None
        _, rows = _read_csv(path, ["image", "category", "label"])
        by_image: dict[str, tuple[str, int]] = {}
        for line, row in rows:
            num = _int(row["label"], path, line, "label")
            if not self._is_known(num):
                raise BrodenError(f"{path} line {line}: label {num} is not in label.csv; fix that row")
            by_image[row["image"]] = (row["category"], num)
        return [by_image.get(r.image) for r in self._rows]

    # ---------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (
            f"BrodenDataset({str(self.root)!r}, {len(self)} images, split={self.split!r}, "
            f"pixel={self.pixel_categories}, image_level={self.image_categories}, {len(self.labels) - 1} labels)"
        )

    def _pos(self, i: int) -> int:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return i % len(self)

    def _row(self, i: int) -> _Row:
        return self._rows[self._pos(i)]

    def image_path(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self.images_dir / self._row(i).image

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 H x W x 3 (resized to ``size`` if given)."""
        path = self.image_path(i)
        row = self._row(i)
        try:
            with Image.open(path) as im:
                if im.size != (row.iw, row.ih):
                    raise BrodenError(
                        f"image {path} is {im.height}x{im.width} but index.csv line {row.line} says ih={row.ih}, "
                        f"iw={row.iw}; fix ih/iw (and sh/sw) in that row or replace the image"
                    )
                rgb = im.convert("RGB")
                if self.size is not None and rgb.size != (self.size[1], self.size[0]):
                    rgb = rgb.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                return np.asarray(rgb)
        except FileNotFoundError:
            raise BrodenError(f"image {path} (index.csv line {self._row(i).line}) is missing; {_REGENERATE}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            reason = str(exc).replace(f" {str(path)!r}", "").splitlines()[0] if str(exc) else type(exc).__name__
            raise BrodenError(
                f"image {path} (index.csv line {row.line}) is corrupt or not an image ({reason}); replace it, "
                f"delete that row, or {_REGENERATE}"
            ) from None

    def load_seg(self, i: int, category: str) -> np.ndarray:
        """Label numbers of pixel category ``category`` for image ``i``: int64 L x h x w (L may be 0)."""
        row = self._row(i)
        if category not in row.fields:
            raise BrodenError(f"category {category!r} is not loaded (categories: {', '.join(self.categories)})")
        h, w = row.sh, row.sw
        layers = []
        for e in row.fields[category]:
            if isinstance(e, int):
                layers.append(np.full((h, w), e, dtype=np.int64))
                continue
            path = self.images_dir / e
            arr = decode_label_png(path)
            if arr.shape != (h, w):
                raise BrodenError(
                    f"segmentation file {path} is {arr.shape[0]}x{arr.shape[1]} but index.csv line {row.line} says "
                    f"sh={h}, sw={w} (image {row.ih}x{row.iw}); resize the mask to {h}x{w} (nearest neighbour) or "
                    "fix sh/sw"
                )
            if arr.size and (arr.max() >= len(self._known) or not self._known[arr].all()):
                bad = sorted({int(v) for v in np.unique(arr) if not self._is_known(int(v))})
                raise BrodenError(
                    f"{path} (index.csv line {row.line}) holds label number(s) {bad[:10]} not in "
                    f"{self.root / 'label.csv'}; add them to label.csv or fix the PNG"
                )
            layers.append(arr)
        out = np.stack(layers) if layers else np.zeros((0, h, w), dtype=np.int64)
        if self.seg_size is not None and out.shape[1:] != self.seg_size:
            ys = ((np.arange(self.seg_size[0]) + 0.5) * h / self.seg_size[0]).astype(np.int64)
            xs = ((np.arange(self.seg_size[1]) + 0.5) * w / self.seg_size[1]).astype(np.int64)
            out = out[:, ys][:, :, xs]
        return out

    def image_labels(self, i: int, category: str) -> list[int]:
        """Image-level label numbers of ``category`` for image ``i`` (0, unlabeled, dropped)."""
        row = self._row(i)
        if category not in row.fields:
            raise BrodenError(f"category {category!r} is not loaded (categories: {', '.join(self.categories)})")
        return [e for e in row.fields[category] if isinstance(e, int) and e != 0]

    def target(self, i: int) -> tuple[str, int] | None:
        """(category, label) of image ``i``'s target object from ``target.csv``, or None."""
        pos = self._pos(i)
        return None if self._targets is None else self._targets[pos]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._pos(i)
        row = self._rows[i]
        return {
            "image": self.load_image(i),
            "image_path": str(self.images_dir / row.image),
            "split": row.split,
            "index": i,
            "seg": {c: self.load_seg(i, c) for c in self.pixel_categories},
            "labels_image_level": {c: self.image_labels(i, c) for c in self.image_categories},
        }

    def label_number(self, name: str, category: str | None = None) -> int:
        """The number of the label called ``name`` (restricted to ``category`` if given)."""
        for lab in self.labels:
            if lab.name == name and (category is None or category in lab.categories):
                return lab.number
        hint = closest(name, [lab.name for lab in self.labels if lab.name])
        raise BrodenError(
            f"no label {name!r}"
            + (f" in category {category!r}" if category else "")
            + f" in {self.root / 'label.csv'}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )


def broden_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch :class:`BrodenDataset` items for a DataLoader (``collate_fn=broden_collate``).

    Returns ``images`` (float N x 3 x H x W in [0, 1]), ``seg`` ({category: int64 N x L x h x w,
    padded with label 0 to the batch's largest L}), ``labels_image_level`` ({category: list of
    lists}), ``image_path``, ``split`` and ``index`` (int64 N).
    """
    import torch

    if not items:
        raise BrodenError("cannot collate an empty batch")
    shapes = {np.shape(it["image"]) for it in items}
    if len(shapes) != 1:
        raise BrodenError(f"images in one batch differ in size {sorted(shapes)}; open the dataset with size=")
    images = torch.from_numpy(np.stack([np.asarray(it["image"]) for it in items]))
    images = images.permute(0, 3, 1, 2).float().div_(255.0)
    seg: dict[str, torch.Tensor] = {}
    for cat in items[0]["seg"]:
        arrs = [np.asarray(it["seg"][cat]) for it in items]
        hw = {a.shape[1:] for a in arrs}
        if len(hw) != 1:
            raise BrodenError(
                f"{cat} label maps differ in size {sorted(hw)} within a batch; open the dataset with seg_size="
            )
        depth = max(a.shape[0] for a in arrs)
        out = torch.zeros((len(arrs), depth, *next(iter(hw))), dtype=torch.int64)
        for k, a in enumerate(arrs):
            out[k, : a.shape[0]] = torch.from_numpy(a.astype(np.int64, copy=False))
        seg[cat] = out
    return {
        "images": images,
        "seg": seg,
        "labels_image_level": {
            c: [list(it["labels_image_level"][c]) for it in items] for c in items[0]["labels_image_level"]
        },
        "image_path": [it["image_path"] for it in items],
        "split": [it["split"] for it in items],
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.int64),
    }
