#!/usr/bin/env python
"""The whole-model atlas of efficientnet_lite0 (all 49 conv layers, 21 008 units): measured on a sample of units
per layer, projected to every unit and to N machines (issue 21, part 4).

    python benchmarks/atlas_whole.py --config one      # one process (executor local, 1 worker), + the model's cost
    python benchmarks/atlas_whole.py --config local2   # 2 local worker processes
    python benchmarks/atlas_whole.py --config ray2     # a local Ray cluster (ray.init, 2 actors)
    python benchmarks/atlas_whole.py --resume-check 60 # kill -9 a build after 60 s, rerun it, compare with --config one
    python benchmarks/atlas_whole.py --report          # markdown tables and the projection from the JSONs above

The full atlas is days of CPU here, so every run is the real builder (:func:`convscope.build_atlas`, the atlas
defaults: top-9 on the bundled photos, activation maximization at 224 px, preset ``yosinski``, batch ``auto``) on
**every** layer, restricted to ``--units`` evenly spaced units per layer (first and last included), cut into
chunks of ``--chunk`` (2) units, and ``--am-steps`` (16) of the default 128 steps (a step costs the same every
time; the projection scales it to 128). The restriction is the store's list of units still to do: the script
opens the store through a subclass of :class:`~convscope.atlas.store.Atlas` whose ``done`` also lists the units
outside the sample, so those units stay unrecorded (NULL) in the atlas and nothing else in the builder changes.
Per task (a top-k shard, one chunk of top-k pictures, one chunk of activation maximization), the seconds measured
inside the worker are recorded through a wrapper around the builder's executor.

**Fixed and marginal costs.** A worker pays some costs once per layer (the top-k pictures' receptive-field box
table of the layer, found by gradient passes and then shared by every unit; AM's first pass), so a sample's
seconds per unit overstate a full layer's. With two chunks per layer in one process, the second chunk's seconds per
unit are the marginal cost and the first chunk's excess is the layer's fixed cost; the projection charges the fixed
cost once per worker that touches the layer (at most one per 16-unit chunk of the full atlas) and the marginal cost
per unit.

``--config one`` also measures the model's own cost of the same work (as ``atlas_bench.py``): **F** of the scanned
images at the pass's batch (top-k pass), **F+B(input)** per DeconvNet projection at the projections' batch
(top-k pictures), **F+B(input)** of the activation-maximization batch at its size, per step (AM); and F+B(input) of
a full 16-unit chunk, to state what batching a whole layer's units in chunks of 16 changes.

Each run writes ``benchmarks/results/atlas_whole_<config>.json``; ``--report`` prints the tables of
``docs/atlas.md``. The atlas of ``--config one`` is kept in ``out/atlas_lite0_whole/`` (``convscope serve --atlas
out/atlas_lite0_whole``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import convscope.atlas.builder as builder  # noqa: E402
from convscope.atlas.store import Atlas, open_atlas  # noqa: E402
from convscope.core.device import tune_cpu_allocator  # noqa: E402
from convscope.models import load_model  # noqa: E402
from dissect_bench import conv_layers  # noqa: E402
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
RESULTS = HERE / "results"
KEEP = ROOT / "out" / "atlas_lite0_whole"
CONFIGS = {"one": ("local", 1), "local2": ("local", 2), "ray2": ("ray", 2)}
MACHINES = (1, 4, 16, 64)
FULL_CHUNK = 16  # the atlas's default chunk: a layer's units are optimized 16 at a time


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), help="one process, 2 local workers, or local Ray (2 actors)")
    p.add_argument("--units", type=int, default=4, help="units per layer, evenly spaced (default 4)")
    p.add_argument("--am-steps", type=int, default=16,
                   help=f"activation maximization steps measured (default 16; projected to the atlas default "
                        f"{builder.DEFAULT_AM_STEPS})")
    p.add_argument("--chunk", type=int, default=2, help="units per task (default 2: two chunks per layer)")
    p.add_argument("--k", type=int, default=9, help="top activations per unit (default 9)")
    p.add_argument("--out", help="atlas folder (default: out/atlas_lite0_whole for --config one, else a fresh "
                                 "out/atlas_lite0_whole_<config>, removed after the run)")
    p.add_argument("--resume-check", type=float, metavar="S",
                   help="build --units 1 into out/atlas_lite0_resume in a child process, kill -9 it after S "
                        "seconds, rerun it to the end, and compare every unit with out/atlas_lite0_whole")
    p.add_argument("--layers", type=int, help="only the first N conv layers (a smoke test; default all 49)")
    p.add_argument("--resume", action="store_true", help="keep --out's atlas and resume it (default: start afresh)")
    p.add_argument("--results", default=str(RESULTS), help="folder of the result JSONs (default benchmarks/results)")
    p.add_argument("--json", help="result JSON (default RESULTS/atlas_whole_<config>.json)")
    p.add_argument("--no-baselines", action="store_true", help="skip the model's own cost (--config one)")
    p.add_argument("--reference", default=str(KEEP), help="--resume-check compares with this atlas (default "
                                                          "out/atlas_lite0_whole, built by --config one)")
    p.add_argument("--report", action="store_true", help="print the markdown tables from the results JSONs")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the sample and the recording


def evenly(n: int, m: int) -> list[int]:
    """``m`` of the units ``0 .. n-1``, evenly spaced, first and last included."""
    if m >= n:
        return list(range(n))
    if m == 1:
        return [0]
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


class SampledAtlas(Atlas):
    """The atlas store, for a build restricted to ``sample`` (layer -> units): the other units read as done, so the
    builder leaves them out (they stay unrecorded in the store)."""

    sample: dict[str, list[int]] = {}

    def done(self, layer: str, column: str) -> set[int]:
        found = super().done(layer, column)
        if layer not in self.sample:
            return found
        units = self.layer(layer).units
        return found | (set(range(units)) - set(self.sample[layer]))


class Recorder:
    """Wraps the builder's executor: every finished task's stage, layer(s), units and worker seconds."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []
        self.workers = 1
        self.t0 = time.perf_counter()

    def wrap(self, inner: Any) -> Any:
        rec = self

        class Recording:
            workers = inner.workers

            def map(self, fn: Any, tasks: Iterable[Any]) -> Iterator[Any]:
                for task, out, secs in inner.map(fn, tasks):
                    rec.note(task, secs)
                    yield task, out, secs

            def close(self) -> None:
                inner.close()

        self.workers = inner.workers
        return Recording()

    def note(self, task: Any, secs: float) -> None:
        at = time.perf_counter() - self.t0
        if isinstance(task, builder.TopKShard):
            self.tasks.append({"stage": "topk", "layers": len(task.layers), "images": task.stop - task.start,
                               "seconds": secs, "at": at})
        elif isinstance(task, builder.RenderTop | builder.Maximize):
            stage = "top" if isinstance(task, builder.RenderTop) else "am"
            self.tasks.append({"stage": stage, "layer": task.layer, "units": len(task.units), "seconds": secs,
                               "at": at})


