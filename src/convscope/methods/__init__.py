"""Attribution and visualization methods; each a function on tensors, batched over images and targets."""

from .adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .cam import cam, default_cam_layer, gradcam, gradcam_pp
from .deconvnet import deconvnet
from .filters import first_layer_filters
from .maximize import (
    PRESETS,
    FoolingResult,
    MaximizationResult,
    Regularization,
    activation_maximization,
    channel,
    fooling_image,
    log_softmax,
    logit,
    neuron,
    per_image,
)
from .occlusion import OcclusionResult, occlusion
from .saliency import gradient, input_x_gradient, saliency, smoothgrad
from .topk import (
    DeadUnits,
    TopKActivations,
    TopKPatches,
    dead_units,
    receptive_field,
    receptive_fields,
    render_top_k,
    top_k_activations,
    top_k_patches,
)

__all__ = [
    "AdversarialResult", "FeatureChange", "OcclusionResult", "cam", "deconvnet_rule", "default_cam_layer",
    "feature_change", "fgsm", "gradcam", "gradcam_pp", "gradient", "guided_backprop", "guided_gradcam",
    "input_x_gradient", "occlusion", "pgd", "saliency", "smoothgrad",
    "DeadUnits", "TopKActivations", "dead_units", "deconvnet", "first_layer_filters", "receptive_field",
    "receptive_fields", "render_top_k", "top_k_activations", "TopKPatches", "top_k_patches",
    "PRESETS", "FoolingResult", "MaximizationResult", "Regularization", "activation_maximization", "channel",
    "fooling_image", "log_softmax", "logit", "neuron", "per_image",
]
