"""Peer tools timed on the same model, inputs and targets as convscope: Captum, pytorch-grad-cam, torch-lucent, zennit.

They are installed into the same venv without their dependencies (``pip install --no-deps -r
benchmarks/requirements-peers.txt``), so they can never pull another torch. pytorch-grad-cam and lucent import
``torchvision``; the only PyPI torchvision is a CUDA build that cannot load beside the CPU torch, so
``benchmarks/shims/`` stands in for the few pure-PyTorch helpers they import (only when the real package is not
importable, only in this process). zennit imports two torchvision classes for its ResNet canonizers: empty stand-ins
take their place while it is imported (as ``tests/peers.py`` does). A tool that still fails to import is reported as
"not runnable here: <reason>" and its cases are skipped.

Every peer case names the convscope method its maps should match (``agree_with``); the runner computes the
per-map Pearson correlation between the two on the same images and targets.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cases import CAM_CHANNELS, IG_SHAPES, IG_STEPS, IMAGE_SHAPES, MANY, MULTI, SCORECAM_BATCH, TARGETS, cam_layer
from harness import F_, FB_ALL, FB_INPUT, SINGLE, Case, Shape, Targets, register

SHIMS = Path(__file__).resolve().parent / "shims"
INSTALL_HINT = "pip install --no-deps -r benchmarks/requirements-peers.txt"
MODEL = "efficientnet_lite0"

# distribution name -> modules the timed code imports
PEERS = {
    "captum": ["captum.attr"],
    "grad-cam": ["pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets"],
    "torch-lucent": ["lucent.optvis.render", "lucent.optvis.objectives"],
    "zennit": ["zennit.attribution", "zennit.canonizers", "zennit.composites", "zennit.rules"],
}


# Captum warns on every call that it set requires_grad on the input and hooked the ReLUs: noise in the log.
warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")


def enable_shims() -> list[str]:
    """Put ``benchmarks/shims`` on ``sys.path`` for the modules that are not really installed; returns their names."""
    missing = [m for m in ("torchvision", "IPython") if importlib.util.find_spec(m) is None]
    if missing and str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))  # appended: a real install always wins
    return missing


@contextlib.contextmanager
def zennit_stand_ins() -> Iterator[None]:
    """While open, ``torchvision.models.resnet`` has the two empty classes zennit imports (when the real torchvision
    is not importable); the stand-in modules are removed again on exit, the benchmark shim (if loaded) is kept."""
    try:
        importlib.import_module("torchvision.models.resnet")
        yield
        return
    except Exception:  # not installed, or the benchmark shim without a models.resnet
        pass
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})  # type: ignore[attr-defined]
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})  # type: ignore[attr-defined]
    models = saved.get("torchvision.models") or types.ModuleType("torchvision.models")
    root = saved.get("torchvision") or types.ModuleType("torchvision")
    sys.modules.update({"torchvision": root, "torchvision.models": models, "torchvision.models.resnet": resnet})
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def peer_status() -> dict[str, str]:
    """``{tool: "captum 0.9.0"}`` when importable, else ``{tool: "not runnable here: <reason>"}``."""
    shimmed = enable_shims()
    out = {}
    for dist, modules in PEERS.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = f"not runnable here: not installed ({INSTALL_HINT})"
            continue
        try:
            with zennit_stand_ins() if dist == "zennit" else contextlib.nullcontext():
                for m in modules:
                    importlib.import_module(m)
        except Exception as exc:  # report any import failure, keep benchmarking the rest
            out[dist] = f"not runnable here: import fails ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            continue
        shim_note = ""
        if dist in ("grad-cam", "torch-lucent") and shimmed:
            shim_note = f" (with the {'/'.join(shimmed)} import shim)"
        out[dist] = f"{dist} {version}{shim_note}"
    return out


def runnable(status: dict[str, str], dist: str) -> bool:
    return not status.get(dist, "not runnable").startswith("not runnable")


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# --------------------------------------------------------------------------------------------- Captum


def _captum_layer_gradcam(model: nn.Module, x: torch.Tensor, target: Any) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    layer = dict(model.named_modules())[cam_layer(model)]
    attr = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")


def captum_lgc(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """LayerGradCam + upsample, one target per image (Captum's API)."""
    return _captum_layer_gradcam(model, x, t.indices[:, 0].tolist())


def captum_lgc_loop(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """K targets of one image: K calls (Captum has no multi-target API for gradient methods)."""
    maps = [_captum_layer_gradcam(model, x, int(c)) for c in t.indices[0]]
    return torch.cat(maps, dim=1)


def captum_lgc_expanded(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """K targets of one image: the image repeated K times with a target list (one call, K forwards batched)."""
    k = t.k
    maps = _captum_layer_gradcam(model, x.expand(k, *x.shape[1:]), t.indices[0].tolist())
    return maps.reshape(1, k, *maps.shape[-2:])


def captum_saliency(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """|gradient|, then the max over colour channels (Simonyan et al.'s map, as convscope returns it)."""
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=t.indices[:, 0].tolist(), abs=True).amax(1, keepdim=True)


def captum_gbp(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x, target=t.indices[:, 0].tolist())


def captum_gbp_is_plain_gradient(model: nn.Module, x: torch.Tensor, t: Targets) -> str:
    """Captum's GuidedBackprop hooks only nn.ReLU; EfficientNet-Lite uses ReLU6, so it may return the gradient."""
    from captum.attr import GuidedBackprop, Saliency

    gbp = GuidedBackprop(model).attribute(x, target=t.indices[:, 0].tolist())
    grad = Saliency(model).attribute(x, target=t.indices[:, 0].tolist(), abs=False)
    diff = float((gbp - grad).abs().max())
    if diff == 0.0:
        return "max|GBP − gradient| = 0: returns the plain gradient on this model (hooks nn.ReLU only; Lite uses ReLU6)"
    return f"max|GBP − gradient| = {diff:.3g}"


def captum_ig(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """IntegratedGradients with convscope's settings: Gauss-Legendre, zero baseline, 32 rows per batch."""
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(x, target=t.indices[:, 0].tolist(), n_steps=IG_STEPS,
                                                method="gausslegendre", internal_batch_size=32)


def _captum_lrp_setup(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)  # Captum sets and deletes ``rule`` attributes on the modules


def captum_lrp(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """Captum's LRP, with rules on the leaves it has none for, passing relevance through unchanged as convscope does:
    the identity rule on LRN, the epsilon rule on Flatten (the identity rule would hand the flat relevance to a 4-d
    input); set on every call, since Captum deletes every ``rule`` after an attribution. Other layers: its default
    epsilon rule."""
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule

    for m in model.modules():
        if isinstance(m, nn.LocalResponseNorm):
            m.rule = IdentityRule()
        elif isinstance(m, nn.Flatten):
            m.rule = EpsilonRule()
    return LRP(model).attribute(x, target=t.indices[:, 0].tolist())


# --------------------------------------------------------------------------------------------- zennit


def bn_pairs(model: nn.Module) -> list[tuple[list[str], str]]:
    """``[([conv name], batch norm name)]`` for every batch norm registered right after a conv/linear sibling
    (EfficientNet-Lite: conv -> bn in each ConvBNAct / MBConv); what convscope's LRP folds, for zennit's
    ``NamedMergeBatchNorm``."""
    pairs = []
    for prefix, parent in model.named_modules():
        kids = list(parent.named_children())
        for (a, ma), (b, mb) in zip(kids, kids[1:]):
            if isinstance(ma, (nn.Conv2d, nn.Linear)) and isinstance(mb, nn.BatchNorm2d | nn.BatchNorm1d):
                pairs.append(([f"{prefix}.{a}" if prefix else a], f"{prefix}.{b}" if prefix else b))
    return pairs


def _mbconv_sum_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite's MBConv forward with its residual ``h + x`` through zennit's ``Sum`` module (as zennit's
    ResNet canonizers do for torchvision's blocks), so relevance is split between the summands as convscope does."""
    h = x
    if self.has_expand:
        h = self.act0(self.bn0(self.expand_conv(h)))
    h = self.act1(self.bn1(self.depthwise_conv(h)))
    h = self.bn2(self.project_conv(h))
    return self.canonizer_sum(torch.stack([h, x], dim=-1))


def _mbconv_attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
    from zennit.layer import Sum

    if type(module).__name__ == "MBConv" and getattr(module, "residual", False):
        return {"forward": _mbconv_sum_forward.__get__(module), "canonizer_sum": Sum()}
    return None


def _zennit_lrp(composite: str) -> Any:
    def fn(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
        with zennit_stand_ins():
            from zennit import attribution, canonizers, composites, rules
            from zennit import types as ztypes

        canon = [canonizers.NamedMergeBatchNorm(bn_pairs(model)), canonizers.AttributeCanonizer(_mbconv_attributes)]
        if composite == "epsilon":
            comp = composites.LayerMapComposite(composites.layer_map_base() + [
                (ztypes.Convolution, rules.Epsilon()), (nn.Linear, rules.Epsilon())], canonizers=canon)
        else:
            comp = composites.EpsilonPlusFlat(canonizers=canon)
        idx = t.indices[:, 0]
        with attribution.Gradient(model, comp) as attributor:
            _, rel = attributor(x.clone(), lambda out: out * torch.nn.functional.one_hot(idx, out.shape[1]).to(out))
        return rel
    return fn


# --------------------------------------------------------------------------------------------- pytorch-grad-cam


def _gradcam_setup(cls_name: str) -> Any:
    def setup(model: nn.Module) -> Any:
        import pytorch_grad_cam

        layer = dict(model.named_modules())[cam_layer(model)]
        cam = getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=[layer])
        ctx = {"cam": cam, "model": model}
        if cls_name == "ScoreCAM":
            cam.batch_size = SCORECAM_BATCH  # masked copies per forward, as convscope's case
            module = importlib.import_module("pytorch_grad_cam.score_cam")
            ctx["tqdm"] = (module, module.tqdm)  # no progress bar per image in the timing log
            module.tqdm = types.SimpleNamespace(tqdm=lambda it, *a, **k: it)
        return ctx
    return setup


def _gradcam_teardown(ctx: Any) -> None:
    ctx["cam"].activations_and_grads.release()
    _zero_grads(ctx["model"])
    if "tqdm" in ctx:
        module, original = ctx["tqdm"]
        module.tqdm = original


def _gradcam_call(ctx: Any, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = ctx["cam"](input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])  # numpy N x H x W
    return torch.from_numpy(maps)


def gradcam_images(ctx: Any, x: torch.Tensor, t: Targets) -> torch.Tensor:
    return _gradcam_call(ctx, x, t.indices[:, 0].tolist())[:, None]


def gradcam_expanded(ctx: Any, x: torch.Tensor, t: Targets) -> torch.Tensor:
    """K targets of one image: the image repeated K times with one target each (grad-cam's only way)."""
    k = t.k
    return _gradcam_call(ctx, x.expand(k, *x.shape[1:]).contiguous(), t.indices[0].tolist())[None]


# --------------------------------------------------------------------------------------------- Lucent

LUCENT_LAYER = "blocks.10"  # 112 x 14 x 14, mid-network (lucent's own name: blocks_10)
LUCENT_STEPS = 8


def _lucent_setup(model: nn.Module) -> nn.Module:
    # lucent hooks every module and never removes the hooks: work on a copy, cleared before every call
    return copy.deepcopy(model)


def _clear_hooks(model: nn.Module) -> None:
    for m in model.modules():
        m._forward_hooks.clear()


def lucent_render(model: nn.Module, x: torch.Tensor, t: Targets) -> None:
    from lucent.optvis import render

    _clear_hooks(model)
    torch.manual_seed(0)
    render.render_vis(model, f"{LUCENT_LAYER.replace('.', '_')}:0", thresholds=(LUCENT_STEPS,), show_image=False,
                      progress=False, verbose=False)
    _clear_hooks(model)


# --------------------------------------------------------------------------------------------- registry


def register_peers(registry: list[Case], status: dict[str, str]) -> None:
    """Add the cases of every importable peer to ``registry``."""
    many = (SINGLE, Shape(f"{MANY} imgs", MANY, 1))
    multi = Shape(f"1 img × {TARGETS} tgts", 1, TARGETS)
    if runnable(status, "captum"):
        kw = {"tool": "captum", "models": [MODEL], "registry": registry}
        register("LayerGradCam + upsample", captum_lgc, work=FB_INPUT, shapes=many, agree_with="gradcam", **kw)
        register(f"LayerGradCam + upsample, loop of {TARGETS} calls", captum_lgc_loop, work=FB_INPUT, shapes=[multi],
                 agree_with="gradcam", **kw)
        register(f"LayerGradCam + upsample, image ×{TARGETS} + target list", captum_lgc_expanded, work=FB_INPUT,
                 shapes=[multi], agree_with="gradcam", **kw)
        register("Saliency", captum_saliency, work=FB_INPUT, shapes=IMAGE_SHAPES, agree_with="saliency",
                 quick=False, **kw)
        register("GuidedBackprop", captum_gbp, work=FB_INPUT, shapes=IMAGE_SHAPES, agree_with="guided_backprop",
                 quick=False, check=captum_gbp_is_plain_gradient, **kw)
    if runnable(status, "grad-cam"):
        for cls, ours in (("GradCAM", "gradcam"), ("GradCAMPlusPlus", "gradcam_pp")):
            kw = {"tool": "grad-cam", "models": [MODEL], "registry": registry, "agree_with": ours,
                  "setup": _gradcam_setup(cls), "teardown": _gradcam_teardown,
                  "note": "backward into all parameters; cv2 upsample + min-max"}
            register(cls, gradcam_images, work=FB_INPUT, shapes=many, **kw)
            register(f"{cls}, image ×{TARGETS} + target list", gradcam_expanded, work=FB_INPUT, shapes=[multi], **kw)
    both = ["efficientnet_lite0", "demo_net"]
    if runnable(status, "captum"):
        for model in both:
            register(f"IntegratedGradients ({IG_STEPS} steps)", captum_ig, work=FB_INPUT, shapes=IG_SHAPES[model],
                     per_call=IG_STEPS, unit="step", tool="captum", models=[model], registry=registry,
                     agree_with=f"integrated_gradients ({IG_STEPS} steps)",
                     note="gausslegendre, zero baseline, internal_batch_size 32")
        register("LRP", captum_lrp, work=FB_INPUT, shapes=IMAGE_SHAPES, tool="captum", models=["demo_net"],
                 registry=registry, agree_with="lrp (epsilon)", setup=_captum_lrp_setup,
                 note="epsilon rule (1e-9) everywhere, identity on LRN and Flatten; EfficientNet-Lite is refused "
                      "(no rule for ReLU6, functional residual adds)")
    if runnable(status, "zennit"):
        for comp, ours in (("epsilon", "lrp (epsilon)"), ("EpsilonPlusFlat", "lrp (epsilon_plus_flat)")):
            register(f"LRP {comp}", _zennit_lrp(comp), work=FB_INPUT,
                     shapes=IMAGE_SHAPES, tool="zennit", models=both, registry=registry, agree_with=ours,
                     note="canonizers: NamedMergeBatchNorm of each conv -> bn pair, MBConv residuals through "
                          "zennit's Sum (split in proportion, as convscope)")
    if runnable(status, "grad-cam"):
        for model in both:
            register("ScoreCAM", gradcam_images, work=F_, models=[model], per_call=CAM_CHANNELS[model],
                     unit="channel", shapes=[SINGLE] if model != "demo_net" else many, tool="grad-cam",
                     registry=registry, agree_with="scorecam", setup=_gradcam_setup("ScoreCAM"),
                     teardown=_gradcam_teardown,
                     note=f"batch_size {SCORECAM_BATCH}; all masked copies of an image built at once in memory")
        kw = {"tool": "grad-cam", "registry": registry, "agree_with": "layercam",
              "setup": _gradcam_setup("LayerCAM"), "teardown": _gradcam_teardown,
              "note": "backward into all parameters; cv2 upsample + min-max"}
        register("LayerCAM", gradcam_images, work=FB_INPUT, shapes=many, models=both, **kw)
        for model in both:
            k = MULTI[model]
            register(f"LayerCAM, image ×{k} + target list", gradcam_expanded, work=FB_INPUT,
                     shapes=[Shape(f"1 img × {k} tgts", 1, k)], models=[model], **kw)
    if runnable(status, "torch-lucent"):
        register(f"render_vis {LUCENT_LAYER}:0, {LUCENT_STEPS} steps", lucent_render, work=FB_ALL,
                 shapes=[Shape(f"1 channel × {LUCENT_STEPS} steps", 1, 1)], per_call=LUCENT_STEPS, unit="step",
                 tool="torch-lucent", models=[MODEL], registry=registry, setup=_lucent_setup,
                 note="param.image(128) upsampled to 224, standard transforms, Adam; hooks all modules")

