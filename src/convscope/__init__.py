"""convscope: see what a convolutional network sees.

Flat public API::

    import convscope as cs
    model = cs.load_model("efficientnet_lite0")
    x = cs.load_images([cs.sample_image("chelsea")], model)
    maps = cs.gradcam(model, x, layer="head.act", target=cs.top_class)
    cs.save_png(cs.grid(cs.overlay(model.preprocess.denormalize(x).clamp(0, 1), maps), nrow=1), "cam.png")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that `import convscope` and the
# CLI's `--help` do not import torch and every method.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".applications.style": ("StyleResult", "gram", "style_transfer",),
    ".atlas.builder": ("build_atlas",),
    ".atlas.store": ("Atlas", "AtlasError", "open_atlas",),
    ".core.device": ("resolve_device", "tune_cpu_allocator", "allocator_state", "release_memory",),
    ".core.images": (
        "Preprocess", "load_image", "load_images", "sample_image", "sample_images", "expand_inputs", "image_name",
        "unique_names",
    ),
    ".core.layers": ("OUTPUT", "is_output", "named_layers", "resolve_layer",),
    ".core.model": ("LayerInfo", "list_layers",),
    ".core.probe": ("preserved_state", "probe",),
    ".core.render": ("apply_colormap", "as_rgb", "filter_grid", "grid", "overlay", "save_png", "to_display", "to_pil",),
    ".core.report": ("HtmlReport",),
    ".core.targets": ("detection", "output", "segmentation", "target_scores", "top_class", "top_k",),
    ".errors": (
        "ConvscopeError", "DataError", "ImageLoadError", "LayerNotFoundError", "ModelLoadError", "TargetError",
    ),
    ".methods.adversarial": ("AdversarialResult", "FeatureChange", "feature_change", "fgsm", "pgd",),
    ".methods.backprop": ("deconvnet_rule", "guided_backprop", "guided_gradcam",),
    ".methods.cam": ("cam", "gradcam", "gradcam_pp", "layercam", "scorecam", "resolve_cam_layer",),
    ".methods.deconvnet": ("deconvnet", "deconvnet_rows", "unit_backprop",),
    ".methods.dissect": ("Comparison", "DissectConfig", "LayerDissection", "UnitLabel", "compare", "dissect",),
    ".methods.filters": ("first_layer_filters",),
    ".methods.invert": ("InversionResult", "invert",),
    ".methods.maximize": (
        "FoolingResult", "GeneratorResult", "MaximizationResult", "MultifacetedResult", "Regularization",
        "activation_maximization", "channel", "dgn_am", "encode", "fooling_image", "logit", "multifaceted", "neuron",
    ),
    ".methods.net2vec": ("ConceptVector", "Net2VecConfig", "Net2VecResult", "net2vec",),
    ".methods.occlusion": ("OcclusionResult", "occlusion",),
    ".methods.perturb": ("PerturbationStudy", "perturbation_study",),
    ".methods.saliency": ("gradient", "input_x_gradient", "saliency", "smoothgrad",),
    ".methods.topk": (
        "DeadUnits", "TopKActivations", "TopKPatches", "dead_units", "receptive_field", "receptive_fields",
        "render_top_k", "top_k_activations", "top_k_patches",
    ),
    ".methods.upconv": ("UpconvNet", "load_generator", "load_upconv", "reconstruct", "train_upconv",),
    ".models": ("get_classes", "get_preprocess", "imagenet_classes", "list_models", "load_model", "load_weights",),
    ".models.predict": ("Prediction", "predict",),
    ".applications.monitor": ("EvolutionMonitor",),
    ".methods.integrated_gradients": ("IntegratedGradientsResult", "adaptive_quadrature", "integrated_gradients",
                                      "segment_residuals",),
    ".methods.lrp": ("lrp",),
    ".methods.visual_backprop": ("visual_backprop",),
    ".methods.cnn_fixations": ("FixationResult", "cnn_fixations",),
    ".methods.prediction_difference": ("prediction_difference",),
    ".methods.graph": ("GraphNode", "ModelGraph", "model_graph",),
    ".methods.embed": ("Embedding", "embed",),
    ".methods.dream": ("DreamResult", "deep_dream",),
    ".applications.graph_report": ("graph_report",),
    ".applications.embed_report": ("embed_report",),
    ".applications.dream_report": ("dream_report",),
    ".core.stream": ("layer_features", "stream_layers",),
    ".methods.similarity": (
        "SimilarityResult", "UnitMatching", "layer_similarity", "linear_cka", "match_units", "rbf_cka", "svcca",
    ),
    ".methods.landscape": (
        "InterpolationResult", "LandscapeResult", "interpolate", "loss_landscape", "random_direction",
    ),
    ".applications.similarity_report": ("similarity_report",),
    ".applications.landscape_report": ("landscape_report",),
    ".methods.rollout": ("attention_maps", "attention_rollout",),
    ".core.tokens": ("as_feature_map", "from_feature_map", "TokenInfo",),
    ".core.batching": ("activation_sizes", "auto_batch_size", "resolve_batch_size",),
    ".models.exported": ("export_model",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'convscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers and IDEs see the same names (generated from _EXPORTS)
    from .applications.dream_report import dream_report
    from .applications.embed_report import embed_report
    from .applications.graph_report import graph_report
    from .applications.landscape_report import landscape_report
    from .applications.monitor import EvolutionMonitor
    from .applications.similarity_report import similarity_report
    from .applications.style import StyleResult, gram, style_transfer
    from .atlas.builder import build_atlas
    from .atlas.store import Atlas, AtlasError, open_atlas
    from .core.batching import activation_sizes, auto_batch_size, resolve_batch_size
    from .core.device import allocator_state, release_memory, resolve_device, tune_cpu_allocator
    from .core.images import (
        Preprocess,
        expand_inputs,
        image_name,
        load_image,
        load_images,
        sample_image,
        sample_images,
        unique_names,
    )
    from .core.layers import OUTPUT, is_output, named_layers, resolve_layer
    from .core.model import LayerInfo, list_layers
    from .core.probe import preserved_state, probe
    from .core.render import apply_colormap, as_rgb, filter_grid, grid, overlay, save_png, to_display, to_pil
    from .core.report import HtmlReport
    from .core.stream import layer_features, stream_layers
    from .core.targets import detection, output, segmentation, target_scores, top_class, top_k
    from .core.tokens import TokenInfo, as_feature_map, from_feature_map
    from .errors import ConvscopeError, DataError, ImageLoadError, LayerNotFoundError, ModelLoadError, TargetError
    from .methods.adversarial import AdversarialResult, FeatureChange, feature_change, fgsm, pgd
    from .methods.backprop import deconvnet_rule, guided_backprop, guided_gradcam
    from .methods.cam import cam, gradcam, gradcam_pp, layercam, resolve_cam_layer, scorecam
    from .methods.cnn_fixations import FixationResult, cnn_fixations
    from .methods.deconvnet import deconvnet, deconvnet_rows, unit_backprop
    from .methods.dissect import Comparison, DissectConfig, LayerDissection, UnitLabel, compare, dissect
    from .methods.dream import DreamResult, deep_dream
    from .methods.embed import Embedding, embed
    from .methods.filters import first_layer_filters
    from .methods.graph import GraphNode, ModelGraph, model_graph
    from .methods.integrated_gradients import (
        IntegratedGradientsResult,
        adaptive_quadrature,
        integrated_gradients,
        segment_residuals,
    )
    from .methods.invert import InversionResult, invert
    from .methods.landscape import InterpolationResult, LandscapeResult, interpolate, loss_landscape, random_direction
    from .methods.lrp import lrp
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
    from .methods.prediction_difference import prediction_difference
    from .methods.rollout import attention_maps, attention_rollout
    from .methods.saliency import gradient, input_x_gradient, saliency, smoothgrad
    from .methods.similarity import (
        SimilarityResult,
        UnitMatching,
        layer_similarity,
        linear_cka,
        match_units,
        rbf_cka,
        svcca,
    )
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
    from .methods.upconv import UpconvNet, load_generator, load_upconv, reconstruct, train_upconv
    from .methods.visual_backprop import visual_backprop
    from .models import get_classes, get_preprocess, imagenet_classes, list_models, load_model, load_weights
    from .models.exported import export_model
    from .models.predict import Prediction, predict
