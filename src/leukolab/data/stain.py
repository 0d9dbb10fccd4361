"""Stain augmentation and stain normalisation for cell images from other labs' microscopes and stains.

Two kinds of tools, both on PIL RGB images (numpy inside, no BLAS threads; under 2 ms per 128 px image):

* **Augmentations** for training (random; the draws come from ``torch.rand`` so ``torch.manual_seed``
  controls them, as for torchvision transforms):
  :class:`HEDJitter` scales and shifts each stain's concentration in optical density (the "HED"
  augmentation of Tellez et al. 2018/2019), and :class:`RandomDegrade` blurs and/or down-and-up scales
  (other cameras are less sharp).
* **Normalisers** that map an image's colours onto a reference's (train and test time alike):
  :class:`ReinhardNormaliser` (per-channel mean/std matching in CIE L*a*b*, Reinhard et al. 2001) and
  :class:`MacenkoNormaliser` (stain vectors and concentrations estimated from the optical density,
  Macenko et al. 2009). Both follow :class:`StainNormaliser`: ``fit(images)``, ``__call__(img)``,
  ``state()`` (YAML-safe floats and lists, stored in a run) and ``from_state(d)``.
  :func:`build_normaliser` builds one by name (``none`` | ``reinhard`` | ``macenko``).

Why not a library: scikit-image has ``rgb2hed``/``rgb2lab`` but is a large dependency for a 3x3 matrix and
a colour formula; torchstain/staintools carry their own backends (and staintools needs SPAMS). The few
lines here follow scikit-image's ``rgb2hed`` (Ruifrok & Johnston's matrix) and torchstain's Macenko
(``alpha=1, beta=0.15``) and are pinned to their formulas by tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageFilter

from leukolab.data.readers import list_images
from leukolab.errors import LeukolabError

__all__ = [
    "HED_FROM_RGB",
    "NORMALISERS",
    "RGB_FROM_HED",
    "HEDJitter",
    "MacenkoNormaliser",
    "RandomDegrade",
    "ReinhardNormaliser",
    "StainNormaliser",
    "build_normaliser",
    "hed_to_rgb",
    "lab_to_rgb",
    "rgb_to_hed",
    "rgb_to_lab",
]

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as scikit-image
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
#: its inverse: optical density (row vectors) -> stain concentrations
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_LUT = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)).astype(np.float32)  # log of each uint8 level
_LOG1_LUT = np.log(np.arange(256) + 1.0).astype(np.float32)  # log(I + 1) of each uint8 level

ImageLike = Image.Image | np.ndarray | str | Path


# --------------------------------------------------------------------------- colour spaces (numpy)
def _as_rgb_array(img: ImageLike) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image, an array or an image path."""
    if isinstance(img, (str, Path)):
        try:
            with Image.open(img) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise LeukolabError(f"{img}: cannot read it as an image ({exc.__class__.__name__})") from None
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise LeukolabError(f"stain: expected an RGB image (H, W, 3), got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def _rows(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x @ m`` for many pixel rows ``x`` (N, k) and a small matrix ``m`` (k, j), in float32, without BLAS
    (whose threads cost more than they save on a few thousand rows in a data-loader worker)."""
    m = np.asarray(m, dtype=np.float32)
    cols = [x[:, i] for i in range(m.shape[0])]
    out = np.empty((x.shape[0], m.shape[1]), dtype=np.float32)
    for j in range(m.shape[1]):
        acc = cols[0] * m[0, j]
        for i in range(1, m.shape[0]):
            acc += cols[i] * m[i, j]
        out[:, j] = acc
    return out


def _to_pil(arr: np.ndarray) -> Image.Image:
    """A PIL RGB image of a float (H, W, 3) array in 0..255 (rounded, clipped)."""
    arr = np.asarray(arr, dtype=np.float32) + 0.5
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations (H, W, 3: haematoxylin, eosin, DAB) of a uint8 RGB image, in optical density.

    ``-log(max(rgb / 255, 1e-6)) @ HED_FROM_RGB``: scikit-image's ``rgb2hed`` before version 0.19 (which the
    HED-augmentation papers and code used), not clipped at 0 so :func:`hed_to_rgb` inverts it exactly.
    scikit-image >= 0.19 divides by ``-log(1e-6)`` (about 13.8), in which units a bias of 0.05 is 14x stronger.
    """
    x = np.maximum(np.asarray(rgb, dtype=np.float64) / 255.0, 1e-6)
    return -np.log(x) @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """The float RGB image (0..255, not rounded) of stain concentrations from :func:`rgb_to_hed`."""
    log_rgb = -np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED
    return np.clip(np.exp(log_rgb), 0.0, 1.0) * 255.0


# sRGB (D65) <-> CIE L*a*b*, as scikit-image's rgb2lab / lab2rgb
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_LAB_IN = (_XYZ_FROM_RGB.T / _WHITE).astype(np.float32)  # linear RGB rows -> XYZ / white
_LAB_OUT = (_WHITE[:, None] * _RGB_FROM_XYZ.T).astype(np.float32)  # XYZ / white rows -> linear RGB
_x = np.arange(256) / 255.0
_LINEAR_LUT = np.where(_x > 0.04045, ((_x + 0.055) / 1.055) ** 2.4, _x / 12.92).astype(np.float32)
_x = np.linspace(0.0, 1.0, 65536)  # linear -> sRGB 0..255 in steps finer than 0.06 grey levels
_SRGB_LUT = (np.where(_x > 0.0031308, 1.055 * _x ** (1 / 2.4) - 0.055, 12.92 * _x) * 255.0).astype(np.float32)
del _x


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of a uint8 RGB image (or float 0..255): L in 0..100."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        lin = _LINEAR_LUT[rgb]
    else:
        x = rgb.astype(np.float32) / 255.0
        lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    shape = lin.shape
    xyz = _rows(lin.reshape(-1, 3), _LAB_IN)
    cbrt = np.exp(np.log(np.maximum(xyz, 1e-6)) * np.float32(1.0 / 3.0))  # float32 exp/log: 4x faster than np.cbrt
    f = np.where(xyz > 0.008856, cbrt, 7.787 * xyz + 16.0 / 116.0)
    lab = np.empty(f.shape, dtype=np.float32)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab.reshape(shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """The float RGB image (0..255, clipped, not rounded) of a CIE L*a*b* (D65) image."""
    lab = np.asarray(lab, dtype=np.float32)
    shape = lab.shape
    lab = lab.reshape(-1, 3)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    f = np.maximum(f, 0.0)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    lin = np.clip(_rows(xyz, _LAB_OUT), 0.0, 1.0)
    return _SRGB_LUT[(lin * (len(_SRGB_LUT) - 1) + 0.5).astype(np.int32)].reshape(shape)


# --------------------------------------------------------------------------- augmentations
def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    value = float(value)
    if not (low <= value <= high):
        raise LeukolabError(f"{name} {value}: expected a number in [{low}, {high}]")
    return value


def _uniform(low: float, high: float, n: int = 1) -> np.ndarray:
    """``n`` draws of U(low, high) from torch's global generator (``torch.manual_seed`` controls them)."""
    return (low + (high - low) * torch.rand(n, dtype=torch.float64)).numpy()


class HEDJitter:
    """Random stain jitter in haematoxylin-eosin-DAB optical density (Tellez et al.'s HED augmentation).

    With probability ``p``, each stain channel's concentration (:func:`rgb_to_hed`) is multiplied by
    U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias) (optical density units, as in Tellez et al.:
    0.05 / 0.05 is their "HED-light"), then mixed back to RGB. ``sigma = bias = 0`` is the identity.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0) -> None:
        self.sigma = _check_fraction("HEDJitter sigma", sigma)
        self.bias = _check_fraction("HEDJitter bias", bias)
        self.p = _check_fraction("HEDJitter p", p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < 1.0 and float(torch.rand(1)) >= self.p:
            return img
        alpha = _uniform(1.0 - self.sigma, 1.0 + self.sigma, 3)
        beta = _uniform(-self.bias, self.bias, 3)
        # hed_to_rgb(rgb_to_hed(x) * alpha + beta) as one linear map of log(x): 3x3 matrix and offset (float32)
        mix = (HED_FROM_RGB * alpha[None, :]) @ RGB_FROM_HED
        offset = -beta @ RGB_FROM_HED
        rgb = _as_rgb_array(img)
        log_rgb = _rows(_LOG_LUT[rgb.reshape(-1, 3)], mix) + offset.astype(np.float32)
        return _to_pil((np.exp(np.minimum(log_rgb, 0.0)) * 255.0).reshape(rgb.shape))

    def __repr__(self) -> str:
        return f"HEDJitter(sigma={self.sigma}, bias={self.bias}, p={self.p})"


class RandomDegrade:
    """With probability ``p``, make an image look like it came from a less sharp microscope camera.

    One of three, equally likely: a Gaussian blur of radius U(0.3, ``max_blur``) px; a downscale by a
    factor U(``min_scale``, 1) and back up (bilinear, so detail finer than the smaller size is lost);
    or both (down-up scaling, then the blur). The size of the image never changes.

    The blur radius is in pixels of a :attr:`REFERENCE_SIDE` (128) px image and scales with the image's
    shorter side, so the same setting degrades a 360 px PBC crop before resizing as much as its 128 px
    version. Measured (Laplacian std at 128 px): PBC 16.9, BCCD's typed-WBC crops 4.5; PBC blurred by
    radius 1.5 gives 3.9, down-up by 0.5 gives 5.2 and by 0.35 gives 4.4, so the defaults span the gap.
    """

    #: image side (px) at which ``max_blur`` is the blur radius in pixels
    REFERENCE_SIDE = 128

    def __init__(self, p: float = 0.5, max_blur: float = 1.5, min_scale: float = 0.5) -> None:
        self.p = _check_fraction("RandomDegrade p", p)
        self.max_blur = _check_fraction("RandomDegrade max_blur", max_blur, 0.0, 10.0)
        self.min_scale = _check_fraction("RandomDegrade min_scale", min_scale, 0.05, 1.0)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0.0 or float(torch.rand(1)) >= self.p:
            return img
        mode = int(torch.randint(0, 3, (1,)))  # 0 blur, 1 scale, 2 both
        out = img if img.mode == "RGB" else img.convert("RGB")
        if mode in (1, 2) and self.min_scale < 1.0:
            f = float(_uniform(self.min_scale, 1.0)[0])
            w, h = out.size
            small = out.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR,
                               reducing_gap=None)
            out = small.resize((w, h), Image.Resampling.BILINEAR)
        if mode in (0, 2) and self.max_blur > 0.0:
            radius = float(_uniform(min(0.3, self.max_blur), self.max_blur)[0]) * min(out.size) / self.REFERENCE_SIDE
            out = out.filter(ImageFilter.GaussianBlur(radius))
        return out

    def __repr__(self) -> str:
        return f"RandomDegrade(p={self.p}, max_blur={self.max_blur}, min_scale={self.min_scale})"


# --------------------------------------------------------------------------- normalisers
@runtime_checkable
class StainNormaliser(Protocol):
    """Maps an image's stain colours onto a reference's; fitted once, stored in a run as :meth:`state`."""

    name: str

    def fit(self, images: ImageLike | Iterable[ImageLike]) -> StainNormaliser:
        """Estimate the reference from one image or many (PIL images, arrays, image paths, or a folder: every
        image below it; cost grows with pixels, about 2 ms per 128 px image); returns self."""
        ...

    def __call__(self, img: Image.Image) -> Image.Image:
        """``img`` (PIL RGB) with the reference's colours (PIL RGB, same size)."""
        ...

    def state(self) -> dict[str, Any]:
        """The fitted reference as plain floats and lists (YAML-safe)."""
        ...

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> StainNormaliser:
        """A fitted normaliser from :meth:`state`'s dict."""
        ...


def _image_list(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """The reference images: one image, a folder (every image below it), or an iterable of them."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        out: list[ImageLike] = list(list_images(Path(images)))
        if not out:
            raise LeukolabError(f"stain reference {images}: no image files in this folder; expected cell images")
        return out
    if isinstance(images, (Image.Image, np.ndarray, str, Path)):
        return [images]
    out = list(images)
    if not out:
        raise LeukolabError("stain normaliser: fit() was given no images; expected at least one reference image")
    return out


def _floats(d: dict[str, Any], key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        arr = np.asarray(d[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise LeukolabError(f"{what} state: {key!r} missing or not numbers; expected a list of shape {shape}") \
            from None
    if arr.shape != shape or not np.isfinite(arr).all():
        raise LeukolabError(f"{what} state: {key!r} has shape {arr.shape}; expected finite numbers of shape {shape}")
    return arr


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of (N, 3) values (one contiguous row per channel: faster than axis-0 sums)."""
    cols = np.ascontiguousarray(x.T, dtype=np.float64)
    n = max(x.shape[0], 1)
    mean = cols.sum(axis=1) / n
    var = (cols * cols).sum(axis=1) / n - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


class ReinhardNormaliser:
    """Reinhard et al.'s colour transfer: match each CIE L*a*b* channel's mean and std to the reference's.

    ``fit`` pools the pixels of all reference images. An image (or reference) whose channel has no spread
    keeps that channel's offset only (scale 1).
    """

    name = "reinhard"

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    def fit(self, images: ImageLike | Iterable[ImageLike]) -> ReinhardNormaliser:
        n, s, ss = 0, np.zeros(3), np.zeros(3)
        for img in _image_list(images):
            lab = rgb_to_lab(_as_rgb_array(img)).reshape(-1, 3).astype(np.float64)
            n += lab.shape[0]
            s += lab.sum(axis=0)
            ss += (lab**2).sum(axis=0)
        self.mean = s / n
        self.std = np.sqrt(np.maximum(ss / n - self.mean**2, 0.0))
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise LeukolabError("reinhard normaliser is not fitted; call fit(reference images) or from_state(...)")
        return self.mean, self.std

    def __call__(self, img: Image.Image) -> Image.Image:
        ref_mean, ref_std = self._check()
        rgb = _as_rgb_array(img)
        lab = rgb_to_lab(rgb).reshape(-1, 3)
        mean, std = _mean_std(lab)
        scale = np.where(std > 1e-6, ref_std / np.maximum(std, 1e-6), 1.0)
        shift = ref_mean - mean * scale
        return _to_pil(lab_to_rgb(lab * scale.astype(np.float32) + shift.astype(np.float32)).reshape(rgb.shape))

    def state(self) -> dict[str, Any]:
        mean, std = self._check()
        return {"method": self.name, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> ReinhardNormaliser:
        _check_method(d, cls.name)
        return cls(_floats(d, "mean", (3,), cls.name), _floats(d, "std", (3,), cls.name))

    def __repr__(self) -> str:
        return f"ReinhardNormaliser(fitted={self.mean is not None})"


class MacenkoNormaliser:
    """Macenko et al.'s stain normalisation: two stain vectors from the optical density, concentrations rescaled.

    For an image: its background colour ``io`` (per channel: the mean of its brightest 5 % of pixels, the
    plasma between cells; or a fixed grey level ``io`` as in torchstain); optical density
    ``OD = -log((I + 1) / (io + 1))``; pixels whose OD vector is shorter than ``beta`` (nearly transparent)
    are left out; the OD's two main eigenvectors span the stain plane; the ``alpha``-th and
    ``100 - alpha``-th percentiles of the pixels' angle in that plane give the two stain vectors (the first
    the one with the larger red OD); concentrations by least squares (negative ones set to 0), their 99th
    percentiles the image's maximum concentrations. Normalising pairs the image's two stain vectors with the
    reference's (the pairing with the larger summed cosine), re-mixes the image's concentrations, scaled to the
    reference's maxima, with the reference's stain vectors over the reference's background colour; the OD
    outside the stain plane (noise, texture) is kept, so the reference maps onto itself. ``fit`` on many
    images takes the median of their estimates (the same estimator as for each image normalised, so the two
    agree); images that give none are skipped. An image with too few stained pixels (a flat or blank image)
    is returned unchanged.

    Three departures from torchstain's Macenko, each needed on blood smears (seen on BCCD crops normalised to
    PBC): the background is estimated per image (``io=None``, the default; cameras white-balance differently,
    BCCD's plasma is grey-blue and PBC's peach, and with a fixed ``io`` that difference is read as stain);
    "transparent" is a short OD vector, not any channel below ``beta`` (BCCD nuclei absorb almost no blue and
    were all left out, so the nucleus stain was never found); and the stains are paired by direction, not by
    their red OD (BCCD's two extremes are nucleus and orange red cells, PBC's a grey-blue and a magenta).
    Limitation: any third colour is forced onto the two reference stains, so eosinophil granules lose their
    orange; :class:`ReinhardNormaliser` keeps it.
    """

    name = "macenko"
    #: fewest stained pixels to estimate an image's stains from
    MIN_PIXELS = 16
    #: the fraction of brightest pixels whose mean colour is an image's background
    BRIGHT = 0.05
    #: pixels (a regular subsample) an image's background, stains and maxima are estimated from
    MAX_ESTIMATE = 4096

    def __init__(
        self, stain_matrix: Sequence[Sequence[float]] | None = None, max_conc: Sequence[float] | None = None,
        background: Sequence[float] | None = None, io: float | None = None, alpha: float = 1.0, beta: float = 0.15,
    ) -> None:
        self.stain_matrix = None if stain_matrix is None else np.asarray(stain_matrix, dtype=np.float64)
        self.max_conc = None if max_conc is None else np.asarray(max_conc, dtype=np.float64)
        self.background = None if background is None else np.asarray(background, dtype=np.float64)
        self.io = None if io is None else _check_fraction("macenko io", io, 1.0, 255.0)
        self.alpha = _check_fraction("macenko alpha", alpha, 0.0, 49.0)
        self.beta = _check_fraction("macenko beta", beta, 0.0, 5.0)

    def _background(self, flat: np.ndarray) -> np.ndarray:
        """The background colour (3,) of (N, 3) uint8 pixels: their brightest pixels' mean, or ``io``."""
        if self.io is not None:
            return np.full(3, self.io)
        flat = flat[:: max(1, len(flat) // self.MAX_ESTIMATE)]
        lum = flat.sum(axis=1, dtype=np.int32)
        k = max(1, int(len(lum) * self.BRIGHT))
        top = np.argpartition(lum, len(lum) - k)[len(lum) - k:]
        return np.maximum(flat[top].mean(axis=0), 1.0)

    def _od(self, flat: np.ndarray, background: np.ndarray) -> np.ndarray:
        """Optical density (N, 3) float32 of (N, 3) uint8 pixels against ``background``."""
        return np.log(background + 1.0).astype(np.float32) - _LOG1_LUT[flat]  # OD = log(bg + 1) - log(I + 1)

    def _stains(self, od: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(stain matrix (3, 2), max concentrations (2,)) of OD pixels, or None where they cannot tell."""
        od = od[:: max(1, len(od) // self.MAX_ESTIMATE)]  # a regular subsample is as good, and faster
        od_hat = od[np.einsum("ij,ij->i", od, od) >= self.beta**2]
        if od_hat.shape[0] < self.MIN_PIXELS:
            return None
        cov = np.cov(od_hat, rowvar=False)
        if not np.isfinite(cov).all():
            return None
        _, vecs = np.linalg.eigh(cov)
        plane = vecs[:, 1:3]  # the two largest eigenvalues' vectors
        t = od_hat @ plane
        phi = np.arctan2(t[:, 1], t[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        v_lo = plane @ np.array([math.cos(lo), math.sin(lo)])
        v_hi = plane @ np.array([math.cos(hi), math.sin(hi)])
        he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
        he = he * np.where(he.sum(axis=0) < 0, -1.0, 1.0)  # eigenvectors have no sign: point them into OD > 0
        norms = np.linalg.norm(he, axis=0)
        if (norms < 1e-8).any():
            return None
        he = he / norms
        if abs(float(he[:, 0] @ he[:, 1])) > 0.9999:  # one stain only: the plane is not identified
            return None
        conc = np.linalg.pinv(he) @ od.T  # least squares, (2, N)
        max_conc = np.percentile(conc, 99, axis=1)
        if not (np.isfinite(max_conc).all() and (max_conc > 1e-6).all()):
            return None
        return he, max_conc

    def fit(self, images: ImageLike | Iterable[ImageLike]) -> MacenkoNormaliser:
        hes, maxes, backgrounds = [], [], []
        for img in _image_list(images):
            flat = _as_rgb_array(img).reshape(-1, 3)
            bg = self._background(flat)
            found = self._stains(self._od(flat, bg))
            if found is not None:
                hes.append(found[0])
                maxes.append(found[1])
                backgrounds.append(bg)
        if not hes:
            raise LeukolabError("macenko normaliser: the reference images have too few stained pixels to estimate "
                                f"two stains (optical density >= {self.beta}); expected stained cell images")
        he = np.median(hes, axis=0)
        self.stain_matrix = he / np.linalg.norm(he, axis=0)
        self.max_conc = np.median(maxes, axis=0)
        self.background = np.median(backgrounds, axis=0)
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.stain_matrix is None or self.max_conc is None or self.background is None:
            raise LeukolabError("macenko normaliser is not fitted; call fit(reference images) or from_state(...)")
        return self.stain_matrix, self.max_conc, self.background

    def __call__(self, img: Image.Image) -> Image.Image:
        ref_he, ref_max, ref_bg = self._check()
        rgb = _as_rgb_array(img)
        flat = rgb.reshape(-1, 3)
        od = self._od(flat, self._background(flat))
        found = self._stains(od)
        if found is None:  # flat / blank image: nothing to normalise
            return img if isinstance(img, Image.Image) else _to_pil(rgb)
        he, max_conc = found
        if np.trace(ref_he.T @ he[:, ::-1]) > np.trace(ref_he.T @ he):  # pair each stain with the closer reference
            he, max_conc = he[:, ::-1], max_conc[::-1]
        # concentrations (least squares, no negative stain), scaled to the reference's maxima, re-mixed; the
        # OD outside the stain plane (noise, texture; Macenko drops it) is kept so a reference maps to itself
        conc = _rows(od, np.linalg.pinv(he).T)  # (N, 2)
        np.maximum(conc, 0.0, out=conc)
        # out OD = mapped + residual = conc @ (scaled ref stains) + (od - conc @ he.T)
        swap = ((ref_max / max_conc)[:, None] * ref_he.T) - he.T
        log_out = (np.log(ref_bg + 1.0).astype(np.float32) - od) - _rows(conc, swap)
        return _to_pil((np.exp(log_out) - 1.0).reshape(rgb.shape))

    def state(self) -> dict[str, Any]:
        he, max_conc, bg = self._check()
        return {"method": self.name, "stain_matrix": [[float(v) for v in row] for row in he],
                "max_conc": [float(v) for v in max_conc], "background": [float(v) for v in bg],
                "io": self.io, "alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> MacenkoNormaliser:
        _check_method(d, cls.name)
        extra: dict[str, Any] = {}
        for key in ("io", "alpha", "beta"):
            if d.get(key) is not None:
                try:
                    extra[key] = float(d[key])
                except (TypeError, ValueError):
                    raise LeukolabError(f"macenko state: {key!r} = {d[key]!r}; expected a number") from None
        return cls(_floats(d, "stain_matrix", (3, 2), cls.name), _floats(d, "max_conc", (2,), cls.name),
                   _floats(d, "background", (3,), cls.name), **extra)

    def __repr__(self) -> str:
        return f"MacenkoNormaliser(fitted={self.stain_matrix is not None})"


def _check_method(d: Any, name: str) -> None:
    if not isinstance(d, dict):
        raise LeukolabError(f"{name} state: expected a mapping, got {type(d).__name__}")
    method = d.get("method", name)
    if method != name:
        raise LeukolabError(f"{name} state: it was written by the {method!r} normaliser; expected {name!r}")


#: stain normalisers by name (``none``: no normalisation)
NORMALISERS: dict[str, type] = {"reinhard": ReinhardNormaliser, "macenko": MacenkoNormaliser}


def build_normaliser(name: str, state: dict[str, Any] | None = None) -> StainNormaliser | None:
    """The normaliser called ``name`` (``none`` -> None), fitted from ``state`` when given, else unfitted."""
    key = str(name).strip().lower()
    if key == "none":
        return None
    if key not in NORMALISERS:
        raise LeukolabError(f"stain normalisation {name!r} is unknown; expected one of none, "
                            f"{', '.join(NORMALISERS)}")
    cls = NORMALISERS[key]
    return cls() if state is None else cls.from_state(state)
