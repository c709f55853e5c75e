"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"),
with the module and parameter names of ``torchvision.models.swin_t`` so its checkpoints load strictly.

``features.0`` = (``0`` patch-embedding conv, ``1`` :class:`Permute` to channels-last, ``2`` LayerNorm);
``features.1/3/5/7`` = stages of :class:`SwinTransformerBlock` (``norm1``, ``attn.{qkv, proj,
relative_position_bias_table}``, ``norm2``, ``mlp.0/mlp.3``); ``features.2/4/6`` = :class:`PatchMerging`
(``norm``, ``reduction``); then ``norm``, ``permute`` (back to N x C x H x W), ``avgpool``, ``flatten``, ``head``.
Inside ``features`` and at ``norm`` the activations are channels-last ``N x H x W x C`` (use
:func:`convscope.core.tokens.as_feature_map` to read them as maps); ``permute`` gives ``N x C x H x W``.
Written from the paper and torchvision's source; no torchvision import.

Any input size of at least one patch works as in torchvision: feature maps are padded to whole windows for the
attention (and cropped back), odd sizes are padded before patch merging, and the shift is skipped when a single
window covers the map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError

MASK_VALUE = -100.0  # added to the logits of token pairs from different regions of a shifted window (Sec. 3.2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (a hookable layer)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """Drop the residual branch of whole samples with probability ``p`` while training, scaling the kept ones by
    ``1 / (1 - p)`` (Huang et al. 2016, "row" mode); the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * noise.div_(keep)


