"""Session fixtures: zoo models are loaded once (tests must leave them untouched anyway)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lite0():
    from convscope.models import load_model

    return load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def demo():
    from convscope.models import load_model

    return load_model("demo_net", device="cpu")