class LoadSampler:
    """Cores used by processes outside this process's tree (other people's jobs), sampled from /proc every
    ``every`` seconds, and the busy fraction of each CPU."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.me = every, os.getpid()
        self.others_jiffies = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def procs() -> dict[int, tuple[int, int]]:
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                out[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid, utime + stime
        return out

    @staticmethod
    def cpu_busy() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    v = [int(x) for x in line.split()[1:]]
                    out[line.split()[0]] = (sum(v) - v[3] - v[4], sum(v))
        return out

    def mine(self, procs: dict[int, tuple[int, int]]) -> set[int]:
        tree, grew = {self.me}, True
        while grew:
            more = {p for p, (pp, _) in procs.items() if pp in tree and p not in tree}
            tree |= more
            grew = bool(more)
        return tree

    def run(self) -> None:
        before = self.procs()
        while not self.stop.wait(self.every):
            now = self.procs()
            mine = self.mine(now)
            self.others_jiffies += sum(max(0, t - before[p][1]) for p, (_, t) in now.items()
                                       if p not in mine and p in before)
            before = now

    def __enter__(self) -> LoadSampler:
        self.cpu0, self.t0 = self.cpu_busy(), time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.seconds = time.perf_counter() - self.t0
        cpu1 = self.cpu_busy()
        self.busy = {c: round((cpu1[c][0] - b) / max(1, cpu1[c][1] - t), 3) for c, (b, t) in self.cpu0.items()}
        self.others = round(self.others_jiffies / os.sysconf("SC_CLK_TCK") / self.seconds, 3)


def sampled_build(out: Path, config: str, sample: dict[str, list[int]], k: int, am_steps: int, chunk: int,
                  progress: bool = True) -> tuple[Recorder, float]:
    """The real builder on ``sample``'s layers and units; returns the task record and the wall seconds."""
    executor, workers = CONFIGS[config]
    rec = Recorder()
    make = builder.make_executor
    SampledAtlas.sample = sample
    with mock.patch.object(builder, "Atlas", SampledAtlas), \
            mock.patch.object(builder, "make_executor", lambda *a, **kw: rec.wrap(make(*a, **kw))):
        t0 = time.perf_counter()
        rec.t0 = t0
        atlas = builder.build_atlas(MODEL, list(sample), out, k=k, am_steps=am_steps, executor=executor,
                                    workers=workers, chunk=chunk, progress=progress)
        wall = time.perf_counter() - t0
    atlas.close()
    return rec, wall


