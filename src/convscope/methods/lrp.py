"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2018, 2019).

The target score f_k(x) (a logit) is redistributed layer by layer onto the input pixels. At a layer
``z_k = sum_j a_j w_jk + b_k`` the relevance ``R_k`` arriving at output ``k`` is sent to the inputs by a rule
(Montavon et al. 2019, "Layer-wise relevance propagation: an overview", Sec. 10.2.1 and 10.3; Montavon et al. 2018,
"Methods for interpreting and understanding deep neural networks", Sec. 5):

* LRP-epsilon: ``R_j = sum_k a_j w_jk / (z_k + eps sign(z_k)) R_k`` (eps = 0: LRP-0);
* LRP-gamma: ``R_j = sum_k a_j (w_jk + gamma w_jk^+) / sum_j' a_j' (w_j'k + gamma w_j'k^+) R_k``, in the
  generalized form for inputs of either sign (zennit's ``Gamma``: positive and negative outputs use the matching
  parts);
* LRP-alpha-beta (Bach et al. 2015): ``R_j = sum_k (alpha (a_j w_jk)^+ / sum_j' (a_j' w_j'k)^+ - beta (a_j w_jk)^- /
  sum_j' (a_j' w_j'k)^-) R_k`` with ``alpha - beta = 1``; alpha=1, beta=0 is the z+ rule;
* z^B (Montavon et al. 2019, Sec. 10.3.2): ``R_i = sum_j (x_i w_ij - l_i w_ij^+ - h_i w_ij^-) / sum_i' (...) R_j`` for
  the first layer on pixels bounded by ``l <= x <= h``;
* flat (Lapuschkin et al. 2019) ``R_i = sum_j 1 / sum_i' 1 R_j`` and w^2 (Montavon et al. 2017)
  ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 R_j``, also for the first layer.

Every denominator is stabilized like zennit's (``d + eps sign(d)``, sign(0) = +1, eps = 1e-6 for every rule but
LRP-epsilon, which uses its own ``epsilon``). Composites (a rule per layer type, Montavon et al. 2019 Sec. 10.3):
``"epsilon"`` (epsilon everywhere), ``"epsilon_plus"`` (z+ on convolutions, epsilon on dense layers),
``"epsilon_plus_flat"`` (as ``epsilon_plus``, flat on the first conv/dense layer), ``"epsilon_gamma_box"`` (z^B on
the first layer, gamma on convolutions, epsilon on dense), ``"epsilon_alpha2_beta1"`` (alpha-beta on convolutions,
epsilon on dense), as zennit's composites of those names; the "first layer" is the first convolution or dense layer
to run. Or a dict ``{layer name or module type: rule}`` (a name wins over a type; unlisted conv/dense layers get
LRP-epsilon); a rule is a :class:`Rule` object or one of ``RULE_NAMES`` built from ``lrp``'s arguments.