class PatchMerging(nn.Module):
    """Patch merging (Sec. 3.1): concatenate each 2x2 neighbourhood (``N x H x W x C`` -> ``N x H/2 x W/2 x 4C``,
    odd sizes padded with zeros), LayerNorm, then a linear reduction to ``2C``."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3], x.shape[-2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
                      dim=-1)
        return self.reduction(self.norm(x))


def shift_mask(pad_h: int, pad_w: int, window: Sequence[int], shift: Sequence[int],
               device: torch.device | None = None) -> torch.Tensor:
    """``windows x T x T`` additive mask of shifted-window attention (Sec. 3.2, "efficient batch computation"):
    after the cyclic shift, a window may hold up to 9 regions that were not adjacent in the image; token pairs
    from different regions get ``MASK_VALUE``."""
    region = torch.zeros(pad_h, pad_w, device=device)
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, MASK_VALUE), torch.zeros_like(diff))


def shifted_window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                             relative_position_bias: torch.Tensor, window_size: Sequence[int], num_heads: int,
                             shift_size: Sequence[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                             qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                             training: bool = False) -> torch.Tensor:
    """(Shifted) window multi-head self-attention with relative position bias (Sec. 3.2, Eq. 4) on
    ``N x H x W x C``: pad to whole windows, roll by ``-shift``, attend within each window
    ``softmax(Q K^T / sqrt(d) + B [+ mask]) V``, project, undo the roll, crop. Returns ``N x H x W x C``."""
    n, h, w, c = input.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    pad_h, pad_w = x.shape[1], x.shape[2]
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = pad_h // window_size[0], pad_w // window_size[1]
    t = window_size[0] * window_size[1]
    x = x.view(n, nh, window_size[0], nw, window_size[1], c).permute(0, 1, 3, 2, 4, 5).reshape(n * nh * nw, t, c)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.shape[0], t, 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N windows) x heads x T x d
    attn = (q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1) + relative_position_bias
    if sum(shift) > 0:
        mask = shift_mask(pad_h, pad_w, window_size, shift, device=x.device).to(attn.dtype)
        attn = attn.view(n, nh * nw, num_heads, t, t) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, t, t)
    attn = F.dropout(attn.softmax(dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], t, c)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(n, nh, nw, window_size[0], window_size[1], c).permute(0, 1, 3, 2, 4, 5).reshape(n, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class ShiftedWindowAttention(nn.Module):
    """W-MSA / SW-MSA module (Sec. 3.2): ``qkv``, ``proj``, the learned ``relative_position_bias_table``
    ``(2Wh-1)(2Ww-1) x heads`` and the buffer ``relative_position_index`` (``Wh*Ww*Wh*Ww``) that reads ``B`` from it."""

    relative_position_index: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, dim: int, window_size: Sequence[int], shift_size: Sequence[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ConvscopeError(f"Swin window_size {window_size!r} and shift_size {shift_size!r} must be (h, w) "
                                 "pairs; give two ints each")
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # T x T x 2, in -(W-1)..W-1
        index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
        self.register_buffer("relative_position_index", index.flatten())

    def relative_position_bias(self) -> torch.Tensor:
        """``1 x heads x T x T``: the bias ``B`` of Eq. 4 for every pair of tokens of a window."""
        t = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(t, t, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.relative_position_bias(),
                                        self.window_size, self.num_heads, self.shift_size,
                                        attention_dropout=self.attention_dropout, dropout=self.dropout,
                                        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=self.training)


class SwinTransformerBlock(nn.Module):
    """One Swin block (Sec. 3.1, Eq. 3): ``x + SD(attn(norm1(x)))``, then ``+ SD(mlp(norm2(.)))`` on
    ``N x H x W x C``; ``mlp`` is ``0`` Linear, ``1`` GELU, ``2`` Dropout, ``3`` Linear, ``4`` Dropout."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int],
                 mlp_ratio: float = 4.0, dropout: float = 0.0, attention_dropout: float = 0.0,
                 stochastic_depth_prob: float = 0.0, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ShiftedWindowAttention(dim, window_size, shift_size, num_heads,
                                           attention_dropout=attention_dropout, dropout=dropout)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class SwinTransformer(nn.Module):
    """Swin Transformer classifier with ``torchvision.models.SwinTransformer``'s names (see the module docstring).
    Takes ``N x 3 x H x W`` (any size of at least one patch), returns ``N x num_classes`` logits."""

    def __init__(self, patch_size: Sequence[int] = (4, 4), embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: Sequence[int] = (7, 7),
                 mlp_ratio: float = 4.0, dropout: float = 0.0, attention_dropout: float = 0.0,
                 stochastic_depth_prob: float = 0.1, num_classes: int = 1000,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ConvscopeError(f"Swin depths {list(depths)} and num_heads {list(num_heads)} need one entry per "
                                 "stage; give lists of the same length")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        self.num_classes = num_classes
        self.patch_size = list(patch_size)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, embed_dim, kernel_size=(patch_size[0], patch_size[1]), stride=(patch_size[0], patch_size[1])),
            Permute([0, 2, 3, 1]),
            norm_layer(embed_dim))]
        total, block_id = sum(depths), 0
        for i_stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i_stage
            stage = []
            for i_layer in range(depth):
                sd_prob = stochastic_depth_prob * block_id / max(total - 1, 1)  # linear decay rule (Sec. 4.1)
                stage.append(SwinTransformerBlock(
                    dim, heads, window_size=window_size,
                    shift_size=[0 if i_layer % 2 == 0 else w // 2 for w in window_size],
                    mlp_ratio=mlp_ratio, dropout=dropout, attention_dropout=attention_dropout,
                    stochastic_depth_prob=sd_prob, norm_layer=norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if i_stage < len(depths) - 1:
                layers.append(PatchMerging(dim, norm_layer))
        self.features = nn.Sequential(*layers)
        num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = norm_layer(num_features)
        self.permute = Permute([0, 3, 1, 2])  # N H W C -> N C H W
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConvscopeError(f"Swin takes images N x 3 x H x W, got {tuple(x.shape)}; pass an RGB batch")
        if x.shape[2] < self.patch_size[0] or x.shape[3] < self.patch_size[1]:
            raise ConvscopeError(f"Swin input {x.shape[2]}x{x.shape[3]} is smaller than one patch "
                                 f"({self.patch_size[0]}x{self.patch_size[1]}); give a larger image")
        x = self.norm(self.features(x))
        return self.head(self.flatten(self.avgpool(self.permute(x))))


def swin_t(num_classes: int = 1000, **kwargs: object) -> SwinTransformer:
    """Swin-T (Liu et al. 2021, Sec. 3.3): C = 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), 7x7 windows,
    4x4 patches, stochastic depth 0.2. Other ``SwinTransformer`` arguments override for small test nets."""
    cfg: dict[str, Any] = dict(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                               window_size=[7, 7], stochastic_depth_prob=0.2)
    cfg.update(kwargs)
    return SwinTransformer(num_classes=num_classes, **cfg)
