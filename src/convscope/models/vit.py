"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), with torchvision's names.

Module and parameter names are those of ``torchvision.models.vit_b_16`` so its checkpoints load strictly:
``conv_proj`` (the patch embedding, Eq. 1), ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.{ln_1, self_attention, dropout, ln_2, mlp.0, mlp.1, mlp.3}`` (Eq. 2-3),
``encoder.ln`` (Eq. 4) and ``heads.head``. Written from the paper and torchvision's source; no torchvision import.

Differences from torchvision, none of which changes the outputs at the trained size:

* other input sizes: any height and width that are multiples of the patch size are accepted; the position
  embeddings of the patch grid are interpolated (bicubic, ``align_corners=True``, as torchvision's
  ``interpolate_embeddings`` does for checkpoints) to the new grid on every forward pass, the class token's own
  embedding is kept;
* ``conv_stem_configs`` (torchvision's option, Xiao et al. 2021, "Early Convolutions Help Transformers See
  Better"): ``conv_proj`` is then ``conv_bn_relu_<i>`` (3x3 convolutions with batch norm and ReLU, torchvision's
  ``Conv2dNormActivation`` keys ``0``/``1``) and a 1x1 ``conv_last``; their strides multiply to ``patch_size``;
* attention weights: ``EncoderBlock.need_weights`` (default ``False``) makes the block call
  ``self_attention(..., need_weights=True, average_attn_weights=False)``, so a forward hook on
  ``encoder.layers.encoder_layer_<i>.self_attention`` receives ``(output, weights N x heads x T x T)``
  (for attention rollout, Abnar & Zuidema 2020). :func:`need_attention_weights` switches it on for a block of
  code and restores it.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
POOLS = ("token", "mean")  # what the head reads: the class token (torchvision), or the mean of the patch tokens


class ConvStemConfig(NamedTuple):
    """One convolution of a ViT conv stem (torchvision's ``ConvStemConfig``)."""

    out_channels: int
    kernel_size: int
    stride: int
    norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
    activation_layer: Callable[..., nn.Module] = nn.ReLU


def conv_stem(configs: list[ConvStemConfig], hidden_dim: int) -> nn.Sequential:
    """The conv stem replacing the patch embedding (Xiao et al. 2021, Sec. 3): ``conv_bn_relu_<i>`` blocks
    (conv without bias ``0``, norm ``1``, activation ``2``; padding ``(k - 1) // 2``) and a 1x1 ``conv_last``."""
    stem = nn.Sequential()
    prev = 3
    for i, c in enumerate(configs):
        stem.add_module(f"conv_bn_relu_{i}", nn.Sequential(
            nn.Conv2d(prev, c.out_channels, c.kernel_size, stride=c.stride, padding=(c.kernel_size - 1) // 2,
                      bias=False), c.norm_layer(c.out_channels), c.activation_layer(inplace=True)))
        prev = c.out_channels
    stem.add_module("conv_last", nn.Conv2d(prev, hidden_dim, kernel_size=1))
    return stem


class MLPBlock(nn.Sequential):
    """The transformer MLP (Eq. 3): ``0`` Linear, ``1`` GELU, ``2`` Dropout, ``3`` Linear, ``4`` Dropout."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm encoder block (Eq. 2-3): ``x + MSA(LN(x))``, then ``+ MLP(LN(.))``.

    ``need_weights``: when True, ``self_attention`` is asked for per-head attention weights
    (``average_attn_weights=False``) so that a hook on it can read them; the block's output is the same up to
    float rounding (PyTorch then takes its explicit softmax path instead of the fused kernel)."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 norm_layer: Callable[..., nn.Module] = LayerNorm6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.need_weights = False
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 3:
            raise ConvscopeError(f"a ViT encoder block takes N x tokens x {self.hidden_dim}, got "
                                 f"{tuple(input.shape)}; feed images to the whole model")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=self.need_weights, average_attn_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embeddings, the encoder blocks ``layers.encoder_layer_<i>`` and the final LayerNorm ``ln``."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float,
                 norm_layer: Callable[..., nn.Module] = LayerNorm6) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))  # from BERT
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                                                norm_layer))
            for i in range(num_layers)))
        self.ln = norm_layer(hidden_dim)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``1 x (1 + gh*gw) x D``: the class token's embedding, then the patch embeddings resized to ``grid``
        (bicubic with ``align_corners=True``, torchvision's ``interpolate_embeddings`` rule)."""
        pos = self.pos_embedding
        side = math.isqrt(pos.shape[1] - 1)
        if tuple(grid) == (side, side):
            return pos
        d = pos.shape[2]
        patches = pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=True)
        return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, input: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:  # a square grid, as torchvision assumes
            side = math.isqrt(input.shape[1] - 1)
            grid = (side, side)
        return self.ln(self.layers(self.dropout(input + self.position_embedding(grid))))


