"""The backend registry: name -> implementation with the reference's signature.

Every backend is ``fn(q, k, v, layout, rules, scale) -> out`` on [B, H, L, D]
tensors in token order. Adding a backend is one line here plus its own module.
"""
from __future__ import annotations

import importlib
import sys

import torch

from topopack.kernels import triton_runs_on

BACKENDS = {
    "reference": "topopack.reference.dense:attention",
    "portable": "topopack.kernels.portable:portable_attention",
    "triton": "topopack.kernels.triton:triton_attention",
    "flex": "topopack.kernels.flex:flex_attention",
}


def auto_backend(device: torch.device) -> str:
    """Triton on CUDA when it is installed, portable elsewhere (the interpreter is for tests)."""
    return "triton" if device.type == "cuda" and triton_runs_on(device) else "portable"


def get_backend(name: str | None, device: torch.device):
    """The implementation for ``name`` ("auto" or None picks by device)."""
    name = auto_backend(device) if name in (None, "auto") else name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    module, fn = BACKENDS[name].split(":")
    try:  # sys.modules first: torch.compile cannot trace importlib.import_module
        return getattr(sys.modules.get(module) or importlib.import_module(module), fn)
    except ImportError as e:
        raise ImportError(f"backend {name!r} is not available: {e}") from e
