"""Dense mask and masked softmax attention in float64: the correctness oracle."""
from __future__ import annotations

import math

import torch

from topopack.layout import TopoLayout
from topopack.rules import PAPER, TopoRules, allowed

MAX_DENSE_TOKENS = 20_000


def dense_mask(layout: TopoLayout, rules: TopoRules = PAPER) -> torch.Tensor:
    """bool [L, L]: mask[i, j] is True where token i may attend to token j."""
    if layout.num_tokens > MAX_DENSE_TOKENS:
        raise ValueError(
            f"the dense reference is O(L^2) and refuses {layout.num_tokens} tokens "
            f"(limit {MAX_DENSE_TOKENS}); use backend='portable' or 'triton'"
        )
    kind, pack, slide = layout.token_kind.long(), layout.token_pack, layout.token_slide
    return allowed(rules, kind[:, None], pack[:, None], slide[:, None], kind[None], pack[None], slide[None])


def attention(q, k, v, layout: TopoLayout, rules: TopoRules = PAPER, scale: float | None = None) -> torch.Tensor:
    """Masked softmax attention computed in float64; returns q.dtype. q, k: [B, H, L, D], v: [B, H, L, Dv]."""
    mask = dense_mask(layout, rules).to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # every row sees its global token; a NaN input stays NaN
    return torch.einsum("bhij,bhjd->bhid", probs, v.double()).to(q.dtype)
