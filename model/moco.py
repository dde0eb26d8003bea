"""MoCo contrast on summary tokens.

A query encoder (+ projection head) sees one noised view of a slide crop, a momentum
copy sees another. For each pack, the positive key is either the same pack in the
other view or a spatially adjacent pack (pack_cell neighbour); negatives come from a
queue of past keys. The momentum copy, the queue and its pointer are module state
(parameters without grad and buffers), so checkpoints carry them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from topopack import TopoLayout

from .crops import Crop
from .encoder import SlideEncoder

# the 8 neighbouring pack cells (row, col offsets)
OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


@dataclass
class MoCoConfig:
    momentum: float = 0.999
    queue: int = 8192
    temperature: float = 0.07
    proj_dim: int = 128
    noise_std: float = 0.2        # per channel, in units of the crop's feature std
    neighbour_prob: float = 0.5   # chance that a pack's positive is a neighbour (when it has one)


@dataclass
class ContrastBatch:
    query: torch.Tensor       # [1, N, C] view seen by the query encoder
    key: torch.Tensor         # [1, N, C] view seen by the momentum encoder
    layout: TopoLayout
    positive: torch.Tensor    # [P] the pack whose key is each pack's positive
    neighbours: torch.Tensor  # [P, 8] adjacent packs of the same slide, -1 where absent
    query_summaries: torch.Tensor | None = None  # [1, P, C] the files' summary tokens, noised like the patches
    key_summaries: torch.Tensor | None = None
    global_features: torch.Tensor | None = None  # [1, S, C]

    def to(self, device) -> "ContrastBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def pack_neighbours(layout: TopoLayout) -> torch.Tensor:
    """[P, 8] index of each pack's adjacent packs (same slide), -1 where the cell holds no pack."""
    cell = layout.pack_cell.cpu() + 1  # >= 1 so that offsets stay >= 0
    span = int(cell.max()) + 2
    key = (layout.pack_slide.cpu() * span + cell[:, 0]) * span + cell[:, 1]
    order = torch.argsort(key)
    sorted_key = key[order]
    out = []
    for dr, dc in OFFSETS:
        want = (layout.pack_slide.cpu() * span + cell[:, 0] + dr) * span + cell[:, 1] + dc
        pos = torch.searchsorted(sorted_key, want).clamp_max(len(key) - 1)
        out.append(torch.where(sorted_key[pos] == want, order[pos], torch.full_like(pos, -1)))
    return torch.stack(out, 1).to(layout.device)


def contrast_batch(crops, pack_size: int, cfg: MoCoConfig, gen: torch.Generator) -> ContrastBatch:
    """Two noised views of each crop (a Crop, or features [N, C], coords, patch_size, origin) and each pack's
    positive. The files' summary features, when the crops carry them, are the summary tokens' inputs (noised with
    the same per-channel scale), as in finetune; their global features go in unchanged."""
    from .mae import file_tokens

    crops = [Crop(*c) for c in crops]
    has_summaries, has_global = file_tokens(crops)
    layouts, views, keys, q_summ, k_summ = [], [], [], [], []
    for features, coords, patch_size, origin, summaries, _ in crops:
        layouts.append(TopoLayout.from_coords(coords, patch_size, pack_size, origin=origin))
        std = features.std(0, keepdim=True) if features.shape[0] > 1 else features.new_ones(1, features.shape[1])
        noise = lambda x: x + torch.randn(x.shape, generator=gen) * std * cfg.noise_std  # noqa: E731
        views.append(noise(features))
        keys.append(noise(features))
        if has_summaries:
            q_summ.append(noise(summaries))
            k_summ.append(noise(summaries))
    layout = TopoLayout.cat(layouts)
    nb = pack_neighbours(layout)
    # pick one existing neighbour per pack at random, or the pack itself
    score = torch.rand(nb.shape, generator=gen).masked_fill(nb < 0, -1.0)
    pick = nb.gather(1, score.argmax(1, keepdim=True))[:, 0]
    use_nb = (torch.rand(nb.shape[0], generator=gen) < cfg.neighbour_prob) & (pick >= 0)
    positive = torch.where(use_nb, pick, torch.arange(nb.shape[0]))
    glob = torch.stack([c.global_ for c in crops])[None] if has_global else None
    return ContrastBatch(torch.cat(views)[None], torch.cat(keys)[None], layout, positive, nb,
                         torch.cat(q_summ)[None] if has_summaries else None,
                         torch.cat(k_summ)[None] if has_summaries else None, glob)


