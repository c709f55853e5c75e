"""Attribution and visualization methods; each a function on tensors, batched over images and targets."""

from .adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .cam import cam, default_cam_layer, gradcam, gradcam_pp
from .occlusion import OcclusionResult, occlusion
from .saliency import gradient, input_x_gradient, saliency, smoothgrad

__all__ = [
    "AdversarialResult", "FeatureChange", "OcclusionResult", "cam", "deconvnet_rule", "default_cam_layer",
    "feature_change", "fgsm", "gradcam", "gradcam_pp", "gradient", "guided_backprop", "guided_gradcam",
    "input_x_gradient", "occlusion", "pgd", "saliency", "smoothgrad",
]
