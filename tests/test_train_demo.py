"""demo_net training: reproducible from a seed, resumable, checkpoints per epoch; the bundled weights are good."""

from __future__ import annotations

import pytest
import torch

import convscope as cs
from convscope.applications import train_demo as td
from convscope.applications.train_demo import TrainConfig, accuracy, dihedral, render_split, train_demo
from convscope.models.demo_net import DemoNet, fold_batchnorm
from convscope.models.zoo import DEMO_WEIGHTS

TINY = TrainConfig(n_train=48, n_test=16, epochs=2, batch_size=16)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_reproducible_and_resumable(tmp_path, monkeypatch):
    a = train_demo(tmp_path / "a", TINY, workers=1, progress=False)
    assert [p.name for p in a.checkpoints] == ["epoch_00.pt", "epoch_01.pt", "epoch_02.pt"]
    assert len(a.history) == 2 and all(0 <= h["test_accuracy"] <= 1 for h in a.history)
    # interrupted during epoch 2, then resumed: identical to the uninterrupted run
    b_dir = tmp_path / "b"
    real = td._train_epoch

    def interrupted(*args):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(td, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_demo(b_dir, TINY, workers=1, progress=False)
    assert not (b_dir / "demo_net.pt").exists() and (b_dir / "resume.pt").exists()
    monkeypatch.setattr(td, "_train_epoch", real)
    b = train_demo(b_dir, TINY, workers=1, progress=False)
    assert [h["epoch"] for h in b.history] == [1, 2]
    for (k, va), vb in zip(_weights(a.weights).items(), _weights(b.weights).values()):
        assert torch.equal(va, vb), k
    # the checkpoint loads back into the zoo loader
    model = cs.load_model("demo_net", weights=a.checkpoints[-1], device="cpu")
    assert model.classes[0] == "circle" and len(model.classes) == 8


def test_fold_batchnorm_matches_eval_mode_network():
    torch.manual_seed(0)
    bn_net = DemoNet(num_classes=3, batch_norm=True)
    for m in bn_net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    bn_net.train()
    plain = fold_batchnorm(bn_net)
    assert bn_net.training and plain.training  # mode carried over, input untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in plain.modules())
    assert plain.state_dict().keys() == DemoNet(num_classes=3).state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = bn_net.eval()(x), plain.eval()(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_dihedral_gives_the_eight_symmetries():
    x = torch.arange(9.0).view(1, 1, 3, 3).expand(8, 1, 3, 3)
    out = dihedral(x, torch.arange(8))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[0].flip(-1))
    assert torch.equal(out[2], x[0].flip(-2))
    assert torch.equal(out[4], x[0].transpose(-1, -2))
    assert torch.equal(out[3], torch.rot90(x[0], 2, (-2, -1)))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8


def test_accuracy_by_hand():
    class Const(torch.nn.Module):
        training = False

        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)

        def train(self, mode=True):
            return self

        def eval(self):
            return self

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    assert accuracy(Const(), images, torch.tensor([1, 1, 0, 1])) == 0.75


def test_bundled_weights_classify_held_out_images(demo):
    if not getattr(demo, "pretrained", False):
        pytest.skip(f"no bundled {DEMO_WEIGHTS} yet")
    cfg = TrainConfig()
    x, y = render_split(cfg.n_train + cfg.n_test, 200, cfg.size, cfg.data_seed, workers=1, progress=False)
    # chance is 1/8; the bundled weights reach 97.1% on the 1000 test images (README)
    assert accuracy(demo, x, y) > 0.92
