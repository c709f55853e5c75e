"""Bad input at the library level: one-line ConvscopeError naming the problem and the fix, model left as it came."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.cli import main
from convscope.core.images import Preprocess
from convscope.core.layers import MAX_INPUT_SIDE
from convscope.errors import ConvscopeError, ModelLoadError, TargetError
from convscope.models.zoo import state_mismatch

from .helpers import assert_untouched, hook_count, snapshot

ROOT = Path(__file__).resolve().parents[1]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


class Tiny(nn.Module):
    """Conv 7x7 without padding (needs >= 7 px), in-place ReLU, 10 classes; odd modes, grads and a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture
def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Tiny()
    model.train()
    model.fc.eval()  # mixed modes must come back mixed
    model.conv.bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    model.relu.register_forward_hook(lambda m, i, o: None)  # the user's own hook stays, ours go
    return model


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["tpu:9", "blah", "", "meta", "cuda:-1", True, 1.5])
def test_unknown_device_is_one_line(device):
    with pytest.raises(ConvscopeError) as info:
        cs.load_model("demo_net", device=device)
    msg = one_line(info)
    assert "device" in msg and "use" in msg and "cpu" in msg


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", 0])
def test_unavailable_device_is_one_line(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False, raising=False)
    with pytest.raises(ConvscopeError) as info:
        cs.resolve_device(device)
    msg = one_line(info)
    assert "sees no" in msg and "cpu" in msg


def test_cuda_index_beyond_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConvscopeError) as info:
        cs.resolve_device("cuda:7")
    msg = one_line(info)
    assert "cuda:7" in msg and "2 CUDA devices" in msg and "cuda:0, cuda:1" in msg
    assert cs.resolve_device("cuda:1") == torch.device("cuda:1")
    assert cs.resolve_device(" CPU ") == torch.device("cpu")


def test_bad_device_fails_before_the_model_is_built(tiny, monkeypatch, tmp_path):
    calls = []
    mod = type(sys)("cs_factory_probe")
    mod.build = lambda: calls.append(1) or Tiny()
    monkeypatch.setitem(sys.modules, "cs_factory_probe", mod)
    with pytest.raises(ConvscopeError):
        cs.load_model("cs_factory_probe:build", device="tpu:9")
    assert calls == []
    before, hooks = snapshot(tiny), hook_count(tiny)
    with pytest.raises(ConvscopeError):
        cs.load_model(tiny, device="tpu:9")
    assert_untouched(tiny, before, hooks)


# --------------------------------------------------------------------------- input sizes


@pytest.mark.parametrize("size", [(0, 0), (-5, 10), (10, 0), (MAX_INPUT_SIDE + 1, 8), (100000, 100000), (True, 3),
                                  "12", (1.5, 2), (1, 2, 3)])
def test_list_layers_refuses_bad_sizes(tiny, size):
    before, hooks = snapshot(tiny), hook_count(tiny)
    with pytest.raises(ConvscopeError) as info:
        cs.list_layers(tiny, input_size=size)
    msg = one_line(info)
    assert "input_size" in msg and ("--size" in msg or "smaller size" in msg)
    assert_untouched(tiny, before, hooks)


def test_list_layers_size_the_model_cannot_take(tiny):
    before, hooks = snapshot(tiny), hook_count(tiny)
    with pytest.raises(ConvscopeError) as info:
        cs.list_layers(tiny, input_size=(3, 3))  # a 7x7 kernel without padding needs 7 px
    msg = one_line(info)
    assert "Tiny failed on a zero image of 3x3" in msg and "--size H W" in msg
    assert_untouched(tiny, before, hooks)
    rows = cs.list_layers(tiny, input_size=(7, 9))  # the smallest that fits works, and an int is a square
    assert {r.name: r.output_shape for r in rows}["conv"] == (4, 1, 3)
    assert {r.name: r.output_shape for r in cs.list_layers(tiny, input_size=8)}["conv"] == (4, 2, 2)
    assert_untouched(tiny, before, hooks)


