"""Network Dissection sharded over the dataset: each pass as tasks over contiguous ranges of whole batches, run in
this process, in local worker processes or on a Ray cluster (:mod:`convscope.core.executors`), resumable per shard.

**Exact.** Shards are ranges of whole batches of the one-process run, so every image is seen in the same batch.
Pass 1 (Eq. 18): each shard keeps its own per-unit top ``k`` (``k`` from the *whole* dataset's ``n``); the union of
the shards' top ``k`` holds the dataset's top ``k``, so the merged buffer holds the same multiset of values and the
thresholds are the same float64 numbers (:meth:`~convscope.methods.dissect.TopBuffer.absorb`); the top images
merge by value, ties by image id (:meth:`~convscope.methods.topk.RunningTopK.best`). Pass 2 (Eq. 19): the
intersection / activated / concept pixel counts are integers held in float64, so the shards' sums, added in any
order, equal the one-pass sums bit for bit. (As everywhere, a different torch thread count or device may change an
activation's last bit; the comparison holds for the same setting.)

**Resumable.** With ``out=``, the plan (shards, batch size) is kept in ``out/shards.json`` and each shard's result
is written atomically to ``out/pass1/shard_NNNN.pt`` / ``out/pass2/shard_NNNN.pt`` as soon as it returns; the
merged pass 1 (thresholds, top images) goes to ``out/pass1/merged.pt``. A rerun after any failure (a worker
killed, Ctrl-C, a dead Ray node) computes only the missing shards. Disk: a pass-1 shard holds up to one full quantile
buffer (``units x k`` floats per layer), so ``shards`` of them take up to ``shards`` times the one-process state.

**Workers** rebuild the model from its pickled bytes (cloudpickle: by value) and the dataset from its pickled
:class:`~convscope.data.broden.BrodenDataset` (the folder must be readable where they run); with one local worker
the tasks run in this process on the caller's model.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.executors import LocalExecutor, RayExecutor, make_executor, pickle_for_workers
from ...core.io import atomic_write_text
from ...core.progress import progress_bar
from ...data.broden import BrodenDataset
from ...errors import ConvscopeError, DataError
from ..topk import RunningTopK, TopKActivations
from .concepts import ConceptSpace, concept_space
from .config import DissectConfig
from .quantile import TopBuffer
from .run import DissectStore, PassCounts, batch_rows, count_scan, threshold_scan

SHARDS_PER_WORKER = 4  # default shards: a few per worker, so a failure loses little and workers finish together

# --------------------------------------------------------------------------- what a worker holds and runs


@dataclass(frozen=True)
class DissectSpec:
    """How a worker rebuilds its context: the model and the dataset as pickled bytes, and the configuration."""

    model: bytes
    dataset: bytes
    config: DissectConfig


@dataclass
class DissectContext:
    """A worker's model, dataset and configuration (the concept space is built on first use)."""

    model: nn.Module
    dataset: BrodenDataset
    config: DissectConfig
    space: ConceptSpace | None = None

    def concepts(self) -> ConceptSpace:
        if self.space is None:
            self.space = concept_space(self.dataset, self.config.categories)
        return self.space


def setup_dissect(spec: DissectSpec) -> DissectContext:
    """Unpickle the model and the dataset once per worker (the executors call this in each worker).

    A local pool worker is spawned, so its multiprocessing default is "spawn": every shard's DataLoader worker
    (``config.workers``) would start a new interpreter and import torch again (5x the CPU time of the whole
    dissection on demo_net). On Linux the worker forks them instead, as the main process does."""
    if sys.platform == "linux" and multiprocessing.get_start_method(allow_none=True) == "spawn":
        multiprocessing.set_start_method("fork", force=True)
    return DissectContext(pickle.loads(spec.model), pickle.loads(spec.dataset), spec.config)


