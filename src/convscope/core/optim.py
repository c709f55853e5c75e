"""The shared image-optimization loop: activation maximization, fooling images and (later) network inversion.

An image batch of N pictures is optimized jointly, one forward and one backward pass per step for all of them::

    x = param()                          # parametrization -> N x C x H x W in the model's input space
    x~ = T(x)                            # transforms drawn at random each step (jitter, scale): robustness
    J_i = objective_i(model(x~)) - sum_r penalty_r(x_i - c)        # c: the centre image (the data mean)
    update the parameters by Adam or plain gradient ascent on sum_i J_i
    x <- projection_r(x, dJ/dx, step) for each projection regularizer, then keep x in the valid pixel box

Pieces, each replaceable:

* **Objective** (:class:`Objective`): a function of the captured activations returning one value per image, with
  the layers it reads (so only those are hooked, and the forward pass stops after the deepest one). Objectives form
  a small algebra (``+``, ``-``, ``*`` scalar) as in Lucid (Olah et al. 2017).
* **Parametrization** (:class:`PixelImage`, :class:`FourierImage`): pixels in the model's input space or in RGB
  mapped through the model's ``preprocess``; or the decorrelated Fourier parametrization of Olah et al. 2017
  ("Feature Visualization", Distill, section "Preconditioning and Parameterization"): 1/f-scaled spectrum, optional
  colour decorrelation, sigmoid to RGB.
  Or the image made by a frozen generator from a learnable code (:class:`GeneratorImage` / :class:`GeneratorParam`,
  DGN-AM, Nguyen et al. 2016; survey Eq. 10), with :class:`CodePenalty` as the L2 prior on the code.
* **Transforms** (:class:`Jitter`, :class:`RandomScale`): differentiable random shifts / zooms applied before each
  forward pass (Mordvintsev et al. 2015; Olah et al. 2017, "Transformation robustness").
* **Regularizers**: penalties added to the loss (:class:`L2Penalty`, Simonyan et al. 2014 Eq. 1; :class:`AlphaNorm`
  and :class:`TotalVariation`, Mahendran & Vedaldi 2015 Eq. 3-4) or projections
  applied to the image after each step (:class:`Decay`, :class:`Blur`, :class:`ClipNorm`,
  :class:`ClipContribution`, Yosinski et al. 2015 Sec. 3; survey Eq. 9).

Randomness comes from one ``torch.Generator`` per image (seeded ``seed + i``), so a batch of units gives the same
pictures as optimizing each unit alone with its own seed. The model runs under :func:`~convscope.core.probe.probe`:
eval mode, parameters frozen (the backward pass computes the input gradient only), no hook left afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError
from .imageops import gaussian_blur
from .images import Preprocess
from .probe import Probe, preserved_state, probe
from .progress import progress_bar
from .stream import last_layer

OUTPUT = "@output"  # the layer name objectives use for the model's output (class logits)
OPTIMIZERS = ("adam", "sgd", "normalized")
PIXEL_NOISE_STD = 10 / 255  # Yosinski et al.'s "mean_plus_rand" start: N(0, 10) on the 0..255 pixel scale
FOURIER_NOISE_STD = 0.01  # Olah et al. 2017 (Lucid's fft_image default sd)
# Square root of the colour covariance of ImageNet, as an SVD (Olah et al. 2017; Lucid's color_correlation_svd_sqrt)
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))

Generators = list[torch.Generator]
Seed = int | Sequence[int] | torch.Generator


# --------------------------------------------------------------------------- objectives


class Objective:
    """One value per image from the activations of named layers (``acts[layer]``, ``acts[OUTPUT]`` the output).

    ``o1 + o2``, ``o1 - o2``, ``-o``, ``2.0 * o``, ``o / 2`` and ``sum([...])`` give new objectives that read the
    union of the layers.
    """

    __slots__ = ("fn", "layers", "name")

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], layers: Sequence[str],
                 name: str = "objective") -> None:
        self.fn = fn
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) + other(a), self.layers + other.layers, f"{self.name} + {other.name}")
        if _is_scalar(other):
            return Objective(lambda a: self(a) + other, self.layers, f"{self.name} + {other}")
        return NotImplemented

    def __radd__(self, other: object) -> Objective:
        return self if _is_scalar(other) and other == 0 else self.__add__(other)  # sum() starts from 0

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), self.layers, f"-({self.name})")

    def __sub__(self, other: object) -> Objective:
        if isinstance(other, Objective) or _is_scalar(other):
            return self + (-other)  # type: ignore[operator]
        return NotImplemented

    def __rsub__(self, other: object) -> Objective:
        return (-self) + other if _is_scalar(other) else NotImplemented

    def __mul__(self, k: object) -> Objective:
        if not _is_scalar(k):
            return NotImplemented
        return Objective(lambda a: k * self(a), self.layers, f"{k} * ({self.name})")  # type: ignore[operator]

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> Objective:
        return self * (1.0 / k) if _is_scalar(k) and k != 0 else NotImplemented  # type: ignore[operator]


def _is_scalar(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def activation_l2(layer: str) -> Objective:
    """``0.5 * ||A_layer(x)||_2^2`` per image: the squared L2 norm of a whole layer's activation, whose gradient
    at the layer is the activation itself (DeepDream's ``objective_L2``, Mordvintsev et al. 2015)."""
    def fn(acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * acts[layer].flatten(1).pow(2).sum(1)
    return Objective(fn, [layer], f"l2({layer!r})")


# --------------------------------------------------------------------------- parametrizations


def centre_rgb(pre: Preprocess) -> tuple[float, float, float]:
    """The neutral image every regularizer pulls towards: the preprocess mean colour, mid-grey for a model fed raw
    RGB in [0, 1] (zero mean)."""
    return pre.mean if any(m != 0 for m in pre.mean) else (0.5, 0.5, 0.5)


class ImageParam(nn.Module):
    """N images as learnable parameters; ``forward()`` returns them in the model's input space.

    Every parameter has the batch as its first dimension (row i belongs to image i only).
    """

    projectable = False  # True when projection regularizers may edit ``self.delta`` (pixel parametrizations)

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
            self.delta.copy_(self.delta.clamp(self.lo, self.hi))


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


PARAMETRIZATIONS = {"pixel": Pixel("input"), "rgb": Pixel("rgb"), "fourier": Fourier()}
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
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) for s in seeds):
        raise ConvscopeError(f"seed: give an int, a torch.Generator or {n} ints (one per image), got {seed!r}")
    return [torch.Generator().manual_seed(s) for s in seeds]


