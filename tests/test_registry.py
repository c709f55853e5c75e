"""The attribution-method registry: every entry runs with its declared shape; the CLI, evaluation and explorer
lists are read from it; a wrong name is one clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope import cli
from convscope.applications import evaluate
from convscope.errors import ConvscopeError
from convscope.methods.registry import ATTRIBUTION_METHODS, AttributionMethod, attribution_method
from convscope.web import service


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


@pytest.mark.parametrize("name", list(ATTRIBUTION_METHODS))
def test_every_entry_runs_with_its_shape(name):
    entry = attribution_method(name)
    x = torch.rand(2, 3, 16, 16)
    options = {"n": 2} if name == "smoothgrad" else {"window": 4, "stride": 4} if name == "occlusion" else {}
    if name == "rollout":  # attention rollout needs a vision transformer: a CNN gets one line saying so
        with pytest.raises(ConvscopeError, match="ViT|transformer|attention"):
            entry.maps(_tiny(), x, torch.tensor([[1, 3], [0, 2]]))
        return
    out = entry.maps(_tiny(), x, torch.tensor([[1, 3], [0, 2]]), layer="3", **options)
    k = 1 if name == "visual-backprop" else 2  # class-agnostic: one map per image
    expected = (2, k, 3, 16, 16) if entry.per_channel else (2, k, 16, 16)
    assert tuple(out.shape) == expected and torch.isfinite(out).all()
    assert out.abs().sum() > 0, f"{name} gave an all-zero result"
    assert entry.title and entry.citation[-4:].isdigit() and entry.citation in entry.description


def test_registry_order_and_flags():
    assert list(ATTRIBUTION_METHODS)[:2] == ["saliency", "gradient"] and "occlusion" in ATTRIBUTION_METHODS
    assert {n for n, m in ATTRIBUTION_METHODS.items() if m.needs_layer} == {"cam", "gradcam", "gradcam++",
                                                                           "guided-gradcam", "scorecam", "layercam"}
    entry = ATTRIBUTION_METHODS["gradcam"]
    assert isinstance(entry, AttributionMethod) and entry.name == "gradcam"
    with pytest.raises(AttributeError):
        entry.name = "other"  # type: ignore[misc]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConvscopeError) as e:
        attribution_method("gradcam+++")
    assert "gradcam+++" in str(e.value) and all(n in str(e.value) for n in ATTRIBUTION_METHODS)


def test_cli_evaluation_and_explorer_read_the_registry(tmp_path, capsys):
    names = cli.EXPLAIN_METHODS  # derived on access
    assert names == tuple(ATTRIBUTION_METHODS)
    assert cli.main(["explain", "x.png", "--method", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "guided-gradcam" in err
    scored = [evaluate.EVAL_NAMES.get(n, n) for n in evaluate.EVALUATED]
    assert set(evaluate.EVALUATED) <= set(ATTRIBUTION_METHODS)
    assert list(evaluate.METHODS) == [*scored, "random", "center"]
    assert set(service.CAM_METHODS) <= set(ATTRIBUTION_METHODS)
