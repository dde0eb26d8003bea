"""Fast topo-pack attention backends: portable PyTorch, Triton."""
from .portable import portable_attention

__all__ = ["portable_attention"]
