"""Pass 2: the sparse, exact tally of ``|M_f & L_c|``, ``|M_f|``, ``|L_c|`` and the IoU (Bau et al. 2017, Eq. 19)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from ...errors import ConvscopeError
from .concepts import BatchLabels, bilinear_axis
from .quantile import float32_below

# --------------------------------------------------------------------------- pass 2: tally

_TALLY_CHUNK = 1 << 22  # float64 values interpolated at once (32 MiB per temporary)


@functools.lru_cache(maxsize=64)
def _hot_blocks(act: torch.Tensor, t: torch.Tensor, size: tuple[int, int]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``S_f > T_f`` (``S_f`` = ``act`` upsampled bilinearly to ``size``) where it can be true, as blocks
    ``(image, unit, i, j, mask)``: ``mask[q]`` (``my x mx``) covers the output pixels ``rows[i] x cols[j]`` of
    :func:`bilinear_axis` (those whose first source cell is ``(i, j)``); the blocks partition the output.

    An output pixel is a convex combination of its four source cells (the *quad* ``(i, j)``, ``(i + 1, j)``,
    ``(i, j + 1)``, ``(i + 1, j + 1)``; Eq. 19's upsampling), so it can exceed ``T_f`` only when one of them does.
    Only quads with a cell above the threshold (a few per cent at ``quantile = 0.005``) are interpolated, separably
    and in float64: exact for power-of-two scale factors (the weights are short binary fractions), within an ulp of
    exact otherwise.  Blocks with the same number of rows and columns come together (no padding).
    """
    if not (act.is_contiguous() or act.is_contiguous(memory_format=torch.channels_last)):
        act = act.contiguous()
    n, u, h, w = act.shape
    flat, (sn, su, sh, sw) = act.as_strided((act.numel(),), (1,)), act.stride()  # cells by offset into storage
    hot = act > float32_below(t).float().to(act.device)[None, :, None, None]  # the cells above T_f
    quad = hot
    if (h, w) != size:  # quad (i, j) is hot when any of its cells is: OR with the next row, then the next column
        quad = hot.clone()
        quad[:, :, :-1] |= hot[:, :, 1:]
        quad[:, :, :, :-1] |= quad[:, :, :, 1:].clone()
    img, unit, i, j = quad.nonzero(as_tuple=True)
    _, row_l, row_n, row_step = (v.to(act.device) for v in bilinear_axis(h, size[0]))
    _, col_l, col_n, col_step = (v.to(act.device) for v in bilinear_axis(w, size[1]))
    t64 = t.to(device=act.device, dtype=torch.float64)
    base = int(col_n.max()) + 1
    shape_of = row_n[i] * base + col_n[j]
    order = torch.argsort(shape_of)
    img, unit, i, j, shape_of = img[order], unit[order], i[order], j[order], shape_of[order]
    keys, counts = torch.unique_consecutive(shape_of, return_counts=True)
    end = 0
    for key, count in zip(keys.tolist(), counts.tolist()):
        start, end = end, end + count
        my, mx = divmod(key, base)
        if not my or not mx:  # cells that start no output pixel (when downsampling)
            continue
        step = max(1, _TALLY_CHUNK // (my * mx))  # bounds the float64 temporaries
        for s in range(start, end, step):
            part = slice(s, min(s + step, end))
            gi, gu, qi, qj = img[part], unit[part], i[part], j[part]
            at = gi * sn + gu * su + qi * sh + qj * sw  # the quad's four cells, by offset into the storage
            right, down = col_step[qj] * sw, row_step[qi] * sh
            c00, c01 = flat[at].double()[:, None], flat[at + right].double()[:, None]
            c10, c11 = flat[at + down].double()[:, None], flat[at + down + right].double()[:, None]
            lx, ly = col_l[qj, :mx], row_l[qi, :my, None]
            top, bottom = c00 * (1 - lx) + c01 * lx, c10 * (1 - lx) + c11 * lx
            val = top[:, None, :] * (1 - ly) + bottom[:, None, :] * ly  # quads x my x mx
            yield gi, gu, qi, qj, val > t64[gu][:, None, None]


def tally_batch(act: torch.Tensor, thresholds: torch.Tensor, labels: BatchLabels
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 19 counts of one batch for all units and concepts: ``(intersection U x C, activated U x C, sizes N x U)``.

    ``act`` is the layer's output ``N x U x h x w`` (or ``N x U``); it is upsampled bilinearly to the label size
    (``F.interpolate(mode="bilinear", align_corners=False)``) and thresholded, ``> thresholds``.  ``activated[f, c]``
    counts ``|M_f|`` on the images annotated for ``c``'s category; ``sizes[i, f]`` is ``|M_f|`` in image ``i``.

    Only the pixels that can pass are computed (:func:`_hot_blocks`), and the counts equal thresholding the whole
    upsampled batch.  Intersections are counted per block: a block whose labels are uniform adds its activated
    pixel count to its label combination (:meth:`BatchLabels.block_combos`); only blocks on a label boundary are
    counted pixel by pixel.  Combinations reach their concepts through (combination, concept) pairs
    (:attr:`BatchLabels.combos`); image-level labels (Broden's scenes) are whole-image masks, one
    ``units x images @ images x concepts`` product.
    """
    if act.dim() == 2:
        act = act[:, :, None, None]
    if act.dim() != 4:
        raise ConvscopeError(f"dissection needs a convolutional (N x C x H x W) or linear layer, got shape "
                             f"{tuple(act.shape)}")
    act = act.detach().float()
    n, u, h, w = act.shape
    combo, pair_combo, pair_concept = labels.combos
    k = int(combo.max()) + 1 if combo.numel() else 1
    block, block_ids = labels.block_combos(h, w)
    block = block.to(act.device)
    sizes = torch.zeros(n * u, dtype=torch.float64)
    inter_k = torch.zeros(u * k, dtype=torch.float64)
    for img, unit, i, j, mask in _hot_blocks(act, thresholds.to(torch.float64), labels.size):
        cnt = mask.sum((1, 2)).double().cpu()
        img, unit, i, j, bc = img.cpu(), unit.cpu(), i.cpu(), j.cpu(), block[img, i, j].cpu()
        sizes.index_add_(0, img * u + unit, cnt)
        uniform = bc >= 0
        inter_k.index_add_(0, (unit * k + bc)[uniform], cnt[uniform])
        mixed = (~uniform).nonzero().squeeze(1)
        if len(mixed):  # label boundaries: the block's combination ids, pixel by pixel, where the mask is on
            my, mx = mask.shape[1:]
            q, r, c = mask[mixed.to(mask.device)].nonzero(as_tuple=True)
            q, r, c = mixed[q.cpu()], r.cpu(), c.cpu()
            big_y, big_x = block_ids.shape[3:]
            ids = block_ids.view(-1)[(((img[q] * h + i[q]) * w + j[q]) * big_y + r) * big_x + c]
            keys = unit[q] * k + ids
            inter_k += torch.bincount(keys, minlength=u * k).double()
    sizes = sizes.view(n, u)
    inter = sizes.T @ labels.image_level  # image-level concepts: the whole image is the mask
    inter.index_add_(1, pair_concept, inter_k.view(u, k)[:, pair_combo])  # each combination to its concepts
    activated = sizes.T @ labels.annotated.double()
    return inter, activated, sizes


def iou_from_counts(inter: torch.Tensor, activated: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``IoU = I / (|M| + |L| - I)`` (0 where both are empty), ``U x C`` float64."""
    union = activated + truth[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
