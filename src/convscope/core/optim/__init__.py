"""The shared image-optimization loop: activation maximization, fooling images, network inversion, DeepDream.

An image batch of N pictures is optimized jointly, one forward and one backward pass per step for all of them::

    x = param()                          # parametrization -> N x C x H x W in the model's input space
    x~ = T(x)                            # transforms drawn at random each step (jitter, scale): robustness
    J_i = objective_i(model(x~)) - sum_r penalty_r(x_i - c)        # c: the centre image (the data mean)
    update the parameters by Adam or plain gradient ascent on sum_i J_i
    x <- projection_r(x, dJ/dx, step) for each projection regularizer, then keep x in the valid pixel box

Pieces, each replaceable:

* **Objective** (:class:`Objective`): a function of the captured activations returning one value per image, with
  the layers it reads (so only those are hooked, and the forward pass stops after the deepest one). Objectives form
  a small algebra (``+``, ``-``, ``*`` scalar) as in Lucid (Olah et al. 2017).
* **Parametrization** (:class:`PixelImage`, :class:`FourierImage`): pixels in the model's input space or in RGB
  mapped through the model's ``preprocess``; or the decorrelated Fourier parametrization of Olah et al. 2017
  ("Feature Visualization", Distill, section "Preconditioning and Parameterization"): 1/f-scaled spectrum, optional
  colour decorrelation, sigmoid to RGB.
  Or the image made by a frozen generator from a learnable code (:class:`GeneratorImage` / :class:`GeneratorParam`,
  DGN-AM, Nguyen et al. 2016; survey Eq. 10), with :class:`CodePenalty` as the L2 prior on the code.
* **Transforms** (:class:`Jitter`, :class:`RandomScale`): differentiable random shifts / zooms applied before each
  forward pass (Mordvintsev et al. 2015; Olah et al. 2017, "Transformation robustness").
* **Schedules** (:data:`Schedule`, :func:`cosine_decay`, :func:`geometric`): a factor per step for Adam's step
  size (``optimize_images(lr_schedule=...)``) or for a penalty's weight (:class:`Scheduled`).
* **Regularizers**: penalties added to the loss (:class:`L2Penalty`, Simonyan et al. 2014 Eq. 1; :class:`AlphaNorm`
  and :class:`TotalVariation`, Mahendran & Vedaldi 2015 Eq. 3-4) or projections
  applied to the image after each step (:class:`Decay`, :class:`Blur`, :class:`ClipNorm`,
  :class:`ClipContribution`, Yosinski et al. 2015 Sec. 3; survey Eq. 9).

Randomness comes from one ``torch.Generator`` per image (seeded ``seed + i``), so a batch of units gives the same
pictures as optimizing each unit alone with its own seed. The model runs under :func:`~convscope.core.probe.probe`:
eval mode, parameters frozen (the backward pass computes the input gradient only), no hook left afterwards.

Modules: :mod:`.objectives`, :mod:`.params` (parametrizations and per-image generators), :mod:`.transforms`,
:mod:`.regularizers`, :mod:`.loop` (:func:`optimize_images`). Every public name is importable from here.
"""

from __future__ import annotations

from ..layers import OUTPUT
from .loop import OPTIMIZERS, OptimResult, cosine_decay, geometric, mean_abs_normalized, optimize_images
from .objectives import Objective, activation_l2
from .params import (
    CODE_NOISE_STD,
    COLOR_CORRELATION_SVD_SQRT,
    FOURIER_NOISE_STD,
    GENERATOR_OUTPUTS,
    PARAMETRIZATIONS,
    PIXEL_NOISE_STD,
    Fourier,
    FourierImage,
    GeneratorImage,
    GeneratorParam,
    Generators,
    ImageParam,
    ParamSpec,
    Pixel,
    PixelImage,
    Seed,
    centre_rgb,
    fft_frequencies,
    make_generators,
    make_param,
)
from .regularizers import (
    AlphaNorm,
    Blur,
    ClipContribution,
    ClipNorm,
    CodePenalty,
    Decay,
    L2Penalty,
    Regularization,
    Regularizer,
    Schedule,
    Scheduled,
    TotalVariation,
    alpha_norm,
    clip_small_contribution,
    clip_small_norm,
    decay,
    total_variation,
)
from .transforms import Jitter, RandomScale, Transform

__all__ = [
    "CODE_NOISE_STD", "COLOR_CORRELATION_SVD_SQRT", "FOURIER_NOISE_STD", "GENERATOR_OUTPUTS", "OPTIMIZERS", "OUTPUT",
    "PARAMETRIZATIONS", "PIXEL_NOISE_STD", "AlphaNorm", "Blur", "ClipContribution", "ClipNorm", "CodePenalty", "Decay",
    "Fourier", "FourierImage", "GeneratorImage", "GeneratorParam", "Generators", "ImageParam", "Jitter", "L2Penalty",
    "Objective", "OptimResult", "ParamSpec", "Pixel", "PixelImage", "RandomScale", "Regularization", "Regularizer",
    "Schedule", "Scheduled", "Seed", "TotalVariation", "Transform", "activation_l2", "alpha_norm", "centre_rgb",
    "clip_small_contribution", "clip_small_norm", "cosine_decay", "decay", "fft_frequencies", "geometric",
    "make_generators", "make_param", "mean_abs_normalized", "optimize_images", "total_variation",
]
