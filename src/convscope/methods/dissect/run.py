"""Running a dissection: stream the dataset through the model, both passes, resumable state in ``out=``."""

from __future__ import annotations

import copy
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ...core.batching import resolve_batch_size
from ...core.io import atomic_write_bytes, atomic_write_text
from ...core.layers import resolve_layers
from ...core.model import input_normalizer, lenient_preprocess, model_device, model_hash
from ...core.progress import progress_bar
from ...core.stream import stream_layers
from ...data.broden import BrodenDataset, broden_collate
from ...errors import ConvscopeError, DataError
from ..topk import RunningTopK, TopKActivations
from .concepts import BatchLabels, ConceptSpace, batch_labels, concept_space
from .config import DissectConfig
from .quantile import TopBuffer
from .results import LayerDissection, layer_result
from .tally import tally_batch

# --------------------------------------------------------------------------- streaming and resuming


def open_dataset(dataset: BrodenDataset | str | os.PathLike[str], model: nn.Module | None,
                 config: DissectConfig) -> BrodenDataset:
    """``dataset`` as a :class:`BrodenDataset` with ``config.seg_size`` (a copy when it must change)."""
    if isinstance(dataset, str | os.PathLike):
        size = config.image_size
        if size is None and model is not None:
            size = lenient_preprocess(model).input_size
        return BrodenDataset(dataset, categories=config.categories, split=config.split, size=size,
                             seg_size=config.seg_size)
    if not isinstance(dataset, BrodenDataset):
        raise DataError(f"dissect(dataset=...) needs a BrodenDataset or a Broden folder path, got "
                        f"{type(dataset).__name__}; generate one with convscope.data.synthetic.generate(out)")
    seg = config.seg_size
    if isinstance(seg, int):  # DissectConfig already stores a pair
        seg = (seg, seg)
    if seg is not None and dataset.seg_size != seg:
        dataset = copy.copy(dataset)
        dataset.seg_size = seg
    return dataset


def batch_rows(model: nn.Module, dataset: BrodenDataset, config: DissectConfig,
               state: Mapping[str, Any] | None = None) -> int:
    """Images per forward pass: the one a saved pass ran with (``state["batch_size"]``, so a resumed run reads the
    same batches), else ``config.batch_size`` resolved for one image of ``dataset`` (``"auto"``:
    :mod:`convscope.core.batching`)."""
    if state and state.get("batch_size"):
        return int(state["batch_size"])
    if not isinstance(config.batch_size, str) or len(dataset) == 0:
        return int(config.batch_size) if not isinstance(config.batch_size, str) else 1
    image = torch.from_numpy(dataset.load_image(0)).permute(2, 0, 1)[None].float().div(255)
    sample = input_normalizer(model)(image).to(model_device(model))
    return resolve_batch_size(config.batch_size, model, sample, "dissect", limit=len(dataset))


