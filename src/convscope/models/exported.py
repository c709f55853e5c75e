"""Exported models: ``torch.export`` archives (``.pt2``) made hookable, and what a TorchScript archive cannot do.

A ``.pt2`` file (``torch.export.save``) holds a graph of ATen operations, not the Python modules. Every layer method
needs modules to hook, so :func:`load_exported` rebuilds the module tree with ``torch.export.unflatten``: each
module the forward pass called becomes an ``InterpreterModule`` under its original ``named_modules()`` name
(``layer4``, ``layer4.2.relu``, ``features.conv1``), which runs its part of the graph and takes forward hooks. On
top of that this module

* names each rebuilt module's class after the original one (``Conv2d``, ``ReLU``, ``MaxPool2d``; the full path in
  ``.original_type``), so ``convscope layers`` and the default CAM layer read as for the eager model;
* routes ``aten.relu`` / ``relu_`` / ``hardtanh`` / ``hardtanh_`` / ``relu6`` through their ``torch`` functions,
  so the backward rules of guided backpropagation and the DeconvNet (a ``TorchFunctionMode``) see them;
* turns an input the export did not allow (a fixed batch size or image size) into one line naming the sizes it
  takes and how to re-export;
* refuses a program exported in training mode (batch norm with batch statistics, active dropout);
* reads the preprocess, class names and zoo name that :func:`export_model` stores in the archive.

Limits (docs/models.md): modules that never ran in the exported forward pass are empty shells that never fire; a
module object registered under two attribute names (``self.alias = self.act``) becomes two modules, one per name,
where the eager model has one module called twice (``act:0``, ``act:1``; :func:`name_map` pairs them); the
modules are not ``nn.Conv2d`` / ``nn.Linear`` objects, so methods that read module types or weights (the explicit
DeconvNet chain, CAM's classifier lookup, LRP, CNN-fixations) fall back to autograd or refuse; Python functions
such as ``F.local_response_norm`` are decomposed into ATen ops, so rules keyed on them (the DeconvNet's LRN
pass-through) do not apply; the graph is frozen in the mode it was exported in (``.train()`` changes nothing).

A TorchScript archive (``torch.jit.save``) keeps the layer-free methods (gradients, occlusion); its submodules
take no Python hooks and its ReLUs run inside the TorchScript interpreter, so :func:`refuse_scripted` (called by
the probe) stops every layer method and every backward-rule method with one line naming what to load instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.unflatten import UnflattenedModule

from ..core.checks import refuse_scripted, scripted_parts
from ..core.io import atomic_write_bytes
from ..core.model import set_model_facts
from ..core.preprocess import Preprocess
from ..errors import ConvscopeError, ModelLoadError

__all__ = ["EXPORT_META", "ExportedModule", "export_model", "hookable", "is_export_archive", "load_exported",
           "name_map", "refuse_scripted", "scripted_parts"]

EXPORT_META = "convscope.json"
"""Name of the extra file in a ``.pt2`` archive holding the preprocess, classes and zoo name."""

log = logging.getLogger("convscope.models")

# ATen overloads in an exported graph -> the torch functions the backward rules (core/rules.py) are keyed on
RULE_OPS: dict[Any, Any] = {
    torch.ops.aten.relu.default: torch.relu,
    torch.ops.aten.relu_.default: torch.relu_,
    torch.ops.aten.hardtanh.default: F.hardtanh,
    torch.ops.aten.hardtanh_.default: F.hardtanh_,
    torch.ops.aten.relu6.default: F.relu6,
}

# ATen ops whose argument says "training": (op, index of that argument)
TRAINING_FLAGS: dict[Any, int] = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.dropout_.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
}

REEXPORT = ("re-export with torch.export.export(model.eval(), (x,), dynamic_shapes={'x': {0: Dim.AUTO, 2: Dim.AUTO, "
            "3: Dim.AUTO}}) or convscope.models.exported.export_model(model, 'model.pt2')")


def is_export_archive(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ``torch.export.save`` archive (a zip holding ``<name>/archive_format``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") or n == "archive_format" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class ExportedModule(UnflattenedModule):
    """An unflattened ``torch.export`` program whose inputs are checked with a one-line error.

    Attributes: ``program`` (the :class:`~torch.export.ExportedProgram`), ``input_shapes`` (the example input's
    shape with ``None`` for each dynamic dimension) and, where the archive carries them, ``preprocess``,
    ``classes``, ``zoo_name``."""

    program: ExportedProgram
    input_shapes: tuple[int | None, ...]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        except ConvscopeError as exc:  # raised by a hook: torch.fx appends "While executing ..." to the message
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].split("\n\nWhile executing")[0].rstrip(), *exc.args[1:])
            raise
        except RuntimeError as exc:
            text = str(exc)
            if not text.startswith("Expected input at"):
                raise
            got = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else "?"
            takes = "x".join("any" if s is None else str(s) for s in self.input_shapes)
            first = text.split(". If you meant")[0]
            raise ConvscopeError(f"this exported model takes inputs of shape {takes} but got {got} ({first}); pass "
                                 f"that shape, or {REEXPORT}") from None


@cache
def exported_class(base: type, type_path: str) -> type:
    """A subclass of ``base`` (``InterpreterModule``) named like the original module class ``type_path``."""
    short = type_path.rsplit(".", 1)[-1]
    doc = f"An exported {type_path}: runs its part of the exported graph (``InterpreterModule``)."
    return type(short, (base,), {"original_type": type_path, "__doc__": doc, "__module__": base.__module__})


def module_types(program: ExportedProgram) -> dict[str, str]:
    """``{module name: original class path}`` for every module recorded in the program's ``nn_module_stack``."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for path, type_path in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(path, str) and isinstance(type_path, str):
                types.setdefault(re.sub(r"@\d+$", "", path), type_path)
    return types


