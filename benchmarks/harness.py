"""Benchmark harness: timing, the model's own forward/backward cost (the physical limit), the case registry.

Everything here runs in one process, so a method's time and the baseline it is divided by share the machine's
state (threads, allocator policy, background load). See ``benchmarks/README.md`` for what each number means.

* :func:`measure` times a zero-argument callable: warm-up, then repeats (enough to fill a time budget, within
  ``[min_repeats, max_repeats]``), garbage collector off, device synchronized; it returns the median and the
  quartiles, and the CPU utilization, minor page faults and other processes' CPU use during the repeats.
* :class:`Baselines` measures **F** (forward under ``no_grad``), **F+B(input)** (forward + ``autograd.grad`` of the
  summed top logit w.r.t. the input, parameters frozen) and **F+B(all)** (``loss.backward()`` with the parameters
  requiring grad, also into the input; ``.grad`` restored afterwards) at a batch size, for a model at its native
  resolution. Samples are pooled when a baseline is measured again (before and after a model's cases).
  The physical limit of a kind of work is the cheapest per-image median over the batch sizes measured.
* :class:`Case` / :func:`register`: a method to time. ``fn(model, x, targets)`` runs it once; ``work`` names the
  baseline it is paired with (the same work done by the bare model at the same batch), so later methods plug in
  with a few lines in ``cases.py``.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

F_ = "F"
FB_INPUT = "F+B(input)"
FB_ALL = "F+B(all)"
KINDS = (F_, FB_INPUT, FB_ALL)


# --------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class RepeatPolicy:
    """How long to time one thing: repeats fill ``budget_s`` within ``[min_repeats, max_repeats]``."""

    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 20
    budget_s: float = 1.0
    noisy_others: float = 0.5  # other processes using more cores than this during a measurement: measure again
    retries: int = 2  # ... at most this many times, after waiting up to quiet_wait_s for a quiet machine
    quiet_wait_s: float = 60.0

    @classmethod
    def quick(cls) -> RepeatPolicy:
        return cls(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5, quiet_wait_s=15.0)


@dataclass
class Timing:
    """Wall-clock samples of one measured callable (seconds) and what the machine did meanwhile."""

    samples: list[float]
    util: float  # process CPU seconds / wall seconds over the repeats (about the thread count when we had the cores)
    others: float  # average cores used by *other* processes during the repeats (from /proc/stat); nan if unknown
    faults_per_call: float  # minor page faults per call (glibc returning/refetching big buffers shows up here)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr_rel(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("nan")

    def merged(self, other: Timing) -> Timing:
        n1, n2 = len(self.samples), len(other.samples)
        w = lambda a, b: (a * n1 + b * n2) / (n1 + n2)  # noqa: E731
        return Timing(self.samples + other.samples, w(self.util, other.util), w(self.others, other.others),
                      w(self.faults_per_call, other.faults_per_call))

    def to_json(self) -> dict[str, Any]:
        return {"median_ms": self.median * 1e3, "q1_ms": self.q1 * 1e3, "q3_ms": self.q3 * 1e3,
                "iqr_rel": self.iqr_rel, "repeats": len(self.samples), "util": self.util, "others": self.others,
                "faults_per_call": self.faults_per_call, "samples_ms": [s * 1e3 for s in self.samples]}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _busy_jiffies() -> float | None:
    """Busy CPU time, in seconds, of the cores this process may run on (``taskset``), from /proc/stat; None where
    unavailable. A benchmark pinned to one core is then disturbed only by what runs on that core."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0.0
    try:
        for line in lines:
            name, *rest = line.split()
            if not name.startswith("cpu"):
                break
            if (name == "cpu") != (cpus is None) or (cpus is not None and name != "cpu" and int(name[3:]) not in cpus):
                continue
            fields = [float(v) for v in rest]
            busy += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)
    except (ValueError, IndexError):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