# --------------------------------------------------------------------------- the model's own cost


def model_seconds(model: nn.Module, x: torch.Tensor, kind: str) -> float:
    """Median seconds of one call of the bare model doing ``kind`` on ``x`` (no retries: the other core is busy
    with other people's jobs all the time here, waiting for a quiet machine would never end)."""
    with baseline_state(model, kind):
        policy = RepeatPolicy(retries=0)
        return measure_clean(baseline_fn(model, x, kind), policy, synchronizer(x.device), log=log).median


def baselines(model: nn.Module, images: int, rows: int, am_rows: int, am_size: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    native = model.preprocess.input_size
    t = {
        "F": model_seconds(model, torch.randn(min(rows, images), 3, *native, generator=gen), F_),
        "FB": model_seconds(model, torch.randn(rows, 3, *native, generator=gen), FB_INPUT),
        "FB_am": model_seconds(model, torch.randn(am_rows, 3, am_size, am_size, generator=gen), FB_INPUT),
        "FB_am16": model_seconds(model, torch.randn(FULL_CHUNK, 3, am_size, am_size, generator=gen), FB_INPUT),
    }
    return {"F_batch": t["F"], "F_rows": min(rows, images), "FB_batch": t["FB"], "FB_rows": rows,
            "FB_am_batch": t["FB_am"], "am_rows": am_rows, "FB_am16_batch": t["FB_am16"]}


# --------------------------------------------------------------------------- one configuration


def run_config(args: argparse.Namespace) -> int:
    config = args.config
    torch.set_num_threads(1)
    allocator = "tuned" if tune_cpu_allocator() else "default"
    model = load_model(MODEL)
    layers = conv_layers(model)[:args.layers]
    with torch.no_grad():
        from convscope.core.stream import layer_features

        acts = layer_features(model, torch.zeros(1, 3, *model.preprocess.input_size), layers)
    units = {n: int(acts[n].shape[1]) for n in layers}
    sample = {n: evenly(units[n], args.units) for n in layers}
    out = Path(args.out) if args.out else (KEEP if config == "one" else ROOT / "out" / f"atlas_lite0_whole_{config}")
    if out.exists() and not args.resume:
        shutil.rmtree(out)  # a timed run starts from nothing
    log(f"{config}: {len(layers)} layers, {sum(units.values())} units, sample {sum(map(len, sample.values()))} "
        f"units, into {out}")
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", "--",
                             "src/convscope/methods/topk.py", "src/convscope/atlas/builder.py"],
                            capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src/convscope"],
                           capture_output=True, text=True).stdout.split("\n")  # others' uncommitted work measured too
    m = machine_info(torch.device("cpu"), 1, allocator)
    with LoadSampler() as load:
        rec, wall = sampled_build(out, config, sample, args.k, args.am_steps, args.chunk)
    m["loadavg_end"] = machine_info(torch.device("cpu"), 1, allocator)["loadavg_start"]
    atlas = open_atlas(out)
    meta = atlas.meta()
    last = json.loads(meta["last_build"])
    done = {n: {"top": len(atlas.done(n, "top_image")), "am": len(atlas.done(n, "am_image"))} for n in layers}
    atlas.close()
    images = last["stages"].get("topk", {}).get("units", 0)  # 0: a resumed build whose top-k pass was done
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "config": config,
        "executor": CONFIGS[config][0], "workers": last["workers"], "model": MODEL, "head": head,
        "topk_commit": commit, "uncommitted": [d[3:] for d in dirty if d.strip()],
        "settings": {"units_per_layer": args.units, "k": args.k, "am_steps": args.am_steps,
                     "am_size": model.preprocess.input_size[0], "chunk": args.chunk,
                     "batch_rows": int(meta.get("auto_batch_rows", 0)), "images": images},
        "layers": [{"name": n, "units": units[n], "sample": sample[n], "done": done[n]} for n in layers],
        "tasks": rec.tasks, "stages": last["stages"], "wall_phases": last["wall"], "wall_seconds": wall,
        "load": {"others_cores": load.others, "cpu_busy": load.busy, "seconds": load.seconds},
        "machine": m,
    }
    if config == "one" and not args.no_baselines:
        log("measuring the model's own cost of the same work ...")
        result["baselines"] = baselines(model, images, result["settings"]["batch_rows"], args.chunk,
                                        result["settings"]["am_size"])
    path = Path(args.json) if args.json else Path(args.results) / f"atlas_whole_{config}.json"
    atomic_write(path, json.dumps(result, indent=1))
    if config != "one" and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    missing = [n for n in layers if done[n] != {"top": len(sample[n]), "am": len(sample[n])}]
    log(f"{config}: wall {wall:.1f} s, others used {load.others:.2f} cores, CPU busy {load.busy}; wrote {path}"
        + (f"; UNFINISHED layers: {missing}" if missing else ""))
    return 1 if missing else 0


