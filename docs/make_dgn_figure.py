"""DGN-AM class images for demo_net (docs/activation_maximization.md, "DGN-AM on demo_net").

The generator is an UpconvNet (Dosovitskiy & Brox 2016) from demo_net's ``features.pool5`` code (128 x 7 x 7) to
112 px images, trained with the pixel + feature-space loss of Dosovitskiy & Brox 2016b (comparator: demo_net's own
``features.pool5``, as Nguyen et al.'s generator used its classifier's features) on synthetic training scenes. It is
bundled as ``src/convscope/models/weights/dgn_demo_net.pt`` (float16; ``load_generator("demo_net")``); ``--train``
retrains it (seeded) and overwrites the bundle. Then DGN-AM (``dgn_am``) runs on each of the 8 class logits and the
script writes ``docs/img/dgn_demo_net.png`` (row 1: the class images of plain DGN-AM, row 2: the same with the
image jittered by up to 8 px in each step, row 3: the held-out scene with the highest logit of that class),
``docs/img/dgn_demo_net_recon.png`` (held-out scenes over their reconstructions ``G(pool5(x))``) and
``docs/img/dgn_demo_net.json`` (the table's numbers). Run pinned to one core from the
repository root:

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python docs/make_dgn_figure.py [--train]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image

import convscope as cs
from convscope.core.io import atomic_write_bytes, atomic_write_text
from convscope.core.optim.transforms import Jitter
from convscope.core.render import grid, save_png
from convscope.data.synthetic import HELD_OUT_START, render_arrays
from convscope.methods.maximize import dgn_am, encode
from convscope.methods.upconv import BUNDLED, load_upconv, reconstruct, save_upconv, train_upconv

BUNDLE = Path(__file__).resolve().parents[1] / "src" / "convscope" / "models" / "weights" / BUNDLED["demo_net"]


def scenes(model: torch.nn.Module, start: int, n: int) -> torch.Tensor:
    """Synthetic scenes ``start .. start+n-1`` (seed 0, 112 px) in demo_net's input space."""
    arr = render_arrays(start, n, 112, seed=0, workers=1, progress=n >= 500)
    return model.preprocess.normalize(torch.from_numpy(arr.images).permute(0, 3, 1, 2).float().div(255))


