"""The convscope methods the harness times. A new method is one ``register(...)`` call here.

``fn(model, x, targets)`` runs the method once on a batch ``x`` and returns its maps (or anything);
``targets.convscope`` is ``top_class`` or ``top_k(K)`` as a user would write it, ``targets.indices`` the same
classes as an ``N x K`` tensor. ``work`` pairs it with the bare model doing the same work at the same batch:
``F`` (forward only), ``F+B(input)`` (forward + gradient w.r.t. the input, frozen parameters) or ``F+B(all)``
(forward + backward into every parameter). ``shapes`` default to 1 image, 32 images, 1 image x 32 targets.

Example (a method added later)::

    register("saliency", lambda m, x, t: cs.saliency(m, x, t.convscope), work=FB_INPUT)
"""

from __future__ import annotations

import torch
from torch import nn

import convscope as cs
from harness import F_, FB_INPUT, SINGLE, Shape, Targets, many_shapes, register

MANY = 32  # images in one call
TARGETS = 64  # targets of one image in one call (issue 4: "64 targets of one image")
IMAGE_SHAPES = (SINGLE, Shape(f"{MANY} imgs", MANY, 1))

# The layer CAMs explain, per model: the last feature map before global pooling.
CAM_LAYER = {
    "efficientnet_lite0": "head.act",  # 1280 x 7 x 7
    "efficientnet_lite1": "head.act",
    "efficientnet_lite2": "head.act",
    "demo_net": "features.relu5",
}


def cam_layer(model: nn.Module) -> str:
    return CAM_LAYER[getattr(model, "zoo_name", "")]


register("gradcam", lambda m, x, t: cs.gradcam(m, x, t.convscope, layer=cam_layer(m)), work=FB_INPUT,
         shapes=many_shapes(MANY, TARGETS), note="backward stops at the CAM layer")
register("gradcam_pp", lambda m, x, t: cs.gradcam_pp(m, x, t.convscope, layer=cam_layer(m)), work=FB_INPUT,
         shapes=many_shapes(MANY, TARGETS), note="backward stops at the CAM layer")
register("cam", lambda m, x, t: cs.cam(m, x, t.convscope, layer=cam_layer(m)), work=F_,
         shapes=many_shapes(MANY, TARGETS), note="no backward: classifier rows")
register("predict (top-5)", lambda m, x, t: cs.predict(m, x, k=5), work=F_, shapes=IMAGE_SHAPES)


def _capture_all(model: nn.Module, x: torch.Tensor, t: Targets) -> int:
    with torch.no_grad(), cs.probe(model, list(cs.named_layers(model)), detach=True) as p:
        model(x)
    return len(p.activations)


register("probe: capture every layer", _capture_all, work=F_, shapes=IMAGE_SHAPES,
         note="no_grad, detach=True, all named modules")


# Methods from the design that other modules will add; each is timed as soon as `convscope` exports it.
if hasattr(cs, "saliency"):
    register("saliency", lambda m, x, t: cs.saliency(m, x, t.convscope), work=FB_INPUT,
             shapes=many_shapes(MANY, TARGETS))
if hasattr(cs, "guided_backprop"):
    register("guided_backprop", lambda m, x, t: cs.guided_backprop(m, x, t.convscope), work=FB_INPUT,
             shapes=many_shapes(MANY, TARGETS))
if hasattr(cs, "input_x_gradient"):
    register("input_x_gradient", lambda m, x, t: cs.input_x_gradient(m, x, t.convscope), work=FB_INPUT,
             shapes=many_shapes(MANY, TARGETS))
    register("deconvnet_rule", lambda m, x, t: cs.deconvnet_rule(m, x, t.convscope), work=FB_INPUT,
             shapes=many_shapes(MANY, TARGETS))
    register("guided_gradcam", lambda m, x, t: cs.guided_gradcam(m, x, t.convscope, layer=cam_layer(m)),
             work=FB_INPUT, shapes=many_shapes(MANY, TARGETS), note="two backward rules: 2 F+B is the floor")
    register("smoothgrad (n=8)", lambda m, x, t: cs.smoothgrad(m, x, t.convscope, n=8), work=FB_INPUT,
             shapes=IMAGE_SHAPES, per_call=8, unit="noisy copy", note="ratio per noisy copy")
    register("occlusion 16/8", lambda m, x, t: cs.occlusion(m, x, t.convscope, window=32, stride=16, progress=False),
             work=F_, shapes=IMAGE_SHAPES, per_call=13 * 13 + 1, unit="window",
             note="224 px, window 32, stride 16: 169 occluded copies + the clean pass")
