"""Read and write patch-feature files: TRIDENT / CLAM h5 and .pt dicts.

A slide file holds ``features`` [N, C] and ``coords`` [N, 2] (level-0 top-left x, y) plus
the level-0 patch size. TRIDENT writes ``patch_size_level0`` as an attribute of the
``coords`` dataset; CLAM writes ``patch_size`` with ``patch_level`` / ``downsample``
(level-0 size = patch_size * downsample). Attributes are looked up on ``coords`` first,
then on the file. TRIDENT's ``overlap`` (pixels at the patch level) makes the grid step
the level-0 patch size minus the level-0 overlap: ``Slide.cell_size``, the layout's cell.
Optional datasets: ``summary_features`` [packs, C], ``global_features`` [C], ``labels`` [N]
(int tissue class) and a ``facts`` attribute (a JSON string), the last two written by the
synthetic generator (topopack.model.synth).

Every problem is reported as a ``SlideError`` naming the file and what is wrong.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .layout import LayoutError, TopoLayout

SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")  # slide files, any case: load_slide and find_slides
EXTRA_KEYS = ("summary_features", "global_features", "labels", "facts")


class SlideError(ValueError):
    """A slide file that cannot be used; the message names the file and the problem."""


@dataclass
class Slide:
    """One slide's patch features and geometry (everything on the CPU)."""

    path: str
    features: torch.Tensor  # float32 [N, C]
    coords: torch.Tensor  # int64 [N, 2] (x, y) level-0 top-left, on a lattice of cell_size (see _snap_trident_edge)
    patch_size: int  # level-0 patch size in pixels
    cell_size: int | None = None  # level-0 grid step: patch_size minus the overlap (TRIDENT); None: patch_size
    summary_features: torch.Tensor | None = None  # float32 [P, C]
    global_features: torch.Tensor | None = None  # float32 [C]
    labels: torch.Tensor | None = None  # int64 [N]
    facts: dict | None = None
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.cell_size is None:
            self.cell_size = self.patch_size

    @property
    def in_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def origin(self) -> tuple[int, int]:
        """Level-0 (x, y) of the top-left patch corner of the slide's grid."""
        x, y = self.coords.min(0).values.tolist()
        return int(x), int(y)

    def layout(self, pack_size: int = 3, origin=None, device=None) -> TopoLayout:
        """The slide's TopoLayout (TopoLayout.from_coords with cell_size as the patch size); errors name this file.

        Layouts with the default origin (the smallest coords) are cached per pack size
        (load_slide builds the pack_size=3 one while validating the coords).
        """
        if origin is not None and [int(v) for v in torch.as_tensor(origin).reshape(-1).tolist()] == list(self.origin):
            origin = None  # the default origin: same layout
        key = int(pack_size) if origin is None and isinstance(pack_size, (int, np.integer)) else None
        layout = self._layouts.get(key)
        if layout is None:
            try:
                layout = TopoLayout.from_coords(self.coords, self.cell_size, pack_size, origin=origin)
            except LayoutError as e:
                raise SlideError(f"{self.path}: {e}") from None
            if key is not None:
                self._layouts[key] = layout
        if self.summary_features is not None and self.summary_features.shape[0] != layout.num_packs:
            raise SlideError(f"{self.path}: summary_features has {self.summary_features.shape[0]} rows but the slide "
                             f"has {layout.num_packs} packs at pack_size={pack_size}")
        return layout if device is None else layout.to(device)


# ---- reading ------------------------------------------------------------------------
def _read_h5(path: Path) -> dict:
    import h5py

    out: dict = {}
    with h5py.File(path, "r") as f:
        for name in ("features", "coords", "summary_features", "global_features", "labels"):
            if name in f:
                if not isinstance(f[name], h5py.Dataset):
                    raise SlideError(f"{path}: '{name}' is a group, expected a dataset")
                out[name] = f[name][()]
        attrs = dict(f.attrs)
        if "coords" in f:
            attrs.update(dict(f["coords"].attrs))  # TRIDENT / CLAM keep them on coords
    for key in ("patch_size_level0", "patch_size", "downsample", "patch_level", "overlap"):
        if key in attrs:
            out[key] = attrs[key]
    if "facts" in attrs:
        out["facts"] = attrs["facts"]
    return out


