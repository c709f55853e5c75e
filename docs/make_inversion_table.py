"""Inversion defaults by measurement (docs/inversion.md, "Defaults by measurement"; issue 22).

Regularized inversion (``cs.invert``, Mahendran & Vedaldi 2015) of bundled photos from several depths of
efficientnet_lite0 (224 px) and demo_net (112 px), 200 Adam steps, over a grid of settings (jitter, TV weight,
alpha-norm weight, learning rate; constant TV with a decayed learning rate; TV annealed from a strong to a weak weight)
plus the old and the current per-depth defaults. For each layer and setting: the
normalized feature error ``||Phi(x*) - Phi(x0)||^2 / ||Phi(x0)||^2`` and the PSNR of the pixels, averaged over the
photos. Writes ``docs/img/inversion_table.json`` (every cell, every photo), ``docs/img/inversion_defaults.png``
(per depth: input, old defaults, new defaults, the grid's lowest-error and highest-PSNR settings) and prints the
markdown tables of the docs.

Seeded (each photo's noise and jitter come from a generator seeded by the photo's position in ``PHOTOS``, whatever
is batched with it). Cells are cached in ``--cache`` (reconstructions as uint8 and their numbers), so an interrupted
run resumes and a changed rule only runs its new cells. Untimed heavy work (the first round ~1.5 h, the schedule
cells another ~40 min on a shared core, the third round's ~10 min, screened with ``docs/inversion_screen.py``): run
it pinned to one core from the repository root:

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python docs/make_inversion_table.py
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import convscope as cs
from convscope.applications.invert_report import psnr
from convscope.core.io import atomic_write_text
from convscope.core.model import input_denormalizer
from convscope.core.render import grid, save_png
from convscope.methods.invert import default_hyperparameters, layer_depths

PHOTOS = ["chelsea", "rocket"]  # seed of each photo: its index here
STEPS = 200
MODELS = {  # model: (image size, photos, layers from shallow to deep)
    "efficientnet_lite0": (224, ["chelsea", "rocket"],
                           ["blocks.1", "blocks.4.expand_conv", "blocks.8"]),
    "demo_net": (112, ["chelsea", "rocket"],
                 ["features.relu1", "features.relu2", "features.relu3", "features.relu4", "features.relu5"]),
}


@dataclass(frozen=True)
class Setting:
    """One inversion setting: jitter (pixels), lambda_TV, lambda_alpha, Adam learning rate."""

    jitter: int
    tv: float
    alpha: float
    lr: float
    tv_end: float | None = None  # lambda_TV annealed geometrically from tv (step 0) to tv_end (last step)
    decay: float = 0.0  # the last `decay` fraction of the steps: lr decays to 0 (half cosine)
    more_lr: tuple[float, ...] = ()  # further step sizes: each photo keeps the run of lowest feature error

    @property
    def key(self) -> str:
        return (f"j{self.jitter}_tv{self.tv:.3g}" + (f"-{self.tv_end:.3g}" if self.tv_end is not None else "")
                + f"_a{self.alpha:g}_lr{self.lr:g}" + "".join(f"+{v:g}" for v in self.more_lr)
                + (f"_cos{self.decay:g}" if self.decay else ""))

    @property
    def label(self) -> str:
        tv = f"TV {self.tv:.3g}" + (f" -> {self.tv_end:.3g} (geometric)" if self.tv_end is not None else "")
        lr = (f"lr {self.lr:g}" + "".join(f" and {v:g} (the lower error kept)" for v in self.more_lr)
              + (f", cosine decay over the last {self.decay:g} of the steps" if self.decay else ""))
        return f"jitter {self.jitter}, {tv}, alpha {self.alpha:g}, {lr}"

    @property
    def lrs(self) -> float | tuple[float, ...]:
        """The step size, or the step sizes tried (``cs.invert(lr=...)``)."""
        return (self.lr, *self.more_lr) if self.more_lr else self.lr

    @property
    def lambda_tv(self) -> float | tuple[float, float]:
        return self.tv if self.tv_end is None else (self.tv, self.tv_end)


# issue 22, second round: constant lambda_TV with the two step-size schedules of the defaults (so the "best setting"
# includes decayed-lr constant-TV runs), and lambda_TV annealed geometrically from a strong to a weak prior, around
# the defaults (start 1e-2 .. 1e-1, end 3e-5 .. 3e-4, lr 0.05 .. 0.2, cosine decay over the last 0.2 or 0.5 of the
# steps)
LR_SCHEDULES = ((0.2, 0.5), (0.2, 0.7), (0.05, 0.2))  # (lr, decayed fraction)
DECAYED = [Setting(0, tv, 1e-3, lr, None, dec) for lr, dec in LR_SCHEDULES for tv in (1e-4, 1e-3, 1e-2, 1e-1)]
ANNEALED = [Setting(0, a, 1e-3, lr, b, dec) for a, b, lr, dec in (
    (1e-2, 1e-4, 0.05, 0.2), (1e-2, 1e-4, 0.1, 0.5), (1e-2, 1e-4, 0.2, 0.5), (3e-2, 1e-4, 0.05, 0.2),
    (3e-2, 1e-4, 0.1, 0.5), (3e-2, 1e-4, 0.2, 0.5), (3e-2, 3e-4, 0.05, 0.2), (3e-2, 3e-4, 0.1, 0.5),
    (3e-2, 3e-4, 0.2, 0.5), (3e-2, 3e-5, 0.2, 0.5), (1e-1, 1e-4, 0.2, 0.5), (1e-1, 3e-5, 0.2, 0.5),
    (3e-2, 1e-4, 0.2, 0.7), (3e-2, 1e-4, 0.3, 0.5), (1e-1, 1e-4, 0.3, 0.5), (5e-2, 1e-4, 0.2, 0.5))]

# issue 22, third round (docs/inversion_screen.py): weaker last TV weights (5e-5, 3e-5, 1e-5), larger and longer-
# decayed steps, run where they could be the default: the shallow band's step (lr 0.2-0.3, decayed over the last
# 70-90 %) at the layers below depth 0.4, the deep band's (lr 0.05 over the last 20 %) from there
SHALLOW3 = [Setting(0, a, 1e-3, lr, b, dec) for a, b, lr, dec in (
    (3e-2, 3e-5, 0.2, 0.7), (3e-2, 1e-4, 0.3, 0.7), (3e-2, 3e-5, 0.3, 0.7), (3e-2, 1e-5, 0.2, 0.7),
    (3e-2, 5e-5, 0.2, 0.7), (3e-2, 5e-5, 0.3, 0.7), (3e-2, 3e-5, 0.25, 0.7), (5e-2, 3e-5, 0.3, 0.7),
    (3e-2, 3e-5, 0.3, 0.9), (3e-2, 3e-5, 0.2, 0.9), (1e-1, 3e-5, 0.3, 0.7), (1.5e-2, 5e-5, 0.2, 0.7),
    (1.5e-2, 5e-5, 0.3, 0.7), (1.5e-2, 5e-5, 0.25, 0.7))]
DEEP3 = [Setting(0, a, 1e-3, 0.05, b, 0.2) for a, b in ((1.5e-2, 5e-5), (3e-2, 5e-5), (3e-2, 3e-5), (3e-2, 1e-5))]
THIRD = {  # (model, layer): the third round's cells measured there
    **{("demo_net", f"features.relu{i}"): SHALLOW3 for i in (1, 2, 3)},
    **{("demo_net", f"features.relu{i}"): DEEP3 for i in (4, 5)},
    **{("efficientnet_lite0", k): [SHALLOW3[0], SHALLOW3[2], SHALLOW3[3]] for k in ("blocks.1",
                                                                                "blocks.4.expand_conv")},
    ("efficientnet_lite0", "blocks.8"): [DEEP3[2], DEEP3[3]],
}

# issue 22, fourth round: the shallow band's two step sizes (0.2 and 0.3; each photo keeps the lower feature error,
# the default now) and lr 0.3 alone at lite0's shallow layers; a last TV weight of 4e-5 at 112 px (screened: it
# moved demo relu4 to 1.10x, so the rule kept 3e-5)
FOURTH = {
    **{("demo_net", f"features.relu{i}"): [Setting(0, 3e-2, 1e-3, 0.2, 3e-5, 0.7, (0.3,)),
                                           Setting(0, 3e-2, 1e-3, 0.2, 4e-5, 0.7, (0.3,))] for i in (1, 2, 3)},
    **{("demo_net", f"features.relu{i}"): [Setting(0, 3e-2, 1e-3, 0.05, 4e-5, 0.2)] for i in (4, 5)},
    **{("efficientnet_lite0", k): [Setting(0, 3e-2, 1e-3, 0.3, 1e-4, 0.7),
                                   Setting(0, 3e-2, 1e-3, 0.2, 1e-4, 0.7, (0.3,))]
       for k in ("blocks.1", "blocks.4.expand_conv")},
}


def grid_settings(model: str = "demo_net", layer: str = "") -> list[Setting]:
    """The grid: lambda_TV over four decades without jitter (lambda_alpha 1e-3, lr 0.05), and around lambda_TV 0.01
    one change at a time: jitter 1, lambda_alpha 1e-2, lr 0.1. efficientnet_lite0 (8-10x the cost per step at
    224 px, on a shared core) gets the whole sweep at its two shallow layers (and the three changes at the quarter
    depth) and lambda_TV 1e-4, 1e-3 at blocks.8 (head.conv was dropped for time). Then, at every layer, the
    schedules: :data:`DECAYED` and :data:`ANNEALED`, and the third and fourth rounds' cells there (:data:`THIRD`,
    :data:`FOURTH`)."""
    sweep = [Setting(0, tv, 1e-3, 0.05) for tv in (1e-4, 1e-3, 3e-3, 0.01, 0.1, 1.0)]
    more = [Setting(1, 0.01, 1e-3, 0.05), Setting(0, 0.01, 1e-2, 0.05), Setting(0, 0.01, 1e-3, 0.1)]
    third = THIRD.get((model, layer), []) + FOURTH.get((model, layer), [])
    if model == "efficientnet_lite0":
        if layer == "blocks.1":
            return sweep + DECAYED + ANNEALED + third
        if layer == "blocks.4.expand_conv":
            return sweep + more + DECAYED + ANNEALED + third
        return [s for s in sweep if s.tv in (1e-4, 1e-3)] + DECAYED + ANNEALED + third
    return sweep + more + DECAYED + ANNEALED + third


def old_defaults(depth: float, size: int) -> Setting:
    """The rule before issue 22: lambda_TV = 10^(-2 + 2 d), jitter 0 below d = 0.15 then (1 + 3 d) px at 224."""
    d = min(max(depth, 0.0), 1.0)
    jitter = 0 if d < 0.15 else max(1, round((1 + 3 * d) * size / 224))
    return Setting(jitter, 10 ** (-2.0 + 2.0 * d), 1e-3, 0.05)


def new_defaults(depth: float, size: int) -> Setting:
    """What ``cs.invert`` does now when no setting is given (``default_hyperparameters``)."""
    h = default_hyperparameters(depth, size)
    lrs = h.lr if isinstance(h.lr, tuple) else (h.lr,)
    return Setting(h.jitter, h.lambda_tv, h.lambda_alpha, lrs[0], h.lambda_tv_end, h.lr_decay, lrs[1:])


def run_cells(model: torch.nn.Module, mname: str, x: torch.Tensor, photos: list[str], layer: str,
              settings: list[Setting], cache: Path, steps: int = STEPS) -> dict[str, dict]:
    """Invert ``layer`` under each setting (the photos batched in one call), cached per (layer, setting, photo);
    ``steps`` other than :data:`STEPS` belong in another cache folder."""
    truth = input_denormalizer(model)(x).clamp(0, 1)
    out: dict[str, dict] = {}
    for s in settings:
        if s.key in out:
            continue
        files = {p: cache / mname / layer / f"{s.key}__{p}.pt" for p in photos}
        todo = [i for i, p in enumerate(photos) if not files[p].exists()]
        if todo:
            t0 = time.perf_counter()
            res = cs.invert(model, x[todo], [layer], steps=steps, lambda_alpha=s.alpha, lambda_tv=s.lambda_tv,
                            jitter=s.jitter, lr=s.lrs, lr_decay=s.decay, seed=[PHOTOS.index(photos[i]) for i in todo],
                            progress=False)
            sec = (time.perf_counter() - t0) / len(todo)
            for k, i in enumerate(todo):
                img = res.images[k].clamp(0, 1)
                files[photos[i]].parent.mkdir(parents=True, exist_ok=True)
                torch.save({"error": float(res.error[k]), "psnr": psnr(img, truth[i]), "seconds": sec,
                            "image": (img * 255).round().to(torch.uint8)}, files[photos[i]])
            print(f"{mname} {layer} {s.key}: {', '.join(f'{res.error[k]:.3f}' for k in range(len(todo)))} "
                  f"({sec:.0f} s per photo)", flush=True)
        cells = {p: torch.load(files[p]) for p in photos}
        out[s.key] = {"setting": s, "error": sum(c["error"] for c in cells.values()) / len(photos),
                      "psnr": sum(c["psnr"] for c in cells.values()) / len(photos),
                      "per_photo": {p: {"error": c["error"], "psnr": c["psnr"]} for p, c in cells.items()},
                      "images": torch.stack([cells[p]["image"] for p in photos]).float() / 255}
    return out


def within(default: dict, cells: dict[str, dict], tol: float = 0.10) -> dict:
    """The default against the grid's best on each measure: error <= (1 + tol) best error, PSNR >= (1 - tol) best
    PSNR (in dB); also the stricter MSE reading (PSNR >= best - 10 log10(1 + tol) dB)."""
    best_err = min(c["error"] for c in cells.values())
    best_psnr = max(c["psnr"] for c in cells.values())
    return {"best_error": best_err, "best_psnr": best_psnr, "error_ratio": default["error"] / best_err,
            "psnr_ratio": default["psnr"] / best_psnr, "psnr_gap_db": best_psnr - default["psnr"],
            "ok": default["error"] <= (1 + tol) * best_err and default["psnr"] >= (1 - tol) * best_psnr,
            "ok_mse": default["error"] <= (1 + tol) * best_err
            and default["psnr"] >= best_psnr - 10 * torch.log10(torch.tensor(1 + tol)).item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--layers", default="", help="only these layers (comma-separated; default: all of each model)")
    ap.add_argument("--photos", default="", help="only these photos (comma-separated; a quick look, not the table)")
    ap.add_argument("--grid", default="", help="only these grid settings (comma-separated keys)")
    ap.add_argument("--cache", default="out/inversion_grid", help="folder of cached cells")
    ap.add_argument("--out", default="docs/img", help="folder of inversion_table.json and inversion_defaults.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cs.tune_cpu_allocator()
    cache, out = Path(args.cache), Path(args.out)
    paths = cs.sample_images()
    only = [s for s in args.layers.split(",") if s]
    table: dict[str, dict] = {}
    tiles: list[torch.Tensor] = []
    row_labels: list[str] = []
    for mname in args.models.split(","):
        size, photos, layers = MODELS[mname]
        layers = [k for k in layers if not only or k in only]
        photos = [p for p in photos if not args.photos or p in args.photos.split(",")]
        model = cs.load_model(mname, device="cpu")
        x = cs.load_images([paths[p] for p in photos], model)
        depths = {k: layer_depths(model, [k], x)[k] for k in layers}  # as invert() sees each layer alone
        for layer in layers:
            chosen = [s for s in grid_settings(mname, layer) if not args.grid or s.key in args.grid.split(",")]
            old, new = old_defaults(depths[layer], size), new_defaults(depths[layer], size)
            cells = run_cells(model, mname, x, photos, layer, [*chosen, old, new], cache)
            pool = {s.key: cells[s.key] for s in (*chosen, old, new)}  # the best of everything measured
            check = within(cells[new.key], pool)
            best_e = min(pool.values(), key=lambda c: c["error"])
            best_p = max(pool.values(), key=lambda c: c["psnr"])
            table[f"{mname}:{layer}"] = {
                "model": mname, "layer": layer, "depth": depths[layer], "photos": photos,
                "old": old.key, "default": new.key, "best_error_setting": best_e["setting"].key,
                "best_psnr_setting": best_p["setting"].key, **check,
                "cells": {k: {"error": c["error"], "psnr": c["psnr"], "per_photo": c["per_photo"]}
                          for k, c in cells.items()}}
            print(f"{mname} {layer} (d={depths[layer]:.2f}): default {new.key} error {cells[new.key]['error']:.4f} "
                  f"PSNR {cells[new.key]['psnr']:.2f}; best error {check['best_error']:.4f} "
                  f"({best_e['setting'].key}), best PSNR {check['best_psnr']:.2f} ({best_p['setting'].key}); "
                  f"ratio {check['error_ratio']:.2f} / {check['psnr_ratio']:.3f} -> {'ok' if check['ok'] else 'NO'}",
                  flush=True)
            # picture: chelsea only (first photo), at 112 px
            truth = input_denormalizer(model)(x[:1]).clamp(0, 1)
            row = [truth[0]] + [c["images"][0] for c in (cells[old.key], cells[new.key], best_e, best_p)]
            tiles += [torch.nn.functional.interpolate(t[None], size=(112, 112), mode="bilinear", antialias=True,
                                                      align_corners=False)[0].clamp(0, 1) for t in row]
            row_labels.append(f"{'lite0' if mname.startswith('eff') else 'demo'} {layer.split('features.')[-1]}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {s.key: s.label for m, (_, _, layers) in MODELS.items() for k in layers for s in grid_settings(m, k)}
    atomic_write_text(out / "inversion_table.json", json.dumps({"steps": STEPS, "settings": settings,
                                                                 "layers": table}, indent=1))
    if tiles:
        save_png(grid(tiles, nrow=5, row_labels=row_labels,
                      col_labels=["input", "old defaults", "new defaults", "lowest error", "highest PSNR"]),
                 out / "inversion_defaults.png")
    print_markdown(table)


def print_markdown(table: dict[str, dict]) -> None:
    """The docs' tables: setting x layer -> error / PSNR (one per model; "-" where the setting was not run), the
    default against the best, and how each single setting of the grid would fare as the default everywhere."""
    rows = list(table.values())
    for mname in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == mname]
        keys = list(dict.fromkeys(s.key for r in mrows for s in grid_settings(mname, r["layer"])))
        print(f"\n| {mname} setting | " + " | ".join(f"`{r['layer']}` (d {r['depth']:.2f})" for r in mrows) + " |")
        print("|---|" + "---|" * len(mrows))

        def cell(r: dict, k: str) -> str:
            c = r["cells"].get(k)
            return "-" if c is None else f"{c['error']:.4f} / {c['psnr']:.1f}"
        for k in keys:
            print(f"| `{k}` | " + " | ".join(cell(r, k) for r in mrows) + " |")
        for name, field in (("old defaults", "old"), ("**new defaults**", "default")):
            print(f"| {name} | " + " | ".join(f"{cell(r, r[field])} (`{r[field]}`)" for r in mrows) + " |")
    print("\n| layer | default | error (best) | ratio | PSNR dB (best) | ratio | within 10 % | MSE reading |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        c = row["cells"][row["default"]]
        print(f"| {row['model'].replace('efficientnet_', '')} `{row['layer']}` | `{row['default']}` | "
              f"{c['error']:.4f} ({row['best_error']:.4f}) | {row['error_ratio']:.2f} | {c['psnr']:.2f} "
              f"({row['best_psnr']:.2f}) | {row['psnr_ratio']:.3f} | {'yes' if row['ok'] else 'NO'} | "
              f"{'yes' if row['ok_mse'] else 'no'} |")
    print("\nOne setting everywhere (settings run at every layer; layers within 10 % on both, then the worst error "
          "and PSNR ratios):\n")
    common = [k for k in rows[0]["cells"] if all(k in r["cells"] for r in rows)] if rows else []
    fares = []
    for k in common:
        er = [r["cells"][k]["error"] / r["best_error"] for r in rows]
        pr = [r["cells"][k]["psnr"] / r["best_psnr"] for r in rows]
        fares.append((sum(e <= 1.1 and p >= 0.9 for e, p in zip(er, pr)), k, max(er), min(pr)))
    for ok, k, e, p in sorted(fares, key=lambda t: (-t[0], t[2]))[:8]:
        print(f"* `{k}`: {ok} of {len(rows)} layers, error ratio <= {e:.2f}, PSNR ratio >= {p:.3f}")


if __name__ == "__main__":
    main()
