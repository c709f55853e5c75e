#!/usr/bin/env python
"""Time ``convscope atlas build`` on efficientnet_lite0 against the model's own cost of the same work.

    python benchmarks/atlas_bench.py            # 3 layers (blocks.3, blocks.9, blocks.15: 472 units), k=9, 128 AM steps
    python benchmarks/atlas_bench.py --quick    # 3 small layers (144 units), k=2, 2 AM steps: a couple of minutes

Builds a fresh atlas on the bundled photos, then measures, in the same process, the bare model doing the same work:

* top-k pass: **F** (forward, no grad) of the same images at the same batch size;
* top-k pictures: **F+B(input)** of one image per DeconvNet projection (``units x k`` rows, the projections'
  batch size): the DeconvNet is one backward pass per projected activation;
* activation maximization: **F+B(input)** of a batch of ``chunk`` images at the AM size, per step and chunk.

The baselines run the whole model; the atlas stops each forward pass after the deepest layer it needs, so a
ratio below 1 is possible for shallow layers. Writes ``benchmarks/results/atlas.json`` and prints a markdown table.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from convscope.atlas.builder import build_atlas  # noqa: E402
from convscope.core.device import tune_cpu_allocator  # noqa: E402
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
    p.add_argument("--out", default=str(HERE / "results" / "atlas.json"), help="JSON output")
    return p.parse_args(argv)


def _time(model: torch.nn.Module, x: torch.Tensor, kind: str, policy: RepeatPolicy) -> float:
    """Median seconds of one call of the bare model doing ``kind`` on ``x``."""
    with baseline_state(model, kind):
        return measure_clean(baseline_fn(model, x, kind), policy, synchronizer(x.device), log=log).median


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
