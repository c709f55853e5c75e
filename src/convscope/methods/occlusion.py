"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2, Fig. 7).

A grey square is slid over the image; at each position the occluded copy is classified and the target scores
recorded. Where the score drops, the model relied on what the square hid. Zeiler & Fergus also record, at each
position, the total activation of the one feature map of a chosen layer that responds most strongly on the
unoccluded image (their Fig. 7 (b)), which shows what that unit sees.

Batched over window positions: the occluded copies of all images are formed ``batch_size`` at a time and run in
one forward pass each, and all K targets are read from the same outputs. Memory is bounded by ``batch_size``
copies of one image (plus their activations at ``layer``).

Window positions: top-left corners ``0, stride, 2 stride, ...`` along each axis while the window fits, plus one
flush with the far edge when the strides do not reach it, so every pixel is covered at least once.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.model import input_normalizer
from ..core.probe import preserved_state, probe
from ..core.progress import progress_bar
from ..core.targets import Target, scores_of, target_scores, top_class
from ..errors import ConvscopeError, TargetError
from .incremental import IncrementalRunner, copy_bytes, make_batch, plan_incremental

Fill = str | float | torch.Tensor


@dataclass
class OcclusionResult:
    """What :func:`occlusion` measured. ``P_h x P_w`` is the grid of window positions.

    Attributes:
        maps: ``N x K x H x W``, the drop in each target score (clean minus occluded), averaged over all windows
            covering each pixel (as Captum's ``Occlusion``). Positive: hiding this region lowers the score.
        scores: ``N x K x P_h x P_w``, the target scores (logits) with the window at each position (Fig. 7 (d)
            shows the same with probabilities).
        clean_scores: ``N x K``, the target scores of the unoccluded images.
        targets: ``N x K`` class indices explained, or ``None`` for a callable that returns scores.
        predicted: ``N x P_h x P_w``, the top class with the window at each position (Fig. 7 (e)).
        rows, cols: top-left pixel of each window row / column (``P_h`` and ``P_w`` ints).
        window: ``(height, width)`` of the occluding square.
        unit: ``N``, the feature map of ``layer`` most active on each unoccluded image (highest maximum), or None.
        strongest_unit: ``N x P_h x P_w``, that feature map's activation summed over space with the window at each
            position (Fig. 7 (b)); None without ``layer``.
        unit_activation: ``N``, the same sum on the unoccluded image (the reference level of ``strongest_unit``).
        path: one line saying how the occluded copies were computed: incremental inference on dirty boxes
            (:mod:`convscope.methods.incremental`), or full forward passes and why.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    clean_scores: torch.Tensor
    targets: torch.Tensor | None
    predicted: torch.Tensor
    rows: list[int]
    cols: list[int]
    window: tuple[int, int]
    layer: str | None = None
    unit: torch.Tensor | None = None
    strongest_unit: torch.Tensor | None = None
    unit_activation: torch.Tensor | None = None
    path: str = "full forward passes"


def window_positions(size: int, window: int, stride: int) -> list[int]:
    """Top-left corners along one axis: ``0, stride, ...`` while the window fits, plus one flush with the end."""
    if window > size:
        raise ConvscopeError(f"the occlusion window ({window} px) is larger than the image ({size} px); "
                             "use a smaller window=")
    pos = list(range(0, size - window + 1, stride))
    if pos[-1] != size - window:
        pos.append(size - window)
    return pos


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = top_class, window: int | tuple[int, int] = 16,
              stride: int | tuple[int, int] = 8, fill: Fill = 0.5, batch_size: BatchSize = "auto",
              layer: str | None = None, progress: bool | None = None,
              incremental: bool | Literal["auto"] = "auto") -> OcclusionResult:
    """Occlusion sensitivity maps for a batch of images ``N x C x H x W`` (Zeiler & Fergus 2014, Sec. 4.2).

    Args:
        target: class index, one per image, ``N x K``, ``top_class``, ``top_k(k)`` or a callable on the output;
            class indices are fixed on the unoccluded images (``top_class`` is the clean image's top class at every
            window position). A callable returning scores is applied to each occluded copy's output.
        window, stride: the occluding square and its step, in pixels (an int or ``(height, width)``).
        fill: what the square is filled with. A float is a grey level in pixel space ([0, 1]; default 0.5, mid
            grey), converted to the model's input space with ``model.preprocess`` when the model has one (a bare
            module's input is taken as pixels). ``"mean"``: each image's own per-channel mean. A tensor is used
            as given, in input space, broadcast to ``N x C x H x W`` (for example a blurred copy of ``x``).
        batch_size: occluded copies per forward pass (bounds memory); ``"auto"`` (default): as many as keep the
            largest activation under the allocator's threshold (:mod:`convscope.core.batching`).
        layer: also record the strongest feature map of this layer (``strongest_unit``, Fig. 7 (b)).
        progress: a progress bar with an ETA, counting occluded copies: ``True``, ``False``, or ``None`` (default:
            once the work has run for 2 s).
        incremental: ``"auto"`` (default) computes each occluded copy by incremental inference (Nakandala et al.
            2019: only the receptive-field cone of the window is recomputed, from cached clean activations; exact
            up to float rounding) when the model is made of supported layers, else full forward passes
            (``result.path`` says which and why). ``True``: the same, with a warning when it has to fall back.
            ``False``: always one full forward pass per copy (the reference).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise ConvscopeError(f"occlusion expects a float batch of images N x C x H x W, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if incremental not in (True, False, "auto"):
        raise ConvscopeError(f"occlusion(incremental={incremental!r}): use 'auto', True or False")
    check_batch_size(batch_size, "occlusion")
    x = x.detach()
    num, _, height, width = x.shape
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    rows, cols = window_positions(height, wh, sh), window_positions(width, ww, sw)
    filled = _fill(model, x, fill)
    # separable window masks: R[a, y] = 1 when row y is inside window row a; C[b, x] likewise
    ys, xs = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    r0, c0 = torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)
    row_in = (ys >= r0[:, None]) & (ys < r0[:, None] + wh)
    col_in = (xs >= c0[:, None]) & (xs < c0[:, None] + ww)
    n_pos = len(rows) * len(cols)
    total = num * n_pos

    with torch.no_grad(), preserved_state(model), \
            progress_bar(total=total, desc="occlusion", unit="copy", progress=progress, leave=False) as bar:
        with probe(model, layer, detach=True) as p:
            out = model(x)
            layer_clean = p.activations[layer] if layer is not None else None
        clean, idx = target_scores(out, target)
        out = scores_of(out, target)
        k = clean.shape[1]
        unit = unit_act = None
        if layer is not None and layer_clean is not None:
            act = _as_maps(layer_clean, layer)
            unit = act.flatten(2).amax(2).argmax(1)  # N: the feature map with the strongest response
            unit_act = act[torch.arange(num), unit].flatten(1).sum(1)
        runner, path = None, "full forward passes (incremental=False)"
        if incremental is not False:
            plan, path = plan_incremental(model, x, out, rows, cols, (wh, ww), layer, layer_clean)
            if plan is not None:
                runner = IncrementalRunner(plan, filled)
            elif incremental is True:
                warnings.warn(f"occlusion: {path}", stacklevel=2)
        # incremental copies hold only their dirty boxes: "auto" sizes rows by that, not by the full activations
        per_pass = resolve_batch_size(batch_size, model, x, "occlusion", limit=total,
                                      row_bytes=copy_bytes(runner.plan) if runner is not None else None)
        scores = torch.empty(total, k, dtype=clean.dtype, device=clean.device)
        predicted = torch.empty(total, dtype=torch.long, device=x.device)
        unit_sums = torch.empty(total, dtype=x.dtype, device=x.device) if layer is not None else None
        with contextlib.ExitStack() as stack:
            looped = stack.enter_context(probe(model, layer, detach=True)) if runner is None else None
            for start in range(0, total, per_pass):
                flat = torch.arange(start, min(start + per_pass, total), device=x.device)
                img = flat // n_pos  # row order: image-major, then window row, then window column
                if runner is not None:
                    batch = make_batch(flat, n_pos, len(cols))
                    o, layer_out = runner.run(batch)
                    o = scores_of(o, target)
                    if unit_sums is not None and unit is not None and layer_out is not None:
                        unit_sums[flat] = runner.unit_sums(layer_out, unit, batch).to(x.dtype)
                else:
                    assert looped is not None
                    pos = flat % n_pos
                    mask = (row_in[pos // len(cols)][:, :, None] & col_in[pos % len(cols)][:, None, :])[:, None]
                    o = scores_of(model(torch.where(mask, filled[img], x[img])), target)
                    if unit_sums is not None and unit is not None and layer is not None:
                        a = _as_maps(looped.activations[layer], layer)
                        unit_sums[flat] = a[torch.arange(len(flat), device=x.device), unit[img]].flatten(1).sum(
                            1).to(x.dtype)
                if idx is not None:
                    s = o.reshape(len(flat), -1).gather(1, idx[img])
                else:
                    s, _ = target_scores(o, target)
                    if s.shape[1] != k:
                        raise TargetError(f"the target callable returned {s.shape[1]} scores per image on occluded "
                                          f"copies but {k} on the clean images; it must return the same number")
                scores[flat] = s
                predicted[flat] = o.reshape(len(flat), -1).argmax(1)
                bar.update(len(flat))

    grid = (num, len(rows), len(cols))
    scores_g = scores.reshape(*grid, k).permute(0, 3, 1, 2)  # N K Ph Pw
    drop = clean[:, :, None, None] - scores_g
    rf, cf = row_in.to(drop.dtype), col_in.to(drop.dtype)
    counts = rf.sum(0)[:, None] * cf.sum(0)[None, :]  # windows covering each pixel (>= 1)
    maps = torch.einsum("nkab,ay,bx->nkyx", drop, rf, cf) / counts
    return OcclusionResult(
        maps=maps, scores=scores_g, clean_scores=clean, targets=idx, predicted=predicted.reshape(grid),
        rows=rows, cols=cols, window=(wh, ww), layer=layer, unit=unit,
        strongest_unit=None if unit_sums is None else unit_sums.reshape(grid), unit_activation=unit_act, path=path)


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in pair):
        raise ConvscopeError(f"occlusion({name}={v!r}): use a positive int or a (height, width) pair of ints")
    return pair[0], pair[1]


def _fill(model: nn.Module, x: torch.Tensor, fill: Fill) -> torch.Tensor:
    """The occluder's values, ``N x C x H x W`` (a broadcast view where possible), in the model's input space."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ConvscopeError(f"occlusion(fill={fill!r}): use 'mean', a grey level in [0, 1] or a tensor")
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if isinstance(fill, torch.Tensor):
        try:
            return fill.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as e:
            raise ConvscopeError(f"occlusion(fill=tensor of shape {tuple(fill.shape)}): it must broadcast to the "
                                 f"images' shape {tuple(x.shape)}") from e
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        raise ConvscopeError(f"occlusion(fill={fill!r}): use 'mean', a grey level in [0, 1] or a tensor")
    grey = torch.full((1, x.shape[1], 1, 1), float(fill), dtype=x.dtype, device=x.device)
    return input_normalizer(model)(grey).expand_as(x)


def _as_maps(act: torch.Tensor, layer: str) -> torch.Tensor:
    """A layer output as ``N x C x (spatial...)``; a plain ``N x C`` output counts as 1 x 1 maps."""
    if not isinstance(act, torch.Tensor) or act.dim() < 2:
        raise ConvscopeError(f"layer {layer!r} does not output an N x C (x H x W) tensor; pick a conv layer")
    return act if act.dim() > 2 else act[:, :, None]
