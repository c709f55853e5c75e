"""Train ``demo_net`` (or ``demo_vit``) on the synthetic concept dataset's scene labels, reproducibly, on 2 CPU cores.

Images are rendered in memory from ``convscope.data.synthetic`` (deterministic per seed and index): training
images are indices ``0 .. n_train-1``, test images the next ``n_test`` indices.  The network trains with batch
norm after each convolution (folded into the convolutions afterwards, see :func:`fold_batchnorm`), AdamW with a
linear warm-up and cosine decay, label smoothing, and the 8 flips/rotations of the square as augmentation (the
scene label, the dominant shape's class, does not depend on orientation).

After every epoch ``epoch_XX.pt`` is written atomically with the folded, classic weights (``epoch_00.pt`` is the
untrained network, for the training-evolution views of Zeiler & Fergus Fig. 4), and ``resume.pt`` with the full
training state, so a run that is stopped resumes where it was and ends with the same bytes.

``demo_vit`` (:class:`VitConfig`, ``convscope train-demo --arch vit``) is a small Vision Transformer
(Dosovitskiy et al. 2021; :func:`convscope.models.vit.demo_vit`) trained by the same loop on the same images and
held-out split: the same augmentation (the 16 px patch grid of a 112 px image maps onto itself under the 8
symmetries), AdamW with warm-up + cosine, label smoothing; no weight decay on biases, norms, the class token and
the position embeddings. Its weights are saved as trained (float32; the conv stem keeps torchvision's batch norm).

demo_vit also learns by **token labeling** (Jiang et al. 2021, "All Tokens Matter", Eq. 2-3): besides the class
token's cross entropy, every patch token of the final LayerNorm predicts, through an auxiliary linear layer, the
fraction of its patch covered by each shape class or by background, a soft label taken here from the dataset's
ground-truth segmentation (where the paper uses a teacher's dense score map): ``loss = CE(cls) + beta *
mean_i H(token_i, y_i)``. The auxiliary layer is dropped after training; the shipped ViT is the plain architecture.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.device import resolve_device
from ..core.io import atomic_path, atomic_write_text
from ..core.progress import progress_bar
from ..data.synthetic import SynthArrays, SynthConfig, render_arrays
from ..errors import ConvscopeError
from ..models.demo_net import INPUT_SIZE, DemoNet, fold_batchnorm
from ..models.vit import DEMO_VIT_CONFIG, DEMO_VIT_POOL, DEMO_VIT_STEM, StemLayer, VisionTransformer, demo_vit


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (of ``demo_net``; :class:`VitConfig` for ``demo_vit``)."""

    name: ClassVar[str] = "demo_net"  # the zoo name, and the final file's stem
    n_train: int = 12000
    n_test: int = 1000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    dropout: float = 0.1
    label_smoothing: float = 0.05
    seed: int = 0
    data_seed: int = 0
    size: int = INPUT_SIZE


@dataclass(frozen=True)
class VitConfig(TrainConfig):
    """``demo_vit``'s recipe: the same images and loop as demo_net, ViT hyper-parameters (measured on 2 CPU cores)."""

    name: ClassVar[str] = "demo_vit"
    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    dropout: float = 0.0
    label_smoothing: float = 0.1
    patch_size: int = DEMO_VIT_CONFIG["patch_size"]
    num_layers: int = DEMO_VIT_CONFIG["num_layers"]
    num_heads: int = DEMO_VIT_CONFIG["num_heads"]
    hidden_dim: int = DEMO_VIT_CONFIG["hidden_dim"]
    mlp_dim: int = DEMO_VIT_CONFIG["mlp_dim"]
    stem: tuple[StemLayer, ...] = DEMO_VIT_STEM
    pool: str = DEMO_VIT_POOL
    token_labels: float = 1.0  # beta of token labeling (0: the class token's loss alone)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The trainable network of a recipe (demo_net with batch norm, or demo_vit), initialized from the global RNG."""
    if isinstance(config, VitConfig):
        return demo_vit(num_classes, image_size=config.size, dropout=config.dropout, patch_size=config.patch_size,
                        num_layers=config.num_layers, num_heads=config.num_heads, hidden_dim=config.hidden_dim,
                        mlp_dim=config.mlp_dim, stem=tuple(config.stem), pool=config.pool)
    return DemoNet(num_classes=num_classes, dropout=config.dropout, batch_norm=True)


def plain_model(model: nn.Module) -> nn.Module:
    """The network to ship, in eval mode: demo_net with its batch norm folded, a ViT as it is."""
    return fold_batchnorm(model.eval()) if isinstance(model, DemoNet) else model.eval()


NO_DECAY = ("class_token", "encoder.pos_embedding")  # ViT parameters kept free of weight decay (with all 1-D ones)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the rendering workers), user + system."""
    return sum(os.times()[:4])


