"""Layer similarity (linear / RBF CKA, SVCCA) and unit matching, checked against float64 hand computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from convscope.errors import ConvscopeError
from convscope.methods.similarity import (
    layer_similarity,
    linear_cka,
    match_units,
    rbf_cka,
    svcca,
    svcca_correlations,
)

from .helpers import assert_untouched, snapshot

LAYERS = ["0", "2", "5"]


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 5))


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def layer_features(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each layer's output, flattened per image, by running the Sequential's prefixes (no hooks)."""
    with torch.no_grad():
        return {name: net[: int(name) + 1](x).flatten(1).double() for name in LAYERS}


# --------------------------------------------------------------------------- hand computations (numpy float64)


def hand_hsic(K: np.ndarray, L: np.ndarray, unbiased: bool) -> float:
    n = len(K)
    if not unbiased:
        H = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    return float(np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


def hand_cka(K: np.ndarray, L: np.ndarray, unbiased: bool = False) -> float:
    return hand_hsic(K, L, unbiased) / np.sqrt(hand_hsic(K, K, unbiased) * hand_hsic(L, L, unbiased))


def hand_rbf(X: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2 * np.median(d2)))


def hand_svcca(X: np.ndarray, Y: np.ndarray, keep: float = 0.99) -> float:
    """SVD on the centred data keeping 99 % of the variance, then textbook CCA (Sxx^-1/2 Sxy Syy^-1/2)."""
    def reduce(Z: np.ndarray) -> np.ndarray:
        Z = Z - Z.mean(0)
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
        return Z @ Vt[:k].T

    A, B = reduce(X), reduce(Y)

    def inv_sqrt(S: np.ndarray) -> np.ndarray:
        w, V = np.linalg.eigh(S)
        return V @ np.diag(w**-0.5) @ V.T

    M = inv_sqrt(A.T @ A) @ (A.T @ B) @ inv_sqrt(B.T @ B)
    return float(np.linalg.svd(M, compute_uv=False).mean())


# --------------------------------------------------------------------------- features


