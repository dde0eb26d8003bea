"""Synthetic liver-like slides in the TRIDENT h5 format: the embedded default data set.

Each slide is a patch grid with an irregular tissue outline and holes (vessels), a
tissue class per patch (``TISSUE_CLASSES``) and features that look like a learned
encoder's output:

    feature = prototype[class] + slide field(row, col) + stain offset + noise

- ``prototype``: one fixed vector per class, seeded globally (``PROTOTYPE_SEED``), so every
  slide shares the class meaning; class is easy to recover from a patch.
- slide field: a spatially smooth random field (low-rank mix of smooth noise maps,
  ~8-patch correlation length), so a masked patch is predictable from its neighbours.
- stain offset: one small vector per slide (batch effect); noise: i.i.d. per patch.

Anatomy: normal parenchyma, fibrous septa (thin wiggly bands ~2 patches wide), and on
about half the slides 1-4 tumour nodules (small / medium / large by radius), each with a
margin ring; large nodules have a necrotic core. The facts (JSON attribute ``facts``)
record everything the VQA generator asks about.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from topopack.model.config import (FRACTION, NON_NEGATIVE, POSITIVE, add_config_arguments, config_from_args, option,
                                   validate)

TISSUE_CLASSES = ("normal parenchyma", "tumor", "tumor margin", "necrosis", "fibrous septa")
NORMAL, TUMOR, MARGIN, NECROSIS, SEPTA = range(5)
SIZE_CLASSES = ("small", "medium", "large")
LOCATIONS = ("upper left", "upper center", "upper right", "middle left", "center", "middle right",
             "lower left", "lower center", "lower right")
# nodule radius in patches: sampled ranges per size class, and the thresholds that define the class
RADIUS_RANGE = {"small": (2.0, 3.2), "medium": (4.2, 6.2), "large": (8.0, 11.0)}
SIZE_THRESHOLDS = (3.5, 7.0)  # radius < 3.5 small, < 7 medium, else large
MIN_PATCHES = {"small": 300, "medium": 700, "large": 1800}  # room for the largest nodule
PROTOTYPE_SEED = 20_240_917
PROTOTYPE_STD, FIELD_STD, STAIN_STD, NOISE_STD = 1.0, 0.6, 0.2, 0.35
FIELD_RANK, FIELD_SCALE = 6, 8.0


def size_class(radius_patches: float) -> str:
    return SIZE_CLASSES[int(np.searchsorted(SIZE_THRESHOLDS, radius_patches, side="right"))]


def class_prototypes(dim: int) -> np.ndarray:
    """[num_classes, dim] class prototypes, identical for every slide and seed."""
    return np.random.default_rng([PROTOTYPE_SEED, dim]).normal(0, PROTOTYPE_STD, (len(TISSUE_CLASSES), dim))


def smooth_noise(rng, h: int, w: int, cell: float, channels: int = 1) -> np.ndarray:
    """[h, w, channels] unit-variance noise, smooth over ``cell`` grid steps (bilinear upsampling)."""
    gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
    coarse = rng.normal(size=(gh, gw, channels))
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = lambda dy, dx: coarse[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # noqa: E731
    out = (c(0, 0) * (1 - fy) * (1 - fx) + c(0, 1) * (1 - fy) * fx + c(1, 0) * fy * (1 - fx) + c(1, 1) * fy * fx)
    return out / out.std(axis=(0, 1), keepdims=True).clip(1e-6)


def _tissue_mask(rng, h: int, w: int) -> np.ndarray:
    """Irregular outline (scale-free) with round holes (vessels, absolute size)."""
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    wobble = smooth_noise(rng, h, w, cell=max(h, w) / 4.0)[..., 0]
    mask = np.hypot(u, v) < 0.88 + 0.16 * wobble
    n_holes = 1 + int(rng.poisson(h * w / 600))
    for _ in range(n_holes):
        r = rng.uniform(1.0, 3.0)
        cy, cx = rng.uniform(0.05 * h, 0.95 * h), rng.uniform(0.05 * w, 0.95 * w)
        ys, xs = np.ogrid[:h, :w]
        mask &= ((ys + 0.5 - cy) ** 2 + ((xs + 0.5 - cx) * rng.uniform(0.6, 1.6)) ** 2) > r * r
    return mask


def _nodule_shape(rng, radius: float):
    """Radius as a function of angle: a wobbly circle."""
    a = rng.uniform(0.04, 0.12, 2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    return lambda th: radius * (1 + a[0] * np.sin(2 * th + ph[0]) + a[1] * np.sin(3 * th + ph[1]))


def _location(cy: float, cx: float, box) -> str:
    """Which ninth of the tissue bounding box (r0, r1, c0, c1; half-open, grid units) holds (cy, cx)."""
    r0, r1, c0, c1 = box
    row = min(2, int(3 * (cy - r0) / (r1 - r0)))
    col = min(2, int(3 * (cx - c0) / (c1 - c0)))
    return LOCATIONS[3 * row + col]


def _place(rng, tissue, box, radius, margin, cell, placed, tries=300):
    """A centre (grid units) in ``cell`` (None = anywhere) with the nodule mostly on tissue, apart from others."""
    h, w = tissue.shape
    r0, r1, c0, c1 = box
    ext = radius + margin
    for _ in range(tries):
        if cell is None:
            cy, cx = rng.uniform(r0, r1), rng.uniform(c0, c1)
        else:
            row, col = divmod(cell, 3)
            cy = rng.uniform(r0 + row * (r1 - r0) / 3, r0 + (row + 1) * (r1 - r0) / 3)
            cx = rng.uniform(c0 + col * (c1 - c0) / 3, c0 + (col + 1) * (c1 - c0) / 3)
        iy, ix = int(cy), int(cx)
        if not tissue[iy, ix] or cy < ext or cx < ext or cy > h - ext or cx > w - ext:
            continue
        if any(math.hypot(cy - py, cx - px) < 1.25 * (ext + pr + pm) + 1.0 for py, px, pr, pm in placed):  # wobble
            continue
        ys, xs = np.ogrid[int(cy - radius):int(cy + radius) + 1, int(cx - radius):int(cx + radius) + 1]
        disc = (ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2 < radius ** 2
        if tissue[ys, xs][disc].mean() >= 0.75:
            return cy, cx
    return None


def _septa(rng, labels, tissue) -> None:
    """Fibrous septa: wiggly band segments, ~2 patches wide, 12-40 patches long."""
    h, w = tissue.shape
    for _ in range(1 + int(rng.poisson(h * w / 1500))):
        length, half_width = rng.uniform(12, 40), rng.uniform(0.9, 1.4)
        amp, wavelength, phase = rng.uniform(0.5, 2.0), rng.uniform(3, 8), rng.uniform(0, 2 * np.pi)
        py, px, th = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi)
        reach = length / 2 + amp + half_width + 1
        y0, y1 = max(0, int(py - reach)), min(h, int(py + reach) + 1)
        x0, x1 = max(0, int(px - reach)), min(w, int(px + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        along = (ys - py) * np.sin(th) + (xs - px) * np.cos(th)
        across = (ys - py) * np.cos(th) - (xs - px) * np.sin(th) + amp * np.sin(along / wavelength + phase)
        band = (np.abs(across) < half_width) & (np.abs(along) < length / 2)
        labels[y0:y1, x0:x1][band] = SEPTA


class _NoRoom(Exception):
    """The requested nodules do not fit; retry with a bigger slide."""


def _draw(rng, n_target, has_tumor, num_nodules, largest_size, largest_cell):
    """Tissue mask, label image, tissue box (grid units) and nodules (centre, radius in grid units)."""
    aspect, area = rng.uniform(0.7, 1.4), n_target / 0.68
    for _ in range(4):  # redraw the outline until the patch count is within 10% of the target
        h = max(8, int(round(math.sqrt(area / aspect))))
        w = max(8, int(round(math.sqrt(area * aspect))))
        tissue = _tissue_mask(rng, h, w)
        fill = tissue.mean()
        if abs(tissue.sum() / n_target - 1) < 0.1:
            break
        area = n_target / max(fill, 0.05)
    rows, cols = np.nonzero(tissue)
    box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
    labels = np.full((h, w), NORMAL, np.int64)
    _septa(rng, labels, tissue)
    nodules = []
    if has_tumor:
        lo, hi = RADIUS_RANGE[largest_size]
        radii = [rng.uniform(lo, hi)]
        for _ in range(num_nodules - 1):
            radii.append(math.exp(rng.uniform(math.log(1.6), math.log(0.85 * radii[0]))))
        placed = []
        for i, r in enumerate(radii):
            margin = rng.uniform(2.0, 3.0)
            c = _place(rng, tissue, box, r, margin, largest_cell if i == 0 else None, placed)
            if c is None:
                raise _NoRoom
            placed.append((c[0], c[1], r, margin))
        ys, xs = np.mgrid[:h, :w] + 0.5
        for cy, cx, r, margin in placed:  # margin rings first: nodules never overlap each other's rings
            shape = _nodule_shape(rng, r)
            d, th = np.hypot(ys - cy, xs - cx), np.arctan2(ys - cy, xs - cx)
            rad = shape(th)
            labels[(d < rad + margin) & (d >= rad)] = MARGIN
            labels[d < rad] = TUMOR
            if size_class(r) == "large":
                labels[d < rad * rng.uniform(0.4, 0.5)] = NECROSIS
            nodules.append(dict(cy=cy, cx=cx, r=r))
    return tissue, labels, box, nodules


def make_slide(rng, num_patches_target: int, dim: int = 64, patch_size: int = 256, *, has_tumor=None,
               num_nodules=None, largest_size=None, largest_location=None) -> dict:
    """One synthetic slide: dict(features, coords, patch_size, labels, facts) (save_slide's arguments).

    Tumour settings left as None are drawn from ``rng``; the target grows when the
    requested nodules do not fit.
    """
    if has_tumor is None:
        has_tumor = bool(rng.random() < 0.5)
    if has_tumor:
        num_nodules = int(num_nodules if num_nodules is not None else rng.integers(1, 5))
        largest_size = largest_size if largest_size is not None else SIZE_CLASSES[int(rng.integers(3))]
        if largest_location is None:
            largest_location = LOCATIONS[int(rng.integers(9))]
        if num_nodules < 1 or largest_size not in SIZE_CLASSES or largest_location not in LOCATIONS:
            raise ValueError(f"bad tumour settings: {num_nodules=}, {largest_size=}, {largest_location=}")
        n_target = max(int(num_patches_target), int(MIN_PATCHES[largest_size] * (1 + 0.4 * (num_nodules - 1))))
    else:
        num_nodules, n_target = 0, int(num_patches_target)
    cell = LOCATIONS.index(largest_location) if has_tumor else None
    for _ in range(20):
        try:
            tissue, labels, box, nodules = _draw(rng, n_target, has_tumor, num_nodules, largest_size, cell)
            break
        except _NoRoom:
            n_target = int(n_target * 1.3)
    else:
        raise RuntimeError(f"could not place {num_nodules} nodules in a slide of {n_target} patches")

    rows, cols = np.nonzero(tissue)  # row-major patch order
    n = rows.size
    h, w = tissue.shape
    protos = class_prototypes(dim)
    field = smooth_noise(rng, h, w, FIELD_SCALE, FIELD_RANK)[rows, cols] @ rng.normal(0, 1 / math.sqrt(FIELD_RANK), (FIELD_RANK, dim))
    lab = labels[rows, cols]
    feats = (protos[lab] + FIELD_STD * field + rng.normal(0, STAIN_STD, dim)
             + rng.normal(0, NOISE_STD, (n, dim))).astype(np.float32)
    origin = rng.integers(0, 40, 2) * patch_size + rng.integers(0, patch_size, 2)  # level-0 (x, y) of cell (0, 0)
    coords = np.stack([origin[0] + cols * patch_size, origin[1] + rows * patch_size], 1).astype(np.int64)

    r0, r1, c0, c1 = box  # tissue bounding box in grid cells -> level-0 pixels
    to_px = lambda cy, cx: [float(origin[0] + cx * patch_size), float(origin[1] + cy * patch_size)]  # noqa: E731
    nod = sorted(({"center": to_px(d["cy"], d["cx"]), "radius": float(d["r"] * patch_size),
                   "size": size_class(d["r"]), "location": _location(d["cy"], d["cx"], box),
                   "num_patches": 0, "_rc": (d["cy"], d["cx"], d["r"])} for d in nodules),
                 key=lambda d: -d["radius"])
    for d in nod:  # tumour + necrosis patches inside this nodule's extent
        cy, cx, r = d.pop("_rc")
        inside = np.hypot(rows + 0.5 - cy, cols + 0.5 - cx) < 1.4 * r
        d["num_patches"] = int(np.isin(lab[inside], (TUMOR, NECROSIS)).sum())
    counts = np.bincount(lab, minlength=len(TISSUE_CLASSES))
    facts = {
        "has_tumor": bool(has_tumor),
        "num_nodules": len(nod),
        "nodules": nod,
        "largest_size": nod[0]["size"] if nod else None,
        "largest_location": nod[0]["location"] if nod else None,
        "class_counts": {name: int(c) for name, c in zip(TISSUE_CLASSES, counts)},
        "tissue_box": [float(origin[0] + c0 * patch_size), float(origin[1] + r0 * patch_size),
                       float(origin[0] + c1 * patch_size), float(origin[1] + r1 * patch_size)],
        "grid": [int(h), int(w)],
        "patch_size": int(patch_size),
    }
    return {"features": feats, "coords": coords, "patch_size": int(patch_size), "labels": lab, "facts": facts}


def slide_plan(index: int) -> dict:
    """Stratified tumour settings for slide ``index``: any run of consecutive slides is balanced.

    Even slides have tumour; among them the nodule count (1, 2, 3+) and the largest nodule's
    size each cycle with period 3, shifted so all 9 combinations appear every 18 slides.
    """
    if index % 2:
        return {"has_tumor": False}
    j = index // 2
    return {"has_tumor": True, "count_bucket": j % 3, "largest_size": SIZE_CLASSES[(j + j // 3) % 3]}


def _write_slide(job: tuple) -> Path:
    """Slide ``i`` of a synthetic set: a function of (seed, i) only."""
    from topopack.io import save_slide

    out, i, seed, min_patches, max_patches, dim, patch_size, fmt = job
    rng = np.random.default_rng([seed, i])
    n = int(round(math.exp(rng.uniform(math.log(min_patches), math.log(max_patches)))))
    plan = slide_plan(i)
    kw = {"has_tumor": plan["has_tumor"]}
    if plan["has_tumor"]:
        kw["num_nodules"] = (1, 2, int(rng.integers(3, 5)))[plan["count_bucket"]]
        kw["largest_size"] = plan["largest_size"]
        kw["largest_location"] = LOCATIONS[int(rng.integers(9))]
    s = make_slide(rng, n, dim, patch_size, **kw)
    return save_slide(Path(out) / f"slide_{i:03d}.{fmt}", s["features"], s["coords"], s["patch_size"],
                      labels=s["labels"], facts=s["facts"])


def write_synthetic(out, slides: int, seed: int = 0, *, min_patches: int = 300, max_patches: int = 3000,
                    dim: int = 64, patch_size: int = 256, fmt: str = "h5", progress: bool = True,
                    workers: int = 1) -> list[Path]:
    """Write ``slides`` synthetic slides to ``out`` (slide_000.h5, ...) in ``workers`` processes; slide i depends
    only on (seed, i)."""
    from topopack.model.parallel import parallel_map

    if slides < 1 or not 1 <= min_patches <= max_patches:
        raise ValueError(f"need slides >= 1 and 1 <= min_patches <= max_patches, got {slides}, {min_patches}, {max_patches}")
    if patch_size < 1 or dim < 1:
        raise ValueError(f"need patch_size >= 1 and dim >= 1, got {patch_size}, {dim}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, min_patches, max_patches, dim, patch_size, fmt) for i in range(slides)]
    return parallel_map(_write_slide, jobs, workers, desc="synth slides", show=progress)


# ---- `topopack synth` -------------------------------------------------------------------
@dataclass
class SynthConfig:
    out: str = option(help="output directory")
    slides: int = option(20, "number of slides", check=POSITIVE)
    seed: int = option(0, "seed (slide i depends only on the seed and i)")
    min_patches: int = option(300, "smallest slide (patches, approximate)", check=POSITIVE)
    max_patches: int = option(3000, "largest slide (patches, approximate)", check=POSITIVE)
    dim: int = option(64, "feature width", check=POSITIVE)
    patch_size: int = option(256, "level-0 patch size in pixels", check=POSITIVE)
    format: str = option("h5", "file format", choices=("h5", "pt"))
    vqa: bool = option(False, "also write vqa_train.json, vqa_test.json and captions.json (topopack.model.vqa_data)")
    per_slide: int = option(12, "VQA records per slide (with --vqa)", check=POSITIVE)
    heldout: float = option(0.2, "fraction of slides (the last ones, topopack.io.split_slides) for vqa_test.json",
                            check=FRACTION)
    workers: int = option(0, "processes (0 = every usable core)", check=NON_NEGATIVE)

    def __post_init__(self):
        validate(self)
        if self.min_patches > self.max_patches:
            raise ValueError(f"--min-patches {self.min_patches} exceeds --max-patches {self.max_patches}")


def add_arguments(p) -> None:
    add_config_arguments(p, SynthConfig)


def main(args) -> int:
    from topopack.model.parallel import usable_cores

    args = config_from_args(SynthConfig, args)
    workers = args.workers or usable_cores()
    t0 = time.perf_counter()
    paths = write_synthetic(args.out, args.slides, args.seed, min_patches=args.min_patches,
                            max_patches=args.max_patches, dim=args.dim, patch_size=args.patch_size, fmt=args.format,
                            workers=workers)
    from topopack.io import load_slide

    facts = [load_slide(p).facts for p in paths]
    sizes = [sum(f["class_counts"].values()) for f in facts]
    print(f"wrote {len(paths)} slides to {args.out} in {time.perf_counter() - t0:.1f} s: "
          f"{min(sizes)}-{max(sizes)} patches, {sum(f['has_tumor'] for f in facts)} with tumour")
    if args.vqa:
        from .vqa_data import answer_stats, load_vqa, make_vqa_files

        files = make_vqa_files(args.out, seed=args.seed, per_slide=args.per_slide, heldout=args.heldout,
                               workers=workers)
        for name, path in files.items():
            recs = load_vqa(path)
            print(f"{name}: {len(recs)} records -> {path}")
            if name != "captions":
                for fam, st in answer_stats(recs).items():
                    print(f"  {fam:12s} n={st['n']:4d} chance={st['chance']:.2f} answers={st['answers']}")
    return 0
