"""The model atlas: the store, and builds that give the same atlas however they run (resumed after kill -9, two
worker processes, a Ray cluster)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.atlas import Atlas, AtlasError, LayerRecord, open_atlas
from convscope.atlas.builder import build_atlas, unit_seed
from convscope.atlas.executors import ExecutorError, LocalExecutor, make_executor
from convscope.cli import main
from convscope.errors import ConvscopeError
from convscope.methods.topk import RunningTopK, top_k_activations

from .helpers import assert_untouched, snapshot

LAYERS = ["features.conv1", "classifier.fc8"]  # 64 conv units + 8 linear units: every unit, in seconds
SETTINGS = dict(synthetic=24, k=2, am_steps=3, am_size=64, concepts="synthetic", concept_images=40)
CLI_SETTINGS = ["--synthetic", "24", "--k", "2", "--am-steps", "3", "--am-size", "64", "--concepts", "synthetic",
                "--concept-images", "40"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- the store


def _tiny_store(root: Path) -> Atlas:
    atlas = Atlas(root, mode="w")
    atlas.add_layers([LayerRecord("conv", 0, 3, (3, 4, 4))])
    rel = atlas.write_image(Atlas.relpath("conv", 1, "am"), Image.new("RGB", (4, 4), (255, 0, 0)))
    atlas.put_units("conv", {1: {"am_image": rel, "am_activation": 2.5, "top": [{"image": 0, "score": 1.0}],
                                 "concept": "red", "category": "color", "iou": 0.2, "detector": 1}})
    return atlas


def test_store_round_trip_and_resume_marks(tmp_path):
    with _tiny_store(tmp_path / "a") as atlas:
        assert atlas.done("conv", "am_image") == {1}
        assert atlas.counts("conv")["am_image"] == 1 and atlas.counts("conv")["top_image"] == 0
        atlas.put_blob("topk/conv/0-16", b"\x00\x01")
        assert atlas.blob("topk/conv/0-16") == b"\x00\x01" and atlas.blob("nope") is None
        assert atlas.blob_keys("topk/") == ["topk/conv/0-16"]
        with pytest.raises(AtlasError, match="3 units"):
            atlas.add_layers([LayerRecord("conv", 0, 5)])
    ro = open_atlas(tmp_path / "a")
    u = ro.unit("conv", 1)
    assert (u.am_activation, u.top, u.concept, u.detector) == (2.5, [{"image": 0, "score": 1.0}], "red", True)
    assert ro.unit("conv", 0).am_image is None
    assert [r.unit for r in ro.search("RED")] == [1]
    assert Image.open(ro.file(u.am_image)).getpixel((0, 0)) == (255, 0, 0)


def test_store_refuses_paths_that_leave_the_folder(tmp_path):
    atlas = _tiny_store(tmp_path / "a")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (atlas.files_root / "link.png").symlink_to(outside)
    for bad in ["../secret.png", "conv/../../secret.png", str(outside), "", "a\x00b", "conv\\1_am.png", "link.png"]:
        with pytest.raises(AtlasError):
            atlas.file(bad)
    with pytest.raises(AtlasError, match="leaves"):
        atlas.write_bytes("../escape.png", b"x")
    assert not (tmp_path / "escape.png").exists()
    with pytest.raises(AtlasError, match="does not exist"):
        atlas.file("conv/2_am.png")
    with pytest.raises(AtlasError, match="cannot be opened"):
        atlas.file("x" * 300 + ".png")  # ENAMETOOLONG from the file system
    for unit in (2**64, 10**20, -1):
        with pytest.raises(AtlasError, match="out of range"):
            atlas.unit("conv", unit)


def test_store_read_only_and_missing(tmp_path):
    _tiny_store(tmp_path / "a").close()
    ro = open_atlas(tmp_path / "a")
    with pytest.raises(AtlasError, match="read-only"):
        ro.put_units("conv", {0: {"am_activation": 1.0}})
    with pytest.raises(AtlasError, match="read-only"):
        ro.set_meta({"x": 1})
    with pytest.raises(AtlasError, match="convscope atlas build"):
        open_atlas(tmp_path / "nothing")
    with pytest.raises(AtlasError, match="its layers: conv"):
        ro.layer("fc")


def test_store_corrupt_database_is_an_atlas_error(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    (root / "atlas.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(AtlasError, match="rebuild"):
        open_atlas(root)
    with pytest.raises(AtlasError, match="rebuild"):
        Atlas(root, mode="w")


# --------------------------------------------------------------------------- building blocks


def test_top_k_states_merge_exactly_in_any_grouping():
    gen = torch.Generator().manual_seed(0)
    n, units, k = 40, 5, 4
    vals = torch.randint(0, 4, (units, n), generator=gen).float()  # many ties: the order must still be fixed
    vals[0] = 0.0  # a dead unit: all ties
    locs = torch.randint(0, 7, (units, n, 2), generator=gen)
    ids = torch.arange(n).expand(units, n)

    def part(lo: int, hi: int) -> RunningTopK:
        state = {"values": vals[:, lo:hi], "ids": ids[:, lo:hi], "locs": locs[:, lo:hi], "shape": (units, 7, 7),
                 "seen": hi - lo}
        return RunningTopK.best([RunningTopK.from_state("layer", k, state)], k)

    whole = part(0, n)
    for cuts in ([0, 8, 16, 24, 32, 40], [0, 3, 40], [0, 20, 40]):
        parts = [part(a, b) for a, b in zip(cuts, cuts[1:])]
        for grouping in (parts, parts[::-1]):
            got = RunningTopK.best(grouping, k)
            assert torch.equal(got.values, whole.values) and torch.equal(got.ids, whole.ids)
            assert torch.equal(got.locs, whole.locs) and got.seen == n
    assert whole.ids[0].tolist() == [0, 1, 2, 3]  # ties: the lowest image ids
    for u in range(units):  # value descending, ties by id ascending
        key = [(-float(v), int(i)) for v, i in zip(whole.values[u], whole.ids[u])]
        assert key == sorted(key)
        assert torch.equal(whole.values[u], vals[u].sort(descending=True).values[:k])
    back = RunningTopK.from_bytes("layer", k, whole.to_bytes())
    assert torch.equal(back.values, whole.values) and back.shape == whole.shape


def test_unit_seed_is_stable_and_distinct():
    seeds = {unit_seed(0, layer, u) for layer in ("a", "b") for u in range(100)}
    assert len(seeds) == 200
    assert unit_seed(0, "a", 3) == unit_seed(0, "a", 3) != unit_seed(1, "a", 3)
    assert all(0 <= s < 2**62 for s in seeds)


def test_executors_validate_and_explain(monkeypatch):
    with pytest.raises(ExecutorError, match="positive"):
        LocalExecutor(0)
    with pytest.raises(ExecutorError, match="setup"):
        LocalExecutor(2)
    with pytest.raises(ExecutorError, match="'local'"):
        make_executor("dask", 2, (int, 0))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ExecutorError, match=r"pip install 'convscope\[ray\]'"):
        make_executor("ray", 2, (int, 0))
    with LocalExecutor(1, context=10) as ex:
        assert sorted(ex.map(lambda c, t: c + t, [1, 2, 3])) == [11, 12, 13]


# --------------------------------------------------------------------------- builds


def _compare(a: Atlas, b: Atlas, pixels: int = 2) -> None:
    """Same layers, same top-k lists, close scores and pictures, same concepts."""
    assert a.layers() == b.layers()
    for layer in a.layers():
        for ua, ub in zip(a.units(layer.name), b.units(layer.name), strict=True):
            where = f"{layer.name} unit {ua.unit}"
            strip = [[{k: v for k, v in t.items() if k != "score"} for t in u.top] for u in (ua, ub)]
            assert strip[0] == strip[1], where
            np.testing.assert_allclose([t["score"] for t in ua.top], [t["score"] for t in ub.top], rtol=1e-4,
                                       atol=1e-5, err_msg=where)
            for f in ("max_activation", "am_activation", "iou"):
                assert getattr(ua, f) == pytest.approx(getattr(ub, f), rel=1e-3, abs=1e-4), f"{where} {f}"
            assert (ua.concept, ua.category, ua.detector) == (ub.concept, ub.category, ub.detector), where
            for f in ("am_image", "top_image"):
                assert getattr(ua, f) == getattr(ub, f), where
                ia = np.asarray(Image.open(a.file(getattr(ua, f))), dtype=int)
                ib = np.asarray(Image.open(b.file(getattr(ub, f))), dtype=int)
                assert ia.shape == ib.shape, f"{where} {f}"
                assert np.abs(ia - ib).max() <= pixels, f"{where} {f}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo):
    """An uninterrupted in-process build (chunks of 16) from the caller's own module, left untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    demo.train()  # a non-default state must come back too
    demo.classifier.requires_grad_(False)
    before = snapshot(demo)
    try:
        atlas = build_atlas(demo, LAYERS, tmp_path_factory.mktemp("ref") / "atlas", chunk=16, progress=False,
                            **SETTINGS)
        assert_untouched(demo, before)
    finally:
        demo.eval()
        demo.requires_grad_(True)
        torch.set_num_threads(threads)
    return atlas


