"""Errors raised by convscope. Every message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvscopeError(Exception):
    """Base class of every error convscope raises on bad input."""


class LayerNotFoundError(ConvscopeError, KeyError):
    """A layer name that is not in ``model.named_modules()``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(ConvscopeError):
    """A model that cannot be found, imported or loaded."""


class ImageLoadError(ConvscopeError):
    """An image file that cannot be read (missing, corrupt, truncated, too large, not an image)."""


class TargetError(ConvscopeError, ValueError):
    """A target (class, unit, callable) that does not fit the model output."""


class DataError(ConvscopeError):
    """A dataset folder or file that is malformed."""


def closest(name: str, candidates: Iterable[str], n: int = 8) -> list[str]:
    """The candidates most similar to ``name`` (substring matches first, then difflib)."""
    cands = list(candidates)
    subs = [c for c in cands if name and (name in c or c in name) and c]
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    out: list[str] = []
    for c in subs[:n] + close:
        if c not in out:
            out.append(c)
    return out[:n]
