"""``convscope``: one thin command per method. Every command has ``--help``.

    convscope models                           the zoo, and what is importable here
    convscope samples [--out DIR]              the bundled photos (sample:NAME works wherever an image does)
    convscope layers MODEL                     layer names, types, output shapes, unit counts
    convscope predict IMAGE... [--model M]     top-5 classes
    convscope report [IMAGE...] [--out DIR]    the main job: predictions, Grad-CAM, unit views as HTML
    convscope data synth --out DIR             synthetic concept dataset (Broden layout)
    convscope train-demo --out DIR             train demo_net, a checkpoint per epoch
    convscope explain IMAGE... --method M      saliency / guided / deconv / CAM / occlusion overlays + HTML
    convscope adversarial IMAGE... --eps 2/255 FGSM / PGD examples, and the units whose maps change most
    convscope evaluate attribution             pointing game, mask IoU, deletion/insertion, randomization check
    convscope deconv MODEL --layer L           DeconvNet projections of each unit's top-9 activations + patches
    convscope filters MODEL                    first-layer filters and the dead units of every conv/ReLU layer
    convscope evolution CKPT_DIR --layer L     a unit's strongest projection at every training checkpoint
    convscope maximize MODEL --layer L --units 0-15   activation maximization (+ --facets, --generator)
    convscope dissect MODEL --layers a,b       Network Dissection on the synthetic set or a Broden folder
    convscope invert IMAGE... --layers a,b     reconstructions from each layer (regularized or UpconvNet)
    convscope upconv train MODEL --layer L     train an UpconvNet decoder from a layer to pixels
    convscope style CONTENT STYLE              Gatys et al. style transfer
    convscope fooling MODEL --classes 0-7      fooling images (Nguyen et al.), one per class
    convscope net2vec MODEL --layer L          Net2Vec concept vectors against the best single unit
    convscope perturb IMAGE... --layer L       reconstructions from perturbed codes of a layer
    convscope atlas build MODEL --layers a,b --out DIR   every unit's pictures and scores, resumable, parallel
    convscope atlas info DIR                   an atlas's layers and units done per stage
    convscope serve [--model M] [--atlas DIR]  the live explorer in the browser (127.0.0.1:8000)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from . import __version__
from .core.io import check_output_dir, check_output_file, describe_os_error
from .errors import ConvscopeError

DEFAULT_MODEL = "efficientnet_lite0"
UNITS_HELP = "units: a range 0-15, a list 1,5,9 or both (default: the {} strongest, by top-1 activation)"
Subparsers = Any  # argparse's private _SubParsersAction


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"zoo name, torchvision:NAME, timm:NAME, TorchScript file or package.module:factory "
                            f"(default {DEFAULT_MODEL})")
    else:
        p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--weights", help="state-dict file for the model (loaded with weights_only=True)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")


SMOKE_ENV = "CONVSCOPE_SMOKE"
# CONVSCOPE_SMOKE=1: every command runs as given but at tiny sizes (the README test runs every README line so).
_SMOKE_CAPS = {"steps": 2, "am_steps": 2, "n": 16, "synthetic": 16, "epochs": 1, "n_train": 64, "n_test": 16,
               "n_curve": 4, "n_sanity": 2, "samples": 2, "concept_images": 16, "max_steps": 4, "k": 1}


def apply_smoke_sizes(args: argparse.Namespace) -> None:
    """Cap the sizes of a parsed command (steps, images, epochs) for a quick check that it runs end to end."""
    for name, cap in _SMOKE_CAPS.items():
        value = getattr(args, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            setattr(args, name, cap)
        elif value is None and getattr(args, "command", "") == "train-demo" and name in ("n_train", "n_test",
                                                                                           "epochs"):
            setattr(args, name, cap)  # None there means the full recipe
    if getattr(args, "command", "") == "maximize":
        args.size = min(args.size or 64, 64)
    if getattr(args, "command", "") == "atlas" and hasattr(args, "am_size"):
        args.am_size = min(args.am_size or 64, 64)


def check_output(args: argparse.Namespace) -> None:
    """The one output check of every command: ``--out`` is created and writable before any work starts."""
    out = getattr(args, "out", None)
    if not out:
        return
    if getattr(args, "out_kind", "dir") == "file":
        check_output_file(out)
    else:
        check_output_dir(out)


def _html_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--self-contained", action="store_true",
                   help="embed the pictures in the HTML page (default: link the PNGs written beside it)")


def _concept_data_args(p: argparse.ArgumentParser, n: int) -> None:
    """``--dataset synthetic|BRODEN_DIR`` and the synthetic set's size and seed (dissect, net2vec)."""
    p.add_argument("--dataset", default="synthetic", help="'synthetic' (generated into OUT/broden) or a Broden folder")
    p.add_argument("--n", type=int, default=n, help=f"synthetic: images (default {n})")
    p.add_argument("--size", type=int, default=112, help="synthetic: image side (default 112)")
    p.add_argument("--seed", type=int, default=1, help="synthetic: seed (default 1; demo_net trained on seed 0)")


