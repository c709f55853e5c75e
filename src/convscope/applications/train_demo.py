"""Train ``demo_net`` on the synthetic concept dataset's scene labels, reproducibly, on 2 CPU cores.

Images are rendered in memory from ``convscope.data.synthetic`` (deterministic per seed and index): training
images are indices ``0 .. n_train-1``, test images the next ``n_test`` indices. AdamW with a linear warm-up
and cosine decay, horizontal-flip augmentation. A checkpoint is written atomically after every epoch
(``epoch_00.pt`` is the untrained network, for the training-evolution views of Zeiler & Fergus Fig. 4), and a
run that is stopped resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.io import atomic_path, atomic_write_text
from ..data.synthetic import SynthConfig, render_sample
from ..models.demo_net import INPUT_SIZE, DemoNet


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights."""

    n_train: int = 6000
    n_test: int = 1000
    epochs: int = 14
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    dropout: float = 0.1
    seed: int = 0
    data_seed: int = 0
    size: int = INPUT_SIZE


@dataclass
class TrainResult:
    """Final weights, the per-epoch history, and the held-out accuracy."""

    weights: Path
    checkpoints: list[Path]
    history: list[dict]
    test_accuracy: float


def _render(args: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    index, size, seed = args
    s = render_sample(index, size=size, seed=seed)
    return s.image, SynthConfig().scene_class(s.scene)


def render_split(start: int, n: int, size: int, seed: int, workers: int = 2,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images ``start .. start+n-1`` as ``uint8 N x 3 x H x W`` and their scene classes."""
    jobs = [(i, size, seed) for i in range(start, start + n)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            items = list(tqdm(pool.map(_render, jobs, chunksize=64), total=n, desc="render", disable=not progress))
    else:
        items = [_render(j) for j in tqdm(jobs, desc="render", disable=not progress)]
    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([c for _, c in items], dtype=torch.long)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> demo_net's input space (its preprocess: mean 0.5, std 0.5)."""
    return images.float().div_(255).sub_(0.5).div_(0.5)


@torch.no_grad()
def accuracy(model: DemoNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (mode restored)."""
    was = model.training
    model.eval()
    correct = sum(int((model(to_input(xb)).argmax(1) == yb).sum())
                  for xb, yb in zip(images.split(batch_size), labels.split(batch_size)))
    model.train(was)
    return correct / len(labels)


def _save(path: Path, obj: dict) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def train_demo(out: Path, config: TrainConfig = TrainConfig(), workers: int = 2, progress: bool = True) -> TrainResult:
    """Train demo_net; writes ``out/epoch_XX.pt``, ``out/demo_net.pt`` (weights + classes) and ``out/train.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = SynthConfig().shapes
    x_train, y_train = render_split(0, config.n_train, config.size, config.data_seed, workers, progress)
    x_test, y_test = render_split(config.n_train, config.n_test, config.size, config.data_seed, workers, progress)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DemoNet(num_classes=len(classes), dropout=config.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(config.n_train / config.batch_size)
    warm = max(1, round(config.warmup_epochs * steps / config.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 1
    last = _latest_checkpoint(out, config)
    if last is not None:  # resume
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        history = json.loads(ckpt["history"])
        start = int(ckpt["epoch"]) + 1
    else:
        _save(out / "epoch_00.pt", _checkpoint(model, opt, sched, gen, 0, history, classes, config))

    for epoch in range(start, config.epochs + 1):
        loss = _train_epoch(model, opt, sched, gen, x_train, y_train, epoch, config, progress)
        history.append({"epoch": epoch, "train_loss": loss, "test_accuracy": accuracy(model, x_test, y_test)})
        _save(out / f"epoch_{epoch:02d}.pt", _checkpoint(model, opt, sched, gen, epoch, history, classes, config))

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    weights = _save(out / "demo_net.pt", {
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
        "classes": list(classes), "test_accuracy": test_acc, "config": json.dumps(asdict(config))})
    atomic_write_text(out / "train.json", json.dumps({"config": asdict(config), "history": history,
                                                     "test_accuracy": test_acc}, indent=1))
    return TrainResult(weights, sorted(out.glob("epoch_*.pt")), history, test_acc)


def _train_epoch(model: DemoNet, opt, sched, gen: torch.Generator, x_train: torch.Tensor,  # noqa: ANN001
                 y_train: torch.Tensor, epoch: int, config: TrainConfig, progress: bool) -> float:
    """One epoch, returning the mean training loss. Dropout draws from a global RNG seeded from (seed, epoch)
    inside ``fork_rng``, so a resumed run is identical to an uninterrupted one and the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 100_003 + epoch)
        model.train()
        order = torch.randperm(config.n_train, generator=gen)
        flips = torch.rand(config.n_train, generator=gen) < 0.5
        total = 0.0
        bar = tqdm(order.split(config.batch_size), desc=f"epoch {epoch}/{config.epochs}", disable=not progress)
        for idx in bar:
            xb = to_input(x_train[idx])
            xb = torch.where(flips[idx].view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return total / config.n_train


def _checkpoint(model, opt, sched, gen, epoch, history, classes, config) -> dict:  # noqa: ANN001
    return {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "epoch": epoch, "history": json.dumps(history),
            "classes": list(classes), "config": json.dumps(asdict(config))}


def _latest_checkpoint(out: Path, config: TrainConfig) -> Path | None:
    """The newest checkpoint written with this same config (a different config starts over)."""
    for path in sorted(out.glob("epoch_*.pt"), reverse=True):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("config") == json.dumps(asdict(config)) and int(ckpt["epoch"]) > 0:
            return path
    return None
