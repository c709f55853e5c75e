"""Objectives of the image-optimization loop: one value per image from the activations of named layers, with the
layers they read (so only those are hooked, and the forward pass stops after the deepest one). They form a small
algebra (``+``, ``-``, ``*`` scalar) as in Lucid (Olah et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeGuard

import torch


class Objective:
    """One value per image from the activations of named layers (``acts[layer]``, ``acts[OUTPUT]`` the output,
    :data:`convscope.core.layers.OUTPUT`).

    ``o1 + o2``, ``o1 - o2``, ``-o``, ``2.0 * o``, ``o / 2`` and ``sum([...])`` give new objectives that read the
    union of the layers.
    """

    __slots__ = ("fn", "layers", "name")

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], layers: Sequence[str],
                 name: str = "objective") -> None:
        self.fn = fn
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) + other(a), self.layers + other.layers, f"{self.name} + {other.name}")
        if _is_scalar(other):
            return Objective(lambda a: self(a) + other, self.layers, f"{self.name} + {other}")
        return NotImplemented

    def __radd__(self, other: object) -> Objective:
        return self if _is_scalar(other) and other == 0 else self.__add__(other)  # sum() starts from 0

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.name})")

    def __sub__(self, other: object) -> Objective:
        if isinstance(other, Objective) or _is_scalar(other):
            return self + (-other)
        return NotImplemented

    def __rsub__(self, other: object) -> Objective:
        return (-self) + other if _is_scalar(other) else NotImplemented

    def __mul__(self, k: object) -> Objective:
        if not _is_scalar(k):
            return NotImplemented
        return Objective(lambda a: k * self(a), self.layers, f"{k} * ({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> Objective:
        return self * (1.0 / k) if _is_scalar(k) and k != 0 else NotImplemented


def _is_scalar(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def activation_l2(layer: str) -> Objective:
    """``0.5 * ||A_layer(x)||_2^2`` per image: the squared L2 norm of a whole layer's activation, whose gradient
    at the layer is the activation itself (DeepDream's ``objective_L2``, Mordvintsev et al. 2015)."""
    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * acts[layer].flatten(1).pow(2).sum(1)
    return Objective(fn, [layer], f"l2({layer!r})")
