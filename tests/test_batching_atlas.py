"""batch_size="auto" in the atlas (data batches and AM rows) and on the CLI's --batch-size options (issue 23)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convscope.core.batching as batching
from convscope.atlas.builder import build_atlas
from convscope.cli import build_parser, cli_batch_rows
from convscope.core.device import AllocatorState

from .test_batching import Rows

LARGEST = 8 * 16 * 16 * 4  # the tiny net's largest output for one 16 px image (conv 0: 8 x 16 x 16 float32)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def allocator(monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """glibc's default allocator with an mmap threshold that holds ``rows`` rows of the tiny net at 16 px."""
    monkeypatch.setenv("CONVSCOPE_MALLOC", "default")
    monkeypatch.setattr(batching, "allocator_state", lambda: AllocatorState("glibc default", rows * LARGEST, False))




def test_atlas_batches_default_to_auto_and_a_resume_keeps_them(monkeypatch, tmp_path, one_thread):
    net, images = tiny(), torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    allocator(monkeypatch, 3)
    rows = Rows(net)
    atlas = build_atlas(net, ["2"], tmp_path / "a", images=images, k=2, am_steps=1, am_size=16, chunk=4,
                        progress=False)
    seen = rows.close()
    assert atlas.meta()["auto_batch_rows"] == "3"
    assert max(seen) == 3  # data batches of 3 images; AM rows (the chunk of 4 units) also cut to 3
    assert seen.count(3) > 1 and all(u.am_image and u.top_image for u in atlas.units("2"))
    first = {u.unit: (u.max_activation, u.top) for u in atlas.units("2")}
    atlas.close()
    # a resume under another allocator cuts the same shards: the stored top-k pass is reused, nothing is redone
    allocator(monkeypatch, 1)
    again = build_atlas(net, ["2"], tmp_path / "a", images=images, k=2, am_steps=1, am_size=16, chunk=4,
                        progress=False)
    assert again.meta()["auto_batch_rows"] == "3"
    assert {u.unit: (u.max_activation, u.top) for u in again.units("2")} == first
    again.close()
    # explicit ints are used as given (and "auto" is not recorded)
    rows = Rows(net)
    fixed = build_atlas(net, ["2"], tmp_path / "b", images=images, k=2, am_steps=1, am_size=16, chunk=4,
                        batch_size=5, am_batch_size=4, progress=False)
    seen = rows.close()
    assert "auto_batch_rows" not in fixed.meta() and max(seen) == 5 and 4 in seen
    got = {u.unit: (u.max_activation, u.top) for u in fixed.units("2")}
    assert got.keys() == first.keys()
    for u, (best, top) in got.items():  # the same top-k whatever the batches
        assert best == pytest.approx(first[u][0], rel=1e-5)
        assert [t["image"] for t in top] == [t["image"] for t in first[u][1]]
    fixed.close()


def batch_option(argv: list[str]) -> object:
    return build_parser().parse_args(argv).batch_size


def test_cli_batch_size_options_take_auto():
    assert batch_option(["dissect", "demo_net", "--layers", "features.conv5"]) == "auto"
    atlas = ["atlas", "build", "demo_net", "--layers", "features.conv1", "-o", "x"]
    assert batch_option(atlas) == "auto" and batch_option([*atlas, "--batch-size", "7"]) == 7
    assert batch_option(["embed", "demo_net", "--layer", "features.conv5", "--batch-size", "AUTO"]) == "auto"
    assert batch_option(["embed", "demo_net", "--layer", "features.conv5"]) == 32
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["dissect", "demo_net", "--layers", "features.conv5", "--batch-size", bad])


def test_cli_auto_rows_for_int_only_methods(monkeypatch):
    net = tiny()  # no preprocess: sized at 224 x 224, where its largest output is 8 x 224 x 224 float32
    monkeypatch.setenv("CONVSCOPE_MALLOC", "default")
    monkeypatch.setattr(batching, "allocator_state",
                        lambda: AllocatorState("glibc default", 5 * 8 * 224 * 224 * 4 + 1, False))
    assert cli_batch_rows("auto", net, "embed") == 5
    assert cli_batch_rows(9, net, "embed") == 9