Implementation: the "modified gradient" form (Montavon et al. 2019, Sec. 10.2.2: ``s_k = R_k / z_k``, ``c_j = [grad
(sum_k z_k(a) s_k)]_j`` with ``s`` held constant, ``R_j = a_j c_j``). Relevance is ``R = a * c`` for every tensor
``a`` of the forward pass, where ``c`` is what flows backwards instead of the gradient. A forward hook on each
conv/dense layer keeps the layer's output value but replaces its backward by the rule; every other operation keeps
its ordinary gradient, which is exactly LRP for it: ReLU passes relevance where it is open, max pooling sends it to
the winner, average pooling is a linear layer under LRP-0, and a residual sum ``a + b`` splits it in proportion to
the summands (``R_a = a c``, ``R_b = b c``). Element-wise activations (ReLU6 above 6, ELU, ...) pass relevance
unchanged (zennit's ``Pass``), and so does ``LocalResponseNorm`` (treated as the identity for relevance). Batch norm
that directly follows a conv/dense layer (its input is that layer's output, found in one traced forward pass) is
folded into it for the explanation only, on temporary tensors (zennit's ``SequentialMergeBatchNorm``); any other
batch norm passes relevance unchanged. Parameter-free modules and the functional code of container modules use their
ordinary gradient (a functional ``F.relu6`` therefore drops the relevance above 6; use the module form); a module with
parameters and no rule (LayerNorm, attention, a custom op) is refused with the fix. Unlike zennit without a
canonizer, which copies relevance into both summands of a functional ``a + b``, the sum is split as above.
Relevance starts at the target logit (``R = f_k(x)``), so with LRP-0 and no biases it sums to the logit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from torch.func import functional_call

from ..core.attribution import check_input
from ..core.model import model_preprocess
from ..core.probe import probe
from ..core.targets import Target, batched_grad, target_scores, top_class
from ..errors import ConvscopeError

STABILIZER = 1e-6
COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
RULE_NAMES = ("epsilon", "zero", "gamma", "alpha_beta", "zplus", "zbox", "flat", "wsquare", "pass", "gradient")

CONVOLUTIONS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                             nn.ConvTranspose2d, nn.ConvTranspose3d)
DENSE: tuple[type[nn.Module], ...] = (nn.Linear,)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# relevance passes through these unchanged (element-wise, or LRN treated as the identity)
PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Threshold,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LocalResponseNorm)
# modules LRP has no rule for even without parameters: refused rather than explained by their plain gradient
UNSUPPORTED: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.MultiheadAttention,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.RNNBase,
    nn.Embedding, nn.EmbeddingBag)

LayerForward = Callable[[torch.Tensor, Union[torch.Tensor, None], Union[torch.Tensor, None]], torch.Tensor]


def stabilize(d: torch.Tensor, eps: float) -> torch.Tensor:
    """``d + eps * sign(d)`` with sign(0) = +1 (zennit's stabilizer): a denominator kept away from zero."""
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d.dtype)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (never a NaN)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def positive_part(a: torch.Tensor) -> torch.Tensor:
    """``a^+``, with gradient ``1[a > 0]`` (also at 0, where clamp's gradient would be 1)."""
    return a * (a > 0).to(a.dtype)


def negative_part(a: torch.Tensor) -> torch.Tensor:
    """``a^-``, with gradient ``1[a < 0]``."""
    return a * (a < 0).to(a.dtype)


