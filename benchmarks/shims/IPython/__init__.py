"""Benchmark-only stand-in: lucent imports IPython.display at module level for notebook output (see ../README.md)."""

from . import display  # noqa: F401

CONVSCOPE_BENCH_SHIM = True