def stream_dataset(model: nn.Module, dataset: BrodenDataset, layers: Sequence[str], batch_size: int, workers: int,
                   start_batch: int = 0, desc: str = "dissect", progress: bool | None = True,
                   reduce: Callable[[Mapping[str, Any], str, torch.Tensor], Any] | None = None,
                   stop_batch: int | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(collated batch, {layer: activations})`` per batch from ``start_batch`` on (up to ``stop_batch``, not
    included; None: to the end), images loaded by
    ``workers`` DataLoader processes while the model runs (through :func:`~convscope.methods.topk.stream_layers`);
    images are mapped to the model's input space with ``model.preprocess.normalize`` when it has one.

    With ``reduce``, ``reduce(batch, layer, activation)`` runs inside the forward hook, as each layer's output
    appears, and its value replaces the activation: the activation is used while it is still in cache and freed as
    soon as the next layer has consumed it (on lite0 13 % faster and 560 MB less than keeping all 49 layers).  A
    layer that runs twice in one forward pass (a shared module) is refused there, since its two outputs would both
    be counted."""
    from torch.utils.data import DataLoader, Dataset, Subset

    end = len(dataset) if stop_batch is None else min(len(dataset), stop_batch * batch_size)
    total = math.ceil(end / batch_size)
    first = start_batch * batch_size
    if first >= end:
        return
    items = cast(Dataset[dict[str, Any]], dataset)  # a map-style dataset: __getitem__ and __len__
    loader: DataLoader[dict[str, Any]] = DataLoader(
        Subset(items, range(first, end)), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=broden_collate, persistent_workers=False)
    norm, dev = input_normalizer(model), model_device(model)
    held: dict[str, Any] = {}

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in progress_bar(loader, total=total, initial=start_batch, desc=desc, unit="batch", progress=progress):
            held["batch"], held["ran"] = b, set()
            yield norm(b["images"]).to(dev), b["index"]

    def hook(layer: str, act: torch.Tensor) -> Any:
        if layer in held["ran"]:
            raise ConvscopeError(f"layer {layer!r} runs more than once per forward pass (a module shared by several "
                                 "places in the network); dissect a module that runs once, e.g. a separate "
                                 "activation module for each place")
        held["ran"].add(layer)
        assert reduce is not None
        return reduce(held["batch"], layer, act)

    for _, acts in stream_layers(model, images(), list(layers), batch_size, progress=False,
                                 reduce=hook if reduce is not None else None):
        yield held["batch"], acts


class DissectStore:
    """The resumable state of a run in ``out``: ``dissect_meta.json`` plus ``pass1.pt`` / ``pass2.pt`` (one
    process) or ``shards.json`` and ``pass1/shard_NNNN.pt`` / ``pass2/shard_NNNN.pt`` (sharded,
    :mod:`~convscope.methods.dissect.shards`)."""

    def __init__(self, out: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "dissect_meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ConvscopeError(f"{self.out} holds a dissection with a different {', '.join(diff)}; pass another "
                                     "out folder, or delete this one to start over")
        else:
            atomic_write_text(path, json.dumps(meta, indent=1))

    def path(self, name: str) -> Path:
        return self.out / f"{name}.pt"

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state file: say which, and how to recover
            raise ConvscopeError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute "
                                 "that part") from None

    def save(self, name: str, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())


def store_meta(model: nn.Module, ds: BrodenDataset, names: Sequence[str], config: DissectConfig) -> dict[str, Any]:
    """What a resumed run must share with the saved one: model weights, configuration, layers, dataset."""
    return {"format": 2, "config": config.fingerprint(), "layers": list(names), "model": model_hash(model),
            "dataset": {"root": str(Path(ds.root).resolve()), "images": len(ds), "split": ds.split,
                        "size": list(ds.size) if ds.size else None,
                        "seg_size": list(ds.seg_size) if ds.seg_size else None}}


# --------------------------------------------------------------------------- pass 1 over a range of batches


def threshold_scan(model: nn.Module, ds: BrodenDataset, names: Sequence[str], config: DissectConfig, rows: int,
                   bufs: dict[str, TopBuffer], tops: Mapping[str, RunningTopK], start: int = 0,
                   stop: int | None = None, show: bool | None = False,
                   after_batch: Callable[[int], None] | None = None) -> int:
    """Pass 1 (Eq. 18) over batches ``start .. stop - 1`` of ``rows`` images: every layer's activations go into
    its :class:`TopBuffer` (created on first use, sized for the whole dataset, so parts of it merge exactly) and
    its :class:`~convscope.methods.topk.RunningTopK`, in place. ``after_batch(batches done)`` runs after each
    batch (checkpoints). Returns the index of the next batch."""
    batches = start

    def on_layer(batch: Mapping[str, Any], n: str, act: torch.Tensor) -> None:
        if n not in bufs:  # n = images x positions (a linear layer has one)
            bufs[n] = TopBuffer(len(ds) * act[0, 0].numel(), config.quantile, act.shape[1], config.max_buffer_mb, n)
        bufs[n].update(act)
        tops[n].update(act, batch["index"])

    for _ in stream_dataset(model, ds, names, rows, config.workers, start, "dissect 1/2 thresholds",
                            show, reduce=on_layer, stop_batch=stop):
        batches += 1
        if after_batch is not None:
            after_batch(batches)
    return batches


def _pass_thresholds(model: nn.Module, ds: BrodenDataset, names: list[str], config: DissectConfig,
                     store: DissectStore | None, show: bool | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, TopKActivations]]:
    state = store.load("pass1") if store else None
    if state and state.get("done"):
        found = {n: RunningTopK.from_state(n, config.top_images, state["top"][n]).result() for n in names}
        return dict(state["thresholds"]), found
    start = int(state["batches"]) if state else 0
    rows = batch_rows(model, ds, config, state)
    bufs: dict[str, TopBuffer] = {}
    tops: dict[str, RunningTopK] = {n: RunningTopK(n, config.top_images) for n in names}
    if state:
        for n in names:
            tops[n] = RunningTopK.from_state(n, config.top_images, state["top"][n])
            bufs[n] = TopBuffer.from_state(state["buffers"][n], config.quantile, config.max_buffer_mb, n)

    def snapshot(batches: int, done: bool) -> dict[str, Any]:
        s: dict[str, Any] = {
            "batches": batches, "batch_size": rows, "done": done, "buffers": {n: bufs[n].state() for n in names},
            "top": {n: t.state_dict() for n, t in tops.items()},
        }
        if done:
            s["thresholds"] = {n: bufs[n].thresholds() for n in names}
        return s

    def checkpoint(batches: int) -> None:
        if store and batches % config.checkpoint_every == 0:
            store.save("pass1", snapshot(batches, False))

    batches = threshold_scan(model, ds, names, config, rows, bufs, tops, start, None, show, checkpoint)
    if not bufs or any(b.empty for b in bufs.values()):
        raise DataError(f"{ds.root} yielded no images; check the dataset (and its split)")
    final = snapshot(batches, True)
    if store:
        store.save("pass1", final)
    return dict(final["thresholds"]), {n: t.result() for n, t in tops.items()}


# --------------------------------------------------------------------------- pass 2 over a range of batches


@dataclass
class PassCounts:
    """Pass 2's sums (Eq. 19) over some images: per layer ``inter`` and ``activated`` (units x concepts), the
    concept pixels ``truth`` (C) and the label size. Pixel counts held in float64 are integers (exact below
    2**53), so the sums of dataset parts, added in any order, equal the one-pass sums bit for bit."""

    truth: torch.Tensor
    inter: dict[str, torch.Tensor] = field(default_factory=dict)
    activated: dict[str, torch.Tensor] = field(default_factory=dict)
    seg_size: tuple[int, int] | None = None

    @classmethod
    def zeros(cls, concepts: int) -> PassCounts:
        return cls(torch.zeros(concepts, dtype=torch.float64))

    def add_batch(self, n: str, inter: torch.Tensor, activated: torch.Tensor) -> None:
        self.inter[n] = self.inter[n] + inter if n in self.inter else inter
        self.activated[n] = self.activated[n] + activated if n in self.activated else activated

    def add(self, other: PassCounts) -> None:
        """Add the counts of other images (another shard)."""
        for n in other.inter:
            self.add_batch(n, other.inter[n], other.activated[n])
        self.truth = self.truth + other.truth
        self.seg_size = self.seg_size or other.seg_size

    def state(self) -> dict[str, Any]:
        return {"inter": self.inter, "activated": self.activated, "truth": self.truth,
                "seg_size": list(self.seg_size) if self.seg_size else None}

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> PassCounts:
        seg = s.get("seg_size")
        return cls(s["truth"], dict(s["inter"]), dict(s["activated"]), (int(seg[0]), int(seg[1])) if seg else None)


def count_scan(model: nn.Module, ds: BrodenDataset, names: Sequence[str], config: DissectConfig, space: ConceptSpace,
               thresholds: Mapping[str, torch.Tensor], rows: int, counts: PassCounts, start: int = 0,
               stop: int | None = None, show: bool | None = False,
               after_batch: Callable[[int], None] | None = None) -> int:
    """Pass 2 (Eq. 19) over batches ``start .. stop - 1`` of ``rows`` images, added into ``counts`` in place
    (:func:`~convscope.methods.dissect.tally_batch` per layer inside its forward hook). ``after_batch(batches
    done)`` runs after each batch. Returns the index of the next batch."""
    size = ds.seg_size
    current: dict[str, Any] = {}
    batches = start

    def labels_of(batch: Mapping[str, Any]) -> BatchLabels:
        if current.get("batch") is not batch:
            current["batch"], current["labels"] = batch, batch_labels(batch, space, size)
        return current["labels"]

    def on_layer(batch: Mapping[str, Any], n: str, act: torch.Tensor) -> None:
        i, a, _ = tally_batch(act, thresholds[n], labels_of(batch))
        counts.add_batch(n, i, a)

    for batch, _ in stream_dataset(model, ds, names, rows, config.workers, start, "dissect 2/2 IoU", show,
                                   reduce=on_layer, stop_batch=stop):
        labels = labels_of(batch)
        counts.seg_size = labels.size
        counts.truth = counts.truth + labels.truth
        batches += 1
        if after_batch is not None:
            after_batch(batches)
    return batches


def _pass_counts(model: nn.Module, ds: BrodenDataset, names: list[str], config: DissectConfig, space: ConceptSpace,
                 thresholds: Mapping[str, torch.Tensor], store: DissectStore | None, show: bool | None) -> PassCounts:
    state = store.load("pass2") if store else None
    start = int(state["batches"]) if state else 0
    rows = batch_rows(model, ds, config, state)
    counts = PassCounts.from_state(state) if state else PassCounts.zeros(len(space))

    def snapshot(batches: int, done: bool) -> dict[str, Any]:
        return {"batches": batches, "batch_size": rows, "done": done, **counts.state()}

    def checkpoint(batches: int) -> None:
        if store and batches % config.checkpoint_every == 0:
            store.save("pass2", snapshot(batches, False))

    if not (state and state.get("done")):
        batches = count_scan(model, ds, names, config, space, thresholds, rows, counts, start, None, show,
                             checkpoint)
        if store:
            store.save("pass2", snapshot(batches, True))
    return counts


# --------------------------------------------------------------------------- the entry points


def unit_thresholds(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], layers: str | Sequence[str],
                    config: DissectConfig = DissectConfig(), progress: bool | None = None, *,
                    executor: str | None = None, workers: int = 1, shards: int | None = None,
                    ray_address: str | None = None) -> dict[str, torch.Tensor]:
    """Pass 1 alone: every unit's exact ``T_f`` with ``P(a_f > T_f) = config.quantile`` (Bau et al. 2017, Eq. 18),
    equal to ``numpy.quantile(a_f, 1 - quantile)`` over all positions of all images (linear interpolation).
    ``executor`` / ``workers`` / ``shards`` / ``ray_address``: sharded over the dataset, as in :func:`dissect`."""
    ds = open_dataset(dataset, model, config)
    names = list(resolve_layers(model, layers))
    if executor is not None or workers != 1 or shards is not None:
        from .shards import ShardedRun

        with ShardedRun(model, ds, names, config, None, progress, executor, workers, shards, ray_address) as run:
            return run.thresholds()[0]
    return _pass_thresholds(model, ds, names, config, None, progress)[0]


def dissect(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], layers: str | Sequence[str],
            config: DissectConfig = DissectConfig(), out: str | os.PathLike[str] | None = None,
            progress: bool | None = None, *, executor: str | None = None, workers: int = 1,
            shards: int | None = None, ray_address: str | None = None) -> dict[str, LayerDissection]:
    """Network Dissection (Bau et al. 2017; survey Sec. 6.2.1, Eq. 18-19) of every unit of ``layers`` at once.

    Args:
        model: any ``nn.Module`` (left untouched: hooks through :func:`~convscope.core.probe.probe`).
        dataset: a :class:`~convscope.data.broden.BrodenDataset` (e.g. the synthetic one written by
            :func:`convscope.data.synthetic.generate`, or a real Broden download) or its folder.  Images in
            ``[0, 1]`` go through ``model.preprocess.normalize`` when the model has one.
        layers: names from ``model.named_modules()`` (a list or comma-separated string).
        config: :class:`DissectConfig` (``quantile=0.005``, ``iou_threshold=0.04``, ...).
        out: a folder for resumable state (thresholds and partial counts, saved atomically); a rerun continues.
        progress: progress bars with an ETA: ``True``, ``False``, or ``None`` (default: each pass's bar once it
            has run 2 s).
        executor, workers, shards, ray_address: run each pass as ``shards`` tasks over contiguous ranges of whole
            batches (:mod:`~convscope.methods.dissect.shards`): ``"local"`` with ``workers`` processes (1: this
            process), or ``"ray"`` (``ray_address`` None: a local Ray instance with ``workers`` CPUs; ``"auto"`` /
            an address: a running cluster). ``workers > 1`` or ``shards`` alone mean ``"local"``. With ``out``
            every finished shard is saved at once and a rerun computes only the missing ones. The result equals
            the one-process run's (same batches) bit for bit.

    Returns ``{layer: LayerDissection}`` with one row per unit (unit, label, category, iou, threshold) and the
    full IoU matrix units x concepts.
    """
    if not isinstance(config, DissectConfig):
        raise ConvscopeError(f"dissect(config=...) takes a DissectConfig, got {type(config).__name__}")
    ds = open_dataset(dataset, model, config)
    names = list(resolve_layers(model, layers))
    space = concept_space(ds, config.categories)
    store = DissectStore(out, store_meta(model, ds, names, config)) if out is not None else None
    if executor is not None or workers != 1 or shards is not None:
        from .shards import ShardedRun

        with ShardedRun(model, ds, names, config, store, progress, executor, workers, shards, ray_address) as run:
            thresholds, tops = run.thresholds()
            counts = run.counts(thresholds)
    else:
        thresholds, tops = _pass_thresholds(model, ds, names, config, store, progress)
        counts = _pass_counts(model, ds, names, config, space, thresholds, store, progress)
    return {n: layer_result(n, space, thresholds[n], counts.inter[n], counts.activated[n], counts.truth, tops[n],
                            config, counts.seg_size or (0, 0)) for n in names}
