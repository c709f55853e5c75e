"""Read any layer's output as a feature map ``N x C x H x W``, and write a map back into the layer's layout.

Three layouts occur in image models:

* ``"nchw"``: convolutional maps, returned unchanged;
* ``"nhwc"``: channels-last maps (Swin's blocks and ``norm``, ConvNeXt inside its blocks), permuted;
* ``"tokens"``: ``N x T x D`` token sequences of a ViT: ``E`` leading extra tokens (a class token, maybe a
  distillation or register tokens), then the ``gh x gw`` patch grid in row-major order (Dosovitskiy et al. 2021,
  Eq. 1). The extra tokens are dropped from the map and kept in :class:`TokenInfo` so that
  :func:`from_feature_map` can put them back.

:func:`as_feature_map` returns a view (slice / reshape / permute) of its input, so gradients taken with respect
to the map flow back to the tokens (Grad-CAM on a ViT block: weights = mean gradient per channel over the patch
grid, class token dropped) and an edit of the map made in the forward pass reaches the rest of the network through
:func:`from_feature_map`.

``layout="auto"`` decides from the shape, the input image size and the patch size:

* 4-D with ``input_size``: the reading whose map ``H x W`` has the input's aspect (one stride, each side within
  ``SLACK`` of input / stride); when both do, the one an integer stride gives exactly; else an error.
  Without ``input_size``: ``N x a x a x c`` (a square grid second) is channels-last, anything else ``nchw``;
* 3-D: tokens; the extra-token count ``E`` (0..``MAX_EXTRA_TOKENS``) and the grid follow from ``input_size`` and
  ``patch_size`` (``grid = (H // p, W // p)``), from ``input_size`` alone (the grids one square patch cuts the
  input into, exact tilings first), or without either from a square grid.

Where that is ambiguous or impossible it raises a one-line :class:`~convscope.errors.ConvscopeError` naming the
``layout=`` to pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import ConvscopeError

LAYOUTS = ("auto", "nchw", "nhwc", "tokens", "tokens:E")
MAX_EXTRA_TOKENS = 16  # class + distillation + register tokens tried by "auto" / "tokens"
SLACK = 1.5  # map sides may differ from input / stride by this much (padding, valid convolutions)


@dataclass(frozen=True)
class TokenInfo:
    """How :func:`as_feature_map` read a tensor: enough to read another tensor of the same layer the same way
    (``as_feature_map(grad, layout=info)``) and to write a map back (:func:`from_feature_map`).

    ``layout`` is ``"nchw"``, ``"nhwc"`` or ``"tokens"``; ``extra_tokens`` the number of leading tokens dropped;
    ``grid`` the map's ``(H, W)``; ``shape`` the original shape; ``extra`` the dropped tokens ``N x E x D``
    (not detached, so gradients through a reinserted class token still flow)."""

    layout: str
    shape: tuple[int, ...]
    grid: tuple[int, int]
    extra_tokens: int = 0
    extra: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> str:
        """The ``layout=`` string that reads this layer the same way (``"tokens:1"``, ``"nhwc"``, ...)."""
        return f"tokens:{self.extra_tokens}" if self.layout == "tokens" else self.layout


def as_feature_map(t: torch.Tensor, layout: str | TokenInfo = "auto",
                   input_size: tuple[int, int] | torch.Size | None = None,
                   patch_size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, TokenInfo]:
    """``(N x C x H x W view of t, TokenInfo)`` for a layer output ``t``.

    ``layout``: ``"auto"`` (from the shape), ``"nchw"``, ``"nhwc"``, ``"tokens"`` (extra tokens inferred),
    ``"tokens:E"`` (``E`` leading extra tokens), or the :class:`TokenInfo` of an earlier call (same grid).
    ``input_size``: the image ``(H, W)`` the layer saw, which makes ``auto`` reliable (channels-last maps are
    recognized by their aspect, token grids by the input's); ``patch_size``: a ViT's patch side (e.g.
    ``model.patch_size``), which fixes the token grid to ``(H // p, W // p)``."""
    if not isinstance(t, torch.Tensor):
        raise ConvscopeError(f"as_feature_map needs a tensor, got {type(t).__name__}; pass the layer's output tensor")
    if isinstance(layout, TokenInfo):
        return _apply(t, layout.layout, layout.extra_tokens, layout.grid)
    size = _pair(input_size, "input_size") if input_size is not None else None
    patch = _pair(patch_size, "patch_size") if patch_size is not None else None
    kind, extra = _parse(layout)
    shape = tuple(t.shape)
    if kind == "auto":
        if t.dim() == 4:
            kind = _nchw_or_nhwc(shape, size)
        elif t.dim() == 3:
            kind = "tokens"
        else:
            raise ConvscopeError(f"a layer output of shape {shape} is not a spatial map (need N x C x H x W, "
                                 "N x H x W x C or N x tokens x D); choose a layer before pooling / flattening")
    if kind in ("nchw", "nhwc"):
        if t.dim() != 4:
            raise ConvscopeError(f"layout={layout!r} needs a 4-D tensor, got shape {shape}; pass layout='tokens' "
                                 "for N x tokens x D outputs")
        grid = (shape[2], shape[3]) if kind == "nchw" else (shape[1], shape[2])
        return _apply(t, kind, 0, grid)
    if t.dim() != 3:
        raise ConvscopeError(f"layout={layout!r} needs N x tokens x D, got shape {shape}; pass layout='nchw' or "
                             "'nhwc' for 4-D maps")
    extra, grid = _token_grid(shape, extra, size, patch)
    return _apply(t, "tokens", extra, grid)


def from_feature_map(m: torch.Tensor, info: TokenInfo, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`as_feature_map`: map ``N x C x H x W`` back into the layer's layout; for tokens the
    extra tokens are reinserted in front (``info.extra`` unless ``extra`` is given). Differentiable."""
    if not isinstance(m, torch.Tensor) or m.dim() != 4:
        raise ConvscopeError(f"from_feature_map needs an N x C x H x W map, got "
                             f"{tuple(getattr(m, 'shape', ())) or type(m).__name__}; pass the map as_feature_map "
                             "returned (edited in shape-preserving ways)")
    n = info.shape[0]
    c = info.shape[1] if info.layout == "nchw" else info.shape[-1]
    if tuple(m.shape) != (n, c, *info.grid):
        raise ConvscopeError(f"map of shape {tuple(m.shape)} does not fit the layer's {(n, c, *info.grid)}; keep "
                             "the shape as_feature_map returned")
    if info.layout == "nchw":
        return m
    if info.layout == "nhwc":
        return m.permute(0, 2, 3, 1)
    seq = m.flatten(2).transpose(1, 2)
    if info.extra_tokens == 0:
        return seq
    extra = info.extra if extra is None else extra
    if extra is None or tuple(extra.shape) != (n, info.extra_tokens, c):
        raise ConvscopeError(f"from_feature_map needs the {info.extra_tokens} extra tokens of shape "
                             f"{(n, info.extra_tokens, c)}; pass extra= or the TokenInfo of as_feature_map")
    return torch.cat([extra.to(seq.dtype), seq], dim=1)


def check_layout(layout: object) -> str:
    """``layout`` when it is one of :data:`LAYOUTS` (``"tokens:E"`` with a count), else a one-line error."""
    _parse(layout)
    return cast(str, layout)  # _parse raised unless it is a str


def _apply(t: torch.Tensor, kind: str, extra: int, grid: tuple[int, int]) -> tuple[torch.Tensor, TokenInfo]:
    shape = tuple(t.shape)
    if kind == "nchw":
        if t.dim() != 4 or shape[2:] != tuple(grid):
            raise ConvscopeError(f"shape {shape} does not match the layout nchw with grid {grid}; read it with "
                                 "its own layout")
        return t, TokenInfo("nchw", shape, (grid[0], grid[1]))
    if kind == "nhwc":
        if t.dim() != 4 or shape[1:3] != tuple(grid):
            raise ConvscopeError(f"shape {shape} does not match the layout nhwc with grid {grid}; read it with "
                                 "its own layout")
        return t.permute(0, 3, 1, 2), TokenInfo("nhwc", shape, (grid[0], grid[1]))
    if t.dim() != 3 or shape[1] != extra + grid[0] * grid[1]:
        raise ConvscopeError(f"shape {shape} does not hold {extra} extra tokens + a {grid[0]}x{grid[1]} grid; read "
                             "it with its own layout")
    n, _, d = shape
    m = t[:, extra:].reshape(n, grid[0], grid[1], d).permute(0, 3, 1, 2)
    return m, TokenInfo("tokens", shape, (grid[0], grid[1]), extra, t[:, :extra] if extra else None)


def _parse(layout: object) -> tuple[str, int | None]:
    if isinstance(layout, str):
        if layout in ("auto", "nchw", "nhwc", "tokens"):
            return layout, None
        head, _, count = layout.partition(":")
        if head == "tokens" and count.isdigit():
            return "tokens", int(count)
    raise ConvscopeError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)} (E = number of leading extra "
                         "tokens, e.g. 'tokens:1' for a class token)")


def _pair(v: object, what: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    try:
        h, w = (int(s) for s in cast(Iterable[Any], v))
    except (TypeError, ValueError):
        raise ConvscopeError(f"{what}={v!r}: give an int or an (height, width) pair of ints") from None
    if h < 1 or w < 1:
        raise ConvscopeError(f"{what}={v!r}: sides must be at least 1")
    return h, w


def _fits(h: int, w: int, size: tuple[int, int], slack: float) -> bool:
    """Whether an ``h x w`` map can come from a ``size`` input by one stride ``s`` (each side within ``slack`` of
    input / s), i.e. its aspect matches the input's."""
    lo, hi = 0.0, math.inf
    for side, full in ((h, size[0]), (w, size[1])):
        lo = max(lo, full / (side + slack))
        hi = min(hi, full / (side - slack) if side > slack else math.inf)
    return lo <= hi


def _exact(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether some integer stride gives exactly ``h x w`` (floor or ceil of each side)."""
    for s in range(1, max(size) + 1):
        if h in (size[0] // s, -(-size[0] // s)) and w in (size[1] // s, -(-size[1] // s)):
            return True
    return False


def _nchw_or_nhwc(shape: tuple[int, ...], size: tuple[int, int] | None) -> str:
    _, a, b, c = shape
    fix = "pass layout='nchw' or layout='nhwc'"
    if a == b == c:
        raise ConvscopeError(f"shape {shape} reads as N x C x H x W and as N x H x W x C alike; {fix}")
    if size is None:  # without the input: a square N x a x a x c is channels-last, anything else convolutional
        return "nhwc" if a == b else "nchw"
    nchw, nhwc = _fits(b, c, size, SLACK), _fits(a, b, size, SLACK)
    what = "both" if nchw and nhwc else "neither"
    if nchw and nhwc:  # both aspects fit: only one integer stride giving exactly this map decides
        nchw, nhwc = _exact(b, c, size), _exact(a, b, size)
    if nchw != nhwc:
        return "nchw" if nchw else "nhwc"
    raise ConvscopeError(f"shape {shape} fits {what} N x C x H x W (map {b}x{c}) and N x H x W x C (map {a}x{b}) "
                         f"for a {size[0]}x{size[1]} input; {fix}")


def _token_grid(shape: tuple[int, ...], extra: int | None, size: tuple[int, int] | None,
                patch: tuple[int, int] | None) -> tuple[int, tuple[int, int]]:
    """``(extra tokens, (gh, gw))`` for ``N x T x D`` tokens; a one-line error when none or several fit."""
    t = shape[1]
    counts = [extra] if extra is not None else list(range(min(MAX_EXTRA_TOKENS, t - 1) + 1))
    if size is not None and patch is not None:
        grid = (size[0] // patch[0], size[1] // patch[1])
        e = t - grid[0] * grid[1]
        if e in counts:
            return e, grid
        allowed = f"{extra}" if extra is not None else f"0-{counts[-1]}"
        raise ConvscopeError(f"shape {shape} does not hold a {grid[0]}x{grid[1]} patch grid ({size[0]}x{size[1]} "
                             f"input, {patch[0]}x{patch[1]} patches) after {allowed} extra tokens; check input_size / "
                             "patch_size or pass layout='tokens:E'")
    found: list[tuple[int, tuple[int, int]]] = []
    for exact in (True, False):  # grids a patch size tiles the input with exactly, then with a remainder
        found = [(e, g) for e in counts for g in _grids(t - e, size, exact)]
        if found or size is None:
            break
    if len(found) == 1:
        return found[0]
    fix = "pass input_size= and patch_size=, or layout='tokens:E' (E leading extra tokens)"
    if not found:
        where = f" of a {size[0]}x{size[1]} input" if size else " (square without input_size)"
        raise ConvscopeError(f"shape {shape} holds no patch grid{where} after {counts[0]}-{counts[-1]} extra tokens; "
                             f"{fix}")
    options = ", ".join(f"{e} extra + {g[0]}x{g[1]}" for e, g in found[:4]) + (", ..." if len(found) > 4 else "")
    raise ConvscopeError(f"shape {shape} is ambiguous as tokens ({options}); {fix}")


def _grids(p: int, size: tuple[int, int] | None, exact: bool) -> list[tuple[int, int]]:
    """Patch grids of ``p`` tokens: square without an input size; else the ``(H // s, W // s)`` of one square patch
    side ``s``, which divides both sides when ``exact`` (a convolution's floor otherwise)."""
    if p < 1:
        return []
    if size is None:
        side = math.isqrt(p)
        return [(side, side)] if side * side == p else []
    out = []
    for gh in range(1, p + 1):
        gw = p // gh
        if p % gh:
            continue
        sides = range(size[0] // (gh + 1) + 1, size[0] // gh + 1)  # every s with H // s == gh
        if any(size[1] // s == gw and (not exact or (size[0] % s == 0 and size[1] % s == 0)) for s in sides):
            out.append((gh, gw))
    return out
