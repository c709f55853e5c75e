"""convscope: see what a convolutional network sees.

Flat public API::

    import convscope as cs
    model = cs.load_model("efficientnet_lite0")
    x = cs.load_images([cs.sample_image("chelsea")], model)
    maps = cs.gradcam(model, x, layer="head.act", target=cs.top_class)
    cs.save_png(cs.grid(cs.overlay(model.preprocess.denormalize(x).clamp(0, 1), maps), nrow=1), "cam.png")
"""

from .applications.style import StyleResult, gram, style_transfer
from .atlas.builder import build_atlas
from .atlas.store import Atlas, AtlasError, open_atlas
from .core.device import resolve_device, tune_cpu_allocator
from .core.images import Preprocess, load_image, load_images, sample_image, sample_images
from .core.layers import LayerInfo, list_layers, named_layers, resolve_layer
from .core.probe import preserved_state, probe
from .core.render import apply_colormap, filter_grid, grid, overlay, save_png, to_display, to_pil
from .core.report import HtmlReport
from .core.targets import target_scores, top_class, top_k
from .errors import (
    ConvscopeError,
    DataError,
    ImageLoadError,
    LayerNotFoundError,
    ModelLoadError,
    TargetError,
)
from .methods.adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .methods.backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .methods.cam import cam, gradcam, gradcam_pp
from .methods.deconvnet import deconvnet, unit_backprop
from .methods.dissect import Comparison, DissectConfig, LayerDissection, UnitLabel, compare, dissect
from .methods.filters import first_layer_filters
from .methods.invert import InversionResult, invert
from .methods.maximize import (
    FoolingResult,
    GeneratorResult,
    MaximizationResult,
    MultifacetedResult,
    Regularization,
    activation_maximization,
    channel,
    dgn_am,
    encode,
    fooling_image,
    logit,
    multifaceted,
    neuron,
)
from .methods.net2vec import ConceptVector, Net2VecConfig, Net2VecResult, net2vec
from .methods.occlusion import OcclusionResult, occlusion
from .methods.perturb import PerturbationStudy, perturbation_study
from .methods.saliency import gradient, input_x_gradient, saliency, smoothgrad
from .methods.topk import (
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
from .methods.upconv import UpconvNet, load_upconv, reconstruct, train_upconv
from .models import get_classes, get_preprocess, imagenet_classes, list_models, load_model, load_weights
from .models.predict import Prediction, predict

__version__ = "0.1.0"

__all__ = [
    "ConvscopeError", "DataError", "HtmlReport", "ImageLoadError", "LayerInfo", "LayerNotFoundError",
    "ModelLoadError", "Prediction", "Preprocess", "TargetError", "apply_colormap", "cam", "filter_grid",
    "get_classes", "get_preprocess", "gradcam", "gradcam_pp", "grid", "imagenet_classes", "list_layers",
    "list_models", "load_image", "load_images", "load_model", "load_weights", "named_layers", "overlay",
    "predict", "preserved_state", "probe", "resolve_device", "resolve_layer", "sample_image", "sample_images",
    "save_png", "target_scores", "to_display", "to_pil", "top_class", "top_k", "tune_cpu_allocator",
    "OcclusionResult", "deconvnet_rule", "gradient", "guided_backprop", "guided_gradcam", "input_x_gradient",
    "occlusion", "saliency", "smoothgrad", "AdversarialResult", "FeatureChange", "feature_change", "fgsm", "pgd",
    "DeadUnits", "TopKActivations", "dead_units", "deconvnet", "first_layer_filters", "receptive_field",
    "receptive_fields", "render_top_k", "top_k_activations", "TopKPatches", "top_k_patches",
    "FoolingResult", "MaximizationResult", "Regularization", "activation_maximization", "channel",
    "fooling_image", "logit", "neuron",
    "GeneratorResult", "MultifacetedResult", "dgn_am", "encode", "multifaceted",
    "InversionResult", "PerturbationStudy", "StyleResult", "UpconvNet", "gram", "invert", "load_upconv",
    "perturbation_study", "reconstruct", "style_transfer", "train_upconv",
    "Comparison", "DissectConfig", "LayerDissection", "UnitLabel", "compare", "dissect",
    "ConceptVector", "Net2VecConfig", "Net2VecResult", "net2vec",
    "Atlas", "AtlasError", "build_atlas", "open_atlas", "unit_backprop",
]
