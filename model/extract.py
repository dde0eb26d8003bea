"""`topopack extract`: whole-slide images -> TRIDENT-layout feature files with the paper's pack and slide tokens.

    topopack extract --slides SLIDES --out OUT --encoder MODEL [--target-magnification 20] [--patch-size 256]
                     [--min-tissue 0.25] [--pack-size 3] [--batch-size 64] [--workers N] [--device cuda]
    topopack extract --slides SLIDES --out OUT --encoder MODEL --coords-from TRIDENT_DIR

SLIDES is a slide or a folder of slides OpenSlide reads (.svs, .tif, .tiff, .ndpi, .mrxs, ...). Per slide:

1. tissue: Otsu on the saturation of a thumbnail, closed, holes filled, specks removed (model/tissue.py);
2. patches: a grid of --patch-size pixels at --target-magnification from (0, 0); the slide's level-0
   magnification is its objective power, else 10 / mpp (--magnification or --mpp override both; a slide with
   neither fails with a message saying so); patches with at least --min-tissue tissue are kept;
3. features: each patch embedded by the patch encoder (model/patch_encoder.py: a local Hugging Face model
   folder, a torch.export .pt2 or TorchScript file, timm:NAME or open_clip:NAME); ``summary_features``
   [P, C]: each k x k pack's mosaic (its patches in a white k*patch-size square, resized to the encoder's
   input), packs in the order of TopoLayout.from_coords(coords, patch_size_level0, k) (row-major from the
   smallest coords); ``global_features`` [C]: the whole-slide thumbnail (white-padded square);
4. OUT/<slide name>.h5 in TRIDENT's layout: ``features`` [N, C] float32, ``coords`` [N, 2] int64 level-0 (x, y)
   with attributes patch_size, patch_size_level0, level0_magnification, target_magnification, level0_width,
   level0_height, overlap (0); the file's attributes ``pack_size`` and ``topopack_encoder``.

``--coords-from DIR`` keeps DIR/<slide name>.h5's coords, features and everything else, and adds only
summary_features and global_features (the encoder must be the one that made the features: same width);
OUT may be DIR itself.

Batches go through a torch DataLoader (--workers processes read the slide; --batch-size patches per forward
pass), bf16 autocast on CUDA. Resumable: a finished OUT file (same encoder and settings) is skipped, and a
file is written under a temporary name and renamed, so a killed run never leaves a half file that counts.
A slide that cannot be read fails with its name and the others go on; the run ends with the list of
failures and exit status 1.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from topopack.layout import MAX_PACK_SIZE, MIN_PACK_SIZE, TopoLayout

from .config import POSITIVE, UNIT, Check, add_config_arguments, config_from_args, option, validate
from .extract_files import PART, add_tokens, finished, remove_stale_parts, write_new
from .patch_encoder import EncoderError, load_patch_encoder
from .progress import progress
from .wsi import SLIDE_SUFFIXES, Geometry, PackDataset, SlideReadError, collate_packs, find_wsi, open_slide

@dataclass
class ExtractConfig:
    slides: str = option(help="a slide, or a folder of slides (" + ", ".join(SLIDE_SUFFIXES) + ", any case)")
    out: str = option(help="output folder: <slide name>.h5 per slide")
    encoder: str = option(help="patch encoder: a local Hugging Face model folder, a torch.export .pt2 or "
                          "TorchScript file, timm:NAME or open_clip:NAME (with --weights)")
    weights: str | None = option(None, "local weights file for timm: and open_clip: encoders")
    encoder_kwargs: str | None = option(None, "timm: JSON keyword arguments of timm.create_model "
                                        "(UNI: '{\"init_values\": 1e-5, \"dynamic_img_size\": true}')")
    pool: str = option("cls", "Hugging Face models: the CLS token of last_hidden_state, or pooler_output",
                       choices=("cls", "pooler"))
    input_size: int = option(224, ".pt2 / TorchScript encoders: input side in pixels", check=POSITIVE)
    mean: str = option("0.485,0.456,0.406", ".pt2 / TorchScript encoders: channel means of [0, 1] pixels")
    std: str = option("0.229,0.224,0.225", ".pt2 / TorchScript encoders: channel standard deviations")
    target_magnification: float = option(20.0, "magnification of the patches", check=POSITIVE)
    patch_size: int = option(256, "patch side in pixels at --target-magnification", check=POSITIVE)
    magnification: float | None = option(None, "level-0 magnification of every slide (overrides its metadata)",
                                         check=POSITIVE)
    mpp: float | None = option(None, "level-0 microns per pixel of every slide (overrides its metadata; "
                               "magnification = 10 / mpp)", check=POSITIVE)
    min_tissue: float = option(0.25, "keep a patch when at least this fraction of it is tissue", check=UNIT)
    pack_size: int = option(3, "pack side k: summary_features embed k x k mosaics",
                            check=Check(lambda k: MIN_PACK_SIZE <= k <= MAX_PACK_SIZE,
                                        f"from {MIN_PACK_SIZE} to {MAX_PACK_SIZE}"))
    coords_from: str | None = option(None, "folder of TRIDENT h5 files named like the slides: keep their coords "
                                     "and features, add summary_features and global_features")
    batch_size: int = option(64, "patches per forward pass (and batch-size / k^2 mosaics)", check=POSITIVE)
    workers: int = option(-1, "processes reading the slide (-1: usable cores - 1, at most 8; 0: this process)",
                          check=Check(lambda w: w >= -1, ">= -1"))
    device: str | None = option(None, "default: cuda if available, else cpu")

    def __post_init__(self):
        validate(self)
        if self.magnification is not None and self.mpp is not None:
            raise ValueError("pass --magnification or --mpp, not both")
        for name in ("mean", "std"):
            values = _floats(getattr(self, name), name)
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise ValueError(f"--{name} takes 3 comma-separated numbers{' > 0' if name == 'std' else ''}, "
                                 f"got {getattr(self, name)!r}")


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers, got {text!r}") from None


# ---- one slide ----------------------------------------------------------------------------------
def tissue_patches(slide, path, cfg: ExtractConfig) -> tuple[np.ndarray, Geometry, dict]:
    """Level-0 coords of the patches with enough tissue, their geometry and the coords attributes."""
    from .tissue import MIN_SPECK, grid_coords, segmentation_size, tissue_fractions, tissue_mask
    from .wsi import level0_magnification, to_rgb

    mag0 = level0_magnification(slide, path, cfg.magnification, cfg.mpp)
    if mag0 < cfg.target_magnification * (1 - 1e-6):
        raise SlideReadError(f"{path}: level 0 is {mag0:g}x, below --target-magnification {cfg.target_magnification:g}"
                             " (patches would be upsampled): lower --target-magnification")
    ps0 = round(cfg.patch_size * mag0 / cfg.target_magnification)
    w0, h0 = slide.dimensions
    thumb = np.asarray(to_rgb(slide.get_thumbnail((segmentation_size(w0, h0, ps0),) * 2)))
    scale = (thumb.shape[1] / w0, thumb.shape[0] / h0)
    mask = tissue_mask(thumb, speck_px=MIN_SPECK * ps0 * ps0 * scale[0] * scale[1])
    coords = grid_coords(w0, h0, ps0)
    if len(coords):
        coords = coords[tissue_fractions(mask, coords, ps0, scale) >= cfg.min_tissue]
    if not len(coords):
        raise SlideReadError(f"{path}: no {ps0}-pixel patch is {cfg.min_tissue:.0%} tissue ({mask.mean():.1%} of the "
                             "thumbnail is): lower --min-tissue, or check the slide and --magnification")
    attrs = dict(patch_size=cfg.patch_size, patch_size_level0=ps0, level0_magnification=mag0,
                 target_magnification=cfg.target_magnification, level0_width=w0, level0_height=h0, overlap=0)
    return coords, Geometry.of(slide, cfg.patch_size, ps0), attrs


def source_patches(slide, source: Path):
    """--coords-from: the source file's raw coords, their geometry, the file as load_slide reads it, its width."""
    import h5py

    from topopack.io import load_slide

    loaded = load_slide(source)
    with h5py.File(source, "r") as f:
        coords = f["coords"][()].astype(np.int64)
        attrs = {**f.attrs, **f["coords"].attrs}
    patch_px = int(np.asarray(attrs.get("patch_size", loaded.patch_size)).reshape(-1)[0])
    geometry = Geometry.of(slide, patch_px, loaded.patch_size, loaded.cell_size)
    return coords, geometry, loaded, loaded.in_dim