@pytest.mark.slow
def test_build_records_every_unit(reference, demo):
    atlas = reference
    assert [(r.name, r.units, r.shape) for r in atlas.layers()] == [
        ("features.conv1", 64, (64, 56, 56)), ("classifier.fc8", 8, (8,))]
    meta = atlas.meta()
    assert meta["model"] == "demo_net" and len(meta["model_hash"]) == 40
    assert json.loads(meta["settings"])["k"] == 2
    last = json.loads(meta["last_build"])
    assert {s: v["units"] for s, v in last["stages"].items()} == {"topk": 24, "top": 72, "am": 72, "concepts": 72}
    # the top-k lists are those of the method itself (same values; ids and locations where there is no tie)
    from convscope.applications.deconv import synthetic_images

    data = synthetic_images(demo, 24, progress=False)
    direct = top_k_activations(demo, data.batches(8), LAYERS, k=2, progress=False)
    for layer in LAYERS:
        units = atlas.units(layer)
        assert all(u.am_image and u.top_image and u.concept for u in units)
        assert all(len(u.top) == 2 for u in units)
        got = torch.tensor([[t["score"] for t in u.top] for u in units])
        torch.testing.assert_close(got, direct[layer].values, rtol=1e-4, atol=1e-5)
        assert [u.max_activation for u in units] == pytest.approx(direct[layer].values[:, 0].tolist(), rel=1e-4)
        for u in units:
            top = u.top[0]
            assert top["source"] == data.names[top["image"]]
            y0, x0, y1, x1 = top["box"]
            assert 0 <= y0 < y1 <= 112 and 0 <= x0 < x1 <= 112
            am = Image.open(atlas.file(u.am_image))
            assert am.size == (64, 64) and am.mode == "RGB"
            assert Image.open(atlas.file(u.top_image)).mode == "RGB"
            assert 0.0 <= u.iou <= 1.0 and u.category in ("color", "object", "texture", "scene")
    assert json.loads(meta["last_build"])["executor"] == "local"
    assert not list(atlas.files_root.rglob("*.tmp"))


