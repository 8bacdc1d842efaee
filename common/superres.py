"""Edge super-resolution: anchored neighbourhood regression (A+), pure numpy + OpenCV.

A "regression-based neighbourhood reconstruction method" names no single
algorithm; we implement the best-known one of that
family, *adjusted anchored neighbourhood regression* (A+; Timofte, De Smet and
Van Gool, ACCV 2014), which runs on a CPU in milliseconds: a few matrix
products per frame, no network.

Method (``scale`` s, patch size P at the high-resolution (HR) grid)
    An LR frame ``x`` is converted to YCrCb. Cr and Cb are only upscaled by
    bicubic interpolation; the luminance ``Y`` is upscaled by bicubic
    interpolation to ``m = bicubic(Y, s)`` (the *mid* image) and refined as

        y_hat = m + avg_{patches j covering the pixel} (P_{k(j)} z_j)

    1. **Features.** Four filters on ``m`` (first and second derivatives,
       ``[-1, 0, 1]`` and ``[1, 0, -2, 0, 1]`` along x and along y; replicate
       border): each P x P patch (top-left corners every ``stride`` px; ``m`` is
       replicate-padded by less than ``stride`` px at the bottom and right so
       this regular grid covers it) gives ``f_j`` of length
       ``4 P^2``, reduced to ``z_j = V^T f_j`` (``V``: ``(4P^2, d)``, the leading
       eigenvectors of the *uncentred* feature covariance ``F^T F``, keeping a
       fraction ``pca_energy`` of its trace; uncentred, so the map stays linear).
    2. **Anchor.** ``k(j) = argmax_k |<a_k, z_j>|`` over ``K`` unit-norm atoms
       ``a_k`` (``atoms``).
    3. **Regression.** The HR residual patch (``P^2`` values of ``y - m``) is
       ``P_k z_j``; ``P_k`` is a ridge regression fitted on the anchor's
       neighbourhood ``N_k``: the ``n`` training samples (``neighbours``) most
       correlated with ``a_k`` (``|<a_k, z_i>|/||z_i||``, largest first), with
       features and residuals both divided by ``||z_i||`` (A+'s normalisation):

           P_k = R_k Z_k^T (Z_k Z_k^T + lambda I)^-1          (d x d inverse)

       ``Z_k``: ``(d, n)``, ``R_k``: ``(P^2, n)``. This is A+'s
       ``R (Z^T Z + lambda I)^-1 Z^T`` by the push-through identity (an ``n x n``
       inverse there).
    4. **Reconstruction.** Overlapping residual patches are averaged per pixel
       (every pixel lies in at least one patch) and added to ``m``; the result
       is clipped to [0, 255] and converted back to BGR.

    Hand-worked: with ``P = 1`` and one atom, ``z = f`` is the 4 gradients of a
    pixel and ``P_1`` a 1 x 4 row ``w``: ``y_hat = m + w . (g_x, g_y, g_xx, g_yy)``,
    a learned linear sharpening filter. A+ has ``K`` such filters over
    P x P windows, and picks one per patch by its local structure.

Training (:func:`train`)
    HR images are turned into pairs (``m``, ``y``) by the degradation we expect
    on the edge: ``x = resize(y, 1/s, INTER_AREA)`` (sensor binning; also what
    ``benchmarks/superres.py`` evaluates on), ``m = bicubic(x, s)``. Up to
    ``samples`` patches (sampled uniformly, patches with ``||f|| < 1e-3`` are
    dropped: they carry no structure) give ``F`` and ``R``. The atoms are learned
    by sign-invariant spherical k-means on the normalised ``z`` (A+ uses
    K-SVD atoms; k-means atoms are cheaper and, in Timofte's own ablations,
    about as good); ``kmeans_iters`` Lloyd iterations from ``K`` random
    samples, empty clusters reseeded.

Parameters (:class:`ANRParams`; A+'s x2 settings in brackets)
    ``scale`` 2 (any integer >= 2 works); ``patch`` P = 6 HR px (3 LR px at x2);
    ``stride`` 2 HR px (A+'s full overlap: 1 LR px); ``atoms`` K = 128 [1024];
    ``neighbours`` n = 256 [2048]; ``lam`` lambda = 0.1 [0.1]; ``pca_energy``
    0.999 [0.999]; ``samples`` 100 000 training patches. Pixel values are 0..255
    floats. K is small for edge latency (the anchor search costs ``N K d``
    multiply-adds per frame). K and n were picked on the standard benchmark's
    *val* split (32 images, 100 000 patches from the 640 train images; PSNR gain
    over bicubic on Y): one global ridge regression (K = 1) +0.76 dB; K = 128
    with n = 4096 / 1024 / 512 / 256 / 128: +1.06 / +1.53 / +1.77 / +1.91 /
    +1.88 dB; K = 32 (n = 512) +1.58 dB; K = 64 / 256 / 512 (n = 256) +1.82 /
    +1.93 / +1.96 dB; lambda 0.01 / 1 (K = 128, n = 256): +1.89 / +1.84 dB.
    Tight neighbourhoods matter more than many atoms here.

Cost
    Per frame: the four filters, ``N x 4P^2`` feature matrix (``N`` ~ (H s /
    stride)^2), one ``(N, 4P^2) @ (4P^2, d)``, one ``(N, d) @ (d, K)``, ``N`` small
    products grouped by anchor (one matmul per used anchor) and ``P^2`` strided
    adds. ``benchmarks/results/superres.md`` has the measured time.

Model file (``.npz``, no pickles): ``format`` ("cedar-anr"), ``version``,
``scale``, ``patch``, ``stride``, ``lam``, ``neighbours``, ``pca`` (4P^2, d),
``atoms`` (K, d), ``projections`` (K, d, P^2), ``meta`` (a JSON string).
:func:`load_model` checks every field and names the file and the field that
is wrong (:class:`SuperResError`).

CLI::

    python -m common.superres train --images DIR [DIR ...] --scale 2 --out model.npz
    python -m common.superres upscale --model model.npz IN OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

log = logging.getLogger("common.superres" if __name__ == "__main__" else __name__)

FORMAT = "cedar-anr"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# first and second derivative along x (row vectors); the y filters are their transposes
_D1 = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
_D2 = np.array([[1.0, 0.0, -2.0, 0.0, 1.0]], dtype=np.float32)
MIN_FEATURE_NORM = 1e-3


class SuperResError(ValueError):
    """A model file, image or parameter is unusable; the message names it."""


@dataclass(frozen=True)
class ANRParams:
    """A+ settings (see the module docstring)."""

    scale: int = 2
    patch: int = 6
    stride: int = 2
    atoms: int = 128
    neighbours: int = 256
    lam: float = 0.1
    pca_energy: float = 0.999
    samples: int = 100_000
    kmeans_iters: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        bad = []
        if self.scale < 2:
            bad.append(f"scale={self.scale} (need >= 2)")
        if self.patch < 1 or self.stride < 1 or self.stride > self.patch:
            bad.append(f"patch={self.patch}, stride={self.stride} (need 1 <= stride <= patch)")
        if self.atoms < 1 or self.neighbours < 1 or self.samples < 1 or self.kmeans_iters < 0:
            bad.append("atoms, neighbours and samples must be >= 1, kmeans_iters >= 0")
        if not self.lam >= 0 or not 0 < self.pca_energy <= 1:
            bad.append(f"lam={self.lam} (need >= 0), pca_energy={self.pca_energy} (need 0 < e <= 1)")
        if bad:
            raise SuperResError("bad super-resolution parameters: " + "; ".join(bad))


# =========================================================================== patches


def patch_grid(length: int, patch: int, stride: int) -> tuple[np.ndarray, int]:
    """``(corners, padded_length)``: top-left corners ``0, stride, 2 stride, ...`` of a regular grid whose
    last patch ends at ``padded_length >= length``, the side after replicate padding at the end.

    Example: ``patch_grid(8, 3, 2) -> ([0, 2, 4, 6], 9)``: 8 - 3 = 5 is odd, so one row is padded and
    the patches at 0, 2, 4, 6 cover rows 0..8.
    """
    if length < patch:
        raise SuperResError(f"image side {length} px is smaller than the patch ({patch} px)")
    padded = length + (-(length - patch)) % stride
    return np.arange(0, padded - patch + 1, stride), padded


def _pad_to_grid(image: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """Replicate-pad the bottom and right so the regular grid covers the image exactly."""
    h, w = image.shape[:2]
    ph, pw = patch_grid(h, patch, stride)[1], patch_grid(w, patch, stride)[1]
    if (ph, pw) == (h, w):
        return image
    return cv2.copyMakeBorder(np.ascontiguousarray(image), 0, ph - h, 0, pw - w, cv2.BORDER_REPLICATE)


def extract_patches(image: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """All P x P patches on the regular :func:`patch_grid` of a ``(H, W)`` or ``(H, W, C)`` image.

    The image is first replicate-padded at the bottom and right to the grid's
    size (at most ``stride - 1`` px). Returns a contiguous
    ``patches[i, j] = padded[i S : i S + P, j S : j S + P]`` of shape
    ``(ny, nx, P, P)`` (``(ny, nx, C, P, P)`` for a C-channel image).
    """
    padded = _pad_to_grid(image, patch, stride)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch, patch), axis=(0, 1))
    return np.ascontiguousarray(windows[::stride, ::stride])


def average_patches(patches: np.ndarray, shape: tuple[int, int], stride: int) -> np.ndarray:
    """Overlap-average ``(ny, nx, P, P)`` patches on the regular grid back into an image of ``shape``.

    Pixel value = sum of the patch values covering it / number of patches
    covering it, computed on the padded grid and cropped to ``shape``: the
    inverse of :func:`extract_patches` for any image. ``P^2`` strided adds,
    each over all patches at once; the count is separable (rows x columns).
    Example: 1-D, ``P = 3``, ``S = 2``, 5 px: patches at 0 and 2 cover
    pixel 2 twice, so it gets the mean of patch 0's last and patch 1's first value.
    """
    ny, nx, p = patches.shape[0], patches.shape[1], patches.shape[-1]
    h, w = stride * (ny - 1) + p, stride * (nx - 1) + p
    acc = np.zeros((h, w), dtype=np.float64 if patches.dtype == np.float64 else np.float32)
    for dy in range(p):
        for dx in range(p):
            acc[dy:dy + stride * (ny - 1) + 1:stride, dx:dx + stride * (nx - 1) + 1:stride] += patches[:, :, dy, dx]
    count_y, count_x = np.zeros(h, dtype=acc.dtype), np.zeros(w, dtype=acc.dtype)
    for d in range(p):
        count_y[d:d + stride * (ny - 1) + 1:stride] += 1
        count_x[d:d + stride * (nx - 1) + 1:stride] += 1
    acc /= count_y[:, None] * count_x[None, :]
    return acc[:shape[0], :shape[1]]


# =========================================================================== features


def gradient_features(mid: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(H, W, 4)`` float32: d/dx, d/dy, d2/dx2, d2/dy2 (replicate border).

    Example: on the row ``[0, 1, 4, 9, 16]`` (x^2) the first feature is ``[1, 4, 8, 12, 7]``
    (``x_{i+1} - x_{i-1}``, border replicated) and the second-derivative one, in the middle, is
    ``x_{i-2} - 2 x_i + x_{i+2} = 0 - 8 + 16 = 8``.
    """
    mid = np.asarray(mid, dtype=np.float32)
    out = np.empty(mid.shape + (4,), dtype=np.float32)
    for i, kernel in enumerate((_D1, _D1.T, _D2, _D2.T)):
        out[..., i] = cv2.filter2D(mid, cv2.CV_32F, kernel, borderType=cv2.BORDER_REPLICATE)
    return out