# --------------------------------------------------------------------------- resumability


def resume_check(args: argparse.Namespace) -> int:
    """A 1-unit-per-layer build (unit 0 of every layer, in the sample of --config one) killed with SIGKILL after
    ``S`` seconds, rerun to the end; every unit must equal the same unit of out/atlas_lite0_whole."""
    out = ROOT / "out" / "atlas_lite0_resume"
    shutil.rmtree(out, ignore_errors=True)
    results = Path(args.results)
    cmd = [sys.executable, __file__, "--config", "one", "--units", "1", "--am-steps", str(args.am_steps),
           "--k", str(args.k), "--chunk", "1", "--out", str(out), "--resume", "--no-baselines",
           "--json", str(results / "atlas_whole_resume_run.json")]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    child = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    time.sleep(args.resume_check)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    a = open_atlas(out)
    before = {n.name: (len(a.done(n.name, "top_image")), len(a.done(n.name, "am_image"))) for n in a.layers()}
    shards = len(a.blob_keys("topk/"))
    a.close()
    log(f"killed after {args.resume_check:.0f} s: {sum(t for t, _ in before.values())} top-k pictures and "
        f"{sum(m for _, m in before.values())} AM images recorded, {shards} top-k shard blobs")
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode
    again = time.perf_counter() - t0
    rerun = json.loads((results / "atlas_whole_resume_run.json").read_text())["stages"] if rc == 0 else {}
    redone = {stage: int(v["units"]) for stage, v in rerun.items()}  # what the rerun computed (the rest was kept)
    resumed, ref = open_atlas(out), open_atlas(args.reference)
    worst, same_top, n = 0.0, True, 0
    for layer in resumed.layers():
        for u in sorted(resumed.done(layer.name, "am_image") | resumed.done(layer.name, "top_image")):
            r, s = resumed.unit(layer.name, u), ref.unit(layer.name, u)
            same_top &= r.top == s.top and r.max_activation == s.max_activation
            worst = max(worst, abs((r.am_activation or 0) - (s.am_activation or 0)) / max(1e-12, abs(s.am_activation
                                                                                                    or 0)))
            n += 1
    resumed.close()
    ref.close()
    out_json = {"killed_after_s": args.resume_check, "recorded_before": before, "shards_before": shards,
                "resume_seconds": again, "rc": rc, "redone": redone, "units_compared": n,
                "top_lists_identical": same_top, "am_activation_max_rel_diff": worst}
    atomic_write(results / "atlas_whole_resume.json", json.dumps(out_json, indent=1))
    log(f"resumed in {again:.0f} s (rc {rc}), computing only {redone}; {n} units against {args.reference}: "
        f"top-k lists identical: {same_top}, AM activation max relative difference {worst:.2e}")
    return 0 if rc == 0 and same_top and worst < 1e-4 and n == len(before) else 1


