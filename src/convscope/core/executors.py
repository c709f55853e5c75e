"""Where tasks run (the atlas builder's, sharded dissection's): in this process, a local process pool, or on Ray.

An executor is started with a *setup*: a picklable function and its argument (e.g. the model spec and the
dataset spec) that every worker calls once to build its *context* (the loaded model, the images). ``map(fn,
tasks)`` then runs ``fn(context, task)`` for every task and yields the results **as they finish** (not in task
order). The caller's main process is the only one that writes results; workers return tensors and bytes.

* :class:`LocalExecutor` ``(workers=1)``: in this process, one task after the other, with a context given
  directly (the caller's own model object, not a copy).
* :class:`LocalExecutor` ``(workers=N)``: N spawned processes (``concurrent.futures``), each building its context
  once in its initializer and running ``threads`` torch threads, ``workers x threads <= cores`` by default.
* :class:`RayExecutor`: one Ray actor per worker, each building its context once; tasks go to whichever actor is
  free (``ray.util.ActorPool``). ``address=None`` starts a local Ray instance (shut down on :meth:`close`);
  ``address="auto"`` or ``"ray://host:10001"`` / ``"host:6379"`` joins a running cluster (``ray start --head``),
  and :meth:`close` only disconnects. Workers must be able to import convscope (and load the model).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from ..errors import ConvscopeError

Setup = tuple[Callable[[Any], Any], Any]  # (function, argument): builds a worker's context
Fn = Callable[[Any, Any], Any]  # fn(context, task) -> result


class ExecutorError(ConvscopeError):
    """An executor that cannot start (Ray missing, a bad cluster address, a bad worker count)."""


class Executor(Protocol):
    """``map(fn, tasks)``: ``fn(context, task)`` for every task, results yielded as they finish."""

    workers: int

    def map(self, fn: Fn, tasks: Iterable[Any]) -> Iterator[Any]: ...

    def close(self) -> None: ...


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_workers(workers: object, flag: str = "workers") -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ExecutorError(f"{flag}={workers!r}: give a positive number of worker processes")
    return workers


def pickle_for_workers(obj: object, what: str = "the model") -> bytes:
    """``obj`` (e.g. the user's ``nn.Module``) as bytes for worker processes: by value where cloudpickle is
    installed (Ray brings it; a class defined in a script then works too), else by reference (its class must be
    importable in the workers). ``pickle.loads`` reads it back."""
    try:
        import cloudpickle
    except ImportError:
        if type(obj).__module__ == "__main__":
            raise ExecutorError(f"{what} ({type(obj).__name__}) is defined in the script itself, so worker processes "
                                "cannot load it; move the class into an importable module, pip install cloudpickle, "
                                "or use one worker") from None
        return pickle.dumps(obj)
    return bytes(cloudpickle.dumps(obj))


# --------------------------------------------------------------------------- local

_CONTEXT: dict[str, Any] = {}  # a pool worker's context, built once by _init (one per worker process)


def _watch_parent(parent: int, every: float = 1.0) -> None:
    """Exit this worker when the process that started it is gone (``kill -9`` of a build leaves no orphans)."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


def _init(setup: Setup, threads: int, parent: int | None = None) -> None:
    import torch

    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="convscope-parent-watch").start()
    torch.set_num_threads(max(1, threads))
    fn, arg = setup
    _CONTEXT["ctx"] = fn(arg)


def _call(fn: Fn, task: Any) -> Any:
    return fn(_CONTEXT["ctx"], task)


class LocalExecutor:
    """``workers=1``: in this process (``context`` given, or built from ``setup`` once); ``workers=N``: a pool of
    N spawned processes, each building its context from ``setup`` once, with ``threads`` torch threads each
    (default ``cores // N``, at least 1)."""

    def __init__(self, workers: int = 1, setup: Setup | None = None, context: Any = None,
                 threads: int | None = None) -> None:
        self.workers = _check_workers(workers)
        self.threads = threads if threads is not None else max(1, available_cpus() // self.workers)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._context = context
        self._setup = setup
        if self.workers > 1:
            if setup is None:
                raise ExecutorError("LocalExecutor(workers > 1) needs setup=(function, argument) to build each "
                                    "worker's model")
            # spawn, not fork: a forked child of a process that already ran torch's thread pools can hang
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init,
                                                                initargs=(setup, self.threads, os.getpid()))

    def map(self, fn: Fn, tasks: Iterable[Any]) -> Iterator[Any]:
        if self._pool is None:
            if self._context is None:
                if self._setup is None:
                    raise ExecutorError("LocalExecutor needs context= or setup=(function, argument)")
                self._context = self._setup[0](self._setup[1])
            for task in tasks:
                yield fn(self._context, task)
            return
        futures = [self._pool.submit(_call, fn, t) for t in tasks]
        try:
            for fut in concurrent.futures.as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- Ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'convscope[ray]' (or pip install ray), or use "
                            "--executor local --workers N") from None
    return ray


class _Worker:
    """A Ray actor: builds its context once, then runs tasks."""

    def __init__(self, setup: Setup, threads: int) -> None:
        _init(setup, threads)

    def run(self, fn: Fn, task: Any) -> Any:
        return _call(fn, task)


class RayExecutor:
    """One Ray actor per worker (``num_cpus=1`` each, ``threads`` torch threads), on a local Ray instance
    (``address=None``: started here with ``num_workers`` CPUs, shut down on :meth:`close`) or on a running cluster
    (``address="auto"``, ``"HOST:PORT"`` or ``"ray://HOST:10001"``; ``num_workers`` default: its CPUs). When Ray is
    already initialized in this process, that session is used and left running."""

    def __init__(self, setup: Setup, address: str | None = None, num_workers: int | None = None,
                 threads: int = 1) -> None:
        ray = _import_ray()
        self._ray = ray
        self._started = False
        if num_workers is not None:
            _check_workers(num_workers, "num_workers")
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    # "local": a new instance even where `ray start` runs a cluster on this machine
                    ray.init(address="local", num_cpus=num_workers or available_cpus(), include_dashboard=False,
                             log_to_driver=False)
            except ConnectionError as exc:
                raise ExecutorError(f"cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                                    "`ray start --head` and pass its address (or 'auto'), or leave --ray-address "
                                    "out to start a local one") from None
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = num_workers or max(1, cpus)
        actor = ray.remote(num_cpus=1)(_Worker)
        try:
            self._actors = [actor.remote(setup, threads) for _ in range(self.workers)]
        except Exception:
            self.close()
            raise

    def map(self, fn: Fn, tasks: Iterable[Any]) -> Iterator[Any]:
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        yield from pool.map_unordered(lambda a, t: a.run.remote(fn, t), list(tasks))

    def close(self) -> None:
        ray = self._ray
        for a in getattr(self, "_actors", []):
            ray.kill(a)
        self._actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(executor: str, workers: int | None, setup: Setup, context: Any = None,
                  address: str | None = None) -> LocalExecutor | RayExecutor:
    """``"local"`` (``workers`` processes; 1: this process, using ``context``) or ``"ray"``."""
    if executor == "local":
        return LocalExecutor(workers or 1, setup=setup, context=context if (workers or 1) == 1 else None)
    if executor == "ray":
        return RayExecutor(setup, address=address, num_workers=workers)
    raise ExecutorError(f"executor={executor!r}: use 'local' (with --workers N) or 'ray'")


__all__ = ["Executor", "ExecutorError", "Fn", "LocalExecutor", "RayExecutor", "Setup", "available_cpus",
           "make_executor", "pickle_for_workers"]