@dataclass
class LayerCall:
    """One call of a conv/dense layer as a rule sees it.

    ``forward(a, weight, bias)`` runs the layer's own forward with those parameters (``None`` bias: none);
    ``a`` is the input (part of the graph); ``weight``/``bias`` the parameters with any batch norm folded in;
    ``z`` the output they give (detached), whose relevance is ``z * c``; ``tap`` is a ones tensor shaped like
    ``a`` whose gradient is the input relevance, present only when ``a`` is the model's input (rules whose
    relevance is not proportional to ``a`` - z^B, flat, w^2 - send it there).
    """

    name: str
    forward: LayerForward
    a: torch.Tensor
    z: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    tap: torch.Tensor | None

    def run(self, a: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(a, weight, bias)

    def need_tap(self, rule: str) -> torch.Tensor:
        if self.tap is None:
            raise ConvscopeError(f"LRP rule {rule} at layer {self.name!r} needs the model's input (pixels) but this "
                                 "layer receives an intermediate tensor; use it on the first layer only or give this "
                                 "layer another rule in composite={...}")
        return self.tap

    def need_weight(self, rule: str) -> torch.Tensor:
        if self.weight is None:
            raise ConvscopeError(f"LRP rule {rule} at layer {self.name!r} needs the layer's weight but got none; set "
                                 "weighted = True on the rule class")
        return self.weight


class Rule:
    """An LRP rule for a conv/dense layer: :meth:`expression` returns a tensor ``e`` (same shape as ``z``) whose
    vector-Jacobian product with the incoming ``c`` is the rule's ``c`` for the layer's input. The hook then
    returns ``z + e - e.detach()``: the layer's value with the rule as its backward."""

    weighted = True  # needs the layer's weight

    def expression(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon (Montavon et al. 2019, Sec. 10.2.1); ``epsilon=0`` is LRP-0. On a layer without weights
    (average pooling given this rule by name) it is zennit's ``Norm``."""

    epsilon: float = 1e-6
    weighted = False

    def expression(self, call: LayerCall) -> torch.Tensor:
        s = safe_divide(call.z, stabilize(call.z, self.epsilon))  # R_k / (z_k + eps sign z_k) = c_k * s_k
        return call.run(call.a, call.weight, call.bias) * s


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019, Sec. 10.2.1), generalized to inputs and outputs of either sign (zennit's Gamma):
    positive outputs are explained by ``a^+ (w + gamma w^+) + a^- (w + gamma w^-)``, negative ones by
    ``a^+ (w + gamma w^-) + a^- (w + gamma w^+)``."""

    gamma: float = 0.25
    stabilizer: float = STABILIZER

    def expression(self, call: LayerCall) -> torch.Tensor:
        w, b, g = call.need_weight("gamma"), call.bias, self.gamma
        up, down = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_down = None if b is None else b + g * b.clamp(max=0)
        ap, an = positive_part(call.a), negative_part(call.a)
        pos = call.run(ap, up, b_up) + call.run(an, down)
        neg = call.run(ap, down, b_down) + call.run(an, up)
        z = call.z
        sp = safe_divide(z * (z > 0), stabilize(pos.detach(), self.stabilizer))
        sn = safe_divide(z * (z < 0), stabilize(neg.detach(), self.stabilizer))
        return pos * sp + neg * sn


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015; Montavon et al. 2018, Sec. 5), ``alpha - beta = 1``."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = STABILIZER

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and self.beta >= 0 and abs(self.alpha - self.beta - 1) < 1e-9):
            raise ConvscopeError(f"LRP alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1 (conservation), got "
                                 f"alpha={self.alpha}, beta={self.beta}; e.g. alpha=2, beta=1 or alpha=1, beta=0")

    def expression(self, call: LayerCall) -> torch.Tensor:
        w, b = call.need_weight("alpha_beta"), call.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        ap, an = positive_part(call.a), negative_part(call.a)
        pos = call.run(ap, wp, None if b is None else b.clamp(min=0)) + call.run(an, wn)
        e = pos * (self.alpha * safe_divide(call.z, stabilize(pos.detach(), self.stabilizer)))
        if self.beta:
            neg = call.run(ap, wn, None if b is None else b.clamp(max=0)) + call.run(an, wp)
            e = e - neg * (self.beta * safe_divide(call.z, stabilize(neg.detach(), self.stabilizer)))
        return e


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """The z+ rule: alpha-beta with alpha=1, beta=0 (Montavon et al. 2017; zennit's ZPlus)."""

    alpha: float = 1.0
    beta: float = 0.0


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """The z^B rule for pixels bounded by ``low <= x <= high`` (Montavon et al. 2017; 2019, Sec. 10.3.2).
    ``low``/``high``: floats or tensors broadcastable to the input; ``None``: the model's preprocess applied to black
    and white."""

    low: float | torch.Tensor | None = None
    high: float | torch.Tensor | None = None
    stabilizer: float = STABILIZER

    def expression(self, call: LayerCall) -> torch.Tensor:
        tap = call.need_tap("zbox")
        w = call.need_weight("zbox")
        low = torch.as_tensor(self.low, dtype=tap.dtype, device=tap.device).expand_as(tap)
        high = torch.as_tensor(self.high, dtype=tap.dtype, device=tap.device).expand_as(tap)
        d = (call.run(call.a, w) - call.run(low * tap, w.clamp(min=0)) - call.run(high * tap, w.clamp(max=0)))
        return d * safe_divide(call.z, stabilize(d.detach(), self.stabilizer))


@dataclass(frozen=True)
class Flat(Rule):
    """The flat rule (Lapuschkin et al. 2019): relevance spread uniformly over each output's receptive field."""

    stabilizer: float = STABILIZER

    def expression(self, call: LayerCall) -> torch.Tensor:
        d = call.run(call.need_tap("flat"), torch.ones_like(call.need_weight("flat")))
        return d * safe_divide(call.z, stabilize(d.detach(), self.stabilizer))


@dataclass(frozen=True)
class WSquare(Rule):
    """The w^2 rule (Montavon et al. 2017) for a first layer on unbounded inputs."""

    stabilizer: float = STABILIZER

    def expression(self, call: LayerCall) -> torch.Tensor:
        d = call.run(call.need_tap("wsquare"), call.need_weight("wsquare") ** 2)
        return d * safe_divide(call.z, stabilize(d.detach(), self.stabilizer))


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged through an element-wise module (zennit's ``Pass``): ``R_in = R_out``."""

    weighted = False


@dataclass(frozen=True)
class Gradient(Rule):
    """The module's ordinary gradient (LRP-0 for a linear parameter-free op, winner-take-all for max pooling)."""

    weighted = False


class FoldedBatchNorm(Rule):
    """Marks a batch norm folded into the conv/dense layer before it: identity backward."""

    weighted = False


RuleSpec = Union[Rule, str]
Composite = Union[str, Mapping[Union[str, type], RuleSpec]]


@dataclass(frozen=True)
class RuleParams:
    """The rule parameters of one :func:`lrp` call (used to build rules given by name)."""

    epsilon: float
    gamma: float
    alpha: float
    beta: float
    low: float | torch.Tensor | None
    high: float | torch.Tensor | None

    def make(self, name: str) -> Rule:
        table: dict[str, Callable[[], Rule]] = {
            "epsilon": lambda: Epsilon(self.epsilon), "zero": lambda: Epsilon(0.0), "gamma": lambda: Gamma(self.gamma),
            "alpha_beta": lambda: AlphaBeta(self.alpha, self.beta), "zplus": ZPlus,
            "zbox": lambda: ZBox(self.low, self.high), "flat": Flat, "wsquare": WSquare, "pass": Pass,
            "gradient": Gradient}
        if name not in table:
            raise ConvscopeError(f"unknown LRP rule {name!r}; use one of {', '.join(RULE_NAMES)} or a Rule object")
        return table[name]()


def composite_rule(composite: str, module: nn.Module, first: bool, params: RuleParams) -> Rule:
    """The rule a named composite gives a conv or dense layer (``first``: the first such layer to run)."""
    conv = isinstance(module, CONVOLUTIONS)
    if composite == "epsilon" or not conv and not first:
        return params.make("epsilon")
    if first and composite == "epsilon_plus_flat":
        return Flat()
    if first and composite == "epsilon_gamma_box":
        return params.make("zbox")
    if not conv:
        return params.make("epsilon")
    return {"epsilon_plus": ZPlus(), "epsilon_plus_flat": ZPlus(), "epsilon_gamma_box": params.make("gamma"),
            "epsilon_alpha2_beta1": params.make("alpha_beta")}[composite]


def user_rule(rules: Mapping[str | type, RuleSpec], name: str, module: nn.Module,
              params: RuleParams) -> Rule | None:
    """The rule a user's dict gives this module: by exact name first, then by type, else ``None``."""
    spec = rules.get(name)
    if spec is None:
        spec = next((r for k, r in rules.items() if isinstance(k, type) and isinstance(module, k)), None)
    if spec is None:
        return None
    return spec if isinstance(spec, Rule) else params.make(spec)


def check_composite(composite: object) -> None:
    """A composite name or a ``{name or type: rule}`` dict, or a one-line error."""
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ConvscopeError(f"unknown LRP composite {composite!r}; use one of {', '.join(COMPOSITES)} or a dict "
                                 "{layer name or module type: rule}")
        return
    if not isinstance(composite, Mapping):
        raise ConvscopeError(f"composite must be a name ({', '.join(COMPOSITES)}) or a dict {{layer name or module "
                             f"type: rule}}, not {type(composite).__name__}")
    for key, spec in composite.items():
        if not (isinstance(key, str) or isinstance(key, type) and issubclass(key, nn.Module)):
            raise ConvscopeError(f"composite key {key!r} is neither a layer name nor an nn.Module type")
        if isinstance(spec, str) and spec not in RULE_NAMES:
            raise ConvscopeError(f"unknown LRP rule {spec!r} for {key!r}; use one of {', '.join(RULE_NAMES)} or a "
                                 "Rule object")
        if not isinstance(spec, (str, Rule)):
            raise ConvscopeError(f"composite entry for {key!r} is a {type(spec).__name__}; give a Rule object or one "
                                 f"of {', '.join(RULE_NAMES)}")


@dataclass
class LeafCall:
    """One module call seen by the traced forward pass."""

    name: str
    module: nn.Module
    output: object


def trace_calls(model: nn.Module, x: torch.Tensor) -> tuple[list[LeafCall], dict[nn.Module, nn.Module]]:
    """Every module call in execution order (one forward pass without gradients) and the batch norms to fold:
    ``{batch norm: conv/dense layer}`` where the batch norm's input is exactly that layer's output."""
    calls: list[LeafCall] = []
    folds: dict[nn.Module, nn.Module] = {}
    leaves = {m for m in model.modules() if not any(True for _ in m.children())}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if module in leaves and isinstance(module, BATCH_NORMS) and calls and inputs:
                prev = next((c for c in reversed(calls) if c.module in leaves), None)
                if (prev is not None and inputs[0] is prev.output and isinstance(prev.module, CONVOLUTIONS[:3] + DENSE)
                        and module.running_mean is not None and module.running_var is not None):
                    folds[module] = prev.module
            calls.append(LeafCall(name, module, output))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, folds


def plan_rules(model: nn.Module, x: torch.Tensor, composite: Composite,
               params: RuleParams) -> tuple[dict[nn.Module, Rule], dict[nn.Module, nn.Module], dict[nn.Module, str]]:
    """``({module: rule}, {conv/dense: batch norm folded into it}, {module: name})`` for the modules that run."""
    calls, folds = trace_calls(model, x)
    rules: dict[nn.Module, Rule] = {}
    names: dict[nn.Module, str] = {}
    first_seen = False
    user = composite if isinstance(composite, Mapping) else {}
    named = "epsilon" if isinstance(composite, Mapping) else composite
    for call in calls:
        mod, name = call.module, call.name
        if mod in names:  # a module that runs several times keeps the rule of its first call
            continue
        names[mod] = name
        rule = user_rule(user, name, mod, params) if user else None
        is_layer = isinstance(mod, CONVOLUTIONS + DENSE)
        if is_layer:
            default = composite_rule(named, mod, not first_seen, params)
            first_seen = True
            rule = rule or default
        if rule is None and isinstance(mod, BATCH_NORMS):
            rule = FoldedBatchNorm() if mod in folds else Pass()
        if rule is None and isinstance(mod, PASS_THROUGH):
            rule = Pass()
        if rule is None and isinstance(mod, UNSUPPORTED):
            raise ConvscopeError(f"LRP has no rule for layer {name!r} ({type(mod).__name__}); give it one in "
                                 "composite={...} ('pass', 'gradient' or a Rule) or explain another model"
                                 + ("; LRP explains logits, so drop the final softmax" if "Soft" in type(mod).__name__
                                    else ""))
        if rule is None and any(True for _ in mod.parameters(recurse=False)):
            raise ConvscopeError(f"LRP has no rule for layer {name!r} ({type(mod).__name__}, a module with its own "
                                 "parameters); give it one in composite={...}: 'epsilon' etc. if it is linear in its "
                                 "input (out = f(x; weight) + bias), 'pass' if element-wise")
        if rule is None or isinstance(rule, Gradient):
            continue
        if rule.weighted and not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise ConvscopeError(f"LRP rule {type(rule).__name__} needs a layer with a weight, but {name!r} "
                                 f"({type(mod).__name__}) has none; use 'epsilon', 'pass' or 'gradient' for it")
        rules[mod] = rule
    # a batch norm folds only into a layer explained by a weight rule
    layer_bn = {layer: bn for bn, layer in folds.items()
                if isinstance(rules.get(bn), FoldedBatchNorm) and layer in rules
                and isinstance(getattr(layer, "weight", None), torch.Tensor)}
    for bn, layer in folds.items():
        if layer_bn.get(layer) is not bn and isinstance(rules.get(bn), FoldedBatchNorm):
            rules[bn] = Pass()
    return rules, layer_bn, names


def folded_parameters(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``layer`` with an eval-mode batch norm folded in (new tensors; the module is untouched):
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise ConvscopeError(f"LRP: {type(layer).__name__} has no weight tensor to fold a batch norm into; give it "
                             "the 'pass' or 'gradient' rule")
    w = weight.detach()
    b = bias.detach() if isinstance(bias, torch.Tensor) else None
    if bn is None:
        return w, b
    if not isinstance(bn, BATCH_NORMS) or bn.running_mean is None or bn.running_var is None:
        raise ConvscopeError(f"LRP folds only a BatchNorm with running statistics, got {type(bn).__name__}; keep "
                             "track_running_stats=True or give it the 'pass' rule")
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if isinstance(bn.weight, torch.Tensor):
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale + (bn.bias.detach() if isinstance(bn.bias, torch.Tensor) else 0.0)
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w, shift if b is None else b * scale + shift


class _Bare(nn.Module):
    """Runs a layer's own ``forward`` (no hooks) so ``functional_call`` can swap in other parameters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.layer.forward(a)


def layer_forward(module: nn.Module) -> LayerForward:
    """``f(a, weight, bias)``: the module's forward with those parameters (``weight=None``: its own parameters)."""
    bare = _Bare(module)

    def run(a: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return module.forward(a)
        params: dict[str, torch.Tensor | None] = {"layer.weight": weight}
        if hasattr(module, "bias"):
            params["layer.bias"] = bias
        return functional_call(bare, params, (a,))  # type: ignore[arg-type]
    return run


class RelevanceHooks:
    """Forward hooks that give each module its rule's backward; ``tap`` (ones shaped like ``xin``, the model input)
    collects the input relevance as its gradient."""

    def __init__(self, rules: dict[nn.Module, Rule], folds: dict[nn.Module, nn.Module], names: dict[nn.Module, str],
                 xin: torch.Tensor, tap: torch.Tensor) -> None:
        self.rules, self.folds, self.names = rules, folds, names
        self.xin, self.tap = xin, tap
        self.params = {m: folded_parameters(m, folds.get(m)) for m, r in rules.items()
                       if not isinstance(r, (Pass, FoldedBatchNorm)) and isinstance(getattr(m, "weight", None),
                                                                                   torch.Tensor)}
        self.handles: list = []

    def __enter__(self) -> RelevanceHooks:
        for m in self.rules:
            self.handles.append(m.register_forward_hook(self.hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def hook(self, module: nn.Module, inputs: tuple, output: object) -> torch.Tensor | None:
        rule = self.rules[module]
        name = self.names.get(module, type(module).__name__)
        if not isinstance(output, torch.Tensor) or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise ConvscopeError(f"LRP applies rules to modules with one tensor input and output; layer {name!r} "
                                 f"({type(module).__name__}) is not; give it 'gradient' in composite={{...}}")
        a = inputs[0]
        if isinstance(rule, FoldedBatchNorm):  # folded into the layer before: the relevance passes as it is
            return output.detach() + (a - a.detach())
        if isinstance(rule, Pass):
            if a.shape != output.shape:
                raise ConvscopeError(f"LRP rule Pass needs an element-wise layer, but {name!r} maps {tuple(a.shape)} "
                                     f"to {tuple(output.shape)}; give it another rule in composite={{...}}")
            ratio = safe_divide(output.detach(), a.detach())  # c_in = c_out * y / a, so a * c_in = y * c_out
            return output.detach() + (a - a.detach()) * ratio
        forward = layer_forward(module)
        weight, bias = self.params.get(module, (None, None))
        with torch.no_grad():
            z = forward(a.detach(), weight, bias) if module in self.folds else output.detach()
        call = LayerCall(name, forward, a, z, weight, bias, self.tap if a is self.xin else None)
        e = rule.expression(call)
        return output.detach() + (e - e.detach())


def zbox_bounds(model: nn.Module, x: torch.Tensor, low: float | torch.Tensor | None,
                high: float | torch.Tensor | None) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(low, high)`` for z^B: given, else the model's preprocess applied to pixels 0 and 1 (per channel)."""
    if low is None or high is None:
        pre = model_preprocess(model)
        mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).reshape(1, -1, *([1] * (x.dim() - 2)))
        std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).reshape(mean.shape)
        identity = all(m == 0 for m in pre.mean) and all(s == 1 for s in pre.std)
        if not identity and (x.dim() < 3 or x.shape[1] != mean.shape[1]):
            raise ConvscopeError(f"z^B bounds come from the model's preprocess ({mean.shape[1]} channels), which does "
                                 f"not fit inputs of shape {tuple(x.shape)}; pass low= and high=")
        low = (0.0 if identity else (0 - mean) / std) if low is None else low
        high = (1.0 if identity else (1 - mean) / std) if high is None else high
    out = []
    for what, v in (("low", low), ("high", high)):
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok or not torch.isfinite(t).all():
            raise ConvscopeError(f"lrp({what}=...) of shape {tuple(t.shape)} must be finite and broadcast to the "
                                 f"input {tuple(x.shape)}; give a float or a tensor like (1, C, 1, 1)")
        out.append(t)
    if (out[0] > out[1]).any():
        raise ConvscopeError("lrp(low=..., high=...): low must not exceed high (the pixel box l <= x <= h)")
    return out[0], out[1]


def with_bounds(rule: Rule, low: float | torch.Tensor, high: float | torch.Tensor) -> Rule:
    """A z^B rule with its missing bounds filled in."""
    if isinstance(rule, ZBox) and (rule.low is None or rule.high is None):
        return ZBox(low if rule.low is None else rule.low, high if rule.high is None else rule.high, rule.stabilizer)
    return rule


def lrp(model: nn.Module, x: torch.Tensor, target: Target = top_class, composite: Composite = "epsilon",
        epsilon: float = 1e-6, gamma: float = 0.25, alpha: float = 2.0, beta: float = 1.0,
        low: float | torch.Tensor | None = None, high: float | torch.Tensor | None = None) -> torch.Tensor:
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2018, 2019): ``N x K x C x H x W``.

    Relevance of each input value for each of the K targets per image (signed; it starts at the target logit and
    is conserved layer to layer up to biases and stabilizers). ``composite``: one of ``COMPOSITES`` or a dict
    ``{layer name or module type: rule}`` (see the module docstring). ``epsilon`` (LRP-epsilon), ``gamma``
    (LRP-gamma), ``alpha``/``beta`` (alpha-beta, ``alpha - beta = 1``) and ``low``/``high`` (z^B pixel bounds,
    default: the model's preprocess applied to 0 and 1) parameterize the rules. One forward pass traces the model
    (which batch norms to fold, which layer is first), a second applies the rules; the K backward passes are batched.
    The model is left exactly as it came, also when the call raises.
    """
    check_input(x, "lrp")
    check_composite(composite)
    for what, v in (("epsilon", epsilon), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ConvscopeError(f"lrp({what}={v!r}): use a float >= 0")
    params = RuleParams(float(epsilon), float(gamma), float(alpha), float(beta), low, high)
    if isinstance(composite, str) and composite == "epsilon_alpha2_beta1":
        AlphaBeta(params.alpha, params.beta)  # checks alpha - beta = 1 before any work
    x = x.detach()
    with torch.enable_grad(), probe(model):
        rules, folds, names = plan_rules(model, x, composite, params)
        if any(isinstance(r, ZBox) and (r.low is None or r.high is None) for r in rules.values()):
            lo, hi = zbox_bounds(model, x, low, high)
            rules = {m: with_bounds(r, lo, hi) for m, r in rules.items()}
        tap = torch.ones_like(x, requires_grad=True)
        xin = x * tap  # d/d tap = x * d/d xin: the gradient w.r.t. tap is the relevance
        with RelevanceHooks(rules, folds, names, xin, tap):
            out = model(xin)
            scores, _ = target_scores(out, target)
            (relevance,) = batched_grad(scores, [tap])  # K x N x ...: R = f_k(x) at the output, c = 1
    return relevance.movedim(0, 1)
