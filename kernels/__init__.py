"""Fast topo-pack attention backends: portable PyTorch, Triton."""
from .portable import portable_attention

__all__ = ["portable_attention", "triton_attention"]


def __getattr__(name):
    # lazy: importing triton (and decorating the kernels) waits for first use, so that
    # TRITON_INTERPRET can still be set after `import topopack`
    if name == "triton_attention":
        from .triton import triton_attention
        return triton_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
