"""``convscope net2vec``: concepts as weighted combinations of a layer's units, measured and shown (Fong & Vedaldi
2018; survey Eq. 20-21).

:func:`run_net2vec` runs :func:`~convscope.methods.net2vec.net2vec` on a Broden-layout dataset (the synthetic one:
:func:`synthetic_dataset`) and writes, atomically, into ``out/``:

* ``net2vec_iou.png``: per concept, the held-out IoU of the learned combination against the best single unit's
  (NetDissect's IoU), with the trivial "every annotated pixel" mask's IoU as a tick; concepts where the combination
  does not beat both baselines beyond the margin are marked ``(trivial)`` in grey;
* ``segment_<concept>.png`` for the concepts where the combination adds most (or the ones asked for): the
  held-out images with the most pixels of the concept, each as image | ground truth | the combination's mask
  (``w . I(x) + b > 0``) | the best unit's mask (``A_u > T_u``), captioned with the image's IoU;
* ``net2vec.html`` (settings, chart, a table row per concept: IoU of the combination, of the best unit, of the top-1
  and top-5 weighted units alone, of the trivial mask, the gain over the better baseline with its bootstrap
  interval and whether it beats both, the share of pixels the combination marks, units needed for ``coverage`` of
  the combination's IoU, the largest weights; then the segmentations; PNGs linked, or embedded when
  ``self_contained``) and ``net2vec.json``.

:func:`summary` is the plain-text table the CLI prints.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..core.io import atomic_write_text
from ..core.probe import probe
from ..core.render import grid, load_font, save_png, text_size
from ..core.report import HtmlReport
from ..data.broden import BrodenDataset, broden_collate
from ..errors import ConvscopeError
from ..methods.dissect import DissectConfig, batch_labels, concept_space, open_dataset
from ..methods.net2vec import Net2VecConfig, Net2VecResult, net2vec

__all__ = ["ConceptMasks", "Net2VecRun", "held_out_indices", "iou_chart", "run_net2vec", "segment", "summary",
           "synthetic_dataset"]

COMBINATION_COLOR = (67, 147, 195)
UNIT_COLOR = (214, 96, 77)
TRUTH_COLOR = (90, 174, 97)


@dataclass(frozen=True)
class Net2VecRun:
    """What :func:`run_net2vec` made: the method's ``result``, ``rows`` (one dict per concept), the chart, the
    segmentation pictures (``{concept: path}``), the HTML page and the JSON file."""

    result: Net2VecResult
    rows: list[dict]
    chart: Path
    pictures: dict[str, Path]
    html: Path
    json: Path


@dataclass(frozen=True)
class ConceptMasks:
    """Masks of one concept on some images at the label resolution: ``images`` (``N x 3 x H x W`` RGB in [0, 1]),
    ``truth``, ``combination`` (Net2Vec's ``w . I(x) + b > tau``), ``unit`` (the best single unit's ``A_u > T_u``), each
    ``N x h x w`` bool, ``annotated`` (``N``: the image has labels of the concept's category)."""

    images: torch.Tensor
    truth: torch.Tensor
    combination: torch.Tensor
    unit: torch.Tensor
    annotated: torch.Tensor


def synthetic_dataset(path: str | os.PathLike[str], n: int = 400, size: int = 112, seed: int = 1, workers: int = 2,
                      progress: bool = True) -> Path:
    """The synthetic concept dataset in ``path``: generated once (:func:`~convscope.data.synthetic.generate`) and
    reused while ``n``, ``size`` and ``seed`` stay the same (regenerated when they change)."""
    from ..data.synthetic import generate

    root = Path(path)
    meta = root / "synth.json"
    if (root / "index.csv").is_file() and meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            old = {}
        if (old.get("n"), old.get("size"), old.get("seed")) == (n, size, seed):
            return root
    return generate(root, n=n, size=size, seed=seed, workers=workers, progress=progress)


def _config(config: Net2VecConfig) -> DissectConfig:
    """The dataset settings :func:`~convscope.methods.net2vec.net2vec` opens the dataset with."""
    return DissectConfig(quantile=config.quantile, seg_size=config.seg_size, categories=config.categories,
                         batch_size=config.batch_size, workers=config.workers)


def held_out_indices(dataset: BrodenDataset, config: Net2VecConfig) -> list[int]:
    """The images :func:`~convscope.methods.net2vec.net2vec` evaluates on: the rows of ``config.val_split`` when the
    dataset has them and other rows too, else its last ``config.val_fraction``."""
    if dataset.split is None and config.val_split in dataset.splits and len(dataset.splits) > 1:
        val = BrodenDataset(dataset.root, categories=dataset.categories, split=config.val_split, size=dataset.size,
                            seg_size=dataset.seg_size, check_files=False)
        wanted = {str(val.image_path(i)) for i in range(len(val))}
        return [i for i in range(len(dataset)) if str(dataset.image_path(i)) in wanted]
    n = len(dataset)
    return list(range(n - max(1, round(config.val_fraction * n)), n))


def segment(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], result: Net2VecResult, concept: str,
            indices: Sequence[int], config: Net2VecConfig | None = None, batch_size: int = 32) -> ConceptMasks:
    """``concept``'s ground truth, the learned combination's mask and the best unit's mask on the images
    ``indices`` of ``dataset`` (opened as :func:`~convscope.methods.net2vec.net2vec` opens it with ``config``)."""
    config = config if config is not None else Net2VecConfig()
    ds = open_dataset(dataset, model, _config(config))
    space = concept_space(ds, config.categories)
    j = result.concepts.index(result.row(concept).concept)
    col = space.names.index(concept)
    unit = result.row(concept).best_unit
    pre = getattr(model, "preprocess", None)
    normalize = getattr(pre, "normalize", None)
    norm: Callable[[torch.Tensor], torch.Tensor] = normalize if callable(normalize) else (lambda t: t)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    t = result.thresholds.double()
    images, truth, comb, single, annotated = [], [], [], [], []
    for s in range(0, len(indices), batch_size):
        batch = broden_collate([ds[int(i)] for i in indices[s:s + batch_size]])
        lab = batch_labels(batch, space, ds.seg_size)
        with torch.no_grad(), probe(model, [result.layer], stop_after=result.layer, detach=True) as p:
            p.forward(model, norm(batch["images"]).to(dev))
            a = p.activations[result.layer].float().cpu()
        a = a[:, :, None, None] if a.dim() == 2 else a
        up = F.interpolate(a, size=lab.size, mode="bilinear", align_corners=False) if a.shape[-2:] != lab.size else a
        if config.inputs == "binary":
            x = (up.double() > t[None, :, None, None]).float()
        else:
            x = up / t.float().clamp(min=1e-6)[None, :, None, None]
        logit = torch.einsum("nkp,k->np", x.flatten(2), result.weights[j])
        tau = float(result.decision[j]) if result.decision is not None else 0.0
        comb.append((logit + result.bias[j] > tau).view(-1, *lab.size))
        single.append(up[:, unit].double() > t[unit])
        truth.append((lab.cols == col).any(1).view(-1, *lab.size) | (lab.image_level[:, col] > 0)[:, None, None])
        annotated.append(lab.annotated[:, col].bool())
        images.append(batch["images"])
    return ConceptMasks(torch.cat(images), torch.cat(truth), torch.cat(comb), torch.cat(single), torch.cat(annotated))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _highlight(img: torch.Tensor, mask: torch.Tensor, color: tuple[int, int, int]) -> torch.Tensor:
    """The image dimmed outside ``mask`` (upsampled, nearest) and the mask's border drawn in ``color``."""
    m = F.interpolate(mask[None, None].float(), size=img.shape[-2:], mode="nearest")[0, 0] > 0.5
    edge = m & (F.max_pool2d((~m).float()[None, None], 3, 1, 1)[0, 0] > 0)
    shown = img * (0.3 + 0.7 * m.float())
    shown[:, edge] = torch.tensor(color, dtype=shown.dtype)[:, None] / 255
    return shown.clamp(0, 1)


