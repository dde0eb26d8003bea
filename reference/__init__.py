"""Dense float64 oracle for topo-pack attention: O(L^2), for tests only."""
from .dense import MAX_DENSE_TOKENS, attention, dense_mask

__all__ = ["MAX_DENSE_TOKENS", "attention", "dense_mask"]
