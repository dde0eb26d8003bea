"""Q-Former connector: learned queries read a region's summary tokens and become LLM visual tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QFormerConfig:
    enc_dim: int = 512       # width of the slide encoder's summary tokens
    llm_dim: int = 4096      # width of the LLM's token embeddings
    dim: int = 512           # Q-Former width
    num_queries: int = 32
    depth: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    pos_freqs: int = 4       # Fourier frequencies of the pack-position code added to the keys (0 = off)
    registers: int = 1       # learned keys always present next to the region's tokens: attention to them is a
                             # reference that lets the queries sense how MUCH of something a region holds


def fourier_positions(pos: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[..., 2] positions in [0, 1] -> [..., 2 + 4 * num_freqs]: the centred coordinates and sin/cos features
    (attention-weighted means of them are centroids and spreads of what the queries attend to)."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=pos.device, dtype=pos.dtype)
    ang = pos[..., None] * freqs  # [..., 2, F]
    return torch.cat([pos - 0.5, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)


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

    def forward(self, q, memory, pad_mask):
        h = self.norm1(q)
        q = q + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        m = self.norm_mem(memory)
        q = q + self.drop(self.cross_attn(self.norm2(q), m, m, key_padding_mask=pad_mask, need_weights=False)[0])
        return q + self.drop(self.ffn(self.norm3(q)))


class QFormer(nn.Module):
    """forward(memory [B, M, enc_dim], pad_mask [B, M] True = padding, positions [B, M, 2] | None)
    -> [B, num_queries, llm_dim]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(cfg.registers, cfg.dim) * 0.02)
        self.mem_proj = nn.Linear(cfg.enc_dim, cfg.dim)
        self.pos_proj = nn.Linear(2 + 4 * cfg.pos_freqs, cfg.dim) if cfg.pos_freqs > 0 else None
        self.layers = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.llm_dim)

    def forward(self, memory: torch.Tensor, pad_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
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
        pad_mask = torch.cat([pad_mask.new_zeros(b, self.cfg.registers), pad_mask], 1)
        q = self.queries.expand(b, -1, -1)
        for layer in self.layers:
            q = layer(q, mem, pad_mask)
        return self.out(self.norm(q))
