"""Tissue on a slide thumbnail, and the patch grid kept for it (used by `topopack extract`).

Segmentation: saturation (HSV) median-blurred, Otsu threshold (never below ``MIN_SATURATION``, so a blank
slide's noise is not tissue), a closing, holes filled, specks smaller than a quarter patch removed.
"""
from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.04  # floor of the threshold: white background with scanner noise stays background
MIN_SPECK = 0.25  # specks below this fraction of a patch's area (on the thumbnail) are dropped
PIXELS_PER_PATCH = 16  # segmentation thumbnail resolution, per patch side
THUMB_MIN, THUMB_MAX = 512, 4096  # the segmentation thumbnail's long side


def segmentation_size(width0: int, height0: int, patch_size_level0: int) -> int:
    """Long side of the segmentation thumbnail: about PIXELS_PER_PATCH pixels per patch, within bounds."""
    patches = -(-max(width0, height0) // patch_size_level0)
    return int(np.clip(patches * PIXELS_PER_PATCH, THUMB_MIN, THUMB_MAX))


def tissue_mask(rgb: np.ndarray, speck_px: float = 0.0) -> np.ndarray:
    """[H, W] bool tissue mask of an [H, W, 3] uint8 thumbnail; components under ``speck_px`` pixels are dropped."""
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import disk

    sat = median((rgb2hsv(rgb[..., :3])[..., 1] * 255).astype(np.uint8), disk(2)).astype(np.float64) / 255
    if sat.max() - sat.min() < 1e-6:  # one value: Otsu is undefined
        thresh = MIN_SATURATION if sat.max() > MIN_SATURATION else np.inf
    else:
        thresh = max(float(threshold_otsu(sat)), MIN_SATURATION)
    mask = sat > thresh
    mask = ndimage.binary_closing(mask, structure=disk(2).astype(bool), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= speck_px
        keep[0] = False
        mask = keep[labels]
    return mask


def grid_coords(width0: int, height0: int, patch_size_level0: int) -> np.ndarray:
    """[N, 2] int64 level-0 (x, y) of every whole patch of the grid anchored at (0, 0), row-major."""
    xs = np.arange(0, width0 - patch_size_level0 + 1, patch_size_level0, dtype=np.int64)
    ys = np.arange(0, height0 - patch_size_level0 + 1, patch_size_level0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], 1)


def tissue_fractions(mask: np.ndarray, coords: np.ndarray, patch_size_level0: int, scale: tuple[float, float]
                     ) -> np.ndarray:
    """Fraction of tissue under each patch: ``mask`` pixels per level-0 pixel is ``scale`` (x, y)."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sx, sy = scale
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size_level0) * sx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size_level0) * sy).astype(np.int64), y0 + 1, h)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))
