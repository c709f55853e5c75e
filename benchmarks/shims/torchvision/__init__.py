"""Benchmark-only stand-in for the few pure-PyTorch torchvision helpers the peer tools import (see ../README.md)."""

from . import models, ops, transforms  # noqa: F401

__version__ = "0.0+convscope-bench-shim"
CONVSCOPE_BENCH_SHIM = True
