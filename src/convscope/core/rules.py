"""Backward rules as objects: torch functions whose forward value is kept but whose backward is replaced.

A rule maps torch *functions* (not module types) to a replacement backward, and the probe applies every rule it
is given through one ``TorchFunctionMode`` (:class:`RuleMode`), so module and functional forms, in place or not,
all follow it (``nn.ReLU``, ``F.relu``, ``torch.relu_``, ``x.relu()``, ``nn.ReLU6``, ``F.hardtanh(x, 0, 6)``).
The explicit DeconvNet chain (:func:`convscope.methods.deconvnet.chain_down`) applies the same objects' backward.

* :data:`GUIDED`: guided backpropagation, ``g_in = max(g_out, 0) * 1[lo < x < hi]`` (Springenberg et al. 2015,
  Fig. 1);
* :data:`DECONVNET`: the DeconvNet rectification, ``g_in = max(g_out, 0)`` whatever the forward pass did (Zeiler &
  Fergus 2014, Sec. 2.1);
* :data:`LRN_PASS_THROUGH`: local response normalization passes the backward signal unchanged (the DeconvNet does
  not invert it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DECONVNET", "GUIDED", "LRN_PASS_THROUGH", "RELU_RULES", "BackwardRule", "PassThrough", "ReLURule",
           "RuleMode", "relu_rule"]


class BackwardRule:
    """A replacement backward for some torch functions. ``functions``: the torch functions it handles;
    :meth:`call` computes ``func(*args, **kwargs)``'s forward value with the rule's backward attached."""

    name: str = "rule"
    functions: frozenset[Callable[..., Any]] = frozenset()

    def call(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _ClampWithRule(torch.autograd.Function):
    """Clamp to ``[lo, hi]`` forward; :meth:`ReLURule.backward` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float | None, rule: ReLURule) -> torch.Tensor:
        ctx.rule, ctx.lo, ctx.hi = rule, lo, hi
        y = x.clamp(min=lo, max=hi)
        if rule.needs_forward:
            # the mask lo < x < hi equals lo < y < hi; saving y (not x) lets an in-place relu_ overwrite x
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        y = ctx.saved_tensors[0] if ctx.rule.needs_forward else None
        return ctx.rule.backward(grad, y, ctx.lo, ctx.hi), None, None, None


_RELU: frozenset[Callable[..., Any]] = frozenset({F.relu, torch.relu, torch.Tensor.relu})
_RELU_: frozenset[Callable[..., Any]] = frozenset({torch.relu_, torch.Tensor.relu_, F.relu_})
_HARDTANH: frozenset[Callable[..., Any]] = frozenset({F.hardtanh, F.relu6})
_HARDTANH_: frozenset[Callable[..., Any]] = frozenset(
    {F.hardtanh_, *((torch._C._nn.hardtanh_,) if hasattr(torch._C._nn, "hardtanh_") else ())})


class ReLURule(BackwardRule):
    """A backward rule for every ReLU-like clamp: ReLU and ReLU6 / ``hardtanh`` with a lower bound of 0."""

    functions = _RELU | _RELU_ | _HARDTANH | _HARDTANH_

    def __init__(self, name: str, positive_forward: bool) -> None:
        self.name = name
        self.needs_forward = positive_forward  # guided: also gate by where the forward clamp was open

    def backward(self, grad: torch.Tensor, y: torch.Tensor | None, lo: float = 0.0,
                 hi: float | None = None) -> torch.Tensor:
        """The rule's ``g_in`` for ``g_out = grad``; ``y`` is the clamp's output (used by the guided rule only)."""
        g = grad.clamp(min=0)
        if self.needs_forward:
            assert y is not None
            mask = y > lo
            if hi is not None:
                mask &= y < hi
            g = g * mask
        return g

    def call(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if func in _RELU or func in _RELU_:
            inplace = func in _RELU_ or kwargs.get("inplace", False) or (len(args) > 1 and args[1] is True)
            return self._apply(args[0], 0.0, None, bool(inplace))
        if func is F.relu6:
            return self._apply(args[0], 0.0, 6.0, bool(kwargs.get("inplace", args[1] if len(args) > 1 else False)))
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        if lo != 0.0:  # a hardtanh that is not a ReLU6-style clamp keeps its own backward
            return func(*args, **kwargs)
        inplace = func in _HARDTANH_ or kwargs.get("inplace", args[3] if len(args) > 3 else False)
        return self._apply(args[0], 0.0, float(hi), bool(inplace))

    def _apply(self, x: torch.Tensor, lo: float, hi: float | None, inplace: bool) -> torch.Tensor:
        y = _ClampWithRule.apply(x, lo, hi, self)
        if inplace:
            with torch.no_grad() if not x.requires_grad else contextlib.nullcontext():
                return x.copy_(y)
        return y


class PassThrough(BackwardRule):
    """The functions keep their forward value; the backward signal passes through them unchanged."""

    def __init__(self, name: str, functions: Sequence[Callable[..., Any]]) -> None:
        self.name = name
        self.functions = frozenset(functions)

    def call(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        x = args[0]
        return x + (out - x).detach()


GUIDED = ReLURule("guided", positive_forward=True)
DECONVNET = ReLURule("deconvnet", positive_forward=False)
LRN_PASS_THROUGH = PassThrough("lrn-pass-through", [F.local_response_norm])

_BY_NAME = {r.name: r for r in (GUIDED, DECONVNET)}
RELU_RULES = tuple(_BY_NAME)
"""The names of the ReLU backward rules (``relu_rule=`` of the probe and the gradient methods)."""


def relu_rule(name: str) -> ReLURule:
    """The ReLU rule called ``name`` (one of :data:`RELU_RULES`)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"relu_rule must be one of {RELU_RULES} or None, not {name!r}") from None


class RuleMode(TorchFunctionMode):
    """Routes each torch function call to the first rule that handles it (others run as they are)."""

    def __init__(self, rules: Sequence[BackwardRule]) -> None:
        super().__init__()
        self.table: dict[Callable[..., Any], BackwardRule] = {}
        for rule in reversed(list(rules)):
            self.table.update(dict.fromkeys(rule.functions, rule))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = self.table.get(func)
        kwargs = kwargs or {}
        if rule is None:
            return func(*args, **kwargs)
        return rule.call(func, args, kwargs)
