"""How similar are the representations of two layers (of one network or of two)?

* **CKA**, centred kernel alignment (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of neural network
  representations revisited", Eq. 1-4): with Gram matrices ``K = X X^T`` and ``L = Y Y^T`` of the examples'
  features (``N x p`` and ``N x q``),
  ``HSIC(K, L) = tr(K H L H) / (n - 1)^2`` with the centring matrix ``H = I - 11^T / n`` (Eq. 3), and
  ``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (Eq. 4). Linear CKA uses the linear kernel, RBF CKA
  ``k(x_i, x_j) = exp(-|x_i - x_j|^2 / (2 sigma^2))`` with ``sigma`` a fraction of the median distance between
  examples (Kornblith et al. Sec. 3 and their reference code: the median of all squared distances).
  CKA is invariant to orthogonal transforms and isotropic scaling of the features, not to any invertible linear map.
* **Minibatch linear CKA** (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the same things?",
  Eq. 2-3): HSIC is estimated on each minibatch of ``n`` examples with the *unbiased* estimator (Song et al. 2012)
  ``HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``
  (``K~``, ``L~``: the Gram matrices with the diagonal set to 0) and averaged over minibatches:
  ``CKA = mean HSIC_1(K_i, L_i) / sqrt(mean HSIC_1(K_i, K_i) mean HSIC_1(L_i, L_i))``. Only per-batch sums are
  kept, so memory does not grow with the dataset; batches need at least 4 images.
* **SVCCA** (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, Sec. 2): each layer's (centred) activations are
  reduced by SVD to the directions that keep 99 % of the variance, then CCA between the two reduced subspaces
  gives canonical correlations ``rho_1 >= ... >= rho_c`` (``c = min`` of the two kept dimensions); the similarity is
  their mean. Computed from the centred Gram matrix ``H K H = U S^2 U^T``: the reduced data is ``U_k S_k``, and the
  canonical correlations are the singular values of ``U_a^T U_b`` (cosines of the principal angles between the
  spans). Keep ``N`` well above the kept dimensions: with ``k_a + k_b > N - 1`` the spans must overlap and some
  correlations are 1 by construction.
* **Unit matching** (Li, Yosinski, Clune, Lipson & Hopcroft 2016, "Convergent learning: do different neural networks
  learn the same representations?", Sec. 2-3): the Pearson correlation of every pair of units, over all images and
  spatial positions, then a one-to-one matching maximizing the summed correlation (the Hungarian method), their
  greedy variant (repeatedly pair the two unmatched units with the highest correlation) or the semi-matching (each
  unit of ``a`` with its best unit of ``b``, repeats allowed).

Features of a layer are its outputs per image: ``reduce="flatten"`` keeps ``C x H x W`` values per image (Kornblith's
choice for convolutional layers), ``reduce="mean"`` averages over the spatial positions (``C`` values). Features are
streamed with hooks (:func:`~convscope.core.stream.stream_layers`, i.e. :func:`~convscope.core.probe.probe`): one
forward pass per batch and model, covering all its layers; the models are left as they came.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..core.layers import resolve_layers
from ..core.model import float_dtype, model_device
from ..core.progress import progress_bar
from ..core.stream import image_batches, stream_layers
from ..errors import ConvscopeError

Data = torch.Tensor | Iterable[torch.Tensor]
METHODS = ("linear_cka", "rbf_cka", "svcca")
REDUCTIONS = ("flatten", "mean")
MATCHINGS = ("hungarian", "greedy", "semi")
MAX_GRAM_IMAGES = 4096
"""``rbf_cka`` / ``svcca`` keep every image's features and an ``N x N`` Gram matrix: at most this many images."""


# --------------------------------------------------------------------------- kernels and HSIC


def _as_features(X: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor) or X.dim() < 2 or X.is_complex():
        raise ConvscopeError(f"{what}: give a feature matrix N x D (a tensor, one row per example), got "
                             f"{type(X).__name__} {tuple(getattr(X, 'shape', ()))}")
    return X.reshape(len(X), -1).double()


