"""ViT options for small data: the head reading the mean of the patch tokens, and stride-1 layers in the conv stem."""

from __future__ import annotations

import pytest
import torch

from convscope.errors import ConvscopeError
from convscope.models.vit import VisionTransformer, demo_vit, stem_configs, vit_b_16

TINY = dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def test_mean_pool_reads_the_mean_of_the_patch_tokens():
    torch.manual_seed(0)
    model = vit_b_16(num_classes=5, image_size=32, pool="mean", **TINY).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # zero-initialized: make the logits depend on the tokens
    x = torch.randn(3, 3, 32, 32)
    seen: dict[str, torch.Tensor] = {}
    handle = model.encoder.ln.register_forward_hook(lambda m, i, o: seen.setdefault("ln", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    tokens = seen["ln"].double()  # N x (1 + 16) x D: the class token, then the 4 x 4 patch grid
    assert tokens.shape == (3, 17, 16)
    w, b = model.heads.head.weight.double(), model.heads.head.bias.double()
    expected = tokens[:, 1:].sum(1) / 16 @ w.T + b  # float64 mean over the 16 patch tokens, class token left out
    assert torch.allclose(logits.double(), expected, atol=1e-5)
    # the class token no longer reaches the logits; with pool="token" it is all they read
    model.pool = "token"
    with torch.no_grad():
        assert torch.allclose(model(x).double(), tokens[:, 0] @ w.T + b, atol=1e-5)


def test_mean_pool_patch_tokens_of_the_last_block_reach_the_head():
    torch.manual_seed(0)
    model = vit_b_16(num_classes=4, image_size=32, pool="mean", **TINY)
    torch.nn.init.normal_(model.heads.head.weight)
    x = torch.randn(2, 3, 32, 32)
    out: dict[str, torch.Tensor] = {}

    def keep(_m: torch.nn.Module, _i: object, o: torch.Tensor) -> None:
        o.retain_grad()
        out["t"] = o

    model.encoder.layers[-1].register_forward_hook(keep)
    model(x)[:, 1].sum().backward()
    g = out["t"].grad
    assert g is not None and g[:, 1:].abs().amin() > 0  # every patch token of the last block reaches the logits
    assert torch.equal(g[:, 0], torch.zeros_like(g[:, 0]))  # the class token does not (unlike pool="token")


def test_default_pool_is_torchvisions_and_a_bad_pool_is_one_line():
    assert vit_b_16(num_classes=2, image_size=32, **TINY).pool == "token"
    with pytest.raises(ConvscopeError, match="pool='max'.*token, mean"):
        VisionTransformer(image_size=32, pool="max", **TINY)


def test_stem_entries_give_channels_and_strides():
    cfgs = stem_configs((8, (8, 1), 16))
    assert [(c.out_channels, c.kernel_size, c.stride) for c in cfgs] == [(8, 3, 2), (8, 3, 1), (16, 3, 2)]
    model = demo_vit(stem=(8, (8, 1), 16, 16), image_size=32, **TINY).eval()  # strides 2 * 1 * 2 * 2 = patch 8
    assert [model.conv_proj.get_submodule(f"conv_bn_relu_{i}.0").stride for i in range(4)] == [(2, 2), (1, 1),
                                                                                                (2, 2), (2, 2)]
    with torch.no_grad():
        assert model.conv_proj(torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    with pytest.raises(ConvscopeError, match="strides multiply to 4, not patch_size 8"):
        demo_vit(stem=(8, (8, 1), 16), image_size=32, **TINY)
