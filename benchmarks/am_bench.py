#!/usr/bin/env python
"""Activation maximization: the cost of one step against the model's own forward + backward, and the quality
reached per step (issue 21, item 3).

    python benchmarks/am_bench.py            # 64 units of blocks.10, 128 px; quality at 64, 128 and 512 steps
    python benchmarks/am_bench.py --quick    # 8 units; quality at 64 steps

Run it pinned to one core (``taskset -c 1 env OMP_NUM_THREADS=1``). Not part of the test suite.

* **Step cost**: ``cs.activation_maximization`` of ``units`` channels of ``blocks.10`` of efficientnet_lite0 at
  128 px in one batch, the default preset (``yosinski``: decay, blur every 4 steps, norm and contribution clipping,
  jitter, random scale; Adam). One step is ``(T(1 + S) - T(1)) / S`` (set-up and the final forward cancel; S = 8
  covers two blurs, the preset's one in four). Divided by the pixel-matched **F+B(input)**: the whole model's
  forward and the gradient of the summed top logit w.r.t. a ``units x 3 x 128 x 128`` input, parameters frozen
  (``harness.baseline_fn``). Also divided by F+B to the layer (forward stopped after ``blocks.10``, gradient of
  the channel means w.r.t. the input: what a step cannot avoid), which shows the step's own overhead. A warm-up,
  then 3 interleaved rounds; the median of the per-round ratios. Both wall-clock and process CPU time (one thread:
  the CPU time is the one that stays meaningful on a shared core).
* **Quality per step**: each unit's activation on its image after 64, 128 and 512 steps, as a fraction of that
  unit's maximum over a dataset: the bundled photos and 200 synthetic scenes at 224 px, the per-unit spatial
  maximum of the channel of ``blocks.10``. Two numerators: the channel mean (what the objective ascends) and the
  spatial maximum (the dataset's own statistic), on the final image without transforms, at 128 px. The median
  (and quartiles) over the units. The checkpoints come from one run (``optimize_images(callback=...)`` built from
  the same pieces as ``activation_maximization``; checked equal to it on 2 steps).
* **Lucent** (when ``lucent`` imports, with the torchvision shim of ``peers.py``): its ``render_vis`` of the same
  units, Lucent's defaults (decorrelated Fourier image of 128 px, its standard transforms, Adam 0.05, upsampled to
  224 px before the model), all units in one batch (one channel objective per image), the model's own
  normalization instead of Lucent's ImageNet one; its images scored the way Lucent feeds them (upsampled to 224).
  ``--quick``: Lucent runs as many steps as ours (64).

Writes ``benchmarks/results/am.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import convscope as cs  # noqa: E402
from convscope.core.model import model_preprocess  # noqa: E402
from convscope.core.optim import ImageParam, make_generators, make_param, optimize_images  # noqa: E402
from convscope.core.probe import probe  # noqa: E402
from convscope.core.stream import stream_layers  # noqa: E402
from convscope.methods.maximize import DEFAULT_LR, PRESETS, channel  # noqa: E402
from harness import (  # noqa: E402
    FB_INPUT,
    atomic_write,
    baseline_fn,
    baseline_state,
    describe_machine,
    load_average,
    machine_info,
)

MODEL = "efficientnet_lite0"
LAYER = "blocks.10"
SIZE = 128
DATA_SIZE = 224
SYNTHETIC = 200
LATER = ("blocks.11", "head", "classifier")  # modules after blocks.10: a step must never run them


def clocks(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def am_call(model: nn.Module, units: list[int], steps: int) -> Callable[[], Any]:
    return lambda: cs.activation_maximization(model, LAYER, units, steps=steps, size=SIZE, batch_size=len(units),
                                              progress=False)


def fb_to_layer(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """Forward stopped after the layer, gradient of the summed channel means w.r.t. the input (frozen weights)."""
    xi = x.detach().clone().requires_grad_(True)

    def run() -> None:
        with probe(model, LAYER, stop_after=LAYER) as p:
            p.forward(model, xi)
            torch.autograd.grad(p.activations[LAYER].mean((2, 3)).sum(), xi)
    return run


def check_forward_stops(model: nn.Module, units: list[int]) -> dict[str, int]:
    """Calls of the modules after the layer during a 1-step and a 3-step run: equal when no step runs past it."""
    mods = dict(model.named_modules())
    counts = {name: 0 for name in LATER if name in mods}

    def counter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            counts[name] += 1
        return hook

    handles = [mods[n].register_forward_hook(counter(n)) for n in counts]
    try:
        am_call(model, units, 1)()
        one = dict(counts)
        am_call(model, units, 3)()
    finally:
        for h in handles:
            h.remove()
    extra = {n: counts[n] - 2 * one[n] for n in counts}
    if any(extra.values()):
        raise SystemExit(f"the forward ran past {LAYER} during the steps: {extra}")
    return extra


def step_cost(model: nn.Module, units: list[int], s: int, rounds: int) -> dict[str, Any]:
    x = torch.randn(len(units), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with baseline_state(model, FB_INPUT):
        fns = {"F+B(input)": baseline_fn(model, x, FB_INPUT), "F+B to layer": fb_to_layer(model, x),
               "AM 1 step": am_call(model, units, 1), f"AM {1 + s} steps": am_call(model, units, 1 + s)}
        for fn in fns.values():  # warm-up
            fn()
        per_round = []
        for r in range(rounds):
            t = {k: clocks(fn) for k, fn in fns.items()}
            row: dict[str, Any] = {}
            for i, clock in enumerate(("wall", "cpu")):
                step = (t[f"AM {1 + s} steps"][i] - t["AM 1 step"][i]) / s
                row[clock] = {"am_step_s": step, "fb_s": t["F+B(input)"][i], "fb_layer_s": t["F+B to layer"][i],
                              "ratio": step / t["F+B(input)"][i], "ratio_layer": step / t["F+B to layer"][i]}
            per_round.append(row)
            print(f"  round {r}: AM step {row['cpu']['am_step_s'] * 1e3:.0f} ms CPU "
                  f"({row['wall']['am_step_s'] * 1e3:.0f} wall), F+B(input) {row['cpu']['fb_s'] * 1e3:.0f} ms CPU, "
                  f"F+B to layer {row['cpu']['fb_layer_s'] * 1e3:.0f} ms CPU: x{row['cpu']['ratio']:.3f} "
                  f"(x{row['cpu']['ratio_layer']:.3f} of F+B to layer)", flush=True)
    med = {clock: {k: statistics.median(r[clock][k] for r in per_round) for k in per_round[0][clock]}
           for clock in ("wall", "cpu")}
    return {"rounds": per_round, "median": med, "steps_differenced": s}


# --------------------------------------------------------------------------------------------- quality


def dataset_max(model: nn.Module) -> tuple[torch.Tensor, int]:
    """Per-unit maximum over the dataset of the spatial maximum of each channel of the layer, and the image count."""
    from convscope.applications.deconv import default_images
    from convscope.data.synthetic import render_arrays

    photos = default_images(model, progress=False)
    x_photos = photos.load(list(range(len(photos.names))))
    synth = render_arrays(0, SYNTHETIC, size=DATA_SIZE, progress=False).images
    rgb = torch.from_numpy(synth).permute(0, 3, 1, 2).float() / 255
    x = torch.cat([x_photos, model_preprocess(model).normalize(rgb)])
    best = None
    for _, acts in stream_layers(model, x, [LAYER], batch_size=16, progress=False,
                                 reduce=lambda _, a: a.amax((2, 3))):
        m = acts[LAYER]
        assert isinstance(m, torch.Tensor)
        m = m.amax(0)
        best = m if best is None else torch.maximum(best, m)
    assert best is not None
    return best, len(x)


def unit_scores(model: nn.Module, x: torch.Tensor, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and spatial maximum of unit ``units[i]`` on image i (model input space)."""
    with torch.no_grad(), probe(model, LAYER, stop_after=LAYER, detach=True) as p:
        p.forward(model, x)
        a = p.activations[LAYER][torch.arange(len(units)), torch.tensor(units)]
    return a.mean((1, 2)), a.amax((1, 2))