def iou_chart(rows: Sequence[dict], title: str = "held-out IoU") -> Image.Image:
    """Horizontal bars per concept: the combination's IoU (blue), the best single unit's (red), a black tick at the
    trivial mask's IoU (``iou_com``, ``best_unit_iou``, ``iou_all`` of each row); a row whose ``beats_baselines`` is
    false has its name in grey with ``(trivial)``."""
    font, small = load_font(13), load_font(11)
    name_w = max([text_size(small, r["concept"] + " (trivial)")[0] for r in rows] + [40]) + 12
    bar_w, bar_h, gap, top = 360, 8, 6, 44
    vmax = max([0.05] + [max(r["iou_com"], r["best_unit_iou"], r["iou_all"]) for r in rows])
    width = name_w + bar_w + 60
    height = top + len(rows) * (2 * bar_h + gap) + 24
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 4), title, fill=(0, 0, 0), font=font)
    x = 8
    for label, color in (("combination", COMBINATION_COLOR), ("best single unit", UNIT_COLOR),
                         ("all annotated pixels", (0, 0, 0))):
        d.rectangle([x, 26, x + 10, 36], fill=color)
        d.text((x + 14, 24), label, fill=(0, 0, 0), font=small)
        x += text_size(small, label)[0] + 30
    scale = bar_w / vmax
    for i, r in enumerate(rows):
        y = top + i * (2 * bar_h + gap)
        beats = r.get("beats_baselines", True)
        d.text((8, y + bar_h - 6), r["concept"] + ("" if beats else " (trivial)"),
               fill=(0, 0, 0) if beats else (150, 150, 150), font=small)
        for k, (key, color) in enumerate((("iou_com", COMBINATION_COLOR), ("best_unit_iou", UNIT_COLOR))):
            d.rectangle([name_w, y + k * bar_h, name_w + max(1, round(r[key] * scale)), y + (k + 1) * bar_h - 1],
                        fill=color)
        tick = name_w + round(r["iou_all"] * scale)
        d.line([tick, y - 1, tick, y + 2 * bar_h], fill=(0, 0, 0), width=2)
        d.text((name_w + round(max(r["iou_com"], r["best_unit_iou"]) * scale) + 4, y + bar_h - 6),
               f"{r['iou_com']:.2f} / {r['best_unit_iou']:.2f}", fill=(60, 60, 60), font=small)
    y = top + len(rows) * (2 * bar_h + gap) + 4
    d.line([name_w, y, name_w + bar_w, y], fill=(0, 0, 0))
    for v in (0.0, vmax / 2, vmax):
        d.text((name_w + round(v * scale) - 8, y + 3), f"{v:.2f}", fill=(0, 0, 0), font=small)
    return img


