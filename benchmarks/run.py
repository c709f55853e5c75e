#!/usr/bin/env python
"""Time every registered convscope method (and the peer tools) against the model's own forward/backward cost.

    python benchmarks/run.py                      # full run: 4 zoo models, batches 1 8 32, both allocators
    python benchmarks/run.py --quick              # about 2 min: lite0 + demo_net, fewer repeats, tuned allocator
    python benchmarks/run.py --peers --update-readme   # what benchmarks/README.md shows (always both allocators)

Prints markdown tables of medians and ratios and the machine, writes JSON (``--out``), and with
``--update-readme`` rewrites the generated section of ``benchmarks/README.md``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import convscope as cs  # noqa: E402
from harness import (  # noqa: E402
    FB_INPUT,
    KINDS,
    REGISTRY,
    Baselines,
    Case,
    RepeatPolicy,
    Targets,
    atomic_write,
    describe_machine,
    fmt_ms,
    fmt_ratio,
    load_average,
    machine_info,
    md_table,
    measure_clean,
    model_inputs,
    pearson_per_map,
    speed_probe,
    synchronizer,
    wait_for_quiet,
)

ZOO = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "demo_net")
QUICK_MODELS = ("efficientnet_lite0", "demo_net")
README = HERE / "README.md"
START, END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"
NOISY = 0.3  # other processes' cores above which a row is flagged as disturbed
SHORT = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2",
         "demo_net": "demo_net"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"zoo models (default: {' '.join(ZOO)}; "
                    f"--quick: {' '.join(QUICK_MODELS)})")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="baseline batch sizes")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, lite0 + demo_net, quick cases only")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                    help="time Captum / pytorch-grad-cam / Lucent where importable (default: on for full runs)")
    ap.add_argument("--allocator", choices=["tuned", "default", "both"], default=None,
                    help="tuned: convscope.tune_cpu_allocator() (what the CLI does); default: glibc as is "
                         "(CONVSCOPE_MALLOC=default); both: the whole suite once each, in subprocesses "
                         "(default: both for full runs and --update-readme, tuned for --quick; the peer rows always "
                         "run in the same process, under the same allocator as convscope's)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable CPUs)")
    ap.add_argument("--methods", nargs="+", default=None, help="only cases whose name contains one of these")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                    help="before each model, wait up to S seconds for other processes to leave the CPUs "
                         "(default: 180 for full runs, 20 for --quick)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    ap.add_argument("--update-readme", action="store_true", help=f"rewrite the generated section of {README}")
    ap.add_argument("--install-peers", action="store_true",
                    help="pip install --no-deps -r benchmarks/requirements-peers.txt into this venv first")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else ZOO)
    if args.peers is None:
        args.peers = not args.quick
    if args.allocator is None:
        args.allocator = "tuned" if args.quick and not args.update_readme else "both"
    if args.update_readme and args.allocator != "both":
        ap.error("the published table shows what Python users (glibc defaults) and CLI users (tuned) each get; "
                 "drop --allocator or pass --allocator both with --update-readme")
    if args.wait_quiet is None:
        args.wait_quiet = 20.0 if args.quick else 180.0
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(ZOO)}")
    return args


# --------------------------------------------------------------------------------------------- one suite


def apply_allocator(policy: str) -> str:
    """Apply the allocator policy in this process; return what is in force, in words."""
    if "GLIBC_TUNABLES" in os.environ:
        return f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} (from the environment)"
    if policy == "tuned":
        if cs.tune_cpu_allocator():
            return "tuned (convscope.tune_cpu_allocator: mallopt mmap/trim thresholds raised)"
        return "default glibc (tune_cpu_allocator declined: CONVSCOPE_MALLOC=default or not glibc)"
    return "default glibc malloc (CONVSCOPE_MALLOC=default)"


def select_cases(args: argparse.Namespace, registry: list[Case]) -> list[Case]:
    out = [c for c in registry if c.model in args.models and (c.quick or not args.quick)]
    if args.methods:
        out = [c for c in out if any(m in c.name for m in args.methods)]
    return out


def case_targets(model: torch.nn.Module, x: torch.Tensor, k: int) -> Targets:
    with torch.no_grad(), cs.preserved_state(model):
        out = model(x)
    flat = out.reshape(out.shape[0], -1)
    idx = flat.topk(min(k, flat.shape[1]), dim=1).indices  # a case with more "targets" than classes (units) wraps
    return Targets(idx.repeat(1, -(-k // idx.shape[1]))[:, :k])


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    allocator = apply_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    device = cs.resolve_device(args.device)
    sync = synchronizer(device)
    policy = RepeatPolicy.quick() if args.quick else RepeatPolicy()
    machine = machine_info(device, torch.get_num_threads(), allocator)
    log(f"machine: {describe_machine(machine)}")

    import cases  # noqa: F401  (registers the convscope methods)

    registry = list(REGISTRY)
    peer_status: dict[str, str] = {}
    if args.peers:
        import peers

        peer_status = peers.peer_status()
        for tool, st in peer_status.items():
            log(f"peer {tool}: {st}")
        peers.register_peers(registry, peer_status)
    chosen = select_cases(args, registry)

    models: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    quiet: dict[str, Any] = {}
    for name in args.models:
        log(f"== {name}")
        if args.wait_quiet > 0:
            quiet[name] = wait_for_quiet(args.wait_quiet, log=log)
        probe_before = speed_probe()
        model = cs.load_model(name, device=device)
        size = tuple(model.preprocess.input_size)
        cache: dict[int, torch.Tensor] = {}

        def inputs(b: int, model: torch.nn.Module = model, cache: dict = cache) -> torch.Tensor:
            if b not in cache:
                cache[b] = model_inputs(model, b).to(device)
            return cache[b]

        bl = Baselines(name, model, inputs, policy, sync, log=log)
        for b in args.batches:
            for kind in KINDS:
                t = bl.measure(kind, b)
                log(f"  {kind:11s} b{b:<3d} {_tline(t, b)}" if t else f"  {kind} b{b}: {bl.errors[(kind, b)]}")
        mine = [c for c in chosen if c.model == name]
        maps_cache: dict[tuple[str, int, int], Any] = {}
        rows = [run_case(c, model, inputs, bl, policy, sync, registry, maps_cache) for c in mine]
        # measure the paired baselines again after the cases and pool the samples: both sides of the ratio
        # then saw the same stretch of machine time
        for kind, b in sorted({(c.work, c.shape.maps) for c in mine}, key=lambda kb: (KINDS.index(kb[0]), kb[1])):
            t = bl.measure(kind, b)
            log(f"  again {kind:11s} b{b:<3d} {_tline(t, b)}" if t else f"  again {kind} b{b}: failed")
        for c, row in zip(mine, rows):
            finish_row(c, row, bl, rows, mine)
        results.extend(rows)
        probe_ms = [probe_before * 1e3, speed_probe() * 1e3]
        log(f"  matmul speed probe before/after: {probe_ms[0]:.2f} / {probe_ms[1]:.2f} ms")
        models[name] = {"input_size": list(size), "quiet_before": quiet.get(name), "speed_probe_ms": probe_ms,
                        **bl.to_json()}
        del model, bl, cache, maps_cache
        gc.collect()
    machine["loadavg_end"] = load_average()
    return {"allocator_policy": args.allocator, "machine": machine, "peers": peer_status, "models": models,
            "cases": results, "quick": args.quick, "batches": args.batches, "wall_s": time.perf_counter() - t_start,
            "repeat_policy": dataclasses.asdict(policy)}


def _tline(t: Any, b: int) -> str:
    return (f"{fmt_ms(t.median)} ms [{t.iqr_rel:.0%}] ({fmt_ms(t.median / b)} ms/img, {len(t.samples)} reps, "
            f"util {t.util:.2f}, others {t.others:.2f}, faults/call {t.faults_per_call:.0f})")


def _maps_key(name: str, c: Case) -> tuple[str, int, int]:
    return (name, c.shape.images, c.shape.targets)


def run_case(c: Case, model: torch.nn.Module, inputs: Any, bl: Baselines, policy: RepeatPolicy, sync: Any,
             registry: list[Case], maps_cache: dict) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": c.key, "name": c.name, "tool": c.tool, "model": c.model, "shape": c.shape.label,
        "images": c.shape.images, "targets": c.shape.targets, "maps": c.shape.maps, "work": c.work,
        "per_call": c.per_call, "unit": c.unit, "note": c.note, "timing": None, "error": None,
        "agreement": None, "check": None,
    }
    x = inputs(c.shape.images)
    targets = case_targets(model, x, c.shape.targets)
    ctx = None
    first: list[Any] = []
    try:
        ctx = c.setup(model) if c.setup else model
        t = measure_clean(lambda: c.fn(ctx, x, targets), policy, sync, on_first=first.append, log=log)
        row["timing"] = t.to_json()
        log(f"  {c.tool}: {c.name} [{c.shape.label}] {_tline(t, c.shape.maps)}")
        if c.tool == "convscope" and isinstance(first[0], torch.Tensor):
            maps_cache[_maps_key(c.name, c)] = first[0].detach().cpu()
        if c.agree_with:
            row["agreement"] = agreement(c, first[0], model, x, targets, registry, maps_cache)
            log(f"    agreement with {c.agree_with}: {row['agreement']}")
        if c.check:
            row["check"] = c.check(ctx, x, targets)
            log(f"    {row['check']}")
    except Exception as exc:  # a failing method is reported in its row; the suite goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log(f"  {c.tool}: {c.name} [{c.shape.label}] FAILED {row['error']}")
    finally:
        first.clear()
        if c.teardown and ctx is not None:
            c.teardown(ctx)
        gc.collect()
    return row


def agreement(c: Case, theirs: Any, model: torch.nn.Module, x: torch.Tensor, targets: Targets,
              registry: list[Case], maps_cache: dict) -> dict[str, Any]:
    key = _maps_key(c.agree_with, c)
    if key not in maps_cache:
        ours = [r for r in registry if r.tool == "convscope" and r.name == c.agree_with and r.model == c.model
                and (r.shape.images, r.shape.targets) == (c.shape.images, c.shape.targets)]
        if not ours:
            return {"with": c.agree_with, "status": "ours not implemented yet"}
        maps_cache[key] = ours[0].fn(model, x, targets).detach().cpu()
    try:
        r = pearson_per_map(theirs, maps_cache[key])
    except ValueError as exc:
        return {"with": c.agree_with, "status": f"not comparable: {exc}"}
    return {"with": c.agree_with, "median_r": statistics.median(r), "min_r": min(r), "maps": len(r)}


def finish_row(c: Case, row: dict[str, Any], bl: Baselines, rows: list[dict], cases: list[Case]) -> None:
    """Ratios, once the paired baselines are pooled (measured before and after the cases)."""
    if row["timing"] is None:
        return
    med = row["timing"]["median_ms"] / 1e3
    base = bl.timings.get((c.work, c.shape.maps))
    row["paired"] = {"kind": c.work, "batch": c.shape.maps, "median_ms": base.median * 1e3 if base else None,
                     "first_median_ms": bl.first.get((c.work, c.shape.maps), math.nan) * 1e3}
    row["ratio_paired"] = med / (c.per_call * base.median) if base else None
    lim = bl.limit(c.work)
    row["limit"] = {"kind": c.work, "per_image_ms": lim[0] * 1e3, "batch": lim[1]} if lim else None
    row["ratio_limit"] = med / (c.per_call * c.shape.maps * lim[0]) if lim else None
    row["per_unit_ms"] = med * 1e3 / (c.per_call if c.per_call > 1 else c.shape.maps)
    if c.tool != "convscope" and c.agree_with:
        ours = [r for r, oc in zip(rows, cases) if oc.tool == "convscope" and oc.name == c.agree_with
                and (oc.shape.images, oc.shape.targets) == (c.shape.images, c.shape.targets) and r["timing"]]
        row["vs_ours"] = med / (ours[0]["timing"]["median_ms"] / 1e3) if ours else None


# --------------------------------------------------------------------------------------------- reports


def _cell(d: dict | None, key: str = "median_ms") -> str:
    return fmt_ms(d[key] / 1e3) if d and d.get(key) is not None else "—"


def _iqr(d: dict | None) -> str:
    return f" [{d['iqr_rel']:.0%}]" if d and math.isfinite(d.get("iqr_rel", math.nan)) else ""


def baseline_table(run: dict[str, Any]) -> str:
    rows = []
    for name, m in run["models"].items():
        size = "×".join(str(v) for v in m["input_size"])
        batches = sorted({int(b) for k in KINDS for b in m["rows"][k]})
        for b in batches:
            cells = [m["rows"][k].get(str(b)) for k in KINDS]
            others = [c["others"] for c in cells if c and math.isfinite(c["others"])]
            rows.append([SHORT[name], size, b]
                        + [f"{_cell(c)}{_iqr(c)}" for c in cells]
                        + [_cell(c, "per_image_ms") for c in cells]
                        + [_others(max(others)) if others else "—"])
    header = ["model", "input", "batch", "F ms", "F+B(input) ms", "F+B(all) ms", "F /img", "F+B(input) /img",
              "F+B(all) /img", "others"]
    return md_table(header, rows)


def limit_table(run: dict[str, Any]) -> str:
    rows = []
    for name, m in run["models"].items():
        cells = []
        for k in KINDS:
            lim = m["limit"].get(k)
            cells.append(f"{fmt_ms(lim['per_image_ms'] / 1e3)} ms (b{lim['batch']})" if lim else "—")
        rows.append([SHORT[name], *cells])
    return md_table(["model", "F per image", "F+B(input) per image", "F+B(all) per image"], rows)


def allocator_table(runs: list[dict[str, Any]]) -> str | None:
    by = {r["allocator_policy"]: r for r in runs}
    if not {"tuned", "default"} <= set(by):
        return None
    rows = []
    for name, mt in by["tuned"]["models"].items():
        md = by["default"]["models"].get(name)
        if not md:
            continue
        for b in sorted(int(v) for v in mt["rows"][FB_INPUT]):
            t, d = mt["rows"][FB_INPUT].get(str(b)), md["rows"][FB_INPUT].get(str(b))
            tf, df = mt["rows"]["F"].get(str(b)), md["rows"]["F"].get(str(b))
            if not (t and d):
                continue
            rows.append([SHORT[name], b, _cell(tf, "per_image_ms"), _cell(df, "per_image_ms"),
                         _cell(t, "per_image_ms"), _cell(d, "per_image_ms"),
                         fmt_ratio(d["median_ms"] / t["median_ms"]),
                         f"{t['faults_per_call']:.0f}", f"{d['faults_per_call']:.0f}"])
    return md_table(["model", "batch", "F /img tuned", "F /img default", "F+B(input) /img tuned",
                     "F+B(input) /img default", "default ÷ tuned (F+B(input))", "page faults/call tuned",
                     "default"], rows)


def cases_table(run: dict[str, Any], tools: str) -> str | None:
    sel = [r for r in run["cases"] if (r["tool"] == "convscope") == (tools == "convscope")]
    if not sel:
        return None
    rows = []
    for r in sel:
        name = r["name"] if tools == "convscope" else f"{r['tool']}: {r['name']}"
        if r["error"] or not r["timing"]:
            rows.append([name, SHORT[r["model"]], r["shape"], f"error: {r['error']}", *["—"] * (6 if tools ==
                         "convscope" else 8)])
            continue
        t = r["timing"]
        paired = r.get("paired") or {}
        base = f"{r['work']} b{paired.get('batch')}" + (f" ×{r['per_call']}" if r["per_call"] > 1 else "")
        unit = "/step" if r["unit"] == "step" else "/map"
        row = [name, SHORT[r["model"]], r["shape"], f"{_cell(t)}{_iqr(t)}",
               f"{fmt_ms(r['per_unit_ms'] / 1e3)} {unit}", base, fmt_ratio(r.get("ratio_paired")),
               fmt_ratio(r.get("ratio_limit")), _others(t["others"])]
        if tools != "convscope":
            row.insert(8, fmt_ratio(r.get("vs_ours")))
            row.insert(9, _agreement_cell(r))
        rows.append(row)
    header = ["method", "model", "case", "median ms [IQR]", "per unit", "paired baseline", "× paired",
              "× limit", "others"]
    if tools != "convscope":
        header[0] = "tool: method"
        header[8:8] = ["× ours", "agrees with ours (r median / min)"]
    return md_table(header, rows)


def _others(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2f} ⚠" if v > NOISY else f"{v:.2f}"


def _agreement_cell(r: dict[str, Any]) -> str:
    a = r.get("agreement")
    if not a:
        return "—"
    if "status" in a:
        return f"{a['with']}: {a['status']}"
    return f"{a['with']}: {a['median_r']:.4f} / {a['min_r']:.4f} ({a['maps']} maps)"


def findings(run: dict[str, Any]) -> list[str]:
    return [f"{r['tool']}: {r['name']} [{r['shape']}]: {r['check']}" for r in run["cases"] if r.get("check")]


def noise_line(run: dict[str, Any]) -> str:
    others = [c["others"] for m in run["models"].values() for k in KINDS for c in m["rows"][k].values()
              if math.isfinite(c["others"])]
    others += [r["timing"]["others"] for r in run["cases"] if r["timing"] and math.isfinite(r["timing"]["others"])]
    iqr = [c["iqr_rel"] for m in run["models"].values() for k in KINDS for c in m["rows"][k].values()]
    drift = []  # spread between the clean measurements of a re-measured baseline (before vs after the cases)
    for m in run["models"].values():
        for k in KINDS:
            for c in m["rows"][k].values():
                clean = [v["median_ms"] for v in c.get("measurements", []) if not v["others"] > NOISY]
                if len(clean) > 1:
                    drift.append(max(clean) / min(clean) - 1)
    m = run["machine"]
    flagged = sum(1 for o in others if o > NOISY)
    parts = [f"other processes used {statistics.median(others):.2f} cores on average (median over measurements; "
             f"max {max(others):.2f})" if others else "other processes' CPU use unknown",
             f"{flagged} of {len(others)} measurements flagged ⚠ (others > {NOISY} cores)",
             f"baseline IQR median {statistics.median(iqr):.0%}, max {max(iqr):.0%}" if iqr else "",
             f"load average {m.get('loadavg_start', ['?'])[0]} → {(m.get('loadavg_end') or ['?'])[0]}",
             f"suite took {run['wall_s'] / 60:.1f} min"]
    probes = [v for mm in run["models"].values() for v in mm.get("speed_probe_ms", [])]
    if probes:
        parts.append(f"a fixed matmul took {min(probes):.2f}–{max(probes):.2f} ms at the start and end of each "
                     f"model's section (spread {max(probes) / min(probes) - 1:.0%}; a large spread means the machine "
                     "itself was slower for a while)")
    if drift:
        parts.append(f"paired baselines measured before and after the cases differ by {statistics.median(drift):.0%} "
                     f"(median; max {max(drift):.0%})")
    return "; ".join(p for p in parts if p)


def report(doc: dict[str, Any]) -> str:
    out = [f"_Generated {doc['created']} by `{doc['command']}`._", ""]
    for run in doc["runs"]:
        out += [f"**Allocator: {run['allocator_policy']}.** Machine: {describe_machine(run['machine'])}.", "",
                f"Noise: {noise_line(run)}.", ""]
        if run["peers"]:
            out += ["Peers: " + "; ".join(run["peers"].values()) + ".", ""]
    for run in doc["runs"]:
        tag = run["allocator_policy"]
        out += [f"### Baselines: the model's own cost (allocator {tag}, median ms [IQR/median])", "",
                baseline_table(run), "", f"Physical limit (cheapest per image over batch sizes, allocator {tag}):", "",
                limit_table(run), ""]
    alloc = allocator_table(doc["runs"])
    if alloc:
        out += ["### Allocator effect (per-image medians, ms)", "", alloc, ""]
    for run in doc["runs"]:
        tag = run["allocator_policy"]
        for tools, title in (("convscope", "convscope methods"), ("peers", "Peer tools on the same model, "
                                                                             "images and targets")):
            table = cases_table(run, tools)
            if table:
                out += [f"### {title} (allocator {tag})", "", table, ""]
        notes = findings(run)
        if notes:
            out += [f"Findings (allocator {tag}):", "", *[f"* {n}" for n in notes], ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(text: str, path: Path = README) -> None:
    body = path.read_text() if path.is_file() else ""
    block = f"{START}\n{text}{END}"
    if START in body and END in body:
        head, rest = body.split(START, 1)
        _, tail = rest.split(END, 1)
        body = head + block + tail
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, body)


# --------------------------------------------------------------------------------------------- main


def child_argv(args: argparse.Namespace, allocator: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--allocator", allocator, "--out", str(out),
            "--models", *args.models, "--batches", *map(str, args.batches), "--device", args.device,
            "--threads", str(args.threads), "--peers" if args.peers else "--no-peers",
            "--wait-quiet", str(args.wait_quiet)]
    if args.quick:
        argv.append("--quick")
    if args.methods:
        argv += ["--methods", *args.methods]
    return argv


def run_both(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for allocator in ("tuned", "default"):
            env = dict(os.environ)
            env.pop("GLIBC_TUNABLES", None)
            if allocator == "default":
                env["CONVSCOPE_MALLOC"] = "default"
            else:
                env.pop("CONVSCOPE_MALLOC", None)
            out = Path(tmp) / f"{allocator}.json"
            log(f"### allocator {allocator} (subprocess)")
            proc = subprocess.run(child_argv(args, allocator, out), env=env)
            if proc.returncode != 0 or not out.is_file():
                log(f"the {allocator} run failed (exit {proc.returncode}); its table is missing")
                continue
            runs.extend(json.loads(out.read_text())["runs"])
    return runs


def install_peers() -> None:
    """The peers, without their dependencies (so no other torch can come in); torch must be unchanged after."""
    before = torch.__version__
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-r", str(HERE / "requirements-peers.txt")]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)
    after = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], check=True,
                           capture_output=True, text=True).stdout.strip()
    if after != before:
        raise SystemExit(f"torch changed from {before} to {after} while installing the peers; reinstall {before}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install_peers and not args.child:
        install_peers()
    raw = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/run.py" + (" " + " ".join(raw) if raw else "")
    if args.allocator == "both" and not args.child:
        runs = run_both(args)
    else:
        runs = [run_suite(args)]
    if not runs:
        return 1
    doc = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
           "runs": runs}
    atomic_write(args.out, json.dumps(doc, indent=1))
    if args.child:
        return 0
    text = report(doc)
    print(text)
    log(f"JSON: {args.out}")
    if args.update_readme:
        update_readme(text)
        log(f"updated {README}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except cs.ConvscopeError as exc:  # e.g. --device cuda without a GPU, a zoo model whose weights are missing
        log(f"error: {exc}")
        sys.exit(2)
