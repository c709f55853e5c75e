"""Prediction difference analysis (Zintgraf, Cohen, Adel & Welling 2017, ICLR, Sec. 3-4, Algorithm 1).

The relevance of a window ``w`` of pixels for class ``c`` is the weight of evidence (Sec. 2, Eq. 2-3)::

    WE_w(c|x) = log2(odds(c|x)) - log2(odds(c|x_\\w)),   odds(p) = p / (1 - p),

with ``p(c|x_\\w) = sum_{x_w} p(x_w | x_\\w) p(c | x_\\w, x_w)`` estimated by replacing the window with ``samples``
draws and averaging the class probability (softmax of the output), and with the Laplace correction
``p <- (p N + 1) / (N + K)`` (``N`` training instances, ``K`` classes) on both probabilities. The window slides
over the image and each pixel gets the average WE of the windows covering it (Algorithm 1). Units: bits.

Samplers (Sec. 3):

* conditional (``conditional=True``, Sec. 3.2): the window's values given the surrounding frame of ``padding``
  pixels, from a multivariate Gaussian over ``(window + 2 padding)^2`` patches: ``mu_1|2 = mu_1 + S12 S22^-1 (x_2 -
  mu_2)``, ``S_1|2 = S11 - S12 S22^-1 S21``. As in the authors' code, each colour channel has its own Gaussian, the
  patch is shifted to stay inside the image at the borders (the window then sits off-centre in it), and samples are
  clipped to the per-channel range of the fitting data. The paper fits the Gaussian on natural images of the
  training distribution: pass them as ``data``; without ``data`` it is fitted on the patches of the explained batch
  ``x`` itself (then each image's result depends on the other images in the batch).
* marginal (``conditional=False``, Sec. 3.1, after Robnik-Sikonja & Kononenko 2008): the window's pixels are taken
  from randomly drawn images of ``data`` at the same location (``data`` is required).

Every masked copy is run through the model ``batch_size`` copies at a time; samples are drawn window by window
from a seeded ``torch.Generator`` in a fixed order, so the result does not depend on ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input, pinned_target
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.probe import preserved_state
from ..core.progress import progress_bar
from ..core.targets import Target, pinned_indices, scores_of, top_class
from ..errors import ConvscopeError
from .occlusion import window_positions

TRAIN_SIZE = 100_000
"""``N`` of the Laplace correction: the number of training instances (the authors' code uses 100000 for ImageNet)."""


def laplace_log_odds(p: torch.Tensor, train_size: int, classes: int) -> torch.Tensor:
    """``log2(odds)`` of Laplace-corrected probabilities ``(p N + 1) / (N + K)`` (Zintgraf et al. 2017, Sec. 2)."""
    q = (p * train_size + 1) / (train_size + classes)
    return torch.log2(q) - torch.log2(1 - q)


class GaussianPatches:
    """Per-channel Gaussians over ``q x q`` patches (``q = window + 2 padding``), fitted on all patches of ``data``,
    with the conditional mean map and covariance root of the window at each offset inside the patch."""

    def __init__(self, data: torch.Tensor, window: int, padding: int, ridge: float = 1e-6) -> None:
        self.window, self.padding, self.q = window, padding, window + 2 * padding
        d = data.detach().to(torch.float64)
        c = d.shape[1]
        patches = F.unfold(d.reshape(-1, 1, *d.shape[2:]), self.q)  # (M C) x q^2 x L
        patches = patches.reshape(d.shape[0], c, self.q * self.q, -1).permute(1, 0, 3, 2).reshape(c, -1, self.q ** 2)
        if patches.shape[1] < 2:
            raise ConvscopeError("prediction_difference: too few patches to fit the conditional Gaussian; pass more "
                                 "data= images or a smaller window/padding")
        self.mean = patches.mean(1)                                    # C x q^2
        centred = patches - self.mean[:, None]
        cov = centred.transpose(1, 2) @ centred / (patches.shape[1] - 1)  # C x q^2 x q^2
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        self.cov = cov + ridge * scale[:, None, None] * torch.eye(self.q ** 2, dtype=torch.float64, device=d.device)
        self.lo, self.hi = d.amin(dim=(0, 2, 3)), d.amax(dim=(0, 2, 3))
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]] = {}

    def conditional(self, oy: int, ox: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:
        """For the window at ``(oy, ox)`` inside the patch: inner and frame indices, ``mu_1``, ``mu_2``,
        ``B = S12 S22^-1`` and ``A`` with ``A A^T = S_1|2`` (per channel)."""
        key = (oy, ox)
        if key not in self._cache:
            q, w = self.q, self.window
            inner = torch.zeros(q, q, dtype=torch.bool)
            inner[oy:oy + w, ox:ox + w] = True
            i_idx, f_idx = inner.flatten().nonzero()[:, 0], (~inner).flatten().nonzero()[:, 0]
            s11 = self.cov[:, i_idx][:, :, i_idx]
            if len(f_idx):
                s12, s22 = self.cov[:, i_idx][:, :, f_idx], self.cov[:, f_idx][:, :, f_idx]
                b = torch.linalg.solve(s22, s12.transpose(1, 2)).transpose(1, 2)  # C x w^2 x f
                cond = s11 - b @ s12.transpose(1, 2)
            else:
                b, cond = s11.new_zeros(s11.shape[0], len(i_idx), 0), s11
            evals, evecs = torch.linalg.eigh((cond + cond.transpose(1, 2)) / 2)
            root = evecs * evals.clamp_min(0).sqrt()[:, None, :]
            self._cache[key] = (i_idx, f_idx, self.mean[:, i_idx], self.mean[:, f_idx], b, root)
        return self._cache[key]

    def sample(self, x: torch.Tensor, row: int, col: int, samples: int, gen: torch.Generator,
               clip: bool = True) -> torch.Tensor:
        """``N x samples x C x w x w`` draws of the window at ``(row, col)`` of each image given its frame."""
        n, c, height, width = x.shape
        q, w = self.q, self.window
        top, left = min(max(row - self.padding, 0), height - q), min(max(col - self.padding, 0), width - q)
        i_idx, f_idx, mu1, mu2, b, root = self.conditional(row - top, col - left)
        patch = x[:, :, top:top + q, left:left + q].to(torch.float64).reshape(n, c, q * q)
        mean = mu1 + torch.einsum("cif,ncf->nci", b, patch[:, :, f_idx] - mu2)
        z = torch.randn(n, samples, c, len(i_idx), generator=gen, dtype=torch.float64, device=gen.device)
        out = mean[:, None] + torch.einsum("cij,nscj->nsci", root, z.to(root.device))
        if clip:
            out = torch.maximum(torch.minimum(out, self.hi[:, None]), self.lo[:, None])
        return out.reshape(n, samples, c, w, w)


def prediction_difference(model: nn.Module, x: torch.Tensor, target: Target = top_class, window: int = 8,
                          stride: int | None = None, conditional: bool = True, padding: int = 2, samples: int = 10,
                          seed: int | torch.Generator = 0, batch_size: BatchSize = "auto", progress: bool | None = None,
                          data: torch.Tensor | None = None, train_size: int = TRAIN_SIZE,
                          clip: bool = True) -> torch.Tensor:
    """Prediction difference maps ``N x K x H x W`` in bits (Zintgraf et al. 2017, Algorithm 1).

    Positive: the window's actual values are evidence for the class; negative: evidence against it.

    Args:
        target: class indices (int, one per image, ``N x K``, ``top_class``, ``top_k(k)``), fixed on the clean
            images; a callable must return class indices (the method needs class probabilities).
        window: side ``k`` of the square window marginalized out (all colour channels at once).
        stride: step between windows (default 1, the paper's overlapping sliding window; the last window is
            flush with the far edge).
        conditional, padding: conditional sampling given a frame of ``padding`` pixels (default), or marginal
            sampling from ``data``.
        samples: draws per window (the paper uses 10).
        seed: an int or a ``torch.Generator`` (never the global RNG).
        batch_size: masked copies per forward pass (bounds memory).
        data: images ``M x C x H x W`` (same size as ``x``) to fit the Gaussian / draw marginal samples from;
            default for the conditional sampler: ``x`` itself.
        train_size: ``N`` of the Laplace correction.
        clip: clip conditional samples to the data's per-channel value range (as the authors' code).
        progress: a bar over windows (``True``, ``False``, ``None``: once the work has run 2 s).
    """
    check_input(x, "prediction_difference")
    if x.dim() != 4:
        raise ConvscopeError(f"prediction_difference needs images N x C x H x W, got {tuple(x.shape)}")
    check_batch_size(batch_size, "prediction_difference")
    for name, v, least in (("window", window, 1), ("samples", samples, 1),
                           ("padding", padding, 0), ("train_size", train_size, 1),
                           ("stride", 1 if stride is None else stride, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConvscopeError(f"prediction_difference({name}={v!r}): use an int >= {least}")
    x = x.detach()
    batch_size = resolve_batch_size(batch_size, model, x, "prediction_difference")
    num, chans, height, width = x.shape
    rows = window_positions(height, window, stride or 1)
    cols = window_positions(width, window, stride or 1)
    if data is not None:
        if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.shape[1:] != x.shape[1:] \
                or not data.is_floating_point() or data.shape[0] == 0:
            raise ConvscopeError(f"prediction_difference(data=...): give images M x {chans} x {height} x {width} "
                                 f"like x, got {tuple(getattr(data, 'shape', ()))}")
        data = data.detach().to(x.device)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=x.device).manual_seed(int(seed))
    if conditional:
        if window + 2 * padding > min(height, width):
            raise ConvscopeError(f"prediction_difference: window + 2 padding = {window + 2 * padding} px is larger "
                                 f"than the image ({height}x{width}); use a smaller window= or padding=")
        gauss = GaussianPatches(x if data is None else data, window, padding)

        def draw(r: int, c: int) -> torch.Tensor:
            return gauss.sample(x, r, c, samples, gen, clip).to(x.dtype)
    else:
        if data is None:
            raise ConvscopeError("prediction_difference(conditional=False) samples the window from other images: "
                                 "pass data= (images M x C x H x W from the training distribution)")
        marginal = data

        def draw(r: int, c: int) -> torch.Tensor:
            pick = torch.randint(marginal.shape[0], (num * samples,), generator=gen, device=gen.device)
            win = marginal[pick.to(x.device), :, r:r + window, c:c + window]
            return win.reshape(num, samples, chans, window, window)

    with torch.no_grad(), preserved_state(model):
        out = scores_of(model(x), target)
    pinned_ = pinned_target(model, x, target, output=out)
    fixed = pinned_indices(pinned_)
    if fixed is None:
        raise ConvscopeError("prediction_difference needs class indices as the target (an int, one per image, "
                             "N x K, top_class or top_k), not a score function: it explains class probabilities")
    classes = out.reshape(num, -1).shape[1]
    clean = F.softmax(out.reshape(num, -1).to(torch.float64), dim=1).gather(1, fixed)  # N x K
    prob_sum = _masked_probabilities(model, x, fixed, rows, cols, window, samples, draw, batch_size, progress,
                                     target)
    we = laplace_log_odds(clean, train_size, classes)[None] \
        - laplace_log_odds(prob_sum / samples, train_size, classes)   # P x N x K
    k = fixed.shape[1]
    we = we.reshape(len(rows), len(cols), num, k).permute(2, 3, 0, 1)   # N K Ph Pw
    ys, xs = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    r0, c0 = torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)
    rf = ((ys >= r0[:, None]) & (ys < r0[:, None] + window)).to(torch.float64)
    cf = ((xs >= c0[:, None]) & (xs < c0[:, None] + window)).to(torch.float64)
    counts = rf.sum(0)[:, None] * cf.sum(0)[None, :]
    return (torch.einsum("nkab,ay,bx->nkyx", we, rf, cf) / counts).to(x.dtype)


def _masked_probabilities(model: nn.Module, x: torch.Tensor, fixed: torch.Tensor, rows: list[int], cols: list[int],
                          window: int, samples: int, draw: Callable[[int, int], torch.Tensor], batch_size: int,
                          progress: bool | None, target: Target = top_class) -> torch.Tensor:
    """``P x N x K``: the sum over samples of the target probabilities with window ``p`` replaced by its draws.

    Copies are laid out window by window, image-major, then sample; they run ``batch_size`` rows at a time and the
    draws of a window are made when its first row is needed, so the draw order never depends on ``batch_size``."""
    num = x.shape[0]
    per_window = num * samples
    positions = [(r, c) for r in rows for c in cols]
    total = len(positions) * per_window
    sums = torch.zeros(len(positions), num, fixed.shape[1], dtype=torch.float64, device=x.device)
    drawn: dict[int, torch.Tensor] = {}
    with torch.no_grad(), preserved_state(model), \
            progress_bar(total=len(positions), desc="prediction difference", unit="window", progress=progress,
                         leave=False) as bar:
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(start + batch_size, total), device=x.device)
            pos, img = flat // per_window, (flat % per_window) // samples
            copies = x[img].clone()
            for p in range(int(pos[0]), int(pos[-1]) + 1):
                if p not in drawn:
                    drawn[p] = draw(*positions[p]).reshape(per_window, *x.shape[1:2], window, window)
                sel = (pos == p).nonzero()[:, 0]
                r, c = positions[p]
                copies[sel, :, r:r + window, c:c + window] = drawn[p][flat[sel] % per_window]
                if int(flat[sel[-1]]) % per_window == per_window - 1:  # the window's last copy: free its draws
                    del drawn[p]
                    bar.update(1)
            probs = F.softmax(scores_of(model(copies), target).reshape(len(flat), -1).to(torch.float64), dim=1)
            sums.index_put_((pos, img), probs.gather(1, fixed[img]), accumulate=True)
    return sums


__all__ = ["TRAIN_SIZE", "GaussianPatches", "laplace_log_odds", "prediction_difference"]
