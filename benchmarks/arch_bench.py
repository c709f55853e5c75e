#!/usr/bin/env python
"""Saliency, Grad-CAM and top-k on the zoo's torchvision-named architectures, each as a ratio to the
architecture's own cost at 224 px:

* saliency, 1 image, over **F+B(input)** at batch 1 (forward + gradient of the top logit w.r.t. the input,
  parameters frozen: the same work done by the bare model);
* Grad-CAM at the last stage, 1 image, over **F+B(input)** at batch 1 (its backward stops at the layer, so the
  ratio can be below 1);
* top-k (k=9) of the middle and the last stage over a batch of 8, over **F** at batch 8 (forward under no_grad).

    python benchmarks/arch_bench.py                       # every architecture, markdown table on stdout
    python benchmarks/arch_bench.py --archs resnet18,vgg16 --out /tmp/arch_bench.md

Seeded random weights (the cost does not depend on the values), median of 3 timed runs after a warm-up, 2 torch
threads (``OMP_NUM_THREADS=2`` unless set). The "others" column is the CPU cores other processes used during the
method's runs (from /proc/stat): above about 0.5 the numbers are disturbed. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convscope as cs  # noqa: E402
from convscope.core.model import default_input_size  # noqa: E402
from convscope.methods.rollout import vit_blocks  # noqa: E402
from harness import F_, FB_INPUT, RepeatPolicy, baseline_fn, baseline_state, load_average, measure  # noqa: E402

SIZE = 224
TOPK_BATCH = 8
# (last stage: Grad-CAM and top-k; middle stage: top-k), as in tests/test_matrix.py
LAYERS: dict[str, tuple[str, str]] = {
    "resnet18": ("layer4", "layer2"),
    "resnet50": ("layer4", "layer2"),
    "vgg16": ("features.29", "features.15"),
    "densenet121": ("features.norm5", "features.transition1"),
    "mobilenet_v3_large": ("features.16", "features.6"),
    "convnext_tiny": ("features.7", "features.3"),
    # transformers (issue 18): token layers presented as maps; attention rollout timed too
    "vit_b_16": ("encoder.layers.encoder_layer_11", "encoder.layers.encoder_layer_5"),
    "swin_t": ("features.7", "features.3"),
    "demo_vit": ("", ""),  # its last and middle encoder blocks (see bench)
}
TRANSFORMERS = ("vit_b_16", "demo_vit")  # rollout needs ViT attention blocks (Swin's windows are not a rollout)
POLICY = RepeatPolicy(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)


def bench(name: str) -> dict[str, float]:
    """Medians (seconds) of the baselines and the three methods on architecture ``name``, and the others' load."""
    model = cs.load_model(name, device="cpu")
    last, mid = LAYERS[name]
    size = default_input_size(model)[0] if name.startswith("demo") else SIZE
    if name == "demo_vit":  # its depth is a training choice: its last and middle blocks, whatever they are
        blocks = vit_blocks(model)
        last, mid = blocks[-1], blocks[len(blocks) // 2]
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, size, size, generator=g)
    x8 = torch.randn(TOPK_BATCH, 3, size, size, generator=g)
    out: dict[str, float] = {}
    for kind, x, key in ((F_, x1, "F1"), (FB_INPUT, x1, "FB1"), (F_, x8, "F8")):
        with baseline_state(model, kind):
            out[key] = measure(baseline_fn(model, x, kind), POLICY).median
    others = []
    for key, fn in (("saliency", lambda: cs.saliency(model, x1)),
                    ("gradcam", lambda: cs.gradcam(model, x1, layer=last)),
                    ("topk", lambda: cs.top_k_activations(model, x8, [mid, last], k=9, batch_size=TOPK_BATCH,
                                                          progress=False)),
                    *((("rollout", lambda: cs.attention_rollout(model, x1)),) if name in TRANSFORMERS else ())):
        t = measure(fn, POLICY)
        out[key] = t.median
        others.append(t.others)
    out["others"] = max(others)
    return out


def table(rows: dict[str, dict[str, float]]) -> str:
    ms = 1e3
    lines = ["| architecture | F (1) ms | F+B (1) ms | saliency ms | / F+B | Grad-CAM ms | / F+B "
             f"| F ({TOPK_BATCH}) ms | top-k ms | / F | rollout ms | / F | others |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['F1'] * ms:.0f} | {r['FB1'] * ms:.0f} | {r['saliency'] * ms:.0f} | "
                     f"{r['saliency'] / r['FB1']:.2f} | {r['gradcam'] * ms:.0f} | {r['gradcam'] / r['FB1']:.2f} | "
                     f"{r['F8'] * ms:.0f} | {r['topk'] * ms:.0f} | {r['topk'] / r['F8']:.2f} | "
                     + (f"{r['rollout'] * ms:.0f} | {r['rollout'] / r['F1']:.2f} | " if "rollout" in r else "— | — | ")
                     + f"{r['others']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(LAYERS), help="comma-separated architectures")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    names = [n.strip() for n in args.archs.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        sys.exit(f"unknown architecture(s) {unknown}; choose from {', '.join(LAYERS)}")
    rows = {}
    for n in names:
        rows[n] = bench(n)
        print(f"{n}: done", file=sys.stderr)
    load = load_average()
    head = (f"{SIZE} px, median of 3, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"load average {load[0]:.1f} before the table" if load else "")
    text = f"{head}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