# --------------------------------------------------------------------------- transforms


class Transform(nn.Module):
    """A random, differentiable image transform applied before each forward pass (per image randomness)."""

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Jitter(Transform):
    """Shift each image by a random ``(dy, dx)`` in ``[-pixels, pixels]``, wrapping around (as ``torch.roll``)."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        if not isinstance(pixels, int) or pixels < 0:
            raise ConvscopeError(f"Jitter(pixels={pixels!r}): use an int >= 0")
        self.pixels = pixels

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:
        if self.pixels == 0:
            return x
        n, c, h, w = x.shape
        d = torch.stack([torch.randint(-self.pixels, self.pixels + 1, (2,), generator=g) for g in generators])
        d = d.to(x.device)
        iy = (torch.arange(h, device=x.device)[None] - d[:, :1]) % h  # out[y] = in[y - dy], as torch.roll
        ix = (torch.arange(w, device=x.device)[None] - d[:, 1:]) % w
        rows = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return x[rows, chans, iy[:, None, :, None], ix[:, None, None, :]]


class RandomScale(Transform):
    """Zoom each image by a factor drawn from ``scales`` (and rotate by up to ``degrees``) about its centre; output
    the same size, bilinear, reflected borders (Olah et al. 2017, "Transformation robustness")."""

    def __init__(self, scales: Sequence[float], degrees: float = 0.0) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ConvscopeError(f"RandomScale(scales={scales!r}): give positive factors, e.g. (0.95, 1.0, 1.05)")
        self.degrees = float(degrees)

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:
        n = x.shape[0]
        idx = [int(torch.randint(len(self.scales), (1,), generator=g)) for g in generators]
        ang = [(torch.rand(1, generator=g).item() * 2 - 1) * self.degrees if self.degrees else 0.0 for g in generators]
        theta = torch.zeros(n, 2, 3, dtype=x.dtype)
        for i, (k, a) in enumerate(zip(idx, ang)):
            s, r = self.scales[k], math.radians(a)
            theta[i, 0, 0], theta[i, 0, 1] = math.cos(r) / s, -math.sin(r) / s
            theta[i, 1, 0], theta[i, 1, 1] = math.sin(r) / s, math.cos(r) / s
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# --------------------------------------------------------------------------- regularizers


def decay(x: torch.Tensor, theta_decay: float) -> torch.Tensor:
    """L2 decay (Yosinski et al. 2015, Sec. 3): ``r(x) = (1 - theta_decay) x``."""
    return (1 - theta_decay) * x


def _percentile_rows(v: torch.Tensor, pct: float) -> torch.Tensor:
    """Per-row ``pct``-th percentile of ``N x M`` with linear interpolation (as ``numpy.percentile``), ``N x 1``.

    Sort-based: no size limit (``torch.quantile`` refuses more than 2^24 elements)."""
    s = v.sort(dim=1).values
    pos = pct / 100.0 * (s.shape[1] - 1)
    i0 = min(int(math.floor(pos)), s.shape[1] - 1)
    i1 = min(i0 + 1, s.shape[1] - 1)
    frac = pos - i0
    return (s[:, i0] + frac * (s[:, i1] - s[:, i0])).unsqueeze(1)


def clip_small_norm(x: torch.Tensor, theta_n_pct: float) -> torch.Tensor:
    """Zero the pixels whose norm over the channels is below the ``theta_n_pct`` percentile of the image
    (Yosinski et al. 2015, Sec. 3, "clipping pixels with small norm")."""
    norms = x.norm(dim=1).flatten(1)  # N x HW
    small = (norms < _percentile_rows(norms, theta_n_pct)).view(x.shape[0], 1, *x.shape[2:])
    return x.masked_fill(small, 0.0)


def clip_small_contribution(x: torch.Tensor, grad: torch.Tensor, theta_c_pct: float) -> torch.Tensor:
    """Zero the pixels whose contribution ``|sum_c x ⊙ dA/dx|`` (the linear estimate of how much the activation
    changes when the pixel is set to zero) is below the ``theta_c_pct`` percentile of the image (Yosinski et al.
    2015, Sec. 3, "clipping pixels with small contribution"; as their toolbox's ``px_abs_benefit_percentile``)."""
    contrib = (x * grad).sum(dim=1).abs().flatten(1)
    small = (contrib < _percentile_rows(contrib, theta_c_pct)).view(x.shape[0], 1, *x.shape[2:])
    return x.masked_fill(small, 0.0)


class Regularizer:
    """A penalty subtracted from the objective (``penalty``) and/or a projection applied after each step
    (``project``). Both see the image as its deviation from the centre image (mean colour), in input space."""

    projection = False

    def penalty(self, delta: torch.Tensor) -> torch.Tensor | None:
        """Per-image penalty ``N`` (differentiable), or None."""
        return None

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The new deviation after step ``step`` (0-based); ``grad`` is the step's gradient of the (penalized)
        objective w.r.t. ``delta``."""
        return delta


@dataclass(frozen=True)
class L2Penalty(Regularizer):
    """``lambda_l2 * ||x - c||^2`` per image (Simonyan et al. 2014, Eq. 1: ``S_c(I) - lambda ||I||_2^2`` on the
    mean-subtracted image)."""

    lambda_l2: float

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        return self.lambda_l2 * delta.pow(2).flatten(1).sum(1)


def alpha_norm(x: torch.Tensor, alpha: float = 6.0) -> torch.Tensor:
    """``||x||_alpha^alpha = sum_{c,i,j} |x_cij|^alpha`` per image, ``N`` (Mahendran & Vedaldi 2015, Eq. 3; survey
    Eq. 14)."""
    return x.abs().pow(alpha).flatten(1).sum(1)


def total_variation(x: torch.Tensor, beta: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """``TV_beta(x) = sum_{c,i,j} ((x_{c,i,j+1} - x_cij)^2 + (x_{c,i+1,j} - x_cij)^2)^(beta/2)`` per image, ``N``,
    over ``i < H-1, j < W-1`` (Mahendran & Vedaldi 2015, Eq. 4; survey Eq. 15). For ``beta < 2`` the squared
    gradient is clamped at ``eps`` so the gradient stays finite on flat regions."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    s = dx * dx + dy * dy
    if beta == 2:
        return s.flatten(1).sum(1)
    return s.clamp_min(eps).pow(beta / 2).flatten(1).sum(1)


@dataclass(frozen=True)
class AlphaNorm(Regularizer):
    """``lambda_alpha * ||x / B||_alpha^alpha / (H W)`` per image (Mahendran & Vedaldi 2015, Eq. 3 with the
    normalization of their Sec. 3.3): ``B`` is a typical pixel magnitude (in the units of ``x - c``, the deviation
    from the centre image), so ``lambda_alpha`` is dimensionless and transfers between models and image sizes. A
    large ``alpha`` (6) mostly penalizes the pixels that leave the typical range."""

    lambda_alpha: float
    alpha: float = 6.0
    B: float = 1.0

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        h, w = delta.shape[-2:]
        return self.lambda_alpha * alpha_norm(delta / self.B, self.alpha) / (h * w)


@dataclass(frozen=True)
class TotalVariation(Regularizer):
    """``lambda_tv * TV_beta(x / V) / (H W)`` per image (Mahendran & Vedaldi 2015, Eq. 4 with the normalization of
    their Sec. 3.3): ``V`` is a typical difference between neighbouring pixels (the paper's ``V = B / 6.5``), so
    ``lambda_tv`` is dimensionless. ``beta = 2`` smooths; ``beta = 1`` (classic TV) allows sharp edges."""

    lambda_tv: float
    beta: float = 2.0
    V: float = 1.0

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        h, w = delta.shape[-2:]
        return self.lambda_tv * total_variation(delta / self.V, self.beta) / (h * w)


@dataclass(frozen=True)
class Decay(Regularizer):
    """``x <- (1 - theta_decay) x`` after each step (Yosinski et al. 2015)."""

    theta_decay: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return decay(delta, self.theta_decay)


@dataclass(frozen=True)
class Blur(Regularizer):
    """Gaussian blur of width ``sigma`` pixels every ``every`` steps (steps 0, every, 2 every, ...; Yosinski et al.
    2015, theta_b_width and theta_b_every), with :func:`~convscope.core.imageops.gaussian_blur`."""

    sigma: float
    every: int = 1
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return gaussian_blur(delta, self.sigma) if step % self.every == 0 else delta


@dataclass(frozen=True)
class ClipNorm(Regularizer):
    """Zero pixels with norm below the ``theta_n_pct`` percentile, after each step (Yosinski et al. 2015)."""

    theta_n_pct: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return clip_small_norm(delta, self.theta_n_pct)


@dataclass(frozen=True)
class ClipContribution(Regularizer):
    """Zero pixels with contribution below the ``theta_c_pct`` percentile, after each step (Yosinski et al. 2015)."""

    theta_c_pct: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return clip_small_contribution(delta, grad, self.theta_c_pct)


class CodePenalty(Regularizer):
    """``lambda_code * ||h_i||^2`` per image on the codes of a :class:`GeneratorImage`: the L2 prior on the code of
    DGN-AM (Nguyen et al. 2016; survey Eq. 10, ``h* = argmax_h a_i(G(h)) - lambda ||h||``, squared here). It reads
    the codes of ``param``, not the image it is given."""

    def __init__(self, param: GeneratorImage, lambda_code: float) -> None:
        if not isinstance(param, GeneratorImage):
            raise ConvscopeError("CodePenalty needs the GeneratorImage whose codes it penalizes")
        if not lambda_code >= 0:
            raise ConvscopeError(f"lambda_code={lambda_code!r}: use a weight >= 0")
        self.param, self.lambda_code = param, float(lambda_code)

    def penalty(self, delta: torch.Tensor) -> torch.Tensor | None:
        if not self.lambda_code:
            return None
        return self.lambda_code * self.param.code.pow(2).flatten(1).sum(1)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class OptimResult:
    """What :func:`optimize_images` returns.

    ``x``: final images in the model's input space; ``images``: the same as RGB in [0, 1]; ``values``: the objective
    of each final (untransformed) image, ``N``; ``history``: the objective at every step (on the transformed images
    the step used), ``steps_run x N``; ``steps``: per image, the number of updates applied (fewer than ``steps`` when
    ``stop`` ended it early); ``output``: the model output on the final images when the objective reads it.
    """

    x: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    history: torch.Tensor
    steps: torch.Tensor
    output: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)


