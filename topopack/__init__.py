"""topopack: fast, exact Sparse Topo-Pack Attention for whole-slide images.

The names below load on first use, so that ``import topopack.model.cli`` (the console script) answers ``--help``
without importing torch.
"""
import importlib

_EXPORTS = {
    "TopoPackAttention": "attention", "topo_pack_attention": "attention",
    "LayoutError": "layout", "TopoLayout": "layout",
    "BIDIRECTIONAL": "rules", "PAPER": "rules", "RULES_BY_NAME": "rules", "TopoRules": "rules",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
