"""The files of `topopack extract`: TRIDENT-layout h5 writing, the pack and slide tokens, and resuming.

A file is written as ``.<name>.h5.part-<pid>`` (not a slide suffix: no command reads it) and renamed when
complete; ``finished`` tells a complete file of this run's settings from a foreign or mismatched one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .wsi import SlideReadError

PART = ".part-"


def write_new(path: Path, features, coords, coords_attrs: dict, **extra_attrs) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=np.asarray(features, np.float32))
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in {**coords_attrs, **extra_attrs}.items():
            c.attrs[key] = value
        for key, value in extra_attrs.items():
            feats.attrs[key] = value


def add_tokens(path: Path, summary, glob, pack_size: int, encoder_name: str) -> None:
    """Write (or replace) summary_features and global_features, and the run's attributes."""
    import h5py

    with h5py.File(path, "a") as f:
        for key, value in (("summary_features", summary), ("global_features", glob)):
            if key in f:
                del f[key]
            f.create_dataset(key, data=np.asarray(value, np.float32))
        f.attrs["pack_size"] = pack_size
        f.attrs["topopack_encoder"] = encoder_name


def finished(out: Path, expected: dict, in_place: bool) -> bool:
    """Whether OUT is a finished file of this run's settings; errors for a foreign or mismatched file."""
    import h5py

    if not out.exists():
        return False
    try:
        with h5py.File(out, "r") as f:
            attrs = {**f.attrs, **(f["coords"].attrs if "coords" in f else {})}
            complete = "summary_features" in f and "global_features" in f
    except OSError as e:
        raise SlideReadError(f"{out}: exists but cannot be read ({e}): delete it to extract the slide again") from None
    if "topopack_encoder" not in attrs:
        if in_place:
            return False
        raise SlideReadError(f"{out}: exists and was not written by topopack extract: choose another --out")
    differ = [f"{k} {_value(attrs.get(k))!r} (this run: {v!r})" for k, v in expected.items()
              if _value(attrs.get(k)) != v]
    if differ:
        raise SlideReadError(f"{out}: was extracted with other settings: {', '.join(differ)}; use another --out or "
                             "delete the file")
    return complete


def _value(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def remove_stale_parts(out_dir: Path) -> None:
    """Temporary files of runs that no longer exist (killed before they could rename or delete them)."""
    for part in out_dir.glob(f".*{PART}*"):
        pid = part.name.rsplit(PART, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
