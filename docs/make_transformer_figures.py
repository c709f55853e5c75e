"""Figures and numbers of docs/transformers.md: demo_vit on held-out synthetic scenes.

Writes into ``docs/img`` (each PNG well under 300 KB):

* ``vit_gradcam_rollout.png``: held-out scenes (one per class), Grad-CAM of the true class on the auto CAM layer
  (demo_vit reads the mean of the patch tokens, so its last token layer ``encoder.ln`` reaches the head),
  attention rollout (Abnar & Zuidema 2020), and demo_net's Grad-CAM (``features.relu5``) for comparison;
* ``vit_topk_block<i>.png``: the 9 held-out scenes with the strongest activation of a few units of a middle block,
  the unit's token map over each (a ViT token's receptive field is the whole image, so whole images are shown);
* ``vit_dissect.png``: unique detectors per category of two blocks, trained vs the untrained network
  (``cs.dissect`` on the synthetic concept data, quantile 0.05 as docs/dissection.md; demo_net's ``features.relu5``
  on the same images for the JSON);
* ``vit_dissect_units.png``: the best detectors' strongest images, region above ``T_f`` highlighted;
* ``vit_figures.json``: every number the page quotes (localization scores, detectors, timings).

Localization scores on ``--scenes`` held-out scenes: *pointing* (the map's maximum falls on the dominant object)
and *energy* (share of the map's positive mass on the dominant object; the object's own area share is printed as
the chance level). Seeded; run pinned to one core from the repository root:

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python docs/make_transformer_figures.py
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import convscope as cs
from convscope.applications.dissect_report import comparison_chart, unit_images
from convscope.core.io import atomic_write_text
from convscope.core.render import grid, overlay, save_png
from convscope.data.broden import BrodenDataset
from convscope.data.synthetic import HELD_OUT_START, SHAPES, generate, render_arrays
from convscope.methods.dissect import LayerDissection
from convscope.models.vit import demo_vit


def localization(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Pointing-game hit rate and mean positive-energy share of ``maps`` (``N x 1 x H x W``) on ``masks``
    (``N x H x W`` bool)."""
    m = maps[:, 0].clamp(min=0).flatten(1)
    t = masks.flatten(1).float()
    hit = t.gather(1, m.argmax(1, keepdim=True))[:, 0]
    energy = (m * t).sum(1) / m.sum(1).clamp(min=1e-12)
    return {"pointing": round(float(hit.mean()), 3), "energy": round(float(energy.mean()), 3)}


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``size``, concatenated."""
    return torch.cat([fn(xb) for xb in x.split(size)])


def save_small(img: Image.Image, path: Path) -> None:
    """A figure as a 256-colour PNG (the textured scenes make full-colour PNGs 3-4x larger)."""
    save_png(img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE), path)


def strict_counts(d: LayerDissection, threshold: float) -> dict[str, int]:
    """Units per category whose best IoU exceeds ``threshold``."""
    out = {c: 0 for c in d.categories}
    for r in d.rows:
        if r.iou > threshold:
            out[r.category] += 1
    return out


def token_taps(model: nn.Module, blocks: list[int]) -> list[str]:
    """Adds ``block<i>`` (an ``nn.Identity``) to ``model``, fed each block's patch tokens as a contiguous
    ``N x D x gh x gw`` map (class token dropped, as ``layout="tokens"`` reads them). Dissection's quantile scan
    views the map flat and fails on the strided view of a token layer (``over.view(-1)`` in
    ``methods/dissect/quantile.py``), so the blocks are dissected through these taps; the model's outputs are
    unchanged."""
    names = []
    for b in blocks:
        tap = nn.Identity()
        model.add_module(f"block{b}", tap)

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, tap: nn.Module = tap) -> None:
            side = math.isqrt(out.shape[1] - 1)  # a square patch grid after one class token
            tap(out[:, 1:].reshape(out.shape[0], side, side, out.shape[2]).permute(0, 3, 1, 2).contiguous())

        model.get_submodule(f"encoder.layers.encoder_layer_{b}").register_forward_hook(hook)
        names.append(f"block{b}")
    return names


def untrained_vit() -> nn.Module:
    """demo_vit's architecture at its seeded initialization (the dissection's control), with demo_vit's preprocess."""
    trained = cs.load_model("demo_vit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = demo_vit(len(SHAPES)).eval()
    model.preprocess = trained.preprocess
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=200, help="held-out scenes for accuracy, localization and top-9")
    ap.add_argument("--dissect-images", type=int, default=1000, help="synthetic concept images for dissection")
    ap.add_argument("--blocks", default="1,3", help="encoder blocks to dissect")
    ap.add_argument("--topk-block", type=int, default=1, help="the middle block of the top-9 picture")
    ap.add_argument("--quantile", type=float, default=0.05)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--data", default="/tmp/convscope_vit_broden", help="where the concept images are generated")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    numbers: dict[str, object] = {}
    vit, net = cs.load_model("demo_vit"), cs.load_model("demo_net")
    bundled = resources.files("convscope.models").joinpath("weights", "demo_vit.pt")
    ckpt = torch.load(Path(str(bundled)), map_location="cpu", weights_only=True)
    numbers["bundled"] = {k: ckpt[k] for k in ("test_accuracy", "epochs", "wall_seconds", "cpu_seconds")}

    # held-out scenes (indices from HELD_OUT_START, never used in training)
    t0 = time.perf_counter()
    arr = render_arrays(HELD_OUT_START, args.scenes, 112, seed=0, workers=1, progress=False, masks=True)
    pixels = torch.from_numpy(arr.images).permute(0, 3, 1, 2).float().div(255)
    labels = torch.from_numpy(arr.scenes)
    assert arr.target_masks is not None
    masks = torch.from_numpy(arr.target_masks)
    xv, xn = vit.preprocess.normalize(pixels), net.preprocess.normalize(pixels)
    with torch.no_grad():
        pv = batched(vit, xv).argmax(1)
        pn = batched(net, xn).argmax(1)
    numbers["held_out_accuracy"] = {"scenes": args.scenes, "demo_vit": round(float((pv == labels).float().mean()), 3),
                                    "demo_net": round(float((pn == labels).float().mean()), 3)}
    numbers["predicted_classes"] = {"demo_vit": dict(zip(SHAPES, torch.bincount(pv, minlength=8).tolist())),
                                    "true": dict(zip(SHAPES, torch.bincount(labels, minlength=8).tolist()))}
    target = labels[:, None]
    last = cs.resolve_cam_layer(vit)  # the auto CAM layer: with demo_vit's mean-pooled head, encoder.ln's patch tokens
    cam_v = torch.cat([cs.gradcam(vit, xb, tb, layer=last) for xb, tb in zip(xv.split(32), target.split(32))])
    roll = batched(lambda xb: cs.attention_rollout(vit, xb), xv)
    cam_n = torch.cat([cs.gradcam(net, xb, tb, layer="features.relu5") for xb, tb in zip(xn.split(32),
                                                                                          target.split(32))])
    numbers["localization"] = {"demo_vit gradcam " + last: localization(cam_v, masks),
                               "demo_vit attention rollout": localization(roll, masks),
                               "demo_net gradcam features.relu5": localization(cam_n, masks),
                               "object area share": round(float(masks.float().mean()), 3)}
    numbers["attribution_seconds"] = round(time.perf_counter() - t0, 1)

    # one correctly classified scene per class (the first), else the first of the class
    pick = []
    for c in range(len(SHAPES)):
        idx = (labels == c).nonzero()[:, 0]
        ok = idx[pv[idx] == c]
        if len(idx):
            pick.append(int(ok[0] if len(ok) else idx[0]))
    cells: list[torch.Tensor] = []
    for rows in (pixels[pick], overlay(pixels[pick], cam_v[pick]), overlay(pixels[pick], roll[pick]),
                 overlay(pixels[pick], cam_n[pick])):
        cells += list(rows)
    captions = [f"{SHAPES[int(labels[i])]} -> {SHAPES[int(pv[i])]}" for i in pick]
    fig = grid(cells, nrow=len(pick), padding=2,
               row_labels=["scene", "ViT Grad-CAM", "ViT rollout", "CNN Grad-CAM"],
               cell_labels=captions + [""] * (3 * len(pick)))
    save_small(fig, out / "vit_gradcam_rollout.png")

    # top-9 of a few units of a middle block: token maps over the whole images
    block = f"encoder.layers.encoder_layer_{args.topk_block}"
    top = cs.top_k_activations(vit, xv, block, k=9, progress=False)[block]
    units = top.values[:, 0].argsort(descending=True)[:4].tolist()  # the units with the strongest maxima
    ids = top.image_ids[units].reshape(-1)
    with torch.no_grad():
        acts = cs.layer_features(vit, xv[ids], block)[block]
    maps, _ = cs.as_feature_map(acts, input_size=(112, 112), patch_size=vit.patch_size)
    unit_rows = torch.tensor(units).repeat_interleave(9)
    chosen = maps[torch.arange(len(ids)), unit_rows][:, None]
    shown = overlay(pixels[ids], chosen, alpha=0.45)
    fig = grid(list(shown), nrow=9, padding=2, row_labels=[f"unit {u}" for u in units],
               cell_labels=[SHAPES[int(labels[i])] for i in ids])
    save_small(fig, out / f"vit_topk_block{args.topk_block}.png")
    numbers["topk"] = {"block": block, "units": units}

    # dissection of two blocks, trained vs untrained
    t1 = time.perf_counter()
    root = Path(args.data)
    if not (root / "index.csv").exists():
        generate(root, n=args.dissect_images, size=112, seed=1, workers=1, progress=False)
    blocks = [int(b) for b in args.blocks.split(",")]
    config = cs.DissectConfig(quantile=args.quantile, iou_threshold=0.04, workers=0)
    tapped, untrained = cs.load_model("demo_vit"), untrained_vit()
    layers = token_taps(tapped, blocks)
    token_taps(untrained, blocks)
    res: dict[str, dict[str, LayerDissection]] = {
        "demo_vit": cs.dissect(tapped, root, layers, config, progress=False),
        "untrained": cs.dissect(untrained, root, layers, config, progress=False)}
    comparison = cs.compare(res)
    save_small(comparison_chart(comparison, f"demo_vit: unique detectors per category, q = {args.quantile}"),
             out / "vit_dissect.png")
    cnn = cs.dissect(net, root, ["features.relu5"], config, progress=False)["features.relu5"]
    numbers["dissect_seconds"] = round(time.perf_counter() - t1, 1)
    numbers["detector_units"] = {  # per category, at the 0.04 threshold and at a stricter 0.1, and the best IoU
        f"{name} {layer}": {"iou>0.04": d.detector_counts(), "iou>0.1": strict_counts(d, 0.1),
                            "best_iou": round(max(r.iou for r in d.rows), 3)}
        for name, layers_ in (*res.items(), ("demo_net", {"features.relu5": cnn})) for layer, d in layers_.items()}
    numbers["dissect"] = {"quantile": args.quantile, "rows": comparison.rows, "detectors": {
        layer: [(r.unit, r.label, r.category, round(r.iou, 3)) for r in d.detectors()]
        for layer, d in res["demo_vit"].items()}}
    ds = BrodenDataset(root)
    rows, labels_ = [], []
    for layer, d in res["demo_vit"].items():
        best: dict[str, int] = {}
        for r in d.detectors():  # the best unit of each of the first concepts
            best.setdefault(r.label, r.unit)
        for label, u in list(best.items())[:3]:
            pics = unit_images(tapped, ds, d, [u], top=5, size=96)[u]
            rows += pics
            labels_.append(f"{layer} unit {u}: {label}")
    if rows:
        save_small(grid(rows, nrow=5, padding=2, row_labels=labels_), out / "vit_dissect_units.png")
    atomic_write_text(out / "vit_figures.json", json.dumps(numbers, indent=1))
    print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
