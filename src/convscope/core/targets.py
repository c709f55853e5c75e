"""Targets: which output score a method explains, and which part of a model's output holds the scores.

A target is a class index (``int``), one per image (list or 1-D tensor), several per image (list of lists or an
``N x K`` tensor: one forward pass, K backward passes batched), :func:`top_class` / :func:`top_k`, or any
callable on the model output returning either indices (integer tensor) or scores (float tensor ``N`` or
``N x K``). Scores are logits, never softmax probabilities (Simonyan et al. 2014, Sec. 2).

Outputs. A model may return a tensor, or a tuple, list, dict, named tuple or dataclass of them (nested too).
:func:`select_output` picks the scores: by default the only ``N x K`` (2-D) tensor in the output; when there are
several, ``target=output("logits")`` (or an index, a path tuple, or a callable) names it, and the inner target
(default :func:`top_class`) is applied to that tensor. Index targets read the default selection; callables get
the whole output (:func:`top_class` / :func:`top_k` select it themselves).

Segmentation and detection: :func:`segmentation` scores a class over a pixel mask of an ``N x K x H x W``
output; :func:`detection` scores boxes of a box-predicting output (conventions in its docstring). Any callable
``output -> N (or N x K) scores`` works as a target too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union, cast

import torch

from ..errors import TargetError

Target = Union[int, Sequence[int], Sequence[Sequence[int]], torch.Tensor, Callable[[Any], torch.Tensor]]
OutputKey = Union[str, int, Sequence[Union[str, int]], Callable[[Any], torch.Tensor]]
"""Which tensor of a model output: a dict key / field name, a tuple index, a path ``(1, "aux")``, or a callable."""

_MAX_DEPTH = 6


def tensor_leaves(out: Any) -> list[tuple[tuple[str | int, ...], torch.Tensor]]:
    """Every tensor in a (nested) model output with its path: dict keys, named-tuple / dataclass field names, tuple
    and list indices (``[((), out)]`` for a bare tensor)."""
    found: list[tuple[tuple[str | int, ...], torch.Tensor]] = []

    def walk(obj: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
        elif len(path) >= _MAX_DEPTH:
            return
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, (*path, k))
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
            for k in obj._fields:
                walk(getattr(obj, k), (*path, k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, (*path, i))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), (*path, f.name))

    walk(out, ())
    return found


def format_path(path: Sequence[str | int]) -> str:
    """A path as it is passed to ``output(...)``: ``'logits'``, ``0``, ``(1, 'aux')``."""
    return repr(path[0]) if len(path) == 1 else repr(tuple(path))


def select_output(out: Any, output: OutputKey | None = None, dim: int = 2) -> torch.Tensor:
    """The scores tensor of a model output (a tensor, or a tuple/list/dict/named tuple/dataclass of them).

    ``output``: a dict key or field name, a tuple index (a string of digits counts as an index: ``--output 0``),
    a path through nested containers ``(1, "aux")``, or a callable ``out -> tensor``. Default: a bare tensor is
    itself; in a container the only tensor, else the only ``dim``-D tensor (``N x K`` scores for ``dim=2``); when
    none or several fit, a one-line :class:`TargetError` lists every tensor (path and shape) and says to pass
    ``output=``.
    """
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        leaves = tensor_leaves(out)
        if len(leaves) == 1:
            return leaves[0][1]
        fits = [(p, t) for p, t in leaves if t.dim() == dim]
        if len(fits) == 1:
            return fits[0][1]
        if not leaves:
            raise TargetError(f"the model returned a {type(out).__name__} with no tensor in it; make its forward "
                              "return the scores (a tensor, or a tuple/dict holding one)")
        listing = ", ".join(f"{format_path(p)}: {tuple(t.shape)}" for p, t in leaves)
        what = f"{len(fits)} of them {dim}-D" if fits else f"none {dim}-D"
        raise TargetError(f"the model returned {len(leaves)} tensors ({listing}), {what}; say which holds the "
                          "scores: target=cs.targets.output(KEY) (CLI: --output KEY)")
    if isinstance(out, torch.Tensor) and not callable(output):
        return out  # a bare tensor is already the scores (e.g. picked earlier by scores_of): keys apply to containers
    if callable(output) and not isinstance(output, (str, int)):
        picked = output(out)
        where = getattr(output, "__name__", "the output= callable")
    else:
        path: list[str | int] = list(output) if isinstance(output, (tuple, list)) else [cast("str | int", output)]
        picked = out
        for i, key in enumerate(path):
            picked = _child(picked, key, path[:i])
        where = format_path(path)
    if not isinstance(picked, torch.Tensor):
        raise TargetError(f"output {where} is a {type(picked).__name__}, not a tensor; pick a tensor of the model "
                          f"output (it holds: {_listing(out)})")
    return picked


def _listing(out: Any) -> str:
    leaves = tensor_leaves(out)
    return ", ".join(f"{format_path(p) if p else 'the output'}: {tuple(t.shape)}" for p, t in leaves) or "no tensor"


def _child(obj: Any, key: Any, done: Sequence[str | int]) -> Any:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TargetError(f"output key {key!r} must be a str (dict key or field name) or an int (tuple index)")
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
        if isinstance(key, str) and key.lstrip("-").isdigit() and int(key) in obj:
            return obj[int(key)]
        keys = list(obj.keys())
    elif isinstance(obj, (tuple, list)):
        if isinstance(key, str) and hasattr(obj, "_fields") and key in obj._fields:
            return getattr(obj, key)
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        if isinstance(key, int) and -len(obj) <= key < len(obj):
            return obj[key]
        keys = list(getattr(obj, "_fields", range(len(obj))))
    elif isinstance(key, str) and not isinstance(obj, torch.Tensor) and hasattr(obj, key):
        return getattr(obj, key)
    else:
        keys = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    at = f" at {format_path(done)}" if done else ""
    raise TargetError(f"the model output{at} is a {type(obj).__name__} with no {key!r}; use one of "
                      f"{', '.join(repr(k) for k in keys) or 'nothing (it holds no keys)'}")


@dataclasses.dataclass(frozen=True, eq=False)
class OutputTarget:
    """A target read from one tensor of a multi-output model: :func:`select_output` with ``output``, then ``target``
    on that tensor. Made by :func:`output`; :func:`target_scores` keeps the class indices of the inner target."""

    output: OutputKey
    target: Target

    def __call__(self, out: Any) -> torch.Tensor:
        return target_scores(out, self)[0]

    @property
    def __name__(self) -> str:  # labels in reports and progress bars
        inner = getattr(self.target, "__name__", repr(self.target))
        key = getattr(self.output, "__name__", repr(self.output))
        return f"output({key}, {inner})"

    def __getitem__(self, rows: Any) -> OutputTarget:
        """Rows of pinned indices (the same output), like indexing an ``N x K`` index tensor."""
        return OutputTarget(self.output, self._pinned()[rows])

    def repeat(self, *sizes: int) -> OutputTarget:
        """Pinned indices repeated like ``Tensor.repeat`` (the same output)."""
        return OutputTarget(self.output, self._pinned().repeat(*sizes))

    def _pinned(self) -> torch.Tensor:
        if not isinstance(self.target, torch.Tensor):
            raise TargetError("only an output(...) target with pinned class indices can be sliced")
        return self.target


def output(key: OutputKey, target: Target | None = None) -> OutputTarget:
    """A target on one tensor of a multi-output model: ``gradcam(m, x, target=output("logits"))``.

    ``key``: a dict key / field name, a tuple index, a path ``(1, "aux")`` or a callable ``out -> tensor`` (see
    :func:`select_output`); ``target``: any target applied to that tensor (default :func:`top_class`).
    """
    if not (callable(key) or isinstance(key, (str, int, tuple, list))) or isinstance(key, bool):
        raise TargetError(f"output({key!r}): give a dict key or field name (str), a tuple index (int), a path tuple "
                          "or a callable")
    return OutputTarget(key, top_class if target is None else target)


def pinned(target: Target, indices: torch.Tensor) -> torch.Tensor | OutputTarget:
    """Class indices fixed on the clean images, kept on the same output when ``target`` was an :func:`output`
    target (for :func:`convscope.core.attribution.pinned_target`)."""
    return OutputTarget(target.output, indices) if isinstance(target, OutputTarget) else indices


def pinned_indices(target: Target) -> torch.Tensor | None:
    """The ``N x K`` class indices a pinned target holds (an index tensor, or an :func:`output` target pinned by
    :func:`pinned`), else ``None`` (a score function)."""
    if isinstance(target, OutputTarget):
        return target.target if isinstance(target.target, torch.Tensor) else None
    return target if isinstance(target, torch.Tensor) else None


def scores_of(out: Any, target: Target) -> torch.Tensor:
    """The tensor of a model output that ``target`` reads: the :func:`output` target's choice, else the default
    :func:`select_output` (for methods that read the output beside :func:`target_scores`, e.g. a softmax)."""
    return select_output(out, target.output if isinstance(target, OutputTarget) else None)


def top_class(output: Any) -> torch.Tensor:
    """The highest-scoring class of each image (of the scores tensor :func:`select_output` picks)."""
    return select_output(output).argmax(dim=1)


def top_k(k: int) -> Callable[[Any], torch.Tensor]:
    """The ``k`` highest-scoring classes of each image (``N x k`` targets); ``k`` must be at least 1 and at most the
    model's number of outputs (checked when the target is resolved on an output)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TargetError(f"top_k({k!r}): k is how many top classes to explain per image; give an int >= 1, "
                          "e.g. top_k(5)")

    def pick(output: Any) -> torch.Tensor:
        scores = select_output(output)
        flat = scores.reshape(scores.shape[0], -1)
        if k > flat.shape[1]:
            raise TargetError(f"top_k({k}) asks for {k} classes but the model has {flat.shape[1]} outputs; "
                              f"use k <= {flat.shape[1]}")
        return flat.topk(k, dim=1).indices
    pick.__name__ = f"top_{k}"
    return pick