if hasattr(cs, "pgd"):
    register("pgd (per step)", lambda m, x, t: cs.pgd(m, x, eps=2 / 255, steps=4), work=FB_INPUT,
             shapes=IMAGE_SHAPES, per_call=4, unit="step",
             note="4 steps + target pinning + final clean/adversarial forward, per step")
if hasattr(cs, "deconvnet"):
    UNITS = Shape("1 img × 64 units", 1, 64)

    def _conv_layers(model: nn.Module) -> list[str]:
        return [n for n, mod in cs.named_layers(model).items() if isinstance(mod, nn.Conv2d)]

    register("deconvnet: 64 units of blocks.10", lambda m, x, t: cs.deconvnet(m, x, "blocks.10", list(range(64)),
                                                                               batch_size=64),
             work=FB_INPUT, shapes=[UNITS], unit="unit", note="autograd path (no max pooling in EfficientNet)")
    register("deconvnet: 64 units of features.relu5", lambda m, x, t: cs.deconvnet(m, x, "features.relu5",
                                                                                   list(range(64)), batch_size=64),
             work=FB_INPUT, models=["demo_net"], shapes=[UNITS], unit="unit",
             note="explicit Zeiler-Fergus path: switches, rectification, transposed filters")
    register("top_k_activations: every conv layer, k=9",
             lambda m, x, t: cs.top_k_activations(m, x, _conv_layers(m), k=9, progress=False),
             work=F_, models=["efficientnet_lite0", "demo_net"], shapes=IMAGE_SHAPES,
             note="one streaming pass, all conv layers at once")
if hasattr(cs, "activation_maximization"):
    AM_UNITS = Shape("64 units, 128 px", 1, 64)  # maps = 64: paired with F+B(input) at batch 64
    register("activation_maximization 64 units 128px, per step",
             lambda m, x, t: cs.activation_maximization(m, "blocks.10", list(range(64)), steps=8, size=128,
                                                        progress=False).images,
             work=FB_INPUT, shapes=[AM_UNITS], per_call=8, unit="step",
             note="64 channels of blocks.10, yosinski preset, 8 Adam steps at 128 px in one batch of 64; the paired "
                  "F+B(input) b64 runs the whole net at 224 px (baselines are native-size only), so x paired is lower "
                  "than a pixel-matched ratio by about (224/128)^2 = 3.1, and lower again for stopping at blocks.10")
if hasattr(cs, "invert"):
    register("invert (regularized) blocks.10, per step",
             lambda m, x, t: cs.invert(m, x, ["blocks.10"], steps=4, progress=False).images,
             work=FB_INPUT, shapes=IMAGE_SHAPES, per_call=4, unit="step",
             note="alpha-norm + TV + jitter, Adam; the forward stops at blocks.10 (the paired F+B runs the whole net)")

    def _upconv_reconstruct(model: nn.Module, x: torch.Tensor, t: Targets) -> torch.Tensor:
        from convscope.methods.upconv import UpconvNet

        with torch.no_grad(), cs.probe(model, "blocks.10", stop_after="blocks.10", detach=True) as p:
            p.forward(model, x[:1])
            shape = tuple(p.activations["blocks.10"].shape[1:])
        dec = UpconvNet(shape, tuple(x.shape[-2:]), layer="blocks.10").eval()  # untrained: same cost as trained
        return cs.reconstruct(model, dec, x, error=False).images

    register("UpconvNet reconstruction from blocks.10", _upconv_reconstruct, work=F_, shapes=IMAGE_SHAPES,
             note="encoder forward to blocks.10 + one decoder pass (an untrained decoder of the same shape; "
                  "regularized inversion needs ~200 steps of the row above)")