def _read_pt(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise SlideError(f"{path}: a .pt slide must hold a dict with 'features' and 'coords', got {type(obj).__name__}")
    return obj


def _array(path, name, value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError
        return arr.astype(dtype)
    except (TypeError, ValueError):
        raise SlideError(f"{path}: '{name}' is not a numeric array") from None


def _finite(path, name, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.argwhere(bad)[0].tolist()
        raise SlideError(f"{path}: '{name}' contains NaN or inf (first at index {idx})")


def _scalar(path, name, value) -> float:
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise SlideError(f"{path}: attribute '{name}' is empty")
    if arr.size > 1 and not np.allclose(arr, arr[0]):
        raise SlideError(f"{path}: attribute '{name}' differs between x and y ({arr.tolist()}); "
                         "non-square patches are not supported")
    return float(arr[0])


def _override_hint(coords: np.ndarray) -> str:
    """How to pass the level-0 patch size, with the coords step as the likely value."""
    g = min((g for g in _steps(coords) if g > 0), default=0)
    if not g:
        return "pass patch_size=<level-0 patch size> to load_slide / load_slides (--patch-size on the command line)"
    return (f"the coords step by {g} pixels, so it is probably {g}: pass patch_size={g} to load_slide / load_slides "
            f"(--patch-size {g} on the command line)")


def _patch_size(path, raw: dict, coords: np.ndarray, override: int | None) -> tuple[int, str, str | None]:
    """(level-0 patch size, where it came from, the file attribute(s) to fix or None for an override)."""
    if override is not None:
        size, source, attr = float(override), f"patch_size={override} as passed", None
    elif "patch_size_level0" in raw:
        size = _scalar(path, "patch_size_level0", raw["patch_size_level0"])
        source, attr = "the file's 'patch_size_level0' attribute", "'patch_size_level0' attribute"
    elif "patch_size" in raw:
        size = _scalar(path, "patch_size", raw["patch_size"])
        source, attr = "the file's 'patch_size' attribute", "'patch_size' attribute"
        if "downsample" in raw:
            size *= _scalar(path, "downsample", raw["downsample"])
            source, attr = "the file's 'patch_size' x 'downsample' attributes", "'patch_size' / 'downsample' attributes"
        elif "patch_level" in raw and _scalar(path, "patch_level", raw["patch_level"]) != 0:
            level = _scalar(path, "patch_level", raw["patch_level"])
            raise SlideError(f"{path}: has patch_size {size:g} at patch_level {level:g} but no 'downsample' attribute, "
                             f"so the level-0 patch size is unknown; {_override_hint(coords)}")
    else:
        raise SlideError(f"{path}: missing the patch size: no 'patch_size_level0' or 'patch_size' attribute on "
                         f"'coords' or the file; {_override_hint(coords)}")
    if not (np.isfinite(size) and size > 0 and abs(size - round(size)) < 1e-6):
        raise SlideError(f"{path}: level-0 patch size must be a positive integer, got {size}")
    return int(round(size)), source, attr


def _steps(coords: np.ndarray) -> list[int]:
    """Per axis (x, y): the gcd of the offsets from the smallest coordinate; 0 where all patches share one."""
    offsets = coords - coords.min(0)
    return [int(np.gcd.reduce(offsets[:, a])) for a in range(2)]


def _overlap_level0(path, raw: dict, size: int) -> int:
    """TRIDENT's 'overlap' (pixels at the patch level, like 'patch_size') in level-0 pixels; 0 if absent."""
    if "overlap" not in raw:
        return 0
    overlap = _scalar(path, "overlap", raw["overlap"])
    if overlap == 0:
        return 0
    if not (np.isfinite(overlap) and overlap > 0):
        raise SlideError(f"{path}: attribute 'overlap' must be a non-negative number of pixels, got {overlap:g}")
    if "patch_size" not in raw:
        raise SlideError(f"{path}: has overlap {overlap:g} but no 'patch_size' attribute: TRIDENT gives the overlap in "
                         "pixels at the patch level, so its level-0 size is unknown; add the patch-level 'patch_size'")
    level_size = _scalar(path, "patch_size", raw["patch_size"])
    if not (np.isfinite(level_size) and level_size > 0):
        raise SlideError(f"{path}: attribute 'patch_size' must be a positive number of pixels, got {level_size:g}")
    overlap0 = int(round(overlap * size / level_size))  # level-0 pixels, rounded as TRIDENT does
    if overlap0 >= size:
        raise SlideError(f"{path}: overlap {overlap:g} ({overlap0} pixels at level 0) is not smaller than the patch "
                         f"size {size}: fix the file's 'overlap' attribute")
    return overlap0


def _snap_trident_edge(coords: np.ndarray, size: int, step: int) -> np.ndarray:
    """TRIDENT puts column (row) 0 at 0 and column 1 at ``size``, then steps by ``step`` (size - overlap).

    Patches at 0 on such an axis move to size - step, one step before column 1, so that all coords lie on one
    lattice of the grid step. A no-op where the axis is already regular.
    """
    coords = coords.copy()
    for a in range(2):
        v = coords[:, a]
        rest = v[v > 0]
        if (v.min() == 0 and ((v - v.min()) % step).any() and rest.size and rest.min() >= size
                and not ((rest - size) % step).any()):
            v[v == 0] = size - step
    return coords


def _check_grid(path, coords: np.ndarray, step: int, noun: str, origin: str, fix: str) -> None:
    """The coords must step by exactly ``step`` along every axis with more than one patch position.

    A larger step (e.g. CLAM at level 1 read as level 0) would put adjacent patches cells apart. ``noun`` and
    ``origin`` say what ``step`` is and where it comes from; ``fix`` ends the error for a larger step ({g}: it).
    """
    steps = _steps(coords)
    for a, g in enumerate(steps):
        if g % step:
            off = (coords[:, a] - coords[:, a].min()) % step
            row = int(np.flatnonzero(off)[0])
            raise SlideError(f"{path}: coords are not on the patch grid: along {'xy'[a]} they step by {g} pixels, "
                             f"not a multiple of the {noun} {step} ({origin}); first off-grid: "
                             f"row {row} {coords[row].tolist()}")
    wide = [(g, a) for a, g in enumerate(steps) if g > step]
    if wide:
        g, a = min(wide)
        raise SlideError(f"{path}: the coords step by {g} pixels along {'xy'[a]} but the {noun} is {step} ({origin}), "
                         f"so adjacent patches would be {g // step} cells apart and the packs would be wrong: "
                         f"{fix.format(g=g)}")


def _facts(path, value) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, bytes):
        value = value.decode()
    try:
        facts = json.loads(str(value))
    except json.JSONDecodeError as e:
        raise SlideError(f"{path}: attribute 'facts' is not valid JSON ({e})") from None
    if not isinstance(facts, dict):
        raise SlideError(f"{path}: attribute 'facts' must be a JSON object, got {type(facts).__name__}")
    return facts


def _check_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except FileNotFoundError:
        if path.is_symlink():
            raise SlideError(f"{path}: dangling symlink to {os.readlink(path)} (restore the target or remove the "
                             "link)") from None
        raise SlideError(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SlideError(f"{path}: symlink loop (fix or remove the link)") from None
        raise SlideError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SlideError(f"{path}: not a file (a folder or device named like a slide: rename or remove it)")


def load_slide(path, patch_size: int | None = None) -> Slide:
    """Read and validate one feature file (.h5 TRIDENT/CLAM or .pt dict).

    ``patch_size`` (the commands' --patch-size) overrides the level-0 patch size: needed for files that do
    not store it, CLAM files at patch_level > 0 without 'downsample', and files whose attribute is wrong.
    Either way the coords must step by exactly that size (less a TRIDENT overlap) along every axis with more
    than one patch position.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise SlideError(f"{path}: unsupported file type '{path.suffix}', expected one of {', '.join(SUFFIXES)}")
    _check_file(path)
    try:
        raw = _read_h5(path) if path.suffix.lower() in (".h5", ".hdf5") else _read_pt(path)
    except SlideError:
        raise
    except Exception as e:  # h5py / torch raise many types for corrupt files
        raise SlideError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None

    missing = [k for k in ("features", "coords") if k not in raw]
    if missing:
        raise SlideError(f"{path}: missing dataset(s) {', '.join(repr(m) for m in missing)}")
    feats = _array(path, "features", raw["features"], np.float32)
    coords = _array(path, "coords", raw["coords"], np.float64)
    if feats.ndim != 2:
        raise SlideError(f"{path}: 'features' must be 2-D [N, C], got shape {feats.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideError(f"{path}: 'coords' must have shape [N, 2] (x, y), got {coords.shape}")
    if feats.shape[0] == 0:
        raise SlideError(f"{path}: zero patches")
    if feats.shape[1] == 0:
        raise SlideError(f"{path}: 'features' has zero channels")
    if feats.shape[0] != coords.shape[0]:
        raise SlideError(f"{path}: mismatched lengths: {feats.shape[0]} features but {coords.shape[0]} coords")
    _finite(path, "features", feats)
    _finite(path, "coords", coords)
    if (coords != np.round(coords)).any():
        raise SlideError(f"{path}: coords are not on the patch grid: they must be integer pixel positions")
    coords = coords.astype(np.int64)
    n, c = feats.shape
    size, source, attr = _patch_size(path, raw, coords, patch_size)
    overlap0 = _overlap_level0(path, raw, size)
    step = size - overlap0
    if overlap0:
        coords = _snap_trident_edge(coords, size, step)
        noun, origin = "grid step", f"the level-0 patch size {size} from {source}, minus the overlap {overlap0}"
        fix = "check the file's patch size and 'overlap' attributes"
    else:
        noun, origin = "level-0 patch size", source
        fix = "pass patch_size={g} / --patch-size {g}" + (f", or fix the file's {attr}" if attr else "")
    _check_grid(path, coords, step, noun, origin, fix)

    extras: dict = {}
    if raw.get("summary_features") is not None:
        s = _array(path, "summary_features", raw["summary_features"], np.float32)
        if s.ndim != 2 or s.shape[1] != c:
            raise SlideError(f"{path}: 'summary_features' must have shape [packs, {c}], got {s.shape}")
        _finite(path, "summary_features", s)
        extras["summary_features"] = torch.from_numpy(s)
    if raw.get("global_features") is not None:
        g = _array(path, "global_features", raw["global_features"], np.float32)
        if g.shape not in ((c,), (1, c)):
            raise SlideError(f"{path}: 'global_features' must have shape [{c}], got {g.shape}")
        _finite(path, "global_features", g)
        extras["global_features"] = torch.from_numpy(g.reshape(c))
    if raw.get("labels") is not None:
        lab = _array(path, "labels", raw["labels"], np.float64)
        if lab.shape != (n,):
            raise SlideError(f"{path}: 'labels' must have shape [{n}], got {lab.shape}")
        if not np.isfinite(lab).all() or (lab != np.round(lab)).any() or (lab < 0).any():
            raise SlideError(f"{path}: 'labels' must be non-negative integers")
        extras["labels"] = torch.from_numpy(lab.astype(np.int64))
    if raw.get("facts") is not None:
        extras["facts"] = _facts(path, raw["facts"])

    slide = Slide(str(path), torch.from_numpy(feats), torch.from_numpy(coords), size, step, **extras)
    try:  # grid and duplicate checks (TopoLayout.from_coords); the layout is cached for later use
        slide.layout(pack_size=3)
    except SlideError as e:
        if "summary_features" not in str(e):  # summary rows are checked against the pack size actually used
            raise
    return slide


def find_slides(directory) -> list[Path]:
    """The slide files in ``directory`` (not its subfolders), sorted; SlideError if there are none.

    A slide file is an entry whose suffix is in SUFFIXES, in any case (the suffixes load_slide reads). Entries
    with other suffixes (.json, .txt, ...) are not slides and are ignored. Nothing with a slide suffix is skipped:
    dangling symlinks, symlink loops and folders come back too, and load_slide reports them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SlideError(f"{directory}: not a directory")
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES)
    except OSError as e:
        raise SlideError(f"{directory}: cannot list the directory ({e.strerror})") from None
    if not paths:
        raise SlideError(f"{directory}: no slide files ({', '.join(SUFFIXES)}, any case)")
    return paths


def load_slides(directory, patch_size: int | None = None) -> list[Slide]:
    """Load every slide file in ``directory`` (see find_slides); ``patch_size`` as in load_slide.

    Never skips: all bad files are listed in one SlideError.
    """
    slides, errors = [], []
    for p in find_slides(directory):
        try:
            slides.append(load_slide(p, patch_size=patch_size))
        except SlideError as e:
            errors.append(str(e))
    if errors:
        raise SlideError(f"{len(errors)} bad slide file(s) in {directory}:\n  " + "\n  ".join(errors))
    return slides


def split_slides(items: Sequence, heldout: float = 0.2) -> tuple[list, list]:
    """The one (train, held-out) split: of slide paths or Slides, sorted by path, the last ceil(heldout * n).

    Returns the items given, sorted. With topopack.model.synth's stratified plan, any run of consecutive slides
    is balanced.
    """
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be a fraction in [0, 1), got {heldout}")
    items = sorted(items, key=lambda s: str(s.path if isinstance(s, Slide) else s))
    n_out = int(np.ceil(heldout * len(items))) if heldout > 0 else 0
    if n_out >= len(items) and items:
        raise ValueError(f"heldout={heldout} leaves no training slides out of {len(items)}")
    return items[:len(items) - n_out], items[len(items) - n_out:]


# ---- writing ------------------------------------------------------------------------
def _np(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def save_slide(path, features, coords, patch_size: int, **extras) -> Path:
    """Write a TRIDENT-style h5 (or a .pt dict, by suffix).

    ``extras``: summary_features, global_features, labels (datasets) and facts (dict,
    stored as a JSON string attribute of the file).
    """
    path = Path(path)
    unknown = set(extras) - set(EXTRA_KEYS)
    if unknown:
        raise ValueError(f"save_slide: unknown extras {sorted(unknown)}; allowed: {EXTRA_KEYS}")
    data = {"features": _np(features, np.float32), "coords": _np(coords, np.int64)}
    for key in ("summary_features", "global_features"):
        if extras.get(key) is not None:
            data[key] = _np(extras[key], np.float32)
    if extras.get("labels") is not None:
        data["labels"] = _np(extras["labels"], np.int64)
    facts = extras.get("facts")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".pt", ".pth"):
        obj = {k: torch.from_numpy(v) for k, v in data.items()}
        obj["patch_size_level0"] = int(patch_size)
        if facts is not None:
            obj["facts"] = json.dumps(facts)
        torch.save(obj, path)
        return path
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ValueError(f"{path}: unsupported file type '{path.suffix}', expected .h5 or .pt")
    import h5py

    with h5py.File(path, "w") as f:
        for key, arr in data.items():
            f.create_dataset(key, data=arr)
        f["coords"].attrs["patch_size_level0"] = int(patch_size)
        f["coords"].attrs["patch_size"] = int(patch_size)
        f["coords"].attrs["patch_level"] = 0
        if facts is not None:
            f.attrs["facts"] = json.dumps(facts)
    return path