def _names(text: str) -> list[str]:
    """A comma-separated option (``a, b,c``) as a list of non-empty, stripped names."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _load(args: argparse.Namespace):
    from .core.device import tune_cpu_allocator
    from .models import load_model

    tune_cpu_allocator()
    return load_model(args.model, weights=args.weights, device=args.device)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = list_models()
    w = max(len(str(r["name"])) for r in rows)
    for r in rows:
        mark = "yes" if r["available"] else f"no  ({r['install']})"
        print(f"{r['name']!s:<{w}}  {r['description']}  [available: {mark}]")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from .core.images import PHOTO_NAMES, sample_images
    from .core.io import atomic_write_bytes

    found = sample_images()
    names = [n for n in PHOTO_NAMES if n in found] + ([n for n in found if n not in PHOTO_NAMES]
                                                       if args.textures else [])
    if not names:
        raise ConvscopeError("no bundled photos found: they ship with scikit-image and scikit-learn; "
                             "pip install scikit-image scikit-learn")
    for name in names:
        src = found[name]
        if args.out:
            dst = Path(args.out) / f"{name}{src.suffix.lower()}"
            atomic_write_bytes(dst, src.read_bytes())
            print(f"sample:{name:<12} -> {dst}")
        else:
            print(f"sample:{name:<12} {src}")
    if not args.out:
        print("use sample:NAME wherever an image path is accepted, or copy them: convscope samples --out photos/")
    return 0


def add_samples(sub: Subparsers) -> None:
    p = sub.add_parser("samples", help="the bundled photos (usable as sample:NAME anywhere an image is accepted)")
    p.add_argument("--out", "-o", help="copy them into this folder as NAME.png / NAME.jpg")
    p.add_argument("--textures", action="store_true", help="also the texture samples (brick, grass, gravel)")
    p.set_defaults(func=cmd_samples)


def cmd_layers(args: argparse.Namespace) -> int:
    from .core.model import list_layers

    model = _load(args)
    size = tuple(args.size) if args.size else None
    rows = list_layers(model, input_size=size)
    if args.filter:
        rows = [r for r in rows if args.filter in r.name or args.filter == r.type]
    print(f"{'name':<34} {'type':<22} {'output shape':<18} {'units':>6} {'params':>9}")
    for r in rows:
        shape = "x".join(map(str, r.output_shape)) if r.output_shape else ("(not run)" if not r.calls else "-")
        calls = f"  (called {r.calls}x)" if r.calls > 1 else ""
        print(f"{r.name:<34} {r.type:<22} {shape:<18} {r.units if r.units is not None else '-':>6} "
              f"{r.params:>9}{calls}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .core.images import expand_inputs, load_images
    from .models.predict import predict

    _check_positive(args.top, "--top")
    files = expand_inputs(args.images)  # folders and sample:NAME expanded: one result per image, in order
    model = _load(args)
    device = next(model.parameters()).device
    batch = 32  # images loaded and classified together (bounded memory for large folders)
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        rows = predict(model, load_images(chunk, model).to(device), k=args.top, batch_size=batch)
        for path, row in zip(chunk, rows, strict=True):
            print(path)
            for pr in row:
                print(f"  {pr.index:>5}  {pr.probability:7.3%}  {pr.name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .applications.report import build_report

    model = _load(args)
    res = build_report(model, args.images or None, Path(args.out), cam_layer=args.cam_layer,
                       layer=args.layer, n_units=args.units, self_contained=args.self_contained)
    print(f"wrote {res.html} and {len(res.pngs)} PNGs in {res.html.parent}/")
    return 0


def __getattr__(name: str) -> Any:
    """``EXPLAIN_METHODS``: the attribution methods' names, from the registry (lazy: the registry loads torch)."""
    if name == "EXPLAIN_METHODS":
        from .methods.registry import ATTRIBUTION_METHODS

        return tuple(ATTRIBUTION_METHODS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_explain(args: argparse.Namespace) -> int:
    from .applications.explain import explain_images, explain_targets
    from .core.images import expand_inputs
    from .methods.registry import attribution_method

    attribution_method(args.method)  # before loading the model: a wrong name fails fast
    spec = explain_targets(args.target)
    model = _load(args)
    run = explain_images(model, expand_inputs(args.images), Path(args.out), method=args.method, layer=args.layer,
                         target=spec, target_text=args.target, window=args.window, stride=args.stride,
                         samples=args.samples, seed=args.seed, self_contained=args.self_contained)
    print(f"wrote {run.html}, {run.grid} and {len(run.pngs)} overlay PNGs in {args.out}/")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import generate

    root = generate(Path(args.out), n=args.n, size=args.size, seed=args.seed, workers=args.workers)
    print(f"wrote {args.n} images with color/object/texture masks and scene labels (Broden layout) to {root}/")
    return 0


def _fraction(text: str) -> float:
    """``--eps``: a number or a fraction such as ``8/255``."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0 (pixel units, RGB in [0, 1])")
    return value


def cmd_adversarial(args: argparse.Namespace) -> int:
    from .applications.adversarial import run_adversarial
    from .applications.explain import explain_targets
    from .core.images import expand_inputs
    from .core.model import model_classes
    from .core.targets import top_class

    model = _load(args)
    spec = explain_targets(args.target) if args.target else None
    if isinstance(spec, int) and spec != 1:
        raise ConvscopeError(f"--target {args.target!r}: an attack takes one class per image (an index or 'top')")
    files = expand_inputs(args.images)
    if isinstance(spec, list) and len(spec) not in (1, len(files)):
        raise ConvscopeError(f"--target: give one class for all images or one per image ({len(files)}), "
                             f"got {len(spec)}")
    target = spec if isinstance(spec, list) and len(spec) > 1 else (spec[0] if isinstance(spec, list) else None)
    if args.targeted and target is None:
        raise ConvscopeError("--targeted needs --target CLASS (the class to reach)")
    run = run_adversarial(model, files, Path(args.out), eps=args.eps, attack=args.attack, norm=args.norm,
                          steps=args.steps, target=top_class if target is None else target,
                          targeted=args.targeted, layer=args.layer, n_units=args.units)
    r = run.result
    names = model_classes(model)
    for path, ok, c0, c1, p1 in zip(files, r.success.tolist(), r.clean_class.tolist(), r.adv_class.tolist(),
                                    r.adv_prob.tolist()):
        n0, n1 = (names[c0], names[c1]) if names else (str(c0), str(c1))
        print(f"{path.name}: {n0} -> {n1} ({p1:.1%}){'' if ok else '  (attack failed)'}")
    print(f"wrote {run.html}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .applications.evaluate import evaluate_attribution

    model = _load(args)
    methods = _names(args.methods) or None  # None: every method that applies to the model
    res = evaluate_attribution(model, Path(args.out), n=args.n, methods=methods, layer=args.layer,
                               n_curve=args.n_curve, n_sanity=args.n_sanity, steps=args.steps, eval_set=args.set,
                               resamples=args.resamples)
    print(res.markdown)
    print(f"wrote {res.files[-1]}")
    return 0


def cmd_maximize(args: argparse.Namespace) -> int:
    from .applications.deconv import default_images, parse_units
    from .applications.maximize_report import run_maximize
    from .core.layers import is_output, resolve_layer

    model = _load(args)
    layer = None if is_output(args.layer, model) else resolve_layer(model, args.layer)[0]
    units = parse_units(args.units)
    images = default_images(model, args.images or None, args.synthetic) if args.facets else None
    run = run_maximize(model, layer, units, Path(args.out), steps=args.steps, regularize=args.regularize,
                       kind=args.kind, size=args.size, seed=args.seed, parametrization=args.parametrization,
                       facets=args.facets, images=images, top=args.top, generator=args.generator,
                       code_init=args.code_init, lambda_code=args.lambda_code, self_contained=args.self_contained)
    print(f"objective reached: median {sorted(run.activations)[len(run.activations) // 2]:.3g} over "
          f"{len(run.activations)} images; wrote {run.html}, {run.grid} and {len(run.pictures)} PNGs in "
          f"{run.grid.parent}/units/")
    return 0


def cmd_dissect(args: argparse.Namespace) -> int:
    from .applications.dissect_report import dissect_report
    from .core.layers import resolve_layers
    from .core.model import zoo_name
    from .data.broden import BrodenDataset
    from .methods.dissect import DissectConfig, compare, dissect

    model = _load(args)
    layers = list(resolve_layers(model, args.layers))
    if not layers:
        raise ConvscopeError("--layers needs at least one layer name (see `convscope layers MODEL`)")
    out = Path(args.out)
    if args.dataset == "synthetic":
        from .data.synthetic import generate

        path = out / "broden"
        if not (path / "index.csv").exists():  # generated once; a rerun (resume) reuses it
            generate(path, n=args.n, size=args.size, seed=args.seed, workers=2)
    else:
        path = Path(args.dataset)
    cats = tuple(_names(args.categories)) or None
    config = DissectConfig(quantile=args.quantile, iou_threshold=args.iou_threshold, batch_size=args.batch_size,
                           categories=cats)
    if args.checkpoints:
        from .applications.dissect_report import dissect_checkpoints

        run = dissect_checkpoints(args.model, args.checkpoints, path, layers, config, out, device=args.device)
        print(run.comparison.text())
        print(f"wrote {run.chart} and {run.csv}")
        return 0
    results = dissect(model, path, layers, config, out=out / "state", executor=args.executor, workers=args.workers,
                      shards=args.shards, ray_address=args.ray_address)
    rep = dissect_report(model, BrodenDataset(path), results, out, top=args.top, max_units=args.max_units,
                         self_contained=args.self_contained)
    print(compare({zoo_name(model) or "model": results}).text())
    print(f"wrote {', '.join(str(h) for h in rep.html)}")
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from .applications.invert_report import run_invert
    from .core.images import expand_inputs

    model = _load(args)
    layers = _names(args.layers)
    if args.method == "regularized" and not layers:
        raise ConvscopeError("--layers needs at least one layer name (see `convscope layers MODEL`)")
    run = run_invert(model, expand_inputs(args.images), layers, Path(args.out), method=args.method,
                     decoders=[Path(d) for d in args.decoder] if args.decoder else None, steps=args.steps,
                     seed=args.seed, self_contained=args.self_contained)
    for r in run.rows:
        print(f"{r['layer']:<24} {Path(r['image']).name:<20} error {r['error']:.3f}  PSNR {r['psnr_db']:.1f} dB")
    print(f"wrote {run.picture} and {run.html}")
    return 0


def cmd_upconv_train(args: argparse.Namespace) -> int:
    from .applications.deconv import default_images
    from .methods.upconv import train_upconv

    model = _load(args)
    images = default_images(model, args.images or None, args.synthetic)
    dec = train_upconv(model, args.layer, lambda: images.batches(args.batch_size), epochs=args.epochs,
                       batch_size=args.batch_size, width=args.width, upsample=args.upsample, seed=args.seed,
                       out=args.out)
    print(f"trained an UpconvNet for {dec.layer}; wrote {args.out} (use: convscope invert IMAGE --method upconv "
          f"--decoder {args.out})")
    return 0


def cmd_style(args: argparse.Namespace) -> int:
    from .applications.invert_report import run_style

    model = _load(args)
    styles = _names(args.style_layers) or None
    content, style = (_one_image(args.content, "CONTENT"), _one_image(args.style, "STYLE"))
    run = run_style(model, content, style, Path(args.out), content_layer=args.content_layer
                    or None, style_layers=styles, beta=args.beta, steps=args.steps, seed=args.seed,
                    self_contained=args.self_contained)
    print(f"content loss {run.content_loss:.4g}, style loss {run.style_loss:.4g}; wrote {run.picture} and {run.html}")
    return 0


def _one_image(arg: str, what: str) -> Path:
    from .core.images import expand_inputs

    files = expand_inputs([arg])
    if len(files) != 1:
        raise ConvscopeError(f"{what} {arg!r} names {len(files)} images; give one image file or sample:NAME")
    return files[0]


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .applications.train_demo import TrainConfig, VitConfig, train_demo
    from .core.device import tune_cpu_allocator

    tune_cpu_allocator()
    given = {k: getattr(args, k) for k in ("n_train", "n_test", "epochs") if getattr(args, k) is not None}
    cfg = (VitConfig if args.arch == "vit" else TrainConfig)(seed=args.seed, **given)
    res = train_demo(Path(args.out), cfg, workers=args.workers, device=args.device)
    print(f"test accuracy {res.test_accuracy:.1%}; weights {res.weights}; {len(res.checkpoints)} checkpoints in "
          f"{res.weights.parent}/ (load with --model {cfg.name} --weights FILE)")
    return 0


def _units(args: argparse.Namespace) -> list[int] | None:
    from .applications.deconv import parse_units

    return parse_units(args.units) if args.units else None


BATCH_HELP = "images per forward pass: a positive int or auto (from the model's activation sizes and the allocator)"


def _batch_size(text: str) -> int | str:
    """``--batch-size``: a positive int, or ``auto`` (:mod:`convscope.core.batching`)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive int or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive int or 'auto'")
    return value


def cli_batch_rows(value: int | str, model: Any, what: str) -> int:
    """``--batch-size`` for a method that takes an int: ``auto`` resolved for an image of the model's input size
    (:func:`~convscope.core.batching.resolve_batch_size`)."""
    if value != "auto":
        return int(value)
    import torch

    from .core.batching import resolve_batch_size
    from .core.checks import input_channels
    from .core.model import default_input_size, float_dtype, model_device

    sample = torch.zeros(1, input_channels(model), *default_input_size(model), dtype=float_dtype(model),
                         device=model_device(model))
    return resolve_batch_size("auto", model, sample, what)


def _check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConvscopeError(f"{flag} {value}: give a positive number")
    return value


def cmd_deconv(args: argparse.Namespace) -> int:
    from .applications.deconv import deconv_report

    units = _units(args)
    _check_positive(args.n_units, "--n-units")
    model = _load(args)
    run = deconv_report(model, args.images or None, args.layer, units=units, k=_check_positive(args.top, "--top"),
                        out=Path(args.out), n_units=args.n_units, mode=args.mode, synthetic=args.synthetic,
                        display=args.display)
    print(f"units {','.join(map(str, run.units))} of {run.layer} over {run.result.images_seen} images; "
          f"wrote {run.png}, {run.html} and {run.json}")
    return 0


def cmd_filters(args: argparse.Namespace) -> int:
    from .applications.deconv import filters_report

    model = _load(args)
    run = filters_report(model, Path(args.out), images=args.images or None, synthetic=args.synthetic)
    relu = [r for r in run.rows if r["relu"]]
    print(f"first-layer filters of {run.layer}; dead units at ReLU layers: {sum(len(r['dead']) for r in relu)} of "
          f"{sum(r['units'] for r in relu)}; wrote {run.png} and {run.html}")
    return 0


def cmd_evolution(args: argparse.Namespace) -> int:
    from .applications.deconv import evolution
    from .core.device import tune_cpu_allocator

    units = _units(args)
    _check_positive(args.n_units, "--n-units")
    tune_cpu_allocator()
    run = evolution(args.checkpoints, args.layer, units=units, images=args.images or None,
                    k=_check_positive(args.top, "--top"), out=Path(args.out), architecture=args.model,
                    n_units=args.n_units, synthetic=args.synthetic, device=args.device)
    print(f"units {','.join(map(str, run.units))} of {run.layer} over {len(run.labels)} checkpoints; wrote {run.png}")
    return 0


def cmd_atlas_build(args: argparse.Namespace) -> int:
    from .atlas.builder import atlas_progress, build_atlas

    layers = _names(args.layers)
    if not layers:
        raise ConvscopeError("--layers needs at least one layer name (see `convscope layers MODEL`)")
    images = args.images or None
    synthetic = args.synthetic
    if images == ["synthetic"]:
        images, synthetic = None, synthetic or 500
    atlas = build_atlas(args.model, layers, Path(args.out), images=images, synthetic=synthetic, k=args.k,
                        am_steps=args.am_steps, am_preset=args.am_preset, am_size=args.am_size,
                        concepts=args.concepts, concept_images=args.concept_images, workers=args.workers,
                        executor=args.executor, ray_address=args.ray_address, chunk=args.chunk,
                        batch_size=args.batch_size, seed=args.seed, weights=args.weights, device=args.device)
    units = sum(r["units"] for r in atlas_progress(atlas))
    print(f"atlas of {units} units in {len(atlas.layers())} layers: {atlas.root}/ (convscope atlas info "
          f"{atlas.root}; convscope serve --atlas {atlas.root})")
    return 0


def cmd_atlas_info(args: argparse.Namespace) -> int:
    import json

    from .atlas.builder import atlas_progress
    from .atlas.store import open_atlas

    atlas = open_atlas(args.dir)
    meta = atlas.meta()
    print(f"model {meta.get('model', '?')} (weights {meta.get('model_hash', '?')[:12]})")
    for k, v in json.loads(meta.get("settings", "{}")).items():
        print(f"  {k}: {v}")
    rows = atlas_progress(atlas)
    print(f"{'layer':<28} {'units':>6} {'top-k':>6} {'AM':>6} {'concept':>8}  shape")
    for r in rows:
        print(f"{r['layer']:<28} {r['units']:>6} {r['top']:>6} {r['am']:>6} {r['concepts']:>8}  "
              f"{'x'.join(map(str, r['shape']))}")
    last = json.loads(meta.get("last_build", "null") or "null")
    if last:
        parts = ", ".join(f"{s} {v['units']} in {v['seconds'] / 60:.2f} min" for s, v in last["stages"].items())
        print(f"last build ({last['executor']}, {last['workers']} workers): {parts or 'nothing left to do'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import torch
    import uvicorn

    from .web.app import LOOPBACK_HOSTS, create_app

    if args.max_upload_mb <= 0 or args.queue_size < 1 or args.port < 0:
        raise ConvscopeError("--max-upload-mb, --queue-size and --port must be positive")
    if not 3 <= args.embed_images <= 5000:
        raise ConvscopeError(f"--embed-images must be between 3 and 5000, got {args.embed_images}")
    threads = args.threads or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1))
    torch.set_num_threads(threads)
    model = _load(args)
    app = create_app(model, atlas=args.atlas, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_pixels=args.max_pixels, decode_slots=args.decode_slots,
                     queue_size=args.queue_size, embed_images=args.embed_images,
                     allowed_hosts=LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS else None)
    if args.host not in LOOPBACK_HOSTS:
        print(f"convscope: warning: serving on {args.host}, reachable from other machines; the explorer has no "
              "authentication", file=sys.stderr)
    print(f"convscope explorer: http://{args.host}:{args.port}/  (model {app.state.explorer.name}, "
          f"{threads} torch threads{', atlas ' + args.atlas if args.atlas else ''}; Ctrl-C stops)")
    if os.environ.get(SMOKE_ENV):  # the README test: start, answer one request, stop
        return _serve_once(app)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_once(app: Any) -> int:
    """Serve ``app`` on a free loopback port, fetch ``/`` once, shut down; 0 when it answered 200."""
    import threading
    import time
    import urllib.request

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise ConvscopeError("the explorer did not start within 60 s")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
            status = r.status
        print(f"explorer answered {status} on http://127.0.0.1:{port}/ (smoke check; stopped)")
        return 0 if status == 200 else 1
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def add_models(sub: Subparsers) -> None:

    p = sub.add_parser("models", help="list the model zoo and optional model sources")
    p.set_defaults(func=cmd_models)