def _run(p: Probe, model: nn.Module, x: torch.Tensor, layers: Sequence[str], need_output: bool,
         ) -> dict[str, torch.Tensor]:
    p.clear()
    out = p.forward(model, x)
    acts = dict(p.activations)
    missing = [n for n in layers if n not in acts]
    if missing:
        raise ConvscopeError(f"layer(s) {', '.join(map(repr, missing))} did not run in the forward pass; pick a "
                             "layer from `convscope layers MODEL` that the model's forward() calls")
    if need_output:
        if not isinstance(out, torch.Tensor):
            raise ConvscopeError(f"the model returned {type(out).__name__}, not a tensor of logits; wrap it so "
                                 "forward() returns N x classes")
        acts[OUTPUT] = out
    return acts


def _check_objective(value: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConvscopeError(f"an objective must return one value per image, shape ({n},); got {shape}. Reduce over "
                             "units and space inside the objective (e.g. acts[layer][:, k].mean((1, 2)))")
    return value


def mean_abs_normalized(grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row (image) of ``grad`` divided by its mean absolute value, so a step of ``lr`` moves the pixels by
    ``lr`` on average (DeepDream's normalized ascent step, Mordvintsev et al. 2015)."""
    scale = grad.abs().flatten(1).mean(1).clamp_min(eps)
    return grad / scale.view(-1, *([1] * (grad.dim() - 1)))


def optimize_images(model: nn.Module, objective: Objective, param: ImageParam, *, steps: int, lr: float,
                    optimizer: str = "adam", transforms: Sequence[Transform] = (),
                    regularizers: Sequence[Regularizer] = (), generators: Generators | None = None,
                    stop: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                    progress: bool | None = None, desc: str = "optimize") -> OptimResult:
    """Ascend ``objective`` (one value per image) over the images of ``param`` for ``steps`` steps.

    One forward and one backward pass per step for the whole batch; the forward pass stops after the deepest layer
    the objective reads (unless it reads the output). ``optimizer``: ``"adam"`` (Kingma & Ba 2015) or ``"sgd"``,
    plain gradient ascent ``x <- x + lr * dJ/dx`` (survey Eq. 8), or ``"normalized"``: gradient ascent with each
    image's gradient divided by its mean absolute value (:func:`mean_abs_normalized`; DeepDream). ``stop(acts)``
    (on the untransformed images, before each update) returns a boolean ``N``: images for which it is true keep
    their current pixels from then on, and the loop ends when all are done. ``progress``: a bar with an ETA
    (``True``, ``False``, or ``None``: once the loop has run for 2 s;
    see :func:`~convscope.core.progress.progress_bar`).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ConvscopeError(f"steps={steps!r}: use an int >= 0")
    if not lr > 0:
        raise ConvscopeError(f"lr={lr!r}: the step size must be > 0")
    if optimizer not in OPTIMIZERS:
        raise ConvscopeError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    projections = [r for r in regularizers if r.projection]
    if projections and not param.projectable:
        names = ", ".join(type(r).__name__ for r in projections)
        raise ConvscopeError(f"{names} edit pixels after each step and need a pixel parametrization; use "
                             "parametrization='pixel' (or 'rgb'), or drop them (penalties and transforms work with "
                             "any parametrization)")
    with torch.no_grad():
        n = param().shape[0]
    generators = generators if generators is not None else make_generators(0, n)
    layers = [name for name in objective.layers if name != OUTPUT]
    need_output = OUTPUT in objective.layers
    if not layers and not need_output:
        raise ConvscopeError("the objective reads no layer; build it from channel(), neuron() or logit()")
    stop_after = None if need_output else last_layer(model, layers, param()[:1].detach())
    params = list(param.parameters())
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = opt_cls(params, lr=lr, maximize=True)
    done = torch.zeros(n, dtype=torch.bool)
    taken = torch.full((n,), steps, dtype=torch.long)
    history: list[torch.Tensor] = []
    with torch.enable_grad(), probe(model, layers, stop_after=stop_after) as p, \
            progress_bar(total=steps, desc=desc, unit="step", progress=progress, leave=False) as bar:
        for step in range(steps):
            x = param()
            xt = x
            for t in transforms:
                xt = t(xt, generators)
            acts = _run(p, model, xt, layers, need_output)
            value = _check_objective(objective(acts), n)
            if stop is not None:
                if transforms:
                    with torch.no_grad():
                        clean = _run(p, model, x.detach(), layers, need_output)
                else:
                    clean = {k: v.detach() for k, v in acts.items()}
                now = stop(clean).detach().cpu().bool() & ~done
                taken[now] = step
                done |= now
                if bool(done.all()):
                    break
            loss = value
            for r in regularizers:
                pen = r.penalty(x - param.centre_input)
                if pen is not None:
                    loss = loss - pen
            grads = torch.autograd.grad(loss.sum(), params)
            history.append(value.detach())
            keep = [q.detach()[done.to(q.device)].clone() for q in params] if bool(done.any()) else None
            for q, g in zip(params, grads):
                q.grad = mean_abs_normalized(g) if optimizer == "normalized" else g
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                if projections:
                    delta = param.delta
                    for r in projections:
                        delta = r.project(delta, grads[0], step)
                    param.delta.copy_(delta)
                param.clamp_()
                if keep is not None:
                    for q, k in zip(params, keep):
                        q[done.to(q.device)] = k
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(objective=f"{float(value.detach().mean()):.3g}", refresh=False)
            bar.update(1)
        with torch.no_grad():
            x = param().detach()
            acts = _run(p, model, x, layers, need_output)
            values = _check_objective(objective(acts), n).detach()
            if stop is not None:
                now = stop(acts).detach().cpu().bool() & ~done
                taken[now] = len(history)
                done |= now
        acts = {k: v.detach() for k, v in acts.items()}
    hist = torch.stack(history) if history else torch.zeros(0, n)
    if stop is not None:
        taken[~done] = -1
    return OptimResult(x=x, images=param.pixels().detach(), values=values, history=hist, steps=taken,
                       output=acts.get(OUTPUT), activations={k: v for k, v in acts.items() if k != OUTPUT})
