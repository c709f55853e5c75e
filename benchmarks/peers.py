"""Peer tools timed on the same model, inputs and targets as convscope: Captum, pytorch-grad-cam, torch-lucent.

They are installed into the same venv without their dependencies (``pip install --no-deps -r
benchmarks/requirements-peers.txt``), so they can never pull another torch. pytorch-grad-cam and lucent import
``torchvision``; the only PyPI torchvision is a CUDA build that cannot load beside the CPU torch, so
``benchmarks/shims/`` stands in for the few pure-PyTorch helpers they import (only when the real package is not
importable, only in this process). A tool that still fails to import is reported as "not runnable here: <reason>"
and its cases are skipped.

Every peer case names the convscope method its maps should match (``agree_with``); the runner computes the
per-map Pearson correlation between the two on the same images and targets.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cases import IMAGE_SHAPES, MANY, TARGETS, cam_layer
from harness import FB_ALL, FB_INPUT, SINGLE, Case, Shape, Targets, register

SHIMS = Path(__file__).resolve().parent / "shims"
INSTALL_HINT = "pip install --no-deps -r benchmarks/requirements-peers.txt"
MODEL = "efficientnet_lite0"

# distribution name -> modules the timed code imports
PEERS = {
    "captum": ["captum.attr"],
    "grad-cam": ["pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets"],
    "torch-lucent": ["lucent.optvis.render", "lucent.optvis.objectives"],
}


# Captum warns on every call that it set requires_grad on the input and hooked the ReLUs: noise in the log.
warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")


def enable_shims() -> list[str]:
    """Put ``benchmarks/shims`` on ``sys.path`` for the modules that are not really installed; returns their names."""
    missing = [m for m in ("torchvision", "IPython") if importlib.util.find_spec(m) is None]
    if missing and str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))  # appended: a real install always wins
    return missing


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


# --------------------------------------------------------------------------------------------- pytorch-grad-cam


def _gradcam_setup(cls_name: str) -> Any:
    def setup(model: nn.Module) -> Any:
        import pytorch_grad_cam

        layer = dict(model.named_modules())[cam_layer(model)]
        cam = getattr(pytorch_grad_cam, cls_name)(model=model, target_layers=[layer])
        return {"cam": cam, "model": model}
    return setup


def _gradcam_teardown(ctx: Any) -> None:
    ctx["cam"].activations_and_grads.release()
    _zero_grads(ctx["model"])


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
    if runnable(status, "torch-lucent"):
        register(f"render_vis {LUCENT_LAYER}:0, {LUCENT_STEPS} steps", lucent_render, work=FB_ALL,
                 shapes=[Shape(f"1 channel × {LUCENT_STEPS} steps", 1, 1)], per_call=LUCENT_STEPS, unit="step",
                 tool="torch-lucent", models=[MODEL], registry=registry, setup=_lucent_setup,
                 note="param.image(128) upsampled to 224, standard transforms, Adam; hooks all modules")

