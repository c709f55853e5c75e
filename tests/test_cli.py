"""The CLI as a user runs it: real weights, real photos, clear errors."""

from __future__ import annotations

import re

from PIL import Image

import convscope as cs
from convscope.cli import main


def test_predict_cat_and_coffee(capsys):
    assert main(["predict", str(cs.sample_image("chelsea")), str(cs.sample_image("coffee")), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    cat_part, coffee_part = out.split("coffee.png")
    assert any(c in cat_part for c in ("tabby", "tiger cat", "Egyptian cat"))
    assert any(c in coffee_part for c in ("espresso", "cup", "coffee mug"))


def test_models_and_layers(capsys):
    assert main(["models"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out
    assert main(["layers", "demo_net", "--filter", "conv"]) == 0
    out = capsys.readouterr().out
    assert "features.conv1" in out and "64x56x56" in out and "relu" not in out


def test_report_writes_pictures(tmp_path, capsys):
    imgs = [str(cs.sample_image("chelsea")), str(cs.sample_image("china"))]
    assert main(["report", *imgs, "--model", "demo_net", "--out", str(tmp_path), "--units", "3"]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "chelsea" in html
    linked = re.findall(r'<img src="([^"]+)"', html)
    assert linked and all((tmp_path / src).is_file() for src in linked), "pictures are linked, beside the page"
    units = Image.open(tmp_path / "units.png")
    assert units.size[0] > 2 * 112 and units.size[1] > 3 * 112
    assert (tmp_path / "gradcam" / "chelsea.png").is_file() and (tmp_path / "predictions.json").is_file()
    assert not list(tmp_path.rglob("*.tmp*")), "no temp files may be left"


def test_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["predict", str(bad), "--model", "demo_net"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    assert main(["report", str(cs.sample_image("chelsea")), "--model", "demo_net", "--layer", "features.conv6",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "features.conv6" in err and "features.conv5" in err
    assert main(["layers", "efficientnet_lite9"]) == 2
    assert "efficientnet_lite0" in capsys.readouterr().err


def test_data_synth_writes_broden_layout(tmp_path, capsys):
    from convscope.data import BrodenDataset

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n", "6", "--workers", "1"]) == 0
    ds = BrodenDataset(tmp_path / "s")
    assert len(ds) == 6 and {"color", "object", "texture", "scene"} <= set(ds.categories)


def test_predict_folder_and_file_one_block_per_image_in_order(tmp_path, capsys):
    import shutil

    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("rocket", "chelsea"):
        shutil.copy(cs.sample_image(name), folder / cs.sample_image(name).name)
    assert main(["predict", str(folder), "sample:chelsea", "--model", "efficientnet_lite0", "--top", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    heads, tops = lines[0::2], lines[1::2]
    assert [h.rsplit("/", 1)[-1] for h in heads] == ["chelsea.png", "rocket.jpg", "chelsea.png"]
    assert tops[0] == tops[2] and "cat" in tops[0] and tops[1] != tops[0]  # each image keeps its own prediction
