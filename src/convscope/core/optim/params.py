"""Parametrizations of the optimized images (N images, each row its own): free pixels (:class:`PixelImage`), the
decorrelated Fourier parametrization of Olah et al. 2017 (:class:`FourierImage`), or a frozen generator's output
from learnable codes (:class:`GeneratorImage`, DGN-AM, Nguyen et al. 2016); their specs (:class:`Pixel`,
:class:`Fourier`, :class:`GeneratorParam`), :func:`make_param`, and the per-image random generators
(:func:`make_generators`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConvscopeError
from ..images import Preprocess
from ..probe import preserved_state

PIXEL_NOISE_STD = 10 / 255  # Yosinski et al.'s "mean_plus_rand" start: N(0, 10) on the 0..255 pixel scale
FOURIER_NOISE_STD = 0.01  # Olah et al. 2017 (Lucid's fft_image default sd)
# Square root of the colour covariance of ImageNet, as an SVD (Olah et al. 2017; Lucid's color_correlation_svd_sqrt)
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))

Generators = list[torch.Generator]
Seed = int | Sequence[int] | torch.Generator


def centre_rgb(pre: Preprocess) -> tuple[float, float, float]:
    """The neutral image every regularizer pulls towards: the preprocess mean colour, mid-grey for a model fed raw
    RGB in [0, 1] (zero mean)."""
    m = pre.mean
    return (float(m[0]), float(m[1]), float(m[2])) if any(v != 0 for v in m) else (0.5, 0.5, 0.5)


class ImageParam(nn.Module):
    """N images as learnable parameters; ``forward()`` returns them in the model's input space.

    Every parameter has the batch as its first dimension (row i belongs to image i only).
    """

    projectable = False  # True when projection regularizers may edit ``self.delta`` (pixel parametrizations)
    centre_rgb: torch.Tensor  # buffers: the centre image as RGB and in the model's input space, 1 x 3 x 1 x 1
    centre_input: torch.Tensor

    def __init__(self, pre: Preprocess, like: torch.Tensor) -> None:
        super().__init__()
        self.pre = pre
        c = torch.tensor(centre_rgb(pre), dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        self.register_buffer("centre_rgb", c, persistent=False)
        self.register_buffer("centre_input", pre.normalize(c), persistent=False)

    def pixels(self) -> torch.Tensor:
        """The images as RGB in [0, 1] (``N x 3 x H x W``)."""
        return self.pre.denormalize(self()).clamp(0, 1)

    def clamp_(self) -> None:
        """Keep the images inside the valid pixel range (a projection after each step)."""


class PixelImage(ImageParam):
    """Free pixels: ``x = c + delta`` with ``delta`` in the model's input space (``space="input"``) or in RGB
    (``space="rgb"``, mapped through ``preprocess.normalize``). Kept in the valid pixel box [0, 1] after each step.
    """

    projectable = True
    lo: torch.Tensor  # buffers: the valid box of ``delta``
    hi: torch.Tensor

    def __init__(self, x: torch.Tensor, pre: Preprocess, space: str = "input") -> None:
        """``x``: the start images in the model's input space."""
        if space not in ("input", "rgb"):
            raise ConvscopeError(f"PixelImage(space={space!r}): use 'input' (the model's input space) or 'rgb'")
        super().__init__(pre, x)
        self.space = space
        zero, one = torch.zeros_like(self.centre_rgb), torch.ones_like(self.centre_rgb)
        if space == "input":
            self.register_buffer("lo", pre.normalize(zero) - self.centre_input, persistent=False)
            self.register_buffer("hi", pre.normalize(one) - self.centre_input, persistent=False)
            delta = x - self.centre_input
        else:
            self.register_buffer("lo", zero - self.centre_rgb, persistent=False)
            self.register_buffer("hi", one - self.centre_rgb, persistent=False)
            delta = pre.denormalize(x) - self.centre_rgb
        lo, hi = torch.minimum(self.lo, self.hi), torch.maximum(self.lo, self.hi)  # a negative std flips the box
        self.lo, self.hi = lo, hi
        self.delta = nn.Parameter(delta.detach().clone().clamp(lo, hi))

    def forward(self) -> torch.Tensor:
        if self.space == "input":
            return self.centre_input + self.delta
        return self.pre.normalize(self.centre_rgb + self.delta)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.delta.clamp_(self.lo, self.hi)  # in place: no temporary batch


