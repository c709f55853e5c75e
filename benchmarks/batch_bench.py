#!/usr/bin/env python
"""batch_size="auto" against every fixed batch size, and against Captum, under each CPU allocator (issue 23).

    python benchmarks/batch_bench.py                    # both allocators, lite0, median of 3, Captum where installed
    python benchmarks/batch_bench.py --allocator default --quick

The allocator is process-wide, so each setting runs in its own subprocess: ``default`` gets
``CONVSCOPE_MALLOC=default`` (glibc's malloc as a Python user has it), ``tuned`` calls
``convscope.tune_cpu_allocator()`` first (what the CLI does). In each:

* **auto vs fixed**: per method (occlusion copies, SmoothGrad samples, IG steps, the top-k data stream, AM rows),
  the median time per unit (copy, sample, step, image, unit-step) at every fixed batch of {1, 4, 8, 16, 32, 64}
  (up to the method's useful maximum) and at ``"auto"``, timed interleaved (round r times every batch once), with
  user+system CPU time and minor page faults per unit. Criterion (glibc defaults): auto no more than 15 % slower
  per unit than the best fixed batch. Methods whose module resolves ``"auto"`` outside this task's files
  (occlusion, top-k) get the int that :func:`convscope.core.batching.resolve_batch_size` picks there.
* **vs Captum** (32 images): Occlusion (window 56 = stride 56, 16 positions; Captum 16 perturbations per eval),
  SmoothGrad (4 samples; Captum's NoiseTunnel default batches all of them) and Grad-CAM, with the Pearson
  agreement of the maps (median / min over maps).

Prints markdown tables and writes JSON (``--out``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import convscope as cs  # noqa: E402
from convscope.core.batching import activation_sizes, resolve_batch_size  # noqa: E402
from convscope.core.device import allocator_state  # noqa: E402
from convscope.core.model import input_normalizer  # noqa: E402
from convscope.methods.incremental import copy_bytes, plan_incremental  # noqa: E402
from harness import load_average, md_table, model_inputs, pearson_per_map  # noqa: E402

FIXED = (1, 4, 8, 16, 32, 64)
CRITERION = 1.15
MODEL = "efficientnet_lite0"
CAM_LAYER = "head.act"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allocator", choices=["default", "tuned", "both"], default="both")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    ap.add_argument("--quick", action="store_true", help="smaller work per call (a smoke run)")
    ap.add_argument("--peer-images", type=int, default=32, help="images in the Captum comparison")
    ap.add_argument("--peer-reps", type=int, default=None, help="timed rounds of the Captum comparison "
                    "(default: --reps; the agreement call is the warm-up)")
    ap.add_argument("--methods", nargs="+", default=None, help="only these rows (occlusion smoothgrad ig topk am)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True, help="the Captum comparison")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "batch.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_reps is None:
        args.peer_reps = args.reps
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


# ------------------------------------------------------------------------------------------------ timing


def _sample(fn: Callable[[], Any]) -> tuple[float, float, int]:
    gc.collect()
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    fn()
    t1, c1, r1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    return t1 - t0, c1 - c0, r1.ru_minflt - r0.ru_minflt


def interleaved(calls: dict[str, Callable[[], Any]], reps: int, warm: bool = True) -> dict[str, dict[str, Any]]:
    """One warm-up call each, then ``reps`` rounds timing every call once per round: medians of wall, CPU, faults."""
    for fn in calls.values() if warm else ():
        fn()
    samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            samples[k].append(_sample(fn))
    return {k: {"wall_s": statistics.median(s[0] for s in v), "cpu_s": statistics.median(s[1] for s in v),
                "faults": statistics.median(s[2] for s in v), "walls": [s[0] for s in v]} for k, v in samples.items()}


# ------------------------------------------------------------------------------------------------ rows


def occlusion_rows(model: torch.nn.Module, x: torch.Tensor, window: int, stride: int) -> int:
    """The copies per pass ``cs.occlusion(batch_size="auto")`` uses: sized by an incremental copy's dirty boxes
    (``incremental.copy_bytes``) where the model runs incrementally, else by its full activations."""
    with torch.no_grad():
        out = model(x)
    starts = list(range(0, x.shape[-1] - window + 1, stride))
    plan, _ = plan_incremental(model, x, out, starts, starts, (window, window), None, None)
    copies = len(x) * len(starts) ** 2
    return resolve_batch_size("auto", model, x, "occlusion", limit=copies,
                              row_bytes=copy_bytes(plan) if plan is not None else None)


def method_rows(model: torch.nn.Module, quick: bool, only: list[str] | None) -> list[dict[str, Any]]:
    """``{name, unit, units, fn(batch) -> call, auto (int), max}`` per method."""
    x1 = model_inputs(model, 1)
    n_img = 4 if quick else 8
    xs = model_inputs(model, n_img)
    samples = 4 if quick else 8
    window, stride = (56, 56) if quick else (32, 32)
    copies = ((224 - window) // stride + 1) ** 2
    am_units = 4 if quick else 8
    am_x = torch.zeros(1, 3, 128, 128)
    layers = ["blocks.3", "blocks.9", "blocks.15"]
    rows = [
        {"name": f"occlusion ({window}/{stride}, 1 image)", "key": "occlusion", "unit": "copy", "units": copies,
         "max": copies, "auto": "auto", "auto_rows": occlusion_rows(model, x1, window, stride),
         "fn": lambda b: lambda: cs.occlusion(model, x1, window=window, stride=stride, batch_size=b, progress=False)},
        {"name": f"smoothgrad (n={samples}, 1 image)", "key": "smoothgrad", "unit": "sample", "units": samples,
         "max": samples, "auto": "auto",
         "fn": lambda b: lambda: cs.smoothgrad(model, x1, n=samples, batch_size=b, progress=False)},
        {"name": f"integrated gradients ({samples} steps, 1 image)", "key": "ig", "unit": "step", "units": samples,
         "max": samples, "auto": "auto",
         "fn": lambda b: lambda: cs.integrated_gradients(model, x1, steps=samples, batch_size=b, progress=False)},
        {"name": f"top-k stream ({n_img} images, 3 layers)", "key": "topk", "unit": "image", "units": n_img,
         "max": n_img, "auto": resolve_batch_size("auto", model, xs, "top_k_activations", limit=n_img),
         "fn": lambda b: lambda: cs.top_k_activations(model, xs, layers, k=4, batch_size=b, progress=False)},
        {"name": f"activation maximization ({am_units} units of blocks.10, 128 px, 3 steps)", "key": "am",
         "unit": "unit-step", "units": am_units * 3, "max": am_units, "auto": "auto",
         "fn": lambda b: lambda: cs.activation_maximization(model, "blocks.10", units=list(range(am_units)), steps=3,
                                                            size=128, batch_size=b, progress=False)},
    ]
    for r in rows:  # what "auto" resolves to, for the table
        sample = {"am": am_x, "topk": xs}.get(r["key"], x1)
        if "auto_rows" not in r:
            r["auto_rows"] = r["auto"] if isinstance(r["auto"], int) else resolve_batch_size(
                "auto", model, sample, r["key"], grad=r["key"] in ("smoothgrad", "ig", "am"), limit=r["max"])
    return [r for r in rows if not only or r["key"] in only]


def run_methods(model: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for r in method_rows(model, args.quick, args.methods):
        sizes = [b for b in FIXED if b <= r["max"]]
        calls = {str(b): r["fn"](b) for b in sizes}
        calls["auto"] = r["fn"](r["auto"])
        log(f"  {r['name']}: batches {sizes} + auto ({r['auto_rows']})")
        t = interleaved(calls, args.reps)
        per = {k: {"wall_ms": v["wall_s"] * 1e3 / r["units"], "cpu_ms": v["cpu_s"] * 1e3 / r["units"],
                   "faults": v["faults"] / r["units"], "walls": v["walls"]} for k, v in t.items()}
        best = min((k for k in per if k != "auto"), key=lambda k: per[k]["wall_ms"])
        best_cpu = min((k for k in per if k != "auto"), key=lambda k: per[k]["cpu_ms"])
        row = {"name": r["name"], "key": r["key"], "unit": r["unit"], "auto_rows": r["auto_rows"], "per_unit": per,
               "best": int(best), "ratio": per["auto"]["wall_ms"] / per[best]["wall_ms"],
               "best_cpu": int(best_cpu), "ratio_cpu": per["auto"]["cpu_ms"] / per[best_cpu]["cpu_ms"]}
        log(f"    auto {per['auto']['wall_ms']:.1f} ms/{r['unit']} vs best b{best} {per[best]['wall_ms']:.1f}: "
            f"{row['ratio']:.2f}x (CPU {row['ratio_cpu']:.2f}x)")
        out.append(row)
        gc.collect()
    return out


def run_peers(model: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency
    except Exception as exc:  # noqa: BLE001 - report and go on
        log(f"  captum not runnable here: {exc}")
        return [{"error": f"captum not runnable here: {type(exc).__name__}: {exc}"}]
    n = args.peer_images
    x = model_inputs(model, n)
    with torch.no_grad(), cs.preserved_state(model):
        target = model(x).argmax(1).tolist()
    grey = input_normalizer(model)(torch.full((1, 3, 1, 1), 0.5)).expand_as(x).contiguous()
    span = x.reshape(n, -1)
    stdev = float((0.15 * (span.amax(1) - span.amin(1))).mean())
    layer = dict(model.named_modules())[CAM_LAYER]
    occ_rows = "auto"
    pairs = {
        "Occlusion (56/56)": (
            lambda: cs.occlusion(model, x, target, window=56, stride=56, batch_size=occ_rows, progress=False).maps,
            lambda: Occlusion(model).attribute(x, sliding_window_shapes=(3, 56, 56), strides=(3, 56, 56),
                                               baselines=grey, target=target, perturbations_per_eval=16),
        ),
        "SmoothGrad (n=4)": (
            lambda: cs.smoothgrad(model, x, target, n=4, sigma=0.15, progress=False),
            lambda: NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=stdev,
                                                           target=target, abs=False),
        ),
        "Grad-CAM": (
            lambda: cs.gradcam(model, x, target, layer=CAM_LAYER),
            lambda: LayerAttribution.interpolate(
                LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True), (224, 224),
                interpolate_mode="bilinear"),
        ),
    }
    out = []
    for name, (ours, theirs) in pairs.items():
        if args.methods and not any(m in name.lower() for m in args.methods):
            continue
        a, b = ours().detach(), theirs().detach()  # also the warm-up calls
        if name.startswith("Occlusion"):
            b = b.sum(1)  # Captum: the same drop on every channel of the window
        r = pearson_per_map(a.reshape(n, 1, -1), b.reshape(n, 1, -1))
        floor = None
        if name.startswith("SmoothGrad"):  # two independent noise draws of our own: what agreement can reach
            again = cs.smoothgrad(model, x, target, n=4, sigma=0.15, seed=1, progress=False)
            rf = pearson_per_map(a.reshape(n, 1, -1), again.reshape(n, 1, -1))
            floor = {"median_r": statistics.median(rf), "min_r": min(rf)}
        t = interleaved({"convscope": ours, "captum": theirs}, args.peer_reps, warm=False)
        row = {"name": f"{name}, {n} images", "convscope_ms": t["convscope"]["wall_s"] * 1e3,
               "captum_ms": t["captum"]["wall_s"] * 1e3, "convscope_cpu_ms": t["convscope"]["cpu_s"] * 1e3,
               "captum_cpu_ms": t["captum"]["cpu_s"] * 1e3, "faults": {k: v["faults"] for k, v in t.items()},
               "agreement": {"median_r": statistics.median(r), "min_r": min(r)}, "ours_vs_ours": floor}
        row["captum_over_ours"] = row["captum_ms"] / row["convscope_ms"]
        log(f"  {row['name']}: ours {row['convscope_ms']:.0f} ms, captum {row['captum_ms']:.0f} ms "
            f"({row['captum_over_ours']:.2f}x), r median {row['agreement']['median_r']:.3f}")
        out.append(row)
    return out


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    applied = cs.tune_cpu_allocator() if args.allocator == "tuned" else False
    torch.set_num_threads(args.threads)
    model = cs.load_model(MODEL, device="cpu")
    state = allocator_state()
    sizes = activation_sizes(model, torch.zeros(1, 3, 224, 224))
    log(f"== allocator {args.allocator}: {state} (tune_cpu_allocator applied: {applied}); largest activation "
        f"{sizes.largest / 2**20:.2f} MiB per image ({sizes.layer}); load {load_average()}")
    load0 = load_average()
    doc = {"allocator": args.allocator, "state": state.__dict__, "threads": args.threads,
           "largest_mib": sizes.largest / 2**20, "largest_layer": sizes.layer, "load_start": load0,
           "methods": run_methods(model, args), "peers": run_peers(model, args) if args.peers else []}
    doc["load_end"] = load_average()
    return doc


# ------------------------------------------------------------------------------------------------ report


def report(runs: list[dict[str, Any]]) -> str:
    out = []
    for run in runs:
        st = run["state"]
        thr = "none" if st["mmap_threshold"] is None else f"{st['mmap_threshold'] / 2**20:.0f} MiB"
        out += [f"### Allocator: {run['allocator']} ({st['name']}, mmap threshold {thr}); "
                f"{run['threads']} threads; load {run['load_start']} -> {run['load_end']}", "",
                f"Largest activation: {run['largest_mib']:.2f} MiB per image ({run['largest_layer']}).", ""]
        head = ["method", "unit", *[f"b{b}" for b in FIXED], "auto (rows)", "best fixed", "auto / best",
                f"≤ {CRITERION:.2f}", "CPU auto / best", "faults/unit auto · best"]
        rows = []
        for m in run["methods"]:
            per = m["per_unit"]
            cells = [f"{per[str(b)]['wall_ms']:.1f}" if str(b) in per else "—" for b in FIXED]
            rows.append([m["name"], m["unit"], *cells, f"{per['auto']['wall_ms']:.1f} ({m['auto_rows']})",
                         f"b{m['best']}", f"{m['ratio']:.2f}", "yes" if m["ratio"] <= CRITERION else "**no**",
                         f"{m['ratio_cpu']:.2f}", f"{per['auto']['faults']:.0f} · {per[str(m['best'])]['faults']:.0f}"])
        out += ["Median ms per unit:", "", md_table(head, rows), ""]
        peers = [p for p in run["peers"] if "error" not in p]
        if peers:
            out += ["vs Captum (same images and targets, same process and allocator):", "",
                    md_table(["case", "convscope ms", "Captum ms", "Captum / ours", "CPU Captum / ours",
                              "agreement r (median / min)"],
                             [[p["name"], f"{p['convscope_ms']:.0f}", f"{p['captum_ms']:.0f}",
                               f"{p['captum_over_ours']:.2f}", f"{p['captum_cpu_ms'] / p['convscope_cpu_ms']:.2f}",
                               f"{p['agreement']['median_r']:.3f} / {p['agreement']['min_r']:.3f}"
                               + (f" (ours seed 0 vs 1: {p['ours_vs_ours']['median_r']:.3f})"
                                  if p.get("ours_vs_ours") else "")]
                              for p in peers]), ""]
        out += [f"* {p['error']}" for p in run["peers"] if "error" in p]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        doc = run_child(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        return 0
    runs = []
    settings = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
    with tempfile.TemporaryDirectory() as tmp:
        for alloc in settings:
            env = dict(os.environ)
            env.pop("GLIBC_TUNABLES", None)
            env.pop("LD_PRELOAD", None)
            if alloc == "default":
                env["CONVSCOPE_MALLOC"] = "default"
            else:
                env.pop("CONVSCOPE_MALLOC", None)
            out = Path(tmp) / f"{alloc}.json"
            argv_child = [sys.executable, str(Path(__file__).resolve()), "--child", "--allocator", alloc,
                          "--out", str(out), "--reps", str(args.reps), "--threads", str(args.threads),
                          "--peer-images", str(args.peer_images), "--peer-reps", str(args.peer_reps),
                          "--peers" if args.peers else "--no-peers", *(["--quick"] if args.quick else []),
                          *(["--methods", *args.methods] if args.methods else [])]
            proc = subprocess.run(argv_child, env=env)
            if proc.returncode == 0 and out.is_file():
                runs.append(json.loads(out.read_text()))
            else:
                log(f"the {alloc} run failed (exit {proc.returncode})")
    if not runs:
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "runs": runs}, indent=1))
    print(report(runs))
    log(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
