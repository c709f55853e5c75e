"""Batch sizes from the model's activation sizes and the allocator (core/batching.py, core/device.py; issue 23)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import convscope as cs
import convscope.core.batching as batching
from convscope.core.batching import (
    BUDGET_FRACTION,
    CPU_MAX_ROWS,
    activation_sizes,
    auto_batch_size,
    resolve_batch_size,
)
from convscope.core.device import DEFAULT_MMAP_THRESHOLD_MAX, AllocatorState, allocator_state
from convscope.errors import ConvscopeError
from convscope.methods.dissect import DissectConfig
from convscope.methods.dissect.run import batch_rows
from convscope.methods.evaluation import deletion_insertion
from convscope.methods.integrated_gradients import integrated_gradients
from convscope.methods.invert import invert
from convscope.methods.maximize import activation_maximization, encode
from convscope.methods.saliency import smoothgrad

MiB = 2**20
GLIBC_DEFAULT = AllocatorState("glibc default", DEFAULT_MMAP_THRESHOLD_MAX, False)
TUNED = AllocatorState("convscope", 2**31 - 1, True)
PLENTY = 64 * 2**30


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


@pytest.fixture(autouse=True)
def quiet_allocator(monkeypatch):
    """The user chose glibc's defaults: no hint, no tuning of the test process."""
    monkeypatch.setenv("CONVSCOPE_MALLOC", "default")


def test_activation_sizes_tiny_closed_form():
    m = tiny()
    sizes = activation_sizes(m, torch.zeros(2, 3, 16, 16))
    # conv1 / relu1: 8 x 16 x 16 floats; conv2 / relu2: 4 x 16 x 16; pool 4; flatten 4; linear 5
    assert sizes.largest == 8 * 16 * 16 * 4
    assert sizes.layer == "0"
    assert sizes.total == (2 * 8 * 256 + 2 * 4 * 256 + 4 + 4 + 5) * 4
    assert activation_sizes(m, torch.zeros(5, 3, 16, 16)) is sizes  # cached per image shape, not batch
    assert activation_sizes(m, torch.zeros(1, 3, 32, 32)).largest == 8 * 32 * 32 * 4
    ref = weakref.ref(m)
    del m, sizes
    gc.collect()
    assert ref() is None  # the cache does not keep the model alive


def test_lite0_auto_under_threshold_default_larger_tuned(lite0, one_thread):
    x = torch.zeros(1, 3, 224, 224)
    sizes = activation_sizes(lite0, x)
    assert sizes.largest == 96 * 112 * 112 * 4  # blocks.1 expansion: 96 channels at 112 x 112, float32
    default = auto_batch_size(lite0, x, allocator=GLIBC_DEFAULT, memory=PLENTY)
    tuned = auto_batch_size(lite0, x, allocator=TUNED, memory=PLENTY)
    assert default * sizes.largest < 32 * MiB <= (default + 1) * sizes.largest
    assert default == 6
    assert tuned > default and tuned == CPU_MAX_ROWS
    # K batched gradients: each row allocates K gradient buffers per layer
    assert auto_batch_size(lite0, x, multiplier=3, grad=True, allocator=GLIBC_DEFAULT, memory=PLENTY) == 2
    assert auto_batch_size(lite0, x, allocator=GLIBC_DEFAULT, memory=PLENTY, limit=4) == 4
    assert auto_batch_size(lite0, x, multiplier=64, allocator=GLIBC_DEFAULT, memory=PLENTY) == 1  # never 0


def test_memory_budget_bounds_tuned_batches():
    m = tiny()
    x = torch.zeros(1, 3, 16, 16)
    sizes = activation_sizes(m, x)
    per_row = sizes.total + 2 * sizes.largest
    memory = int(10 * per_row / BUDGET_FRACTION)
    assert auto_batch_size(m, x, grad=True, allocator=TUNED, memory=memory) == 10
    assert auto_batch_size(m, x, allocator=TUNED, memory=int(7 * 3 * sizes.largest / BUDGET_FRACTION)) == 7
    assert auto_batch_size(m, x, allocator=TUNED, memory=0) == 1


@pytest.mark.parametrize("env, name, threshold, tuned", [
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824"}, "GLIBC_TUNABLES", 2**30, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, "GLIBC_TUNABLES", 128 * 1024, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=9"}, "GLIBC_TUNABLES",
     65536, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc", None, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "tcmalloc", None, True),
    ({}, "glibc default", DEFAULT_MMAP_THRESHOLD_MAX, False),
])
def test_allocator_state_from_environment(env, name, threshold, tuned):
    if allocator_state({}, tuned_here=False).name == "other" and "LD_PRELOAD" not in env:
        pytest.skip("not glibc")
    state = allocator_state(env, tuned_here=False)
    assert (state.name, state.mmap_threshold, state.tuned) == (name, threshold, tuned)
    assert allocator_state(env, tuned_here=True).name == "convscope"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "big", None])
