#!/usr/bin/env python
"""Integrated Gradients' completeness error and time on efficientnet_lite0, per quadrature rule and step count.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/ig_completeness.py [--steps 32 64 128] [--photos chelsea ...]

For each bundled photo (224 px, top class, zero baseline, one image per call) and rule, the relative completeness
error ``|sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|`` (``return_error=True``) and the wall time as a multiple of
one forward + input-gradient pass of the image (F+B(input), measured in the same process). Prints a markdown table
and writes ``benchmarks/results/ig_completeness.json``. Not part of the test suite (docs/attribution.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import convscope as cs
from convscope.core.io import atomic_write_text

HERE = Path(__file__).resolve().parent
PHOTOS = ("chelsea", "rocket", "coffee", "astronaut", "motorcycle", "china", "flower")


def fb_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time of one forward + input-gradient pass of ``x`` (the model's own cost of one path point)."""
    times = []
    for _ in range(repeats + 1):
        xx = x.clone().requires_grad_(True)
        t = time.perf_counter()
        (g,) = torch.autograd.grad(model(xx)[:, 0].sum(), xx)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["adaptive", "kink", "gausslegendre"])
    ap.add_argument("--photos", nargs="+", default=list(PHOTOS))
    ap.add_argument("--out", default=str(HERE / "results" / "ig_completeness.json"))
    args = ap.parse_args()
    model = cs.load_model("efficientnet_lite0").eval()
    paths = cs.sample_images()
    rows = []
    for name in args.photos:
        x = cs.load_images([paths[name]], model)
        fb = fb_seconds(model, x)
        for method in args.methods:
            for steps in args.steps:
                t = time.perf_counter()
                res = cs.integrated_gradients(model, x, steps=steps, method=method, return_error=True, progress=False)
                sec = time.perf_counter() - t
                rows.append({"photo": name, "method": method, "steps": steps,
                             "relative_error": float(res.relative_error),
                             "seconds": sec, "fb_seconds": fb, "per_step_fb": sec / steps / fb})
                print(f"{name} {method} {steps}: {100 * rows[-1]['relative_error']:.2f} % "
                      f"{sec:.1f} s ({rows[-1]['per_step_fb']:.2f}x F+B per step)", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    atomic_write_text(Path(args.out), json.dumps(meta, indent=1))
    print("\n| method | steps | " + " | ".join(args.photos) + " | worst | median | time per step / F+B |")
    print("|---|---|" + "---|" * (len(args.photos) + 3))
    for method in args.methods:
        for steps in args.steps:
            sel = [r for r in rows if r["method"] == method and r["steps"] == steps]
            errs = [100 * r["relative_error"] for r in sel]
            cost = statistics.median(r["per_step_fb"] for r in sel)
            print(f"| {method} | {steps} | " + " | ".join(f"{e:.2f}" for e in errs)
                  + f" | {max(errs):.2f} | {statistics.median(errs):.2f} | {cost:.2f}x |")


if __name__ == "__main__":
    main()