def add_layers(sub: Subparsers) -> None:
    p = sub.add_parser("layers", help="list a model's layers: name, type, output shape, units")
    _model_args(p, positional=True)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size to probe with")
    p.add_argument("--filter", help="only layers whose name contains this (or whose type is this)")
    p.set_defaults(func=cmd_layers)


def add_predict(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("images", nargs="+", help="image files or folders")
    _model_args(p)
    p.add_argument("--top", type=int, default=5, help="how many classes (default 5)")
    p.set_defaults(func=cmd_predict)


def add_report(sub: Subparsers) -> None:
    p = sub.add_parser("report",
                       help="HTML report: predictions, Grad-CAM overlays, unit views (default: bundled photos)")
    p.add_argument("images", nargs="*", help="image files or folders (default: the bundled photos)")
    _model_args(p)
    p.add_argument("--out", "-o", default="out", help="output folder (default out/)")
    p.add_argument("--cam-layer", default="", help="layer for Grad-CAM (default: the last feature map)")
    p.add_argument("--layer", default="", help="layer whose units are shown (default: a middle layer)")
    p.add_argument("--units", type=int, default=8, help="how many units to show (default 8)")
    _html_args(p)
    p.set_defaults(func=cmd_report)


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="the live explorer in the browser: predictions, activation grids, unit views, "
                                     "Grad-CAM, the webcam and the atlas")
    _model_args(p)
    p.add_argument("--atlas", help="an atlas folder (convscope atlas build) to show with each unit")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (default 10)")
    p.add_argument("--max-pixels", type=int, help="largest accepted picture in pixels (default: sized for the model's "
                                                  "input, 16-40 megapixels)")
    p.add_argument("--decode-slots", type=int, default=2, help="uploads decoded at once (default 2; bounds memory)")
    p.add_argument("--queue-size", type=int, default=64, help="model jobs allowed to wait before the server answers "
                                                              "503 (default 64)")
    p.add_argument("--embed-images", type=int, default=200,
                   help="synthetic scenes the explorer's embedding view lays out (default 200; 3-5000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the CPUs available, at most 4)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)


def add_explain(sub: Subparsers) -> None:
    p = sub.add_parser("explain", help="attribution maps for images: saliency, guided backprop, CAMs, occlusion")
    p.add_argument("images", nargs="+", help="image files or folders")
    _model_args(p)
    p.add_argument("--method", default="gradcam", metavar="METHOD",
                   help="attribution method: saliency, gradcam, occlusion, ... (default gradcam; a wrong name lists "
                        "them all)")
    p.add_argument("--layer", default="", help="conv layer for the CAM methods (default: the last feature map); for "
                                               "occlusion, also show this layer's strongest unit")
    p.add_argument("--target", default="top", help="class index, comma list (281,282), 'top' or 'topN' (default top)")
    p.add_argument("--out", "-o", default="out/explain", help="output folder (default out/explain/)")
    p.add_argument("--window", type=int,
                   help="occlusion (default 16) and prediction-difference (default 8): square size in pixels")
    p.add_argument("--stride", type=int,
                   help="occlusion (default 8) and prediction-difference (default 1): step in pixels")
    p.add_argument("--samples", type=int, default=50, help="smoothgrad: noisy copies (default 50)")
    p.add_argument("--seed", type=int, default=0, help="smoothgrad: noise seed (default 0)")
    _html_args(p)
    p.set_defaults(func=cmd_explain)


def add_adversarial(sub: Subparsers) -> None:
    p = sub.add_parser("adversarial", help="adversarial examples (FGSM / PGD) and the feature maps they change")
    p.add_argument("images", nargs="+", help="image files or folders")
    _model_args(p)
    p.add_argument("--eps", type=_fraction, default=2 / 255, help="budget in pixel units, e.g. 8/255 (default 2/255)")
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="pgd", help="attack (default pgd)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="PGD ball (default linf)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--target", default="", help="class to move away from (default: the top class), or with "
                                                 "--targeted the class to reach; one index or one per image")
    p.add_argument("--targeted", action="store_true", help="reach --target instead of leaving it")
    p.add_argument("--layer", default="", help="layer whose feature maps are compared (default: a middle layer)")
    p.add_argument("--units", type=int, default=6, help="most-changed units shown per image (default 6)")
    p.add_argument("--out", "-o", default="out/adversarial", help="output folder (default out/adversarial/)")
    p.set_defaults(func=cmd_adversarial)