@dataclass
class TrainResult:
    """Final weights, the per-epoch history, and the held-out accuracy."""

    weights: Path
    checkpoints: list[Path]
    history: list[dict]
    test_accuracy: float


def render_split(start: int, n: int, size: int, seed: int, workers: int = 2,
                 progress: bool | None = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images ``start .. start+n-1`` as ``uint8 N x 3 x H x W`` and their scene classes."""
    return split_tensors(render_arrays(start, n, size, seed, workers=workers, progress=progress))


def split_tensors(arrays: SynthArrays) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered arrays as ``uint8 N x 3 x H x W`` images and their scene classes."""
    return torch.from_numpy(arrays.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(arrays.scenes)


def token_label_targets(objects: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Soft token labels (Jiang et al. 2021) from per-pixel classes: ``objects`` int ``N x H x W`` (``num_classes``
    = background) -> ``N x (num_classes + 1) x gh x gw``, the fraction of each token's patch covered by each class
    (H and W must be multiples of the grid)."""
    h, w = objects.shape[-2:]
    if h % grid[0] or w % grid[1]:
        raise ConvscopeError(f"token labels need the image ({h}x{w}) to be a multiple of the token grid {grid}; "
                             "use an image size divisible by the ViT's patch size")
    kernel = (h // grid[0], w // grid[1])
    return torch.cat([F.avg_pool2d(F.one_hot(chunk.long(), num_classes + 1).permute(0, 3, 1, 2).float(), kernel)
                      for chunk in objects.split(256)])  # in chunks: the one-hot maps of all images at once are GBs


def token_labeling_loss(tokens: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the soft cross entropy ``H(head(token_i), y_i)`` (Jiang et al. 2021, Eq. 2);
    ``tokens`` ``N x T x D`` (patch tokens, row-major grid), ``targets`` ``N x K x gh x gw``."""
    y = targets.flatten(2).transpose(1, 2)
    return -(y * F.log_softmax(head(tokens), dim=-1)).sum(-1).mean()


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> demo_net's input space (its preprocess: mean 0.5, std 0.5)."""
    return images.float().div_(255).sub_(0.5).div_(0.5)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (mode restored)."""
    was = model.training
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        correct = sum(int((model(to_input(xb.to(dev))).argmax(1).cpu() == yb).sum())
                      for xb, yb in zip(images.split(batch_size), labels.split(batch_size)))
    model.train(was)
    return correct / len(labels)


def _save(path: Path, obj: dict) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def train_demo(out: Path, config: TrainConfig = TrainConfig(), workers: int = 2,
               progress: bool | None = True, device: str | torch.device = "cpu") -> TrainResult:
    """Train demo_net (``VitConfig()``: demo_vit); writes ``out/epoch_XX.pt``, ``out/resume.pt``,
    ``out/<name>.pt`` (shipped weights + classes) and ``out/train.json``. The bundled weights were trained on the CPU
    (same bytes on every CPU run); CUDA trains the same recipe, not the same bytes."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = SynthConfig().shapes
    beta = config.token_labels if isinstance(config, VitConfig) else 0.0
    arrays = render_arrays(0, config.n_train, config.size, config.data_seed, workers=workers, progress=progress,
                           objects=beta > 0)  # token labels need the shape class under each pixel
    x_train, y_train = split_tensors(arrays)
    x_test, y_test = render_split(config.n_train, config.n_test, config.size, config.data_seed, workers, progress)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, len(classes)).to(dev)
        tokens = None
        if beta > 0:  # the auxiliary token head (Jiang et al. 2021), trained alongside and not shipped
            assert isinstance(model, VisionTransformer) and arrays.objects is not None
            targets = token_label_targets(torch.from_numpy(arrays.objects), model.grid(config.size, config.size),
                                          len(classes))
            tokens = TokenLabels(nn.Linear(model.hidden_dim, len(classes) + 1).to(dev), targets, beta)
    named = [*model.named_parameters(), *(tokens.head.named_parameters(prefix="token_head") if tokens else [])]
    decay = [p for n, p in named if p.ndim > 1 and n not in NO_DECAY]  # none on biases, norms
    rest = [p for n, p in named if p.ndim <= 1 or n in NO_DECAY]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    steps = config.epochs * math.ceil(config.n_train / config.batch_size)
    warm = max(1, round(config.warmup_epochs * steps / config.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 1
    state = _resume_state(out, config)
    if state is not None:
        model.load_state_dict({k: v.to(dev) for k, v in state["state_dict"].items()})
        if tokens is not None:
            tokens.head.load_state_dict({k: v.to(dev) for k, v in state["token_head"].items()})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history = json.loads(state["history"])
        start = int(state["epoch"]) + 1
    else:
        _save_epoch(out, model, 0, history, classes, config)

    hook = tokens.capture(model) if tokens is not None else None
    try:
        for epoch in range(start, config.epochs + 1):
            loss = _train_epoch(model, opt, sched, gen, x_train, y_train, epoch, config, progress, tokens)
            history.append({"epoch": epoch, "train_loss": loss, "test_accuracy": accuracy(model, x_test, y_test)})
            _save_epoch(out, model, epoch, history, classes, config)
            _save(out / "resume.pt", {"state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                                      "token_head": tokens.head.state_dict() if tokens else {},
                                      "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch,
                                      "history": json.dumps(history), "config": json.dumps(asdict(config))})
    finally:
        if hook is not None:
            hook.remove()

    plain = plain_model(model).to(dev)
    test_acc = accuracy(plain, x_test, y_test)
    half = isinstance(plain, DemoNet)  # demo_net ships float16; demo_vit (small) float32, exactly as trained
    seconds = {"wall_seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1)}
    weights = _save(out / f"{config.name}.pt", {
        "state_dict": {k: v.cpu().half() if half and v.is_floating_point() else v.cpu()
                       for k, v in plain.state_dict().items()},
        "classes": list(classes), "test_accuracy": test_acc, "config": json.dumps(asdict(config)),
        "epochs": config.epochs, "seed": config.seed, **seconds})
    atomic_write_text(out / "train.json", json.dumps({"config": asdict(config), "history": history,
                                                     "test_accuracy": test_acc, **seconds}, indent=1))
    return TrainResult(weights, sorted(out.glob("epoch_*.pt")), history, test_acc)


def dihedral(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square per image: bit 0 flips left-right, bit 1 flips up-down,
    bit 2 transposes (``code`` is an int tensor of length N; images must be square)."""
    m = code.view(-1, 1, 1, 1)
    x = torch.where(m & 1 == 1, x.flip(-1), x)
    x = torch.where(m & 2 == 2, x.flip(-2), x)
    return torch.where(m & 4 == 4, x.transpose(-1, -2), x)


@dataclass
class TokenLabels:
    """Token labeling's training state: the auxiliary head, the soft targets ``N x K x gh x gw`` of the training
    images, the loss weight ``beta``, and the final LayerNorm's tokens of the last forward pass (:meth:`capture`)."""

    head: nn.Linear
    targets: torch.Tensor
    beta: float
    seen: dict[str, torch.Tensor] = field(default_factory=dict)

    def capture(self, model: nn.Module) -> RemovableHandle:
        """Keep ``model.encoder``'s output (``N x T x D``) of every forward pass in ``seen["tokens"]``; the caller
        removes the returned handle."""
        return model.get_submodule("encoder").register_forward_hook(
            lambda _m, _i, out: self.seen.__setitem__("tokens", out))


def _train_epoch(model: nn.Module, opt, sched, gen: torch.Generator, x_train: torch.Tensor,  # noqa: ANN001
                 y_train: torch.Tensor, epoch: int, config: TrainConfig, progress: bool | None,
                 tokens: TokenLabels | None = None) -> float:
    """One epoch, returning the mean training loss. Dropout draws from a global RNG seeded from (seed, epoch)
    inside ``fork_rng``, so a resumed run is identical to an uninterrupted one and the caller's RNG is untouched.
    With ``tokens`` (capturing, :meth:`TokenLabels.capture`), the final LayerNorm's patch tokens also pay the
    token-labeling loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        dev = next(model.parameters()).device
        order = torch.randperm(config.n_train, generator=gen)
        codes = torch.randint(0, 8, (config.n_train,), generator=gen)
        total = 0.0
        bar = progress_bar(order.split(config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                           progress=progress)
        for idx in bar:
            if len(idx) < 2:  # batch norm needs two samples; a last batch of one is skipped
                continue
            code = codes[idx].to(dev)
            xb = dihedral(to_input(x_train[idx].to(dev)), code)
            loss = F.cross_entropy(model(xb), y_train[idx].to(dev), label_smoothing=config.label_smoothing)
            if tokens is not None:  # the patch grid maps onto itself under the 8 symmetries: labels move along
                loss = loss + tokens.beta * token_labeling_loss(
                    tokens.seen["tokens"][:, 1:], tokens.head, dihedral(tokens.targets[idx].to(dev), code))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    return total / config.n_train


def _save_epoch(out: Path, model: nn.Module, epoch: int, history: list[dict], classes, config) -> Path:  # noqa: ANN001
    """``epoch_XX.pt``: the shipped form (demo_net's folded classic weights) with the history so far."""
    plain = plain_model(model)
    return _save(out / f"epoch_{epoch:02d}.pt", {
        "state_dict": {k: v.cpu() for k, v in plain.state_dict().items()}, "epoch": epoch,
        "history": json.dumps(history), "classes": list(classes), "config": json.dumps(asdict(config))})


def _resume_state(out: Path, config: TrainConfig) -> dict | None:
    """The saved training state if ``resume.pt`` was written with this same config (a different config starts
    over)."""
    path = out / "resume.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("config") == json.dumps(asdict(config)) else None
