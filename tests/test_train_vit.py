"""demo_vit: a small ViT trained by the project on the synthetic scenes (train-demo's loop with VitConfig)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convscope.applications.train_demo import VitConfig, accuracy, render_split, to_input, train_demo
from convscope.data.synthetic import SHAPES
from convscope.errors import ConvscopeError
from convscope.models.vit import DEMO_VIT_CONFIG, DEMO_VIT_SIZE, DEMO_VIT_STEM, VisionTransformer, demo_vit

TINY_ARCH = dict(patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, stem=(8, 16, 16))
TINY = VitConfig(n_train=64, n_test=16, epochs=3, batch_size=8, lr=1e-2, size=32, token_labels=0.0, **TINY_ARCH)
BUNDLED = Path(str(resources.files("convscope.models").joinpath("weights", "demo_vit.pt")))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _loss(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    model = demo_vit(len(SHAPES), image_size=TINY.size, **TINY_ARCH)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(to_input(x)), y))


def test_tiny_vit_training_is_seeded_and_lowers_the_loss(tmp_path):
    rng_before = torch.random.get_rng_state()
    a = train_demo(tmp_path / "a", TINY, workers=1, progress=False)
    b = train_demo(tmp_path / "b", TINY, workers=1, progress=False)
    c = train_demo(tmp_path / "c", replace(TINY, seed=1, epochs=1), workers=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert a.weights.name == "demo_vit.pt" and [p.name for p in a.checkpoints][0] == "epoch_00.pt"
    sa, sb, sc = _state(a.weights), _state(b.weights), _state(c.weights)
    assert sa.keys() == demo_vit(8, image_size=32, **TINY_ARCH).state_dict().keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())  # another seed: others
    assert all(v.dtype == torch.float32 for v in sa.values() if v.is_floating_point())  # shipped as trained
    # the loss on the training images falls from the untrained network's ln(8) (zero-initialized head)
    x, y = render_split(0, TINY.n_train, TINY.size, TINY.data_seed, workers=1, progress=False)
    start, end = _loss(_state(a.checkpoints[0]), x, y), _loss(sa, x, y)
    assert math.isclose(start, math.log(8), rel_tol=1e-6)
    assert end < start - 0.04, (start, end)  # measured: 2.079 -> 2.003
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    meta = torch.load(a.weights, map_location="cpu", weights_only=True)
    assert meta["epochs"] == 3 and meta["seed"] == 0 and meta["classes"] == list(SHAPES)
    assert meta["wall_seconds"] > 0 and meta["cpu_seconds"] > 0
    assert json.loads(meta["config"])["hidden_dim"] == 32 and meta["test_accuracy"] == a.test_accuracy


def test_vit_config_is_the_demo_architecture():
    cfg = VitConfig()
    assert {k: getattr(cfg, k) for k in DEMO_VIT_CONFIG} == DEMO_VIT_CONFIG and cfg.size == DEMO_VIT_SIZE
    assert cfg.stem == DEMO_VIT_STEM and (cfg.n_train, cfg.n_test, cfg.data_seed) == (12000, 1000, 0)  # demo_net's
    model = demo_vit()
    assert isinstance(model, VisionTransformer) and model.patch_size == 16 and model.seq_length == 7 * 7 + 1
    assert len(model.encoder.layers) == DEMO_VIT_CONFIG["num_layers"]
    # torchvision's conv-stem names (Conv2dNormActivation 0/1 and the 1x1 conv_last)
    keys = model.state_dict().keys()
    assert {"conv_proj.conv_bn_relu_0.0.weight", "conv_proj.conv_bn_relu_3.1.running_var",
            "conv_proj.conv_last.weight", "conv_proj.conv_last.bias"} <= keys
    assert "conv_proj.conv_bn_relu_0.0.bias" not in keys
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        tokens = model.eval().conv_proj(x)
    assert tokens.shape == (2, DEMO_VIT_CONFIG["hidden_dim"], 7, 7)


def test_conv_stem_strides_must_make_the_patch_size():
    with pytest.raises(ConvscopeError, match="strides multiply to 8"):
        demo_vit(stem=(8, 16, 16), patch_size=16)


def test_bundled_demo_vit_loads_strictly_and_is_accurate():
    assert BUNDLED.is_file() and BUNDLED.stat().st_size <= 10 * 2**20
    ckpt = torch.load(BUNDLED, map_location="cpu", weights_only=True)
    assert ckpt["classes"] == list(SHAPES) and json.loads(ckpt["config"]) == json.loads(json.dumps(asdict(VitConfig())))
    assert ckpt["test_accuracy"] >= 0.6 and ckpt["epochs"] == VitConfig().epochs and ckpt["seed"] == 0  # chance 1/8
    model = demo_vit(len(SHAPES))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    cfg = VitConfig()
    x, y = render_split(cfg.n_train, 64, cfg.size, cfg.data_seed, workers=1, progress=False)  # held-out test split
    acc = accuracy(model, x, y)
    # 64 of the 1000 test images: a binomial standard error of at most 6 points around the stated accuracy
    assert acc >= ckpt["test_accuracy"] - 0.12, (acc, ckpt["test_accuracy"])
    assert acc >= 4 / len(SHAPES)  # far above chance (1/8)


def test_token_label_targets_are_patch_fractions():
    from convscope.applications.train_demo import token_label_targets

    objects = torch.tensor([[[0, 0, 2, 2],
                             [0, 1, 2, 2],
                             [2, 2, 1, 1],
                             [2, 2, 1, 0]]], dtype=torch.int8)  # classes 0, 1; 2 = background
    t = token_label_targets(objects, (2, 2), num_classes=2)
    assert t.shape == (1, 3, 2, 2)
    expected = torch.tensor([[[0.75, 0.0], [0.0, 0.25]],    # class 0 per patch
                             [[0.25, 0.0], [0.0, 0.75]],    # class 1
                             [[0.0, 1.0], [1.0, 0.0]]])     # background
    assert torch.equal(t[0], expected)
    with pytest.raises(ConvscopeError, match="multiple of the token grid"):
        token_label_targets(objects, (3, 3), num_classes=2)


def test_token_labeling_loss_matches_a_float64_hand_computation():
    from convscope.applications.train_demo import token_labeling_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3).double()
    tokens = torch.randn(2, 4, 5, dtype=torch.float64)  # N x T x D, T = 2 x 2 grid
    targets = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    targets = targets / targets.sum(1, keepdim=True)
    got = token_labeling_loss(tokens, head, targets)
    total = 0.0
    for n in range(2):
        for i in range(2):
            for j in range(2):
                z = head(tokens[n, i * 2 + j])  # row-major token order
                logp = z - torch.log(torch.exp(z).sum())
                total += -float((targets[n, :, i, j] * logp).sum())
    assert math.isclose(float(got), total / 8, rel_tol=1e-12)


def test_token_labeling_trains_resumes_identically_and_ships_the_plain_vit(tmp_path, monkeypatch):
    from convscope.applications import train_demo as td

    cfg = replace(TINY, epochs=2, token_labels=1.0)
    a = train_demo(tmp_path / "a", cfg, workers=1, progress=False)
    off = train_demo(tmp_path / "off", replace(cfg, token_labels=0.0), workers=1, progress=False)
    sa, so = _state(a.weights), _state(off.weights)
    assert sa.keys() == so.keys() == demo_vit(8, image_size=32, **TINY_ARCH).state_dict().keys()  # no token head
    assert not all(torch.equal(sa[k], so[k]) for k in sa if sa[k].is_floating_point())  # the loss changed training
    real = td._train_epoch

    def interrupted(*args, **kwargs):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(td, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_demo(tmp_path / "b", cfg, workers=1, progress=False)
    monkeypatch.setattr(td, "_train_epoch", real)
    b = train_demo(tmp_path / "b", cfg, workers=1, progress=False)
    sb = _state(b.weights)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the token head's state resumed too
    assert [h["epoch"] for h in b.history] == [1, 2]
