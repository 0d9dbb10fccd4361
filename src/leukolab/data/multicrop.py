"""Multi-crop views for DINO: 2 global crops and ``n_local`` smaller local crops per image.

:class:`MultiCropViews` says which views: their sizes, count, crop scales and
colour-jitter strength; both transforms below take one.

:class:`MultiCropTransform` turns one PIL image into a list of normalised
tensors ``[global_1, global_2, local_1, ..., local_n]``; with
:class:`leukolab.data.dataset.ImageDataset` and the default collate a batch is
``([G1 (B,3,S,S), G2, L1 (B,3,s,s), ...], targets)``.

Augmentations follow DINO (Caron et al. 2021): random resized crops (global
scale (0.4, 1), local (0.1, 0.4)), flips -- vertical too, cells have no
orientation -- colour jitter (p 0.8), grey scale (p 0.2), Gaussian blur (p 1.0
on the first global crop, 0.1 on the second, 0.5 on local crops) and
solarisation (p 0.2, second global crop only). Blur kernel and sigma range are
scaled from DINO's 224 px values to the crop size.

:class:`BatchedMultiCrop` draws the same augmentations per sample but applies
them to a whole batch of square images in tensor ops, on the batch's device
(``dino.batched_crops``): the dataset then only resizes each image to a square
(:meth:`BatchedMultiCrop.base_transform`) and the objective makes the views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

from leukolab.data.transforms import MEAN, STD
from leukolab.errors import LeukolabError


@dataclass(frozen=True)
class MultiCropViews:
    """The multi-crop views of one image: 2 global crops of ``global_size`` px and ``n_local`` local crops of
    ``local_size`` px, random resized crops covering ``global_scale`` / ``local_scale`` (min, max) of the image
    area, with colour jitter of strength ``jitter`` (0: no colour jitter and no grey scale).

    Values are normalised on construction (ints, float tuples); bad values are one-line errors. The ``dino:``
    config section gives one (:attr:`leukolab.objectives.dino.DINOObjective.views`)."""

    global_size: int = 64
    local_size: int = 32
    n_local: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if int(self.n_local) < 0:
            raise LeukolabError(f"local crops {self.n_local} must be >= 0")
        for name, scale in (("global", self.global_scale), ("local", self.local_scale)):
            if len(scale) != 2 or not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0:
                raise LeukolabError(f"{name} crop scale {list(scale)} is invalid; expected [min, max] in (0, 1]")
        for name, value in (("global_size", int(self.global_size)), ("local_size", int(self.local_size)),
                            ("n_local", int(self.n_local)), ("jitter", float(self.jitter)),
                            ("global_scale", (float(self.global_scale[0]), float(self.global_scale[1]))),
                            ("local_scale", (float(self.local_scale[0]), float(self.local_scale[1])))):
            object.__setattr__(self, name, value)

    @property
    def n_views(self) -> int:
        """Views per image (2 global + local)."""
        return 2 + self.n_local


def _view(size: int, scale: Sequence[float], blur_p: float, solarize_p: float, jitter: float) -> v2.Compose:
    kernel = max(3, (size // 10) | 1)  # odd, ~10 % of the crop as in DINO (23 px at 224)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    if jitter > 0:
        steps += [
            v2.RandomApply([v2.ColorJitter(0.4 * jitter, 0.4 * jitter, 0.2 * jitter, 0.1 * jitter)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, max(0.2, 2.0 * size / 224)))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class MultiCropTransform:
    """PIL image -> ``[global_1, global_2, local_1, ..., local_n]`` normalised tensors, the ``views`` (default:
    :class:`MultiCropViews`' defaults) drawn with torchvision's v2 transforms."""

    def __init__(self, views: MultiCropViews | None = None) -> None:
        v = self.options = views if views is not None else MultiCropViews()
        self.global_1 = _view(v.global_size, v.global_scale, 1.0, 0.0, v.jitter)
        self.global_2 = _view(v.global_size, v.global_scale, 0.1, 0.2, v.jitter)
        self.local = _view(v.local_size, v.local_scale, 0.5, 0.0, v.jitter)

    @property
    def n_views(self) -> int:
        """Views per image (2 global + local)."""
        return self.options.n_views

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global_1(img), self.global_2(img), *(self.local(img) for _ in range(self.options.n_local))]


# --------------------------------------------------------------------------- batched multi-crop
# The same augmentations on a whole batch of square images at once, with per-sample random parameters, on the
# batch's device. torchvision's v2 transforms draw one parameter set per call (a whole batch would share one crop
# and one jitter) and kornia.augmentation is a large dependency for ~200 lines, hence this module. The crop uses
# torchvision.ops.roi_align, which averages ceil(crop / output) bilinear samples per output pixel and so
# antialiases downscaling like ``RandomResizedCrop(antialias=True)``.

#: ITU-R 601-2 luma weights, as torchvision's ``rgb_to_grayscale``
_LUMA = (0.2989, 0.587, 0.114)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luma of RGB ``x``."""
    r, g, b = x.unbind(1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB ``x`` in [0, 1] with its HSV hue rotated by ``shift`` (per sample, in turns)."""
    maxc, argmax = x.max(1)
    minc = x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h6 = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)  # hue in [0, 6)
    # HSV -> RGB: channel n in (r, g, b) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6 with n = 5, 3, 1
    k = torch.remainder(torch.stack((h6 + 5.0, h6 + 3.0, h6 + 1.0), 1), 6.0)
    return maxc.unsqueeze(1) * (1.0 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` clamped to [0, 1] (torchvision's ``_blend``), per-sample factors."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _shift_hue(x, f)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # torchvision's ColorJitter order, then permuted


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample (reflect padding, as torchvision's ``gaussian_blur``)."""
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    w = (w / w.sum(1, keepdim=True)).view(-1, kernel, 1, 1, 1)
    pad = kernel // 2
    for dim in (-1, -2):  # width, then height: shifted weighted sums, cheaper than a grouped conv on CPU
        padded = F.pad(x, (pad, pad, 0, 0) if dim == -1 else (0, 0, pad, pad), mode="reflect")
        n = x.shape[dim]
        x = sum(w[:, i] * padded.narrow(dim, i, n) for i in range(kernel))
    return x


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices (on ``device``) of the True entries of CPU ``mask``, or None when there are none."""
    idx = mask.nonzero().squeeze(1)
    return idx.to(device) if idx.numel() else None


@dataclass(frozen=True)
class _ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class BatchedMultiCrop:
    """A batch ``(B, 3, R, R)`` (float in [0, 1] or uint8, any device) -> ``[G1, G2, L1, ..., Ln]`` normalised.

    The ``views`` (a :class:`MultiCropViews`; default: its defaults) and augmentation distribution of
    :class:`MultiCropTransform`, with random parameters drawn per sample and per
    view and applied in batched tensor ops on the batch's device: random resized crop (``roi_align``, adaptive
    sampling, i.e. antialiased), horizontal and vertical flips, colour jitter (p 0.8, a random order per sample),
    grey scale (p 0.2), Gaussian blur with a per-sample sigma and solarisation. Every random number comes from
    torch's global CPU generator (then moved to the batch's device), so seeding the CPU generator makes the views
    repeatable, and the same seed gives the same crops on CPU and GPU. Crops are continuous (sub-pixel) boxes where
    torchvision rounds them to pixels. It holds no parameters; an objective keeps it as a plain attribute.

    ``base_size`` (default: twice the global size, which is what ``leukolab pretrain`` keeps in its image cache)
    is the side of the square images :meth:`base_transform` makes for the dataset; crops are taken from them.
    ``flips``, ``blur`` and ``solarize`` switch those steps off (for tests and ablations); ``jitter=0`` switches
    off colour jitter and grey scale, as in :class:`MultiCropTransform`.
    """

    def __init__(
        self,
        views: MultiCropViews | None = None,
        base_size: int | None = None,
        *,
        flips: bool = True,
        blur: bool = True,
        solarize: bool = True,
    ) -> None:
        v = self.options = views if views is not None else MultiCropViews()
        self.base_size = int(base_size) if base_size else 2 * v.global_size
        self.jitter, self.flips = v.jitter, bool(flips)
        self.views = [
            _ViewSpec(v.global_size, v.global_scale, 1.0 if blur else 0.0, 0.0),
            _ViewSpec(v.global_size, v.global_scale, 0.1 if blur else 0.0, 0.2 if solarize else 0.0),
            *[_ViewSpec(v.local_size, v.local_scale, 0.5 if blur else 0.0, 0.0)] * v.n_local,
        ]

    @property
    def n_views(self) -> int:
        """Views per image (2 global + local)."""
        return len(self.views)

    def base_transform(self) -> v2.Compose:
        """PIL image -> float tensor ``(3, R, R)`` in [0, 1], ``R = base_size`` (a square resize, antialiased)."""
        r = self.base_size
        return v2.Compose([v2.ToImage(), v2.Resize((r, r), antialias=True), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise LeukolabError(f"batched multi-crop got a tensor of shape {tuple(x.shape)}; expected (B, 3, H, W)")
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() / 255.0 if not x.is_floating_point() else x.float()
            mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
            return [(self._view(x, spec) - mean) / std for spec in self.views]

    # ------------------------------------------------------------------ the steps of one view
    @staticmethod
    def crop_boxes(n: int, height: int, width: int, scale: Sequence[float]) -> torch.Tensor:
        """``(n, 4)`` random resized crop boxes ``(x0, y0, x1, y1)`` in pixels, drawn with the CPU generator.

        ``RandomResizedCrop.get_params`` for every sample at once: up to 10 tries of an area share in ``scale``
        and a log-uniform aspect ratio in [3/4, 4/3], the first that fits, else the centre crop with the aspect
        ratio clamped to that range; the position is uniform.
        """
        area = float(height * width)
        target = torch.empty(n, 10).uniform_(float(scale[0]), float(scale[1])) * area
        aspect = torch.exp(torch.empty(n, 10).uniform_(math.log(_RATIO[0]), math.log(_RATIO[1])))
        w, h = torch.sqrt(target * aspect), torch.sqrt(target / aspect)
        fits = (w <= width) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)
        w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)
        ratio = width / height
        fw = float(width) if ratio <= _RATIO[1] else height * _RATIO[1]
        fh = float(height) if ratio >= _RATIO[0] else width / _RATIO[0]
        w, h = torch.where(found, w, torch.full_like(w, fw)), torch.where(found, h, torch.full_like(h, fh))
        pos = torch.rand(n, 2)
        pos = torch.where(found.unsqueeze(1), pos, torch.full_like(pos, 0.5))
        x0, y0 = pos[:, 0] * (width - w), pos[:, 1] * (height - h)
        return torch.stack((x0, y0, x0 + w, y0 + h), 1)

    def _view(self, x: torch.Tensor, spec: _ViewSpec) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        boxes = self.crop_boxes(n, x.shape[-2], x.shape[-1], spec.scale)
        rois = torch.cat((torch.arange(n, dtype=torch.float32).unsqueeze(1), boxes), 1).to(dev)
        out = roi_align(x, rois, (spec.size, spec.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if self.flips:
            flip = (torch.rand(n, 2) < 0.5).to(dev)
            out = torch.where(flip[:, 0].view(-1, 1, 1, 1), out.flip(-1), out)
            out = torch.where(flip[:, 1].view(-1, 1, 1, 1), out.flip(-2), out)
        if self.jitter > 0:
            out = self._colour(out)
        if spec.blur_p > 0:
            on = torch.rand(n) < spec.blur_p
            sigma = torch.empty(n).uniform_(0.1, max(0.2, 2.0 * spec.size / 224))
            rows = _rows(on, dev)
            if rows is not None:
                kernel = max(3, (spec.size // 10) | 1)
                out.index_copy_(0, rows, _gaussian_blur(out[rows], sigma.to(dev)[rows], kernel))
        if spec.solarize_p > 0:
            on = (torch.rand(n) < spec.solarize_p).to(dev).view(-1, 1, 1, 1)
            out = torch.where(on & (out >= 128 / 255), 1.0 - out, out)
        return out

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter (p 0.8, per-sample factors and order) then RandomGrayscale (p 0.2), as in DINO."""
        n, dev, j = x.shape[0], x.device, self.jitter
        on = torch.rand(n) < 0.8
        order = torch.rand(n, 4).argsort(1)  # a uniform random permutation of the four ops per sample
        lows = torch.tensor([max(0.0, 1 - 0.4 * j), max(0.0, 1 - 0.4 * j), max(0.0, 1 - 0.2 * j), -min(0.5, 0.1 * j)])
        highs = torch.tensor([1 + 0.4 * j, 1 + 0.4 * j, 1 + 0.2 * j, min(0.5, 0.1 * j)])
        factors = (lows + (highs - lows) * torch.rand(n, 4)).to(dev)
        for slot in range(4):
            for op, fn in enumerate(_JITTER_OPS):
                rows = _rows(on & (order[:, slot] == op), dev)
                if rows is not None:
                    x.index_copy_(0, rows, fn(x[rows], factors[rows, op]))
        grey = (torch.rand(n) < 0.2).to(dev).view(-1, 1, 1, 1)
        return torch.where(grey, _gray(x).expand_as(x), x)
