"""Copy-on-write records of ``probe(detach=True)``: no copy unless the model writes a recorded tensor in place."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.core.probe import probe, written_tensors

from .helpers import assert_untouched, hook_count, snapshot


def conv64(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float64, out of place (the hook-free reference)."""
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x, conv.weight.double(), bias, conv.stride, conv.padding)


def bn64(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch norm in float64, out of place."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return (x - bn.running_mean.double().view(shape)) * scale.view(shape) + bn.bias.double().view(shape)


class Block(nn.Module):
    """torchvision BasicBlock style: conv-bn-relu(inplace)-conv-bn, ``out += identity``, functional relu_."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return out.relu_()

    def reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.double()
        c1 = conv64(self.conv1, x)
        b1 = bn64(self.bn1, c1)
        r = b1.clamp(min=0)
        c2 = conv64(self.conv2, r)
        b2 = bn64(self.bn2, c2)
        return {"conv1": c1, "bn1": b1, "relu": r, "conv2": c2, "bn2": b2, "": (b2 + x).clamp(min=0)}


class Writes(nn.Module):
    """A recorded conv whose output the next step writes in place with ``write``."""

    def __init__(self, write: Callable[[torch.Tensor], torch.Tensor], after: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.write = write
        self.after = after  # the same step out of place, in float64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.write(self.conv(x)).mean((2, 3))

    def reference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = conv64(self.conv, x.double())
        return {"conv": c, "": self.after(c).mean((2, 3))}


def add_out(h: torch.Tensor) -> torch.Tensor:
    torch.add(h, h.flip(1), out=h)
    return h


def set_view(h: torch.Tensor) -> torch.Tensor:
    v = h.flatten(2)  # a view: the write reaches the recorded storage through it
    v[:, :1] = 0
    return h


def zeroed_first(c: torch.Tensor) -> torch.Tensor:
    c = c.clone()
    c[:, :1] = 0
    return c


WRITES = {
    "inplace ReLU module": (nn.ReLU(inplace=True), lambda c: c.clamp(min=0)),
    "hardtanh positional inplace": (lambda h: F.hardtanh(h, 0.0, 6.0, True), lambda c: c.clamp(0, 6)),
    "relu positional inplace": (lambda h: F.relu(h, True), lambda c: c.clamp(min=0)),
    "clamp_": (lambda h: h.clamp_(-0.1, 0.1), lambda c: c.clamp(-0.1, 0.1)),
    "setitem on a view": (set_view, zeroed_first),
    "out=": (add_out, lambda c: c + c.flip(1)),
    "iadd": (lambda h: h.__iadd__(1.0), lambda c: c + 1),
    "mul_ on a narrow view": (lambda h: (h.narrow(1, 1, 2).mul_(3.0), h)[1],
                              lambda c: torch.cat([c[:, :1], c[:, 1:3] * 3, c[:, 3:]], 1)),
}


def check(model: nn.Module, x: torch.Tensor, names: list[str], **kwargs) -> dict[str, torch.Tensor]:
    before, hooks = snapshot(model), hook_count(model)
    ref = model.reference(x)
    with torch.no_grad(), probe(model, names, detach=True, **kwargs) as p:
        y = model(x)
        for name in names:
            assert torch.allclose(p.activations[name].double(), ref[name], atol=1e-5), name
        assert torch.allclose(y.double(), ref[""], atol=1e-5)
        acts = p.activations
    assert_untouched(model, before, hooks)
    return acts


def test_basic_block_out_plus_identity():
    """``out += identity`` after a recorded bn2, an in-place ReLU after bn1, ``relu_`` at the end; the block's
    input is recorded too (the identity, read but not written)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block", Block())
    block = model.block
    x = torch.randn(2, 4, 16, 16)
    before = snapshot(model)
    ref = block.reference(x)
    with torch.no_grad(), probe(model, ["block.conv1", "block.bn1", "block.relu", "block.conv2", "block.bn2",
                                        "block"], detach=True) as p:
        y = model(x)
    for name in ["conv1", "bn1", "relu", "conv2", "bn2"]:
        assert torch.allclose(p.activations["block." + name].double(), ref[name], atol=1e-5), name
    assert torch.allclose(p.activations["block"].double(), ref[""], atol=1e-5)
    assert torch.allclose(y.double(), ref[""], atol=1e-5)
    assert_untouched(model, before)


@pytest.mark.parametrize("case", list(WRITES))
def test_inplace_write_after_recorded_layer(case):
    torch.manual_seed(1)
    write, after = WRITES[case]
    model = Writes(write, after)
    check(model, torch.randn(2, 3, 16, 16), ["conv"])


def test_with_guided_rule_and_inplace_relu():
    """The rule mode's in-place ``copy_`` (its relu_ / F.relu(x, True)) is seen below it: the record stays."""
    torch.manual_seed(2)
    model = Writes(lambda h: F.relu(h, inplace=True), lambda c: c.clamp(min=0))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    ref = model.reference(x.detach())
    with probe(model, ["conv"], detach=True, relu_rule="guided") as p:
        y = model(x)
        y.sum().backward()
    assert torch.allclose(p.activations["conv"].double(), ref["conv"], atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


class Plain(nn.Module):
    """No in-place op anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.act(self.conv(x))))


def test_no_inplace_no_copy():
    """Without in-place ops each record shares its storage with the layer's output (no copy made)."""
    torch.manual_seed(3)
    model = Plain()
    ptrs: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: ptrs.__setitem__(n, o.data_ptr()))
               for n, m in model.named_children()]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = {"conv": model.conv(x)}
        expected["act"] = model.act(expected["conv"])
        expected["fc"] = model.fc(expected["act"].flatten(1))
        with probe(model, ["conv", "act", "flat", "fc"], detach=True) as p:
            y = model(x)
    for h in handles:
        h.remove()
    for name in ["conv", "act", "flat", "fc"]:
        assert p.activations[name].data_ptr() == ptrs[name], name
        assert not p.activations[name].requires_grad
    assert p.activations["flat"].data_ptr() == p.activations["act"].data_ptr()  # a view of act's output
    for name, value in expected.items():
        assert torch.equal(p.activations[name], value), name
    assert torch.equal(y, p.activations["fc"])


