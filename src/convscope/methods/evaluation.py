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

Both come in a ``_many`` form that scores several methods' maps in one batched pass (what ``convscope evaluate
attribution`` uses); the single-method functions call it.

The pointing game and mask IoU live in :mod:`convscope.data.groundtruth` (they need ground-truth masks).
Every function leaves the model as it came (randomization works on a copy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input, pinned_class
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.imageops import gaussian_blur, spearman
from ..core.layers import resolve_layer
from ..core.probe import preserved_state
from ..core.progress import ProgressBar, progress_bar
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
                       steps: int = 32, batch_size: BatchSize = "auto", deletion_baseline: torch.Tensor | float = 0.0,
                       blur_sigma: float | None = None, progress: bool | None = None) -> DeletionInsertion:
    """Deletion and insertion curves of saliency ``maps`` (``N x H x W`` or ``N x 1 x h x w``, resized
    bilinearly to the input) for one target per image. Costs ``2 * (steps - 1) + 3`` forward passes per image,
    batched ``batch_size`` images at a time (``"auto"``: :mod:`convscope.core.batching`). ``blur_sigma``
    (default: 1/20 of the image side) sets the
    insertion start. ``progress``: a bar over the forward passes (``None``: once the work has run for 2 s)."""
    return deletion_insertion_many(model, x, {"": maps}, target, steps, batch_size, deletion_baseline, blur_sigma,
                                   progress)[""]