@dataclass(frozen=True)
class Shard:
    """Batches ``start .. stop - 1`` of ``rows`` images: pass 1 when ``thresholds`` is None, else pass 2."""

    index: int
    start: int
    stop: int
    rows: int
    layers: tuple[str, ...]
    thresholds: dict[str, torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return f"pass{1 if self.thresholds is None else 2}/shard_{self.index:04d}"

    def header(self) -> dict[str, int]:
        return {"index": self.index, "start": self.start, "stop": self.stop, "batch_size": self.rows}


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def run_shard(ctx: DissectContext, shard: Shard) -> tuple[Shard, dict[str, Any]]:
    """What a worker runs: ``(shard, its state)``: pass 1's quantile buffers and top images, or pass 2's counts."""
    names, cfg = list(shard.layers), ctx.config
    if shard.thresholds is None:
        bufs: dict[str, TopBuffer] = {}
        tops = {n: RunningTopK(n, cfg.top_images) for n in names}
        threshold_scan(ctx.model, ctx.dataset, names, cfg, shard.rows, bufs, tops, shard.start, shard.stop)
        if set(bufs) != set(names) or any(b.empty for b in bufs.values()):
            raise DataError(f"{ctx.dataset.root} yielded no images for batches {shard.start}..{shard.stop - 1}; "
                            "check the dataset (and its split)")
        state = {"buffers": {n: bufs[n].state() for n in names}, "top": {n: tops[n].state_dict() for n in names}}
    else:
        counts = PassCounts.zeros(len(ctx.concepts()))
        count_scan(ctx.model, ctx.dataset, names, cfg, ctx.concepts(), shard.thresholds, shard.rows, counts,
                   shard.start, shard.stop)
        state = counts.state()
    return shard, _cpu({**shard.header(), **state})


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ShardPlan:
    """``shards`` contiguous ranges of the ``batches`` batches of ``batch_size`` images (sizes differ by <= 1)."""

    shards: int
    batch_size: int
    batches: int

    def ranges(self) -> list[tuple[int, int]]:
        b, s = self.batches, self.shards
        return [(i * b // s, (i + 1) * b // s) for i in range(s)]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConvscopeError(f"dissect({name}={value!r}): give a positive int")
    return value


def plan_shards(model: nn.Module, ds: BrodenDataset, config: DissectConfig, shards: int | None, workers: int,
                store: DissectStore | None) -> ShardPlan:
    """The saved plan (``out/shards.json``) or a new one: the batch size as the one-process run resolves it (with
    ``batch_size="auto"``, lowered when the dataset would not fill ``shards`` batches), ``shards`` (default
    ``4 x workers``) at most one per batch."""
    path = store.out / "shards.json" if store else None
    if path is not None and path.is_file():
        saved = ShardPlan(**json.loads(path.read_text()))
        if shards is not None and shards != saved.shards:
            raise ConvscopeError(f"{path.parent} holds a dissection cut into {saved.shards} shards; pass "
                                 f"shards={saved.shards} (or leave shards out) to resume it, or another out folder")
        return saved
    if len(ds) == 0:
        raise DataError(f"{ds.root} holds no images; check the dataset (and its split)")
    want = shards if shards is not None else SHARDS_PER_WORKER * workers
    rows = batch_rows(model, ds, config)
    if isinstance(config.batch_size, str) and math.ceil(len(ds) / rows) < want:
        rows = math.ceil(len(ds) / want)  # "auto" picked one batch for most of the data: smaller ones, one per shard
    batches = math.ceil(len(ds) / rows)
    plan = ShardPlan(min(want, batches), rows, batches)
    if path is not None:
        atomic_write_text(path, json.dumps(asdict(plan)))
    return plan


# --------------------------------------------------------------------------- the driver


@dataclass
class ShardedRun:
    """Both passes of one dissection as shard tasks on an executor, started on first need (a finished run
    reopened from ``out`` starts none) and closed on exit."""

    model: nn.Module
    ds: BrodenDataset
    names: list[str]
    config: DissectConfig
    store: DissectStore | None
    show: bool | None
    executor: str | None = None
    workers: int = 1
    shards: int | None = None
    ray_address: str | None = None
    plan: ShardPlan = field(init=False)
    _ex: LocalExecutor | RayExecutor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.executor = "local" if self.executor is None else self.executor
        if self.executor not in ("local", "ray"):
            raise ConvscopeError(f"dissect(executor={self.executor!r}): use 'local' (with workers=N) or 'ray'")
        self.workers = _positive("workers", self.workers)
        if self.shards is not None:
            _positive("shards", self.shards)
        self.plan = plan_shards(self.model, self.ds, self.config, self.shards, self.workers, self.store)

    def __enter__(self) -> ShardedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.close()
            self._ex = None

    def _executor(self) -> LocalExecutor | RayExecutor:
        if self._ex is None:
            local_here = self.executor == "local" and self.workers == 1
            if local_here:  # this process, the caller's own model and dataset: nothing pickled
                setup: tuple[Callable[[Any], Any], Any] = (setup_dissect, None)
            else:
                spec = DissectSpec(pickle_for_workers(self.model), pickle_for_workers(self.ds, "the dataset"),
                                   self.config)
                setup = (setup_dissect, spec)
            workers = self.workers if self.executor == "local" or self.workers > 1 else None
            self._ex = make_executor(str(self.executor), workers, setup,
                                     context=DissectContext(self.model, self.ds, self.config) if local_here else None,
                                     address=self.ray_address)
        return self._ex

    def _load(self, shard: Shard) -> dict[str, Any] | None:
        state = self.store.load(shard.name) if self.store else None
        if state is not None and any(state.get(k) != v for k, v in shard.header().items()):
            raise ConvscopeError(f"{self.store.path(shard.name) if self.store else shard.name} covers other batches "
                                 "than this run's plan; delete it to recompute that shard")
        return state

    def _run(self, shards: Sequence[Shard], desc: str) -> Iterator[tuple[Shard, dict[str, Any]]]:
        """``(shard, state)`` for every shard: saved ones read back, missing ones computed (each saved as it
        returns), with a progress bar over the computed ones."""
        missing = []
        for s in shards:
            state = self._load(s)
            if state is None:
                missing.append(s)
            else:
                yield s, state
        if not missing:
            return
        with progress_bar(total=len(missing), desc=desc, unit="shard", progress=self.show) as bar:
            try:
                for shard, state in self._executor().map(run_shard, missing):
                    if self.store:
                        self.store.save(shard.name, state)
                    bar.update(1)
                    yield shard, state
            except (ConvscopeError, KeyboardInterrupt) as exc:
                cause = getattr(exc, "cause", None)  # Ray's RayTaskError subclasses the error, its text the traceback
                if isinstance(cause, ConvscopeError):
                    raise cause from None
                raise
            except Exception as exc:  # a worker died (kill -9, out of memory, a lost Ray node) or a bug in a task
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ConvscopeError):
                    raise cause from None
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                where = (f"the finished shards are saved in {self.store.out}: rerun with the same out= to compute only "
                         "the missing ones") if self.store else "pass out= to keep finished shards across reruns"
                raise ConvscopeError(f"a dissection shard failed ({type(exc).__name__}: {first}); {where}") from exc

    def thresholds(self) -> tuple[dict[str, torch.Tensor], dict[str, TopKActivations]]:
        """Pass 1: every unit's ``T_f`` and top images, merged from the shards (saved merged in ``out``)."""
        done = self.store.load("pass1/merged") if self.store else None
        k = self.config.top_images
        if done is not None:
            return dict(done["thresholds"]), {n: RunningTopK.from_state(n, k, done["top"][n]).result()
                                              for n in self.names}
        shards = [Shard(i, a, b, self.plan.batch_size, tuple(self.names)) for i, (a, b) in
                  enumerate(self.plan.ranges())]
        bufs: dict[str, TopBuffer] = {}
        tops: dict[str, RunningTopK] = {}
        for _, state in self._run(shards, "dissect 1/2 thresholds"):
            for n in self.names:
                s = state["buffers"][n]
                if n not in bufs:
                    bufs[n] = TopBuffer(int(s["n"]), self.config.quantile, len(s["values"]),
                                        self.config.max_buffer_mb, n)
                bufs[n].absorb(s)
                part = RunningTopK.from_state(n, k, state["top"][n])
                tops[n] = RunningTopK.best([tops[n], part], k) if n in tops else part
        thresholds = {n: bufs[n].thresholds() for n in self.names}
        if self.store:
            self.store.save("pass1/merged", {"thresholds": thresholds,
                                             "top": {n: tops[n].state_dict() for n in self.names}})
        return thresholds, {n: tops[n].result() for n in self.names}

    def counts(self, thresholds: dict[str, torch.Tensor]) -> PassCounts:
        """Pass 2: the Eq. 19 counts, summed over the shards."""
        shards = [Shard(i, a, b, self.plan.batch_size, tuple(self.names), thresholds) for i, (a, b) in
                  enumerate(self.plan.ranges())]
        total = PassCounts.zeros(len(concept_space(self.ds, self.config.categories)))
        for _, state in self._run(shards, "dissect 2/2 IoU"):
            total.add(PassCounts.from_state(state))
        return total


__all__ = ["DissectContext", "DissectSpec", "Shard", "ShardPlan", "ShardedRun", "plan_shards", "run_shard",
           "setup_dissect"]