def features(act: torch.Tensor, reduce: str = "flatten") -> torch.Tensor:
    """A layer output ``N x C (x H x W ...)`` as features ``N x D``: every value (``"flatten"``, ``D = C H W``) or
    the mean over the positions (``"mean"``, ``D = C``)."""
    if reduce not in REDUCTIONS:
        raise ConvscopeError(f"reduce={reduce!r}: use one of {', '.join(REDUCTIONS)}")
    if reduce == "mean" and act.dim() > 2:
        act = act.flatten(2).mean(2)
    return act.reshape(len(act), -1)


def gram_linear(X: torch.Tensor) -> torch.Tensor:
    """``K = X X^T`` (``N x N``, float64) of features ``N x D`` (further dimensions are flattened)."""
    X = _as_features(X, "gram_linear")
    return X @ X.T


def gram_rbf(X: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """RBF Gram matrix ``exp(-|x_i - x_j|^2 / (2 sigma^2 m))`` with ``m`` the median squared distance (so
    ``sigma`` is a fraction of the median distance, Kornblith et al. 2019 Sec. 3)."""
    return rbf_from_gram(gram_linear(X), sigma)


def rbf_from_gram(G: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The RBF Gram matrix of :func:`gram_rbf` from the linear one ``G = X X^T`` (``|x_i - x_j|^2 = G_ii + G_jj -
    2 G_ij``)."""
    check_sigma(sigma)
    sq = torch.diagonal(G)
    d2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    flat = d2.flatten()  # the median of all entries, zeros of the diagonal included (Kornblith et al.'s np.median)
    m = len(flat)
    med = (flat.kthvalue((m + 1) // 2).values + flat.kthvalue(m // 2 + 1).values) / 2
    if med <= 0:
        raise ConvscopeError("rbf_cka: the median distance between examples is 0 (most features are identical), so "
                             "the RBF bandwidth is undefined; use more varied data or linear_cka")
    return torch.exp(-d2 / (2 * sigma**2 * med))


def check_sigma(sigma: float) -> float:
    """``sigma`` if it is a positive finite number, else a ConvscopeError."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma <= 0:
        raise ConvscopeError(f"sigma={sigma!r}: give a positive bandwidth (a fraction of the median distance, "
                             "e.g. 1.0)")
    return float(sigma)


def check_keep(keep: float) -> float:
    """``keep`` if it is a fraction in (0, 1], else a ConvscopeError."""
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1:
        raise ConvscopeError(f"keep={keep!r}: give the fraction of variance SVD keeps, in (0, 1], e.g. 0.99")
    return float(keep)


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T / n`` (rows and columns centred)."""
    K = K - K.mean(-1, keepdim=True)
    return K - K.mean(-2, keepdim=True)


def hsic_matrix(A: torch.Tensor, B: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """HSIC of every pair of Gram matrices: ``A`` is ``a x n x n``, ``B`` ``b x n x n``; returns ``a x b``.

    ``unbiased=False``: ``tr(K H L H) / (n-1)^2`` (Kornblith et al. Eq. 3); ``True``: the unbiased estimator of
    Song et al. 2012 (Nguyen et al. 2021 Eq. 3; needs ``n >= 4``).
    """
    n = A.shape[-1]
    if A.shape[-2:] != (n, n) or B.shape[-2:] != (n, n):
        raise ConvscopeError(f"HSIC needs Gram matrices of the same n x n examples, got {tuple(A.shape[-2:])} and "
                             f"{tuple(B.shape[-2:])}; give both the same examples")
    A, B = A.double(), B.double()
    if not unbiased:
        if n < 2:
            raise ConvscopeError("HSIC needs at least 2 examples; give more images")
        return torch.einsum("aij,bij->ab", center_gram(A), center_gram(B)) / (n - 1) ** 2
    if n < 4:
        raise ConvscopeError(f"the unbiased HSIC estimator needs at least 4 examples per batch, got {n}; "
                             "use a larger batch_size")
    eye = torch.eye(n, dtype=torch.bool, device=A.device)
    A, B = A.masked_fill(eye, 0), B.masked_fill(eye, 0)
    trace = torch.einsum("aij,bij->ab", A, B)  # tr(K~ L~), both symmetric
    sums = A.sum((1, 2))[:, None] * B.sum((1, 2))[None, :] / ((n - 1) * (n - 2))
    rows = A.sum(2) @ B.sum(2).T  # 1^T K~ L~ 1
    return (trace + sums - 2 / (n - 2) * rows) / (n * (n - 3))


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> float:
    """HSIC of two ``n x n`` Gram matrices (see :func:`hsic_matrix`)."""
    return float(hsic_matrix(K[None], L[None], unbiased)[0, 0])


def cka_from_hsic(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor,
                  names_a: Sequence[str] | None = None, names_b: Sequence[str] | None = None) -> torch.Tensor:
    """``cross[i, j] / sqrt(self_a[i] self_b[j])`` (Kornblith et al. Eq. 4); a representation whose HSIC with itself
    is not positive (constant features) has no CKA: a ConvscopeError naming it."""
    for selfs, names, side in ((self_a, names_a, "a"), (self_b, names_b, "b")):
        bad = (selfs <= 0).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            name = names[i] if names is not None else f"{side}[{i}]"
            raise ConvscopeError(f"the features of {name} do not vary over the examples (HSIC with itself "
                                 f"{float(selfs[i]):.3g} <= 0), so CKA is undefined; drop that layer or give more "
                                 "varied data (or a larger batch_size)")
    return cross / torch.sqrt(self_a[:, None] * self_b[None, :])


def cka(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> float:
    """CKA of two Gram matrices of the same examples (Kornblith et al. Eq. 4)."""
    AB = torch.stack([K, L]).double()
    h = hsic_matrix(AB, AB, unbiased)
    return float(cka_from_hsic(h[:1, 1:], h.diagonal()[:1], h.diagonal()[1:], ["X"], ["Y"])[0, 0])


def _same_rows(X: torch.Tensor, Y: torch.Tensor, what: str) -> None:
    if len(X) != len(Y):
        raise ConvscopeError(f"{what}: X has {len(X)} examples and Y {len(Y)}; give features of the same examples "
                             "(one row each, in the same order)")


def linear_cka(X: torch.Tensor, Y: torch.Tensor, unbiased: bool = False) -> float:
    """Linear CKA of features ``X`` (``N x p``) and ``Y`` (``N x q``) of the same ``N`` examples (Kornblith et al.
    2019, Eq. 4 with ``K = X X^T``; ``unbiased=True``: HSIC estimated as Nguyen et al. 2021)."""
    _same_rows(X, Y, "linear_cka")
    return cka(gram_linear(X), gram_linear(Y), unbiased)


def rbf_cka(X: torch.Tensor, Y: torch.Tensor, sigma: float = 1.0, unbiased: bool = False) -> float:
    """RBF-kernel CKA of features ``X`` and ``Y`` (Kornblith et al. 2019 Sec. 3), ``sigma`` a fraction of the
    median distance between examples (each representation its own)."""
    _same_rows(X, Y, "rbf_cka")
    return cka(gram_rbf(X, sigma), gram_rbf(Y, sigma), unbiased)


def svd_basis(G: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """``U_k`` (``N x k``): the left singular vectors of the centred data that keep the fraction ``keep`` of its
    variance (Raghu et al. 2017, step 1), from the linear Gram matrix ``G = X X^T`` (``H G H = U S^2 U^T``)."""
    check_keep(keep)
    evals, evecs = torch.linalg.eigh(center_gram(G.double()))
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    total = evals.sum()
    if total <= 0:
        raise ConvscopeError("svcca: the features do not vary over the examples (zero variance); drop that layer or "
                             "give more varied data")
    cum = torch.cumsum(evals, 0) / total
    k = int((cum < keep - 1e-12).sum()) + 1
    k = min(k, int((evals > evals[0] * 1e-12).sum()))
    return evecs[:, :k]


def svcca_correlations(X: torch.Tensor, Y: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """The canonical correlations (descending) of the SVD-reduced features ``X`` and ``Y`` (Raghu et al. 2017)."""
    _same_rows(X, Y, "svcca")
    return torch.linalg.svdvals(svd_basis(gram_linear(X), keep).T @ svd_basis(gram_linear(Y), keep)).clamp(0, 1)


def svcca(X: torch.Tensor, Y: torch.Tensor, keep: float = 0.99) -> float:
    """SVCCA similarity of features ``X`` (``N x p``) and ``Y`` (``N x q``): the mean canonical correlation after
    keeping ``keep`` of each one's variance by SVD (Raghu et al. 2017, Sec. 2)."""
    return float(svcca_correlations(X, Y, keep).mean())


# --------------------------------------------------------------------------- streaming features of two models


def default_layers(model: nn.Module) -> list[str]:
    """The layers compared when none are named: every ``Conv2d`` and ``Linear`` module, in definition order."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d | nn.Linear)]
    if not names:
        raise ConvscopeError(f"{type(model).__name__} has no Conv2d or Linear layer; name the layers to compare "
                             "(`convscope layers MODEL` lists them)")
    return names


def _layer_list(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    return default_layers(model) if layers is None else list(resolve_layers(model, layers))


def paired_stream(model_a: nn.Module, model_b: nn.Module, data: Data, layers_a: Sequence[str],
                  layers_b: Sequence[str], batch_size: int, reduce_fn: Callable[[str, torch.Tensor], object] | None,
                  progress: bool | None = None,
                  desc: str = "similarity") -> Iterator[tuple[dict[str, object], dict[str, object]]]:
    """Per batch of ``data``: ``({layer_a: reduce_fn(layer_a, output)}, {layer_b: ...})``, from one forward pass of
    each model (one pass in all when ``model_a is model_b``), through :func:`~convscope.core.stream.stream_layers`.
    Each batch is moved to each model's device and float dtype."""
    total = math.ceil(len(data) / batch_size) if isinstance(data, torch.Tensor) and batch_size > 0 else None

    def to(model: nn.Module, src: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator:
        dev, dtype = model_device(model), float_dtype(model)
        return ((x.to(dev, dtype), ids) for x, ids in src)

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConvscopeError(f"batch_size={batch_size!r}: use a positive int")
    batches = image_batches(data, batch_size)
    if model_a is model_b:
        union = list(dict.fromkeys([*layers_a, *layers_b]))
        inner = stream_layers(model_a, to(model_a, batches), union, batch_size, False, reduce_fn)
        pairs: Iterator = (({n: f[n] for n in layers_a}, {n: f[n] for n in layers_b}) for _, f in inner)
    else:
        src_a, src_b = itertools.tee(batches)
        stream_a = stream_layers(model_a, to(model_a, src_a), list(layers_a), batch_size, False, reduce_fn)
        stream_b = stream_layers(model_b, to(model_b, src_b), list(layers_b), batch_size, False, reduce_fn)
        pairs = ((fa, fb) for (_, fa), (_, fb) in zip(stream_a, stream_b))
    yield from progress_bar(pairs, total=total, desc=desc, unit="batch", progress=progress)


@dataclass(frozen=True)
class SimilarityResult:
    """``matrix[i, j]``: the similarity of ``layers_a[i]`` (model a) and ``layers_b[j]`` (model b).

    ``method``: ``linear_cka`` (minibatch, unbiased HSIC), ``rbf_cka`` or ``svcca``; ``reduce``: ``flatten`` or
    ``mean``; ``n_images``: images used; ``skipped``: images left out (minibatch CKA skips batches of fewer than 4
    images); ``batches``: minibatches averaged (``linear_cka``; 1 otherwise).
    """

    matrix: torch.Tensor
    layers_a: list[str]
    layers_b: list[str]
    method: str
    reduce: str
    n_images: int
    skipped: int = 0
    batches: int = 1
    params: dict = field(default_factory=dict)

    def value(self, layer_a: str, layer_b: str) -> float:
        """The similarity of one pair of layers."""
        for name, names in ((layer_a, self.layers_a), (layer_b, self.layers_b)):
            if name not in names:
                raise ConvscopeError(f"layer {name!r} was not compared; compared: {', '.join(names)}")
        return float(self.matrix[self.layers_a.index(layer_a), self.layers_b.index(layer_b)])

    def to_dict(self) -> dict:
        """Plain numbers for JSON."""
        return {"method": self.method, "reduce": self.reduce, "n_images": self.n_images, "skipped": self.skipped,
                "batches": self.batches, "params": dict(self.params), "layers_a": self.layers_a,
                "layers_b": self.layers_b, "matrix": [[float(v) for v in row] for row in self.matrix]}


def layer_similarity(model_a: nn.Module, model_b: nn.Module, data: Data, layers_a: str | Sequence[str] | None = None,
                     layers_b: str | Sequence[str] | None = None, method: str = "linear_cka", reduce: str = "flatten",
                     batch_size: int = 64, sigma: float = 1.0, keep: float = 0.99,
                     max_images: int = MAX_GRAM_IMAGES, progress: bool | None = None) -> SimilarityResult:
    """Similarity of every layer of ``layers_a`` (in ``model_a``) with every layer of ``layers_b`` (in ``model_b``)
    over the images ``data``.

    Args:
        model_a, model_b: two networks (or the same one twice: then one forward pass per batch covers both sets).
        data: images ``N x C x H x W`` in the models' input space, or an iterable of batches (or ``(batch, ids)``).
        layers_a, layers_b: layer names (a list or comma-separated string); default every Conv2d / Linear layer.
        method: ``"linear_cka"`` (minibatch CKA with the unbiased HSIC, Nguyen et al. 2021: memory independent of
            N; every batch needs at least 4 images, a smaller last batch is skipped and counted in ``skipped``),
            ``"rbf_cka"`` (Kornblith et al. 2019 RBF kernel, bandwidth ``sigma`` times the median distance) or
            ``"svcca"`` (Raghu et al. 2017, keeping ``keep`` of the variance). The last two need every image's
            features and an ``N x N`` Gram matrix: at most ``max_images`` images.
        reduce: ``"flatten"`` (every value of ``C x H x W``, Kornblith's choice) or ``"mean"`` (spatial mean).
        batch_size: images per forward pass (and per CKA minibatch) for a tensor; an iterable's batches are used as
            they come.
        progress: a progress bar (``True``, ``False``, ``None``: once the work has run 2 s).
    """
    if method not in METHODS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if reduce not in REDUCTIONS:
        raise ConvscopeError(f"reduce={reduce!r}: use one of {', '.join(REDUCTIONS)}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 2:
        raise ConvscopeError(f"max_images={max_images!r}: give an int of at least 2")
    if method == "rbf_cka":
        check_sigma(sigma)
    if method == "svcca":
        check_keep(keep)
    la, lb = _layer_list(model_a, layers_a), _layer_list(model_b, layers_b)
    params: dict[str, object] = {"sigma": sigma} if method == "rbf_cka" else {"keep": keep} if method == "svcca" else {}
    if method == "linear_cka":
        return _minibatch_cka(model_a, model_b, data, la, lb, reduce, batch_size, progress)

    feats_a: dict[str, list[torch.Tensor]] = {n: [] for n in la}
    feats_b: dict[str, list[torch.Tensor]] = {n: [] for n in lb}
    n_images = 0

    def keep_features(_: str, out: torch.Tensor) -> torch.Tensor:
        return features(out, reduce).cpu()

    for fa, fb in paired_stream(model_a, model_b, data, la, lb, batch_size, keep_features, progress, method):
        n_images += len(cast(torch.Tensor, next(iter(fa.values()))))
        if n_images > max_images:
            raise ConvscopeError(f"method={method!r} keeps every image's features and an N x N Gram matrix; the data "
                                 f"has more than max_images={max_images} images: pass fewer images, or use "
                                 "method='linear_cka' (minibatch, no full Gram)")
        for n in la:
            feats_a[n].append(cast(torch.Tensor, fa[n]))
        for n in lb:
            feats_b[n].append(cast(torch.Tensor, fb[n]))
    if n_images < 2:
        raise ConvscopeError(f"layer_similarity got {n_images} image(s); give at least 2 (better: hundreds)")
    grams_a = [gram_linear(torch.cat(feats_a[n])) for n in la]
    grams_b = [gram_linear(torch.cat(feats_b[n])) for n in lb]
    if method == "rbf_cka":
        ka = torch.stack([rbf_from_gram(g, sigma) for g in grams_a])
        kb = torch.stack([rbf_from_gram(g, sigma) for g in grams_b])
        matrix = cka_from_hsic(hsic_matrix(ka, kb), hsic_matrix(ka, ka).diagonal(), hsic_matrix(kb, kb).diagonal(),
                               la, lb)
    else:
        ua = [_basis(g, keep, n) for g, n in zip(grams_a, la)]
        ub = [_basis(g, keep, n) for g, n in zip(grams_b, lb)]
        matrix = torch.tensor([[float(torch.linalg.svdvals(a.T @ b).clamp(0, 1).mean()) for b in ub] for a in ua],
                              dtype=torch.float64)
        params["dims_a"] = [a.shape[1] for a in ua]
        params["dims_b"] = [b.shape[1] for b in ub]
    return SimilarityResult(matrix, la, lb, method, reduce, n_images, params=params)


def _basis(G: torch.Tensor, keep: float, name: str) -> torch.Tensor:
    try:
        return svd_basis(G, keep)
    except ConvscopeError:
        raise ConvscopeError(f"svcca: the features of {name} do not vary over the images; drop that layer or give "
                             "more varied data") from None


def _minibatch_cka(model_a: nn.Module, model_b: nn.Module, data: Data, la: list[str], lb: list[str], reduce: str,
                   batch_size: int, progress: bool | None) -> SimilarityResult:
    """Nguyen et al. 2021 Eq. 2-3: per minibatch the unbiased HSIC of every pair (and of each layer with itself),
    summed; CKA from the sums at the end."""
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # cross, self_a, self_b
    batches = n_images = skipped = 0

    def gram(_: str, out: torch.Tensor) -> torch.Tensor:
        return gram_linear(features(out, reduce))

    for fa, fb in paired_stream(model_a, model_b, data, la, lb, batch_size, gram, progress, "linear CKA"):
        A = torch.stack([cast(torch.Tensor, fa[n]) for n in la])
        B = torch.stack([cast(torch.Tensor, fb[n]) for n in lb])
        n = A.shape[-1]
        if n < 4:
            skipped += n
            continue
        c = hsic_matrix(A, B, unbiased=True).cpu()
        sa = hsic_matrix(A, A, unbiased=True).diagonal().cpu()
        sb = hsic_matrix(B, B, unbiased=True).diagonal().cpu()
        sums = (c, sa, sb) if sums is None else (sums[0] + c, sums[1] + sa, sums[2] + sb)
        batches += 1
        n_images += n
    if sums is None:
        raise ConvscopeError("minibatch linear CKA needs batches of at least 4 images; give more images or a larger "
                             "batch_size")
    cross, self_a, self_b = sums
    matrix = cka_from_hsic(cross / batches, self_a / batches, self_b / batches, la, lb)
    return SimilarityResult(matrix, la, lb, "linear_cka", reduce, n_images, skipped, batches,
                            {"batch_size": batch_size})


# --------------------------------------------------------------------------- unit matching (Li et al. 2016)


@dataclass(frozen=True)
class UnitMatching:
    """Units of ``layer_a`` (model a) paired with units of ``layer_b`` (model b), Li et al. 2016.

    Attributes:
        correlation: ``C_a x C_b`` Pearson correlations over images and positions (0 where a unit is constant).
        pairs: ``K x 2`` matched ``(unit_a, unit_b)``, in the order of ``unit_a`` (``hungarian``, ``semi``) or of
            decreasing correlation (``greedy``).
        pair_correlation: ``K``, the correlation of each pair.
        method: ``hungarian``, ``greedy`` or ``semi``.
        constant_a, constant_b: units whose activation never varies (dead units): no correlation, shown as 0.
        samples: the (image, position) samples the correlations are taken over.
    """

    layer_a: str
    layer_b: str
    correlation: torch.Tensor
    pairs: torch.Tensor
    pair_correlation: torch.Tensor
    method: str
    constant_a: list[int]
    constant_b: list[int]
    samples: int

    @property
    def mean_correlation(self) -> float:
        """The mean correlation of the matched pairs."""
        return float(self.pair_correlation.mean())


class CoMoments:
    """Running means and (co-)moments of two sets of variables, merged batch by batch (Chan et al. 1979), float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = self.mean_b = self.m2_a = self.m2_b = self.cross = torch.empty(0)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add samples ``a`` (``m x C_a``) and ``b`` (``m x C_b``), row ``i`` of both from the same sample."""
        a, b = a.double(), b.double()
        m = len(a)
        ma, mb = a.mean(0), b.mean(0)
        da, db = a - ma, b - mb
        m2a, m2b, cross = (da * da).sum(0), (db * db).sum(0), da.T @ db
        if self.n == 0:
            self.n, self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.cross = m, ma, mb, m2a, m2b, cross
            return
        n = self.n + m
        dla, dlb = ma - self.mean_a, mb - self.mean_b
        w = self.n * m / n
        self.cross = self.cross + cross + w * dla[:, None] * dlb[None, :]
        self.m2_a = self.m2_a + m2a + w * dla * dla
        self.m2_b = self.m2_b + m2b + w * dlb * dlb
        self.mean_a = self.mean_a + dla * m / n
        self.mean_b = self.mean_b + dlb * m / n
        self.n = n

    def correlation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pearson correlations ``C_a x C_b`` (0 for a constant variable) and the constant variables' masks."""
        tiny = torch.finfo(torch.float64).tiny
        const_a = self.m2_a <= 1e-12 * self.mean_a**2 * self.n + tiny
        const_b = self.m2_b <= 1e-12 * self.mean_b**2 * self.n + tiny
        sa, sb = self.m2_a.clamp_min(tiny).sqrt(), self.m2_b.clamp_min(tiny).sqrt()
        corr = (self.cross / (sa[:, None] * sb[None, :])).clamp(-1, 1)
        corr[const_a] = 0
        corr[:, const_b] = 0
        return corr, const_a, const_b


def _samples(act: torch.Tensor) -> torch.Tensor:
    """``N x C (x H x W)`` -> ``(N H W) x C``: every image and position is a sample of each unit."""
    return act.movedim(1, -1).reshape(-1, act.shape[1]) if act.dim() > 2 else act


def unit_correlation(model_a: nn.Module, model_b: nn.Module, data: Data, layer_a: str, layer_b: str,
                     batch_size: int = 64, progress: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The correlation of every unit of ``layer_a`` with every unit of ``layer_b`` over all images and positions
    (Li et al. 2016 Sec. 2), streamed: ``(correlation C_a x C_b, constant_a mask, constant_b mask, samples)``."""
    la, lb = list(resolve_layers(model_a, layer_a)), list(resolve_layers(model_b, layer_b))
    if len(la) != 1 or len(lb) != 1:
        raise ConvscopeError("match_units compares one layer of each model; give one name for layer_a and layer_b")
    moments = CoMoments()
    for fa, fb in paired_stream(model_a, model_b, data, la, lb, batch_size, None, progress, "match"):
        a, b = fa[la[0]], fb[lb[0]]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2 or b.dim() < 2:
            raise ConvscopeError("match_units needs layers that output tensors N x C (x H x W)")
        if a.shape[2:] != b.shape[2:]:
            raise ConvscopeError(f"{la[0]} outputs {tuple(a.shape[1:])} and {lb[0]} {tuple(b.shape[1:])}: unit "
                                 "correlations pair the same positions, so the spatial sizes must agree; pick layers "
                                 "of the same resolution")
        moments.update(_samples(a).cpu(), _samples(b).cpu())
    if moments.n < 2:
        raise ConvscopeError("match_units needs at least 2 samples (images x positions); give more images")
    corr, ca, cb = moments.correlation()
    return corr, ca, cb, moments.n


def greedy_matching(corr: torch.Tensor) -> torch.Tensor:
    """Pairs ``K x 2`` by repeatedly taking the highest correlation among units not yet matched (ties: the lower
    unit numbers first)."""
    ca, cb = corr.shape
    order = np.lexsort((np.arange(ca * cb), -corr.reshape(-1).numpy()))
    used_a, used_b = np.zeros(ca, bool), np.zeros(cb, bool)
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), cb)
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            pairs.append((i, j))
            if len(pairs) == min(ca, cb):
                break
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def match_from_correlation(corr: torch.Tensor, method: str = "hungarian") -> torch.Tensor:
    """Matched pairs ``K x 2`` from a correlation matrix: ``hungarian`` (one-to-one, maximal summed correlation,
    ``scipy.optimize.linear_sum_assignment``), ``greedy`` (one-to-one, highest first) or ``semi`` (each unit of a
    with its best unit of b)."""
    if method not in MATCHINGS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(MATCHINGS)}")
    corr = corr.detach().double().cpu()
    if method == "hungarian":
        rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        return torch.stack([torch.as_tensor(rows), torch.as_tensor(cols)], 1).long()
    if method == "greedy":
        return greedy_matching(corr)
    return torch.stack([torch.arange(corr.shape[0]), corr.argmax(1)], 1)


def match_units(model_a: nn.Module, model_b: nn.Module, data: Data, layer_a: str, layer_b: str,
                method: str = "hungarian", batch_size: int = 64, progress: bool | None = None) -> UnitMatching:
    """Pair the units of ``layer_a`` (``model_a``) with those of ``layer_b`` (``model_b``) by the correlation of their
    activations over the images ``data`` and all spatial positions (Li et al. 2016 "Convergent learning").

    ``method``: ``"hungarian"`` (one-to-one bipartite matching of maximal summed correlation), ``"greedy"`` (their
    greedy variant: highest correlation first) or ``"semi"`` (semi-matching: each unit's best partner). Both
    layers must have the same spatial size. Units that never vary (dead) get correlation 0 and are listed.
    """
    if method not in MATCHINGS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(MATCHINGS)}")
    corr, ca, cb, n = unit_correlation(model_a, model_b, data, layer_a, layer_b, batch_size, progress)
    pairs = match_from_correlation(corr, method)
    name_a = next(iter(resolve_layers(model_a, layer_a)))
    name_b = next(iter(resolve_layers(model_b, layer_b)))
    return UnitMatching(name_a, name_b, corr, pairs, corr[pairs[:, 0], pairs[:, 1]], method,
                        ca.nonzero().flatten().tolist(), cb.nonzero().flatten().tolist(), n)


__all__ = ["CoMoments", "MATCHINGS", "MAX_GRAM_IMAGES", "METHODS", "REDUCTIONS", "SimilarityResult", "UnitMatching",
           "center_gram", "check_keep", "check_sigma", "cka", "cka_from_hsic", "default_layers", "features",
           "gram_linear", "gram_rbf", "greedy_matching", "hsic", "hsic_matrix", "layer_similarity", "linear_cka",
           "match_from_correlation", "match_units", "paired_stream", "rbf_cka", "rbf_from_gram", "svcca",
           "svcca_correlations", "svd_basis", "unit_correlation"]
