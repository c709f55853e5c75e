"""``convscope``: one thin command per method. Every command has ``--help``.

    convscope models                           the zoo, and what is importable here
    convscope layers MODEL                     layer names, types, output shapes, unit counts
    convscope predict IMAGE... [--model M]     top-5 classes
    convscope report [IMAGE...] [--out DIR]    the main job: predictions, Grad-CAM, unit views as HTML
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConvscopeError

DEFAULT_MODEL = "efficientnet_lite0"


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"zoo name, torchvision:NAME, timm:NAME, TorchScript file or package.module:factory "
                            f"(default {DEFAULT_MODEL})")
    else:
        p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--weights", help="state-dict file for the model (loaded with weights_only=True)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")


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


def cmd_layers(args: argparse.Namespace) -> int:
    from .core.layers import list_layers

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
    from .core.images import load_images
    from .models.predict import predict

    model = _load(args)
    x = load_images(args.images, model).to(next(model.parameters()).device)
    for path, row in zip(args.images, predict(model, x, k=args.top)):
        print(path)
        for pr in row:
            print(f"  {pr.index:>5}  {pr.probability:7.3%}  {pr.name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .applications.report import build_report

    model = _load(args)
    res = build_report(model, [Path(p) for p in args.images] or None, Path(args.out), cam_layer=args.cam_layer,
                       layer=args.layer, n_units=args.units)
    print(f"wrote {res.html} and {len(res.pngs)} PNGs in {res.html.parent}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the CLI docs)."""
    parser = argparse.ArgumentParser(prog="convscope", description="See what a convolutional network sees.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the model zoo and optional model sources")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="list a model's layers: name, type, output shape, units")
    _model_args(p, positional=True)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size to probe with")
    p.add_argument("--filter", help="only layers whose name contains this (or whose type is this)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("images", nargs="+", help="image files or folders")
    _model_args(p)
    p.add_argument("--top", type=int, default=5, help="how many classes (default 5)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report",
                       help="HTML report: predictions, Grad-CAM overlays, unit views (default: bundled photos)")
    p.add_argument("images", nargs="*", help="image files or folders (default: the bundled photos)")
    _model_args(p)
    p.add_argument("--out", "-o", default="out", help="output folder (default out/)")
    p.add_argument("--cam-layer", default="", help="layer for Grad-CAM (default: the last feature map)")
    p.add_argument("--layer", default="", help="layer whose units are shown (default: a middle layer)")
    p.add_argument("--units", type=int, default=8, help="how many units to show (default 8)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors on bad input are one clear line, not a traceback."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConvscopeError as exc:
        print(f"convscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
