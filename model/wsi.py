"""Reading whole-slide images with OpenSlide for `topopack extract`: magnification, patch geometry, patches,
pack mosaics and the thumbnail.

A pack's mosaic is its patches pasted into a white square of k x k cells (cell = the grid step at the patch
level; a missing patch stays white), the image whose embedding is the pack's summary feature.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# what OpenSlide opens, any case (.mrxs needs its companion folder beside it)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
STANDARD_MAGNIFICATIONS = (2.5, 5, 10, 20, 40, 60, 80)  # an mpp-derived power within 10% of one snaps to it
WHITE = (255, 255, 255)


class SlideReadError(ValueError):
    """A slide that cannot be used; the message names it."""


def open_slide(path):
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideReadError(f"{path}: not a slide format OpenSlide can read (corrupt, or not a whole-slide image)"
                             ) from None
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideReadError(f"{path}: OpenSlide cannot open it ({type(e).__name__}: {e})") from None


def find_wsi(path) -> list[Path]:
    """``path`` itself if it is a file, else the slides (SLIDE_SUFFIXES) in the folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such slide file or folder")
    slides = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not slides:
        raise FileNotFoundError(f"{path}: no slides ({', '.join(SLIDE_SUFFIXES)}, any case)")
    return slides


def level0_magnification(slide, path, magnification: float | None = None, mpp: float | None = None) -> float:
    """The objective power of level 0: the override, else the slide's objective power, else 10 / mpp."""
    import openslide

    if magnification is not None:
        return float(magnification)
    props = slide.properties
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if mpp is None and power not in (None, ""):
        try:
            return float(power)
        except ValueError:
            pass  # unparsable: try the mpp
    if mpp is None:
        try:
            mpp = float(props.get(openslide.PROPERTY_NAME_MPP_X, ""))
        except ValueError:
            raise SlideReadError(f"{path}: its level-0 magnification is unknown (no objective power or mpp in the "
                                 "metadata): pass --magnification (e.g. 20 or 40) or --mpp (e.g. 0.5 or 0.25)"
                                 ) from None
    if not mpp > 0:
        raise SlideReadError(f"{path}: mpp must be > 0, got {mpp}: pass --magnification or --mpp")
    mag = 10.0 / mpp
    near = min(STANDARD_MAGNIFICATIONS, key=lambda m: abs(m - mag))
    return float(near) if abs(near - mag) <= 0.1 * near else mag


@dataclass(frozen=True)
class Geometry:
    """Patches of ``patch_size`` pixels (the patch level) covering ``patch_size_level0`` level-0 pixels, read at
    OpenSlide ``level`` as ``read_size`` pixels; ``step`` is the grid step at the patch level."""

    patch_size: int
    patch_size_level0: int
    level: int
    read_size: int
    step: int

    @classmethod
    def of(cls, slide, patch_size: int, patch_size_level0: int, step_level0: int | None = None) -> Geometry:
        down = patch_size_level0 / patch_size
        level = slide.get_best_level_for_downsample(down)
        read = max(1, round(patch_size_level0 / slide.level_downsamples[level]))
        step = round((step_level0 or patch_size_level0) * patch_size / patch_size_level0)
        return cls(patch_size, patch_size_level0, level, read, step)


def to_rgb(image):
    """An OpenSlide RGBA image over white (transparent = outside the scanned area) as RGB."""
    from PIL import Image

    if image.mode != "RGBA":
        return image.convert("RGB")
    base = Image.new("RGBA", image.size, WHITE + (255,))
    return Image.alpha_composite(base, image).convert("RGB")


def read_patch(slide, x: int, y: int, g: Geometry):
    from PIL import Image

    img = to_rgb(slide.read_region((int(x), int(y)), g.level, (g.read_size, g.read_size)))
    if g.read_size != g.patch_size:
        img = img.resize((g.patch_size, g.patch_size), Image.BILINEAR)
    return img


def mosaic(patches, slots, k: int, step: int):
    """``patches`` (PIL) pasted at their (row, col) ``slots`` of a white (k*step)^2 square, in the order given."""
    from PIL import Image

    canvas = Image.new("RGB", (k * step, k * step), WHITE)
    for img, (r, c) in zip(patches, slots):
        canvas.paste(img, (int(c) * step, int(r) * step))
    return canvas


def square_thumbnail(slide, side: int):
    """The whole slide shrunk into a white side x side square (aspect kept, centred)."""
    from PIL import Image

    thumb = to_rgb(slide.get_thumbnail((side, side)))
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(thumb, ((side - thumb.width) // 2, (side - thumb.height) // 2))
    return canvas


def pack_order(layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, slots, starts): the input rows of the patches pack by pack (row-major inside a pack), their
    (row, col) inside the pack, and each pack's first position in ``rows`` ([P + 1])."""
    k = layout.pack_size
    cell = layout.patch_cell.cpu()
    slot = cell % k
    rows = torch.argsort(layout.patch_pack.cpu() * k * k + slot[:, 0] * k + slot[:, 1])
    starts = torch.zeros(layout.num_packs + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(layout.pack_patch_count.cpu(), 0)
    return rows.numpy(), slot[rows].numpy(), starts.numpy()


class PackDataset(torch.utils.data.Dataset):
    """Item p: pack p's mosaic as the encoder's input, and (``with_patches``) its patches and their input rows.

    Each process opens the slide itself (a handle shared across fork would share the file offset).
    """

    def __init__(self, path, coords: np.ndarray, layout, geometry: Geometry, encoder, with_patches: bool):
        self.path, self.coords, self.g, self.with_patches = str(path), coords, geometry, with_patches
        self.k = layout.pack_size
        self.rows, self.slots, self.starts = pack_order(layout)
        self.patch_transform, self.image_transform = encoder.patch_transform, encoder.image_transform
        self._slide, self._pid = None, None

    def __len__(self) -> int:
        return len(self.starts) - 1

    def slide(self):
        if self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path), os.getpid()
        return self._slide

    def __getitem__(self, p: int):
        a, b = self.starts[p], self.starts[p + 1]
        rows = self.rows[a:b]
        patches = [read_patch(self.slide(), *self.coords[r], self.g) for r in rows]
        mos = self.image_transform(mosaic(patches, self.slots[a:b], self.k, self.g.step))
        if not self.with_patches:
            return mos, torch.empty(0), torch.empty(0, dtype=torch.long)
        return mos, torch.stack([self.patch_transform(im) for im in patches]), torch.from_numpy(rows.copy())


def collate_packs(items):
    mosaics, patches, rows = zip(*items)
    return torch.stack(mosaics), torch.cat(patches), torch.cat(rows)
