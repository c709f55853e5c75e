"""Targets: which output score a method explains.

A target is a class index (``int``), one per image (list or 1-D tensor), several per image (list of lists or an
``N x K`` tensor: one forward pass, K backward passes batched), :func:`top_class` / :func:`top_k`, or any
callable on the model output returning either indices (integer tensor) or scores (float tensor ``N`` or
``N x K``). Scores are logits, never softmax probabilities (Simonyan et al. 2014, Sec. 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from ..errors import TargetError

Target = Union[int, Sequence[int], Sequence[Sequence[int]], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def top_class(output: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class of each image."""
    return output.argmax(dim=1)


def top_k(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``k`` highest-scoring classes of each image (``N x k`` targets); ``k`` must be at least 1 and at most the
    model's number of outputs (checked when the target is resolved on an output)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TargetError(f"top_k({k!r}): k is how many top classes to explain per image; give an int >= 1, "
                          "e.g. top_k(5)")

    def pick(output: torch.Tensor) -> torch.Tensor:
        flat = output.reshape(output.shape[0], -1)
        if k > flat.shape[1]:
            raise TargetError(f"top_k({k}) asks for {k} classes but the model has {flat.shape[1]} outputs; "
                              f"use k <= {flat.shape[1]}")
        return flat.topk(k, dim=1).indices
    pick.__name__ = f"top_{k}"
    return pick


def target_scores(output: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scores N x K, indices N x K or None)`` for a target on a model output ``N x C`` (or ``N x ...``)."""
    n = output.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        picked = target(output)
        if not isinstance(picked, torch.Tensor):
            raise TargetError(f"a target callable must return a tensor, got {type(picked).__name__}")
        if picked.is_floating_point():
            scores = picked.reshape(n, -1) if picked.dim() > 0 else picked.expand(n).reshape(n, 1)
            if scores.shape[0] != n:
                raise TargetError(f"a target callable returned scores of shape {tuple(picked.shape)}; "
                                  f"expected ({n},) or ({n}, K)")
            return scores, None
        target = picked.detach()
    idx = _indices(target, n, output.device)
    flat = output.reshape(n, -1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= flat.shape[1]):
        raise TargetError(f"target index {int(idx.max() if idx.max() >= flat.shape[1] else idx.min())} is out of "
                          f"range: the model has {flat.shape[1]} outputs (valid 0..{flat.shape[1] - 1})")
    return flat.gather(1, idx), idx


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


def _grad(out: torch.Tensor, inputs: Sequence[torch.Tensor], **kw: object) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(out, list(inputs), allow_unused=True, **kw)  # type: ignore[arg-type]
    return tuple(torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads))
