"""Import the peer tools the tests compare against (see tests/requirements-peers.txt); skip when absent.

zennit imports ``torchvision.models.resnet.{BasicBlock, Bottleneck}`` at import time for its torchvision
canonizers. torchvision cannot be installed beside the CPU torch here, so while zennit is imported two empty
stand-in classes take their place; the stand-in modules are removed from ``sys.modules`` right after, so nothing
else sees a torchvision.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import pytest
from torch import nn


def captum_attr() -> Any:
    """``captum.attr``, or skip the test saying how to install it."""
    return pytest.importorskip("captum.attr", reason="captum not installed: make .venv/.convscope-installed")


def zennit() -> Any:
    """The ``zennit`` package (with ``zennit.rules``, ``.composites``, ``.attribution`` loaded), or skip."""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit not installed: make .venv/.convscope-installed")
    stand_ins: dict[str, types.ModuleType] = {}
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})  # type: ignore[attr-defined]
        resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})  # type: ignore[attr-defined]
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet  # type: ignore[attr-defined]
        root = types.ModuleType("torchvision")
        root.models = models  # type: ignore[attr-defined]
        stand_ins = {"torchvision": root, "torchvision.models": models, "torchvision.models.resnet": resnet}
        sys.modules.update(stand_ins)
    try:
        import zennit as z
        import zennit.attribution  # noqa: F401
        import zennit.composites  # noqa: F401
        import zennit.rules  # noqa: F401
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
    return z