# The attribution methods of issue 19. Work per call in units of the paired baseline: IG one F+B(input) per path
# point, Score-CAM one forward per channel of the CAM layer, prediction difference one forward per window x sample.
IG_STEPS = 32
SCORECAM_BATCH = 64
PD_WINDOW, PD_STRIDE, PD_SAMPLES = 16, 16, 4  # the sampler's Gaussian is over (16 + 2 x 2)^2 pixels per channel
CAM_CHANNELS = {"efficientnet_lite0": 1280, "demo_net": 128}  # channels of CAM_LAYER
PD_WINDOWS = {"efficientnet_lite0": 14 * 14, "demo_net": 7 * 7}  # 224 px and 112 px at window 16, stride 16
BOTH = ("efficientnet_lite0", "demo_net")
MULTI = {"efficientnet_lite0": TARGETS, "demo_net": 8}  # targets of one image: demo_net has 8 classes
# IG on lite0: one image only (8 images x 32 steps is 8 F+B at batch 32, minutes per repeat on 2 busy cores)
IG_SHAPES = {"efficientnet_lite0": (SINGLE,), "demo_net": (SINGLE, Shape("8 imgs", 8, 1))}
if hasattr(cs, "integrated_gradients"):
    for model in BOTH:
        register(f"integrated_gradients ({IG_STEPS} steps)",
                 lambda m, x, t: cs.integrated_gradients(m, x, t.convscope, steps=IG_STEPS, method="gausslegendre",
                                                         progress=False),
                 work=FB_INPUT, models=[model], shapes=IG_SHAPES[model], per_call=IG_STEPS, unit="step",
                 note="Gauss-Legendre (Captum's default), zero baseline; ratio per path point")
        register(f"integrated_gradients adaptive ({IG_STEPS} steps)",
                 lambda m, x, t: cs.integrated_gradients(m, x, t.convscope, steps=IG_STEPS, progress=False),
                 work=FB_INPUT, models=[model], shapes=IG_SHAPES[model], per_call=IG_STEPS, unit="step",
                 note="the default: a forward-only pre-pass places the gradient points; ratio per gradient point")
        register("scorecam", lambda m, x, t: cs.scorecam(m, x, t.convscope, layer=cam_layer(m),
                                                         batch_size=SCORECAM_BATCH, progress=False),
                 work=F_, models=[model], per_call=CAM_CHANNELS[model], unit="channel",
                 shapes=[SINGLE] if model != "demo_net" else [*IMAGE_SHAPES, Shape("1 img × 8 tgts", 1, 8)],
                 note=f"one masked forward per channel of the CAM layer ({CAM_CHANNELS[model]}), "
                      f"{SCORECAM_BATCH} per batch; all targets read from the same outputs")
        register(f"prediction_difference {PD_WINDOW}/{PD_STRIDE} ×{PD_SAMPLES}",
                 lambda m, x, t: cs.prediction_difference(m, x, t.convscope, window=PD_WINDOW, stride=PD_STRIDE,
                                                          samples=PD_SAMPLES, progress=False),
                 work=F_, models=[model], shapes=[SINGLE], per_call=PD_WINDOWS[model] * PD_SAMPLES + 1,
                 unit="window sample",
                 note=f"conditional Gaussian sampler (fitted on the image, padding 2), {PD_WINDOWS[model]} windows "
                      f"× {PD_SAMPLES} samples + the clean pass")
    for model in BOTH:
        register("layercam", lambda m, x, t: cs.layercam(m, x, t.convscope, layer=cam_layer(m)), work=FB_INPUT,
                 models=[model], shapes=many_shapes(MANY, MULTI[model]), note="backward stops at the CAM layer")
        register("lrp (epsilon)", lambda m, x, t: cs.lrp(m, x, t.convscope), work=FB_INPUT, models=[model],
                 shapes=many_shapes(MANY, MULTI[model]), note="a tracing forward, a forward with the rules, K batched "
                                                              "backward passes; BN folded into the conv before it")
    register("lrp (epsilon_plus_flat)", lambda m, x, t: cs.lrp(m, x, t.convscope, composite="epsilon_plus_flat"),
             work=FB_INPUT, models=BOTH, shapes=IMAGE_SHAPES, note="z+ on convolutions, flat on the first layer")
    register("visual_backprop", lambda m, x, t: cs.visual_backprop(m, x), work=F_, models=BOTH, shapes=IMAGE_SHAPES,
             note="class-agnostic: one forward capturing every ReLU output, then the averaged maps deconvolved")
    register("cnn_fixations", lambda m, x, t: cs.cnn_fixations(m, x, t.convscope).density, work=F_, models=BOTH,
             shapes=[*IMAGE_SHAPES, Shape("1 img × 8 tgts", 1, 8)],
             note="torch.fx trace + one recorded forward, then the fixations unravelled layer by layer (max rule)")
