"""``convscope deconv`` / ``filters`` / ``evolution`` end to end on demo_net, and the EvolutionMonitor callback."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import convscope as cs
from convscope.applications.deconv import evolution, parse_units
from convscope.applications.monitor import EvolutionMonitor
from convscope.cli import main
from convscope.models.demo_net import DemoNet

from .helpers import assert_untouched, linked_images, snapshot

CLASSES = [f"c{i}" for i in range(8)]


def _checkpoints(folder, n: int = 3):
    """``epoch_XX.pt`` files as train-demo writes them (plain DemoNet weights, classes, epoch), different weights."""
    folder.mkdir()
    for e in range(n):
        torch.manual_seed(e)
        net = DemoNet(num_classes=len(CLASSES))
        torch.save({"state_dict": net.state_dict(), "epoch": e, "classes": CLASSES}, folder / f"epoch_{e:02d}.pt")
    return folder


def test_parse_units():
    assert parse_units("0-3") == [0, 1, 2, 3]
    assert parse_units("1,5,9") == [1, 5, 9]
    assert parse_units("0-2, 8,1") == [0, 1, 2, 8]
    for bad in ("5-2", "a", "1,,2", "-1", "3-"):
        with pytest.raises(cs.ConvscopeError, match="range"):
            parse_units(bad)


def test_deconv_cli_writes_grid_html_and_json(tmp_path, capsys):
    assert main(["deconv", "demo_net", "--device", "cpu", "--layer", "features.relu2", "--units", "3,7",
                 "--synthetic", "3", "--top", "2", "--out", str(tmp_path)]) == 0
    assert "units 3,7 of features.relu2 over 3 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "deconv.json").read_text())
    assert data["units"] == [3, 7] and data["k"] == 2 and data["images_seen"] == 3
    rows = data["activations"]
    assert [(r["unit"], r["rank"]) for r in rows] == [(3, 0), (3, 1), (7, 0), (7, 1)]
    assert all(r["image"].startswith("synthetic #1000") and len(r["location"]) == 2 for r in rows)
    assert rows[0]["value"] >= rows[1]["value"] and rows[2]["value"] >= rows[3]["value"]
    png = Image.open(tmp_path / "deconv_features.relu2.png")
    assert png.width > png.height / 2  # two blocks (projections | patches) per unit row
    assert linked_images(tmp_path / "deconv.html")


def test_deconv_cli_default_units_are_the_strongest_and_map_mode(tmp_path, demo):
    assert main(["deconv", "demo_net", "--device", "cpu", "--layer", "features.relu3", "--n-units", "2",
                 "--synthetic", "3", "--top", "2", "--mode", "map", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "deconv.json").read_text())
    from convscope.applications.deconv import synthetic_images

    x = synthetic_images(demo, 3, progress=False).load(range(3))
    top1 = cs.top_k_activations(demo, x, "features.relu3", k=1)["features.relu3"].values[:, 0]
    assert data["units"] == top1.topk(2).indices.tolist() and data["mode"] == "map"
    assert (tmp_path / "deconv_features.relu3.png").exists()


def test_filters_cli(tmp_path, capsys):
    assert main(["filters", "demo_net", "--device", "cpu", "--synthetic", "2", "--out", str(tmp_path)]) == 0
    assert "first-layer filters of features.conv1" in capsys.readouterr().out
    data = json.loads((tmp_path / "dead_units.json").read_text())
    names = [r["layer"] for r in data["layers"]]
    assert names[:2] == ["features.conv1", "features.relu1"] and "classifier.relu7" in names
    for r in data["layers"]:
        assert r["fraction"] == pytest.approx(len(r["dead"]) / r["units"])
        assert r["relu"] == (".relu" in r["layer"])
    assert Image.open(tmp_path / "filters.png").size == cs.first_layer_filters(
        cs.load_model("demo_net", device="cpu"), scale=9).size
    assert (tmp_path / "filters.html").exists()


def test_evolution_grid_is_units_by_epochs(tmp_path):
    ckpts = _checkpoints(tmp_path / "run")
    run = evolution(ckpts, "features.relu1", images=None, synthetic=3, out=tmp_path / "evo", n_units=2,
                    device="cpu", progress=False)
    assert run.labels == ["epoch 0", "epoch 1", "epoch 2"]
    assert len(run.cells) == 3 and all(len(col) == 2 for col in run.cells)
    # default units: the strongest of the LAST checkpoint
    last = cs.load_model("demo_net", weights=ckpts / "epoch_02.pt", device="cpu")
    from convscope.applications.deconv import synthetic_images

    x = synthetic_images(last, 3, progress=False).load(range(3))
    top1 = cs.top_k_activations(last, x, "features.relu1", k=1)["features.relu1"].values[:, 0]
    assert run.units == top1.topk(2).indices.tolist()
    assert not torch.equal(run.results[0].values, run.results[2].values)  # different weights, different maxima
    # the picture is 2 rows x 3 columns of equal cells: the same layout with blank cells has the same size
    side = max(max(c.width, c.height) for col in run.cells for c in col)
    s = max(1, 64 // side)
    w, h = (max(c.width for col in run.cells for c in col) * s, max(c.height for col in run.cells for c in col) * s)
    blank = cs.grid([Image.new("RGB", (w, h))] * 6, nrow=3, padding=2, row_labels=[f"unit {u}" for u in run.units],
                    col_labels=run.labels)
    assert Image.open(run.png).size == blank.size
    data = json.loads(run.json.read_text())
    assert [c["label"] for c in data["checkpoints"]] == run.labels


def test_evolution_cli_and_errors(tmp_path, capsys):
    ckpts = _checkpoints(tmp_path / "run", n=2)
    assert main(["evolution", str(ckpts), "--layer", "features.relu1", "--units", "0-1", "--synthetic", "2",
                 "--device", "cpu", "--out", str(tmp_path / "evo")]) == 0
    assert "over 2 checkpoints" in capsys.readouterr().out
    assert (tmp_path / "evo" / "evolution_features.relu1.png").exists()
    assert main(["evolution", str(tmp_path / "evo"), "--layer", "features.relu1", "--out", str(tmp_path)]) == 2
    assert "no epoch_XX.pt" in capsys.readouterr().err
    assert main(["evolution", str(ckpts), "--layer", "features.relu1", "--units", "64", "--synthetic", "2",
                 "--device", "cpu", "--out", str(tmp_path / "evo")]) == 2
    assert "valid 0-63" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--units", "5-2"], "use a range (0-15)"),
    (["--units", "0,200"], "unit 200 is out of range: layer 'features.relu2' has 128 units (valid 0-127)"),
    (["--top", "0"], "--top 0"),
    (["--synthetic", "0"], "--synthetic 0"),
])
def test_deconv_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(["deconv", "demo_net", "--device", "cpu", "--layer", "features.relu2", "--synthetic", "2",
                 "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_deconv_cli_unknown_layer(tmp_path, capsys):
    assert main(["deconv", "demo_net", "--device", "cpu", "--layer", "features.relu9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'features.relu9'" in err and "features.relu" in err


class _Writer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int]] = []

    def add_image(self, tag: str, img: torch.Tensor, global_step: int) -> None:
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        self.calls.append((tag, tuple(img.shape), global_step))


def test_evolution_monitor_writes_a_png_per_call_and_leaves_the_model_untouched(tmp_path):
    torch.manual_seed(0)
    net = DemoNet(num_classes=4)
    net.train()  # as inside a training loop
    probe_images = torch.randn(3, 3, 48, 48)
    writer = _Writer()
    mon = EvolutionMonitor(net, "features.relu2", units=[1, 4], images=probe_images, out=tmp_path, every=2,
                           writer=writer)
    before = snapshot(net)
    first = mon(0)
    assert mon(1) is None  # every=2
    with torch.no_grad():
        net.features.conv1.weight.mul_(-1)  # "training" between epochs
    before = snapshot(net)
    second = mon.step(2)
    assert_untouched(net, before)
    assert first == tmp_path / "epoch_000_features.relu2.png" and second.exists()
    running = Image.open(mon.grid_path)
    one = Image.open(first)
    assert running.height == one.height and running.width > one.width  # two epoch columns, two unit rows
    assert [c[0] for c in writer.calls] == ["deconvnet/features.relu2"] * 2 and [c[2] for c in writer.calls] == [0, 2]
    assert writer.calls[-1][1] == (3, running.height, running.width)
    with pytest.raises(cs.ConvscopeError, match="valid 0-127"):
        EvolutionMonitor(net, "features.relu2", units=[128], images=probe_images, out=tmp_path)


def test_evolution_monitor_tensorboard_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    with pytest.raises(cs.ConvscopeError, match=r"pip install convscope\[tensorboard\]"):
        EvolutionMonitor(DemoNet(num_classes=4), "features.relu1", units=[0], images=torch.randn(1, 3, 32, 32),
                         out=tmp_path, log_dir=tmp_path / "tb")