def test_cli_layers_size_zero_is_one_line(capsys):
    assert main(["layers", "demo_net", "--size", "0", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convscope: error: input_size 0x0") and "\n" not in err


# --------------------------------------------------------------------------- factories


def test_factory_that_raises(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("os.path:join")
    msg = one_line(info)
    assert "'os.path:join'" in msg and "TypeError" in msg and "join() missing" in msg and "no arguments" in msg

    (tmp_path / "cs_broken_nets.py").write_text(
        "import torch\n"
        "def fails():\n    raise ValueError('no weights here\\nsecond line')\n"
        "def number():\n    return 3\n"
    )
    (tmp_path / "cs_bad_import.py").write_text("raise RuntimeError('module-level boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("cs_broken_nets:fails")
    assert "ValueError: no weights here" in one_line(info)
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("cs_broken_nets:number")
    assert "returned int, not an nn.Module" in one_line(info)
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("cs_broken_nets:missing")
    assert "no callable 'missing'" in one_line(info)
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("cs_bad_import:anything")
    assert "module-level boom" in one_line(info)
    with pytest.raises(ModelLoadError) as info:
        cs.load_model("cs_broken_nets:")
    assert "package.module:factory" in one_line(info)


# --------------------------------------------------------------------------- weights files


class Holder:
    """Not a tensor: a checkpoint holding it needs full unpickling."""


def weights_cases(tmp_path: Path, model: nn.Module) -> dict[str, tuple[Path, list[str]]]:
    sd = model.state_dict()
    torch.save(model, tmp_path / "whole.pt")
    torch.save({"state_dict": sd, "extra": Holder()}, tmp_path / "object.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    torch.save(sd, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    torch.jit.save(torch.jit.script(Tiny()), tmp_path / "script.pt")
    (tmp_path / "folder").mkdir()
    return {
        "whole module": (tmp_path / "whole.pt", ["Python objects beyond tensors", "Tiny", "state_dict()"]),
        "object inside": (tmp_path / "object.pt", ["Python objects beyond tensors", "Holder", "state_dict()"]),
        "text": (tmp_path / "text.pt", ["not a PyTorch checkpoint", "state_dict()"]),
        "safetensors": (tmp_path / "w.safetensors", ["not a PyTorch checkpoint", "safetensors.torch.load_file"]),
        "truncated": (tmp_path / "truncated.pt", ["corrupt or truncated"]),
        "list": (tmp_path / "list.pt", ["holds no state dict (found list)", "state_dict()"]),
        "no tensors": (tmp_path / "meta.pt", ["holds no state dict", "epoch, optimizer"]),
        "torchscript": (tmp_path / "script.pt", ["TorchScript model, not a state dict"]),
        "missing": (tmp_path / "nope.pt", ["does not exist", "check the path"]),
        "folder": (tmp_path / "folder", ["is a folder", "file inside"]),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save, for the TorchScript case
def test_unusable_weights_files_are_one_line_and_never_advise_unsafe_loading(tiny, tmp_path):
    for case, (path, parts) in weights_cases(tmp_path, Tiny()).items():
        before, hooks = snapshot(tiny), hook_count(tiny)
        with pytest.raises(ModelLoadError) as info:
            cs.load_model(tiny, weights=path)
        msg = one_line(info)
        for part in parts:
            assert part in msg, (case, msg)
        assert "weights_only" not in msg and "False" not in msg and "safe_globals" not in msg, (case, msg)
        assert_untouched(tiny, before, hooks)


def test_mismatched_state_dict_lists_a_few_keys_and_changes_nothing(tiny, tmp_path):
    sd = {k: torch.randn_like(v) for k, v in tiny.state_dict().items()}
    renamed = {("model." + k if k.startswith("conv") else k): v for k, v in sd.items()}
    torch.save(renamed, tmp_path / "prefixed.pt")
    before, hooks = snapshot(tiny), hook_count(tiny)
    with pytest.raises(ModelLoadError) as info:
        cs.load_weights(tiny, tmp_path / "prefixed.pt")
    msg = one_line(info)
    assert "2 missing keys (conv.weight, conv.bias)" in msg and "2 unexpected keys (model.conv.weight" in msg
    assert "prefix 'model.'" in msg
    assert_untouched(tiny, before, hooks)  # fc.* matched, yet nothing was copied

    shaped = dict(sd, **{"fc.weight": torch.zeros(3, 4)})
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError) as info:
        cs.load_weights(tiny, tmp_path / "shape.pt")
    assert "fc.weight: (3, 4) in the file, (10, 4) in the model" in one_line(info)
    assert_untouched(tiny, before, hooks)

    many = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    assert state_mismatch(many, {}).startswith("8 missing keys (0.weight, 0.bias, 1.weight, ... (5 more))")
    assert state_mismatch(many, many.state_dict()) == ""

    torch.save(sd, tmp_path / "good.pt")  # and a fitting file loads
    cs.load_weights(tiny, tmp_path / "good.pt")
    assert torch.equal(tiny.fc.weight, sd["fc.weight"])


def test_cli_rejected_pickle_is_one_line(tmp_path, capsys):
    from convscope.models.demo_net import DemoNet

    torch.save(DemoNet(num_classes=10), tmp_path / "whole.pt")
    assert main(["layers", "demo_net", "--weights", str(tmp_path / "whole.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Python objects beyond tensors" in err and "weights_only" not in err


# --------------------------------------------------------------------------- attacks and targets


def test_attack_without_target_uses_the_predicted_class(tiny, one_thread):
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    before, hooks = snapshot(tiny), hook_count(tiny)
    for attack in (cs.fgsm, lambda *a, **k: cs.pgd(*a, steps=2, **k)):
        res = attack(tiny, x, target=None, eps=0.05, preprocess=Preprocess.identity())
        ref = attack(tiny, x, eps=0.05, preprocess=Preprocess.identity())
        assert torch.equal(res.label, res.clean_class) and torch.equal(res.x, ref.x)
        with pytest.raises(ConvscopeError) as info:
            attack(tiny, x, target=None, targeted=True, preprocess=Preprocess.identity())
        assert "targeted attack needs target=CLASS" in one_line(info)
        with pytest.raises(ConvscopeError) as info:
            attack(tiny, x, targeted=True, preprocess=Preprocess.identity())  # the default target too
        one_line(info)
    with pytest.raises(ConvscopeError) as info:
        cs.pgd(tiny, x, alpha=-0.1, preprocess=Preprocess.identity())
    assert "alpha > 0" in one_line(info)
    with pytest.raises(ConvscopeError) as info:
        cs.pgd(tiny, x, target=cs.top_k(2), preprocess=Preprocess.identity())
    one_line(info)
    assert_untouched(tiny, before, hooks)


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "5"])
def test_top_k_needs_a_positive_int(k):
    with pytest.raises(TargetError) as info:
        cs.top_k(k)
    assert "give an int >= 1" in one_line(info)


def test_top_k_beyond_the_class_count(tiny, one_thread):
    out = torch.randn(2, 10)
    assert torch.equal(cs.target_scores(out, cs.top_k(10))[1], out.argsort(1, descending=True))
    with pytest.raises(TargetError) as info:
        cs.target_scores(out, cs.top_k(11))
    assert one_line(info) == "top_k(11) asks for 11 classes but the model has 10 outputs; use k <= 10"
    x = torch.rand(2, 3, 8, 8)
    before, hooks = snapshot(tiny), hook_count(tiny)
    with pytest.raises(TargetError) as info:
        cs.gradient(tiny, x, target=cs.top_k(12))
    assert "10 outputs" in one_line(info)
    assert_untouched(tiny, before, hooks)


@pytest.mark.parametrize("target, part", [(None, "target=None"), ("cat", "not a class index"),
                                          ([[1, 2], [3]], "different numbers of classes")])
def test_unusable_targets(target, part):
    with pytest.raises(TargetError) as info:
        cs.target_scores(torch.randn(2, 10), target)
    assert part in one_line(info)


# --------------------------------------------------------------------------- optional TensorBoard


def test_tensorboard_extra_and_monitor_export():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.split(">")[0].split("=")[0].strip() == "tensorboard" for req in extras["tensorboard"])
    assert "EvolutionMonitor" in cs.__all__
    from convscope.applications.monitor import EvolutionMonitor

    assert cs.EvolutionMonitor is EvolutionMonitor


def test_monitor_without_tensorboard_is_one_line(demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ConvscopeError) as info:
        cs.EvolutionMonitor(demo, "features.relu1", units=[0], images=x, out=tmp_path, log_dir=tmp_path / "tb")
    msg = one_line(info)
    assert "tensorboard" in msg and "pip install" in msg
