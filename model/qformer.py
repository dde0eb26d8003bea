"""Q-Former connector: learned queries read a region's summary tokens and become LLM visual tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import FRACTION, NON_NEGATIVE, POSITIVE, option, validate


@dataclass
class QFormerConfig:
    enc_dim: int = option(512, "width of the memory tokens (set from the encoder)", check=POSITIVE, cli=False)
    llm_dim: int = option(4096, "width of the LLM's token embeddings (set from the LLM)", check=POSITIVE, cli=False)
    dim: int = option(512, "Q-Former width", check=POSITIVE)
    num_queries: int = option(32, "learned queries = visual tokens", check=POSITIVE)
    depth: int = option(2, "Q-Former layers", check=POSITIVE)
    heads: int = option(8, "attention heads", check=POSITIVE)
    mlp_ratio: float = option(4.0, "FFN width / dim", check=POSITIVE)
    dropout: float = option(0.1, "dropout", check=FRACTION)
    pos_freqs: int = option(4, "Fourier frequencies of the pack-position code added to the keys (0 = off)",
                            check=NON_NEGATIVE)
    # attention to a register is a reference that lets the queries sense how MUCH of something a region holds
    registers: int = option(1, "learned keys always present next to the region's tokens", check=NON_NEGATIVE)
    # in cross-attention each anchored query reads mostly the keys near its anchor point in the region
    anchors: int = option(3, "side g of a g x g grid of spatially anchored queries (the first g*g; 0 = none)",
                          check=NON_NEGATIVE)

    def __post_init__(self):
        validate(self)
        if self.dim % self.heads:
            raise ValueError(f"Q-Former dim {self.dim} must be a multiple of heads {self.heads}")
        if self.anchors ** 2 > self.num_queries:
            raise ValueError(f"anchors={self.anchors}: a {self.anchors}x{self.anchors} grid needs <= num_queries="
                             f"{self.num_queries} queries")


def fourier_positions(pos: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[..., 2] positions in [0, 1] -> [..., 2 + 4 * num_freqs]: the centred coordinates and sin/cos features
    (attention-weighted means of them are centroids and spreads of what the queries attend to)."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=pos.device, dtype=pos.dtype)
    ang = pos[..., None] * freqs  # [..., 2, F]
    return torch.cat([pos - 0.5, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)


def region_positions(pos: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """[B, M, 2] positions re-normalised to each region's own extent (first/last pack centre -> 0/1; a region one
    pack wide -> 0.5). Padded entries are ignored and come out 0.5."""
    pos = pos.masked_fill(pad_mask[..., None], 0.0)
    big = torch.finfo(pos.dtype).max
    lo = pos.masked_fill(pad_mask[..., None], big).amin(1, keepdim=True)
    hi = pos.masked_fill(pad_mask[..., None], -big).amax(1, keepdim=True)
    span = hi - lo
    local = torch.where(span > 1e-6, (pos - lo) / span.clamp_min(1e-6), torch.full_like(pos, 0.5))
    return local.masked_fill(pad_mask[..., None], 0.5)


def anchor_points(side: int) -> torch.Tensor:
    """[side * side, 2] (x, y) centres of a side x side grid over [0, 1]^2, row-major (top-left first)."""
    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


class QFormerLayer(nn.Module):
    """Pre-LN: self-attention over the queries, cross-attention to the memory, FFN."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        d = cfg.dim
        self.norm1, self.norm2, self.norm3, self.norm_mem = (nn.LayerNorm(d) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        hidden = int(d * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = cfg.heads
        # anchored queries: additive cross-attention bias -dist^2 / (2 sigma^2), a learned sigma per head
        # (initialised to one anchor cell)
        self.log_sigma = (nn.Parameter(torch.full((cfg.heads,), math.log(1.0 / cfg.anchors)))
                          if cfg.anchors > 0 else None)

    def forward(self, q, memory, pad_mask, dist2=None, need_weights: bool = False):
        """dist2 [B, Q, K] squared anchor-key distances (0 for free queries and registers) or None.
        ``need_weights``: return (q, self-attention [B, H, Q, Q], cross-attention [B, H, Q, K]) per-head weights."""
        kw = dict(need_weights=True, average_attn_weights=False) if need_weights else dict(need_weights=False)
        h = self.norm1(q)
        sa, self_w = self.self_attn(h, h, h, **kw)
        q = q + self.drop(sa)
        m = self.norm_mem(memory)
        bias = torch.zeros(pad_mask.shape, dtype=q.dtype, device=q.device).masked_fill(pad_mask, float("-inf"))
        bias = bias[:, None, None, :].expand(-1, self.heads, q.shape[1], -1)
        if dist2 is not None:
            inv = 0.5 * torch.exp(-2.0 * self.log_sigma).to(q.dtype)
            bias = bias - dist2[:, None] * inv[None, :, None, None]
        bias = bias.reshape(-1, q.shape[1], pad_mask.shape[1])
        ca, cross_w = self.cross_attn(self.norm2(q), m, m, attn_mask=bias, **kw)
        q = q + self.drop(ca)
        q = q + self.drop(self.ffn(self.norm3(q)))
        return (q, self_w, cross_w) if need_weights else q


class QFormer(nn.Module):
    """forward(memory [B, M, enc_dim], pad_mask [B, M] True = padding, positions [B, M, 2] | None)
    -> [B, num_queries, llm_dim].

    The first ``anchors**2`` queries are anchored on a grid over the region (row-major, top-left first), so their
    sequence position in the LLM prompt says where in the region they looked; the others attend freely."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("anchor_xy", anchor_points(cfg.anchors), persistent=False)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(cfg.registers, cfg.dim) * 0.02)
        self.mem_proj = nn.Linear(cfg.enc_dim, cfg.dim)
        self.pos_proj = nn.Linear(2 + 4 * cfg.pos_freqs, cfg.dim) if cfg.pos_freqs > 0 else None
        self.layers = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.llm_dim)

    def forward(self, memory: torch.Tensor, pad_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, need_weights: bool = False):
        """With ``need_weights``: (visual tokens, [(self-attention [B, H, Q, Q], cross-attention [B, H, Q, R + M])
        per layer]); the cross-attention keys are the ``registers`` learned keys, then the memory tokens."""
        if memory.ndim != 3 or memory.shape[-1] != self.cfg.enc_dim:
            raise ValueError(f"memory must be [B, M, {self.cfg.enc_dim}], got {tuple(memory.shape)}")
        b, m, _ = memory.shape
        if pad_mask is None:
            pad_mask = torch.zeros(b, m, dtype=torch.bool, device=memory.device)
        if pad_mask.shape != (b, m) or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be bool [B, M] = [{b}, {m}], got {pad_mask.dtype} {tuple(pad_mask.shape)}")
        if bool(pad_mask.all(1).any()):
            raise ValueError("a sample has no memory tokens (every key is padding): its region is empty")
        mem = self.mem_proj(memory)
        if self.pos_proj is not None and positions is not None:
            mem = mem + self.pos_proj(fourier_positions(positions.to(mem.dtype), self.cfg.pos_freqs))
        # padded keys never reach the output; zero them too so they cannot carry NaN into matmuls
        mem = mem.masked_fill(pad_mask[..., None], 0.0)
        mem = torch.cat([self.registers.expand(b, -1, -1), mem], 1)
        dist2 = self.anchor_distances(pad_mask, positions, mem.dtype)
        pad_mask = torch.cat([pad_mask.new_zeros(b, self.cfg.registers), pad_mask], 1)
        q = self.queries.expand(b, -1, -1)
        weights = []
        for layer in self.layers:
            if need_weights:
                q, self_w, cross_w = layer(q, mem, pad_mask, dist2, need_weights=True)
                weights.append((self_w, cross_w))
            else:
                q = layer(q, mem, pad_mask, dist2)
        out = self.out(self.norm(q))
        return (out, weights) if need_weights else out

    def anchor_distances(self, pad_mask, positions, dtype) -> torch.Tensor | None:
        """[B, Q, R + M] squared distances from each anchored query's grid point to the keys (positions
        re-normalised to the region) minus that to the nearest key; 0 for free queries and the register keys.
        None without anchors or positions."""
        if self.cfg.anchors == 0 or positions is None:
            return None
        b, m = pad_mask.shape
        local = region_positions(positions.to(dtype), pad_mask)             # [B, M, 2]
        d2 = (self.anchor_xy.to(dtype)[None, :, None] - local[:, None]).square().sum(-1)  # [B, A, M]
        # relative to the nearest key, so every anchor reads some tissue next to the (unbiased) register keys
        d2 = d2 - d2.masked_fill(pad_mask[:, None], float("inf")).amin(-1, keepdim=True)
        out = d2.new_zeros(b, self.cfg.num_queries, self.cfg.registers + m)
        out[:, :d2.shape[1], self.cfg.registers:] = d2
        return out