def add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser("evaluate", help="score methods against ground truth")
    esub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = esub.add_parser("attribution", help="pointing game, mask IoU, deletion/insertion AUC and the randomization "
                                            "sanity check of every attribution method on held-out synthetic images")
    q.add_argument("--model", "-m", default="demo_net", help="a model of the synthetic scene classes "
                                                             "(default demo_net)")
    q.add_argument("--weights", help="state-dict file, e.g. a train-demo checkpoint")
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    q.add_argument("--n", type=int, default=200, help="held-out images (default 200)")
    q.add_argument("--methods", default="", help="comma list (default: all)")
    q.add_argument("--layer", default="", help="layer for the CAM methods (default: the last feature map)")
    q.add_argument("--n-curve", type=int, default=50, help="images for deletion/insertion (default 50)")
    q.add_argument("--n-sanity", type=int, default=8, help="images for the randomization check (default 8)")
    q.add_argument("--steps", type=int, default=32, help="deletion/insertion steps (default 32)")
    q.add_argument("--set", choices=["off-centre", "centred"], default="off-centre",
                   help="evaluation set (default off-centre: a centre prior scores chance)")
    q.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals "
                                                               "(default 1000)")
    q.add_argument("--out", "-o", default="out/evaluate", help="output folder (default out/evaluate/)")
    q.set_defaults(func=cmd_evaluate)