def patch_features(mid: np.ndarray, patch: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(N, 4 P^2)`` feature rows of all grid patches of ``mid`` (row-major), and the grid ``(ny, nx)``.

    The gradients are computed on the replicate-padded ``mid``, which equals
    computing them on ``mid`` with a replicate border and then padding.
    """
    windows = extract_patches(gradient_features(_pad_to_grid(mid, patch, stride)), patch, stride)  # (ny, nx, 4, P, P)
    return windows.reshape(windows.shape[0] * windows.shape[1], -1), windows.shape[:2]


# =========================================================================== degradation and metrics


def degrade(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lr, hr_cropped)``: ``hr`` cropped to a multiple of ``scale`` and area-downscaled by ``scale``."""
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    hr = hr[:h, :w]
    return cv2.resize(hr, (w // scale, h // scale), interpolation=cv2.INTER_AREA), hr


def bicubic(image: np.ndarray, scale: int) -> np.ndarray:
    """OpenCV bicubic upscaling by an integer ``scale`` (same dtype)."""
    h, w = image.shape[:2]
    return cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC)


def luma(image: np.ndarray) -> np.ndarray:
    """Y of YCrCb (OpenCV, full range: ``0.299 R + 0.587 G + 0.114 B``) as float32; a 2-D image is returned as is."""
    if image.ndim == 2:
        return image.astype(np.float32)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2YCrCb)[..., 0].astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0, border: int = 0) -> float:
    """``10 log10(peak^2 / MSE)`` dB, ignoring ``border`` px on each side (inf for identical images).

    Example: ``a = 0`` (2x2), ``b = [[0, 0], [0, 10]]``: MSE = 100 / 4 = 25,
    PSNR = 10 log10(65025 / 25) = 10 log10(2601) ≈ 34.151 dB.
    """
    if a.shape != b.shape:
        raise SuperResError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0, border: int = 0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two 2-D images.

    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``,
    ``C1 = (0.01 peak)^2``, ``C2 = (0.03 peak)^2``; 1 for identical images.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise SuperResError(f"ssim: need two 2-D images of one shape, got {a.shape} and {b.shape}")
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    s_a, s_b, s_ab = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_a + s_b + c2))
    return float(m.mean())


