"""One model, one worker thread, a bounded queue: how the explorer serializes model work.

Forward passes with hooks are not safe to run concurrently on one module (a probe registers hooks and changes
modes for the duration of its pass), and on a CPU two concurrent passes only share the same cores. So every job
that touches the model goes through one :class:`ModelWorker`: a daemon thread that takes jobs from a bounded
queue in arrival order. :meth:`ModelWorker.submit` never blocks: when ``queue_size`` jobs already wait it raises
:class:`Busy` (the web layer answers ``503`` with ``Retry-After``) instead of piling work up.

**Batching over what varies.** A job submitted with :meth:`ModelWorker.submit_batched` carries a key; when the
worker reaches it, it also takes every other waiting job with the same key (up to ``max_batch``) and runs them as
one call of the batch function on the list of their items: one forward pass for many webcam frames under load
(batched CPU passes cost less per image). Alone, a job is a batch of one, with no added wait.

Async request handlers await the job's ``concurrent.futures.Future`` (:meth:`ModelWorker.run`, or ``submit`` and
``asyncio.wrap_future``); a cancelled future is skipped by the worker, so the web layer drops the job of a client
that went away before its turn.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

from ..errors import ConvscopeError

__all__ = ["Busy", "JobResult", "ModelWorker"]


class Busy(ConvscopeError):
    """The model worker's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class JobResult:
    """A finished job's value, how long it waited in the queue and ran (seconds), and its batch size."""

    value: Any
    wait_s: float
    run_s: float
    batch: int = 1


@dataclass
class _Job:
    future: Future
    queued: float
    fn: Callable[..., Any] | None = None  # a plain job: fn(*args, **kwargs)
    args: tuple = ()
    kwargs: dict | None = None
    key: Hashable | None = None  # a batchable job: batch_fn([item, ...]) -> [result or exception, ...]
    batch_fn: Callable[[list[Any]], Sequence[Any]] | None = None
    item: Any = None


class ModelWorker:
    """Runs submitted jobs one at a time (same-key batchable jobs together), in order, on one daemon thread; at
    most ``queue_size`` jobs wait."""

    def __init__(self, queue_size: int = 64, max_batch: int = 8, name: str = "convscope-model") -> None:
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConvscopeError(f"queue_size={queue_size!r}: use a positive int (jobs allowed to wait)")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConvscopeError(f"max_batch={max_batch!r}: use a positive int")
        self.queue_size = queue_size
        self.max_batch = max_batch
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.jobs_done = 0
        self.jobs_rejected = 0
        self.jobs_cancelled = 0
        self.batches = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting those running)."""
        with self._cond:
            return len(self._jobs)

    def _put(self, job: _Job) -> Future:
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise ConvscopeError("the model worker has stopped; restart the server")
            if len(self._jobs) >= self.queue_size:
                self.jobs_rejected += 1
                raise Busy(f"the server is busy: {self.queue_size} requests are already waiting for the model; "
                           "retry in a second")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; its future resolves to a :class:`JobResult`. Raises :class:`Busy`."""
        return self._put(_Job(Future(), time.perf_counter(), fn=fn, args=args, kwargs=kwargs))

    def submit_batched(self, key: Hashable, batch_fn: Callable[[list[Any]], Sequence[Any]], item: Any) -> Future:
        """Queue ``item`` for ``batch_fn``, which gets the items of all waiting jobs with the same ``key`` at once
        and returns one result per item (an exception instance fails only its own job). Raises :class:`Busy`."""
        return self._put(_Job(Future(), time.perf_counter(), key=key, batch_fn=batch_fn, item=item))

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> JobResult:
        """Submit and await the result (raises the job's exception, or :class:`Busy`)."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _take(self) -> list[_Job] | None:
        """The next job and, for a batchable one, the waiting jobs with its key (None: stop)."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            taken = [first]
            if first.key is not None:
                rest: deque[_Job] = deque()
                while self._jobs:
                    job = self._jobs.popleft()
                    if job.key == first.key and len(taken) < self.max_batch:
                        taken.append(job)
                    else:
                        rest.append(job)
                self._jobs = rest
        live = [j for j in taken if j.future.set_running_or_notify_cancel()]
        with self._cond:
            self.jobs_cancelled += len(taken) - len(live)  # their clients went away before their turn
        return live

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                if jobs[0].batch_fn is None:
                    job = jobs[0]
                    fn = cast(Callable[..., Any], job.fn)  # submit() gives every plain job its fn
                    outcomes: Sequence[Any] = [self._call(fn, *job.args, **(job.kwargs or {}))]
                else:
                    outcomes = self._call(jobs[0].batch_fn, [j.item for j in jobs])
                    if isinstance(outcomes, BaseException) or len(outcomes) != len(jobs):
                        outcomes = [outcomes if isinstance(outcomes, BaseException) else
                                    RuntimeError("a batch function returned the wrong number of results")] * len(jobs)
            finally:
                end = time.perf_counter()
            for job, out in zip(jobs, outcomes):
                if isinstance(out, BaseException):
                    job.future.set_exception(out)
                else:
                    job.future.set_result(JobResult(out, start - job.queued, end - start, len(jobs)))
            with self._cond:
                self.jobs_done += len(jobs)
                self.batches += 1
                self.busy_s += end - start

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request, which reports it
            return exc

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued jobs (waits up to ``timeout`` seconds for the thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