def training_ops(program: ExportedProgram) -> list[str]:
    """Names of the ops of ``program`` that run in training mode (batch statistics, active dropout)."""
    found = []
    for node in program.graph.nodes:
        at = TRAINING_FLAGS.get(node.target) if node.op == "call_function" else None
        if at is not None and len(node.args) > at and node.args[at] is True:
            found.append(str(node.target).split(".")[1])
    return sorted(set(found))


def use_torch_functions(module: nn.Module) -> int:
    """Replace the ATen ReLU-family ops of every graph under ``module`` by their torch functions (same values)
    so the probe's backward rules apply; returns how many calls were rewritten."""
    count = 0
    for mod in module.modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        changed = 0
        for node in graph.nodes:
            if node.op == "call_function" and node.target in RULE_OPS:
                node.target = RULE_OPS[node.target]
                changed += 1
        gm = mod.__dict__.get("graph_module")
        if changed and isinstance(gm, torch.fx.GraphModule):
            gm.recompile()
        count += changed
    return count


def hookable(program: ExportedProgram, meta: Mapping[str, Any] | None = None) -> ExportedModule:
    """The module tree of ``program`` rebuilt under the original layer names (``torch.export.unflatten``), with
    the rebuilt classes named after the original ones and the ReLU-family ops visible to the backward rules."""
    bad = training_ops(program)
    if bad:
        raise ModelLoadError(f"the exported program runs {', '.join(bad)} in training mode (batch statistics / "
                             "active dropout), so its outputs change with the batch; export the model in eval mode: "
                             "torch.export.export(model.eval(), ...)")
    with warnings.catch_warnings():  # torch's own deprecation notice about its pytree specs: not the user's
        warnings.simplefilter("ignore", FutureWarning)
        unflat = torch.export.unflatten(program)
    types = module_types(program)
    for name, mod in unflat.named_modules():
        if name and name in types and type(mod).__name__ in ("InterpreterModule", "InterpreterModuleDispatcher"):
            base: type = type(mod)  # as a plain type: mypy takes a module class for unhashable in @cache's key
            mod.__class__ = exported_class(base, types[name])
    use_torch_functions(unflat)
    unflat.__class__ = ExportedModule
    model = cast(ExportedModule, unflat)
    model.program = program
    model.input_shapes = input_shapes(program)
    apply_meta(model, meta or {})
    return model


def input_shapes(program: ExportedProgram) -> tuple[int | None, ...]:
    """The first user input's shape, ``None`` for each dynamic (symbolic) dimension; ``()`` when unknown."""
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(s if isinstance(s, int) else None for s in val.shape)
            return ()
    return ()


