"""UpconvNet: a learned decoder from a layer's code back to the image (Dosovitskiy & Brox 2016, "Inverting Visual
Representations with Convolutional Networks"; survey Sec. 5.2.2, Eq. 16-17).

Training (Eq. 16): ``theta* = argmin_theta sum_i ||x_i - D(Phi(x_i); theta)||^2`` over a set of images, with the
network ``Phi`` frozen (its features are extracted under the probe, detached); reconstruction (Eq. 17) is one
forward pass ``x* = D(Phi(x0))``.

The decoder ``D`` (:class:`UpconvNet`) is sized from the layer's output shape and the input size: a fully
connected code first goes through a linear layer to a small ``c x h0 x w0`` map; then convolutions with leaky ReLU
(slope 0.2) and ``k`` 2x upsampling stages, each either **unpool-conv** (every value placed in the top-left corner
of a 2x2 block of zeros, then a convolution; Dosovitskiy & Brox's "upconvolution") or a **transposed convolution**
(4x4, stride 2), halving the channels each stage; a last 3x3 convolution gives the image channels (three for
RGB, as many as the model's input has: one for a grayscale model).

Decoder contract (the generator DGN-AM uses): ``decoder(code)`` takes ``N x *decoder.code_shape`` (the raw output
of ``decoder.layer`` of the model, unscaled: the decoder divides by the feature RMS it measured when training,
``decoder.code_scale``) and returns ``N x C x H x W`` images (``C = 3`` for RGB) in the model's **input space**
(unbounded; pixels via ``decoder.pixels(code)``, clamped to [0, 1]). It is differentiable in the code.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import input_channels
from ..core.images import Preprocess
from ..core.io import atomic_write_bytes
from ..core.layers import resolve_layer
from ..core.model import model_name, model_preprocess
from ..core.probe import probe
from ..core.progress import progress_bar
from ..core.stream import layer_features
from ..errors import ConvscopeError, ModelLoadError
from .invert import InversionResult

UPSAMPLING = ("unpool", "transposed")
NORMS = ("none", "batch")
LEAK = 0.2
FORMAT = "convscope.upconv/1"


def unpool2x(x: torch.Tensor) -> torch.Tensor:
    """2x "unpooling" (Dosovitskiy & Brox 2016): each value goes to the top-left corner of a 2x2 block, zeros
    elsewhere. ``N x C x H x W`` -> ``N x C x 2H x 2W``."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h, 2, w, 2)
    out[:, :, :, 0, :, 0] = x
    return out.view(n, c, 2 * h, 2 * w)