def add_deconv(sub: Subparsers) -> None:
    p = sub.add_parser("deconv", help="DeconvNet projections of each unit's strongest activations beside the image "
                                      "patches (Zeiler & Fergus Fig. 2)")
    _model_args(p, positional=True)
    p.add_argument("--layer", "-l", required=True, help="layer name (`convscope layers MODEL` lists them)")
    p.add_argument("--units", "-u", default="", help=UNITS_HELP.format("--n-units"))
    p.add_argument("--n-units", type=int, default=16, help="how many units without --units (default 16)")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="image files or folders (default: the bundled photos; synthetic images for demo_net)")
    p.add_argument("--synthetic", type=int, metavar="N", help="scan N held-out synthetic images (default for demo_net: "
                                                               "500)")
    p.add_argument("--top", "-k", type=int, default=9, help="activations shown per unit (default 9)")
    p.add_argument("--mode", choices=["max", "map"], default="max",
                   help="max: project each activation alone, cropped (default); map: the whole feature map")
    p.add_argument("--display", choices=["percentile", "signed"], default="percentile",
                   help="projection contrast: percentile (0.5-99.5th, default) or signed (0 grey, by the max)")
    p.add_argument("--out", "-o", default="out/deconv", help="output folder (default out/deconv/)")
    p.set_defaults(func=cmd_deconv)


def add_filters(sub: Subparsers) -> None:
    p = sub.add_parser("filters", help="first-layer filters and the dead units of every conv/ReLU layer")
    _model_args(p, positional=True)
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="images for the dead-unit scan (default: bundled photos; synthetic images for demo_net)")
    p.add_argument("--synthetic", type=int, metavar="N", help="scan N held-out synthetic images instead")
    p.add_argument("--out", "-o", default="out/filters", help="output folder (default out/filters/)")
    p.set_defaults(func=cmd_filters)


def add_evolution(sub: Subparsers) -> None:
    p = sub.add_parser("evolution", help="how units' strongest projections change over training checkpoints "
                                         "(Zeiler & Fergus Fig. 4)")
    p.add_argument("checkpoints", nargs="+", help="a folder of epoch_XX.pt (from train-demo) or checkpoint files")
    p.add_argument("--model", "-m", default="demo_net", help="the architecture the checkpoints fit (default demo_net)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--layer", "-l", required=True, help="layer name (`convscope layers MODEL` lists them)")
    p.add_argument("--units", "-u", default="", help=UNITS_HELP.format("--n-units") + " of the last checkpoint")
    p.add_argument("--n-units", type=int, default=8, help="how many units without --units (default 8)")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files or folders (default: "
                                                                           "synthetic images for demo_net)")
    p.add_argument("--synthetic", type=int, metavar="N", help="scan N held-out synthetic images (default for demo_net: "
                                                               "500)")
    p.add_argument("--top", "-k", type=int, default=1, help="projections per unit and checkpoint (default 1)")
    p.add_argument("--out", "-o", default="out/evolution", help="output folder (default out/evolution/)")
    p.set_defaults(func=cmd_evolution)


def add_maximize(sub: Subparsers) -> None:
    p = sub.add_parser("maximize", help="activation maximization: an image per unit, optimized in one batch")
    _model_args(p, positional=True)
    p.add_argument("--layer", required=True, help="layer, or 'logits' for class units (pre-softmax)")
    p.add_argument("--units", required=True, help="units or classes: 0-63, 1,5,9 or a mix")
    p.add_argument("--kind", choices=["channel", "neuron"], default="channel",
                   help="a channel's mean (default) or its centre neuron")
    p.add_argument("--regularize", choices=["yosinski", "simonyan", "olah", "none"],
                   help="regularizer preset (default: yosinski for pixels, olah for fourier)")
    p.add_argument("--parametrization", choices=["pixel", "rgb", "fourier"], default="pixel",
                   help="image parametrization (default pixel; fourier = decorrelated, Olah et al.)")
    p.add_argument("--steps", type=int, default=256, help="optimization steps (default 256)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--facets", type=int, default=0, help="multifaceted AM: facets per unit from clustered top images")
    p.add_argument("--top", type=int, default=50, help="--facets: top images clustered per unit (default 50)")
    p.add_argument("--images", nargs="*", help="--facets: image files or folders (default: bundled / synthetic)")
    p.add_argument("--synthetic", type=int, help="--facets: N held-out synthetic images")
    p.add_argument("--generator", help="DGN-AM: an UpconvNet file (convscope upconv train) or a TorchScript generator")
    p.add_argument("--code-init", default="zeros", help="DGN-AM start code: zeros, noise or a PHOTO to encode")
    p.add_argument("--lambda-code", type=float, default=1e-3, help="DGN-AM: L2 weight on the code (default 1e-3)")
    p.add_argument("--out", "-o", default="out/maximize", help="output folder (default out/maximize/)")
    _html_args(p)
    p.set_defaults(func=cmd_maximize)


def add_dissect(sub: Subparsers) -> None:
    p = sub.add_parser("dissect", help="Network Dissection (Bau et al.): label units with concepts by IoU")
    _model_args(p, positional=True)
    p.add_argument("--layers", required=True, help="comma-separated conv layers")
    _concept_data_args(p, n=1000)
    p.add_argument("--quantile", type=float, default=0.005, help="top fraction of activations per unit (default "
                                                                  "0.005, Bau et al.)")
    p.add_argument("--iou-threshold", type=float, default=0.04, help="detector threshold (default 0.04)")
    p.add_argument("--categories", default="", help="comma-separated categories (default: all)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help=f"{BATCH_HELP}; default auto")
    p.add_argument("--top", type=int, default=4, help="top images shown per unit (default 4)")
    p.add_argument("--max-units", type=int, help="units per layer page (default: all)")
    p.add_argument("--out", "-o", default="out/dissect", help="output folder; a rerun resumes (default out/dissect/)")
    p.add_argument("--checkpoints", nargs="+", metavar="PATH",
                   help="dissect these checkpoints of MODEL's architecture (a folder of epoch_XX.pt from train-demo, "
                        "or .pt files) and compare them side by side, instead of MODEL's own weights")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="shard both passes over the dataset on local worker processes or a Ray cluster (the result "
                        "equals one process; a rerun resumes per shard)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (local) or Ray actors (default 1)")
    p.add_argument("--shards", type=int, help="dataset shards per pass (default 4 x workers)")
    p.add_argument("--ray-address", help="a running Ray cluster ('auto' or HOST:PORT; default: a local instance)")
    _html_args(p)
    p.set_defaults(func=cmd_dissect)