def palette_png(path: Path) -> Path:
    """Reduce a written PNG to 256 colours (as the other pictures of the docs), in place, atomically."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true", help="retrain the generator and overwrite the bundled file")
    ap.add_argument("--generator", default=str(BUNDLE), help="the generator file to use (and to write with --train)")
    ap.add_argument("--checkpoint", default="out/dgn_demo_net_train.pt", help="float32 checkpoint of each epoch")
    ap.add_argument("--layer", default="features.pool5", help="the generator's code layer")
    ap.add_argument("--feature-layer", default="features.pool5", help="comparator layer of the feature loss")
    ap.add_argument("--feature-loss", type=float, default=1.0, help="weight of the feature loss (0: pixels only)")
    ap.add_argument("--images", type=int, default=4000, help="training scenes for the generator")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--width", type=int, default=8, help="channels of the decoder's last stage")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--stat-images", type=int, default=500, help="training scenes for the code's mean and range")
    ap.add_argument("--held-out", type=int, default=500, help="held-out scenes for each class logit's maximum")
    ap.add_argument("--steps", type=int, default=100, help="DGN-AM steps")
    ap.add_argument("--jitter", type=int, default=8, help="the second row's random shift (px) of G(h) in each step")
    ap.add_argument("--lambda-code", type=float, default=1e-3)
    ap.add_argument("--out", default="docs/img", help="folder of dgn_demo_net.png / _recon.png / .json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cs.load_model("demo_net")
    pre = model.preprocess
    gen_path = Path(args.generator)
    if args.train:
        t0 = time.perf_counter()
        x = scenes(model, 0, args.images)
        dec = train_upconv(model, args.layer, x, epochs=args.epochs, lr=args.lr, batch_size=32, augment=False,
                           upsample="transposed", width=args.width, norm="batch", feature_loss=args.feature_loss,
                           feature_layer=args.feature_layer, seed=0, out=args.checkpoint, progress=True)
        train_s = time.perf_counter() - t0
        del x
        info = {"command": "docs/make_dgn_figure.py --train", "train_images": args.images, "epochs": args.epochs,
                "steps": args.epochs * math.ceil(args.images / 32), "batch_size": 32, "lr": args.lr,
                "feature_layer": args.feature_layer, "feature_loss": args.feature_loss,
                "train_seconds": round(train_s, 1), "losses": dec.losses, "feature_losses": dec.feature_losses}
        save_upconv(dec, gen_path, dtype=torch.float16, info=info)
    dec = load_upconv(gen_path)  # the bundled float16 weights, also right after training
    n_params = sum(p.numel() for p in dec.parameters())

    stats = scenes(model, 0, args.stat_images)
    codes = encode(model, dec.layer, stats, batch_size=64)
    high = float(codes.quantile(0.99))  # Nguyen et al. clip the code to the range real images give it
    del stats
    held = scenes(model, HELD_OUT_START, args.held_out)
    with torch.no_grad():
        logits = torch.cat([model(b) for b in held.split(64)])
    best, best_idx = logits.max(0)  # each class logit's maximum over the held-out scenes

    rec = reconstruct(model, dec, held[:64])  # reconstructions of held-out scenes: did the generator learn?
    real64 = pre.denormalize(held[:64]).clamp(0, 1)
    mse = (rec.images - real64).pow(2).flatten(1).mean(1)
    psnr = float((-10 * mse.clamp_min(1e-10).log10()).mean())
    mean_mse = float((real64.mean(0, keepdim=True) - real64).pow(2).mean())  # the mean image's error
    with torch.no_grad():
        rec_pred = model(rec.x).argmax(1)
        real_pred = logits[:64].argmax(1)
    rec_agree = float((rec_pred == real_pred).float().mean())

    classes = list(model.classes)
    rows, pictures, am_s = [], [], {}
    for variant, regs in [("plain", []), (f"jitter {args.jitter}", [Jitter(args.jitter)])]:
        t1 = time.perf_counter()  # Nguyen et al.'s DGN-AM (the generator is the only prior), then with jitter
        res = dgn_am(model, dec, None, list(range(8)), code_init=codes.mean(0, keepdim=True),
                     lambda_code=args.lambda_code, output="input", code_range=(0.0, high), steps=args.steps, seed=0,
                     batch_size=8, regularizers=regs, progress=True)
        am_s[variant] = time.perf_counter() - t1
        with torch.no_grad():
            out = model(res.x)
        prob = out.softmax(1)
        rows += [{"variant": variant, "class": c, "prob": float(prob[i, i]), "top1": classes[int(out[i].argmax())],
                  "logit": float(out[i, i]), "held_out_max": float(best[i]), "fraction": float(out[i, i] / best[i])}
                 for i, c in enumerate(classes)]
        pictures += list(res.images)
    real = pre.denormalize(held[best_idx]).clamp(0, 1)
    out_dir = Path(args.out)
    png = palette_png(save_png(grid([*pictures, *real], nrow=8, col_labels=classes), out_dir / "dgn_demo_net.png"))
    palette_png(save_png(grid([*real64[:8], *rec.images[:8]], nrow=8), out_dir / "dgn_demo_net_recon.png"))
    atomic_write_text(out_dir / "dgn_demo_net.json", json.dumps({
        "generator": dec.info, "generator_params": n_params, "generator_bytes": gen_path.stat().st_size,
        "layer": dec.layer, "losses": dec.losses, "feature_losses": dec.feature_losses,
        "recon_held_out": {"images": 64, "psnr_db": psnr, "mse": float(mse.mean()), "mean_image_mse": mean_mse,
                           "feature_error": float(rec.error.mean()), "same_top1": rec_agree},
        "dgn_seconds": am_s, "steps": args.steps, "jitter": args.jitter, "lambda_code": args.lambda_code,
        "code_high": high,
        "held_out": args.held_out, "rows": rows}, indent=1))
    print(f"generator: {n_params} parameters, {gen_path.stat().st_size / 1e6:.2f} MB; held-out reconstructions "
          f"PSNR {psnr:.1f} dB (MSE {float(mse.mean()):.4f} vs mean image {mean_mse:.4f}), feature error "
          f"{float(rec.error.mean()):.3f}, same top-1 {rec_agree:.2f}; DGN-AM {am_s} s; wrote {png}")
    for r in rows:
        print(f"| {r['variant']} | {r['class']} | {r['prob']:.3f} | {r['logit']:.2f} | {r['held_out_max']:.2f} | "
              f"{r['fraction']:.2f} | {r['top1']} |")


if __name__ == "__main__":
    main()
