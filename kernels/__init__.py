"""Fast topo-pack attention backends: portable PyTorch, Triton."""
import importlib.util
import os

import torch

from .portable import portable_attention

__all__ = ["portable_attention", "triton_attention", "triton_runs_on"]

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and `device` is CUDA, or the CPU under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def __getattr__(name):
    # lazy: importing triton (and decorating the kernels) waits for first use, so that
    # TRITON_INTERPRET can still be set after `import topopack`
    if name == "triton_attention":
        from .triton import triton_attention
        return triton_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