def add_invert(sub: Subparsers) -> None:
    p = sub.add_parser("invert", help="reconstruct images from layers (Mahendran & Vedaldi; UpconvNet)")
    p.add_argument("images", nargs="+", help="image files or folders")
    _model_args(p)
    p.add_argument("--layers", default="", help="comma-separated layers, one output row each")
    p.add_argument("--method", choices=["regularized", "upconv"], default="regularized",
                   help="regularized inversion (default) or trained UpconvNet decoders")
    p.add_argument("--decoder", action="append", help="UpconvNet file (repeat: one per layer) for --method upconv")
    p.add_argument("--steps", type=int, default=200, help="optimization steps (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    p.add_argument("--out", "-o", default="out/invert", help="output folder (default out/invert/)")
    _html_args(p)
    p.set_defaults(func=cmd_invert)


def add_upconv(sub: Subparsers) -> None:
    p = sub.add_parser("upconv", help="UpconvNet decoders (Dosovitskiy & Brox)")
    usub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = usub.add_parser("train", help="train a decoder from a layer's features to the image")
    _model_args(q, positional=True)
    q.add_argument("--layer", required=True, help="layer whose features are decoded")
    q.add_argument("--images", nargs="*", help="image files or folders (default: bundled photos; demo_net: synthetic)")
    q.add_argument("--synthetic", type=int, help="train on N held-out synthetic images")
    q.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    q.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32; a training "
                                                               "setting, so no auto)")
    q.add_argument("--width", type=int, default=16, help="channels of the last decoder stage (default 16)")
    q.add_argument("--upsample", choices=["unpool", "transposed"], default="unpool",
                   help="2x upsampling: unpool (top-left of 2x2) + conv, or a transposed conv")
    q.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    q.add_argument("--out", "-o", default="out/upconv.pt", help="decoder file (default out/upconv.pt)")
    q.set_defaults(func=cmd_upconv_train, out_kind="file")


def add_style(sub: Subparsers) -> None:
    p = sub.add_parser("style", help="style transfer (Gatys et al.): content of one image, style of another")
    p.add_argument("content", help="content image")
    p.add_argument("style", help="style image")
    _model_args(p)
    p.add_argument("--content-layer", default="", help="content layer (default: per model)")
    p.add_argument("--style-layers", default="", help="comma-separated style layers (default: per model)")
    p.add_argument("--beta", type=float, help="style weight (alpha = 1; default: per model)")
    p.add_argument("--steps", type=int, default=300, help="optimization steps (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", "-o", default="out/style", help="output folder (default out/style/)")
    _html_args(p)
    p.set_defaults(func=cmd_style)


def add_atlas(sub: Subparsers) -> None:
    p = sub.add_parser("atlas", help="the model atlas: every unit's top-k patches, activation maximization and "
                                     "dissection label in a resumable SQLite store")
    asub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = asub.add_parser("build", help="build or resume an atlas (rerun the same command to resume)")
    _model_args(q, positional=True)
    q.add_argument("--layers", required=True, help="comma-separated layers (`convscope layers MODEL`)")
    q.add_argument("--out", "-o", required=True, help="atlas folder (a rerun resumes it)")
    q.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="image files or folders, or 'synthetic' (default: the bundled photos; synthetic for demo_net)")
    q.add_argument("--synthetic", type=int, metavar="N", help="scan N held-out synthetic images (default 500)")
    q.add_argument("--k", type=int, default=9, help="top activations per unit (default 9)")
    q.add_argument("--am-steps", type=int, default=128, help="activation maximization steps (default 128)")
    q.add_argument("--am-preset", choices=["yosinski", "olah", "simonyan", "none"], default="yosinski",
                   help="activation maximization regularizer (default yosinski; olah = Fourier)")
    q.add_argument("--am-size", type=int, help="activation maximization image side (default: the model's input)")
    q.add_argument("--concepts", help="'synthetic' or a Broden folder: add each unit's dissection label and IoU")
    q.add_argument("--concept-images", type=int, default=500, help="synthetic concepts: images (default 500)")
    q.add_argument("--workers", type=int, default=1, help="worker processes (local) or Ray actors (default 1)")
    q.add_argument("--executor", choices=["local", "ray"], default="local", help="local processes (default) or Ray")
    q.add_argument("--ray-address", help="a running Ray cluster ('auto' or HOST:PORT); default: start a local one")
    q.add_argument("--chunk", type=int, default=16, help="units per task and per commit (default 16)")
    q.add_argument("--batch-size", type=_batch_size, default="auto",
                   help=f"{BATCH_HELP}; default auto")
    q.add_argument("--seed", type=int, default=0, help="activation maximization seed (default 0)")
    q.set_defaults(func=cmd_atlas_build)
    q = asub.add_parser("info", help="an atlas's model, settings, layers and units done per stage")
    q.add_argument("dir", help="atlas folder")
    q.set_defaults(func=cmd_atlas_info)


def add_data(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="datasets: generate the synthetic concept dataset")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data.add_parser("synth", help="generate synthetic images with color/object/texture masks (Broden layout)")
    q.add_argument("--out", "-o", required=True, help="output folder")
    q.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    q.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    q.add_argument("--seed", type=int, default=0, help="seed (same seed, same bytes)")
    q.add_argument("--workers", type=int, default=2, help="processes (default 2; output is identical)")
    q.set_defaults(func=cmd_data_synth)


def add_train_demo(sub: Subparsers) -> None:
    p = sub.add_parser("train-demo", help="train demo_net (or demo_vit) on synthetic scene labels; a checkpoint per "
                                          "epoch, resumable")
    p.add_argument("--arch", choices=("demo_net", "vit"), default="demo_net",
                   help="demo_net (the CNN, default) or vit (demo_vit: a small ViT with a conv stem; use --out "
                        "runs/demo_vit)")
    p.add_argument("--out", "-o", default="runs/demo_net", help="checkpoint folder (default runs/demo_net)")
    p.add_argument("--n-train", type=int, help="training images (default 12000, as the bundled weights)")
    p.add_argument("--n-test", type=int, help="held-out test images (default 1000)")
    p.add_argument("--epochs", type=int, help="epochs (default: 12 for demo_net, 15 for vit, as the bundled weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, order and dropout")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the images")
    p.set_defaults(func=cmd_train_demo)


def cmd_fooling(args: argparse.Namespace) -> int:
    from .applications.deconv import parse_units
    from .applications.fooling import percent, run_fooling

    try:
        classes = parse_units(args.classes)
    except ConvscopeError:
        raise ConvscopeError(f"--classes {args.classes!r}: use a range (0-7), a list (1,5,9) or both (0-3,8)") from None
    model = _load(args)
    run = run_fooling(model, classes, Path(args.out), confidence=args.confidence, max_steps=args.max_steps,
                      size=args.size, seed=args.seed, score=args.score, regularize=args.regularize,
                      self_contained=args.self_contained)
    for r in run.rows:
        done = f"{r['steps']} steps" if r["success"] else f"not reached in {args.max_steps} steps"
        print(f"{r['class']:>5} {r['name'][:24]:<24} {percent(r['probability']):>9}  {done}")
    print(f"{sum(r['success'] for r in run.rows)} of {len(run.rows)} reached {args.confidence:g}; wrote {run.grid} "
          f"and {run.html}")
    return 0


def cmd_net2vec(args: argparse.Namespace) -> int:
    from .applications.net2vec_report import run_net2vec, summary, synthetic_dataset
    from .methods.net2vec import Net2VecConfig

    config = Net2VecConfig(quantile=args.quantile, inputs=args.inputs, epochs=args.epochs,
                           seg_size=args.seg_size or None, categories=tuple(_names(args.categories)) or None,
                           batch_size=args.batch_size, decision=args.decision, margin=args.margin)
    model = _load(args)
    out = Path(args.out)
    if args.dataset == "synthetic":  # generated once into OUT/broden; a rerun with the same --n/--size/--seed reuses it
        path = synthetic_dataset(out / "broden", n=args.n, size=args.size, seed=args.seed)
    else:
        path = Path(args.dataset)
    run = run_net2vec(model, path, args.layer, out, concepts=_names(args.concepts) or None, config=config,
                      pictures=args.pictures, examples=args.examples, self_contained=args.self_contained)
    print(summary(run.rows, config.margin))
    print(f"wrote {run.html} ({run.result.train_images} training, {run.result.val_images} held-out images)")
    return 0