def embed_slide(path, coords, layout: TopoLayout, geometry: Geometry, encoder, cfg, with_patches: bool):
    """(features [N, C] or None, summary_features [P, C], global_features [C]) of one slide."""
    from .wsi import square_thumbnail

    k = layout.pack_size
    ds = PackDataset(path, coords, layout, geometry, encoder, with_patches)
    workers = cfg.workers if cfg.workers >= 0 else _default_workers()
    loader = torch.utils.data.DataLoader(ds, batch_size=max(1, cfg.batch_size // (k * k)), num_workers=workers,
                                         collate_fn=collate_packs, pin_memory=encoder.device.type == "cuda")
    summary = torch.empty(layout.num_packs, encoder.dim)
    feats = torch.empty(len(coords), encoder.dim) if with_patches else None
    done = 0
    for mosaics, patches, rows in progress(loader, desc=Path(path).name, every=50, leave=False):
        summary[done:done + len(mosaics)] = encoder.embed(mosaics)
        done += len(mosaics)
        if with_patches:
            feats[rows] = encoder.embed(patches)
    slide = open_slide(path)
    try:
        thumb = encoder.image_transform(square_thumbnail(slide, max(encoder.input_size)))
    finally:
        slide.close()
    return feats, summary, encoder.embed(thumb[None])[0]


def _default_workers() -> int:
    from .parallel import usable_cores

    return min(8, usable_cores() - 1)


def extract_one(path: Path, out: Path, cfg: ExtractConfig, encoder, source: Path | None) -> None:
    slide = open_slide(path)
    try:
        if source is None:
            coords, geometry, attrs = tissue_patches(slide, path, cfg)
            layout = TopoLayout.from_coords(coords, geometry.patch_size_level0, cfg.pack_size)
        else:
            coords, geometry, loaded, width = source_patches(slide, source)
            if width != encoder.dim:
                raise SlideReadError(f"{source}: its features are {width} wide but --encoder {encoder.name} gives "
                                     f"{encoder.dim}: use the encoder that made them")
            layout = TopoLayout.from_coords(loaded.coords, loaded.cell_size, cfg.pack_size)
    finally:
        slide.close()
    feats, summary, glob = embed_slide(path, coords, layout, geometry, encoder, cfg, source is None)
    tmp = out.with_name(f".{out.name}{PART}{os.getpid()}")
    try:
        if source is None:
            write_new(tmp, feats, coords, attrs, name=out.stem, savetodir=str(out.parent))
        else:
            shutil.copyfile(source, tmp)
        add_tokens(tmp, summary, glob, cfg.pack_size, encoder.name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- the command --------------------------------------------------------------------------------
def add_arguments(p) -> None:
    add_config_arguments(p, ExtractConfig)


def _check_openslide() -> None:
    try:
        import openslide  # noqa: F401
    except ImportError as e:
        raise ValueError(f"topopack extract needs OpenSlide: pip install openslide-python openslide-bin ({e})"
                         ) from None


def _failure(path: Path, source: Path | None, e: Exception) -> str:
    """One line that names the slide (or its --coords-from file)."""
    last = (str(e).strip().splitlines() or [""])[-1]  # a DataLoader worker's error ends with the original one
    if str(path) in last or (source is not None and str(source) in last):
        return last
    return f"{path}: {type(e).__name__}: {last}"


def main(args) -> int:
    cfg = args if isinstance(args, ExtractConfig) else config_from_args(ExtractConfig, args)
    _check_openslide()
    slides = find_wsi(cfg.slides)
    stems: dict[str, Path] = {}
    for s in slides:
        if s.stem in stems:
            raise ValueError(f"{stems[s.stem]} and {s} would both write {s.stem}.h5: move one to another folder")
        stems[s.stem] = s
    source_dir = Path(cfg.coords_from) if cfg.coords_from else None
    if source_dir is not None and not source_dir.is_dir():
        raise FileNotFoundError(f"--coords-from {source_dir}: no such folder")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out_dir)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_patch_encoder(cfg.encoder, device=device, weights=cfg.weights, pool=cfg.pool,
                                 input_size=cfg.input_size, mean=_floats(cfg.mean, "mean"),
                                 std=_floats(cfg.std, "std"), kwargs=cfg.encoder_kwargs)
    expected = {"topopack_encoder": encoder.name, "pack_size": cfg.pack_size}
    if source_dir is None:
        expected.update(target_magnification=cfg.target_magnification, patch_size=cfg.patch_size)
    t0, written, skipped, failed = time.perf_counter(), 0, 0, []
    for path in progress(slides, desc="extract"):
        out = out_dir / f"{path.stem}.h5"
        source = None if source_dir is None else source_dir / f"{path.stem}.h5"
        try:
            if finished(out, expected, in_place=source is not None and out.resolve() == source.resolve()):
                skipped += 1
                continue
            if source is not None and not source.is_file():
                raise SlideReadError(f"{path}: no coords file {source} (--coords-from)")
            extract_one(path, out, cfg, encoder, source)
            written += 1
        except EncoderError:
            raise  # the encoder's problem, not the slide's: every slide would fail
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the others
            message = _failure(path, source, e)
            print(f"extract: failed: {message}", file=sys.stderr, flush=True)
            failed.append(message)
    print(f"extract: {written} written, {skipped} already done, {len(failed)} failed, of {len(slides)} slides in "
          f"{time.perf_counter() - t0:.1f} s -> {out_dir}")
    if failed:
        print(f"extract: {len(failed)} slide(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
