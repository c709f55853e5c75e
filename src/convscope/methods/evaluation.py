"""Scoring attribution maps without a person in the loop.

* Deletion / insertion (Petsiuk, Das & Saenko 2018, RISE, Sec. 4.1): remove (deletion) or add (insertion) the
  pixels in order of decreasing saliency, ``steps`` equal fractions at a time, and follow the softmax probability
  of the target class; the area under each curve (trapezoid over the fraction ``[0, 1]``) is the score. Low
  deletion AUC and high insertion AUC are good. Removed pixels take the deletion baseline (default: zero in the
  model's input space, the dataset mean colour); insertion starts from a blurred copy of the image (RISE) and
  puts the original pixels back.
* Model-randomization sanity check (Adebayo et al. 2018, Sec. 3.1, cascading randomization): re-initialize the
  conv / linear layers from the top of the network down, one more at a time, recompute the maps, and report the
  Spearman rank correlation with the original maps. A method whose maps stay similar on a randomized network
  does not explain what the network learned.

The pointing game and mask IoU live in :mod:`convscope.data.groundtruth` (they need ground-truth masks).
Every function leaves the model as it came (randomization works on a copy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.attribution import check_input, pinned_class
from ..core.imageops import gaussian_blur, spearman
from ..core.layers import resolve_layer
from ..core.probe import preserved_state
from ..core.targets import Target, top_class
from ..data.groundtruth import pixel_ranks
from ..errors import ConvscopeError


@dataclass(frozen=True)
class DeletionInsertion:
    """Curves ``N x (steps + 1)`` (probability of the target after removing / adding fraction ``t / steps``) and
    their areas ``N``."""

    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    target: torch.Tensor


def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: Target = top_class,
                       steps: int = 32, batch_size: int = 64, deletion_baseline: torch.Tensor | float = 0.0,
                       blur_sigma: float | None = None, progress: bool | None = None) -> DeletionInsertion:
    """Deletion and insertion curves of saliency ``maps`` (``N x H x W`` or ``N x 1 x h x w``, resized
    bilinearly to the input) for one target per image. Costs ``2 * (steps + 1)`` forward passes per image,
    batched ``batch_size`` images at a time. ``blur_sigma`` (default: 1/20 of the image side) sets the
    insertion start."""
    check_input(x, "deletion_insertion")
    if x.dim() != 4:
        raise ConvscopeError(f"deletion_insertion needs images N x C x H x W, got {tuple(x.shape)}")
    if steps < 1:
        raise ConvscopeError(f"steps must be >= 1, got {steps}")
    m = maps.detach().float()
    m = m[:, 0] if m.dim() == 4 else m
    if m.dim() != 3 or m.shape[0] != x.shape[0]:
        raise ConvscopeError(f"maps must be N x H x W (or N x 1 x H x W) with N = {x.shape[0]}, got "
                             f"{tuple(maps.shape)}; pick one target's maps, e.g. maps[:, 0]")
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    x = x.detach()
    idx = pinned_class(model, x, target, "deletion_insertion")
    n, hw = x.shape[0], x.shape[-1] * x.shape[-2]
    ranks = pixel_ranks(m).to(x.device)
    base_del = torch.as_tensor(deletion_baseline, dtype=x.dtype, device=x.device).expand_as(x)
    base_ins = gaussian_blur(x, blur_sigma or max(x.shape[-2:]) / 20)
    counts = [round(t * hw / steps) for t in range(steps + 1)]
    jobs = [(curve, t, i) for curve in (0, 1) for t in range(steps + 1) for i in range(n)]
    probs = torch.empty(2, steps + 1, n)
    bar = tqdm(total=len(jobs), desc="deletion/insertion", unit="image",
               disable=progress is False or (progress is None and len(jobs) < 512))
    with torch.no_grad(), preserved_state(model):
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            batch = []
            for curve, t, i in chunk:
                top = (ranks[i] < counts[t])[None]  # the counts[t] most salient pixels
                batch.append(torch.where(top, base_del[i], x[i]) if curve == 0 else torch.where(top, x[i], base_ins[i]))
            p = F.softmax(model(torch.stack(batch)).float(), dim=1)
            for (curve, t, i), row in zip(chunk, p):
                probs[curve, t, i] = row[idx[i]]
            bar.update(len(chunk))
    bar.close()
    dele, ins = probs[0].T.contiguous(), probs[1].T.contiguous()
    return DeletionInsertion(dele, ins, torch.trapezoid(dele, dx=1 / steps), torch.trapezoid(ins, dx=1 / steps),
                             idx.cpu())


@dataclass(frozen=True)
class Randomization:
    """Cascading randomization: ``layers[j]`` is the last layer re-initialized for row ``j``; ``spearman`` and
    ``spearman_abs`` are ``L x N`` rank correlations with the original maps (signed maps, and their absolute
    values); ``maps`` holds ``L + 1`` map batches, the original first."""

    layers: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    maps: list[torch.Tensor]


def randomizable_layers(model: nn.Module) -> list[str]:
    """Conv and linear layers (modules with a weight of 2+ dimensions and ``reset_parameters``), top-down (the
    reverse of their order of registration, which is the forward order for sequential networks)."""
    names = [n for n, mod in model.named_modules() if n and hasattr(mod, "reset_parameters")
             and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() >= 2]
    return names[::-1]


def model_randomization(model: nn.Module, x: torch.Tensor,
                        explain: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                        layers: Sequence[str] | None = None, seed: int = 0,
                        progress: bool | None = None) -> Randomization:
    """Adebayo et al. (2018) cascading randomization on a deep copy of ``model`` (the model is untouched).

    ``explain(model, x)`` returns maps ``N x ...`` (pin the target class yourself, e.g. to the true labels, so it
    does not follow the randomized network's prediction). ``layers`` (default :func:`randomizable_layers`) are
    re-initialized cumulatively in the given order with each module's ``reset_parameters`` under ``seed``.
    """
    check_input(x, "model_randomization")
    names = list(layers) if layers is not None else randomizable_layers(model)
    if not names:
        raise ConvscopeError("no conv or linear layers with reset_parameters() to randomize; pass layers=[...]")
    for n in names:
        resolve_layer(model, n)
    original = explain(model, x).detach().float()
    work = copy.deepcopy(model)
    mods = dict(work.named_modules())
    rows, rows_abs, maps = [], [], [original]
    for j, name in enumerate(tqdm(names, desc="randomize", disable=progress is False or (progress is None
                                                                                           and len(names) < 8))):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed * 1_000_003 + j)
            mods[name].reset_parameters()
        got = explain(work, x).detach().float()
        maps.append(got)
        a, b = original.flatten(1), got.flatten(1)
        rows.append(spearman(a, b).float())
        rows_abs.append(spearman(a.abs(), b.abs()).float())
    return Randomization(names, torch.stack(rows), torch.stack(rows_abs), maps)