def target_scores(output: Any, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scores N x K, indices N x K or None)`` for a target on a model output ``N x C`` (or ``N x ...``, or a
    container of tensors: see :func:`select_output`)."""
    if isinstance(target, OutputTarget):
        return target_scores(select_output(output, target.output), target.target)
    if callable(target) and not isinstance(target, torch.Tensor):
        picked = target(output)
        if not isinstance(picked, torch.Tensor):
            raise TargetError(f"a target callable must return a tensor, got {type(picked).__name__}")
        if picked.is_floating_point():
            n = _batch_size(output, picked)
            if picked.dim() == 0 and isinstance(output, torch.Tensor):
                scores = picked.expand(n).reshape(n, 1)
            elif picked.dim() == 0 or picked.shape[0] != n:
                want = f"({n},) or ({n}, K)" if n > 0 else "N or N x K"
                raise TargetError(f"a target callable returned scores of shape {tuple(picked.shape)}; expected "
                                  f"{want}: one score (or K) per image")
            else:
                scores = picked.reshape(n, -1)
            return scores, None
        target = picked.detach()
    scores_out = select_output(output)
    n = scores_out.shape[0]
    idx = _indices(target, n, scores_out.device)
    flat = scores_out.reshape(n, -1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= flat.shape[1]):
        raise TargetError(f"target index {int(idx.max() if idx.max() >= flat.shape[1] else idx.min())} is out of "
                          f"range: the model has {flat.shape[1]} outputs (valid 0..{flat.shape[1] - 1})")
    return flat.gather(1, idx), idx


def _batch_size(output: Any, picked: torch.Tensor) -> int:
    """N for scores a callable returned: the output's batch size where it is a tensor or a list of per-image
    results (torchvision detection), else the scores' own first dimension."""
    if isinstance(output, torch.Tensor):
        return output.shape[0]
    if isinstance(output, list) and output and all(isinstance(o, Mapping) for o in output):
        return len(output)
    return picked.shape[0] if picked.dim() > 0 else -1