def test_bad_batch_size_one_line_error(bad):
    with pytest.raises(ConvscopeError) as e:
        resolve_batch_size(bad, tiny(), torch.zeros(1, 3, 16, 16), "smoothgrad")
    assert "smoothgrad(batch_size=" in str(e.value) and "'auto'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConvscopeError):
        DissectConfig(batch_size=bad)


class Rows:
    """Rows per forward pass of a model (a hook added and removed by the test)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].shape[0]))

    def close(self) -> list[int]:
        self.handle.remove()
        return self.seen


@pytest.fixture
def two_rows(monkeypatch):
    """An allocator whose threshold holds exactly two rows of the tiny net at 16 px (one at K = 2)."""
    largest = 8 * 16 * 16 * 4
    monkeypatch.setattr(batching, "allocator_state", lambda: AllocatorState("glibc default", 2 * largest, False))


def test_auto_and_explicit_rows_smoothgrad_ig(two_rows, one_thread):
    m, x = tiny(), torch.rand(3, 3, 16, 16)
    activation_sizes(m, x)  # measured (and cached) before counting rows
    rows = Rows(m)
    auto = smoothgrad(m, x, n=4)
    seen = rows.close()
    assert max(seen[1:]) == 2 and sum(seen[1:]) == 3 * 4  # first pass pins the targets on the clean images
    rows = Rows(m)
    given = smoothgrad(m, x, n=4, batch_size=5)
    seen = rows.close()
    assert max(seen[1:]) == 3 and sum(seen[1:]) == 12  # an explicit int is used (whole copies: 5 // 3 = 1 copy)
    torch.testing.assert_close(auto, given, rtol=1e-5, atol=1e-7)
    rows = Rows(m)
    ig_auto = integrated_gradients(m, x, steps=4, target=cs.top_k(2))
    seen = rows.close()
    assert max(seen[1:]) == 1  # K = 2 gradients per row: one row under a two-row threshold
    torch.testing.assert_close(ig_auto, integrated_gradients(m, x, steps=4, target=cs.top_k(2), batch_size=12),
                               rtol=1e-5, atol=1e-7)


def test_auto_accepted_am_invert_evaluation_encode(two_rows, one_thread):
    m, x = tiny(), torch.rand(3, 3, 16, 16)
    activation_sizes(m, x)  # measured (and cached) before counting rows
    rows = Rows(m)
    am = activation_maximization(m, "2", units=[0, 1, 2], steps=2, size=16, regularize="none", init="mean")
    assert max(rows.close()) <= 2
    am_one = activation_maximization(m, "2", units=[0, 1, 2], steps=2, size=16, regularize="none", init="mean",
                                     batch_size=3)
    torch.testing.assert_close(am.x, am_one.x)
    rows = Rows(m)
    inv = invert(m, x, ["0", "2"], steps=3, jitter=1, lr=0.1)
    seen = rows.close()
    assert seen[0] == 3 and max(seen[1:]) == 2  # target features of all images, then one image x two layers
    assert seen.count(2) == 3 * (3 + 1)  # three batches of 3 steps and the final pass
    whole = invert(m, x, ["0", "2"], steps=3, jitter=1, lr=0.1, batch_size=6)
    torch.testing.assert_close(inv.x, whole.x)
    torch.testing.assert_close(inv.history, whole.history)
    assert inv.layers == whole.layers and torch.equal(inv.image_index, whole.image_index)
    # two step sizes (the default below depth 0.4): an image's 2 layers x 2 runs stay in one batch
    rows = Rows(m)
    two = invert(m, x, ["0", "2"], steps=3, jitter=1, lr=(0.1, 0.2))
    seen = rows.close()
    assert seen[0] == 3 and max(seen[1:]) == 4 and seen.count(4) == 3 * (3 + 1)
    whole = invert(m, x, ["0", "2"], steps=3, jitter=1, lr=(0.1, 0.2), batch_size=12)
    torch.testing.assert_close(two.x, whole.x)
    assert two.lr is not None and whole.lr is not None and torch.equal(two.lr, whole.lr)
    maps = torch.rand(3, 16, 16)
    rows = Rows(m)
    di = deletion_insertion(m, x, maps, steps=4)
    assert max(rows.close()) <= 2
    di_big = deletion_insertion(m, x, maps, steps=4, batch_size=64)
    torch.testing.assert_close(di.deletion, di_big.deletion)
    torch.testing.assert_close(encode(m, "2", x), encode(m, "2", x, batch_size=1))


def test_dissect_auto_default_and_resume_keeps_batch():
    assert DissectConfig().batch_size == "auto"
    assert DissectConfig(batch_size=7).batch_size == 7
    # a resumed pass reads the batches it was saved with, whatever "auto" would pick now
    assert batch_rows(tiny(), None, DissectConfig(), {"batch_size": 5}) == 5  # type: ignore[arg-type]