# --------------------------------------------------------------------------- the report


def group_of(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def layer_costs(r: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per layer and stage (``top``, ``am``): ``(fixed, marginal)`` seconds, from a one-process run with at least two
    chunks per layer: the later chunks' seconds per unit are the marginal cost, the first chunk's excess over them
    is what the worker pays once per layer."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for L in r["layers"]:
        out[L["name"]] = {}
        for stage in ("top", "am"):
            ts = [t for t in r["tasks"] if t["stage"] == stage and t.get("layer") == L["name"]]
            rest = ts[1:] or ts
            m = sum(t["seconds"] for t in rest) / sum(t["units"] for t in rest)
            out[L["name"]][stage] = (max(0.0, ts[0]["seconds"] - m * ts[0]["units"]) if ts[1:] else 0.0, m)
    return out


def work_seconds(costs: dict[str, dict[str, tuple[float, float]]], layers: list[dict[str, Any]], processes: int,
                 am_scale: float, units_key: str = "units", chunk: int = FULL_CHUNK) -> float:
    """Seconds of task work (summed over processes) for every unit (``units_key="units"``) or the sample
    (``"sample"``) of every layer: a layer's fixed cost once per process that gets one of its chunks (at most
    ``processes``), the marginal cost per unit (AM's scaled to the projected steps)."""
    total = 0.0
    for L in layers:
        n = L["units"] if units_key == "units" else len(L["sample"])
        touched = min(processes, math.ceil(n / chunk))
        for stage, scale in (("top", 1.0), ("am", am_scale)):
            fixed, marginal = costs[L["name"]][stage]
            total += touched * fixed + n * marginal * scale
    return total


def report(results: Path) -> int:
    runs = {c: json.loads((results / f"atlas_whole_{c}.json").read_text()) for c in CONFIGS
            if (results / f"atlas_whole_{c}.json").is_file()}
    if "one" not in runs or "baselines" not in runs["one"]:
        log("run --config one first")
        return 1
    one = runs["one"]
    b, s = one["baselines"], one["settings"]
    scale = builder.DEFAULT_AM_STEPS / s["am_steps"]
    f_img = b["F_batch"] / b["F_rows"]
    fb_row = b["FB_batch"] / b["FB_rows"]
    fb_am_row = b["FB_am_batch"] / b["am_rows"]
    rows_k = min(s["k"], s["images"])
    costs = layer_costs(one)
    topk = sum(t["seconds"] for t in one["tasks"] if t["stage"] == "topk")
    groups: dict[str, dict[str, float]] = {}
    for L in one["layers"]:
        g = groups.setdefault(group_of(L["name"]), dict.fromkeys(("layers", "units", "tf", "tm", "af", "am"), 0.0))
        (tf, tm), (af, am) = costs[L["name"]]["top"], costs[L["name"]]["am"]
        g["layers"] += 1
        g["units"] += L["units"]
        g["tf"] += tf
        g["tm"] += tm * L["units"]
        g["af"] += af
        g["am"] += am * scale * L["units"]
    total = {key: sum(g[key] for g in groups.values()) for key in ("layers", "units", "tf", "tm", "af", "am")}
    body = []
    for name, g in [*groups.items(), ("**all**", total)]:
        u = g["units"]
        body.append([name, int(g["layers"]), int(u), f"{g['tf']:.1f}", f"{g['tm'] / u:.2f}",
                     fmt_ratio(g["tm"] / u / (rows_k * fb_row)), f"{g['am'] / u:.2f}",
                     fmt_ratio(g["am"] / u / (builder.DEFAULT_AM_STEPS * fb_am_row)),
                     f"{(g['tf'] + g['tm'] + g['af'] + g['am']) / 3600:.2f}"])
    sampled = sum(len(L["sample"]) for L in one["layers"])
    print(f"Sample: {s['units_per_layer']} units per layer ({sampled} units) in chunks of {s['chunk']}, k={s['k']} "
          f"over {s['images']} images ({rows_k} projections per unit), AM {s['am_steps']} steps at {s['am_size']} px "
          f"(projected to {builder.DEFAULT_AM_STEPS}), one process, 1 thread; measured {one['date']} at HEAD "
          f"{one['head']} (top-k code: {one['topk_commit']}; uncommitted then: "
          f"{', '.join(one.get('uncommitted', [])) or 'nothing'})\n")
    print(md_table(["layer group", "conv layers", "units", "top-k pictures: fixed s per layer (sum)",
                    "marginal s/unit", "× F+B(input) per projection", f"AM s/unit ({builder.DEFAULT_AM_STEPS} steps)",
                    "× F+B(input) per row-step", "hours, 1 process"], body))
    work1 = work_seconds(costs, one["layers"], 1, scale) + topk
    model_s = total["units"] * (rows_k * fb_row + builder.DEFAULT_AM_STEPS * fb_am_row) + s["images"] * f_img
    print(f"\ntop-k pass (all 49 layers, {s['images']} images, one task): {topk:.1f} s = "
          f"{fmt_ratio(topk / (s['images'] * f_img))} F of the same images. Whole atlas, one process: "
          f"{work1 / 3600:.1f} h against the model's own {model_s / 3600:.1f} h of the same work: "
          f"{fmt_ratio(work1 / model_s)}")
    print(f"baselines: F {f_img * 1e3:.1f} ms/img (batch {b['F_rows']}), F+B(input) {fb_row * 1e3:.1f} ms/row "
          f"(batch {b['FB_rows']}); AM-size F+B(input) {fb_am_row * 1e3:.1f} ms/row at batch {b['am_rows']}, "
          f"{b['FB_am16_batch'] / FULL_CHUNK * 1e3:.1f} ms/row at batch {FULL_CHUNK}")
    cfg_rows, proj_rows = [], []
    for c, r in runs.items():
        w = r["workers"]
        expected = work_seconds(costs, r["layers"], w, 1.0, "sample", r["settings"]["chunk"])
        per_worker = expected / (w * r["wall_phases"]["units"])  # throughput of a worker relative to a lone process
        cfg_rows.append([c, f"{r['executor']}, {w} worker(s)", sum(len(L["sample"]) for L in r["layers"]),
                         f"{r['wall_seconds']:.0f}", f"{r['wall_phases']['topk']:.0f}",
                         f"{r['wall_phases']['units']:.0f}", f"{per_worker:.2f}", f"{r['load']['others_cores']:.2f}",
                         " / ".join(f"{v:.2f}" for v in r["load"]["cpu_busy"].values()), r["head"]])
        for label, each in [(c, w)] + ([("one (its per-core throughput on 2 dedicated cores)", 2)] if w == 1 else []):
            hours = [(work_seconds(costs, one["layers"], n * each, scale) / (n * each * per_worker) + topk) / 3600
                     for n in MACHINES]
            proj_rows.append([label, f"{each}"] + [f"{h:.2f}" for h in hours])
    print()
    print(md_table(["config", "executor", "sampled units", "wall s", "top-k pass s", "unit phase s",
                    "per-worker throughput (× one process)", "other jobs (cores)", "CPU busy (cpu0 / cpu1)",
                    "commit"], cfg_rows))
    print()
    print(md_table(["throughput of", "workers per machine"]
                   + [f"{n} machine{'s' if n > 1 else ''} (h)" for n in MACHINES], proj_rows))
    print(f"\n{describe_machine(one['machine'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(Path(args.results))
    if args.resume_check is not None:
        return resume_check(args)
    if not args.config:
        log("give --config one|local2|ray2, --resume-check S or --report")
        return 2
    return run_config(args)


if __name__ == "__main__":
    sys.exit(main())
