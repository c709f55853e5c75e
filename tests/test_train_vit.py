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
TINY = VitConfig(n_train=64, n_test=16, epochs=3, batch_size=8, lr=1e-2, size=32, **TINY_ARCH)
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
    assert ckpt["test_accuracy"] >= 0.25 and ckpt["epochs"] == VitConfig().epochs and ckpt["seed"] == 0  # chance 1/8
    model = demo_vit(len(SHAPES))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    cfg = VitConfig()
    x, y = render_split(cfg.n_train, 64, cfg.size, cfg.data_seed, workers=1, progress=False)  # held-out test split
    acc = accuracy(model, x, y)
    # 64 of the 1000 test images: a binomial standard error of at most 6 points around the stated accuracy
    assert acc >= ckpt["test_accuracy"] - 0.12, (acc, ckpt["test_accuracy"])
    assert acc >= 1.6 / len(SHAPES)  # well above chance (1/8)