def _int_list(value: int | Sequence[int], what: str, example: str) -> list[int]:
    items = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if isinstance(value, bool) or not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                   for v in items):
        raise TargetError(f"{what}={value!r}): give an int >= 0 or a non-empty list of them, e.g. {example}")
    return items


def segmentation(cls: int | Sequence[int], mask: torch.Tensor | None = None,
                 output: OutputKey | None = None) -> Callable[[Any], torch.Tensor]:
    """A target for a segmentation output ``N x K x H x W``: the class logits summed over a pixel mask.

    The convention of pytorch-grad-cam's ``SemanticSegmentationTarget``: ``score_c = sum_ij M_ij y_c,ij`` (a sum,
    not a mean, of the class logits over the mask). ``cls``: a class index, or several (``N x K`` scores, one pass).
    ``mask``: ``H x W``, ``N x H x W`` or ``N x 1 x H x W`` (bool or float weights) at the output's resolution;
    default: the pixels where class ``c`` wins (``argmax_k y_k = c``), taken from each output the target is
    applied to (perturbation methods apply it to every altered copy: pass ``mask=`` to fix the region). A class
    that wins nowhere scores 0 (a zero map, never NaN). ``output``: which tensor of a multi-output model
    (default: the only 4-D one, see :func:`select_output`).
    """
    classes = _int_list(cls, "segmentation(cls", "segmentation(3) or segmentation([1, 3])")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3, 4)):
        raise TargetError(f"segmentation(mask=...) must be a tensor H x W, N x H x W or N x 1 x H x W, got "
                          f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")

    def score(out: Any) -> torch.Tensor:
        y = select_output(out, output, dim=4)
        if y.dim() != 4:
            raise TargetError(f"segmentation(...) needs a segmentation output N x K x H x W, got {tuple(y.shape)}; "
                              "use a class index or top_class for classifiers")
        if max(classes) >= y.shape[1]:
            raise TargetError(f"segmentation class {max(classes)} is out of range: the output has {y.shape[1]} "
                              f"classes (valid 0..{y.shape[1] - 1})")
        idx = torch.tensor(classes, device=y.device)
        if mask is None:
            m = (y.detach().argmax(dim=1, keepdim=True) == idx.view(1, -1, 1, 1)).to(y.dtype)  # N K H W
        else:
            m = mask.to(device=y.device, dtype=y.dtype)
            m = m[None, None] if m.dim() == 2 else m[:, None] if m.dim() == 3 else m  # -> (1 or N) x 1 x H x W
            if m.shape[1] != 1 or m.shape[-2:] != y.shape[-2:] or m.shape[0] not in (1, y.shape[0]):
                raise TargetError(f"segmentation mask of shape {tuple(mask.shape)} does not fit the output "
                                  f"{tuple(y.shape)}; give H x W = {tuple(y.shape[-2:])} (or N x H x W)")
        return (y[:, idx] * m).sum(dim=(2, 3))

    score.__name__ = f"segmentation_{'_'.join(map(str, classes))}"
    return score


def detection(box_index: int | Sequence[int] = 0, cls: int | None = None,
              score_key: str = "scores") -> Callable[[Any], torch.Tensor]:
    """A target for a box-predicting output: the score of box ``box_index`` (several: ``N x K``) of each image.

    Conventions (the first that fits):

    * a tensor ``N x B x (4 + C)``: per box 4 coordinates then ``C`` class scores (logits); the box's score is
      class ``cls``'s, or its best class's when ``cls`` is None;
    * a dict / named tuple / dataclass with ``score_key``: ``N x B`` (one score per box) or ``N x B x C`` (class
      scores, read as above);
    * a list of N per-image dicts (torchvision's detection models): ``d[score_key]`` is ``B_i`` or ``B_i x C``.

    Boxes are taken in the model's order (detectors sort them by score, so ``box_index=0`` is the most confident
    one). Any callable ``output -> N scores`` is a target too, for other formats.
    """
    boxes = _int_list(box_index, "detection(box_index", "detection(0) or detection([0, 1])")
    if cls is not None and (isinstance(cls, bool) or not isinstance(cls, int) or cls < 0):
        raise TargetError(f"detection(cls={cls!r}): give a class index >= 0, or None for each box's best class")

    def per_box(s: torch.Tensor, classes: bool, where: str) -> torch.Tensor:  # (.., B[, C]) -> (.., B)
        if not classes:
            if cls is not None:
                raise TargetError(f"detection(cls={cls}) needs class scores per box, but {where} holds one score per "
                                  "box; drop cls=")
            return s
        if cls is not None and cls >= s.shape[-1]:
            raise TargetError(f"detection class {cls} is out of range: {where} has {s.shape[-1]} classes")
        return s[..., cls] if cls is not None else s.amax(dim=-1)

    def pick(s: torch.Tensor, what: str) -> torch.Tensor:  # (..., B) -> (..., len(boxes))
        if max(boxes) >= s.shape[-1]:
            raise TargetError(f"detection box {max(boxes)} does not exist: {what} has {s.shape[-1]} boxes; use "
                              f"box_index < {s.shape[-1]}")
        return s[..., boxes]

    def score(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            if out.dim() != 3 or out.shape[-1] < 5:
                raise TargetError(f"detection(...) reads a tensor output as N x B x (4 + C), got {tuple(out.shape)}; "
                                  "return a dict with 'boxes' and 'scores' or pass a callable target")
            return pick(per_box(out[..., 4:], True, "the output"), "the output")
        if isinstance(out, list) and out and all(isinstance(o, Mapping) for o in out):
            rows = []
            for i, d in enumerate(out):
                if score_key not in d:
                    raise TargetError(f"detection(score_key={score_key!r}): image {i}'s output has keys "
                                      f"{', '.join(map(repr, d))}; pass score_key=")
                s = d[score_key]
                rows.append(pick(per_box(s, s.dim() == 2, f"image {i}'s {score_key!r}"), f"image {i}"))
            return torch.stack(rows)
        s = select_output(out, score_key)
        if s.dim() not in (2, 3):
            raise TargetError(f"detection: {score_key!r} has shape {tuple(s.shape)}; expected N x B or N x B x C")
        return pick(per_box(s, s.dim() == 3, repr(score_key)), repr(score_key))

    score.__name__ = f"detection_{'_'.join(map(str, boxes))}"
    return score


def class_indices(target: Target, n: int, device: torch.device) -> torch.Tensor | None:
    """The ``N x K`` class indices an explicit target names (an int, a list, a tensor), without running the model;
    ``None`` for targets that need the output (callables such as ``top_class``, :func:`output` targets). Indices are
    checked against the number of classes when scores are read (:func:`target_scores`)."""
    if isinstance(target, (int, list, tuple, torch.Tensor)) and not isinstance(target, bool):
        return _indices(target, n, device)
    return None


def _indices(target: Target, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(target, bool):
        raise TargetError("a target must be a class index, not a bool")
    if isinstance(target, int):
        return torch.full((n, 1), target, dtype=torch.long, device=device)
    if target is None:
        raise TargetError("target=None: give a class index, a list of indices (one per image), cs.top_class or "
                          "cs.top_k(k)")
    try:
        t = torch.as_tensor(target, device=device) if not isinstance(target, torch.Tensor) else target.to(device)
    except (RuntimeError, TypeError, ValueError):
        if isinstance(target, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in target):
            raise TargetError(f"targets {target!r} give images different numbers of classes "
                              f"({sorted({len(r) for r in target})}); give the same number K for every image") from None
        raise TargetError(f"target {target!r} is not a class index; give an int, a list of ints (one per image), "
                          "cs.top_class or cs.top_k(k)") from None
    if t.is_floating_point():
        raise TargetError("target indices must be integers; pass a callable to give scores")
    t = t.long()
    if t.dim() == 0:
        return t.expand(n).reshape(n, 1)
    if t.dim() == 1:
        if t.shape[0] != n:
            raise TargetError(f"got {t.shape[0]} targets for {n} images; give one per image, one int for all, "
                              "or a list of lists for several per image")
        return t.reshape(n, 1)
    if t.dim() == 2 and t.shape[0] == n:
        return t
    raise TargetError(f"targets of shape {tuple(t.shape)} do not fit {n} images; expected ({n},) or ({n}, K)")


def batched_grad(scores: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of each of the K columns of ``scores`` (N x K) w.r.t. ``inputs``: ``K x (input shape)`` each.

    One forward pass, K vector-Jacobian products batched with ``is_grads_batched`` (vmap over the backward
    pass); falls back to a loop over K where an operation has no batching rule. Images are independent, so
    summing over the batch gives every image its own gradient.
    """
    k = scores.shape[1]
    if k == 1:
        return [g.unsqueeze(0) for g in _grad(scores.sum(), inputs)]
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_outputs = eye[:, None, :].expand(k, scores.shape[0], k)
    try:
        return list(_grad(scores, inputs, grad_outputs=grad_outputs, is_grads_batched=True))
    except RuntimeError:
        per_k = [_grad(scores[:, j].sum(), inputs, retain_graph=True) for j in range(k)]
        return [torch.stack([g[i] for g in per_k]) for i in range(len(inputs))]


def _grad(out: torch.Tensor, inputs: Sequence[torch.Tensor], **kw: Any) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(out, list(inputs), allow_unused=True, **kw)
    return tuple(torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads))
