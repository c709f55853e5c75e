"""Load images robustly, preprocess them for a model, and map tensors back to pixels."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import struct
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from convscope.errors import ConvscopeError, ImageLoadError, closest

from .model import declared_preprocess
from .preprocess import Preprocess

__all__ = [
    "IMAGE_EXTENSIONS",
    "PHOTO_NAMES",
    "TEXTURE_NAMES",
    "Preprocess",
    "load_image",
    "load_images",
    "sample_image",
    "sample_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
DEFAULT_MAX_PIXELS = 178_956_970  # 2x PIL's default warning limit

PathLike = str | Path


# --------------------------------------------------------------------------- load_image

_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit_at_least(max_pixels: int) -> Iterator[None]:
    """Let PIL open images up to ``max_pixels`` (our own check enforces the limit); restore after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None or 2 * limit >= max_pixels:
            yield
            return
        with _PIL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def _check_file(p: Path) -> None:
    """Raise ImageLoadError for a missing path, a directory or an empty file."""
    if not p.exists():
        raise ImageLoadError(f"{p}: no such file; check the path (it is relative to {Path.cwd()}).")
    if p.is_dir():
        raise ImageLoadError(f"{p}: is a directory; pass an image file, or the folder to load_images().")
    if p.stat().st_size == 0:
        raise ImageLoadError(f"{p}: the file is empty (0 bytes); re-download or re-export it.")


class ImageDecodeError(ImageLoadError):
    """:func:`decode_rgb` failed; ``reason`` is ``"format"`` (not an image format we read), ``"pixels"`` (more
    than ``max_pixels``: ``pixels`` holds the count, or 0 when PIL refused it first) or ``"corrupt"``."""

    def __init__(self, reason: str, detail: str, pixels: int = 0) -> None:
        super().__init__(detail)
        self.reason, self.pixels = reason, pixels


