"""Bad input on the command line: exit code 2, one line on stderr, no traceback, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from convscope.cli import main
from convscope.data.synthetic import generate


def _one_line_exit_2(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err}"
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("convscope: error: "), err
    return err


def _nothing_written(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    assert not leftovers, f"half-written output: {leftovers}"


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("mine")
    err = _one_line_exit_2(["explain", "sample:chelsea", "--model", "demo_net", "--out", str(f)], capsys)
    assert "is a file" in err and f.read_text() == "mine"


def test_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("mine")
    err = _one_line_exit_2(["report", "sample:chelsea", "--model", "demo_net", "--out", str(f / "sub")], capsys)
    assert str(f) in err


@pytest.mark.skipif(os.access("/sys/kernel", os.W_OK) and os.geteuid() != 0, reason="needs an unwritable folder")
def test_out_not_writable(capsys):
    target = Path("/sys/kernel/convscope-out")  # the kernel refuses new entries there, even to root
    err = _one_line_exit_2(["explain", "sample:chelsea", "--model", "demo_net", "--out", str(target)], capsys)
    assert "not allowed to write" in err or "choose" in err
    assert not target.exists()


def test_upconv_out_that_is_a_folder(tmp_path, capsys):
    err = _one_line_exit_2(["upconv", "train", "demo_net", "--layer", "features.relu3", "--out", str(tmp_path)],
                           capsys)
    assert "is a folder" in err


@pytest.mark.parametrize("device", ["tpu:9", "cuda:7", "banana"])
def test_bad_device(device, tmp_path, capsys):
    err = _one_line_exit_2(["predict", "sample:chelsea", "--model", "demo_net", "--device", device], capsys)
    assert device.split(":")[0] in err


def test_factory_that_raises(capsys):
    err = _one_line_exit_2(["layers", "os.path:join"], capsys)
    assert "os.path:join" in err


@pytest.mark.parametrize("argv", [["predict", "sample:chelsea", "--model", "demo_net", "--top", "0"],
                                  ["explain", "sample:chelsea", "--model", "demo_net", "--target", "top0"],
                                  ["explain", "sample:chelsea", "--model", "demo_net", "--target", "top9"]])
def test_bad_counts(argv, tmp_path, capsys):
    _one_line_exit_2([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "explain" else [])], capsys)
    _nothing_written(tmp_path / "o")


def test_missing_image_and_unknown_sample(tmp_path, capsys):
    err = _one_line_exit_2(["predict", str(tmp_path / "nope.jpg"), "--model", "demo_net"], capsys)
    assert "nope.jpg" in err and "sample:" in err
    err = _one_line_exit_2(["predict", "sample:chelsy", "--model", "demo_net"], capsys)
    assert "chelsea" in err  # the closest valid name


@pytest.fixture
def broden(tmp_path):
    root = generate(tmp_path / "broden", n=4, size=32, seed=0, workers=1)
    return root


def test_corrupt_broden_mask(broden, tmp_path, capsys):
    mask = broden / "images" / "synth" / "000001_color.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "d"
    err = _one_line_exit_2(["dissect", "demo_net", "--layers", "features.relu1", "--dataset", str(broden),
                            "--out", str(out)], capsys)
    assert "000001_color.png" in err


def test_wrong_size_broden_mask(broden, tmp_path, capsys):
    mask = broden / "images" / "synth" / "000002_object.png"
    Image.open(mask).resize((7, 9)).save(mask)
    err = _one_line_exit_2(["dissect", "demo_net", "--layers", "features.relu1", "--dataset", str(broden),
                            "--out", str(tmp_path / "d")], capsys)
    assert "000002_object.png" in err


def test_real_process_exit_code_and_one_line(tmp_path):
    """The installed entry point, as a shell sees it: exit status 2 and a single stderr line."""
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "convscope", "layers", "demo_net", "--size", "0", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "convscope", "predict", "sample:chelsea", "--model", "nosuchmodel"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nosuchmodel" in r.stderr, r.stderr
