#!/usr/bin/env python
"""Time ``convscope atlas build`` on efficientnet_lite0 against the model's own cost of the same work.

    python benchmarks/atlas_bench.py            # 3 layers (blocks.3, blocks.9, blocks.15: 472 units), k=9, 128 AM steps
    python benchmarks/atlas_bench.py --quick    # 3 small layers (144 units), k=2, 2 AM steps: a couple of minutes
    python benchmarks/atlas_bench.py --stages top --repeats 3   # the top-k pictures stage alone, 3 timed runs
    python benchmarks/atlas_bench.py --stages top --profile 25  # ... once under cProfile (untimed): top 25 items

Builds a fresh atlas on the bundled photos, then measures, in the same process, the bare model doing the same work:

* top-k pass: **F** (forward, no grad) of the same images at the same batch size;
* top-k pictures: **F+B(input)** of one image per DeconvNet projection (``units x k`` rows, the projections'
  batch size): the DeconvNet is one backward pass per projected activation;
* activation maximization: **F+B(input)** of a batch of ``chunk`` images at the AM size, per step and chunk.

``--stages top`` times the top-k pictures stage alone (the builder's ``RenderTop`` tasks, chunk by chunk, in this
process, a freshly loaded model per repeat so that no receptive-field box is cached from the repeat before),
with its F+B(input) baseline measured in the same run, and records a digest of every picture and top list (equal
digests: the same atlas pictures and lists; compare before / after a change). Writes ``results/atlas_top.json``.

The baselines run the whole model; the atlas stops each forward pass after the deepest layer it needs, so a
ratio below 1 is possible for shallow layers. Writes ``benchmarks/results/atlas.json`` and prints a markdown table.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from convscope.applications.deconv import default_images  # noqa: E402
from convscope.atlas.builder import Context, RenderTop, WorkerSpec, build_atlas  # noqa: E402
from convscope.core.device import tune_cpu_allocator  # noqa: E402
from convscope.methods.topk import top_k_activations  # noqa: E402
from convscope.models import load_model  # noqa: E402
from harness import (  # noqa: E402
    F_,
    FB_INPUT,
    RepeatPolicy,
    atomic_write,
    baseline_fn,
    baseline_state,
    describe_machine,
    fmt_ratio,
    load_average,
    machine_info,
    md_table,
    measure_clean,
    synchronizer,
)

MODEL = "efficientnet_lite0"
FULL = {"layers": ["blocks.3", "blocks.9", "blocks.15"], "k": 9, "am_steps": 128, "am_size": None}
QUICK = {"layers": ["blocks.1", "blocks.3", "blocks.5"], "k": 2, "am_steps": 2, "am_size": None}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 small layers, k=2, 2 AM steps")
    p.add_argument("--layers", help="comma-separated layers (default: blocks.3,blocks.9,blocks.15)")
    p.add_argument("--k", type=int, help="top activations per unit (default 9)")
    p.add_argument("--am-steps", type=int, help="activation maximization steps (default 128)")
    p.add_argument("--am-size", type=int, help="activation maximization image side (default 224)")
    p.add_argument("--chunk", type=int, default=16, help="units per task / AM batch (default 16)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in this process)")
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    p.add_argument("--keep", help="build into this folder and keep it (default: a temp folder, removed)")
    p.add_argument("--stages", choices=("all", "top"), default="all",
                   help="all: build the whole atlas (default); top: time the top-k pictures stage alone")
    p.add_argument("--repeats", type=int, default=3, help="--stages top: timed runs, median reported (default 3)")
    p.add_argument("--profile", type=int, metavar="N",
                   help="--stages top: run the stage once under cProfile instead (untimed), print the top N items")
    p.add_argument("--save", help="--stages top: write every picture and top list of the first run into this folder")
    p.add_argument("--display", default="percentile", help="projection display of the pictures (default percentile)")
    p.add_argument("--out", help="JSON output (default results/atlas.json; --stages top: results/atlas_top.json)")
    return p.parse_args(argv)


def _time(model: torch.nn.Module, x: torch.Tensor, kind: str, policy: RepeatPolicy) -> float:
    """Median seconds of one call of the bare model doing ``kind`` on ``x``."""
    with baseline_state(model, kind):
        return measure_clean(baseline_fn(model, x, kind), policy, synchronizer(x.device), log=log).median


def _top_stage(model: torch.nn.Module, data: Any, results: dict[str, Any], cfg: dict[str, Any], chunk: int,
               bs: int, display: str, save: str | None = None) -> tuple[float, dict[str, float], str]:
    """The builder's top-k pictures stage in this process: ``(seconds of task work, seconds per layer, digest of
    every picture and top list)``."""
    ctx = Context(model, WorkerSpec(MODEL), data)
    digest = hashlib.sha256()
    per_layer: dict[str, float] = {}
    for name in cfg["layers"]:
        units = results[name].values.shape[0]
        per_layer[name] = 0.0
        for c0 in range(0, units, chunk):
            task = RenderTop(name, tuple(range(c0, min(c0 + chunk, units))), results[name], display, bs)
            t0 = time.perf_counter()
            out = task.run(ctx)
            per_layer[name] += time.perf_counter() - t0
            for u, r in sorted(out.items()):
                if save:
                    Path(save).mkdir(parents=True, exist_ok=True)
                    (Path(save) / f"{name}_{u}.png").write_bytes(r["png"])
                    (Path(save) / f"{name}_{u}.json").write_text(json.dumps([r["top"], r["max_activation"]]))
                digest.update(f"{name}/{u}".encode())
                digest.update(r["png"])
                digest.update(json.dumps([r["top"], r["max_activation"]]).encode())
        log(f"  {name}: {units} units, {per_layer[name]:.1f} s")
    return sum(per_layer.values()), per_layer, digest.hexdigest()


def main_top(args: argparse.Namespace, cfg: dict[str, Any], allocator: str) -> int:
    """``--stages top``: the top-k pictures stage alone, ``--repeats`` times, against F+B(input) per projection."""
    model = load_model(MODEL)
    device = next(model.parameters()).device
    data = default_images(model, None, None, progress=False)
    bs, chunk = args.batch_size, args.chunk
    results = top_k_activations(model, data.batches(bs), cfg["layers"], k=cfg["k"], batch_size=bs, progress=False)
    units = sum(r.values.shape[0] for r in results.values())
    rows_k = sum(r.values.numel() for r in results.values())  # one DeconvNet projection per unit and top activation
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        _top_stage(load_model(MODEL), data, results, cfg, chunk, bs, args.display)
        prof.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.profile)
            print(buf.getvalue())
        return 0
    runs = []
    for i in range(args.repeats):
        log(f"run {i + 1}/{args.repeats} (a fresh model: no cached boxes)")
        runs.append(_top_stage(load_model(MODEL), data, results, cfg, chunk, bs, args.display,
                               args.save if i == 0 else None))
    digests = {d for _, _, d in runs}
    if len(digests) != 1:
        log(f"warning: the runs gave {len(digests)} different results")
    log("measuring F+B(input) ...")
    policy = RepeatPolicy.quick() if args.quick else RepeatPolicy()
    gen = torch.Generator().manual_seed(0)
    t_fb = _time(model, torch.randn(bs, 3, *model.preprocess.input_size, generator=gen).to(device), FB_INPUT, policy)
    cost = t_fb * math.ceil(rows_k / bs)
    secs = [s for s, _, _ in runs]
    median = statistics.median(secs)
    m = machine_info(device, torch.get_num_threads(), allocator)
    m["loadavg_end"] = load_average()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "stage": "top", "model": MODEL,
        "layers": {n: list(r.shape) for n, r in results.items()}, "units": units, "projections": rows_k,
        "images": len(data), "settings": {**cfg, "chunk": chunk, "batch_size": bs, "display": args.display},
        "seconds": secs, "median_seconds": median, "per_layer_seconds": [p for _, p, _ in runs],
        "model_seconds": cost, "ratio": median / cost, "ratios": [s / cost for s in secs],
        "fb_input_ms": t_fb * 1e3, "digest": runs[0][2], "digests_equal": len(digests) == 1, "machine": m,
    }
    atomic_write(Path(args.out or HERE / "results" / "atlas_top.json"), json.dumps(result, indent=1))
    per = {n: statistics.median(p[n] for _, p, _ in runs) for n in cfg["layers"]}
    print(f"Top-k pictures of {MODEL} ({', '.join(f'{n}: {r.values.shape[0]} units' for n, r in results.items())}), "
          f"k={cfg['k']}, {len(data)} images, chunk {chunk}, batch {bs}\n")
    print(md_table(["stage", "units", "seconds (median of runs)", "runs", "model cost (s)", "ratio", "baseline"],
                   [["top-k pictures (DeconvNet + patches)", units, f"{median:.1f}",
                     ", ".join(f"{s:.1f}" for s in secs), f"{cost:.1f}", fmt_ratio(median / cost),
                     f"F+B(input) per projection ({rows_k}, batch {bs}: {t_fb * 1e3:.0f} ms)"]]
                   + [[f"  {n}", results[n].values.shape[0], f"{per[n]:.1f}", "", "", "", ""] for n in per]))
    print(f"\ndigest {runs[0][2][:16]} (runs equal: {len(digests) == 1})\n{describe_machine(m)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("k", "am_steps", "am_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.layers:
        cfg["layers"] = [s.strip() for s in args.layers.split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "tuned" if tune_cpu_allocator() else "default"
    if args.stages == "top":
        return main_top(args, cfg, allocator)
    args.out = args.out or str(HERE / "results" / "atlas.json")
    model = load_model(MODEL)
    device = next(model.parameters()).device

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "atlas"
        log(f"building the atlas of {MODEL} {','.join(cfg['layers'])} into {out} ...")
        t0 = time.perf_counter()
        atlas = build_atlas(MODEL, cfg["layers"], out, k=cfg["k"], am_steps=cfg["am_steps"], am_size=cfg["am_size"],
                            chunk=args.chunk, batch_size=args.batch_size, workers=args.workers, progress=True)
        wall = time.perf_counter() - t0
        meta = atlas.meta()
        last = json.loads(meta["last_build"])
        layers = [(r.name, r.units, list(r.shape)) for r in atlas.layers()]
        atlas.close()
    units = sum(u for _, u, _ in layers)
    images = last["stages"]["topk"]["units"]
    size = cfg["am_size"] or model.preprocess.input_size[0]

    log("measuring the model's own cost of the same work ...")
    policy = RepeatPolicy.quick() if args.quick else RepeatPolicy()
    gen = torch.Generator().manual_seed(0)
    native = model.preprocess.input_size
    bs, chunk = args.batch_size, args.chunk
    t_f = _time(model, torch.randn(min(bs, images), 3, *native, generator=gen).to(device), F_, policy)
    t_fb = _time(model, torch.randn(bs, 3, *native, generator=gen).to(device), FB_INPUT, policy)
    t_am = _time(model, torch.randn(min(chunk, units), 3, size, size, generator=gen).to(device), FB_INPUT, policy)
    am_chunks = sum(math.ceil(u / chunk) for _, u, _ in layers)
    rows_k = units * min(cfg["k"], images)  # one DeconvNet projection per unit and top activation
    cost = {
        "topk": t_f * math.ceil(images / bs),
        "top": t_fb * math.ceil(rows_k / bs),
        "am": t_am * cfg["am_steps"] * am_chunks,
    }
    what = {
        "topk": f"F of {images} images (batch {bs})",
        "top": f"F+B(input) of {rows_k} rows (batch {bs})",
        "am": f"F+B(input) of {am_chunks} batches of <= {chunk} at {size}px x {cfg['am_steps']} steps",
    }
    stages = []
    for stage, label in (("topk", "top-k pass"), ("top", "top-k pictures (DeconvNet + patches)"),
                         ("am", "activation maximization")):
        s = last["stages"].get(stage, {"units": 0, "seconds": float("nan")})
        stages.append({"stage": stage, "label": label, "units": s["units"], "seconds": s["seconds"],
                       "model_seconds": cost[stage], "ratio": s["seconds"] / cost[stage], "baseline": what[stage]})
    total = sum(s["seconds"] for s in stages)
    total_cost = sum(s["model_seconds"] for s in stages)
    m = machine_info(device, torch.get_num_threads(), allocator)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "quick": args.quick, "model": MODEL,
        "layers": layers, "units": units, "images": images, "settings": {**cfg, "chunk": chunk, "batch_size": bs,
                                                                           "workers": args.workers},
        "stages": stages, "wall_seconds": wall, "task_seconds": total, "model_seconds": total_cost,
        "ratio": total / total_cost, "baselines_ms": {"F": t_f * 1e3, "F+B(input)": t_fb * 1e3,
                                                      "F+B(input) AM batch": t_am * 1e3},
        "machine": m,
    }
    atomic_write(Path(args.out), json.dumps(result, indent=1))
    table = md_table(
        ["stage", "units", "minutes", "model cost (min)", "ratio", "baseline"],
        [[s["label"], s["units"], f"{s['seconds'] / 60:.2f}", f"{s['model_seconds'] / 60:.2f}",
          fmt_ratio(s["ratio"]), s["baseline"]] for s in stages]
        + [["**atlas**", units, f"{total / 60:.2f} (wall {wall / 60:.2f})", f"{total_cost / 60:.2f}",
            fmt_ratio(total / total_cost), f"{len(layers)} layers of {MODEL}, {images} images"]])
    print(f"Atlas of {MODEL} ({', '.join(f'{n}: {u} units' for n, u, _ in layers)}), k={cfg['k']}, "
          f"{cfg['am_steps']} AM steps at {size}px, chunk {chunk}, {args.workers} worker(s)\n")
    print(table)
    print(f"\n{describe_machine(m)}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
