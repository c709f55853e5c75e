"""Uploaded pictures: decode and check bytes from the network, and keep them in a bounded in-memory LRU.

Every image is stored already resized and centre-cropped to the model's input (what the model sees, and what the
page shows beside the maps), as a small RGB PIL image; the page refers to it by an opaque id.

Decoding is bounded (:class:`Decoder`): a few decodes at once, each reduced while it decodes to a few times the
model's input side, a pixel limit sized for the model, and memory handed back to the OS after a burst of large
pictures (a 37 KB PNG can hold 40 megapixels: 120 MB as RGB).
"""

from __future__ import annotations

import io
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..core.device import release_memory
from ..core.images import ImageDecodeError, Preprocess, decode_rgb
from ..errors import ConvscopeError

__all__ = ["ALLOWED_FORMATS", "Decoder", "ImageStore", "StoredImage", "UnknownImage", "UploadError", "decode_image",
           "pixel_limit", "release_memory", "shown"]

# What PIL may decode from an upload (no PDF, EPS/PostScript, SVG or other formats with a larger attack surface).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def shown(text: str, limit: int = 40) -> str:
    """``repr`` of a client-sent name for an error message, cut to about ``limit`` characters (messages stay one
    short line whatever a client sends)."""
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


class UploadError(ConvscopeError):
    """An upload the server refuses; ``status`` is the HTTP status it maps to (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UnknownImage(ConvscopeError):
    """An image id the server does not hold (never uploaded, or evicted from the LRU)."""


def decode_image(data: bytes, content_type: str | None = None, max_pixels: int = 40_000_000,
                 draft: int | None = None, min_side: int | None = None) -> Image.Image:
    """Bytes of an uploaded picture -> 8-bit RGB PIL image, EXIF orientation applied.

    Raises :class:`UploadError`: 415 for a declared type that is not an image or bytes that are no image format
    we read, 400 for a corrupt or truncated image, 413 for more than ``max_pixels`` pixels (decompression bombs).
    ``draft``: let JPEG decoding scale down by 2/4/8 while both sides stay >= ``draft``; ``min_side``: reduce any
    format while decoding, keeping the shorter side >= ``min_side`` (see :func:`convscope.core.images.decode_rgb`;
    the model sees a resized crop anyway).
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise UploadError(f"expected an image (JPEG, PNG, WebP, BMP, GIF or TIFF), got content type {ctype!r}; "
                          "upload a picture file", 415)
    if not data:
        raise UploadError("the upload is empty (0 bytes); choose a picture file", 400)
    try:
        return decode_rgb(io.BytesIO(data), max_pixels, formats=ALLOWED_FORMATS, draft=draft, min_side=min_side)
    except ImageDecodeError as e:
        if e.reason == "format":
            raise UploadError("the upload is not a picture this server reads; use JPEG, PNG, WebP, BMP, GIF or "
                              "TIFF", 415) from e
        if e.reason == "pixels" and e.pixels:
            raise UploadError(f"the image has {e}, more than this server's limit of {max_pixels} "
                              f"({max_pixels / 1e6:.1f} megapixels); downscale it to fit and upload again", 413) from e
        if e.reason == "pixels":
            raise UploadError(f"the image has too many pixels ({e}); downscale it first", 413) from e
        raise UploadError(f"the image is corrupt or truncated ({e}); re-export it and upload again", 400) from e


# --------------------------------------------------------------------------- bounded decoding

PIXELS_PER_SIDE = 32  # default pixel limit: (32 x the model's side)^2 ...
MIN_PIXEL_LIMIT = 16_000_000  # ... but never below a phone photo ...
MAX_PIXEL_LIMIT = 40_000_000  # ... nor above 40 megapixels (160 MB decoded as RGBA)


def pixel_limit(side: int) -> int:
    """The default largest upload (pixels) for a model that sees pictures resized to ``side``: ``(32 * side)^2``
    held between 16 and 40 megapixels (everything above is reduced away before the model sees it)."""
    return int(min(MAX_PIXEL_LIMIT, max(MIN_PIXEL_LIMIT, (PIXELS_PER_SIDE * side) ** 2)))


def _declared_pixels(data: bytes) -> int:
    """Width x height from an image's header (0 when PIL cannot read it: :func:`decode_image` reports that)."""
    try:
        Image.init()
        with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS & set(Image.OPEN))) as im:
            return int(im.width) * int(im.height)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
            IndexError, TypeError):
        return 0


