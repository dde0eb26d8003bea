"""The drop-in layer: topo_pack_attention (function) and TopoPackAttention (module)."""
from __future__ import annotations

import torch
from torch import nn

from .backends import get_backend
from .layout import TopoLayout
from .rules import PAPER, TopoRules


def _validate(q, k, v, layout: TopoLayout, rules) -> None:
    if not isinstance(layout, TopoLayout):
        raise TypeError(f"layout must be a TopoLayout, got {type(layout).__name__}")
    if not isinstance(rules, TopoRules):
        raise TypeError(f"rules must be a TopoRules (topopack.PAPER or topopack.BIDIRECTIONAL), got {rules!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a [B, H, L, D] tensor, got {getattr(t, 'shape', type(t))}")
        if t.shape[2] != layout.num_tokens:
            raise ValueError(f"{name} has {t.shape[2]} tokens (dim 2) but the layout has {layout.num_tokens}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} has head_dim 0")
        if 0 in t.shape[:2]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: B and H must be at least 1; skip the call for an "
                             "empty batch")
        if t.device != layout.device:
            raise ValueError(f"{name} is on {t.device} but the layout is on {layout.device}; move one with .to()")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:  # v may have its own head_dim, as in F.scaled_dot_product_attention
        raise ValueError(f"v must match q in [B, H, L], got {tuple(v.shape)} and {tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def topo_pack_attention(q, k, v, layout: TopoLayout, *, rules: TopoRules = PAPER,
                        scale: float | None = None, backend: str | None = "auto") -> torch.Tensor:
    """Sparse topo-pack attention with the conventions of F.scaled_dot_product_attention.

    q, k: [B, H, L, D] and v: [B, H, L, Dv] in the layout's token order (B > 1 shares the
    layout; B and H at least 1) -> [B, H, L, Dv] in the dtype of q.
    backend: "auto" (Triton on CUDA, portable elsewhere), "portable", "triton",
    "flex" or "reference" (dense float64 oracle).
    """
    _validate(q, k, v, layout, rules)
    return get_backend(backend, q.device)(q, k, v, layout, rules, scale)


class TopoPackAttention(nn.Module):
    """Multi-head topo-pack self-attention: forward(x [B, L, C], layout) -> [B, L, C]."""

    def __init__(self, dim: int, num_heads: int, *, rules: TopoRules = PAPER, qkv_bias: bool = True,
                 backend: str | None = "auto"):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.rules, self.backend = rules, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: TopoLayout) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"x must be [B, L, C], got {tuple(x.shape)}")
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = topo_pack_attention(qkv[0], qkv[1], qkv[2], layout, rules=self.rules, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, rules={self.rules.name}, backend={self.backend}"
