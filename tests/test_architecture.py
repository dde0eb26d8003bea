"""One direction of imports: the core (layout, rules, attention, backends, io, kernels, reference) never imports
topopack.model."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    names = [f"topopack.{p.stem}" for p in (ROOT / "topopack").glob("*.py") if p.stem != "__init__"]
    names += [f"topopack.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"]
    names += [f"topopack.reference.{p.stem}" for p in (ROOT / "reference").glob("*.py") if p.stem != "__init__"]
    return sorted(names)


def test_core_imports_nothing_from_model():
    mods = core_modules()
    assert "topopack.layout" in mods and "topopack.kernels.portable" in mods
    code = (f"import importlib, sys\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith('topopack.model'))\n"
            "assert not bad, f'the core imported {bad}'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_core_files_hold_only_core_modules():
    """topopack/ is layout, rules, attention, backends and io (plus the package file)."""
    assert {p.stem for p in (ROOT / "topopack").glob("*.py")} == {"__init__", "layout", "rules", "attention",
                                                                   "backends", "io"}
