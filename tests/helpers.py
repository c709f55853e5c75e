"""Shared test helpers: snapshot a model and assert a call left it exactly as it came."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    modes: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    inplace: dict[str, bool]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything a convscope call must leave unchanged."""
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modes={n: m.training for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        inplace={n: m.inplace for n, m in model.named_modules() if isinstance(getattr(m, "inplace", None), bool)},
    )


def hook_count(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks registered on any submodule."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def assert_untouched(model: nn.Module, before: Snapshot, hooks: int = 0) -> None:
    """Parameters and buffers bitwise equal, same modes, requires_grad, grads, inplace flags, no hooks."""
    after = snapshot(model)
    assert after.state.keys() == before.state.keys()
    for k, v in before.state.items():
        assert torch.equal(after.state[k], v), f"{k} changed"
    assert after.modes == before.modes, "train/eval mode not restored"
    assert after.requires_grad == before.requires_grad, "requires_grad not restored"
    for k, g in before.grads.items():
        a = after.grads[k]
        assert (a is None and g is None) or (a is not None and g is not None and torch.equal(a, g)), f"{k}.grad changed"
    assert after.inplace == before.inplace, "inplace flags not restored"
    assert hook_count(model) == hooks, "hooks left behind"


def linked_images(html_path):
    """The image files an HTML page links (``<img src="...">``), each checked to exist beside the page."""
    import re
    from pathlib import Path
    from urllib.parse import unquote

    page = Path(html_path)
    srcs = re.findall(r'<img src="([^"]+)"', page.read_text())
    files = [page.parent / unquote(s) for s in srcs if not s.startswith("data:")]
    missing = [str(f) for f in files if not f.is_file()]
    assert not missing, f"{page.name} links missing files: {missing}"
    return files