def _done(db: Path) -> int:
    """Units with pictures committed so far (read while the build writes)."""
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            row = con.execute("SELECT count(am_image) + count(top_image) FROM units").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_build(reference, tmp_path):
    out = tmp_path / "atlas"
    cmd = [sys.executable, "-m", "convscope.cli", "atlas", "build", "demo_net", "--layers", ",".join(LAYERS),
           "--out", str(out), "--chunk", "4", *CLI_SETTINGS]  # other chunks than the reference: results must match
    total = 2 * 72
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _done(out / "atlas.sqlite") < 6:
            time.sleep(0.02)
        assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the store after kill -9: readable, every recorded unit has its files, and some work is left
    partial = open_atlas(out)
    done = 0
    for layer in partial.layers():
        for u in partial.units(layer.name):
            for f in (u.am_image, u.top_image):
                if f is not None:
                    assert partial.file(f).stat().st_size > 0
                    done += 1
    assert 0 < done < total
    partial.close()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    resumed = open_atlas(out)
    last = json.loads(resumed.meta()["last_build"])
    redone = sum(v["units"] for s, v in last["stages"].items() if s in ("top", "am"))
    assert redone == total - done  # committed chunks were not redone
    assert not list(resumed.files_root.rglob("*.tmp"))
    _compare(reference, resumed)
    # nothing left: a third run does no unit work
    assert main(["atlas", "build", "demo_net", "--layers", ",".join(LAYERS), "--out", str(out), *CLI_SETTINGS]) == 0
    assert set(json.loads(open_atlas(out).meta()["last_build"])["stages"]) <= {"topk"}