def cmd_perturb(args: argparse.Namespace) -> int:
    from .applications.perturb_report import run_perturbation

    model = _load(args)
    run = run_perturbation(model, args.images, args.layer or None, Path(args.out),
                           perturbations=_names(args.perturbations), decoder=args.decoder, steps=args.steps,
                           seed=args.seed, self_contained=args.self_contained)
    for s in run.summary:
        print(f"{s['kind']:<11} feature error {s['mean_feature_error']:.3f}  image error {s['mean_image_error']:.3f}  "
              f"({s['description']})")
    print(f"wrote {run.picture} and {run.html}")
    return 0


def add_fooling(sub: Subparsers) -> None:
    p = sub.add_parser("fooling", help="fooling images (Nguyen et al.): noise the model classifies with high "
                                       "confidence, one image per class")
    _model_args(p, positional=True)
    p.add_argument("--classes", default="0-7", help="target classes: a range 0-7, a list 1,5,9 or both (default 0-7)")
    p.add_argument("--confidence", type=float, default=0.9999,
                   help="stop once the softmax probability of the class reaches this (default 0.9999)")
    p.add_argument("--max-steps", type=int, default=500, help="gradient steps at most (default 500)")
    p.add_argument("--score", choices=["logit", "log_softmax"], default="logit",
                   help="ascend the class logit (default) or its log-probability (also pushes rival classes down)")
    p.add_argument("--regularize", choices=["none", "simonyan", "yosinski"], default="none",
                   help="regularizer preset (default none: plain gradient ascent, as Nguyen et al.)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    p.add_argument("--out", "-o", default="out/fooling", help="output folder (default out/fooling/)")
    _html_args(p)
    p.set_defaults(func=cmd_fooling)


def add_net2vec(sub: Subparsers) -> None:
    p = sub.add_parser("net2vec", help="Net2Vec (Fong & Vedaldi): concepts as weighted combinations of a layer's "
                                       "units, against the best single unit")
    _model_args(p, positional=True)
    p.add_argument("--layer", required=True, help="one layer (`convscope layers MODEL`)")
    _concept_data_args(p, n=400)
    p.add_argument("--concepts", default="", help="comma-separated concepts (default: all with held-out pixels)")
    p.add_argument("--categories", default="", help="comma-separated categories (default: all)")
    p.add_argument("--quantile", type=float, default=0.05,
                   help="unit thresholds: the top fraction of activations (default 0.05; NetDissect's 0.005 leaves "
                        "the binarized maps too sparse to combine on small maps)")
    p.add_argument("--inputs", choices=["binary", "raw"], default="binary",
                   help="unit maps binarized at the thresholds (default, Fong & Vedaldi) or divided by them")
    p.add_argument("--epochs", type=int, default=30, help="SGD epochs (default 30)")
    p.add_argument("--decision", choices=["iou", "paper"], default="iou",
                   help="mask threshold: best IoU on the training images (default) or the paper's M > 0.5")
    p.add_argument("--margin", type=float, default=0.01,
                   help="beats the trivial baselines when the gain's 95%% interval lower end exceeds this IoU "
                        "(default 0.01)")
    p.add_argument("--seg-size", type=int, default=28,
                   help="label resolution the masks are learned and scored at (default 28; 0: the dataset's own)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per SGD batch (default 16; a training setting, so no auto)")
    p.add_argument("--pictures", type=int, default=8, help="concepts shown as segmentations (default 8)")
    p.add_argument("--examples", type=int, default=4, help="held-out images per segmentation picture (default 4)")
    p.add_argument("--out", "-o", default="out/net2vec", help="output folder (default out/net2vec/)")
    _html_args(p)
    p.set_defaults(func=cmd_net2vec)


def add_perturb(sub: Subparsers) -> None:
    p = sub.add_parser("perturb", help="reconstructions from perturbed codes of a layer (Dosovitskiy & Brox): "
                                       "binarized, dropout, weakest maps dropped")
    p.add_argument("images", nargs="+", help="image files, folders or sample:NAME")
    _model_args(p)
    p.add_argument("--layer", default="", help="layer whose code is perturbed (default with --decoder: its layer)")
    p.add_argument("--perturbations", default="binarize,dropout,drop_least",
                   help="comma-separated: binarize, dropout, drop_least (default all three)")
    p.add_argument("--decoder", help="an UpconvNet file (convscope upconv train MODEL --layer L) instead of "
                                     "regularized inversion")
    p.add_argument("--steps", type=int, default=200, help="regularized inversion: optimization steps (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout mask and the starting noise (default 0)")
    p.add_argument("--out", "-o", default="out/perturb", help="output folder (default out/perturb/)")
    _html_args(p)
    p.set_defaults(func=cmd_perturb)


def cmd_graph(args: argparse.Namespace) -> int:
    from .applications.graph_report import graph_report

    model = _load(args)
    run = graph_report(model, Path(args.out), input_size=tuple(args.size) if args.size else None, png=args.png)
    g = run.graph
    print(f"{len(g.module_calls)} module calls, {len(g.joins)} joins, {g.params:,} parameters; wrote {run.svg} and "
          f"{run.html}")
    return 0


def add_graph(sub: Subparsers) -> None:
    p = sub.add_parser("graph", help="the model's computation graph: SVG, HTML with collapsible modules, JSON")
    _model_args(p, positional=True)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size to trace (default: the model's)")
    p.add_argument("--png", action="store_true", help="also write graph.png (the drawing rasterized)")
    p.add_argument("--out", "-o", default="out/graph", help="output folder (default out/graph/)")
    p.set_defaults(func=cmd_graph)


def cmd_embed(args: argparse.Namespace) -> int:
    from .applications.embed_report import run_embed

    model = _load(args)
    run = run_embed(model, args.layer, Path(args.out), images=args.images or None, synthetic=args.synthetic,
                    method=args.method, seed=args.seed, batch_size=cli_batch_rows(args.batch_size, model, "embed"))
    print(f"{len(run.embedding.coords)} images, {run.embedding.method} of {run.embedding.layer}; wrote {run.png} and "
          f"{run.html}")
    return 0


def add_embed(sub: Subparsers) -> None:
    p = sub.add_parser("embed", help="t-SNE / UMAP / PCA map of a dataset by a layer's pooled features, with "
                                     "thumbnails")
    _model_args(p, positional=True)
    p.add_argument("--layer", required=True, help="layer whose global-average-pooled features are embedded")
    p.add_argument("--images", nargs="*", help="image files or folders (points coloured by predicted class)")
    p.add_argument("--synthetic", type=int, help="N held-out synthetic scenes (coloured by their scene label)")
    p.add_argument("--method", choices=["tsne", "umap", "pca"], default="tsne",
                   help="projection (default tsne; umap needs pip install umap-learn)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projection (default 0)")
    p.add_argument("--batch-size", type=_batch_size, default=32, help=f"{BATCH_HELP}; default 32")
    p.add_argument("--out", "-o", default="out/embed", help="output folder (default out/embed/)")
    p.set_defaults(func=cmd_embed)


def cmd_dream(args: argparse.Namespace) -> int:
    from .applications.dream_report import dream_report

    model = _load(args)
    run = dream_report(model, args.photo, Path(args.out), args.layer, steps=args.steps, lr=args.lr / 255,
                       octaves=args.octaves, octave_scale=args.octave_scale, jitter=args.jitter, seed=args.seed,
                       size=args.size, self_contained=args.self_contained)
    r = run.result
    print(f"||{r.layer}|| {float(r.norm_before[0]):.4g} -> {float(r.norm_after[0]):.4g}; wrote {run.after} and "
          f"{run.html}")
    return 0


def add_dream(sub: Subparsers) -> None:
    p = sub.add_parser("dream", help="DeepDream (Mordvintsev et al.): a photo with what a layer sees amplified")
    p.add_argument("photo", help="one image file or sample:NAME")
    _model_args(p)
    p.add_argument("--layer", required=True, help="layer whose activation norm is amplified")
    p.add_argument("--steps", type=int, default=10, help="ascent steps per octave (default 10)")
    p.add_argument("--lr", type=float, default=1.5, help="step size on the 0-255 pixel scale (default 1.5)")
    p.add_argument("--octaves", type=int, default=4, help="scales, smallest first (default 4)")
    p.add_argument("--octave-scale", type=float, default=1.4, help="size ratio between octaves (default 1.4)")
    p.add_argument("--jitter", type=int, default=32, help="random shift per step in pixels (default 32)")
    p.add_argument("--size", type=int, help="resize and crop the photo to SIZE px (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter (default 0)")
    p.add_argument("--out", "-o", default="out/dream", help="output folder (default out/dream/)")
    _html_args(p)
    p.set_defaults(func=cmd_dream)


def cmd_similarity(args: argparse.Namespace) -> int:
    from .applications.similarity_report import similarity_report
    from .models import load_model

    a = _load(args)
    b = (load_model(args.model_b or args.model, weights=args.weights_b, device=args.device)
         if (args.model_b or args.weights_b) else a)
    run = similarity_report(a, b, args.data or None, Path(args.out), layers_a=_names(args.layers) or None,
                            layers_b=_names(args.layers_b or args.layers) or None, method=args.method,
                            reduce=args.reduce, batch_size=args.batch_size,
                            # a pair: similarity_report refuses any other length with the fix
                            match=cast("tuple[str, str]", tuple(_names(args.match))) if args.match else None,
                            match_method=args.match_method, synthetic=args.synthetic)
    print(f"wrote {run.png}, {run.html}, {run.json}")
    return 0


def add_similarity(sub: Subparsers) -> None:
    p = sub.add_parser("similarity", help="layer x layer similarity of two models or checkpoints (CKA, SVCCA) and "
                                          "convergent-learning unit matching")
    _model_args(p, positional=True)
    p.add_argument("model_b", nargs="?", help="the second model (default: the first, e.g. with --weights-b)")
    p.add_argument("--weights-b", help="state-dict file for the second model (another checkpoint)")
    p.add_argument("--layers", default="", help="comma-separated layers of the first model (default: its conv "
                                                 "and linear outputs)")
    p.add_argument("--layers-b", default="", help="layers of the second model (default: --layers)")
    p.add_argument("--data", nargs="*", help="image files or folders")
    p.add_argument("--synthetic", type=int, help="N held-out synthetic scenes (default when no --data)")
    p.add_argument("--method", choices=["linear_cka", "rbf_cka", "svcca"], default="linear_cka",
                   help="similarity index (default linear_cka)")
    p.add_argument("--reduce", choices=["flatten", "mean"], default="flatten",
                   help="conv features: flatten C x H x W (Kornblith et al.) or average over positions")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass and per CKA minibatch (default 64; it changes the minibatch CKA "
                        "estimate, so no auto)")
    p.add_argument("--match", help="LAYER_A,LAYER_B: also match units one to one (Li et al. 2016)")
    p.add_argument("--match-method", choices=["hungarian", "greedy", "semi"], default="hungarian",
                   help="unit matching (default hungarian)")
    p.add_argument("--out", "-o", default="out/similarity", help="output folder (default out/similarity/)")
    p.set_defaults(func=cmd_similarity)


def cmd_landscape(args: argparse.Namespace) -> int:
    from .applications.landscape_report import landscape_report
    from .models import load_model

    model = _load(args)
    other = load_model(args.model, weights=args.to, device=args.device) if args.to else None
    run = landscape_report(model, out=Path(args.out), data=args.data, dims=args.dims, steps=args.steps,
                           span=args.span, seed=args.seed,
                           batch_size=cli_batch_rows(args.batch_size, model, "landscape"), log_scale=not args.linear,
                           other=other, other_label=Path(args.to).name if args.to else "other checkpoint")
    print(f"wrote {run.html}")
    return 0


def add_landscape(sub: Subparsers) -> None:
    p = sub.add_parser("landscape", help="the loss around the weights along filter-normalized random directions "
                                         "(Li et al. 2018), or along the path to another checkpoint")
    _model_args(p, positional=True)
    p.add_argument("--data", default="synthetic:64", help="synthetic:N held-out scenes (default synthetic:64) or a "
                                                          ".pt file holding (images, labels)")
    p.add_argument("--dims", type=int, choices=[1, 2], default=2, help="1-D curve or 2-D surface (default 2)")
    p.add_argument("--steps", type=int, default=21, help="grid points per direction (default 21)")
    p.add_argument("--span", type=float, default=1.0, help="the grid covers -span..span (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    p.add_argument("--batch-size", type=_batch_size, default=256, help=f"{BATCH_HELP}; default 256")
    p.add_argument("--to", help="CHECKPOINT.pt: interpolate from the weights to this checkpoint instead")
    p.add_argument("--linear", action="store_true", help="linear colour scale (default: log)")
    p.add_argument("--out", "-o", default="out/landscape", help="output folder (default out/landscape/)")
    p.set_defaults(func=cmd_landscape)


COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_models, add_samples, add_layers, add_predict, add_report, add_serve, add_explain, add_adversarial,
    add_evaluate, add_deconv, add_filters, add_evolution, add_maximize, add_dissect, add_invert, add_upconv,
    add_style, add_fooling, add_net2vec, add_perturb, add_atlas, add_data, add_train_demo, add_graph, add_embed,
    add_dream, add_similarity, add_landscape,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the CLI docs): one ``add_<command>`` per command."""
    parser = argparse.ArgumentParser(prog="convscope", description="See what a convolutional network sees.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Bad input (a ``ConvscopeError``, an unreadable or unwritable path) is one line on stderr and
    exit code 2, never a traceback; ``CONVSCOPE_DEBUG=1`` shows the traceback of an unexpected error."""
    import os

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        check_output(args)
        if os.environ.get(SMOKE_ENV):
            apply_smoke_sizes(args)
        return func(args)
    except ConvscopeError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a path that cannot be read or written: name it and what to do
        return _fail(describe_os_error(exc))
    except KeyboardInterrupt:
        print("convscope: interrupted (rerun the same command to resume where it supports resuming)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a bug, not bad input: one line unless debugging)
        if os.environ.get("CONVSCOPE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"convscope: internal error: {type(exc).__name__}: {first} (set CONVSCOPE_DEBUG=1 for the traceback "
              "and please report it)", file=sys.stderr)
        return 1


def _fail(message: str) -> int:
    print(f"convscope: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