def test_records_taken_earlier_stay_right():
    """A user's write on the model's output after the pass moves the record (the same tensor object) onto a copy;
    a write on the record itself changes the record only."""
    torch.manual_seed(4)
    model = Plain()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), probe(model, ["act", "flat", "fc"], detach=True) as p:
        y = model(x)
        acts = p.activations
        fc = acts["fc"].clone()
        y.mul_(0)
        assert torch.equal(acts["fc"], fc) and p.activations["fc"] is acts["fc"]
        flat = acts["flat"].clone()
        acts["act"].zero_()  # the user's own record: written, and act's output (flat's storage) kept
        assert (acts["act"] == 0).all()
        assert torch.equal(acts["flat"], flat)


class Scripted(nn.Module):
    """An eager recorded conv followed by a TorchScript part that writes in place (no Python torch functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = torch.jit.script(Tail())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(x))


class Tail(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h.add_(1.0)
        return h.mean((2, 3))


def test_scripted_part_keeps_copying():
    torch.manual_seed(5)
    model = Scripted()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        c = model.conv(x)
        with probe(model, ["conv"], detach=True) as p:
            model(x)
    assert torch.equal(p.activations["conv"], c)


def test_keep_all_calls_and_many_passes():
    """Every pass's records stay right while later passes reuse freed memory."""
    torch.manual_seed(6)
    model = Writes(lambda h: h.relu_(), lambda c: c.clamp(min=0))
    xs = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    with torch.no_grad(), probe(model, ["conv"], detach=True, keep_all_calls=True) as p:
        for x in xs:
            model(x)
    for x, rec in zip(xs, p.outputs("conv")):
        assert torch.allclose(rec.double(), model.reference(x)["conv"], atol=1e-5)


def test_mode_leaves_with_the_block_also_on_error():
    model = Writes(lambda h: h.relu_(), lambda c: c.clamp(min=0))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), probe(model, ["conv"], detach=True) as p:
        model(x)
        raise RuntimeError("boom")
    rec = p.activations["conv"]
    kept = rec.clone()
    rec.add_(1)  # no mode any more: a plain write
    assert torch.equal(rec, kept + 1)
    assert not torch.overrides.has_torch_function((torch.zeros(1),))


def test_written_tensors_classification():
    a, b = torch.zeros(2), torch.zeros(2)
    assert written_tensors(torch.Tensor.add_, (a, b), {}) == [a]
    assert written_tensors(torch.Tensor.__setitem__, (a, 0, 1.0), {}) == [a]
    assert written_tensors(torch.add, (a, b), {"out": b}) == [b]
    assert written_tensors(F.relu, (a, True), {}) == [a]
    assert written_tensors(F.hardtanh, (a, 0.0, 6.0, True), {}) == [a]
    assert written_tensors(F.hardtanh, (a,), {"inplace": True}) == [a]
    assert written_tensors(F.relu, (a,), {}) == []
    assert written_tensors(torch.add, (a, b), {}) == []
    assert written_tensors(torch.Tensor.requires_grad_, (a,), {}) == []
    assert written_tensors(torch.ops.aten.add_.Tensor, (a, b), {}) == [a]