def fractions(mean: torch.Tensor, peak: torch.Tensor, dmax: torch.Tensor, units: list[int]) -> dict[str, Any]:
    ref = dmax[torch.tensor(units)]
    out: dict[str, Any] = {}
    for name, v in (("mean", mean), ("max", peak)):
        f = (v / ref).double()
        q = torch.quantile(f, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        out[name] = {"median": q[1], "q25": q[0], "q75": q[2], "per_unit": f.tolist()}
    return out


def am_checkpoints(model: nn.Module, units: list[int], checkpoints: list[int]) -> dict[int, torch.Tensor]:
    """The images (input space) after each checkpoint of one run with activation_maximization's defaults."""
    pre = model_preprocess(model)
    n = len(units)

    def run(steps: int, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        gens = make_generators(0, n)
        param = make_param("pixel", "noise", n, (SIZE, SIZE), pre, gens, torch.zeros(()))

        def callback(k: int, p: ImageParam) -> None:
            if k in checkpoints:
                keep[k] = p().detach().clone()
        return optimize_images(model, channel(LAYER, units), param, steps=steps, lr=DEFAULT_LR["pixel"],
                               regularization=PRESETS["yosinski"], generators=gens, callback=callback,
                               progress=False).x

    ref = cs.activation_maximization(model, LAYER, units, steps=2, size=SIZE, batch_size=n, progress=False)
    if not torch.equal(run(2, {}), ref.x):
        raise SystemExit("the benchmark's optimize_images call no longer matches activation_maximization's defaults")
    keep: dict[int, torch.Tensor] = {}
    run(max(checkpoints), keep)
    return keep


def lucent_checkpoints(model: nn.Module, units: list[int], checkpoints: list[int]) -> dict[int, torch.Tensor] | str:
    """Lucent's render of the units (one batch), as the model's inputs Lucent feeds (upsampled to 224), or why not."""
    from peers import enable_shims

    enable_shims()
    try:
        from lucent.optvis import objectives, param, render, transform
    except Exception as exc:  # lucent is optional
        return f"not runnable here: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    import copy

    pre = model_preprocess(model)
    m = copy.deepcopy(model).eval().requires_grad_(False)  # lucent hooks every module and never removes the hooks
    obj = functools.reduce(operator.add, [objectives.channel(LAYER.replace(".", "_"), u, batch=i)
                                          for i, u in enumerate(units)])
    torch.manual_seed(0)
    images = render.render_vis(m, obj, param_f=lambda: param.image(SIZE, batch=len(units)),
                               transforms=[*transform.standard_transforms, pre.normalize], preprocess=False,
                               thresholds=tuple(checkpoints), show_image=False, progress=False)
    out = {}
    for k, img in zip(checkpoints, images):
        rgb = torch.from_numpy(img).permute(0, 3, 1, 2).float()
        out[k] = pre.normalize(F.interpolate(rgb, size=224, mode="bilinear", align_corners=True))
    return out


def quality(model: nn.Module, units: list[int], checkpoints: list[int], lucent: bool) -> dict[str, Any]:
    t0 = time.process_time()
    dmax, n_images = dataset_max(model)
    print(f"  dataset: {n_images} images, per-unit maxima median {float(dmax.median()):.3g} "
          f"({time.process_time() - t0:.0f} s CPU)", flush=True)
    out: dict[str, Any] = {"dataset_images": n_images, "checkpoints": checkpoints}
    t0 = time.process_time()
    ours = am_checkpoints(model, units, checkpoints)
    out["convscope"] = {k: fractions(*unit_scores(model, x, units), dmax, units) for k, x in ours.items()}
    out["convscope_cpu_s"] = time.process_time() - t0
    print(f"  convscope: {max(checkpoints)} steps, {out['convscope_cpu_s']:.0f} s CPU; median fraction (mean, max) "
          + ", ".join(f"{k}: {v['mean']['median']:.2f}, {v['max']['median']:.2f}" for k, v in out["convscope"].items()),
          flush=True)
    if lucent:
        t0 = time.process_time()
        luc = lucent_checkpoints(model, units, checkpoints)
        if isinstance(luc, str):
            out["lucent"] = luc
        else:
            out["lucent"] = {k: fractions(*unit_scores(model, x, units), dmax, units) for k, x in luc.items()}
            out["lucent_cpu_s"] = time.process_time() - t0
            print(f"  lucent: {max(checkpoints)} steps, {out['lucent_cpu_s']:.0f} s CPU", flush=True)
    return out


def tables(res: dict[str, Any]) -> str:
    lines = []
    if "timing" in res:
        t = res["timing"]["median"]
        n = res["units"]
        lines += [f"| clock | AM step ms | F+B(input) b{n} {SIZE}px ms | × F+B(input) | F+B to {LAYER} ms "
                  "| × F+B to layer |", "|---|---|---|---|---|---|"]
        for clock in ("cpu", "wall"):
            c = t[clock]
            lines.append(f"| {clock} | {c['am_step_s'] * 1e3:.0f} | {c['fb_s'] * 1e3:.0f} | **{c['ratio']:.2f}×** "
                         f"| {c['fb_layer_s'] * 1e3:.0f} | {c['ratio_layer']:.2f}× |")
        lines.append("")
    if "quality" in res:
        q = res["quality"]
        lines += ["| tool | steps | mean / dataset max (median [q25, q75]) | spatial max / dataset max |",
                  "|---|---|---|---|"]
        for tool in ("convscope", "lucent"):
            rows = q.get(tool)
            if isinstance(rows, str):
                lines.append(f"| {tool} | - | {rows} | |")
                continue
            for k, v in (rows or {}).items():
                a, b = v["mean"], v["max"]
                lines.append(f"| {tool} | {k} | {a['median']:.2f} [{a['q25']:.2f}, {a['q75']:.2f}] "
                             f"| {b['median']:.2f} [{b['q25']:.2f}, {b['q75']:.2f}] |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 units, quality at 64 steps only")
    ap.add_argument("--units", type=int, default=None, help="units of blocks.10 (default 64; --quick 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--no-lucent", action="store_true")
    ap.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                    help="tuned: cs.tune_cpu_allocator() first, as benchmarks/run.py and the CLI")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "am.json")
    args = ap.parse_args()
    if args.allocator == "tuned":
        cs.tune_cpu_allocator()
    n = args.units or (8 if args.quick else 64)
    units = list(range(n))
    checkpoints = [64] if args.quick else [64, 128, 512]
    model = cs.load_model(MODEL)
    res: dict[str, Any] = {"machine": machine_info(torch.device("cpu"), torch.get_num_threads(), args.allocator),
                           "units": n, "layer": LAYER, "size": SIZE, "preset": "yosinski"}
    print(describe_machine(res["machine"]), flush=True)
    res["forward_past_layer_calls"] = check_forward_stops(model, units[:2])
    if not args.skip_timing:
        print(f"step cost: {n} units of {LAYER}, {SIZE} px", flush=True)
        res["timing"] = step_cost(model, units, 8, args.rounds)
    if not args.skip_quality:
        print(f"quality at {checkpoints} steps", flush=True)
        res["quality"] = quality(model, units, checkpoints, not args.no_lucent)
    res["machine"]["loadavg_end"] = load_average()
    atomic_write(args.out, json.dumps(res, indent=1))
    print(tables(res))
    print(f"load average {res['machine']['loadavg_start']} -> {res['machine']['loadavg_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
