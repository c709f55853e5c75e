#!/usr/bin/env python
"""Whole-model methods against the forward passes they need, measured in one process (``harness.measure``):

**(a) linear CKA** (``cs.layer_similarity(method="linear_cka")``, minibatch CKA of Nguyen et al. 2021, batches of
64) of demo_net with itself over every ReLU layer (``features.relu1-5``, ``classifier.relu6-7``: 7 x 7 pairs), for
N = 500 and 2000 images, two ways:

* *one module* (``model_a is model_b``): one forward pass per batch serves both sides, so the work it needs is
  **F(N)**, one forward pass of demo_net over the N images (batches of 64, ``no_grad``);
* *two copies* (a second demo_net with the same weights): a pass of each per batch, so it needs **F_a(N) + F_b(N)**.

``ratio = CKA time / needed forward time``: 1.0 would be CKA for free on top of the passes; what is above 1 is the
hooks, the Gram matrices (``N_b x N_b`` per layer and batch from the flattened ``C x H x W`` features) and the
unbiased HSIC terms.

**(b) embed** (``cs.embed``: global-average-pooled features, then t-SNE of sklearn after a PCA to 50 dims) of N =
2000 images, for efficientnet_lite0 ``head.act`` (at ``--lite0-size``, 224 px by default, or 128) and demo_net
``features.relu5`` (112 px), split into its two parts, each timed on its own:

* *feature pass*: ``pooled_features`` as ``embed`` runs it without labels (the whole model, for the predicted
  classes; batches of 32); its ratio is over **F(N)** at batch 32: the cost of the hooks and the pooling;
* *t-SNE*: ``project(features, "tsne")`` on those ``N x C`` features; its ratio over F(N) says how many forward
  passes over the dataset the projection costs;
* *embed*: the whole ``cs.embed`` call, end to end (should be about the sum of the two), and its ratio over F(N).

Inputs: the bundled photos through each model's preprocess, then seeded flips and shifts of them (distinct
images), kept as uint8 pixels and normalized per batch (the same batches for a method and its baseline).
Medians of the timed repeats after a warm-up; "others": CPU cores other processes used during the method's runs
(from /proc/stat; above about 0.5 the row is disturbed). Markdown tables on stdout.

    python benchmarks/whole_bench.py              # the full run (N = 500 / 2000; several minutes)
    python benchmarks/whole_bench.py --quick      # small N, to check that it works
    python benchmarks/whole_bench.py --lite0-size 128 --json benchmarks/results/whole.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convscope as cs  # noqa: E402
from convscope.core.model import input_denormalizer, input_normalizer  # noqa: E402
from convscope.methods.embed import pooled_features, project  # noqa: E402
from harness import (  # noqa: E402
    F_,
    RepeatPolicy,
    Timing,
    atomic_write,
    baseline_state,
    describe_machine,
    fmt_ms,
    fmt_ratio,
    load_average,
    machine_info,
    md_table,
    measure_clean,
    model_inputs,
)

CKA_BATCH = 64  # layer_similarity's default batch
EMBED_BATCH = 32  # embed's default batch
FULL = {"cka": (500, 2000), "embed": 2000}
QUICK = {"cka": (64, 128), "embed": 96}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


def pixel_pool(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct pictures at the model's input size as uint8 ``n x 3 x H x W``: the bundled photos through the
    model's preprocess, then seeded flips and shifts of them (harness.model_inputs does the same for small n; here
    the pixels are kept as uint8 so 2000 images at 224 px take 300 MB, not 1.2 GB)."""
    base = input_denormalizer(model)(model_inputs(model, 8)).clamp(0, 1).mul(255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((n, *base.shape[1:]), dtype=torch.uint8)
    for i in range(n):
        img = base[i % len(base)]
        if i >= len(base):
            if (i // len(base)) % 2:
                img = img.flip(-1)
            dy, dx = (int(v) for v in torch.randint(-24, 25, (2,), generator=g))
            img = img.roll((dy, dx), dims=(-2, -1))
        out[i] = img
    return out


def batches(model: nn.Module, pool: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """The pool in the model's input space, ``size`` images at a time (normalized per batch)."""
    normalize = input_normalizer(model)
    for i in range(0, len(pool), size):
        yield normalize(pool[i:i + size].float().div_(255))


def forward_all(models: list[nn.Module], pool: torch.Tensor, size: int) -> Callable[[], None]:
    """The bare forward passes a method needs: each model over every batch of the pool, under ``no_grad``."""
    def run() -> None:
        with torch.no_grad():
            for m in models:
                for x in batches(m, pool, size):
                    m(x)
    return run


def timed(fn: Callable[[], object], policy: RepeatPolicy, what: str) -> Timing:
    t0 = time.perf_counter()
    t = measure_clean(fn, policy, log=log)
    log(f"  {what}: median {fmt_ms(t.median)} ms ({len(t.samples)} repeats, {time.perf_counter() - t0:.0f} s)")
    return t


def bare_forward(models: list[nn.Module], pool: torch.Tensor, size: int, policy: RepeatPolicy) -> Timing:
    """F of ``models`` over the pool: eval mode, parameters frozen (``harness.baseline_state``), restored after."""
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(baseline_state(m, F_))
        return timed(forward_all(models, pool, size), policy, f"F x {len(models)}")


# --------------------------------------------------------------------------- (a) linear CKA


def bench_cka(ns: tuple[int, ...], policy: RepeatPolicy) -> list[dict]:
    a = cs.load_model("demo_net", device="cpu")
    b = cs.load_model("demo_net", device="cpu")  # the same weights, another module: two passes per batch
    relus = [n for n, m in a.named_modules() if isinstance(m, nn.ReLU)]
    rows = []
    for n in ns:
        pool = pixel_pool(a, n)
        for label, other in (("one module", a), ("two copies", b)):
            models = [a] if other is a else [a, b]
            log(f"linear CKA, demo_net vs itself ({label}), {len(relus)} x {len(relus)} ReLU layers, N = {n}")
            base = bare_forward(models, pool, CKA_BATCH, policy)
            result: dict = {}

            def cka(other: nn.Module = other, pool: torch.Tensor = pool, result: dict = result) -> None:
                result["r"] = cs.layer_similarity(a, other, batches(a, pool, CKA_BATCH), relus, relus,
                                                  method="linear_cka", progress=False)
            t = timed(cka, policy, "linear CKA")
            r = result["r"]
            diag = float(r.matrix.diagonal().min())  # a layer with itself: CKA 1
            rows.append({"n": n, "setup": label, "layers": len(relus), "passes": len(models), "F_s": base.median,
                         "cka_s": t.median, "ratio": t.median / base.median, "others": t.others,
                         "base_others": base.others, "diag_min": diag, "images": r.n_images})
    return rows


def cka_table(rows: list[dict]) -> str:
    return md_table(
        ["N", "demo_net vs itself", "layers", "needed forward", "F needed ms", "linear CKA ms", "CKA / F",
         "min CKA(l, l)", "others"],
        [[r["n"], r["setup"], f"{r['layers']}×{r['layers']}", "F" if r["passes"] == 1 else "F_a + F_b",
          fmt_ms(r["F_s"]), fmt_ms(r["cka_s"]), fmt_ratio(r["ratio"]), f"{r['diag_min']:.4f}",
          f"{r['others']:.2f}"] for r in rows])


# --------------------------------------------------------------------------- (b) embed


def bench_embed(n: int, lite0_size: int, policy: RepeatPolicy) -> list[dict]:
    rows = []
    for name, layer, size in (("efficientnet_lite0", "head.act", lite0_size), ("demo_net", "features.relu5", None)):
        model = cs.load_model(name, device="cpu")
        if size is not None and size != model.preprocess.input_size[0]:
            from convscope.core.preprocess import Preprocess

            pre = model.preprocess
            model.preprocess = Preprocess(resize=size, crop=size, mean=pre.mean, std=pre.std)
        side = model.preprocess.input_size[0]
        pool = pixel_pool(model, n)
        log(f"embed, {name} {layer} at {side} px, N = {n}")
        base = bare_forward([model], pool, EMBED_BATCH, policy)
        kept: dict = {}

        def feature_pass(model: nn.Module = model, pool: torch.Tensor = pool, layer: str = layer,
                         kept: dict = kept) -> None:
            kept["f"] = pooled_features(model, layer, batches(model, pool, EMBED_BATCH), EMBED_BATCH,
                                        progress=False, predict=True).features

        feats = timed(feature_pass, policy, "feature pass")
        tsne = timed(lambda kept=kept: project(kept["f"], "tsne", seed=0), policy, "t-SNE")
        whole = timed(lambda model=model, pool=pool, layer=layer: cs.embed(
            model, layer, batches(model, pool, EMBED_BATCH), progress=False), policy, "cs.embed")
        rows.append({"model": name, "layer": layer, "size": side, "n": n, "features": int(kept["f"].shape[1]),
                     "F_s": base.median, "feature_s": feats.median, "tsne_s": tsne.median, "embed_s": whole.median,
                     "feature_ratio": feats.median / base.median, "tsne_ratio": tsne.median / base.median,
                     "embed_ratio": whole.median / base.median,
                     "others": max(feats.others, tsne.others, whole.others)})
    return rows


def embed_table(rows: list[dict]) -> str:
    return md_table(
        ["model, layer", "px", "N", "F ms", "feature pass ms", "/ F", "t-SNE ms", "/ F", "cs.embed ms", "/ F",
         "others"],
        [[f"{r['model']} `{r['layer']}` ({r['features']})", r["size"], r["n"], fmt_ms(r["F_s"]),
          fmt_ms(r["feature_s"]), fmt_ratio(r["feature_ratio"]), fmt_ms(r["tsne_s"]), fmt_ratio(r["tsne_ratio"]),
          fmt_ms(r["embed_s"]), fmt_ratio(r["embed_ratio"]), f"{r['others']:.2f}"] for r in rows])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small N (CKA {QUICK['cka']}, embed {QUICK['embed']})")
    ap.add_argument("--lite0-size", type=int, default=224, choices=(224, 128), help="lite0's input side (px)")
    ap.add_argument("--only", choices=("cka", "embed"), help="run one part")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    sizes = QUICK if args.quick else FULL
    # --quick checks that it runs: 2 repeats, no waiting for a quiet machine
    policy = (RepeatPolicy(warmup=1, min_repeats=2, max_repeats=2, budget_s=0.0, retries=0) if args.quick else
              RepeatPolicy(warmup=1, min_repeats=3, max_repeats=5, budget_s=0.0, quiet_wait_s=60.0))
    machine = machine_info(torch.device("cpu"), threads, "default")
    t0 = time.perf_counter()
    cka_rows = bench_cka(sizes["cka"], policy) if args.only in (None, "cka") else []
    embed_rows = bench_embed(sizes["embed"], args.lite0_size, policy) if args.only in (None, "embed") else []
    machine["loadavg_end"] = load_average()
    print(f"Measured on {describe_machine(machine)}{' (--quick)' if args.quick else ''}; "
          f"{time.perf_counter() - t0:.0f} s in all.\n")
    if cka_rows:
        print("**Linear CKA** (minibatch, batches of 64) of demo_net with itself over its ReLU layers, against the "
              "forward passes it needs:\n")
        print(cka_table(cka_rows) + "\n")
    if embed_rows:
        print("**cs.embed** (pooled features, t-SNE) split into its parts, each against F over the same images "
              "(batch 32):\n")
        print(embed_table(embed_rows) + "\n")
    if args.json:
        atomic_write(args.json, json.dumps({"machine": machine, "quick": args.quick, "cka": cka_rows,
                                            "embed": embed_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