class VisionTransformer(nn.Module):
    """ViT classifier (Dosovitskiy et al. 2021, Eq. 1-4) with ``torchvision.models.VisionTransformer``'s names.

    Takes ``N x 3 x H x W`` with ``H`` and ``W`` multiples of ``patch_size`` (the position embeddings are
    interpolated when the grid differs from ``image_size // patch_size``); returns ``N x num_classes`` logits
    read from the class token (``pool="token"``, the paper's Eq. 4 and torchvision's) or from the mean of the
    patch tokens after ``encoder.ln`` (``pool="mean"``: global average pooling, Beyer et al. 2022, "Better plain
    ViT baselines for ImageNet-1k"; the class token stays in the sequence, so the token layout and attention
    rollout are unchanged). ``representation_size`` adds torchvision's ``heads.pre_logits`` + ``heads.act``."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, num_layers: int = 12, num_heads: int = 12,
                 hidden_dim: int = 768, mlp_dim: int = 3072, dropout: float = 0.0, attention_dropout: float = 0.0,
                 num_classes: int = 1000, representation_size: int | None = None,
                 norm_layer: Callable[..., nn.Module] = LayerNorm6,
                 conv_stem_configs: list[ConvStemConfig] | None = None, pool: str = "token") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConvscopeError(f"ViT pool={pool!r}: use one of {', '.join(POOLS)}")
        if image_size % patch_size:
            raise ConvscopeError(f"ViT image_size {image_size} is not a multiple of patch_size {patch_size}; "
                                 "choose sizes where patch_size divides image_size")
        if hidden_dim % num_heads:
            raise ConvscopeError(f"ViT hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}; "
                                 "choose num_heads dividing hidden_dim")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.pool = pool
        if conv_stem_configs:
            stride = math.prod(c.stride for c in conv_stem_configs)
            if stride != patch_size:
                raise ConvscopeError(f"ViT conv stem strides multiply to {stride}, not patch_size {patch_size}; "
                                     "make the product of the stem's strides the patch size")
            self.conv_proj: nn.Module = conv_stem(list(conv_stem_configs), hidden_dim)
        else:
            self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(self.seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout, norm_layer)
        heads: OrderedDict[str, nn.Module] = OrderedDict()
        pre_logits: nn.Linear | None = None
        if representation_size is None:
            head = nn.Linear(hidden_dim, num_classes)
        else:
            pre_logits = nn.Linear(hidden_dim, representation_size)
            heads["pre_logits"], heads["act"] = pre_logits, nn.Tanh()
            head = nn.Linear(representation_size, num_classes)
        heads["head"] = head
        self.heads = nn.Sequential(heads)
        # torchvision's initialization
        if isinstance(self.conv_proj, nn.Conv2d):
            fan_in = 3 * patch_size * patch_size
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(cast(torch.Tensor, self.conv_proj.bias))  # built with a bias
        else:  # the stem's last 1x1 convolution (its 3x3 convolutions keep PyTorch's default init, as torchvision)
            last = cast(nn.Conv2d, self.conv_proj.conv_last)
            nn.init.normal_(last.weight, mean=0.0, std=math.sqrt(2.0 / last.out_channels))
            nn.init.zeros_(cast(torch.Tensor, last.bias))
        if pre_logits is not None:
            nn.init.trunc_normal_(pre_logits.weight, std=math.sqrt(1 / hidden_dim))
            nn.init.zeros_(pre_logits.bias)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid ``(H / patch, W / patch)`` of an input size; a one-line error when it does not divide."""
        p = self.patch_size
        if height % p or width % p or height < p or width < p:
            raise ConvscopeError(f"ViT input {height}x{width} is not a positive multiple of its patch size {p}; "
                                 f"resize or crop to multiples of {p} (e.g. {self.image_size}x{self.image_size})")
        return height // p, width // p

    def _process_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ConvscopeError(f"ViT takes images N x 3 x H x W, got {tuple(x.shape)}; pass an RGB batch")
        grid = self.grid(x.shape[2], x.shape[3])
        x = self.conv_proj(x)  # N D gh gw
        return x.flatten(2).transpose(1, 2), grid  # N (gh gw) D, row-major patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x, grid)
        return self.heads(x[:, 1:].mean(dim=1) if self.pool == "mean" else x[:, 0])


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's keys for a ViT checkpoint saved before torchvision 0.13 (e.g. the released ``vit_b_16-c867db91.pth``),
    whose MLP blocks were ``mlp.linear_1`` / ``mlp.linear_2``: renamed to ``mlp.0`` / ``mlp.3`` (torchvision's
    ``MLPBlock._load_from_state_dict`` does the same). Other keys pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in ((".mlp.linear_1.", ".mlp.0."), (".mlp.linear_2.", ".mlp.3.")):
            key = key.replace(old, new)
        out[key] = value
    return out