def apply_meta(model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Set ``.preprocess`` / ``.classes`` / ``.zoo_name`` from the archive's metadata; without a stored preprocess,
    a program exported for one image size gets ``Preprocess(resize, crop)`` of that size (no normalization)."""
    pre = meta.get("preprocess")
    if isinstance(pre, Mapping):
        set_model_facts(model, preprocess=Preprocess(
            resize=pre.get("resize"), crop=tuple(pre["crop"]) if isinstance(pre.get("crop"), list) else pre.get("crop"),
            mean=tuple(pre.get("mean", (0.0,) * 3)), std=tuple(pre.get("std", (1.0,) * 3))))
    else:
        shape: tuple[int | None, ...] = getattr(model, "input_shapes", ())
        if len(shape) == 4 and shape[2] is not None and shape[3] is not None:
            set_model_facts(model, preprocess=Preprocess(resize=min(shape[2], shape[3]), crop=(shape[2], shape[3])))
    if isinstance(meta.get("classes"), list):
        set_model_facts(model, classes=tuple(str(c) for c in meta["classes"]))
    if meta.get("zoo_name"):
        set_model_facts(model, zoo_name=str(meta["zoo_name"]))


def load_exported(path: str | os.PathLike[str]) -> ExportedModule:
    """Load a ``torch.export.save`` archive as a hookable module (see the module docstring)."""
    path = Path(path)
    extra = {EXPORT_META: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelLoadError(f"{str(path)!r} is not a readable torch.export archive ({type(exc).__name__}: {first}); "
                             f"save it with torch.export.save on torch {torch.__version__} or newer") from None
    meta: dict[str, Any] = {}
    if extra.get(EXPORT_META):
        try:
            meta = json.loads(extra[EXPORT_META])
        except ValueError:
            log.warning("%s: ignoring an unreadable %s", path, EXPORT_META)
    return hookable(program, meta if isinstance(meta, dict) else {})


def export_model(model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor | None = None,
                 dynamic: bool = True) -> Path:
    """Export ``model`` (in eval mode; its own mode is restored) to a ``.pt2`` archive with its preprocess, class
    names and zoo name, written atomically.

    ``example``: an input batch (default two zero images at the model's input size, else 224 px); ``dynamic``:
    let the batch size and the image height and width vary (``Dim.AUTO``: export keeps the ranges the model
    allows)."""
    from ..core.model import declared_preprocess, default_input_size, model_device, model_preprocess

    if example is None:
        example = torch.zeros(2, 3, *default_input_size(model), device=model_device(model))
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ConvscopeError(f"export_model(example=...) needs an N x C x H x W batch, got "
                             f"{type(example).__name__} {tuple(getattr(example, 'shape', ()))}")
    shapes = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},) if dynamic else None
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    finally:
        for m, flag in modes:
            m.training = flag
    meta: dict[str, Any] = {}
    if declared_preprocess(model) is not None:  # else the loader sizes a static export by its example
        pre = model_preprocess(model)
        meta["preprocess"] = {"resize": pre.resize, "crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std)}
    classes = getattr(model, "classes", None)
    if classes is not None:
        meta["classes"] = [str(c) for c in classes]
    if getattr(model, "zoo_name", None):
        meta["zoo_name"] = str(model.zoo_name)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={EXPORT_META: json.dumps(meta)})
    return atomic_write_bytes(path, buf.getvalue())


def name_map(eager: nn.Module, exported: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """``{exported layer name: eager layer name}``, from one forward pass of each on ``x`` (module calls paired in
    execution order).

    A module keeps its name when it runs as often in both; a module object the eager model registers under several
    attribute names becomes one module per name in the export, and maps to the eager ``name:k`` call it stands for
    (e.g. ``alias`` -> ``act:1``, and ``act`` -> ``act:0``)."""
    from ..core.probe import preserved_state

    with preserved_state(eager), preserved_state(exported):
        a, b = module_calls(eager, x), module_calls(exported, x)
    if len(a) != len(b):
        raise ConvscopeError(f"the eager model ran {len(a)} module calls and the exported one {len(b)}; name_map "
                             "needs the model the archive was exported from")
    count_a = {n: a.count(n) for n in set(a)}
    count_b = {n: b.count(n) for n in set(b)}
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for ea, ex in zip(a, b):
        k = seen.get(ea, 0)
        seen[ea] = k + 1
        if ex not in out:
            out[ex] = ea if ea == ex and count_a[ea] == count_b[ex] else f"{ea}:{k}"
    return out


def module_calls(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The names of the submodules of ``model`` in the order their forward calls end, for one pass on ``x``
    (a module registered under several names is reported under its first)."""
    names: dict[int, str] = {}
    for name, mod in model.named_modules():
        names.setdefault(id(mod), name)
    seen: list[str] = []
    handles = []
    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(lambda m, args, out: seen.append(names[id(m)])))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen
