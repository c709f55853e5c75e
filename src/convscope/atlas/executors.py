"""The executors moved to :mod:`convscope.core.executors` (methods use them too); re-exported here."""

from __future__ import annotations

from ..core.executors import (
    Executor,
    ExecutorError,
    Fn,
    LocalExecutor,
    RayExecutor,
    Setup,
    available_cpus,
    make_executor,
    pickle_for_workers,
)

__all__ = ["Executor", "ExecutorError", "Fn", "LocalExecutor", "RayExecutor", "Setup", "available_cpus",
           "make_executor", "pickle_for_workers"]
