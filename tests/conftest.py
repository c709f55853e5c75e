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


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: thread-pool overhead dominates them, and on a busy 2-core machine
    two threads made a lite0 forward 100x slower. Restores the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
