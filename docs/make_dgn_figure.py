"""DGN-AM class images for demo_net (docs/activation_maximization.md, "DGN-AM on demo_net").

Trains an UpconvNet generator (Dosovitskiy & Brox 2016) from a demo_net layer's code (default ``features.pool5``,
128 x 7 x 7; Nguyen et al. 2016 used fc6, here ``classifier.relu6``, whose decoder did not learn in a short run) on
synthetic training scenes, then runs DGN-AM (``dgn_am``) for each of the 8 class
logits, and writes ``docs/img/dgn_demo_net.png`` (row 1: the class images, row 2: the held-out image with the
highest logit of that class, for comparison) and ``docs/img/dgn_demo_net.json`` (the table's numbers).  Seeded;
run pinned to one core from the repository root:

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python docs/make_dgn_figure.py [--images 800 --epochs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import convscope as cs
from convscope.core.io import atomic_write_text
from convscope.core.render import grid, save_png
from convscope.data.synthetic import HELD_OUT_START, render_arrays
from convscope.methods.maximize import dgn_am, encode
from convscope.methods.upconv import train_upconv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", default="features.pool5", help="the generator's code layer")
    ap.add_argument("--images", type=int, default=800, help="training scenes for the generator")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--held-out", type=int, default=500, help="held-out scenes for each class logit's maximum")
    ap.add_argument("--steps", type=int, default=200, help="DGN-AM steps")
    ap.add_argument("--lambda-code", type=float, default=1e-3)
    ap.add_argument("--out", default="docs/img", help="folder of dgn_demo_net.png / .json")
    ap.add_argument("--generator", default="out/dgn_demo_net_upconv.pt", help="where the generator is saved")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cs.load_model("demo_net")
    pre = model.preprocess
    t0 = time.perf_counter()
    train = render_arrays(0, args.images, 112, seed=0, workers=1, progress=False)
    x = pre.normalize(torch.from_numpy(train.images).permute(0, 3, 1, 2).float().div(255))
    dec = train_upconv(model, args.layer, x, epochs=args.epochs, lr=1e-3, batch_size=32, seed=0, out=args.generator,
                       progress=True)
    train_s = time.perf_counter() - t0
    codes = encode(model, args.layer, x, batch_size=64)
    high = float(codes.quantile(0.99))  # Nguyen et al. clip the code to the range real images give it

    held = render_arrays(HELD_OUT_START, args.held_out, 112, seed=0, workers=1, progress=False)
    hx = pre.normalize(torch.from_numpy(held.images).permute(0, 3, 1, 2).float().div(255))
    with torch.no_grad():
        logits = torch.cat([model(b) for b in hx.split(64)])
    best, best_idx = logits.max(0)  # each class logit's maximum over the held-out scenes

    t1 = time.perf_counter()
    res = dgn_am(model, dec, None, list(range(8)), code_init=codes.mean(0, keepdim=True), lambda_code=args.lambda_code,
                 output="input", code_range=(0.0, high), steps=args.steps, seed=0, batch_size=8, progress=True)
    am_s = time.perf_counter() - t1
    with torch.no_grad():
        out = model(res.x)
    prob = out.softmax(1)
    classes = list(model.classes)
    rows = [{"class": c, "prob": float(prob[i, i]), "top1": classes[int(out[i].argmax())],
             "logit": float(out[i, i]), "held_out_max": float(best[i]), "fraction": float(out[i, i] / best[i])}
            for i, c in enumerate(classes)]
    real = pre.denormalize(hx[best_idx]).clamp(0, 1)
    out_dir = Path(args.out)
    png = save_png(grid([*res.images, *real], nrow=8, col_labels=classes), out_dir / "dgn_demo_net.png")
    n_params = sum(p.numel() for p in dec.parameters())
    atomic_write_text(out_dir / "dgn_demo_net.json", json.dumps({
        "layer": args.layer, "train_images": args.images, "epochs": args.epochs, "losses": dec.losses,
        "generator_params": n_params, "train_seconds": train_s, "dgn_seconds": am_s, "steps": args.steps,
        "lambda_code": args.lambda_code, "code_high": high, "held_out": args.held_out, "rows": rows}, indent=1))
    print(f"generator: {n_params} parameters, {train_s:.0f} s, loss {dec.losses[0]:.4f} -> {dec.losses[-1]:.4f}; "
          f"DGN-AM {am_s:.0f} s; wrote {png}")
    for r in rows:
        print(f"| {r['class']} | {r['prob']:.3f} | {r['fraction']:.2f} | {r['top1']} |")


if __name__ == "__main__":
    main()
