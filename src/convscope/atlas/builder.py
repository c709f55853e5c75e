"""Build a model atlas: for every unit of the chosen layers, its pictures and scores, resumable, in parallel.

For each unit (OpenAI Microscope's unit pages, from the methods of this package):

* **top-k**: its ``k`` strongest activations over a dataset (Zeiler & Fergus 2014, Sec. 4, Fig. 2): one picture
  with the DeconvNet projections of those activations beside the image patches under their receptive fields
  (:func:`~convscope.methods.topk.top_k_patches`, :func:`~convscope.methods.topk.render_patches`), the list
  (image, location, value, box) as ``top`` and the strongest value as ``max_activation``;
* **activation maximization** (Erhan et al. 2009, regularized per Yosinski et al. 2015 by default): one picture and
  the activation it reaches, many units per batch (:func:`~convscope.methods.maximize.activation_maximization`);
* **dissection** (Bau et al. 2017), when a concept dataset is given: its best concept, category and IoU
  (:func:`~convscope.methods.dissect.dissect`).

Everything is stored by :class:`~convscope.atlas.store.Atlas` (SQLite + PNG files).

**Stages.** (1) the top-k pass: the dataset is cut into shards of whole batches; each shard's per-unit top-k
(ordered by value, ties broken by image id) is stored as it finishes, and shards merge exactly into the
dataset's top-k. (2) unit chunks: per layer, the units not yet done are cut into chunks of ``chunk`` units; a
chunk is computed (by a worker), its files are written, then its rows are committed in one transaction. The
dissection is one task for all layers (it keeps its own resumable state in ``DIR/dissect``).

**Resume.** Rerunning the same command skips finished shards and units (``Atlas.done``) and redoes only
unfinished chunks; ``kill -9`` at any moment leaves a store in which every recorded unit has its files. The model's
weights hash and the settings that change results are stored in ``meta``; a rerun with a different model or
settings is refused.

**Same atlas however it is run.** A unit's result does not depend on the chunk it falls in or the worker that
ran it: the top-k merge is order-independent, top-k pictures are scaled per unit, and the activation-maximization
start and random transforms of a unit come from a generator seeded by ``(seed, layer, unit)``. (Floating-point
sums may still differ in the last bits between batch compositions and thread counts.)
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..applications.deconv import ImageSet, default_images
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.device import tune_cpu_allocator
from ..core.layers import resolve_layers
from ..core.model import model_hash
from ..core.progress import progress_bar
from ..core.render import to_pil
from ..core.stream import layer_features
from ..errors import ConvscopeError
from ..methods.dissect import DissectConfig, dissect
from ..methods.maximize import PRESETS, activation_maximization
from ..methods.topk import (
    RunningTopK,
    TopKActivations,
    TopKPatches,
    render_patches,
    top_k_activations,
    top_k_patches,
)
from ..models.zoo import load_model
from .executors import make_executor, pickle_for_workers
from .store import Atlas, AtlasError, LayerRecord

SHARD_BATCHES = 4  # dataset batches per top-k shard (a unit of work and of resume)
DEFAULT_AM_STEPS = 128
DEFAULT_CONCEPT_IMAGES = 500
STAGES = {"top": "top_image", "am": "am_image", "concepts": "concept"}  # stage -> the column that marks it done


# --------------------------------------------------------------------------- order-independent top-k


def unit_seed(seed: int, layer: str, unit: int) -> int:
    """The seed of one unit's activation maximization: a hash of ``(seed, layer, unit)`` (62 bits), so a unit
    gets the same start and transforms whichever batch, chunk, worker or run computes it."""
    digest = hashlib.sha256(f"{int(seed)}\x00{layer}\x00{int(unit)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


# --------------------------------------------------------------------------- what a worker holds and runs


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker rebuilds the model and the dataset: ``model`` a :func:`~convscope.models.zoo.load_model` spec
    or a pickled ``nn.Module``; ``images`` / ``synthetic`` as :func:`~convscope.applications.deconv.default_images`
    takes them."""

    model: str | bytes
    weights: str | None = None
    device: str = "auto"
    images: list[str] | torch.Tensor | None = None
    synthetic: int | None = None