# =========================================================================== the model


@dataclass
class ANRModel:
    """A trained A+ upscaler (see the module docstring for the symbols)."""

    scale: int
    patch: int
    stride: int
    pca: np.ndarray  # (4 P^2, d)
    atoms: np.ndarray  # (K, d), unit rows
    projections: np.ndarray  # (K, d, P^2): residual patch = z @ projections[k]
    lam: float = 0.1
    neighbours: int = 2048
    meta: dict | None = None

    def residual(self, mid: np.ndarray) -> np.ndarray:
        """The predicted HR residual ``y - m`` of a mid image ``m`` ``(H, W)``, float32."""
        feats, (ny, nx) = patch_features(mid, self.patch, self.stride)  # (N, 4P^2)
        z = feats @ self.pca  # (N, d)
        anchor = np.abs(z @ self.atoms.T).argmax(1)  # (N,)
        order = np.argsort(anchor, kind="stable")  # patches grouped by anchor
        z_sorted = z[order]
        ends = np.cumsum(np.bincount(anchor, minlength=len(self.atoms)))
        out_sorted = np.empty((len(z), self.patch * self.patch), dtype=np.float32)  # (N, P^2)
        start = 0
        for k in np.flatnonzero(np.diff(ends, prepend=0)):  # one matmul per used anchor
            np.matmul(z_sorted[start:ends[k]], self.projections[k], out=out_sorted[start:ends[k]])
            start = ends[k]
        out = np.empty_like(out_sorted)
        out[order] = out_sorted
        return average_patches(out.reshape(ny, nx, self.patch, self.patch), mid.shape, self.stride)

    def enhance(self, mid: np.ndarray) -> np.ndarray:
        """``m + residual(m)`` (no clipping): the refined luminance of a mid image."""
        mid = np.asarray(mid, dtype=np.float32)
        return mid + self.residual(mid)

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """Upscale a uint8 BGR ``(H, W, 3)`` or grey ``(H, W)`` frame by ``scale`` (A+ on Y, bicubic Cr/Cb)."""
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise SuperResError(f"upscale: need a uint8 BGR or grey image, got {image.dtype} {image.shape}")
        if image.ndim == 2:
            return np.clip(self.enhance(bicubic(image.astype(np.float32), self.scale)) + 0.5, 0, 255).astype(np.uint8)
        ycc = bicubic(cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb).astype(np.float32), self.scale)
        ycc[..., 0] = self.enhance(ycc[..., 0])
        ycc = np.clip(ycc + 0.5, 0, 255).astype(np.uint8)
        return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2BGR)

    __call__ = upscale

    # -- files
    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` (atomically: a temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, format=np.array(FORMAT), version=np.array(FORMAT_VERSION), scale=np.array(self.scale),
                 patch=np.array(self.patch), stride=np.array(self.stride), lam=np.array(self.lam),
                 neighbours=np.array(self.neighbours), pca=self.pca.astype(np.float32),
                 atoms=self.atoms.astype(np.float32), projections=self.projections.astype(np.float32),
                 meta=np.array(json.dumps(self.meta or {})))
        os.replace(tmp, path)
        return path


def _int_field(path, data, name: str, lo: int) -> int:
    value = data[name]
    if value.shape != () or value.dtype.kind not in "iu" or int(value) < lo:
        raise SuperResError(f"{path}: field '{name}' must be an integer >= {lo}, got {value!r}")
    return int(value)


def load_model(path: str | Path) -> ANRModel:
    """Read and validate a model written by :meth:`ANRModel.save`; errors name the file and the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SuperResError(f"super-resolution model not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as err:  # not a zip, truncated, pickled arrays
        raise SuperResError(f"{path}: not a readable .npz model ({type(err).__name__}: {err})") from None
    required = ("format", "version", "scale", "patch", "stride", "pca", "atoms", "projections")
    missing = [k for k in required if k not in data]
    if missing:
        raise SuperResError(f"{path}: missing field(s) {', '.join(missing)}")
    if data["format"].shape != () or str(data["format"]) != FORMAT:
        raise SuperResError(f"{path}: field 'format' is {data['format']!r}, expected {FORMAT!r}")
    version = _int_field(path, data, "version", 1)
    if version != FORMAT_VERSION:
        raise SuperResError(f"{path}: field 'version' is {version}, this code reads {FORMAT_VERSION}")
    scale, patch, stride = (_int_field(path, data, k, lo) for k, lo in (("scale", 2), ("patch", 1), ("stride", 1)))
    if stride > patch:
        raise SuperResError(f"{path}: field 'stride' ({stride}) is larger than 'patch' ({patch})")
    pca, atoms, proj = data["pca"], data["atoms"], data["projections"]
    for name, arr, ndim in (("pca", pca, 2), ("atoms", atoms, 2), ("projections", proj, 3)):
        if arr.ndim != ndim or arr.dtype.kind != "f" or arr.size == 0:
            raise SuperResError(f"{path}: field '{name}' must be a non-empty {ndim}-D float array, "
                                f"got {arr.dtype} {arr.shape}")
        if not np.isfinite(arr).all():
            raise SuperResError(f"{path}: field '{name}' holds NaN or inf")
    d = pca.shape[1]
    if pca.shape[0] != 4 * patch * patch:
        raise SuperResError(f"{path}: field 'pca' has {pca.shape[0]} rows, expected 4 * patch^2 = {4 * patch * patch}")
    if atoms.shape[1] != d:
        raise SuperResError(f"{path}: field 'atoms' has {atoms.shape[1]} columns, expected d = {d} (pca)")
    if proj.shape != (atoms.shape[0], d, patch * patch):
        raise SuperResError(f"{path}: field 'projections' has shape {proj.shape}, "
                            f"expected (K, d, patch^2) = {(atoms.shape[0], d, patch * patch)}")
    meta = {}
    if "meta" in data:
        try:
            meta = json.loads(str(data["meta"]))
        except ValueError:
            raise SuperResError(f"{path}: field 'meta' is not JSON") from None
    lam = float(data["lam"]) if "lam" in data else float("nan")
    neighbours = int(data["neighbours"]) if "neighbours" in data else 0
    return ANRModel(scale, patch, stride, pca.astype(np.float32), atoms.astype(np.float32),
                    proj.astype(np.float32), lam=lam, neighbours=neighbours, meta=meta)


# =========================================================================== training


def _pca_basis(feats: np.ndarray, energy: float) -> np.ndarray:
    """``(D, d)``: leading eigenvectors of ``F^T F`` keeping ``energy`` of its trace (all non-null ones at 1.0)."""
    cov = feats.T.astype(np.float64) @ feats.astype(np.float64)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = vals[::-1].clip(min=0), vecs[:, ::-1]
    total = vals.sum()
    if total <= 0:
        raise SuperResError("training images have no structure (all gradient features are zero)")
    if energy >= 1.0:
        d = int((vals > 1e-12 * total).sum())
    else:
        d = int(np.searchsorted(np.cumsum(vals) / total, energy) + 1)
    return vecs[:, :max(d, 1)].astype(np.float32)


def _spherical_kmeans(zn: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """``(k, d)`` unit atoms: Lloyd iterations with sign-invariant assignment ``argmax |<a, z>|``."""
    k = min(k, len(zn))
    atoms = zn[rng.choice(len(zn), k, replace=False)].copy()
    for _ in range(iters):
        corr = zn @ atoms.T  # (n, k)
        best = np.abs(corr).argmax(1)
        sign = np.sign(corr[np.arange(len(zn)), best])[:, None]
        sums = np.zeros_like(atoms)
        np.add.at(sums, best, zn * sign)
        norms = np.linalg.norm(sums, axis=1)
        empty = norms < 1e-12
        if empty.any():  # reseed empty clusters with random samples
            sums[empty] = zn[rng.choice(len(zn), int(empty.sum()), replace=False)]
            norms[empty] = np.linalg.norm(sums[empty], axis=1)
        atoms = sums / norms[:, None]
    return atoms.astype(np.float32)


@dataclass
class PatchSample:
    """Training patches: ``features`` ``(n, 4 P^2)``, HR ``residuals`` ``(n, P^2)``, from ``images`` pairs."""

    features: np.ndarray
    residuals: np.ndarray
    images: int
    patch: int
    stride: int


def sample_patches(pairs: Iterable[tuple[np.ndarray, np.ndarray]], patch: int, stride: int, samples: int,
                   seed: int = 0) -> PatchSample:
    """Up to ``samples`` grid patches drawn uniformly (without replacement) over all ``(mid, hr)`` pairs.

    One image is in memory at a time: every patch gets a random key and the
    ``samples`` smallest keys seen so far are kept. Patches whose features
    have a norm below ``1e-3`` (flat) are dropped afterwards.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    f_all = r_all = None
    images = 0
    for mid, hr in pairs:
        mid, hr = np.asarray(mid, dtype=np.float32), np.asarray(hr, dtype=np.float32)
        if mid.shape != hr.shape or mid.ndim != 2:
            raise SuperResError(f"fit: need 2-D mid/hr pairs of one shape, got {mid.shape} and {hr.shape}")
        f, _ = patch_features(mid, patch, stride)  # (N, 4P^2)
        r = extract_patches(hr - mid, patch, stride).reshape(len(f), -1)  # (N, P^2)
        images += 1
        new = rng.random(len(f))
        if len(keys) >= samples:  # full: only keys below the largest kept one can enter
            enter = new < keys.max()
            new, f, r = new[enter], f[enter], r[enter]
        keys = np.concatenate([keys, new])
        f_all = f if f_all is None else np.concatenate([f_all, f])
        r_all = r if r_all is None else np.concatenate([r_all, r])
        if len(keys) > samples:
            keep = np.argpartition(keys, samples - 1)[:samples]
            keys, f_all, r_all = keys[keep], f_all[keep], r_all[keep]
    if f_all is None:
        raise SuperResError("fit: no training images")
    ok = np.linalg.norm(f_all, axis=1) >= MIN_FEATURE_NORM
    return PatchSample(f_all[ok], r_all[ok], images, patch, stride)


def fit_patches(sample: PatchSample, params: ANRParams = ANRParams(), meta: dict | None = None) -> ANRModel:
    """PCA, anchors and one ridge regression per anchor (module docstring, steps 1-3) on sampled patches."""
    p = params
    if (sample.patch, sample.stride) != (p.patch, p.stride):
        raise SuperResError(f"fit: patches were sampled with patch {sample.patch}, stride {sample.stride}; "
                            f"params say {p.patch}, {p.stride}")
    f_all, r_all = sample.features, sample.residuals
    if len(f_all) < 2:
        raise SuperResError("fit: fewer than 2 patches with structure in the training images")
    rng = np.random.default_rng([p.seed, 1])
    pca = _pca_basis(f_all, p.pca_energy)  # (D, d)
    z = f_all @ pca  # (n, d)
    norm = np.linalg.norm(z, axis=1, keepdims=True).clip(min=1e-12)
    zn, rn = z / norm, r_all / norm  # A+: features and residuals divided by the feature norm
    atoms = _spherical_kmeans(zn, p.atoms, p.kmeans_iters, rng)  # (K, d)
    k, d = atoms.shape
    nb = min(p.neighbours, len(zn))
    proj = np.empty((k, d, p.patch * p.patch), dtype=np.float32)
    eye = p.lam * np.eye(d)
    for c0 in range(0, k, 64):  # (64, n) correlations at a time
        corr = np.abs(atoms[c0:c0 + 64] @ zn.T)
        nearest = np.argpartition(-corr, nb - 1, axis=1)[:, :nb] if nb < len(zn) else \
            np.broadcast_to(np.arange(len(zn)), (len(corr), len(zn)))
        for i, idx in enumerate(nearest):
            zk, rk = zn[idx].astype(np.float64), rn[idx].astype(np.float64)  # (nb, d), (nb, P^2)
            # P_k^T = (Z Z^T + lambda I)^-1 Z R^T  (Z, R with samples as columns)
            proj[c0 + i] = np.linalg.solve(zk.T @ zk + eye, zk.T @ rk)
    info = {"samples": int(len(zn)), "training_images": sample.images, "pca_dims": int(d), "params": asdict(p),
            **(meta or {})}
    log.info("A+ x%d: %d samples, %d PCA dims, %d atoms, %d neighbours each", p.scale, len(zn), d, k, nb)
    return ANRModel(p.scale, p.patch, p.stride, pca, atoms, proj, lam=p.lam, neighbours=nb, meta=info)


def fit(pairs: Iterable[tuple[np.ndarray, np.ndarray]], params: ANRParams = ANRParams(),
        meta: dict | None = None) -> ANRModel:
    """Learn an A+ model from ``(mid, hr)`` luminance pairs of one shape each (float, 0..255).

    ``mid`` is what the model will see (the bicubic-upscaled LR frame) and ``hr``
    the target; :func:`train` builds the pairs from HR images. Up to
    ``params.samples`` patches are drawn uniformly over all pairs
    (:func:`sample_patches`), then :func:`fit_patches`.
    """
    sample = sample_patches(pairs, params.patch, params.stride, params.samples, params.seed)
    return fit_patches(sample, params, meta)


def training_pair(hr_image: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mid, hr)`` luminance pair of one HR image: area-downscale by ``scale``, bicubic back up."""
    y = luma(hr_image)
    lr, y = degrade(y, scale)
    return bicubic(lr, scale), y


def train(images: Iterable[np.ndarray], params: ANRParams = ANRParams(), meta: dict | None = None) -> ANRModel:
    """Learn an A+ model from HR images (uint8 BGR or grey) under the INTER_AREA degradation."""
    return fit((training_pair(im, params.scale) for im in images), params, meta=meta)


def image_files(folders: Sequence[str | Path]) -> list[Path]:
    """Image files (sorted) directly in each folder; a missing or empty folder is an error naming it."""
    files = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise SuperResError(f"--images {folder}: not a folder")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SuperResError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
    return files


def read_image(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SuperResError(f"cannot read image {path}")
    return image


# =========================================================================== CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.superres", description="A+ super-resolution (edge)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = ANRParams()
    t = sub.add_parser("train", help="learn a model from HR images", formatter_class=ap.formatter_class)
    t.add_argument("--images", nargs="+", required=True, help="folders of HR training images")
    t.add_argument("--out", required=True, help="model file (.npz)")
    for name in ("scale", "patch", "stride", "atoms", "neighbours", "samples", "kmeans_iters", "seed"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    t.add_argument("--lam", type=float, default=d.lam, help="ridge lambda")
    t.add_argument("--pca-energy", type=float, default=d.pca_energy)
    u = sub.add_parser("upscale", help="upscale one image", formatter_class=ap.formatter_class)
    u.add_argument("--model", required=True)
    u.add_argument("input")
    u.add_argument("output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "train":
            params = ANRParams(scale=args.scale, patch=args.patch, stride=args.stride, atoms=args.atoms,
                               neighbours=args.neighbours, lam=args.lam, pca_energy=args.pca_energy,
                               samples=args.samples, kmeans_iters=args.kmeans_iters, seed=args.seed)
            files = image_files(args.images)
            t0 = time.perf_counter()
            model = train((read_image(f) for f in files), params,
                          meta={"images": len(files), "folders": [str(f) for f in args.images]})
            model.save(args.out)
            print(f"trained on {len(files)} images in {time.perf_counter() - t0:.1f} s: {args.out}")
        else:
            model = load_model(args.model)
            image = read_image(args.input)
            t0 = time.perf_counter()
            out = model.upscale(image)
            ms = (time.perf_counter() - t0) * 1e3
            if not cv2.imwrite(args.output, out):
                raise SuperResError(f"cannot write {args.output}")
            print(f"{image.shape[1]}x{image.shape[0]} -> {out.shape[1]}x{out.shape[0]} in {ms:.1f} ms: {args.output}")
    except SuperResError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
