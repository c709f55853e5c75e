"""Attribution and visualization methods; each a function on tensors, batched over images and targets."""

from ..core.stream import layer_features
from .adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
from .backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .cam import cam, default_cam_layer, gradcam, gradcam_pp, layercam, resolve_cam_layer, scorecam
from .cnn_fixations import FixationResult, cnn_fixations
from .deconvnet import deconvnet, deconvnet_rows
from .dissect import Comparison, DissectConfig, LayerDissection, UnitLabel, compare, dissect, unit_thresholds
from .dream import DreamResult, deep_dream
from .embed import Embedding, embed
from .filters import first_layer_filters
from .graph import GraphNode, ModelGraph, model_graph
from .integrated_gradients import (
    IntegratedGradientsResult,
    adaptive_quadrature,
    integrated_gradients,
    segment_residuals,
)
from .invert import InversionResult, feature_match, invert
from .landscape import InterpolationResult, LandscapeResult, interpolate, loss_landscape, random_direction
from .lrp import lrp
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
from .prediction_difference import prediction_difference
from .rollout import attention_maps, attention_rollout
from .saliency import gradient, input_x_gradient, saliency, smoothgrad
from .similarity import SimilarityResult, UnitMatching, layer_similarity, linear_cka, match_units, rbf_cka, svcca
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
from .upconv import UpconvNet, decode, load_generator, load_upconv, reconstruct, save_upconv, train_upconv, unpool2x
from .visual_backprop import visual_backprop

__all__ = [
    "resolve_cam_layer", "attention_maps", "attention_rollout",
    "SimilarityResult", "UnitMatching", "layer_similarity", "linear_cka", "match_units", "rbf_cka", "svcca",
    "InterpolationResult", "LandscapeResult", "interpolate", "loss_landscape", "random_direction",
    "layercam", "scorecam", "FixationResult", "cnn_fixations", "DreamResult", "deep_dream", "Embedding", "embed",
    "GraphNode", "ModelGraph", "model_graph", "IntegratedGradientsResult", "adaptive_quadrature", "segment_residuals",
    "integrated_gradients", "lrp", "prediction_difference", "visual_backprop",
    "AdversarialResult", "FeatureChange", "OcclusionResult", "cam", "deconvnet_rule", "default_cam_layer",
    "feature_change", "fgsm", "gradcam", "gradcam_pp", "gradient", "guided_backprop", "guided_gradcam",
    "input_x_gradient", "occlusion", "pgd", "saliency", "smoothgrad",
    "DeadUnits", "TopKActivations", "dead_units", "deconvnet", "deconvnet_rows", "first_layer_filters",
    "receptive_field", "receptive_fields", "render_top_k", "top_k_activations", "TopKPatches", "top_k_patches",
    "PRESETS", "FoolingResult", "MaximizationResult", "Regularization", "activation_maximization", "channel",
    "fooling_image", "log_softmax", "logit", "neuron", "per_image",
    "GeneratorResult", "MultifacetedResult", "dgn_am", "encode", "kmeans", "multifaceted",
    "InversionResult", "feature_match", "invert", "layer_features", "PERTURBATIONS", "PerturbationStudy",
    "binarize", "drop_least", "dropout", "perturb", "perturbation_study", "UpconvNet", "decode",
    "load_generator", "load_upconv", "reconstruct", "save_upconv", "train_upconv", "unpool2x",
    "Comparison", "DissectConfig", "LayerDissection", "UnitLabel", "compare", "dissect", "unit_thresholds",
    "ConceptVector", "Net2VecConfig", "Net2VecResult", "net2vec",
]
