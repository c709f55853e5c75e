#!/usr/bin/env python
"""Occlusion: incremental inference (dirty boxes, Nakandala et al. 2019) against one full forward pass per copy.

    OMP_NUM_THREADS=2 python benchmarks/occlusion_bench.py           # lite0 at 224, demo_net at 112; 32/16, 16/8
    OMP_NUM_THREADS=2 python benchmarks/occlusion_bench.py --quick   # lite0 at 128, 32/16 only
    OMP_NUM_THREADS=2 python benchmarks/occlusion_bench.py --captum  # and Captum's Occlusion on the same windows

For each model and window/stride: the median of 3 runs of ``cs.occlusion(..., incremental=False)`` and
``incremental=True`` on one image (the same batch size, 64 copies per pass), the time per occluded copy as a
multiple of **F** (the median of one forward pass of the single image under ``no_grad``, measured in the same
process), the speed-up, and the largest score difference relative to the largest score. Prints a markdown table
and writes ``benchmarks/results/occlusion.json``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import convscope as cs
from convscope.core.io import atomic_write_text

HERE = Path(__file__).resolve().parent


def median_time(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after one warm-up call; the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="lite0 at 128 px, window 32 / stride 16 only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--captum", action="store_true", help="also Captum's Occlusion on the same windows (same copies "
                    "per pass, the same grey fill, summed over channels) with its agreement")
    args = ap.parse_args()
    cases = [("efficientnet_lite0", 128, 32, 16)] if args.quick else [
        (m, size, w, s) for m, size in (("efficientnet_lite0", 224), ("demo_net", 112)) for w, s in ((32, 16), (16, 8))]
    rows = []
    models: dict[str, torch.nn.Module] = {}
    for name, size, window, stride in cases:
        model = models.setdefault(name, cs.load_model(name))
        x = model.preprocess.normalize(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            f, _ = median_time(lambda m=model, x=x: m(x), repeats=max(10, args.repeats))
        kw = {"target": cs.top_class, "window": window, "stride": stride, "batch_size": 64, "progress": False}
        def run(incremental: bool, m: torch.nn.Module = model, x: torch.Tensor = x, kw: dict = kw) -> Any:
            return cs.occlusion(m, x, incremental=incremental, **kw)

        t_full, full = median_time(lambda: run(False), args.repeats)
        t_inc, inc = median_time(lambda: run(True), args.repeats)
        copies = len(full.rows) * len(full.cols)
        err = float((inc.scores - full.scores).abs().max() / full.scores.abs().max())
        peer: dict[str, Any] = {}
        if args.captum:
            from captum.attr import Occlusion

            from convscope.core.model import input_normalizer

            with torch.no_grad():
                top = int(model(x).argmax())
            grey = input_normalizer(model)(torch.full((1, 3, 1, 1), 0.5)).expand_as(x).contiguous()

            def theirs(m: torch.nn.Module = model, x: torch.Tensor = x, w: int = window, s: int = stride,
                       g: torch.Tensor = grey, t: int = top) -> torch.Tensor:
                return Occlusion(m).attribute(x, sliding_window_shapes=(3, w, w), strides=(3, s, s), baselines=g,
                                              target=t, perturbations_per_eval=64)

            t_captum, theirs_map = median_time(theirs, args.repeats)
            a = inc.maps.flatten().double()
            b = theirs_map.sum(1).flatten().double()
            r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
            peer = {"captum_s": t_captum, "captum_over_incremental": t_captum / t_inc, "captum_r": r}
            print(f"  captum {t_captum:.2f}s ({t_captum / t_inc:.2f}x incremental), r {r:.4f}", flush=True)
        rows.append({"model": name, "size": size, "window": window, "stride": stride, "copies": copies,
                     "F_s": f, "full_s": t_full, "incremental_s": t_inc, "full_per_copy_F": t_full / copies / f,
                     "incremental_per_copy_F": t_inc / copies / f, "speedup": t_full / t_inc,
                     "max_rel_score_diff": err, "path": inc.path, **peer})
        print(f"{name} {size}px {window}/{stride}: full {t_full:.2f}s, incremental {t_inc:.2f}s "
              f"({t_full / t_inc:.2f}x), rel diff {err:.1e}", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.captum:
        print("| model | px | window/stride | copies | incremental / copy (F) | Captum (s) | incremental (s) "
              "| Captum / incremental | r |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['size']} | {r['window']}/{r['stride']} | {r['copies']} "
                  f"| {r['incremental_per_copy_F']:.2f} | {r['captum_s']:.2f} | {r['incremental_s']:.2f} "
                  f"| {r['captum_over_incremental']:.2f}x | {r['captum_r']:.4f} |")
        print()
    print("| model | px | window/stride | copies | F (ms) | full (s) | full / copy (F) | incremental (s) "
          "| incremental / copy (F) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['window']}/{r['stride']} | {r['copies']} | {1000 * r['F_s']:.1f} "
              f"| {r['full_s']:.2f} | {r['full_per_copy_F']:.2f} | {r['incremental_s']:.2f} "
              f"| {r['incremental_per_copy_F']:.2f} | {r['speedup']:.2f}x | {r['max_rel_score_diff']:.1e} |")
    out = HERE / "results" / "occlusion.json"
    out.parent.mkdir(exist_ok=True)
    atomic_write_text(out, json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
