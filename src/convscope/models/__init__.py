"""Model zoo and loaders."""

from .zoo import ZOO, get_classes, get_preprocess, imagenet_classes, list_models, load_model, load_weights

__all__ = ["ZOO", "get_classes", "get_preprocess", "imagenet_classes", "list_models", "load_model", "load_weights"]
