"""The pixel transform between images and a model's input: resize, centre-crop, normalize (and back)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConvscopeError

__all__ = ["Preprocess"]



@dataclass(frozen=True)
class Preprocess:
    """Resize (short side), centre-crop, convert to a float tensor and normalize per channel.

    ``crop`` is an int (square) or ``(height, width)``; ``mean``/``std`` apply to pixels in [0, 1]:
    ``x = (pixels - mean) / std``, one value per channel: three for RGB (the default), one for a grayscale model,
    four for RGBA. Statistics with the same value for every channel of several (the identity default, TF-Lite's
    ``(127 / 255,) * 3``) apply to any channel count. Frozen, so it compares and hashes by value.
    """

    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise ConvscopeError(f"Preprocess(resize={self.resize!r}): use a positive int or None.")
        crop = self.crop
        if crop is not None:
            pair = (crop, crop) if isinstance(crop, int) else tuple(crop)
            if len(pair) != 2 or not all(isinstance(c, int) and c >= 1 for c in pair):
                raise ConvscopeError(
                    f"Preprocess(crop={crop!r}): use a positive int or a (height, width) pair of ints."
                )
            object.__setattr__(self, "crop", crop if isinstance(crop, int) else pair)
        for name in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, name))
            if not vals:
                raise ConvscopeError(f"Preprocess({name}=()): give one value per channel (three for RGB, one for "
                                     "grayscale).")
            object.__setattr__(self, name, vals)
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ConvscopeError(f"Preprocess(mean={self.mean!r}, std={self.std!r}): give as many std values as mean "
                                 "values (one per channel).")
        if any(s == 0 for s in self.std):
            raise ConvscopeError(f"Preprocess(std={self.std!r}): std must be non-zero in every channel.")

    @classmethod
    def identity(cls) -> Preprocess:
        """No resize or crop, mean 0, std 1: RGB in [0, 1] at the image's own size."""
        return cls()

    @property
    def channels(self) -> int | None:
        """The channel count the statistics fix: the length of a mean or std with different values, 1 for
        one-value statistics (grayscale), ``None`` when they apply to any count (several equal values)."""
        fixed = {len(v) for v in (self.mean, self.std) if len(set(v)) > 1}
        if fixed:
            return max(fixed)
        return 1 if len(self.mean) == len(self.std) == 1 else None

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the output, or None when it depends on the image."""
        if self.crop is None:
            return None
        return (self.crop, self.crop) if isinstance(self.crop, int) else self.crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalized ``C x H x W`` float32 tensor: RGB, or grayscale (``L``) when the statistics have
        one value, RGBA when they have four."""
        mode = {1: "L", 4: "RGBA"}.get(max(len(self.mean), len(self.std)), "RGB")
        img = img if img.mode == mode else img.convert(mode)
        if self.resize is not None:
            img = _resize_short_side(img, self.resize)
        if self.crop is not None:
            img = _center_crop(img, self.input_size)  # type: ignore[arg-type]
        arr = np.array(img, dtype=np.uint8)
        x = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1).float().div_(255.0)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (``C x H x W`` or ``N x C x H x W``) -> model input space."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space -> pixel space ([0, 1] for real images; not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped ``C x 1 x 1`` (or ``1 x 1 x 1`` where they apply to any channel count) on x's
        device and dtype."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ConvscopeError("Preprocess expects a floating-point tensor; convert with x.float() / 255.")
        want = self.channels
        if x.dim() not in (3, 4) or (want is not None and x.shape[-3] != want):
            raise ConvscopeError(
                f"Preprocess expects a {want or 'C'} x H x W or N x {want or 'C'} x H x W tensor, got shape "
                f"{tuple(x.shape)}; give a Preprocess with one mean/std value per channel of the model's input."
            )
        mean = torch.tensor(self.mean if want is not None else self.mean[:1], dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std if want is not None else self.std[:1], dtype=x.dtype, device=x.device)
        return mean.expand(want or 1).view(-1, 1, 1), std.expand(want or 1).view(-1, 1, 1)


def _resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side equals ``size`` (bicubic, antialiased), keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centre ``(height, width)`` region."""
    ch, cw = size
    w, h = img.size
    if cw > w or ch > h:
        raise ConvscopeError(
            f"Image of {w}x{h} (WxH) is smaller than the crop {cw}x{ch}; "
            f"use Preprocess(resize={max(ch, cw)}, crop=...) so the image is resized first."
        )
    left, top = round((w - cw) / 2), round((h - ch) / 2)
    return img.crop((left, top, left + cw, top + ch))