@dataclass
class Context:
    """A worker's model and (built on first use) dataset."""

    model: nn.Module
    spec: WorkerSpec
    _data: ImageSet | None = None

    @property
    def data(self) -> ImageSet:
        if self._data is None:
            self._data = default_images(self.model, self.spec.images, self.spec.synthetic, progress=False)
        return self._data


def setup_worker(spec: WorkerSpec) -> Context:
    """Load the model once per worker (the executors call this in each worker)."""
    tune_cpu_allocator()
    if isinstance(spec.model, bytes):
        model = pickle.loads(spec.model)
    else:
        model = load_model(spec.model, weights=spec.weights, device=spec.device)
    return Context(model, spec)


TOP_PNG_LEVEL = 1  # zlib level of the top-k pictures: 38 % less encoding time than PIL's 6, files 5 % larger


def _png(img: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


@dataclass(frozen=True)
class TopKShard:
    """Images ``start .. stop-1`` (whole batches): per layer the :class:`~convscope.methods.topk.RunningTopK` state
    of that shard."""

    start: int
    stop: int
    layers: tuple[str, ...]
    k: int
    batch_size: int

    @property
    def key(self) -> str:
        return f"{self.start}-{self.stop}"

    def run(self, ctx: Context) -> dict[str, RunningTopK]:
        data, bs = ctx.data, self.batch_size

        def batches():
            for s in range(self.start, self.stop, bs):
                ids = range(s, min(s + bs, self.stop))
                yield data.load(ids), torch.tensor(list(ids))

        found = top_k_activations(ctx.model, batches(), list(self.layers), k=self.k, batch_size=bs, progress=False)
        return {n: RunningTopK.from_result(r, self.k) for n, r in found.items()}


@dataclass(frozen=True)
class RenderTop:
    """Units of one layer: their Fig. 2 pictures (PNG bytes), top-k lists and dataset maxima."""

    layer: str
    units: tuple[int, ...]
    result: TopKActivations
    display: str
    batch_size: int

    def run(self, ctx: Context) -> dict[int, dict[str, Any]]:
        r, data = self.result, ctx.data
        found = top_k_patches(ctx.model, data, r, units=list(self.units), projections=True,
                              batch_size=self.batch_size)
        out: dict[int, dict[str, Any]] = {}
        for j, u in enumerate(self.units):
            one = TopKPatches([u], found.boxes[j:j + 1], [found.patches[j]],
                              None if found.projections is None else [found.projections[j]])
            top = [{"image": int(r.image_ids[u, i]), "source": data.names[int(r.image_ids[u, i])],
                    "score": float(r.values[u, i]), "y": int(r.locations[u, i, 0]), "x": int(r.locations[u, i, 1]),
                    "box": [int(v) for v in found.boxes[j, i]]} for i in range(r.values.shape[1])]
            out[u] = {"png": _png(render_patches(one, self.display), TOP_PNG_LEVEL), "top": top,
                      "max_activation": float(r.values[u, 0])}
        return out


@dataclass(frozen=True)
class Maximize:
    """Units of one layer optimized together (``batch_size`` rows at a time; ``"auto"``: from the model's
    activation sizes and the worker's allocator, at most the chunk): PNG bytes and the activation each picture
    reaches (rows are independent and seeded per unit, so the pictures do not depend on the batching)."""

    layer: str
    units: tuple[int, ...]
    seed: int
    steps: int
    preset: str
    size: int | None
    batch_size: BatchSize = "auto"

    def run(self, ctx: Context) -> dict[int, dict[str, Any]]:
        res = activation_maximization(
            ctx.model, self.layer, list(self.units), steps=self.steps, regularize=self.preset,
            parametrization="fourier" if self.preset == "olah" else "pixel", size=self.size,
            seed=[unit_seed(self.seed, self.layer, u) for u in self.units], batch_size=self.batch_size,
            progress=False)
        return {u: {"png": _png(to_pil(res.images[i])), "activation": float(res.activations[i])}
                for i, u in enumerate(self.units)}


@dataclass(frozen=True)
class Dissect:
    """Network Dissection of all layers on a Broden-layout folder, resumable in ``state``."""

    dataset: str
    layers: tuple[str, ...]
    config: DissectConfig
    state: str
    progress: bool = False

    def run(self, ctx: Context) -> dict[str, list[dict[str, Any]]]:
        found = dissect(ctx.model, self.dataset, list(self.layers), self.config, out=self.state,
                        progress=self.progress)
        return {n: [{"unit": r.unit, "concept": r.label, "category": r.category, "iou": r.iou,
                     "detector": int(r.detector)} for r in d.rows] for n, d in found.items()}


def run_task(ctx: Context, task: Any) -> tuple[Any, Any, float]:
    """What a worker runs: ``(task, its result, seconds it took)``."""
    t0 = time.perf_counter()
    out = task.run(ctx)
    return task, out, time.perf_counter() - t0


# --------------------------------------------------------------------------- the build


@dataclass
class BuildStats:
    """Per stage: ``tasks``, ``units`` done in this run and ``seconds`` of task work (summed over workers);
    ``wall`` seconds per phase."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, units: int, seconds: float) -> None:
        s = self.stages.setdefault(stage, {"tasks": 0, "units": 0, "seconds": 0.0})
        s["tasks"] += 1
        s["units"] += units
        s["seconds"] += seconds


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConvscopeError(f"{name}={value!r}: give a positive int")
    return value


def _model_name(model: str | nn.Module, loaded: nn.Module) -> str:
    return getattr(loaded, "zoo_name", None) or (model if isinstance(model, str) else type(loaded).__name__)


def _images_fingerprint(data: ImageSet, images: object) -> str:
    h = hashlib.sha1("\n".join(data.names).encode())
    if isinstance(images, torch.Tensor):
        h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return f"{data.source} ({h.hexdigest()[:16]})"


def _check_meta(atlas: Atlas, meta: dict[str, str]) -> None:
    old = atlas.meta()
    if "model_hash" not in old:
        atlas.set_meta(meta)
        return
    if old["model_hash"] != meta["model_hash"]:
        raise AtlasError(f"{atlas.root} holds an atlas of {old.get('model')} (weights {old['model_hash'][:12]}), "
                         f"but this build uses {meta['model']} (weights {meta['model_hash'][:12]}); build into a new "
                         "folder (--out), or resume with the same model and weights")
    before, now = json.loads(old.get("settings", "{}")), json.loads(meta["settings"])
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if diff:
        what = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in diff)
        raise AtlasError(f"{atlas.root} was built with other settings ({what}); resume with the same settings, or "
                         "build into a new folder (--out)")


def _sweep_temp(atlas: Atlas) -> None:
    """Remove temp files an interrupted build left (a file whose rename never happened)."""
    for p in atlas.files_root.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def _chunks(units: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(units[i:i + size]) for i in range(0, len(units), size)]


def _concept_dataset(concepts: str, out: Path, n: int, seed: int, progress: bool) -> Path:
    """``"synthetic"``: ``n`` synthetic Broden-layout images generated once into ``DIR/concepts``; else a folder."""
    if concepts == "synthetic":
        from ..data.synthetic import generate

        path = out / "concepts"
        if not (path / "index.csv").exists():  # generated once (index.csv is written last); a rerun reuses it
            generate(path, n=n, size=112, seed=seed + 1, workers=2, progress=progress)
        return path
    path = Path(concepts)
    if not (path / "index.csv").is_file():
        raise ConvscopeError(f"--concepts {concepts!r}: no Broden-layout folder there (index.csv missing); give a "
                             "Broden folder or 'synthetic'")
    return path.resolve()


def build_atlas(
    model: str | nn.Module, layers: str | Sequence[str], out: str | os.PathLike[str], *,
    images: Sequence[str | os.PathLike[str]] | torch.Tensor | None = None, synthetic: int | None = None,
    k: int = 9, am_steps: int = DEFAULT_AM_STEPS, am_preset: str = "yosinski", am_size: int | None = None,
    concepts: str | os.PathLike[str] | None = None, concept_images: int = DEFAULT_CONCEPT_IMAGES,
    display: str = "percentile", workers: int = 1, executor: str = "local", ray_address: str | None = None,
    chunk: int = 16, batch_size: BatchSize = "auto", am_batch_size: BatchSize = "auto",
    seed: int = 0, weights: str | os.PathLike[str] | None = None,
    device: str = "auto", progress: bool = True,
) -> Atlas:
    """Build (or resume) the atlas of every unit of ``layers`` in the folder ``out``; returns it opened read-only.

    Args:
        model: a zoo name / model spec (``load_model``; each worker loads it once) or an ``nn.Module`` (used as is
            in this process; pickled to worker processes, by value with cloudpickle where it is installed).
        layers: layer names (a list or a comma-separated string; ``convscope layers MODEL``).
        images, synthetic: the dataset of the top-k stage (as :func:`~convscope.applications.deconv.
            default_images`: paths / folders or a tensor in the model's input space; ``synthetic=N`` held-out
            synthetic images; default the bundled photos, 500 synthetic images for ``demo_net``).
        k: top activations per unit (9: Zeiler & Fergus Fig. 2).
        am_steps, am_preset, am_size: activation maximization steps, regularization preset (``yosinski``,
            ``olah`` (Fourier), ``simonyan``, ``none``) and image side (default the model's input size).
        concepts: ``"synthetic"`` (generated once into ``out/concepts``, ``concept_images`` images) or a Broden
            folder: adds each unit's dissection label and IoU.
        display: how projections are scaled in the top-k pictures (``"percentile"`` or ``"signed"``).
        workers, executor, ray_address: ``"local"`` with ``workers`` processes (1: this process), or ``"ray"``
            (``ray_address`` ``None``: a local Ray instance with ``workers`` CPUs; ``"auto"`` / an address: a
            running cluster).
        chunk: units per task (and per activation-maximization batch, and per commit).
        batch_size: images per forward pass in the top-k stage, the DeconvNet projections and the dissection;
            ``"auto"`` (default): resolved once, in this process after the allocator is tuned, from the model's
            activation sizes (:mod:`convscope.core.batching`), and kept in the atlas's meta, so every worker and
            every resume cuts the same shards.
        am_batch_size: activation-maximization rows optimized jointly (at most ``chunk``); ``"auto"`` (default):
            resolved by each worker.
        seed: seed of the activation maximization (each unit's generator is seeded by ``(seed, layer, unit)``).
        progress: a bar with an ETA per stage (stacked on a terminal; time-stamped lines in a log).
    """
    k, am_steps, chunk = (_positive(n, v) for n, v in (("k", k), ("am_steps", am_steps), ("chunk", chunk)))
    check_batch_size(batch_size, "build_atlas")
    check_batch_size(am_batch_size, "build_atlas(am_batch_size=...)")
    _positive("concept_images", concept_images)
    _positive("workers", workers)
    if am_preset not in PRESETS:
        raise ConvscopeError(f"am_preset={am_preset!r}: use one of {', '.join(PRESETS)}")
    if display not in ("percentile", "signed"):
        raise ConvscopeError(f"display={display!r}: use 'percentile' or 'signed'")
    paths: list[str] | torch.Tensor | None
    if images is None or isinstance(images, torch.Tensor):
        paths = images
    else:  # absolute: workers (Ray's included) may run in another folder
        paths = [str(Path(p).resolve()) for p in ([images] if isinstance(images, str | os.PathLike) else images)]
    out = Path(out)
    tune_cpu_allocator()
    user_module = isinstance(model, nn.Module)
    if user_module and weights is not None:
        raise ConvscopeError("weights= is for a model given by name; load the weights into your module first")
    net = model if isinstance(model, nn.Module) else load_model(model, weights=weights, device=device)
    names = list(resolve_layers(net, layers))
    if not names:
        raise ConvscopeError("layers: give at least one layer name (`convscope layers MODEL` lists them)")
    data = default_images(net, paths, synthetic, progress)
    first = data.load([0])
    acts = layer_features(net, first, names)
    order = {n: i for i, (n, _) in enumerate(net.named_modules())}
    records = []
    for n in names:
        a = acts.get(n)
        if not isinstance(a, torch.Tensor) or a.dim() not in (2, 4):
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else "nothing"
            raise ConvscopeError(f"layer {n!r} outputs {shape}; an atlas needs convolutional (N x C x H x W) or "
                                 "linear layers (`convscope layers MODEL` lists them)")
        records.append(LayerRecord(n, order[n], int(a.shape[1]), tuple(int(s) for s in a.shape[1:])))

    concept_path = None
    settings = {"k": k, "am_steps": am_steps, "am_preset": am_preset, "am_size": am_size, "seed": seed,
                "display": display, "images": _images_fingerprint(data, paths),
                "concepts": None if concepts is None else (
                    f"synthetic ({concept_images} images)" if str(concepts) == "synthetic"
                    else str(Path(concepts).resolve()))}
    atlas = Atlas(out, mode="w")
    try:
        _check_meta(atlas, {"model": _model_name(model, net), "model_hash": model_hash(net),
                            "settings": json.dumps(settings, sort_keys=True)})
        atlas.add_layers(records)
        kept = atlas.meta().get("auto_batch_rows") if batch_size == "auto" else None  # a resume cuts the same shards
        rows = int(kept) if kept else resolve_batch_size(batch_size, net, first, "build_atlas", limit=len(data))
        if batch_size == "auto":
            atlas.set_meta({"auto_batch_rows": str(rows)})
        _sweep_temp(atlas)
        if concepts is not None:
            concept_path = _concept_dataset(str(concepts), out, concept_images, seed, progress)
        remote = executor != "local" or workers > 1
        shipped = (pickle_for_workers(net) if remote else b"") if user_module else str(model)
        spec = WorkerSpec(shipped, None if weights is None else str(weights), str(device), paths, synthetic)
        stats = BuildStats()
        ex = make_executor(executor, workers if executor == "local" else (workers if workers > 1 else None),
                           (setup_worker, spec), context=Context(net, spec, data), address=ray_address)
        try:
            _build(atlas, ex, names, records, data, k, am_steps, am_preset, am_size, display, concept_path,
                   chunk, rows, am_batch_size, seed, progress, stats)
        finally:
            ex.close()
        atlas.set_meta({"last_build": {"workers": ex.workers, "executor": executor, "stages": stats.stages,
                                       "wall": stats.wall}})
    finally:
        atlas.close()
    return Atlas(out, mode="r")


def _build(atlas: Atlas, ex: Any, names: list[str], records: list[LayerRecord], data: ImageSet, k: int,
           am_steps: int, am_preset: str, am_size: int | None, display: str, concept_path: Path | None, chunk: int,
           batch_size: int, am_batch_size: BatchSize, seed: int, progress: bool, stats: BuildStats) -> None:
    units = {r.name: r.units for r in records}
    todo = {stage: {n: sorted(set(range(units[n])) - atlas.done(n, col)) for n in names}
            for stage, col in STAGES.items()}

    # stage 1: the top-k pass over the dataset, in shards of whole batches (each stored as it finishes)
    t0 = time.perf_counter()
    top_layers = [n for n in names if todo["top"][n]]
    results: dict[str, TopKActivations] = {}
    if top_layers:
        step = SHARD_BATCHES * batch_size
        shards = [(s, min(s + step, len(data))) for s in range(0, len(data), step)]
        parts: dict[str, dict[str, RunningTopK]] = {n: {} for n in top_layers}
        tasks = []
        for s, e in shards:
            missing = []
            for n in top_layers:
                blob = atlas.blob(f"topk/{n}/{s}-{e}")
                if blob is None:
                    missing.append(n)
                else:
                    parts[n][f"{s}-{e}"] = RunningTopK.from_bytes(n, k, blob)
            if missing:
                tasks.append(TopKShard(s, e, tuple(missing), k, batch_size))
        with progress_bar(total=sum(t.stop - t.start for t in tasks), desc="top-k pass", unit="img",
                          progress=progress if tasks else False) as bar:
            for task, found, secs in ex.map(run_task, tasks):
                for n, part in found.items():
                    atlas.put_blob(f"topk/{n}/{task.key}", part.to_bytes())
                    parts[n][task.key] = part
                stats.add("topk", task.stop - task.start, secs)
                bar.update(task.stop - task.start)
        results = {n: RunningTopK.best([parts[n][f"{s}-{e}"] for s, e in shards], k).result() for n in top_layers}
    stats.wall["topk"] = time.perf_counter() - t0

    # stage 2: unit chunks (top-k pictures, activation maximization) and the dissection, as workers free up
    t0 = time.perf_counter()
    tasks2: list[Any] = []
    concept_layers = [n for n in names if todo["concepts"][n]]
    if concept_path is not None and concept_layers:
        config = DissectConfig(batch_size=batch_size, workers=1 if ex.workers == 1 else 0)  # no nested pools
        state = atlas.root / "dissect" / hashlib.sha1(",".join(concept_layers).encode()).hexdigest()[:12]
        tasks2.append(Dissect(str(concept_path), tuple(concept_layers), config, str(state.resolve()),
                              progress=progress and ex.workers == 1))
    render = [RenderTop(n, c, results[n], display, batch_size)
              for n in top_layers for c in _chunks(todo["top"][n], chunk)]
    am = [Maximize(n, c, seed, am_steps, am_preset, am_size, am_batch_size)
          for n in names for c in _chunks(todo["am"][n], chunk)]
    # interleaved, so that both stages advance together and each bar's rate (and ETA) is meaningful
    tasks2 += [t for pair in itertools.zip_longest(render, am) for t in pair if t is not None]
    bars = {}
    totals = {"top": sum(len(todo["top"][n]) for n in top_layers), "am": sum(len(v) for v in todo["am"].values()),
              "concepts": sum(units[n] for n in concept_layers) if concept_path is not None else 0}
    labels = {"top": "top-k pictures", "am": "act. maximization", "concepts": "dissection"}
    for i, (stage, total) in enumerate(totals.items()):
        # stacked on a terminal (position); in a log, each bar prints its own time-stamped lines
        bars[stage] = progress_bar(total=total, desc=labels[stage], unit="unit", position=i,
                                   progress=progress if total else False)
    try:
        for task, found, secs in ex.map(run_task, tasks2):
            if isinstance(task, Dissect):
                for n, rows in found.items():
                    atlas.put_units(n, {r["unit"]: {k_: r[k_] for k_ in ("concept", "category", "iou", "detector")}
                                        for r in rows})
                    bars["concepts"].update(len(rows))
                stats.add("concepts", sum(len(r) for r in found.values()), secs)
                continue
            stage = "top" if isinstance(task, RenderTop) else "am"
            rows = {}
            for u, r in found.items():
                rel = atlas.write_bytes(Atlas.relpath(task.layer, u, stage), r["png"])
                if stage == "top":
                    rows[u] = {"top_image": rel, "top": r["top"], "max_activation": r["max_activation"]}
                else:
                    rows[u] = {"am_image": rel, "am_activation": r["activation"]}
            atlas.put_units(task.layer, rows)  # the files exist before the rows that name them commit
            stats.add(stage, len(rows), secs)
            bars[stage].update(len(rows))
    finally:
        for b in bars.values():
            b.close()
    stats.wall["units"] = time.perf_counter() - t0


def atlas_progress(atlas: Atlas) -> list[dict[str, Any]]:
    """Per layer: its units and how many are done per stage (``top``, ``am``, ``concepts``)."""
    rows = []
    for layer in atlas.layers():
        c = atlas.counts(layer.name)
        rows.append({"layer": layer.name, "units": layer.units, "shape": list(layer.shape),
                     **{stage: c[col] for stage, col in STAGES.items()}})
    return rows


__all__ = ["BuildStats", "WorkerSpec", "atlas_progress", "build_atlas", "setup_worker", "unit_seed"]
