#!/usr/bin/env python
"""Network Dissection at scale: every conv layer of efficientnet_lite0 on N synthetic images (issue 8).

    python benchmarks/dissect_bench.py            # 2000 images (the issue's setting)
    python benchmarks/dissect_bench.py --quick    # 96 images

Reports images/s of each pass and of the whole dissection, as a ratio to the model's own forward cost over the
same images through the same loader (the cheapest per-image forward over batch sizes 1, 8, 16, 32, each measured
on 512 images before and after the run, the cheaper kept), and the peak
resident memory of the dissection process (it runs in a child process, so the number is its own). Writes
``benchmarks/results/dissect.json`` and prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import convscope as cs  # noqa: E402
from harness import atomic_write, describe_machine, machine_info, wait_for_quiet  # noqa: E402

MODEL = "efficientnet_lite0"


def conv_layers(model: nn.Module) -> list[str]:
    return [n for n, mod in cs.named_layers(model).items() if isinstance(mod, nn.Conv2d)]


def dataset(n: int, cache: Path) -> Path:
    from convscope.data.synthetic import generate

    root = cache / f"synth_{n}"
    if not (root / "index.csv").is_file():
        generate(root, n=n, size=112, seed=1, workers=2, progress=True)
    return root


def forward_cost(root: Path, batches: list[int], images: int = 512) -> dict[int, float]:
    """Seconds per image of a bare forward (no hooks) over the first ``images`` images, per batch size; the same
    loader (PNG decoding in one worker process) as the dissection."""
    from torch.utils.data import DataLoader, Subset

    from convscope.data.broden import broden_collate
    from convscope.methods.dissect import DissectConfig, open_dataset

    model = cs.load_model(MODEL)
    out = {}
    for b in batches:
        ds = open_dataset(root, model, DissectConfig(batch_size=b))
        ds = Subset(ds, range(min(images, len(ds))))
        norm = model.preprocess.normalize
        loader = DataLoader(ds, batch_size=b, num_workers=1, collate_fn=broden_collate)
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in loader:
                model(norm(batch["images"]))
        out[b] = (time.perf_counter() - t0) / len(ds)
    return out


def child(root: Path, batch: int, out: Path) -> None:
    """Run the dissection (both passes timed) and write the timings as JSON."""
    import importlib

    d = importlib.import_module("convscope.methods.dissect")  # the module: cs.methods.dissect is the function

    model = cs.load_model(MODEL)
    names = conv_layers(model)
    cfg = d.DissectConfig(batch_size=batch, workers=1)
    marks: dict[str, float] = {}
    stream = d.stream_dataset

    def timed_stream(*args: object, **kw: object):  # note when pass 2 starts (its first batch is requested)
        if any("IoU" in str(a) for a in (*args, *kw.values()) if isinstance(a, str)):
            marks.setdefault("pass2", time.perf_counter())
        return stream(*args, **kw)

    d.stream_dataset = timed_stream
    t0 = time.perf_counter()
    result = d.dissect(model, root, names, cfg, progress=True)
    t2 = time.perf_counter()
    t1 = marks.get("pass2", t2)
    thresholds = {n: r.thresholds for n, r in result.items()}
    detectors = {n: len(r.detectors()) for n, r in result.items()}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_text(json.dumps({"pass1_s": t1 - t0, "dissect_s": t2 - t1, "layers": len(names),
                               "units": sum(len(t) for t in thresholds.values()), "detectors": detectors,
                               "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="96 images")
    ap.add_argument("--batch", type=int, default=16, help="dissection batch size (DissectConfig.batch_size)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/convscope-bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dissect.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), Path(args.child[2]))
        return
    n = 96 if args.quick else args.images
    threads = torch.get_num_threads()
    root = dataset(n, args.cache)
    wait_for_quiet(300.0)
    before = forward_cost(root, [1, 8, 16, 32])
    tmp = args.cache / "dissect_child.json"
    subprocess.run([sys.executable, __file__, "--child", str(root), str(args.batch), str(tmp)], check=True)
    after = forward_cost(root, [1, 8, 16, 32])  # measured on both sides of the run: the cheaper one is the limit
    fwd = {b: min(before[b], after[b]) for b in before}
    best_b = min(fwd, key=fwd.get)
    r = json.loads(tmp.read_text())
    pass2 = r["dissect_s"]  # the child reports pass 1 and pass 2 of one dissect() call
    per_img_forward = fwd[best_b]
    rows = {
        "images": n, "layers": r["layers"], "units": r["units"], "threads": threads,
        "forward_s_per_image": fwd, "forward_before": before, "forward_after": after, "forward_best_batch": best_b,
        "pass1_s": r["pass1_s"], "pass2_s": pass2, "total_s": r["pass1_s"] + pass2,
        "images_per_s": n / (r["pass1_s"] + pass2),
        "ratio_total": (r["pass1_s"] + pass2) / (n * per_img_forward),
        "ratio_pass1": r["pass1_s"] / (n * per_img_forward),
        "ratio_pass2": pass2 / (n * per_img_forward),
        "peak_rss_mb": r["peak_rss_mb"], "detectors": r["detectors"],
        "machine": machine_info(torch.device("cpu"), threads, "default"),
    }
    atomic_write(args.out, json.dumps(rows, indent=1))
    print(describe_machine(rows["machine"]))
    print(f"| images | conv layers / units | forward (best, b{best_b}) | pass 1 (thresholds) | pass 2 (tally) | "
          "dissection | images/s | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {r['layers']} / {r['units']} | {per_img_forward * 1e3:.1f} ms/img | "
          f"{r['pass1_s']:.0f} s ({rows['ratio_pass1']:.2f}×) | {pass2:.0f} s ({rows['ratio_pass2']:.2f}×) | "
          f"{rows['total_s']:.0f} s (**{rows['ratio_total']:.2f}×**) | {rows['images_per_s']:.1f} | "
          f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