def test_linear_and_rbf_cka_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    Y = X[:, :7] @ torch.randn(7, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(40, 9, generator=g,
                                                                                            dtype=torch.float64)
    Xn, Yn = X.numpy(), Y.numpy()
    for unbiased in (False, True):
        expect = hand_cka(Xn @ Xn.T, Yn @ Yn.T, unbiased)
        assert linear_cka(X, Y, unbiased=unbiased) == pytest.approx(expect, abs=1e-12)
        expect = hand_cka(hand_rbf(Xn, 0.8), hand_rbf(Yn, 0.8), unbiased)
        assert rbf_cka(X, Y, sigma=0.8, unbiased=unbiased) == pytest.approx(expect, abs=1e-12)
    assert 0.2 < linear_cka(X, Y) < 0.99  # a real value, neither trivial end


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling_not_to_any_linear_map():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 10, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(10, 6, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    Xq = 3.7 * X @ Q
    assert linear_cka(Xq, Y) == pytest.approx(linear_cka(X, Y), abs=1e-12)
    assert rbf_cka(Xq, Y, 1.0) == pytest.approx(rbf_cka(X, Y, 1.0), abs=1e-12)
    assert svcca(Xq, Y) == pytest.approx(svcca(X, Y), abs=1e-9)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    A = torch.diag(torch.linspace(0.05, 5, 10, dtype=torch.float64))  # invertible but not orthogonal
    assert abs(linear_cka(X @ A, Y) - linear_cka(X, Y)) > 1e-3


def test_svcca_equals_hand_computation_on_planted_correlated_features():
    g = torch.Generator().manual_seed(2)
    Z = torch.randn(300, 3, generator=g, dtype=torch.float64)  # shared latent signal
    X = torch.cat([Z @ torch.randn(3, 5, generator=g, dtype=torch.float64),
                   torch.randn(300, 4, generator=g, dtype=torch.float64)], 1)
    Y = torch.cat([Z @ torch.randn(3, 6, generator=g, dtype=torch.float64),
                   torch.randn(300, 2, generator=g, dtype=torch.float64)], 1) + 0.01 * torch.randn(300, 8, generator=g)
    rho = svcca_correlations(X, Y)
    assert svcca(X, Y) == pytest.approx(hand_svcca(X.numpy(), Y.numpy()), abs=1e-9)
    assert (rho[:3] > 0.99).all() and (rho[3:] < 0.5).all()  # the 3 planted directions, and only those


# --------------------------------------------------------------------------- layers of networks


def test_self_similarity_is_one_on_the_diagonal_and_the_model_is_untouched():
    net, x = tiny_net(), images(48)
    before = snapshot(net)
    for method in ("linear_cka", "rbf_cka", "svcca"):
        # SVCCA on 48 images needs few dimensions (C values per image), else k_a + k_b > N - 1 makes every value 1
        reduce = "mean" if method == "svcca" else "flatten"
        res = layer_similarity(net, net, x, LAYERS, LAYERS, method=method, reduce=reduce, batch_size=16)
        assert res.matrix.shape == (3, 3) and res.layers_a == LAYERS
        assert torch.allclose(res.matrix.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9), method
        assert (res.matrix < 0.999).sum() >= 4, method  # off-diagonal layers differ
        other = layer_similarity(net, copy.deepcopy(net), x, LAYERS, LAYERS, method=method, reduce=reduce,
                                 batch_size=16)
        assert torch.allclose(other.matrix, res.matrix, atol=1e-9)  # two models: the same numbers
    assert_untouched(net, before)


def test_minibatch_cka_matches_full_batch_as_batches_grow():
    net_a, net_b, x = tiny_net(0), tiny_net(3), images(192)
    fa, fb = layer_features(net_a, x), layer_features(net_b, x)
    full = torch.tensor([[linear_cka(fa[i], fb[j], unbiased=True) for j in LAYERS] for i in LAYERS],
                        dtype=torch.float64)
    one = layer_similarity(net_a, net_b, x, LAYERS, LAYERS, batch_size=192)
    assert one.batches == 1 and torch.allclose(one.matrix, full, atol=1e-9)
    errors = []
    for bs in (8, 32, 96):
        res = layer_similarity(net_a, net_b, x, LAYERS, LAYERS, batch_size=bs)
        assert res.batches == 192 // bs and res.n_images == 192
        errors.append(float((res.matrix - full).abs().max()))
    assert errors[-1] < 0.03 and errors[-1] < errors[0]


def test_layer_level_rbf_and_svcca_equal_the_feature_functions_and_mean_pooling():
    net_a, net_b, x = tiny_net(0), tiny_net(3), images(40)
    fa, fb = layer_features(net_a, x), layer_features(net_b, x)
    rbf = layer_similarity(net_a, net_b, x, LAYERS, LAYERS, method="rbf_cka", sigma=0.5, batch_size=16)
    assert rbf.n_images == 40
    assert rbf.value("2", "5") == pytest.approx(rbf_cka(fa["2"], fb["5"], 0.5), abs=1e-6)
    sv = layer_similarity(net_a, net_b, x, LAYERS, LAYERS, method="svcca", batch_size=16)
    assert sv.value("0", "2") == pytest.approx(svcca(fa["0"], fb["2"]), abs=1e-6)
    pooled = layer_similarity(net_a, net_b, x, ["2"], ["2"], reduce="mean", batch_size=40)
    with torch.no_grad():
        pa, pb = net_a[:3](x).mean((2, 3)), net_b[:3](x).mean((2, 3))
    assert pooled.matrix[0, 0] == pytest.approx(linear_cka(pa, pb, unbiased=True), abs=1e-6)


def test_iterable_batches_skip_a_last_batch_under_four_images():
    net, x = tiny_net(), images(42)
    res = layer_similarity(net, tiny_net(5), iter(x.split(20)), ["0"], ["2"])
    assert (res.batches, res.n_images, res.skipped) == (2, 40, 2)
    ref = layer_similarity(net, tiny_net(5), x[:40], ["0"], ["2"], batch_size=20)
    assert torch.allclose(res.matrix, ref.matrix, atol=1e-12)


def test_bad_input_is_one_line_and_models_are_restored_when_the_stream_fails():
    net, x = tiny_net(), images(12)
    with pytest.raises(ConvscopeError, match="max_images"):
        layer_similarity(net, net, x, ["0"], ["2"], method="rbf_cka", max_images=8, batch_size=4)
    with pytest.raises(ConvscopeError, match="at least 4"):
        layer_similarity(net, net, x, ["0"], ["2"], batch_size=3)
    with pytest.raises(ConvscopeError, match="method="):
        layer_similarity(net, net, x, method="cca")
    with pytest.raises(ConvscopeError, match="unknown layer"):
        layer_similarity(net, net, x, ["nope"])
    with pytest.raises(ConvscopeError, match="spatial sizes"):
        match_units(net, net, x, "0", "2")
    with pytest.raises(ConvscopeError, match="sigma"):
        rbf_cka(x.flatten(1), x.flatten(1), sigma=0)
    dead = nn.Sequential(nn.Conv2d(3, 2, 1))
    nn.init.zeros_(dead[0].weight)
    with pytest.raises(ConvscopeError, match="do not vary"):
        layer_similarity(net, dead, x, ["0"], ["0"], batch_size=6)

    def failing():
        yield x[:6]
        raise RuntimeError("disk gone")

    other = tiny_net(4)
    before_a, before_b = snapshot(net), snapshot(other)
    with pytest.raises(RuntimeError, match="disk gone"):
        layer_similarity(net, other, failing(), ["0"], ["2"])
    assert_untouched(net, before_a)
    assert_untouched(other, before_b)


# --------------------------------------------------------------------------- unit matching


@pytest.mark.parametrize("method", ["hungarian", "greedy", "semi"])
def test_matching_recovers_a_planted_permutation_of_units(method):
    net, x = tiny_net(), images(24)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    permuted = copy.deepcopy(net)
    with torch.no_grad():  # b's channel j is a's channel perm[j]; the next conv reads them in the new order
        permuted[0].weight.copy_(net[0].weight[perm])
        permuted[0].bias.copy_(net[0].bias[perm])
        permuted[2].weight.copy_(net[2].weight[:, perm])
    with torch.no_grad():
        assert torch.allclose(permuted(x), net(x), atol=1e-5)  # the same function
    before = snapshot(net)
    m = match_units(net, permuted, x, "1", "1", method=method, batch_size=10)
    assert m.samples == 24 * 16 * 16
    expect = torch.argsort(perm)  # unit i of a is unit argsort(perm)[i] of b
    got = dict(m.pairs.tolist())
    assert len(got) == 8 and all(got[i] == int(expect[i]) for i in range(8))
    assert torch.allclose(m.pair_correlation, torch.ones(8, dtype=torch.float64), atol=1e-9)
    off = m.correlation.clone()
    off[m.pairs[:, 0], m.pairs[:, 1]] = -2
    assert float(off.max()) < 0.999
    assert_untouched(net, before)


def test_unit_correlation_equals_numpy_corrcoef_and_greedy_differs_from_hungarian_when_it_should():
    net_a, net_b, x = tiny_net(0), tiny_net(9), images(10)
    m = match_units(net_a, net_b, x, "0", "0", batch_size=3)  # batches of 3, 3, 3, 1 merged
    with torch.no_grad():
        a = net_a[0](x).movedim(1, -1).reshape(-1, 8).double().numpy()
        b = net_b[0](x).movedim(1, -1).reshape(-1, 8).double().numpy()
    expect = np.corrcoef(a.T, b.T)[:8, 8:]
    assert np.allclose(m.correlation.numpy(), expect, atol=1e-10)
    from convscope.methods.similarity import match_from_correlation

    corr = torch.tensor([[0.9, 0.8], [0.85, 0.1]], dtype=torch.float64)
    assert match_from_correlation(corr, "hungarian").tolist() == [[0, 1], [1, 0]]  # 0.8 + 0.85 > 0.9 + 0.1
    assert match_from_correlation(corr, "greedy").tolist() == [[0, 0], [1, 1]]
    assert match_from_correlation(corr, "semi").tolist() == [[0, 0], [1, 0]]


# --------------------------------------------------------------------------- the report page


def test_similarity_report_writes_heatmap_matching_html_and_json(tmp_path):
    import json

    from convscope.applications.similarity_report import similarity_report

    from .helpers import linked_images

    net, x = tiny_net(), images(24)
    other = copy.deepcopy(net)
    perm = torch.arange(7, -1, -1)
    with torch.no_grad():
        other[0].weight.copy_(net[0].weight[perm])
        other[0].bias.copy_(net[0].bias[perm])
        other[2].weight.copy_(net[2].weight[:, perm])
    before = snapshot(net)
    run = similarity_report(net, other, x, tmp_path / "sim", layers_a=LAYERS, layers_b=LAYERS, batch_size=8,
                            match=("1", "1"), n_pairs=3, k=2, label_a="net", label_b="permuted")
    assert_untouched(net, before)
    data = json.loads(run.json.read_text())
    assert data["layers_a"] == LAYERS and np.allclose(data["matrix"], run.result.matrix.numpy())
    assert np.allclose(np.diag(data["matrix"]), 1.0, atol=1e-6)  # a permutation of channels changes no CKA
    assert data["matching"]["pairs"] == [[i, 7 - i] for i in range(8)]
    files = {p.name for p in linked_images(run.html)}
    assert files == {"similarity.png", "matching.png"}
    from PIL import Image

    with Image.open(run.png) as im:
        assert im.width > 3 * 30 and im.height > 3 * 30
    with Image.open(run.matching_png) as im:  # 3 rows of pairs, 2 columns
        assert im.height > 3 * 8
    with pytest.raises(ConvscopeError, match="match="):
        similarity_report(net, other, x, tmp_path / "bad", match="1")