def decode_rgb(source: PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: Collection[str] | None = None, draft: int | None = None,
               min_side: int | None = None) -> Image.Image:
    """Decode a file or binary stream to an 8-bit RGB PIL image, EXIF orientation applied, refusing more than
    ``max_pixels`` pixels before decoding (decompression bombs). ``formats`` limits the PIL formats tried;
    ``draft`` lets JPEG decoding scale down by 2/4/8 while both sides stay >= ``draft``.

    ``min_side``: reduce the picture while decoding by the largest integer factor that keeps its shorter side
    >= ``min_side`` (JPEG in the decoder through ``draft``, then every format by box averaging, converted strip by
    strip so no full-size RGB copy is ever made): a 40-megapixel PNG costs its own decode buffer, not 3-5 copies.

    Transparency is composited on white, 16-bit images are scaled to 8 bits, grayscale and CMYK become RGB.
    Raises :class:`ImageDecodeError` (callers word the message for their setting: a file, an upload).
    """
    if min_side is not None and (not isinstance(min_side, int) or min_side < 1):
        raise ConvscopeError(f"decode_rgb(min_side={min_side!r}): use a positive int (or None: full size)")
    draft = draft or min_side
    try:
        if formats is not None:
            Image.init()  # register every plugin, so formats are known by name
            formats = sorted(set(formats) & set(Image.OPEN))
        with _pil_limit_at_least(max_pixels), Image.open(source, formats=formats) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageDecodeError("pixels", f"{w}x{h} = {w * h} pixels", w * h)
            if draft and im.format in ("JPEG", "MPO"):
                im.draft("RGB", (draft, draft))
            im.load()
            factor = min(im.size) // min_side if min_side else 1
            if factor < 2:
                return _to_rgb(ImageOps.exif_transpose(im))
            method = _ORIENTATION.get(im.getexif().get(0x0112, 1))
            small = _reduced_rgb(im, factor)
            return small.transpose(method) if method is not None else small
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError("format", str(e)) from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("pixels", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageDecodeError("corrupt", str(e)) from e


# EXIF orientation -> the transpose that undoes it (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_STRIP_PIXELS = 2_000_000  # pixels converted to RGB at a time while reducing


def _reduced_rgb(im: Image.Image, factor: int) -> Image.Image:
    """A loaded image reduced ``factor`` times (box average) as 8-bit RGB, as ``_to_rgb(im).reduce(factor)``
    but without a full-size converted copy: plain RGB / L reduce directly, 32-bit modes reduce before their
    (range-dependent) scaling, every other mode is converted and reduced in horizontal strips."""
    if (im.mode in ("RGB", "L") and "transparency" not in im.info) or im.mode in ("I", "F"):
        return _to_rgb(im.reduce(factor))
    w, h = im.size
    colours = None
    if im.mode == "P":  # each index's final colour (transparency over white included), once: one pass a strip
        index = Image.frombytes("P", (256, 1), bytes(range(256)))
        mode = im.palette.mode if im.palette is not None else "RGB"
        index.putpalette(im.getpalette(mode) or [v for i in range(256) for v in (i, i, i)], mode)
        index.info = dict(im.info)
        colours = _to_rgb(index).tobytes()
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    rows = max(factor, _STRIP_PIXELS // max(1, w) // factor * factor)
    for top in range(0, h, rows):
        strip = im.crop((0, top, w, min(h, top + rows)))
        if colours is not None:
            strip.putpalette(colours, "RGB")
            strip.info.pop("transparency", None)
        strip = _to_rgb(strip)
        out.paste(strip.reduce(factor), (0, top // factor))
        del strip
    return out


def load_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image, EXIF orientation applied.

    Reads JPEG, PNG, WebP, BMP, GIF (first frame) and TIFF. Transparency is composited on white,
    16-bit images are scaled to 8 bits, grayscale and CMYK become RGB. Every failure (missing,
    empty, not an image, corrupt, truncated, more than ``max_pixels`` pixels) raises
    :class:`ImageLoadError` naming the file.
    """
    p = Path(path)
    _check_file(p)
    try:
        return decode_rgb(p, max_pixels)
    except ImageDecodeError as e:
        if e.reason == "format":
            msg = f"{p}: not an image file PIL can read; use JPEG, PNG, WebP, BMP, GIF or TIFF."
        elif e.reason == "pixels" and e.pixels:
            msg = (f"{p}: {e} is more than max_pixels={max_pixels} (a guard against decompression bombs); if you "
                   f"trust the file, pass max_pixels={e.pixels} or more.")
        elif e.reason == "pixels":
            msg = f"{p}: too many pixels ({e}); if you trust the file, pass a larger max_pixels."
        else:
            msg = f"{p}: the image is corrupt or truncated ({e}); re-download or re-export the file."
        raise ImageLoadError(msg) from e


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha over white, 16-bit scaled, CMYK converted)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit / 32-bit integer or float image to uint8 (65535 -> 255, not clipped)."""
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    else:  # values of unknown range: stretch min..max to 0..255
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- load_images

ImageTransform = Callable[[Image.Image], torch.Tensor]


SAMPLE_PREFIX = "sample:"


def expand_inputs(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Every image an argument list names, in order: files, folders (their sorted image files) and
    ``sample:NAME`` (a bundled photo, ``sample:all`` for all of them). Every command and ``load_images`` use it."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ConvscopeError("no images given; pass an image file, a folder of images or sample:chelsea "
                             "(`convscope samples` lists the bundled photos).")
    out: list[Path] = []
    for item in items:
        text = str(item)
        if isinstance(item, str) and text.startswith(SAMPLE_PREFIX):
            name = text[len(SAMPLE_PREFIX):]
            if name == "all":
                found = sample_images()
                photos = [found[n] for n in PHOTO_NAMES if n in found]
                if not photos:
                    raise ConvscopeError("sample:all: no bundled photos found (they ship with scikit-image and "
                                         "scikit-learn); pip install scikit-image scikit-learn, or pass image files")
                out.extend(photos)
            else:
                out.append(sample_image(name))
            continue
        p = Path(item)
        if p.is_dir():
            found_files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found_files:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise ImageLoadError(f"{p}: the folder holds no image files ({exts}); check the path.")
            out.extend(found_files)
        elif not p.exists():
            hint = (f" For a bundled photo write sample:{p.stem}." if p.stem in (*PHOTO_NAMES, *TEXTURE_NAMES)
                    else "")
            raise ImageLoadError(f"{p}: no such file or folder; check the path (`convscope samples` lists the "
                                 f"bundled photos, usable as sample:NAME).{hint}")
        else:
            out.append(p)
    return out


def image_name(path: PathLike, samples: dict[Path, str] | None = None) -> str:
    """A short display name for an image: the sample's name for a bundled photo, else the file's stem.
    ``samples`` (file -> sample name) saves looking the bundled files up again for every image."""
    p = Path(path)
    if samples is None:
        samples = {f: name for name, f in sample_images().items()}
    return samples.get(p, p.stem)


def unique_names(paths: Sequence[PathLike]) -> list[str]:
    """One distinct, file-name-safe name per image (``a``, ``a_2``, ...), so outputs named after inputs never
    overwrite each other when two folders hold files of the same name."""
    seen: set[str] = set()
    out: list[str] = []
    samples = {f: name for name, f in sample_images().items()}  # looked up once, not per image
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", image_name(p, samples)).strip("._") or "image"
        name, i = base, 1
        while name in seen:
            i += 1
            name = f"{base}_{i}"
        seen.add(name)
        out.append(name)
    return out


def _resolve_preprocess(obj: Any) -> ImageTransform:
    """A Preprocess, a model's ``.preprocess``, a callable, or identity for None / a bare module."""
    if obj is None or isinstance(obj, Preprocess):
        return obj or Preprocess.identity()
    pre = declared_preprocess(obj)
    if pre is not None:
        if not callable(pre):
            raise ConvscopeError(f"{type(obj).__name__}.preprocess is not callable; set it to a Preprocess.")
        return pre
    if isinstance(obj, torch.nn.Module):
        return Preprocess.identity()
    if callable(obj):
        return obj
    raise ConvscopeError(
        f"load_images() got {type(obj).__name__} as model_or_preprocess; pass a model, a Preprocess or None."
    )


def load_images(
    paths: PathLike | Sequence[PathLike],
    model_or_preprocess: Any = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Load image files (or folders of them) into one ``N x C x H x W`` tensor.

    Uses ``model.preprocess`` when given a model, the Preprocess when given one, else RGB in
    [0, 1] at the images' own size (no silent ImageNet normalization).
    """
    pre = _resolve_preprocess(model_or_preprocess)
    files = expand_inputs(paths)
    tensors = [pre(load_image(f, max_pixels=max_pixels)) for f in files]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        sizes = ", ".join(f"{f.name}: {t.shape[-1]}x{t.shape[-2]}" for f, t in zip(files, tensors))
        raise ConvscopeError(
            f"The images have different sizes ({sizes}); pass a preprocess with a crop, "
            f"e.g. load_images(paths, Preprocess(resize=224, crop=224))."
        )
    return torch.stack(tensors)


# --------------------------------------------------------------------------- bundled samples

_SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
_SKLEARN_FILES = {"china": "china.jpg", "flower": "flower.jpg"}
_TEXTURE_FILES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png"}
# skimage's horse.png is a binary silhouette, not a photo, so it is not offered.

PHOTO_NAMES: tuple[str, ...] = (*_SKIMAGE_FILES, *_SKLEARN_FILES)
TEXTURE_NAMES: tuple[str, ...] = tuple(_TEXTURE_FILES)


def _package_dir(name: str) -> Path | None:
    """Install folder of a package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_images() -> dict[str, Path]:
    """Sample photos and textures shipped with scikit-image / scikit-learn: name -> file path."""
    sources = [
        ("skimage", ("data",), _SKIMAGE_FILES),
        ("sklearn", ("datasets", "images"), _SKLEARN_FILES),
        ("skimage", ("data",), _TEXTURE_FILES),
    ]
    found: dict[str, Path] = {}
    for package, sub, files in sources:
        root = _package_dir(package)
        if root is None:
            continue
        for name, fname in files.items():
            f = root.joinpath(*sub, fname)
            if f.is_file():
                found[name] = f
    return found


def sample_image(name: str) -> Path:
    """Path of one bundled sample image (see ``PHOTO_NAMES`` and ``TEXTURE_NAMES``)."""
    valid = (*PHOTO_NAMES, *TEXTURE_NAMES)
    if name not in valid:
        near = closest(name, valid)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConvscopeError(f"Unknown sample image {name!r}; valid names: {', '.join(valid)}.{hint}")
    found = sample_images()
    if name not in found:
        pkg = "scikit-learn" if name in _SKLEARN_FILES else "scikit-image"
        raise ConvscopeError(f"Sample image {name!r} ships with {pkg}; install it: pip install {pkg}.")
    return found[name]