def deletion_insertion_many(model: nn.Module, x: torch.Tensor, maps: Mapping[str, torch.Tensor],
                            target: Target = top_class, steps: int = 32, batch_size: BatchSize = "auto",
                            deletion_baseline: torch.Tensor | float = 0.0, blur_sigma: float | None = None,
                            progress: bool | None = None) -> dict[str, DeletionInsertion]:
    """:func:`deletion_insertion` for several methods' maps of the same images (``{name: maps}``), in one batched
    pass: the curve points that do not depend on the map (the clean image, the fully deleted image and the blurred
    insertion start) run once per image for all methods, and every other point of every method, image and step
    is one row of ``batch_size``-row forward passes. Equal to calling :func:`deletion_insertion` per method."""
    check_input(x, "deletion_insertion")
    if x.dim() != 4:
        raise ConvscopeError(f"deletion_insertion needs images N x C x H x W, got {tuple(x.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ConvscopeError(f"steps must be an int >= 1, got {steps!r}")
    check_batch_size(batch_size, "deletion_insertion")
    if not maps:
        raise ConvscopeError("deletion_insertion_many needs at least one set of maps, e.g. {'gradcam': maps}")
    x = x.detach()
    n, hw = x.shape[0], x.shape[-1] * x.shape[-2]
    ranks = torch.stack([pixel_ranks(_as_maps(m, x)) for m in maps.values()]).to(x.device)  # M x N x H x W
    base_del = torch.as_tensor(deletion_baseline, dtype=x.dtype, device=x.device).expand_as(x)
    base_ins = gaussian_blur(x, blur_sigma or max(x.shape[-2:]) / 20)
    counts = torch.tensor([round(t * hw / steps) for t in range(steps + 1)], device=x.device)
    inner = steps - 1  # points 1 .. steps - 1 of each curve depend on the map
    n_jobs = len(maps) * 2 * inner * n
    batch_size = resolve_batch_size(batch_size, model, x, "deletion_insertion", limit=max(3 * n, n_jobs))
    probs = torch.empty(len(maps), 2, steps + 1, n)
    with torch.no_grad(), preserved_state(model), \
            progress_bar(total=3 * n + n_jobs, desc="deletion/insertion", unit="image", progress=progress) as bar:
        fixed = _forward(model, torch.cat([x, base_del, base_ins]), batch_size, bar)  # 3N x classes
        idx = pinned_class(model, x, target, "deletion_insertion", output=fixed[:n])
        rows = torch.arange(3 * n, device=fixed.device)
        p = F.softmax(fixed.float(), dim=1)[rows, idx.repeat(3)].view(3, n).cpu()
        probs[:, 0, 0], probs[:, 1, steps] = p[0], p[0]  # nothing deleted / everything inserted: the image
        probs[:, 0, steps], probs[:, 1, 0] = p[1], p[2]  # everything deleted / nothing inserted: the baselines
        other = torch.stack([base_del.expand_as(x), base_ins])  # 2 x N x C x H x W: what a selected pixel becomes
        for start in range(0, n_jobs, batch_size):
            job = torch.arange(start, min(start + batch_size, n_jobs), device=x.device)
            m, rest = job // (2 * inner * n), job % (2 * inner * n)  # job order: method, curve, step, image
            c, t, i = rest // (inner * n), rest // n % inner + 1, rest % n
            top = ranks[m, i] < counts[t][:, None, None]  # the counts[t] most salient pixels
            keep = top ^ (c == 1)[:, None, None]  # deletion replaces the top pixels, insertion all the others
            batch = torch.where(keep[:, None], other[c, i], x[i])
            out = model(batch)
            probs[m.cpu(), c.cpu(), t.cpu(), i.cpu()] = F.softmax(out.float(), dim=1).gather(
                1, idx[i][:, None])[:, 0].cpu()
            bar.update(len(job))
    result = {}
    for j, name in enumerate(maps):
        dele, ins = probs[j, 0].T.contiguous(), probs[j, 1].T.contiguous()
        result[name] = DeletionInsertion(dele, ins, torch.trapezoid(dele, dx=1 / steps),
                                         torch.trapezoid(ins, dx=1 / steps), idx.cpu())
    return result


def _as_maps(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Saliency maps ``N x H x W`` at the input's size (``N x 1 x h x w`` accepted, resized bilinearly)."""
    m = maps.detach().float()
    m = m[:, 0] if m.dim() == 4 else m
    if m.dim() != 3 or m.shape[0] != x.shape[0]:
        raise ConvscopeError(f"maps must be N x H x W (or N x 1 x H x W) with N = {x.shape[0]}, got "
                             f"{tuple(maps.shape)}; pick one target's maps, e.g. maps[:, 0]")
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return m


def _forward(model: nn.Module, x: torch.Tensor, batch_size: int, bar: ProgressBar) -> torch.Tensor:
    outs = []
    for chunk in x.split(batch_size):
        outs.append(model(chunk))
        bar.update(len(chunk))
    return torch.cat(outs)


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
                        progress: bool | None = None, stages: Sequence[int] | None = None,
                        desc: str = "randomization") -> Randomization:
    """Adebayo et al. (2018) cascading randomization on a deep copy of ``model`` (the model is untouched).

    ``explain(model, x)`` returns maps ``N x ...`` (pin the target class yourself, e.g. to the true labels, so it
    does not follow the randomized network's prediction). ``layers`` (default :func:`randomizable_layers`) are
    re-initialized cumulatively in the given order with each module's ``reset_parameters`` under ``seed``.
    ``stages``: positions in the cascade to explain (``j``: after re-initializing ``layers[:j + 1]``; negative
    counts from the end, ``[0, -1]`` is top layer and all layers); default every one. Every layer is still
    re-initialized in turn, so a stage's maps do not depend on which other stages are explained. ``progress``: a
    bar over the maps computed, labelled ``desc`` (``None``: once the work has run for 2 s).
    """
    return model_randomization_many(model, x, {"": explain}, layers, seed, progress, stages, desc)[""]


def model_randomization_many(model: nn.Module, x: torch.Tensor,
                             explainers: Mapping[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]],
                             layers: Sequence[str] | None = None, seed: int = 0, progress: bool | None = None,
                             stages: Sequence[int] | None = None, desc: str = "randomization"
                             ) -> dict[str, Randomization]:
    """:func:`model_randomization` for several methods (``{name: explain}``) on one cascade: the model is copied
    and its layers re-initialized once, and every method explains each randomized network in turn. Equal to
    calling :func:`model_randomization` per method."""
    check_input(x, "model_randomization")
    names = list(layers) if layers is not None else randomizable_layers(model)
    if not names:
        raise ConvscopeError("no conv or linear layers with reset_parameters() to randomize; pass layers=[...]")
    for n in names:
        resolve_layer(model, n)
    if not explainers:
        raise ConvscopeError("model_randomization_many needs at least one explain function, e.g. {'saliency': fn}")
    wanted = _stages(stages, len(names))
    with progress_bar(total=len(explainers) * (len(wanted) + 1), desc=desc, unit="map",
                      progress=progress) as bar:
        original = {}
        for key, explain in explainers.items():
            original[key] = explain(model, x).detach().float()
            bar.update(1)
        work = copy.deepcopy(model)
        mods = dict(work.named_modules())
        got: dict[str, list[torch.Tensor]] = {key: [] for key in explainers}
        for j, name in enumerate(names[:max(wanted) + 1]):
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed * 1_000_003 + j)
                mods[name].reset_parameters()
            if j in wanted:
                for key, explain in explainers.items():
                    got[key].append(explain(work, x).detach().float())
                    bar.update(1)
    result = {}
    for key in explainers:
        a = original[key].flatten(1)
        rows = [spearman(a, b.flatten(1)).float() for b in got[key]]
        rows_abs = [spearman(a.abs(), b.flatten(1).abs()).float() for b in got[key]]
        result[key] = Randomization([names[j] for j in wanted], torch.stack(rows), torch.stack(rows_abs),
                                    [original[key], *got[key]])
    return result


def _stages(stages: Sequence[int] | None, n: int) -> list[int]:
    """Cascade positions, sorted, negatives counted from the end; a clear error when one is out of range."""
    if stages is None:
        return list(range(n))
    out = set()
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or not -n <= s < n:
            raise ConvscopeError(f"stages={list(stages)!r}: each must be an int in [{-n}, {n - 1}] for a cascade "
                                 f"of {n} layers (0: the top layer only, -1: all layers)")
        out.add(s % n)
    if not out:
        raise ConvscopeError("stages=[] explains nothing; pass e.g. [0, -1] (top layer, all layers) or None (all)")
    return sorted(out)
