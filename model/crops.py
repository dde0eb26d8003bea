"""Windows of slides for pretraining batches, with the file's summary and global features when it has them.

A crop's packs keep their patches (the origin moves by whole packs), so the summary features of the slide's packs
(the patch encoder's embeddings of the pack mosaics) carry over row by row: MAE and MoCo then see the same tokens
finetune and ask feed the encoder.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from topopack import TopoLayout
from topopack.io import Slide


class Crop(NamedTuple):
    """A window of a slide for one batch: what mask_slides and contrast_batch take (a plain 4-tuple works too)."""
    features: torch.Tensor                  # [N, C]
    coords: torch.Tensor                    # [N, 2] level-0
    patch_size: int                         # the grid step (cell size)
    origin: torch.Tensor                    # [2] the layout origin
    summaries: torch.Tensor | None = None   # [P, C] the file's summary_features of the crop's packs, layout order
    global_: torch.Tensor | None = None     # [C] the file's global_features


def crop(slide: Slide, max_patches: int, gen: torch.Generator, pack_size: int = 3, max_shift: int = 16) -> Crop:
    """A square-ish window of at most max_patches patches around a random patch, with the file's summary and
    global features when it has them (the tokens finetune and ask feed the encoder).

    The origin is the slide's, moved up-left by a random whole number (< max_shift) of packs
    per axis: packs keep their patches while grid cells shift, so a model cannot memorise
    where things are on a training slide from absolute positions.
    """
    step = slide.cell_size
    origin = slide.coords.min(0).values
    shift = torch.randint(max_shift, (2,), generator=gen) if max_shift > 0 else torch.zeros(2, dtype=torch.long)
    moved = origin - shift * pack_size * step
    n = slide.num_patches
    idx = None
    if n > max_patches:
        cells = (slide.coords - origin) // step
        anchor = cells[int(torch.randint(n, (1,), generator=gen))]
        dist_ = (cells - anchor).abs().amax(1)
        idx = torch.argsort(dist_, stable=True)[:max_patches].sort().values
    features, coords = (slide.features, slide.coords) if idx is None else (slide.features[idx], slide.coords[idx])
    summaries = None
    if slide.summary_features is not None:  # crop pack -> the slide pack of its patches -> the file's row
        slide_pack = slide.layout(pack_size, origin=slide.origin).patch_pack
        slide_pack = slide_pack if idx is None else slide_pack[idx]
        own = TopoLayout.from_coords(coords, step, pack_size, origin=moved)
        rows = torch.zeros(own.num_packs, dtype=torch.long).scatter_(0, own.patch_pack.long(), slide_pack.long())
        summaries = slide.summary_features[rows]
    return Crop(features, coords, step, moved, summaries, slide.global_features)


def pick_slides(sizes, k: int, gen: torch.Generator, bucket: int) -> list[int]:
    """k slide indices of similar patch counts: a uniform anchor, then k - 1 draws from its size bucket.

    Slides sorted by size are cut into runs of ``bucket``; drawing the anchor uniformly picks a bucket in
    proportion to its length, so every slide is drawn equally often. A pure function of (sizes, gen).
    """
    n = len(sizes)
    order = torch.argsort(torch.as_tensor(sizes, dtype=torch.long), stable=True)
    anchor = int(torch.randint(n, (1,), generator=gen))
    lo = anchor // bucket * bucket
    rest = lo + torch.randint(min(bucket, n - lo), (k - 1,), generator=gen)
    return order[torch.cat([torch.tensor([anchor]), rest])].tolist()


def sample_crops(slides, k: int, max_patches: int, gen, pack_size: int = 3, sizes=None, bucket: int = 32):
    """Crops of k slides of similar size (pick_slides), loaded one at a time: ``slides`` may be a lazy sequence
    (model/datasets.py SlideFiles) with its patch counts in ``sizes``."""
    sizes = [s.num_patches for s in slides] if sizes is None else sizes
    return [crop(slides[i], max_patches, gen, pack_size) for i in pick_slides(sizes, k, gen, bucket)]


def eval_crops(slides, per_slide: int, k: int, max_patches: int, seed: int, pack_size: int = 3):
    """Fixed crops of every slide, k per batch, yielded as the slides are read (one slide in memory at a time).

    Slide i's crops come from a generator seeded with (seed, i), independent of training: every pass yields
    the same crops.
    """
    group = []
    for i in range(len(slides)):
        s = slides[i]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        for _ in range(per_slide if s.num_patches > max_patches else 1):
            group.append(crop(s, max_patches, gen, pack_size))
            if len(group) == k:
                yield group
                group = []
    if group:
        yield group