def summary(rows: Sequence[dict], margin: float = 0.0) -> str:
    """The per-concept table the CLI prints: IoU of the combination, the best unit, the all-pixels mask, the gain
    over the better baseline with its interval, and ``beats`` (``yes`` / ``NO``); a last line counts the concepts
    that do not beat the baselines."""
    w = max([len(r["concept"]) for r in rows] + [7])
    lines = [f"{'concept':<{w}}  IoU combination  best unit (IoU)  all pixels  gain [95% CI]              beats"]
    for r in rows:
        lo, hi = r["gain_ci"]
        lines.append(f"{r['concept']:<{w}}  {r['iou_com']:15.3f}  {r['best_unit']:>5} ({r['best_unit_iou']:.3f})  "
                     f"{r['iou_all']:10.3f}  {r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
                     f"{'yes' if r['beats_baselines'] else 'NO'}")
    trivial = sum(not r["beats_baselines"] for r in rows)
    lines.append(f"{trivial} of {len(rows)} concepts do not beat both trivial baselines (best single unit, every "
                 f"annotated pixel) by more than {margin:g} IoU at the interval's lower end")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "concept"


def run_net2vec(model: nn.Module, dataset_path: BrodenDataset | str | os.PathLike[str], layer: str,
                out: str | Path = Path("out/net2vec"), concepts: Sequence[str] | None = None,
                config: Net2VecConfig | None = None, *, pictures: int = 8, examples: int = 4, top_units: int = 5,
                scan: int = 256, progress: bool | None = None, self_contained: bool = False) -> Net2VecRun:
    """Net2Vec of ``layer`` on the Broden-layout dataset ``dataset_path`` (see the module docstring).

    Args:
        concepts: concept names (default: every concept with positive pixels in the training and held-out images).
        config: :class:`~convscope.methods.net2vec.Net2VecConfig` (default: its defaults).
        pictures: segmentation pictures for this many concepts (the asked ``concepts`` in order, else those whose
            combination's IoU exceeds both baselines, the best unit's and the trivial mask's, by the most);
            ``examples``: held-out images per picture (those of the first ``scan`` held-out images with the most
            pixels of the concept).
        top_units: the largest weights (by magnitude) listed per concept.
    """
    for name, v in (("pictures", pictures), ("examples", examples), ("top_units", top_units), ("scan", scan)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "pictures" else 1):
            kind = "non-negative" if name == "pictures" else "positive"
            raise ConvscopeError(f"run_net2vec({name}={v!r}): use a {kind} int")
    config = config if config is not None else Net2VecConfig()
    res = net2vec(model, dataset_path, layer, concepts=concepts, config=config, progress=progress)
    k = res.weights.shape[1]
    rows: list[dict[str, Any]] = []
    for j, r in enumerate(res.rows):
        w = res.weights[j]
        order = w.abs().argsort(descending=True)[:top_units].tolist()
        rows.append({"concept": r.concept, "category": r.category, "iou_com": r.iou_com, "best_unit": r.best_unit,
                     "best_unit_iou": r.best_unit_iou, "iou_all": r.iou_all, "gain": r.gain,
                     "gain_ci": [r.gain_low, r.gain_high], "beats_baselines": r.beats_baselines,
                     "positive_fraction": r.positive_fraction, "threshold": r.threshold,
                     "iou_top1": float(res.iou_by_units[j, 0]), "iou_top5": float(res.iou_by_units[j, min(5, k) - 1]),
                     "units_needed": r.units_needed, "bias": float(res.bias[j]),
                     "top_units": [{"unit": u, "weight": float(w[u])} for u in order]})
    out = Path(out)
    model_name = getattr(model, "zoo_name", None) or type(model).__name__
    chart = save_png(iou_chart(rows, f"{model_name} {res.layer}: held-out IoU, combination vs best single unit"),
                     out / "net2vec_iou.png")

    chosen = list(dict.fromkeys(concepts))[:pictures] if concepts else [  # where the combination adds most
        r["concept"] for r in sorted(rows, key=lambda r: -r["gain"]) if r["iou_com"] > 0][:pictures]
    picture_paths: dict[str, Path] = {}
    if chosen:
        ds = open_dataset(dataset_path, model, _config(config))
        val = held_out_indices(ds, config)[:scan]
        by_name = {r["concept"]: r for r in rows}
        for concept in chosen:
            m = segment(model, ds, res, concept, val, config)
            count = (m.truth.flatten(1).sum(1) * m.annotated).tolist()
            pick = [i for i in sorted(range(len(val)), key=lambda i: -count[i]) if count[i] > 0][:examples]
            if not pick:
                continue
            tiles, caps = [], []
            for i in pick:
                img = m.images[i]
                tiles += [img, _highlight(img, m.truth[i], TRUTH_COLOR),
                          _highlight(img, m.combination[i], COMBINATION_COLOR), _highlight(img, m.unit[i], UNIT_COLOR)]
                caps += [f"#{val[i]}", "truth", f"IoU {_iou(m.combination[i], m.truth[i]):.2f}",
                         f"IoU {_iou(m.unit[i], m.truth[i]):.2f}"]
            unit = by_name[concept]["best_unit"]
            picture_paths[concept] = save_png(
                grid(tiles, nrow=4, col_labels=["image", "truth", "combination", f"unit {unit}"], cell_labels=caps),
                out / f"segment_{_slug(concept)}.png")

    rep = HtmlReport(f"convscope net2vec: {model_name} {res.layer}", self_contained=self_contained)
    inputs = "binarized at" if config.inputs == "binary" else "divided by"
    decision = ("sigmoid(w . I(x) + b) > 0.5" if config.decision == "paper" else
                "w . I(x) + b > tau, tau the threshold of best IoU on the training images")
    rep.text("Net2Vec (Fong & Vedaldi 2018) learns, for every concept, weights over all units of the layer and "
             f"segments with {decision}, I(x) the units' maps upsampled to the label resolution and "
             f"{inputs} their NetDissect thresholds (the top {config.quantile:g} of activations). IoU on held-out "
             "images: the combination, the best single unit (NetDissect's IoU), the top-1 / top-5 weighted units "
             "alone (no retraining), and the trivial mask of every annotated pixel; gain: the combination minus the "
             f"better of the two baselines, with its {config.confidence:.0%} bootstrap interval over held-out images; "
             f"a concept beats the baselines when that interval's lower end exceeds {config.margin:g}; marked: the "
             "share of annotated pixels the combination marks; units needed: the fewest top "
             f"weights reaching {config.coverage:.0%} of the combination's IoU.")
    trivial = [r["concept"] for r in rows if not r["beats_baselines"]]
    if trivial:
        rep.text(f"{len(trivial)} of {len(rows)} concepts do not beat the trivial baselines (beyond the margin): "
                 f"{', '.join(trivial)}. Their IoU says nothing about how the layer encodes them.")
    seg = config.seg_size if config.seg_size is not None else "the dataset's"
    source = str(dataset_path.root if isinstance(dataset_path, BrodenDataset) else Path(dataset_path))
    loss = f"{res.loss[0]:.4g} / {res.loss[-1]:.4g}" if res.loss else ""
    rep.table([["model", model_name], ["layer", res.layer], ["units", k], ["dataset", source],
               ["training images", res.train_images], ["held-out images", res.val_images], ["concepts", len(rows)],
               ["quantile", config.quantile], ["inputs", config.inputs], ["label resolution", seg],
               ["epochs", config.epochs], ["lr / momentum", f"{config.lr} / {config.momentum}"],
               ["loss", "class-balanced (Eq. 21)" if config.balance else "plain cross-entropy"],
               ["decision", config.decision], ["margin", config.margin],
               ["loss (first / last epoch)", loss]], header=["setting", "value"])
    rep.image(chart, caption=f"{chart.name}: held-out IoU per concept; bars: combination (blue), best single unit "
                             "(red); tick: every annotated pixel")
    rep.heading("Per concept")
    rep.table([[r["concept"], r["category"], r["iou_com"], r["best_unit"], r["best_unit_iou"], r["iou_all"],
                f"{r['gain']:+.3f} [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]",
                "yes" if r["beats_baselines"] else "NO", f"{r['positive_fraction']:.0%}",
                r["iou_top1"], r["iou_top5"], r["units_needed"],
                ", ".join(f"{u['unit']}: {u['weight']:+.2f}" for u in r["top_units"])] for r in rows],
              header=["concept", "category", "IoU combination", "best unit", "IoU best unit", "IoU all pixels",
                      "gain over baselines [CI]", "beats baselines", "marked", "IoU top-1 weight",
                      "IoU top-5 weights", "units needed", "largest weights"])
    if picture_paths:
        by_concept = {row["concept"]: row for row in rows}
        rep.heading("Segmentations on held-out images")
        rep.text("Per concept, the held-out images with the most pixels of it: the image (its dataset index), the "
                 "ground truth, the combination's mask and the best single unit's mask, with each mask's IoU on "
                 "that image.")
        for concept, path in picture_paths.items():
            row = by_concept[concept]
            rep.heading(concept, 3)
            rep.image(path, caption=f"{path.name}: {concept} ({row['category']}), IoU combination "
                                    f"{row['iou_com']:.3f} vs unit {row['best_unit']} {row['best_unit_iou']:.3f}")
    html = rep.write(out / "net2vec.html")
    json_path = atomic_write_text(out / "net2vec.json", json.dumps({
        "model": model_name, "layer": res.layer, "units": k, "train_images": res.train_images,
        "val_images": res.val_images, "config": {f: getattr(config, f) for f in config.__dataclass_fields__},
        "loss": res.loss, "pictures": {c: p.name for c, p in picture_paths.items()}, "rows": rows}, indent=1))
    return Net2VecRun(res, rows, chart, picture_paths, html, json_path)