def others_cpu(window_s: float = 1.0) -> float | None:
    """Cores used by other processes over the next ``window_s`` seconds (this process is idle meanwhile)."""
    b0, c0 = _busy_jiffies(), time.process_time()
    time.sleep(window_s)
    b1, c1 = _busy_jiffies(), time.process_time()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0 - (c1 - c0)) / window_s)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 2.0,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` cores over ``window_s``.

    The machine is shared: another job on the same 2 cores makes every OpenMP barrier wait for a descheduled
    thread, and timings blow up many-fold. Returns what was seen; the run goes on either way."""
    t0 = time.perf_counter()
    seen = others_cpu(window_s)
    while seen is not None and seen >= threshold and time.perf_counter() - t0 + window_s <= max_wait_s:
        log(f"  waiting for a quiet machine: other processes use {seen:.2f} cores")
        seen = others_cpu(window_s)
    return {"others": seen, "waited_s": round(time.perf_counter() - t0, 1),
            "quiet": seen is not None and seen < threshold}


def speed_probe(reps: int = 15) -> float:
    """Median seconds of a fixed 384x384 float32 matmul on the current threads: a yardstick for the machine's
    own speed, to catch slowdowns that /proc/stat cannot see (a busy host under the VM, throttling)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(384, 384, generator=g), torch.randn(384, 384, generator=g)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(fn: Callable[[], Any], policy: RepeatPolicy, sync: Callable[[], None] = lambda: None,
            on_first: Callable[[Any], None] | None = None) -> Timing:
    """Median-ready wall-clock samples of ``fn()``; see the module docstring. ``on_first`` receives the result of
    the first (warm-up) call, e.g. to check it against another tool's; later results are dropped at once."""
    warm: list[float] = []
    while len(warm) < max(1, policy.warmup) or (len(warm) < 3 and sum(warm) < 0.3):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        warm.append(time.perf_counter() - t0)
        if len(warm) == 1 and on_first is not None:
            on_first(result)
        del result
    t_est = max(min(warm), 1e-6)
    reps = int(min(policy.max_repeats, max(policy.min_repeats, math.ceil(policy.budget_s / t_est))))
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    samples: list[float] = []
    try:
        busy0, cpu0, flt0 = _busy_jiffies(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall0 = time.perf_counter()
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
            if len(samples) >= policy.min_repeats and time.perf_counter() - wall0 > 3 * policy.budget_s:
                break  # far slower than the warm-up said (a disturbed machine): enough samples to judge
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
        busy1 = _busy_jiffies()
    finally:
        if was_enabled:
            gc.enable()
    others = max(0.0, (busy1 - busy0 - cpu) / wall) if busy0 is not None and busy1 is not None else float("nan")
    return Timing(samples, cpu / wall if wall > 0 else float("nan"), others, flt / len(samples))


def measure_clean(fn: Callable[[], Any], policy: RepeatPolicy, sync: Callable[[], None] = lambda: None,
                  on_first: Callable[[Any], None] | None = None,
                  log: Callable[[str], None] = lambda s: None) -> Timing:
    """:func:`measure`, repeated (up to ``policy.retries`` times, after waiting for a quiet machine) when other
    processes took more than ``policy.noisy_others`` cores meanwhile; keeps the least disturbed measurement."""
    best = measure(fn, policy, sync, on_first)
    for _ in range(policy.retries):
        if not best.others > policy.noisy_others:
            break
        log(f"    disturbed (other processes used {best.others:.2f} cores); waiting and measuring again")
        wait_for_quiet(policy.quiet_wait_s, log=log)
        again = measure(fn, policy, sync)
        if again.others < best.others:
            best = again
    return best


# --------------------------------------------------------------------------------------------- machine


def machine_info(device: torch.device, threads: int, allocator: str) -> dict[str, Any]:
    """CPU model, cores, memory, torch build, threads, allocator policy, GPU; and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    onednn = getattr(torch.backends.mkldnn, "version", lambda: None)
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": cores, "mem_gib": mem_gib,
        "python": platform.python_version(), "torch": torch.__version__,
        "onednn": str(onednn()) if callable(onednn) and onednn() is not None else None,
        "mkl": torch.backends.mkl.is_available(), "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "allocator": allocator, "device": str(device), "gpu": gpu, "platform": platform.platform(),
        "loadavg_start": load_average(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe_machine(m: dict[str, Any]) -> str:
    """One line naming the machine a table was measured on."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    mem = f", {m['mem_gib']} GiB RAM" if m.get("mem_gib") else ""
    la = m.get("loadavg_start"), m.get("loadavg_end")
    load = f"; load average {la[0][0]} at start, {la[1][0]} at end" if la[0] and la[1] else ""
    return (f"{m['cpu']} ({m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs){mem}{gpu}; "
            f"torch {m['torch']}, Python {m['python']}, {m['threads']} threads, device {m['device']}, "
            f"allocator {m['allocator']}{load}")


# --------------------------------------------------------------------------------------------- baselines


def _top_logit_sum(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1).max(dim=1).values.sum()


def baseline_fn(model: nn.Module, x: torch.Tensor, kind: str) -> Callable[[], Any]:
    """The bare model doing one kind of work on ``x`` (see the module docstring). Call inside
    :func:`baseline_state` so that the parameters' ``requires_grad`` matches the kind."""
    if kind == F_:
        def forward() -> None:
            with torch.no_grad():
                model(x)
        return forward
    if kind == FB_INPUT:
        xi = x.detach().clone().requires_grad_(True)

        def fb_input() -> None:
            torch.autograd.grad(_top_logit_sum(model(xi)), xi)
        return fb_input
    if kind == FB_ALL:
        xa = x.detach().clone().requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]

        def fb_all() -> None:
            _top_logit_sum(model(xa)).backward()
            for p in params:
                p.grad = None
            xa.grad = None
        return fb_all
    raise ValueError(f"unknown kind of work {kind!r}; one of {KINDS}")


class baseline_state:
    """Eval mode; parameters frozen for F and F+B(input), requiring grad for F+B(all); all restored on exit."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model, self.kind = model, kind

    def __enter__(self) -> nn.Module:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._grads = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _, _ in self._grads:
            p.requires_grad_(self.kind == FB_ALL)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, flag in self._modes:
            m.training = flag
        for p, flag, grad in self._grads:
            p.requires_grad_(flag)
            p.grad = grad


@dataclass
class Baselines:
    """F / F+B(input) / F+B(all) of one model at several batch sizes, measured (and pooled) in this process."""

    model_name: str
    model: nn.Module
    inputs: Callable[[int], torch.Tensor]  # batch size -> input batch at the model's native resolution
    policy: RepeatPolicy
    sync: Callable[[], None]
    timings: dict[tuple[str, int], Timing] = field(default_factory=dict)
    first: dict[tuple[str, int], float] = field(default_factory=dict)  # median of the first measurement (drift)
    errors: dict[tuple[str, int], str] = field(default_factory=dict)
    history: dict[tuple[str, int], list[tuple[float, float]]] = field(default_factory=dict)  # (median, others)
    log: Callable[[str], None] = lambda s: None

    def measure(self, kind: str, batch: int) -> Timing | None:
        """Measure (again) and pool with earlier samples of the same kind and batch."""
        key = (kind, batch)
        try:
            x = self.inputs(batch)
            with baseline_state(self.model, kind):
                t = measure_clean(baseline_fn(self.model, x, kind), self.policy, self.sync, log=self.log)
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory at a big batch: report, go on
            self.errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return None
        finally:
            gc.collect()
        self.history.setdefault(key, []).append((t.median, t.others))
        old = self.timings.get(key)
        noisy = self.policy.noisy_others
        if old is None or (old.others > noisy and not t.others > noisy):
            self.timings[key] = t  # first, or a clean measurement replacing a disturbed one
        elif t.others > noisy and not old.others > noisy:
            pass  # keep the clean one
        else:
            self.timings[key] = old.merged(t)
        self.first.setdefault(key, t.median)
        return self.timings[key]

    def get(self, kind: str, batch: int) -> Timing | None:
        if (kind, batch) not in self.timings and (kind, batch) not in self.errors:
            self.measure(kind, batch)
        return self.timings.get((kind, batch))

    def per_image(self, kind: str, batch: int) -> float | None:
        t = self.timings.get((kind, batch))
        return t.median / batch if t else None

    def limit(self, kind: str) -> tuple[float, int] | None:
        """The physical limit of ``kind``: cheapest per-image median (seconds) over measured batches, and that batch."""
        rows = [(t.median / b, b) for (k, b), t in self.timings.items() if k == kind]
        return min(rows) if rows else None

    def to_json(self) -> dict[str, Any]:
        rows: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        for (kind, batch), t in sorted(self.timings.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            d = t.to_json()
            d["per_image_ms"] = t.median / batch * 1e3
            d["first_median_ms"] = self.first[(kind, batch)] * 1e3
            d["measurements"] = [{"median_ms": m * 1e3, "others": o} for m, o in self.history[(kind, batch)]]
            rows[kind][str(batch)] = d
        limits = {}
        for kind in KINDS:
            lim = self.limit(kind)
            if lim:
                limits[kind] = {"per_image_ms": lim[0] * 1e3, "batch": lim[1]}
        return {"rows": rows, "limit": limits,
                "errors": {f"{k} b{b}": e for (k, b), e in self.errors.items()}}


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Shape:
    """How much a case explains: ``images`` images with ``targets`` targets each, in one call."""

    label: str
    images: int
    targets: int = 1

    @property
    def maps(self) -> int:
        return self.images * self.targets


@dataclass(frozen=True)
class Targets:
    """The targets of a case, computed once (untimed) from the model's output, so every tool explains the same
    classes. ``indices``: ``N x K`` class indices (the top-K classes of each image)."""

    indices: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def convscope(self) -> Any:
        """The same targets as a user would write them for convscope: ``top_class`` or ``top_k(K)``."""
        import convscope as cs

        return cs.top_class if self.k == 1 else cs.top_k(self.k)


CaseFn = Callable[[nn.Module, torch.Tensor, Targets], Any]
SetupFn = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class Case:
    """One thing to time.

    ``fn(model, x, targets)`` does the work once and returns the maps (``N x K x H x W`` tensor) where it makes
    maps, else anything. ``work`` is the baseline kind doing the same work on the bare model; the paired baseline
    is that kind at batch ``shape.maps`` (for ``1 img x 32 tgts``: what 32 single-target explanations cost,
    batched), times ``per_call`` (several model passes per call, e.g. optimization steps). ``tool`` is
    ``"convscope"`` or a peer's name; ``agree_with`` names the convscope method whose maps a peer's should match.
    ``setup(model)`` (untimed) may return a context object passed as ``model`` (e.g. a peer's wrapper);
    ``teardown(ctx)`` frees it. ``check(ctx, x, targets)`` returns a one-line finding printed with the case.
    ``quick=False`` leaves the case out of ``--quick`` runs.
    """

    name: str
    tool: str
    model: str
    shape: Shape
    work: str
    fn: CaseFn
    per_call: int = 1
    unit: str = "map"
    agree_with: str | None = None
    setup: SetupFn | None = None
    teardown: Callable[[Any], None] | None = None
    check: Callable[[Any, torch.Tensor, Targets], str] | None = None  # an extra untimed finding, e.g. a caveat
    quick: bool = True
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.tool}:{self.name}:{self.model}:{self.shape.label}"


REGISTRY: list[Case] = []

SINGLE = Shape("1 img", 1, 1)


def many_shapes(n: int = 32, targets: int | None = None) -> tuple[Shape, ...]:
    """The three standard shapes: one image, ``n`` images in one call, one image with ``targets`` (default ``n``)
    targets."""
    t = n if targets is None else targets
    return (SINGLE, Shape(f"{n} imgs", n, 1), Shape(f"1 img × {t} tgts", 1, t))


def register(name: str, fn: CaseFn, *, work: str, models: Sequence[str] = ("efficientnet_lite0",),
             shapes: Sequence[Shape] | None = None, tool: str = "convscope", registry: list[Case] | None = None,
             **kw: Any) -> list[Case]:
    """Add a case per model and shape (default: :func:`many_shapes`). Returns the cases added."""
    if work not in KINDS:
        raise ValueError(f"work must be one of {KINDS}, not {work!r}")
    reg = REGISTRY if registry is None else registry
    added = [Case(name, tool, m, s, work, fn, **kw) for m in models for s in (shapes or many_shapes())]
    reg.extend(added)
    return added


def pearson_per_map(a: Any, b: Any) -> list[float]:
    """Pearson correlation of each pair of maps (flattened), ``a`` and ``b`` reshaped to ``maps x pixels``.

    Invariant to a per-map scale and offset (tools normalize their maps differently). A map that is constant
    in both counts as 1 when they are equal, else 0."""
    ta = torch.as_tensor(a).detach().double().cpu()
    tb = torch.as_tensor(b).detach().double().cpu()
    if ta.numel() != tb.numel():
        raise ValueError(f"maps of different sizes: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    n = _map_count(ta, tb)
    ta, tb = ta.reshape(n, -1), tb.reshape(n, -1)
    ta = ta - ta.mean(1, keepdim=True)
    tb = tb - tb.mean(1, keepdim=True)
    out = []
    for u, v in zip(ta, tb):
        nu, nv = u.norm(), v.norm()
        if nu == 0 or nv == 0:
            out.append(1.0 if nu == nv else 0.0)
        else:
            out.append(float((u @ v) / (nu * nv)))
    return out


def _map_count(ta: torch.Tensor, tb: torch.Tensor) -> int:
    sa = ta.shape[:-2] if ta.dim() >= 2 else (1,)
    return max(1, math.prod(sa))


# --------------------------------------------------------------------------------------------- inputs


def model_inputs(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct real images in the model's input space: the bundled sample photos through the model's own
    preprocess, then (beyond the photos) seeded flips and shifts of them. ``n == 1``: the first photo."""
    base = _sample_batch(model)
    if n <= base.shape[0]:
        return base[:n].clone()
    g = torch.Generator().manual_seed(seed)
    rows = [base[i % base.shape[0]] for i in range(n)]
    out = []
    for i, r in enumerate(rows):
        if i >= base.shape[0]:
            if torch.rand((), generator=g) < 0.5:
                r = r.flip(-1)
            dy, dx = (int(v) for v in torch.randint(-16, 17, (2,), generator=g))
            r = r.roll((dy, dx), dims=(-2, -1))
        out.append(r)
    return torch.stack(out).contiguous()


_SAMPLES: dict[int, torch.Tensor] = {}


def _sample_batch(model: nn.Module) -> torch.Tensor:
    import convscope as cs

    key = id(model)
    if key not in _SAMPLES:
        names = ["china", *[n for n in cs.sample_images() if n not in ("china", "brick", "grass", "gravel")]]
        _SAMPLES[key] = cs.load_images([cs.sample_image(n) for n in names], model)
    return _SAMPLES[key]


# --------------------------------------------------------------------------------------------- output


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with three significant digits (``"—"`` for missing)."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "—"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def timing_json_or_none(t: Timing | None) -> dict[str, Any] | None:
    return t.to_json() if t is not None else None


__all__ = [
    "F_", "FB_ALL", "FB_INPUT", "KINDS", "REGISTRY", "SINGLE", "Baselines", "Case", "RepeatPolicy", "Shape",
    "Targets", "Timing", "atomic_write", "baseline_fn", "baseline_state", "describe_machine", "fmt_ms",
    "fmt_ratio", "load_average", "machine_info", "many_shapes", "md_table", "measure", "measure_clean",
    "model_inputs",
    "others_cpu", "pearson_per_map", "register", "speed_probe", "synchronizer", "wait_for_quiet",
]
