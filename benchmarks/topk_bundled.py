#!/usr/bin/env python
"""Issue 5's setting exactly: top-k (k=9) over the bundled dataset (the photos `convscope deconv` scans for
efficientnet_lite0) for all 49 conv layers, against one plain forward pass over the same images, same batch.

    python benchmarks/topk_bundled.py

Three interleaved rounds of 31 timed repetitions each; prints each round's medians and the median ratio.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import convscope as cs
from convscope.applications.deconv import default_images


def median_s(fn, reps: int = 31) -> float:
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    model = cs.load_model("efficientnet_lite0")
    data = default_images(model, progress=False)
    x = data.load(list(range(len(data.names))))
    names = [n for n, mod in cs.named_layers(model).items() if isinstance(mod, nn.Conv2d)]
    print(f"{len(x)} bundled images, {len(names)} conv layers, {torch.get_num_threads()} threads")

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def top_k() -> None:
        cs.top_k_activations(model, x, names, k=9, progress=False)

    ratios = []
    for r in range(3):
        f, t = median_s(forward), median_s(top_k)
        ratios.append(t / f)
        print(f"round {r}: forward {f * 1e3:.1f} ms, top-k {t * 1e3:.1f} ms, ratio {t / f:.3f}")
    print(f"median ratio {statistics.median(ratios):.2f}x (issue 5 target: <= 1.2x)")


if __name__ == "__main__":
    main()
