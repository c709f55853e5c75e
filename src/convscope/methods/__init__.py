"""Attribution and visualization methods; each a function on tensors, batched over images and targets."""

from ..core.stream import layer_features
from .adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .cam import cam, default_cam_layer, gradcam, gradcam_pp
from .deconvnet import deconvnet
from .dissect import Comparison, DissectConfig, LayerDissection, UnitLabel, compare, dissect, unit_thresholds
from .filters import first_layer_filters
from .invert import InversionResult, feature_match, invert
from .maximize import (
    PRESETS,
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
    kmeans,
    log_softmax,
    logit,
    multifaceted,
    neuron,
    per_image,
)
from .net2vec import ConceptVector, Net2VecConfig, Net2VecResult, net2vec
from .occlusion import OcclusionResult, occlusion
from .perturb import PERTURBATIONS, PerturbationStudy, binarize, drop_least, dropout, perturb, perturbation_study
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
from .upconv import UpconvNet, decode, load_upconv, reconstruct, save_upconv, train_upconv, unpool2x

__all__ = [
    "AdversarialResult", "FeatureChange", "OcclusionResult", "cam", "deconvnet_rule", "default_cam_layer",
    "feature_change", "fgsm", "gradcam", "gradcam_pp", "gradient", "guided_backprop", "guided_gradcam",
    "input_x_gradient", "occlusion", "pgd", "saliency", "smoothgrad",
    "DeadUnits", "TopKActivations", "dead_units", "deconvnet", "first_layer_filters", "receptive_field",
    "receptive_fields", "render_top_k", "top_k_activations", "TopKPatches", "top_k_patches",
    "PRESETS", "FoolingResult", "MaximizationResult", "Regularization", "activation_maximization", "channel",
    "fooling_image", "log_softmax", "logit", "neuron", "per_image",
    "GeneratorResult", "MultifacetedResult", "dgn_am", "encode", "kmeans", "multifaceted",
    "InversionResult", "feature_match", "invert", "layer_features", "PERTURBATIONS", "PerturbationStudy",
    "binarize", "drop_least", "dropout", "perturb", "perturbation_study", "UpconvNet", "decode", "load_upconv",
    "reconstruct", "save_upconv", "train_upconv", "unpool2x",
    "Comparison", "DissectConfig", "LayerDissection", "UnitLabel", "compare", "dissect", "unit_thresholds",
    "ConceptVector", "Net2VecConfig", "Net2VecResult", "net2vec",
]