class Decoder:
    """Decodes uploads for a model that sees pictures resized to ``side``, with bounded memory: at most ``slots``
    decodes run at once (others wait), each is reduced while it decodes to a shorter side of
    ``oversample * side`` .. twice that, pictures over ``max_pixels`` (default :func:`pixel_limit`) are refused
    with 413, and after a picture of ``trim_pixels`` or more the freed memory is handed back to the OS
    (``malloc_trim``; a full ``gc.collect()`` too when no other decode is in flight, at most every
    ``collect_every_s`` seconds, as it costs ~0.25 s with torch loaded)."""

    def __init__(self, side: int, max_pixels: int | None = None, slots: int = 2, oversample: int = 2,
                 trim_pixels: int = 4_000_000, collect_every_s: float = 2.0) -> None:
        for name, value in (("side", side), ("slots", slots), ("oversample", oversample)):
            if not isinstance(value, int) or value < 1:
                raise ConvscopeError(f"Decoder({name}={value!r}): use a positive int")
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
            raise ConvscopeError(f"max_pixels={max_pixels!r}: use a positive number of pixels (or None: sized for "
                                 "the model)")
        self.side = side
        self.min_side = oversample * side
        self.max_pixels = max_pixels or pixel_limit(side)
        self.slots = slots
        self.trim_pixels = trim_pixels
        self.collect_every_s = collect_every_s
        self.releases = 0  # how many times memory was handed back (for /api/status and tests)
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_collect = 0.0

    def decode(self, data: bytes, content_type: str | None = None, min_side: int | None = None) -> Image.Image:
        """:func:`decode_image` within a slot, reduced to ``min_side`` (default ``oversample * side``)."""
        with self._lock:
            self._in_flight += 1
        large = False
        try:
            with self._slots:
                large = self.trim_pixels <= _declared_pixels(data) <= self.max_pixels
                return decode_image(data, content_type, self.max_pixels, min_side=min_side or self.min_side)
        finally:
            with self._lock:
                self._in_flight -= 1
                now = time.monotonic()
                collect = large and self._in_flight == 0 and now - self._last_collect >= self.collect_every_s
                if collect:
                    self._last_collect = now
                self.releases += large
            if large:
                release_memory(collect)


@dataclass(frozen=True)
class StoredImage:
    """One picture at the model's input size, with the name it came with."""

    id: str
    image: Image.Image
    name: str


class ImageStore:
    """A thread-safe LRU of :class:`StoredImage` by id, holding at most ``capacity`` images; pinned images
    (the bundled photos) are kept outside the LRU. New ids start with ``prefix``."""

    def __init__(self, preprocess: Preprocess, capacity: int = 128, prefix: str = "u-") -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConvscopeError(f"image store capacity={capacity!r}: use a positive int")
        if preprocess.input_size is None:
            raise ConvscopeError("the image store needs a preprocess with a crop (a fixed input size)")
        self.preprocess = preprocess
        self.capacity = capacity
        self.prefix = prefix
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._pinned: dict[str, StoredImage] = {}
        self._lock = threading.Lock()

    def fit(self, image: Image.Image) -> Image.Image:
        """Resize (short side) and centre-crop a picture to the model's input, as its preprocess does."""
        pre = self.preprocess
        h, w = pre.input_size  # type: ignore[misc]
        size = pre.resize or max(h, w)
        scale = size / min(image.size)
        new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
        if new != image.size:
            image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = round((image.width - w) / 2), round((image.height - h) / 2)
        return image.crop((left, top, left + w, top + h))

    def add(self, image: Image.Image, name: str = "upload", pin_id: str | None = None) -> StoredImage:
        """Store a picture (fitted to the model input) and return it with its new id (``pin_id``: pinned)."""
        item = StoredImage(pin_id or self.prefix + secrets.token_urlsafe(9), self.fit(image), name)
        with self._lock:
            if pin_id:
                self._pinned[pin_id] = item
            else:
                self._items[item.id] = item
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return item

    def get(self, image_id: str) -> StoredImage:
        """The stored picture, or :class:`UnknownImage`."""
        if not isinstance(image_id, str) or not ID_PATTERN.match(image_id):
            raise UnknownImage(f"invalid image id {shown(str(image_id))}; upload a picture first (POST /api/image)")
        with self._lock:
            item = self._pinned.get(image_id) or self._items.get(image_id)
            if item is not None and image_id in self._items:
                self._items.move_to_end(image_id)
        if item is None:
            raise UnknownImage(f"no image with id {shown(image_id)} here (the server keeps the last {self.capacity} "
                               "uploads); upload it again")
        return item

    def items(self) -> list[StoredImage]:
        """The pictures in the LRU (not the pinned ones), oldest first."""
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
