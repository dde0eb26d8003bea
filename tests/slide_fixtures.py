"""Small whole-slide images and a tiny patch encoder, written offline for the `topopack extract` tests.

``write_slide`` writes a pyramidal tiled TIFF (zlib, lossless) that OpenSlide reads: with an Aperio
ImageDescription (``Aperio Image ...|AppMag = 20|MPP = 0.5``) it is an Aperio slide with objective power
and mpp; without one, a generic TIFF with neither. Tissue is a few pink, textured ellipses on white.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TILE = 256


def slide_image(width: int, height: int, seed: int = 0, blobs: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """([height, width, 3] uint8 image, [height, width] bool tissue): white background with slight noise, pink
    textured ellipses with purple dots."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.float32) + rng.normal(0, 2, (height, width, 1))
    yy, xx = np.ogrid[:height, :width]
    tissue = np.zeros((height, width), bool)
    for _ in range(blobs):
        cx, cy = rng.uniform(0.25, 0.55) * width, rng.uniform(0.3, 0.7) * height
        rx, ry = rng.uniform(0.15, 0.3) * width, rng.uniform(0.2, 0.35) * height
        tissue |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
    texture = rng.normal(0, 12, (height, width, 1))
    pink = np.array([225, 130, 185], np.float32) + texture
    dots = rng.random((height, width)) < 0.01
    pink[dots] = (120, 60, 150)
    img[tissue] = pink[tissue]
    return img.clip(0, 255).astype(np.uint8), tissue


def downsample(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    blocks = img[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f, 3)
    return blocks.mean((1, 3)).round().astype(np.uint8)


def write_slide(path, image: np.ndarray, *, mag: float | None = 20, mpp: float | None = 0.5,
                factors=(2, 4)) -> list[np.ndarray]:
    """Write ``image`` as level 0 with reduced levels ``factors``; returns the level images as written."""
    import tifffile

    h, w = image.shape[:2]
    levels = [image] + [downsample(image, f) for f in factors]
    desc = None
    if mag is not None or mpp is not None:
        fields = [f"AppMag = {mag:g}"] * (mag is not None) + [f"MPP = {mpp:g}"] * (mpp is not None)
        desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) RAW|" + "|".join(fields)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            tif.write(level, tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                      metadata=None, description=desc if i == 0 else None)
    return levels


def write_vit(folder, image_size: int = 32, patch_size: int = 8, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised one-layer transformers ViT with its ViTImageProcessor, saved in ``folder``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=2 * hidden)
    ViTModel(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return Path(folder)
