"""Attention rollout and per-head attention maps of Vision Transformers.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 3): the residual
connection is modelled by mixing each block's attention with the identity, ``A_hat = 0.5 A + 0.5 I``, each row
renormalized to sum to 1, and the attention of block ``l`` over the input tokens is the product
``A_tilde_l = A_hat_l A_hat_(l-1) ... A_hat_start``. The map is the class token's row of the product over the patch
tokens, reshaped to the patch grid. Heads are fused per block before the product (``head_fusion``: mean, max or
min over heads, as jacobgil/vit-explain does).

``discard_ratio`` follows the jacobgil/vit-explain convention: in every block, after head fusion and before the
identity is added, the ``int(T^2 * discard_ratio)`` lowest entries of the fused ``T x T`` matrix are set to 0,
except the class token's attention to itself (entry ``[0, 0]``), which is never discarded (when it is among the
lowest, fewer entries are dropped). Unlike vit-explain, which divides by ``A.sum(dim=-1)`` without keeping the
dimension (a column-wise broadcast for its batch of one), rows are renormalized here, as the paper says; and
every image of the batch gets its own discard (vit-explain zeroes image 0's entries only).

The attention weights come from :func:`convscope.models.vit.need_attention_weights` (per-head weights
``N x heads x T x T`` of every ``EncoderBlock``), read by the probe on ``<block>.self_attention``; the token grid
and the number of extra tokens from the probe's reading of the block output as a map. Rollout is not
class-specific: ``target`` is accepted (the registry passes one) and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input
from ..core.layers import resolve_layer
from ..core.probe import probe
from ..core.targets import Target
from ..errors import ConvscopeError
from ..models.vit import EncoderBlock, need_attention_weights

HEAD_FUSIONS = ("mean", "max", "min")


def block_attentions(model: nn.Module, x: torch.Tensor, blocks: list[str] | None = None
                     ) -> tuple[list[str], list[torch.Tensor], int, tuple[int, int]]:
    """One forward pass of ``x`` with per-head attention weights: ``(block names, [N x heads x T x T] per block in
    order, extra tokens E, patch grid (gh, gw))``. ``blocks``: a subset of the model's ViT blocks (default: all)."""
    check_input(x, "attention rollout")
    if x.dim() != 4:
        raise ConvscopeError(f"attention rollout needs images N x C x H x W, got {tuple(x.shape)}; add a batch "
                             "dimension with x[None]")
    chosen = vit_blocks(model) if blocks is None else list(blocks)
    with need_attention_weights(model):
        attn = [f"{b}.self_attention" for b in chosen]
        with torch.no_grad(), probe(model, attn + chosen[-1:]) as p:
            model(x.detach())
            outputs: list[object] = [p.activations[a] for a in attn]  # (output, weights) pairs
            info = p.token_info.get(chosen[-1])
    found = [w[1] if isinstance(w, tuple) and len(w) == 2 else None for w in outputs]
    weights = [w for w in found if isinstance(w, torch.Tensor) and w.dim() == 4]
    if len(weights) != len(found):
        raise ConvscopeError("a ViT block's self_attention returned no per-head weights; use convscope.models.vit "
                             "blocks (EncoderBlock.need_weights) for attention maps")
    if info is None or info.layout != "tokens" or info.extra_tokens < 1:
        raise ConvscopeError(f"could not read block {chosen[-1]!r}'s output as a class token + a patch grid; attention "
                             "maps need a ViT with a class token and an image input whose sides are patch multiples")
    return list(chosen), weights, info.extra_tokens, info.grid


def vit_blocks(model: nn.Module) -> list[str]:
    """Names of the model's ViT encoder blocks (:class:`convscope.models.vit.EncoderBlock`), in order; a one-line
    error when it has none."""
    names = [n for n, m in model.named_modules() if isinstance(m, EncoderBlock)]
    if not names:
        raise ConvscopeError(f"{type(model).__name__} has no ViT encoder block (convscope.models.vit EncoderBlock); "
                             "attention rollout and attention maps need a ViT's per-head attention weights")
    return names


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """``N x heads x T x T`` -> ``N x T x T``: mean, max or min over the heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ConvscopeError(f"head_fusion={head_fusion!r}: use one of {', '.join(HEAD_FUSIONS)}")


def discard_lowest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """A copy of ``N x T x T`` with each image's ``int(T^2 * discard_ratio)`` lowest entries set to 0, entry
    ``[0, 0]`` (class token to itself) kept (jacobgil/vit-explain)."""
    n, t, _ = attention.shape
    k = int(t * t * discard_ratio)
    flat = attention.reshape(n, t * t)
    if k == 0:
        return attention.clone()
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=-1, largest=False).indices, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0).view(n, t, t)


def attention_rollout(model: nn.Module, x: torch.Tensor, target: Target | None = None, head_fusion: str = "mean",
                      discard_ratio: float = 0.9, start_layer: int = 0, upsample: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, Sec. 3) of a ViT: ``N x 1 x H x W``.

    Per block from ``start_layer`` on: heads fused (``head_fusion``), lowest entries discarded
    (``discard_ratio``, vit-explain convention, see the module docstring), ``A_hat = 0.5 A + 0.5 I``, rows
    renormalized; the product ``A_hat_L ... A_hat_start``'s class-token row over the patch tokens, on the patch
    grid (``upsample``: bilinearly resized to the input's size). Not normalized (the row sums to at most 1).
    ``target`` is ignored: rollout does not depend on the class."""
    if head_fusion not in HEAD_FUSIONS:
        raise ConvscopeError(f"head_fusion={head_fusion!r}: use one of {', '.join(HEAD_FUSIONS)}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ConvscopeError(f"discard_ratio={discard_ratio!r}: use a number in [0, 1)")
    _, weights, extra, grid = block_attentions(model, x)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < len(weights):
        raise ConvscopeError(f"start_layer={start_layer!r}: use an int block index from 0 to {len(weights) - 1}")
    rollout = None
    for w in weights[start_layer:]:
        a = discard_lowest(fuse_heads(w, head_fusion), discard_ratio)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    maps = rollout[:, 0, extra:].reshape(len(x), 1, *grid)
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False) if upsample else maps


def attention_maps(model: nn.Module, x: torch.Tensor, layer: str | None = None,
                   upsample: bool = False) -> torch.Tensor:
    """The class token's attention to each patch, per head, in one ViT block: ``N x heads x gh x gw``
    (``upsample``: at the input's size). ``layer``: the block (``encoder.layers.encoder_layer_<i>``) or its
    ``self_attention``; default the last block."""
    names = vit_blocks(model)
    block = names[-1] if layer is None else resolve_layer(model, layer)[0].removesuffix(".self_attention")
    if block not in names:
        raise ConvscopeError(f"layer {layer!r} is not a ViT encoder block; use one of {', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''} (or its .self_attention)")
    _, weights, extra, grid = block_attentions(model, x, [block])
    w = weights[-1]
    maps = w[:, :, 0, extra:].reshape(w.shape[0], w.shape[1], *grid)
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False) if upsample else maps
