"""Network Dissection sharded over the dataset: local worker processes and a local Ray cluster give exactly the
one-process result (thresholds, counts, IoUs, labels, top images); a worker killed with SIGKILL fails the call in
one line, and a rerun with the same out= computes only the missing shards."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from convscope.data import BrodenDataset, generate
from convscope.errors import ConvscopeError
from convscope.methods.dissect import DissectConfig, dissect, unit_thresholds

from .helpers import assert_untouched, snapshot

CFG = DissectConfig(quantile=0.02, workers=0, batch_size=4, top_images=3)
LAYERS = ["conv1", "conv2"]


class Tiny(nn.Module):
    """Two seeded conv layers (8 and 6 units) at 64 px."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        with torch.no_grad():
            for m in (self.conv1, self.conv2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class KillOnce(BrodenDataset):
    """Reading image ``kill_index`` for the ``kill_on_read``-th time kills the reading process with SIGKILL, once
    (marker files in ``marks`` decide, across processes and reruns)."""

    marks = ""
    kill_index = -1
    kill_on_read = 1

    def __getitem__(self, i):
        if i == self.kill_index:
            reads = Path(self.marks) / "reads"
            with open(reads, "a") as f:
                f.write("x")
            killed = Path(self.marks) / "killed"
            if reads.stat().st_size == self.kill_on_read and not killed.exists():
                killed.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "broden", n=40, size=64, seed=7, progress=False)


@pytest.fixture(scope="module")
def reference(synth):
    return dissect(Tiny(), synth, LAYERS, CFG, progress=False)


def assert_same(got, ref):
    assert got.keys() == ref.keys()
    for n, r in ref.items():
        g = got[n]
        for f in ("thresholds", "intersection", "activated", "truth", "iou", "top_images", "top_values"):
            assert torch.equal(getattr(g, f), getattr(r, f)), (n, f)
        assert g.rows == r.rows and g.images == r.images == 40 and g.seg_size == r.seg_size


def test_local_workers_and_shards_equal_one_process(synth, reference, tmp_path):
    model = Tiny()
    before = snapshot(model)
    got = dissect(model, synth, LAYERS, CFG, out=tmp_path, progress=False, executor="local", workers=2, shards=3)
    assert_same(got, reference)
    assert_untouched(model, before)
    assert sorted(p.name for p in (tmp_path / "pass1").iterdir()) == ["merged.pt"] + [f"shard_{i:04d}.pt"
                                                                                      for i in range(3)]
    assert len(list((tmp_path / "pass2").glob("shard_*.pt"))) == 3
    # a finished run reopens from its files (no executor starts), and an in-process sharded run agrees too
    assert_same(dissect(model, synth, LAYERS, CFG, out=tmp_path, progress=False, executor="local", workers=2),
                reference)
    assert_same(dissect(model, synth, LAYERS, CFG, progress=False, shards=4), reference)
    assert_untouched(model, before)
    with pytest.raises(ConvscopeError, match="cut into 3 shards; pass shards=3"):
        dissect(model, synth, LAYERS, CFG, out=tmp_path, progress=False, shards=5)


def test_sharded_unit_thresholds_progress_and_bad_arguments(synth, reference, capsys, monkeypatch, tmp_path):
    t = unit_thresholds(Tiny(), synth, LAYERS, CFG, progress=True, shards=7)  # uneven: 10 batches in 7 shards
    assert all(torch.equal(t[n], reference[n].thresholds) for n in LAYERS)
    assert "dissect 1/2 thresholds: 100% 7/7 shard" in capsys.readouterr().err  # a bar over the shards
    with pytest.raises(ConvscopeError, match="executor='spark'.*'local'"):
        dissect(Tiny(), synth, LAYERS, CFG, executor="spark")
    with pytest.raises(ConvscopeError, match="shards=0"):
        dissect(Tiny(), synth, LAYERS, CFG, shards=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ConvscopeError, match=r"pip install 'convscope\[ray\]'") as info:
        dissect(model, synth, LAYERS, CFG, out=tmp_path, executor="ray", workers=2)
    assert "\n" not in str(info.value)
    assert_untouched(model, before)


@pytest.mark.parametrize("kill_on_read", [1, pytest.param(2, marks=pytest.mark.slow)])  # in pass 1, in pass 2
def test_a_killed_worker_fails_in_one_line_and_a_rerun_resumes(synth, reference, tmp_path, kill_on_read):
    ds = KillOnce(synth)
    ds.marks, ds.kill_index, ds.kill_on_read = str(tmp_path), 37, kill_on_read  # in the last of 3 shards
    out = tmp_path / "out"
    run = dict(out=out, progress=False, executor="local", workers=2, shards=3)
    with pytest.raises(ConvscopeError, match="shard failed.*rerun with the same out=") as info:
        dissect(Tiny(), ds, LAYERS, CFG, **run)
    assert "\n" not in str(info.value) and (tmp_path / "killed").exists()
    saved = {p: p.stat().st_mtime_ns for p in out.glob("pass*/shard_*.pt")}
    assert 1 <= len(saved) < (3 if kill_on_read == 1 else 6)
    got = dissect(Tiny(), ds, LAYERS, CFG, out=out, progress=False, executor="local")  # resumed in this process
    assert_same(got, reference)
    assert all(p.stat().st_mtime_ns == t for p, t in saved.items())  # finished shards were not recomputed
    assert len(list(out.glob("pass*/shard_*.pt"))) == 6


@pytest.mark.slow  # starting a Ray instance takes most of a minute on a busy core
def test_ray_workers_equal_one_process(synth, reference, tmp_path):
    ray = pytest.importorskip("ray")
    got = dissect(Tiny(), synth, LAYERS, CFG, out=tmp_path, progress=False, executor="ray", workers=2, shards=3)
    assert not ray.is_initialized()  # the local Ray instance it started is shut down
    assert_same(got, reference)