def vit_b_16(num_classes: int = 1000, image_size: int = 224, **kwargs: object) -> VisionTransformer:
    """ViT-B/16 (Dosovitskiy et al. 2021, Table 1): 12 layers, 12 heads, width 768, MLP 3072, 16 px patches.
    Other ``VisionTransformer`` arguments (``num_layers``, ``hidden_dim``, ...) override for small test nets."""
    cfg: dict[str, Any] = dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
    cfg.update(kwargs)
    return VisionTransformer(image_size=image_size, num_classes=num_classes, **cfg)


@contextlib.contextmanager
def need_attention_weights(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, every :class:`EncoderBlock` of ``model`` asks its ``self_attention`` for per-head weights
    (a forward hook on ``<block>.self_attention`` then gets ``(output, N x heads x T x T)``); yields the names of
    the blocks. Each block's ``need_weights`` is restored on exit, also when the body raises."""
    blocks = [(name, m, m.need_weights) for name, m in model.named_modules() if isinstance(m, EncoderBlock)]
    if not blocks:
        raise ConvscopeError(f"{type(model).__name__} has no convscope ViT EncoderBlock; attention weights are "
                             "available for convscope.models.vit models (torchvision's blocks never return them)")
    try:
        for _, m, _ in blocks:
            m.need_weights = True
        yield [name for name, _, _ in blocks]
    finally:
        for _, m, flag in blocks:
            m.need_weights = flag


# demo_vit: the project's own small ViT, trained on the synthetic concept scenes like demo_net (``convscope
# train-demo --arch vit``): 112 px input as demo_net, a 7 x 7 token grid (16 px patches), 4 layers, 4 heads, width
# 128, MLP 2x, torchvision's conv stem (four 3x3 stride-2 convolutions with batch norm and ReLU, Xiao et al. 2021)
# as patch embedding, the class read from the class token.
DEMO_VIT_SIZE = 112
DEMO_VIT_CONFIG: dict[str, int] = dict(patch_size=16, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256)
StemLayer = int | tuple[int, int]  # output channels (stride 2), or (output channels, stride)
DEMO_VIT_STEM: tuple[StemLayer, ...] = (24, 48, 96, 192)  # the stem's 3x3 convolutions
DEMO_VIT_POOL = "token"


def stem_configs(stem: tuple[StemLayer, ...]) -> list[ConvStemConfig]:
    """3x3 conv-stem layers from ``stem`` entries: ``c`` (``c`` channels, stride 2) or ``(c, stride)``."""
    return [ConvStemConfig(c, 3, 2) if isinstance(c, int) else ConvStemConfig(int(c[0]), 3, int(c[1])) for c in stem]


def demo_vit(num_classes: int = 8, image_size: int = DEMO_VIT_SIZE, dropout: float = 0.0,
             stem: tuple[StemLayer, ...] = DEMO_VIT_STEM, pool: str = DEMO_VIT_POOL,
             **overrides: int) -> VisionTransformer:
    """``demo_vit``'s architecture (Dosovitskiy et al. 2021, Eq. 1-4, at the small size of ``DEMO_VIT_CONFIG``, with
    the conv stem of Xiao et al. 2021: ``stem`` 3x3 convolutions, each ``channels`` (stride 2) or ``(channels,
    stride)``; ``()`` for the linear patch embedding; ``pool``: what the head reads, see :class:`VisionTransformer`);
    ``overrides`` (``patch_size``, ``num_layers``, ``num_heads``, ``hidden_dim``, ``mlp_dim``) change it."""
    cfg: dict[str, Any] = {**DEMO_VIT_CONFIG, **overrides}
    return VisionTransformer(image_size=image_size, num_classes=num_classes, dropout=dropout,
                             conv_stem_configs=stem_configs(stem) or None, pool=pool, **cfg)
