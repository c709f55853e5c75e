"""Uploaded pictures: decode and check bytes from the network, and keep them in a bounded in-memory LRU.

Every image is stored already resized and centre-cropped to the model's input (what the model sees, and what the
page shows beside the maps), as a small RGB PIL image; the page refers to it by an opaque id.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from ..core.images import ImageDecodeError, Preprocess, decode_rgb
from ..errors import ConvscopeError

__all__ = ["ALLOWED_FORMATS", "ImageStore", "StoredImage", "UnknownImage", "UploadError", "decode_image"]

# What PIL may decode from an upload (no PDF, EPS/PostScript, SVG or other formats with a larger attack surface).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UploadError(ConvscopeError):
    """An upload the server refuses; ``status`` is the HTTP status it maps to (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UnknownImage(ConvscopeError):
    """An image id the server does not hold (never uploaded, or evicted from the LRU)."""


def decode_image(data: bytes, content_type: str | None = None, max_pixels: int = 40_000_000,
                 draft: int | None = None) -> Image.Image:
    """Bytes of an uploaded picture -> 8-bit RGB PIL image, EXIF orientation applied.

    Raises :class:`UploadError`: 415 for a declared type that is not an image or bytes that are no image format
    we read, 400 for a corrupt or truncated image, 413 for more than ``max_pixels`` pixels (decompression bombs).
    ``draft``: let JPEG decoding scale down by 2/4/8 while both sides stay >= ``draft`` (much faster for big
    photos and webcam frames; the model sees a resized crop anyway).
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise UploadError(f"expected an image (JPEG, PNG, WebP, BMP, GIF or TIFF), got content type {ctype!r}; "
                          "upload a picture file", 415)
    if not data:
        raise UploadError("the upload is empty (0 bytes); choose a picture file", 400)
    try:
        return decode_rgb(io.BytesIO(data), max_pixels, formats=ALLOWED_FORMATS, draft=draft)
    except ImageDecodeError as e:
        if e.reason == "format":
            raise UploadError("the upload is not a picture this server reads; use JPEG, PNG, WebP, BMP, GIF or "
                              "TIFF", 415) from e
        if e.reason == "pixels" and e.pixels:
            raise UploadError(f"the image has {e}, more than this server's limit of {max_pixels}; "
                              "downscale it first", 413) from e
        if e.reason == "pixels":
            raise UploadError(f"the image has too many pixels ({e}); downscale it first", 413) from e
        raise UploadError(f"the image is corrupt or truncated ({e}); re-export it and upload again", 400) from e


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
            raise UnknownImage(f"invalid image id {image_id!r}; upload a picture first (POST /api/image)")
        with self._lock:
            item = self._pinned.get(image_id) or self._items.get(image_id)
            if item is not None and image_id in self._items:
                self._items.move_to_end(image_id)
        if item is None:
            raise UnknownImage(f"no image with id {image_id!r} here (the server keeps the last {self.capacity} "
                               "uploads); upload it again")
        return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