def test_resume_with_other_model_or_settings_is_refused(reference, tmp_path, demo):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference.root, out)
    with pytest.raises(AtlasError, match=r"k: 2 there, 3 now.*new folder"):
        build_atlas("demo_net", LAYERS, out, progress=False, **{**SETTINGS, "k": 3})
    from convscope.models import load_model

    other = load_model("demo_net", device="cpu")
    with torch.no_grad():
        other.features.conv1.bias.add_(1.0)
    with pytest.raises(AtlasError, match="weights.*new folder"):
        build_atlas(other, LAYERS, out, progress=False, **SETTINGS)
    with pytest.raises(ConvscopeError, match="unknown layer"):
        build_atlas("demo_net", ["features.conv9"], out, progress=False, **SETTINGS)


def test_failed_build_leaves_the_model_untouched(demo, tmp_path, one_thread):
    broken = tmp_path / "broden"
    broken.mkdir()
    (broken / "index.csv").write_text("not,a,broden,index\n")  # fails inside the dissection stage
    demo.train()
    try:
        before = snapshot(demo)
        with pytest.raises(ConvscopeError):
            build_atlas(demo, ["classifier.fc8"], tmp_path / "a", synthetic=8, k=1, am_steps=1, concepts=broken,
                        progress=False)
        assert_untouched(demo, before)
        with Atlas(tmp_path / "a", mode="w") as partial:  # the top-k pass before it was stored
            assert partial.blob_keys("topk/classifier.fc8/") == ["topk/classifier.fc8/0-8"]
    finally:
        demo.eval()


@pytest.mark.slow
def test_two_workers_equal_one(reference, tmp_path):
    atlas = build_atlas("demo_net", LAYERS, tmp_path / "atlas", workers=2, chunk=8, progress=False, **SETTINGS)
    assert json.loads(atlas.meta()["last_build"])["workers"] == 2
    _compare(reference, atlas)


@pytest.mark.slow
def test_ray_executor_equals_local(reference, tmp_path):
    ray = pytest.importorskip("ray")
    atlas = build_atlas("demo_net", LAYERS, tmp_path / "atlas", executor="ray", workers=2, chunk=8, progress=False,
                        **SETTINGS)
    last = json.loads(atlas.meta()["last_build"])
    assert (last["executor"], last["workers"]) == ("ray", 2)
    assert not ray.is_initialized()  # the local cluster it started is shut down
    _compare(reference, atlas)


def test_cli_info(reference, capsys):
    assert main(["atlas", "info", str(reference.root)]) == 0
    text = capsys.readouterr().out
    assert "demo_net" in text and "features.conv1" in text and "classifier.fc8" in text
    assert " 64     64     64       64" in text
    assert main(["atlas", "info", str(reference.root / "nope")]) == 2
    assert "convscope atlas build" in capsys.readouterr().err