def projection_head(dim: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))


class MoCo(nn.Module):
    """forward(batch) -> (loss, metrics); call momentum_step() after each optimizer step."""

    def __init__(self, encoder: SlideEncoder, cfg: MoCoConfig = MoCoConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = projection_head(encoder.cfg.dim, cfg.proj_dim)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_head = copy.deepcopy(self.head)
        for p in self.key_params():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: list[torch.Tensor] = []  # keys of this step's micro-batches, enqueued at step end

    def key_params(self):
        return list(self.key_encoder.parameters()) + list(self.key_head.parameters())

    def embed(self, features, layout, key: bool = False, summaries=None, globals_=None) -> torch.Tensor:
        """[P, proj_dim] unit-norm embeddings of the summary tokens."""
        enc, head = (self.key_encoder, self.key_head) if key else (self.encoder, self.head)
        return F.normalize(head(enc(features, layout, summaries, globals_).summaries[0]).float(), dim=-1)

    def views(self, batch: ContrastBatch, key: bool = False) -> torch.Tensor:
        if key:
            return self.embed(batch.key, batch.layout, True, batch.key_summaries, batch.global_features)
        return self.embed(batch.query, batch.layout, False, batch.query_summaries, batch.global_features)

    def forward(self, batch: ContrastBatch):
        q = self.views(batch)
        with torch.no_grad():
            k = self.views(batch, key=True)[batch.positive]
        pos = (q * k).sum(-1, keepdim=True)
        neg = q @ self.queue.t()
        logits = torch.cat([pos, neg], 1) / self.cfg.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self._pending.append(k.detach())
        return loss, {"pos_cos": float(pos.detach().mean()), "neg_cos": float(neg.detach().mean())}

    @torch.no_grad()
    def momentum_step(self) -> None:
        """EMA of the query weights into the key weights, then enqueue this step's keys (all ranks)."""
        m = self.cfg.momentum
        online = list(self.encoder.parameters()) + list(self.head.parameters())
        for pk, pq in zip(self.key_params(), online):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        if not self._pending:
            return
        keys = _gather(torch.cat(self._pending))
        self._pending.clear()
        keys = keys[-self.cfg.queue:]
        n, size = keys.shape[0], self.cfg.queue
        idx = (int(self.queue_ptr) + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates x [n_r, D] from every rank in rank order (rows may differ per rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@torch.no_grad()
def evaluate(model: MoCo, batches) -> dict[str, float]:
    """Held-out cosine of each pack to its positive key vs. the mean cosine to every
    non-adjacent pack of the batch (eval mode)."""
    was = model.training
    model.eval()
    pos_sum = neg_sum = pos_n = neg_n = 0.0
    for b in batches:
        q = model.views(b)
        k = model.views(b, key=True)
        sim = q @ k.t()
        p = q.shape[0]
        pos_sum += float(sim[torch.arange(p), b.positive].sum())
        pos_n += p
        near = torch.zeros(p, p, dtype=torch.bool, device=sim.device)
        near[torch.arange(p), torch.arange(p)] = True
        rows, cols = (b.neighbours >= 0).nonzero(as_tuple=True)
        near[rows, b.neighbours[rows, cols]] = True
        neg_sum += float(sim[~near].sum())
        neg_n += float((~near).sum())
    model.train(was)
    return {"pos_cos": pos_sum / max(pos_n, 1), "neg_cos": neg_sum / max(neg_n, 1)}