def fft_frequencies(h: int, w: int) -> torch.Tensor:
    """``h x (w // 2 + 1)`` spatial frequency magnitudes of ``torch.fft.rfft2`` (cycles per pixel)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(ImageParam):
    """Decorrelated Fourier parametrization (Olah et al. 2017; Lucid's ``fft_image`` + ``to_valid_rgb``).

    ``rgb = sigmoid(C · IFFT2(s ⊙ S) / 4)`` with ``S`` the learnable complex spectrum (``N x 3 x H x W//2+1``),
    ``s_f = 1 / max(|f|, 1 / max(H, W)) ** decay_power`` (the 1/f spectrum of natural images: every frequency gets a
    similar effective learning rate), an orthonormal inverse FFT, and ``C`` the normalized square root of ImageNet's
    colour covariance (``decorrelate=True``), which decorrelates the colour channels. The output is always in (0, 1).
    """

    scale: torch.Tensor  # buffers: the 1/f spectrum scale and the colour matrix C
    color: torch.Tensor

    def __init__(self, spectrum: torch.Tensor, size: tuple[int, int], pre: Preprocess, decay_power: float = 1.0,
                 decorrelate: bool = True) -> None:
        """``spectrum``: ``N x 3 x H x (W//2+1) x 2`` (real and imaginary parts)."""
        super().__init__(pre, spectrum)
        h, w = size
        self.size = (h, w)
        self.decorrelate = decorrelate
        freqs = fft_frequencies(h, w)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power
        self.register_buffer("scale", scale.to(spectrum), persistent=False)
        m = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
        m = m / m.norm(dim=0).max()
        self.register_buffer("color", m.to(spectrum), persistent=False)
        self.spectrum = nn.Parameter(spectrum.detach().clone())

    @classmethod
    def from_pixels(cls, rgb: torch.Tensor, pre: Preprocess, decay_power: float = 1.0, decorrelate: bool = True,
                    eps: float = 1e-4) -> FourierImage:
        """The parametrization whose images are ``rgb`` (``N x 3 x H x W`` in [0, 1], clipped to [eps, 1 - eps])."""
        h, w = rgb.shape[-2:]
        param = cls(torch.zeros(rgb.shape[0], 3, h, w // 2 + 1, 2, dtype=rgb.dtype, device=rgb.device), (h, w), pre,
                    decay_power, decorrelate)
        z = torch.logit(rgb.clamp(eps, 1 - eps))
        if decorrelate:
            z = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(param.color), z)
        spec = torch.fft.rfft2(z * 4.0, norm="ortho") / param.scale
        with torch.no_grad():
            param.spectrum.copy_(torch.view_as_real(spec))
        return param

    def pixels(self) -> torch.Tensor:
        img = torch.fft.irfft2(torch.view_as_complex(self.spectrum) * self.scale, s=self.size, norm="ortho") / 4.0
        if self.decorrelate:
            img = torch.einsum("cd,ndhw->nchw", self.color, img)
        return torch.sigmoid(img)

    def forward(self) -> torch.Tensor:
        return self.pre.normalize(self.pixels())


@dataclass(frozen=True)
class Pixel:
    """Spec of :class:`PixelImage`: ``space="input"`` (the model's input space) or ``"rgb"``."""

    space: str = "input"

    def build(self, init: str | torch.Tensor, n: int, size: tuple[int, int], pre: Preprocess,
              generators: Generators, like: torch.Tensor) -> ImageParam:
        if isinstance(init, torch.Tensor):
            return PixelImage(init.to(like), pre, self.space)
        c = torch.tensor(centre_rgb(pre), dtype=like.dtype).view(3, 1, 1)
        if init == "mean":
            rgb = c.expand(n, 3, *size)
        else:  # noise around the centre, one draw per image from its own generator
            rgb = torch.stack([c + PIXEL_NOISE_STD * torch.randn(3, *size, generator=g, dtype=like.dtype)
                               for g in generators])
        return PixelImage(pre.normalize(rgb.to(like.device)), pre, self.space)


@dataclass(frozen=True)
class Fourier:
    """Spec of :class:`FourierImage`."""

    decay_power: float = 1.0
    decorrelate: bool = True

    def build(self, init: str | torch.Tensor, n: int, size: tuple[int, int], pre: Preprocess,
              generators: Generators, like: torch.Tensor) -> ImageParam:
        if isinstance(init, torch.Tensor):
            return FourierImage.from_pixels(pre.denormalize(init.to(like)).clamp(0, 1), pre, self.decay_power,
                                            self.decorrelate)
        if init == "mean":
            rgb = torch.tensor(centre_rgb(pre), dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
            return FourierImage.from_pixels(rgb.expand(n, 3, *size), pre, self.decay_power, self.decorrelate)
        h, w = size
        spec = torch.stack([FOURIER_NOISE_STD * torch.randn(3, h, w // 2 + 1, 2, generator=g, dtype=like.dtype)
                            for g in generators])
        return FourierImage(spec.to(like.device), size, pre, self.decay_power, self.decorrelate)


GENERATOR_OUTPUTS = ("rgb", "input")
CODE_NOISE_STD = 1.0  # init="noise" for codes: N(0, 1) per entry


class GeneratorImage(ImageParam):
    """Images made by a frozen generator from learnable codes: ``x = G(h)`` (Nguyen et al. 2016, "Synthesizing the
    preferred inputs for neurons via deep generator networks"; survey Eq. 10). Only the codes ``h`` (``N x
    code_shape``) are optimized.

    ``output="rgb"``: ``G`` outputs RGB in [0, 1], mapped through the model's ``preprocess``; ``"input"``: ``G``
    outputs the model's input space directly (e.g. a decoder trained on preprocessed images). The output is clipped
    to the valid pixel box, as Nguyen et al. clip the generated image. ``code_range=(lo, hi)`` clips the codes after
    each step (their bound on the code, e.g. ``(0, max)`` for codes that are ReLU features).

    The generator is never registered as a submodule (its parameters are not the optimizer's), and every call runs
    it under :func:`~convscope.core.probe.preserved_state`: eval mode, parameters frozen, restored right after; no
    hooks. Gradients reach the codes only.
    """

    generator: nn.Module  # set with object.__setattr__: not a submodule
    lo: torch.Tensor  # buffers: the valid pixel box in the model's input space
    hi: torch.Tensor

    def __init__(self, generator: nn.Module, code: torch.Tensor, pre: Preprocess, output: str = "rgb",
                 code_range: tuple[float, float] | None = None) -> None:
        if output not in GENERATOR_OUTPUTS:
            raise ConvscopeError(f"generator output={output!r}: use 'rgb' (G gives RGB in [0, 1]) or 'input' (G "
                                 "gives the model's input space)")
        if not isinstance(generator, nn.Module):
            raise ConvscopeError(f"generator must be an nn.Module mapping codes to images, not "
                                 f"{type(generator).__name__}; load one with torch.load or cs.load_model")
        if not isinstance(code, torch.Tensor) or not code.is_floating_point() or code.dim() < 2:
            raise ConvscopeError("codes must be a float tensor N x code_shape")
        super().__init__(pre, code)
        object.__setattr__(self, "generator", generator)  # not a submodule: its parameters are not optimized
        self.output = output
        self.code_range = None if code_range is None else (float(code_range[0]), float(code_range[1]))
        if self.code_range is not None and not self.code_range[0] < self.code_range[1]:
            raise ConvscopeError(f"code_range={code_range!r}: give (low, high) with low < high")
        zero, one = torch.zeros_like(self.centre_rgb), torch.ones_like(self.centre_rgb)
        lo, hi = pre.normalize(zero), pre.normalize(one)
        self.register_buffer("lo", torch.minimum(lo, hi), persistent=False)
        self.register_buffer("hi", torch.maximum(lo, hi), persistent=False)
        self.code = nn.Parameter(code.detach().clone())
        self.clamp_()

    def generate(self) -> torch.Tensor:
        """``G(h)`` as the generator returns it (checked: ``N x 3 x H x W`` floats)."""
        with preserved_state(self.generator):
            out = self.generator(self.code)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[:2] != (self.code.shape[0], 3):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConvscopeError(f"the generator must map codes {tuple(self.code.shape)} to images "
                                 f"{self.code.shape[0]} x 3 x H x W; it returned {shape}")
        return out

    def forward(self) -> torch.Tensor:
        g = self.generate()
        if self.output == "rgb":
            return self.pre.normalize(g.clamp(0, 1))
        return torch.maximum(torch.minimum(g, self.hi), self.lo)

    def clamp_(self) -> None:
        if self.code_range is not None:
            with torch.no_grad():
                self.code.clamp_(*self.code_range)


@dataclass(frozen=True, eq=False)
class GeneratorParam:
    """Spec of :class:`GeneratorImage`: images ``G(h)`` from codes of shape ``code_shape`` (without the batch).

    ``init``: ``"zeros"`` (also ``"mean"``), ``"noise"`` (N(0, 1) per entry, one draw per image from its own
    generator) or a code tensor (``code_shape`` for all images, or ``N x code_shape``), e.g. the features of a real
    image at the layer an UpconvNet decoder inverts.
    """

    generator: nn.Module
    code_shape: tuple[int, ...]
    output: str = "rgb"
    code_range: tuple[float, float] | None = None

    def build(self, init: str | torch.Tensor, n: int, size: tuple[int, int], pre: Preprocess,
              generators: Generators, like: torch.Tensor) -> GeneratorImage:
        shape = tuple(int(s) for s in self.code_shape)
        if isinstance(init, torch.Tensor):
            code = init.to(like) if init.is_floating_point() else init
            if tuple(code.shape) == shape:
                code = code.unsqueeze(0).expand(n, *shape)
            if not code.is_floating_point() or tuple(code.shape) not in ((n, *shape), (1, *shape)):
                raise ConvscopeError(f"code init of shape {tuple(init.shape)}: give {shape} or {n} x {shape} floats "
                                     "(the generator's code shape)")
            code = code.expand(n, *shape)
        elif init in ("zeros", "mean"):
            code = torch.zeros(n, *shape, dtype=like.dtype, device=like.device)
        elif init == "noise":
            code = torch.stack([CODE_NOISE_STD * torch.randn(*shape, generator=g, dtype=like.dtype)
                                for g in generators]).to(like.device)
        else:
            raise ConvscopeError(f"code init={init!r}: use 'zeros', 'noise' or a tensor of codes {shape}")
        return GeneratorImage(self.generator, code, pre, self.output, self.code_range)


PARAMETRIZATIONS: dict[str, Pixel | Fourier] = {"pixel": Pixel("input"), "rgb": Pixel("rgb"), "fourier": Fourier()}
ParamSpec = str | Pixel | Fourier | GeneratorParam


def make_param(spec: ParamSpec, init: str | torch.Tensor, n: int, size: tuple[int, int], pre: Preprocess,
               generators: Generators, like: torch.Tensor) -> ImageParam:
    """Build the parametrization of ``n`` images of ``size`` started at ``init`` ("noise", "mean" or a tensor in
    the model's input space, ``N x 3 x H x W`` or ``3 x H x W``); for a :class:`GeneratorParam`, ``init`` is the
    codes' start ("zeros", "noise" or a code tensor) and ``size`` is the generator's business."""
    if isinstance(spec, GeneratorParam):
        return spec.build(init, n, size, pre, generators, like)
    if isinstance(spec, str):
        if spec not in PARAMETRIZATIONS:
            raise ConvscopeError(f"parametrization={spec!r}: use one of {', '.join(PARAMETRIZATIONS)}, or "
                                 "Pixel(space=...) / Fourier(decay_power=..., decorrelate=...)")
        spec = PARAMETRIZATIONS[spec]
    if not isinstance(spec, Pixel | Fourier):
        raise ConvscopeError(f"parametrization must be a name or Pixel(...)/Fourier(...), not {type(spec).__name__}")
    if isinstance(init, torch.Tensor):
        if init.dim() == 3:
            init = init.unsqueeze(0).expand(n, *init.shape)
        if init.dim() != 4 or init.shape[1] != 3 or init.shape[0] not in (1, n) or not init.is_floating_point():
            raise ConvscopeError(f"init tensor of shape {tuple(init.shape)}: give 3 x H x W or {n} x 3 x H x W floats "
                                 "in the model's input space (e.g. from cs.load_images(paths, model))")
        init = init.detach().expand(n, *init.shape[1:])
    elif init not in ("noise", "mean"):
        raise ConvscopeError(f"init={init!r}: use 'noise', 'mean' or a tensor in the model's input space")
    return spec.build(init, n, size, pre, generators, like)


def make_generators(seed: Seed, n: int, offset: int = 0) -> Generators:
    """One CPU generator per image: ``seed + offset + i`` for an int, the given seeds for a sequence, or the one
    generator you pass shared by all images (then a batch no longer equals its images run one at a time)."""
    if isinstance(seed, torch.Generator):
        return [seed] * n
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [torch.Generator().manual_seed(seed + offset + i) for i in range(n)]
    seeds = [] if isinstance(seed, bool) else list(seed)
    if len(seeds) != n or not all(isinstance(s, int) for s in seeds):
        raise ConvscopeError(f"seed: give an int, a torch.Generator or {n} ints (one per image), got {seed!r}")
    return [torch.Generator().manual_seed(s) for s in seeds]