class Unpool2x(nn.Module):
    """Module form of :func:`unpool2x`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpool2x(x)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAK)


class UpconvNet(nn.Module):
    """Decoder from ``code_shape`` (``(C,)`` or ``(C, h, w)``) to ``channels x image_size`` images in the model's
    input space (``channels``: the model's input channels, 3 for RGB); see the module docstring for the contract.

    ``upsample``: ``"unpool"`` (unpool + ``kernel`` x ``kernel`` conv) or ``"transposed"`` (4x4 stride-2 transposed
    conv). ``width``: channels of the last stage (doubling towards the code, at most ``max_width``).
    ``norm``: ``"none"`` (Dosovitskiy & Brox's decoders) or ``"batch"``: batch normalization (Ioffe & Szegedy 2015)
    after every hidden convolution, which makes a small decoder learn in hundreds rather than tens of thousands of
    steps (in eval mode it is a fixed affine map, so the decoder stays a deterministic function of the code).
    """

    code_scale: torch.Tensor  # buffer: 1 / the RMS of the training codes
    losses: list[float]  # mean training loss of each epoch (set by train_upconv / load_upconv)
    feature_losses: list[float]  # mean feature-space term of each epoch (train_upconv with feature_loss > 0)
    info: dict[str, Any]  # what a saved file says of its training (load_upconv; empty otherwise)

    def __init__(self, code_shape: tuple[int, ...], image_size: tuple[int, int], *, upsample: str = "unpool",
                 width: int = 16, max_width: int = 256, kernel: int = 3, layer: str = "", model_name: str = "",
                 mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0, 1.0, 1.0),
                 channels: int = 3, norm: str = "none") -> None:
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ConvscopeError(f"upsample={upsample!r}: use one of {', '.join(UPSAMPLING)}")
        if norm not in NORMS:
            raise ConvscopeError(f"norm={norm!r}: use one of {', '.join(NORMS)}")
        if len(code_shape) not in (1, 3) or len(image_size) != 2:
            raise ConvscopeError(f"UpconvNet: code_shape {code_shape} must be (C,) or (C, h, w), image_size (H, W)")
        if width < 1 or kernel < 1 or kernel % 2 == 0:
            raise ConvscopeError(f"UpconvNet: width={width} must be >= 1 and kernel={kernel} odd")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConvscopeError(f"UpconvNet: channels={channels!r} must be the model's input channel count (3: RGB)")
        self.code_shape = tuple(int(c) for c in code_shape)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.layer, self.model_name = layer, model_name
        self.config = dict(code_shape=list(self.code_shape), image_size=list(self.image_size), upsample=upsample,
                           width=width, max_width=max_width, kernel=kernel, layer=layer, model_name=model_name,
                           mean=list(mean), std=list(std), channels=channels, norm=norm)
        self.preprocess = Preprocess(mean=tuple(mean), std=tuple(std))
        H, W = self.image_size
        if len(code_shape) == 1:  # a fully connected code: start from a small map (about 4..7 px)
            k = max(0, int(math.floor(math.log2(min(H, W) / 4))))
            h0, w0 = math.ceil(H / 2**k), math.ceil(W / 2**k)
        else:
            h0, w0 = self.code_shape[1:]
            k = max(0, round(math.log2(max(H / h0, W / w0))))
        chans = [min(max_width, width * 2**(k - i)) for i in range(k + 1)]  # channels at each resolution
        c0 = chans[0]

        def act(c: int) -> list[nn.Module]:  # (batch norm,) leaky ReLU after a hidden convolution
            return [nn.BatchNorm2d(c), _act()] if norm == "batch" else [_act()]

        if len(code_shape) == 1:
            self.stem: nn.Module = nn.Sequential(nn.Linear(self.code_shape[0], c0 * h0 * w0), _act(),
                                                 nn.Unflatten(1, (c0, h0, w0)))
        else:
            self.stem = nn.Sequential(nn.Conv2d(self.code_shape[0], c0, 3, padding=1), *act(c0))
        layers: list[nn.Module] = [nn.Conv2d(c0, c0, 3, padding=1), *act(c0)]
        for i in range(k):
            if upsample == "unpool":
                layers += [Unpool2x(), nn.Conv2d(chans[i], chans[i + 1], kernel, padding=kernel // 2),
                           *act(chans[i + 1])]
            else:
                layers += [nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1), *act(chans[i + 1])]
        layers.append(nn.Conv2d(chans[-1], channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.out_size = (h0 * 2**k, w0 * 2**k)
        self.register_buffer("code_scale", torch.ones(()))
        self.losses, self.feature_losses, self.info = [], [], {}

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        if tuple(code.shape[1:]) != self.code_shape:
            raise ConvscopeError(f"this decoder takes codes of shape N x {self.code_shape} (layer {self.layer!r} at "
                                 f"{self.image_size[0]} x {self.image_size[1]} px), got {tuple(code.shape)}; train "
                                 "one for this layer and image size with train_upconv")
        y = self.body(self.stem(code * self.code_scale))
        if self.out_size != self.image_size:
            y = F.interpolate(y, size=self.image_size, mode="bilinear", align_corners=False)
        return y

    def pixels(self, code: torch.Tensor) -> torch.Tensor:
        """The decoded images as pixels in [0, 1] (RGB for an RGB model)."""
        return self.preprocess.denormalize(self(code)).clamp(0, 1)


# --------------------------------------------------------------------------- training


Images = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


def _batches(images: Images, batch_size: int, gen: torch.Generator
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One epoch of ``(batch, positions in the tensor or None)``: a shuffled tensor, or the stream (a callable is
    called once per epoch)."""
    if isinstance(images, torch.Tensor):
        order = torch.randperm(images.shape[0], generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield images[idx], idx
        return
    stream = images() if callable(images) else images
    for b in stream:
        if not isinstance(b, torch.Tensor) or b.dim() != 4:
            raise ConvscopeError("an image stream must yield N x C x H x W tensors in the model's input space")
        yield b, None


def augment_batch(x: torch.Tensor, gen: torch.Generator, flip: bool = True, crop: int = 8) -> torch.Tensor:
    """Random horizontal flips and random crops (reflect-pad by ``crop`` px, crop back to the size), per image."""
    n, _, h, w = x.shape
    if flip:
        f = torch.rand(n, generator=gen) < 0.5
        x = torch.where(f.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    if crop > 0:
        p = F.pad(x, (crop, crop, crop, crop), mode="reflect")
        off = torch.randint(0, 2 * crop + 1, (n, 2), generator=gen)
        x = torch.stack([p[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(off.tolist())])
    return x


def train_upconv(
    model: nn.Module, layer: str, images: Images, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 32,
    augment: bool = True, crop: int = 8, upsample: str = "unpool", width: int = 16, max_width: int = 256,
    kernel: int = 3, norm: str = "none", feature_loss: float = 0.0, feature_layer: str | None = None, seed: int = 0,
    out: str | os.PathLike[str] | None = None, progress: bool | None = None, preprocess: Preprocess | None = None,
) -> UpconvNet:
    """Train an :class:`UpconvNet` to invert ``layer`` (Dosovitskiy & Brox 2016, survey Eq. 16): Adam on the mean
    squared error ``||x - D(Phi(x))||^2`` in the model's input space, ``Phi`` frozen; with ``feature_loss=lambda``
    also the feature-space loss of Dosovitskiy & Brox 2016b ("Generating images with perceptual similarity metrics",
    Eq. 2, the comparator being the model itself, as for Nguyen et al.'s DGN-AM generator):

        L = mean (D(h) - x)^2 + lambda * mean (C(D(h)) - C(x))^2 / s^2,   h = Phi(x),

    ``C`` the output of ``feature_layer`` (default: ``layer``), ``s^2`` its mean square on the first batch (so the
    term starts near 1 whatever the layer's scale). The adversarial term of 2016b is not implemented.

    Args:
        images: ``N x C x H x W`` in the model's input space (shuffled each epoch), an iterable of such batches
            (a generator is used up after one epoch: pass a callable returning a fresh one for several epochs).
            Without ``augment``, a tensor's codes (and comparator features) are computed once, before the first
            epoch, rather than in every step (same numbers; memory: N codes).
        augment: random horizontal flips and crops (``crop`` px reflect-padded shifts) before the features.
        upsample, width, max_width, kernel, norm: the decoder's shape (:class:`UpconvNet`).
        feature_loss, feature_layer: weight ``lambda`` (>= 0; 0: pixel loss only, as before) and the comparator
            layer ``C``; each step then also runs the model to ``feature_layer`` on ``D(h)`` with gradients (about
            one forward + backward of the model per image).
        seed: decoder initialization, shuffling and augmentation.
        out: a checkpoint path, written atomically after every epoch (config + weights), for :func:`load_upconv`.
        progress: a bar over the epochs with an ETA: ``True``, ``False``, or ``None`` (default: once training has
            run 2 s).
    Returns the decoder (eval mode) with ``decoder.losses``: the mean training loss ``L`` of each epoch, and
    ``decoder.feature_losses``: the mean feature term (before ``lambda``) of each epoch (empty without it).
    """
    name = resolve_layer(model, layer)[0]
    if not isinstance(epochs, int) or epochs < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"epochs={epochs!r}, batch_size={batch_size!r}: use positive ints")
    if not lr > 0:
        raise ConvscopeError(f"lr={lr!r}: the learning rate must be > 0")
    if not (isinstance(feature_loss, int | float) and feature_loss >= 0 and math.isfinite(feature_loss)):
        raise ConvscopeError(f"feature_loss={feature_loss!r}: use a finite weight >= 0 (0: pixel loss only)")
    comparator = resolve_layer(model, feature_layer)[0] if feature_layer is not None else name
    use_features = feature_loss > 0
    names = list(dict.fromkeys([name, comparator] if use_features else [name]))
    channels = input_channels(model)
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or images.shape[1] != channels or images.shape[0] == 0):
        raise ConvscopeError(f"images must be N x {channels} x H x W in the model's input space, got "
                             f"{tuple(images.shape)}")
    pre = model_preprocess(model, preprocess)
    gen = torch.Generator().manual_seed(seed)
    cache: dict[str, torch.Tensor] | None = None
    if not augment and isinstance(images, torch.Tensor):  # the targets do not change between epochs
        parts = [layer_features(model, images[s:s + batch_size].detach(), names)
                 for s in range(0, images.shape[0], batch_size)]
        cache = {n: torch.cat([part[n] for part in parts]) for n in names}
    decoder: UpconvNet | None = None
    opt: torch.optim.Optimizer | None = None
    losses: list[float] = []
    feature_losses: list[float] = []
    feature_scale = 1.0
    net_name = model_name(model)
    bar = progress_bar(range(epochs), desc=f"upconv {name}", unit="epoch", progress=progress, leave=False)
    for _ in bar:
        total, total_feat, count = 0.0, 0.0, 0
        for xb, idx in _batches(images, batch_size, gen):
            xb = xb.detach()
            if augment:
                xb = augment_batch(xb, gen, crop=crop)
            if cache is not None and idx is not None:
                targets = {n: cache[n][idx] for n in names}
            else:
                targets = layer_features(model, xb, names)
            feats = targets[name]
            if decoder is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    decoder = UpconvNet(tuple(feats.shape[1:]), (int(xb.shape[-2]), int(xb.shape[-1])),
                                        upsample=upsample, width=width, max_width=max_width, kernel=kernel,
                                        layer=name, model_name=net_name, norm=norm,
                                        mean=pre.mean, std=pre.std, channels=int(xb.shape[1]))
                decoder.to(xb.device, xb.dtype)
                decoder.code_scale.fill_(1.0 / float(feats.pow(2).mean().sqrt().clamp_min(1e-8)))
                feature_scale = 1.0 / float(targets[comparator].pow(2).mean().clamp_min(1e-12))
                opt = torch.optim.Adam(decoder.parameters(), lr=lr)
            decoder.train()
            y = decoder(feats)
            loss = F.mse_loss(y, xb)
            if use_features:
                with probe(model, [comparator], stop_early=True) as p:  # frozen, eval mode, restored after
                    p.forward(model, y)
                    feat = F.mse_loss(p.activations[comparator], targets[comparator]) * feature_scale
                loss = loss + feature_loss * feat
                total_feat += float(feat.detach()) * xb.shape[0]
            assert opt is not None  # made with the decoder
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
        if decoder is None:
            raise ConvscopeError("train_upconv got no images; pass a tensor or a non-empty stream of batches")
        losses.append(total / max(count, 1))
        if use_features:
            feature_losses.append(total_feat / max(count, 1))
        decoder.losses = list(losses)
        decoder.feature_losses = list(feature_losses)
        decoder.eval()
        if out is not None:
            save_upconv(decoder, out)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    assert decoder is not None
    return decoder.eval()


# --------------------------------------------------------------------------- checkpoints


def save_upconv(decoder: UpconvNet, path: str | os.PathLike[str], dtype: torch.dtype | None = None,
                info: dict[str, Any] | None = None) -> Path:
    """Write the decoder's config and weights to ``path`` atomically (``torch.save`` of plain data).

    ``dtype``: store floating-point weights in this type (``torch.float16`` halves the file; :func:`load_upconv`
    loads them back into float32). ``info``: plain JSON-like data kept with the file (e.g. how it was trained)."""
    def cast(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "config": dict(decoder.config), "losses": list(getattr(decoder, "losses", [])),
                "feature_losses": list(getattr(decoder, "feature_losses", [])), "info": dict(info or {}),
                "state_dict": {k: cast(v) for k, v in decoder.state_dict().items()}}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_upconv(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> UpconvNet:
    """Rebuild a decoder saved by :func:`train_upconv` / :func:`save_upconv` (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"decoder file {str(p)!r} does not exist; train one with train_upconv(..., out=PATH)")
    try:
        ckpt: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read decoder file {str(p)!r} ({type(exc).__name__}: {exc}); it must be "
                             "written by train_upconv(..., out=PATH)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelLoadError(f"{str(p)!r} is not a convscope UpconvNet checkpoint; write one with "
                             "train_upconv(..., out=PATH)")
    cfg = dict(ckpt["config"])
    decoder = UpconvNet(tuple(cfg.pop("code_shape")), tuple(cfg.pop("image_size")),
                        mean=tuple(cfg.pop("mean")), std=tuple(cfg.pop("std")), **cfg)
    decoder.load_state_dict(ckpt["state_dict"])  # float16 weights are copied into the float32 parameters
    decoder.losses = list(ckpt.get("losses", []))
    decoder.feature_losses = list(ckpt.get("feature_losses", []))
    decoder.info = dict(ckpt.get("info", {}))
    return decoder.to(device).eval()


BUNDLED = {"demo_net": "dgn_demo_net.pt"}  # zoo model -> bundled generator in convscope/models/weights


def load_generator(name: str = "demo_net", device: str | torch.device = "cpu") -> UpconvNet:
    """The bundled DGN-AM generator (an :class:`UpconvNet`) for the zoo model ``name``: for ``"demo_net"``, decoding
    ``features.pool5`` codes (128 x 7 x 7) to 112 px images, trained with pixel + feature-space loss by
    ``docs/make_dgn_figure.py --train`` (``decoder.info`` says how)."""
    if name not in BUNDLED:
        raise ModelLoadError(f"no bundled generator for {name!r} (there is one for {', '.join(BUNDLED)}); train "
                             "one with train_upconv(model, layer, images, feature_loss=1.0, out=PATH)")
    path = resources.files("convscope.models").joinpath("weights", BUNDLED[name])
    if not path.is_file():
        raise ModelLoadError(f"the bundled generator {BUNDLED[name]} is missing from this install; rebuild it with "
                             "docs/make_dgn_figure.py --train")
    return load_upconv(Path(str(path)), device)


# --------------------------------------------------------------------------- reconstruction


def decode(decoder: UpconvNet, codes: torch.Tensor) -> torch.Tensor:
    """``D(codes)`` in the model's input space, without gradients (Eq. 17), e.g. for perturbed codes."""
    with torch.no_grad():
        return decoder(codes.to(decoder.code_scale))


def reconstruct(model: nn.Module, decoder: UpconvNet, x: torch.Tensor, error: bool = True) -> InversionResult:
    """Reconstruct ``x`` from the code of ``decoder.layer`` in one forward pass of the decoder (survey Eq. 17).

    ``error``: also measure the normalized feature reconstruction error ``||Phi(x*) - Phi(x)||^2 / ||Phi(x)||^2``
    (one more forward pass of the model), comparable with :func:`~convscope.methods.invert.invert`'s.
    """
    if not isinstance(decoder, UpconvNet):
        raise ConvscopeError(f"decoder must be an UpconvNet (train_upconv / load_upconv), not {type(decoder).__name__}")
    name = resolve_layer(model, decoder.layer)[0]
    x = x.detach()
    phi0 = layer_features(model, x, name)[name]
    xr = decode(decoder, phi0)
    if error:
        phi = layer_features(model, xr, [name])[name]
        err = (phi - phi0).pow(2).flatten(1).sum(1) / phi0.pow(2).flatten(1).sum(1).clamp_min(1e-12)
    else:
        err = torch.full((x.shape[0],), float("nan"))
    return InversionResult(images=decoder.preprocess.denormalize(xr).clamp(0, 1), x=xr, error=err.cpu(),
                           layers=[name] * x.shape[0], image_index=torch.arange(x.shape[0]))
