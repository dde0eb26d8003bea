"""Masked autoencoding for the slide encoder, in two phases.

Phase 1 hides a fraction of the patches: they are removed from the encoder's input
and the layout is rebuilt from the visible coordinates (same origin, so packs keep
their grid cells and become ragged). Phase 2 hides whole packs (patches and summary).
A light decoder runs on the full layout with a mask token at every hidden position
(plus the nearest visible context: a hidden summary adds the mean of its adjacent
visible summaries, a hidden patch then adds its pack's summary) and predicts
the hidden tokens' input features (MSE) as a correction to the mean of the visible
patches. A summary's input feature is the mean of its pack's patches.

The decoder uses the bidirectional rules by default: under the paper's rules a patch
never reads its summary, so a fully hidden pack could only see the global token.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from topopack import RULES_BY_NAME, TopoLayout
from topopack.layout import segment_mean

from .crops import Crop
from .encoder import Block, SlideEncoder, token_positions
from .moco import pack_neighbours

PATCH_MASKING, PACK_MASKING = 1, 2


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    dec_dim: int = 256
    dec_depth: int = 2
    dec_heads: int = 4
    dec_rules: str = "bidirectional"


@dataclass
class MaskedBatch:
    """One masked batch of slide crops (B = 1, slides concatenated in the layouts)."""

    features: torch.Tensor         # [1, Nv, C] visible patch features
    layout: TopoLayout             # the encoder's layout of the visible patches
    full_layout: TopoLayout        # the decoder's layout of all patches
    visible_to_full: torch.Tensor  # [Lv] full-layout token of each encoder token
    target_token: torch.Tensor     # [M] full-layout token of each hidden token
    target: torch.Tensor           # [M, C] its input features
    baseline: torch.Tensor         # [M, C] trivial guess: mean of the visible patches of its slide
    neighbours: torch.Tensor       # [P, 8] adjacent packs in the full layout, -1 where absent
    phase: int
    summary_features: torch.Tensor | None = None  # [1, Pv, C] the files' summary tokens of the visible packs
    global_features: torch.Tensor | None = None   # [1, S, C] the files' global tokens

    def to(self, device) -> "MaskedBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if f.name != "phase" and getattr(self, f.name) is not None}
        return replace(self, **moved)


def file_tokens(crops: list[Crop]) -> tuple[bool, bool]:
    """Whether the crops carry the files' summary / global features: all of them or none (ValueError)."""
    out = []
    for name in ("summaries", "global_"):
        have = {getattr(c, name) is not None for c in crops}
        if len(have) > 1:
            what = "summary_features" if name == "summaries" else "global_features"
            raise ValueError(f"some slides of a batch have {what} and some do not: give every file of the data "
                             f"set the same datasets (topopack extract writes both)")
        out.append(have.pop())
    return out[0], out[1]


def mask_slides(crops, pack_size: int, ratio: float, phase: int, gen: torch.Generator) -> MaskedBatch:
    """Masks each crop (a Crop, or a tuple features [N, C], coords [N, 2], patch_size, origin [2]) and batches them.

    phase 1 hides round(ratio * N) patches per slide, phase 2 round(ratio * P) packs;
    at least one patch (pack) stays visible per slide. A hidden pack's target is the file's summary feature of the
    pack when the crops carry them (else the mean of its patches); the visible packs' summary features and the
    global features are the encoder's inputs, as in finetune.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if phase not in (PATCH_MASKING, PACK_MASKING):
        raise ValueError(f"phase must be 1 (patches) or 2 (packs), got {phase}")
    crops = [Crop(*c) for c in crops]
    has_summaries, has_global = file_tokens(crops)
    fulls, viss, feats, vis_idx, tgt_tok, tgt, base, summ = [], [], [], [], [], [], [], []
    tok_off = patch_off = 0
    for features, coords, patch_size, origin, summaries, _ in crops:
        full = TopoLayout.from_coords(coords, patch_size, pack_size, origin=origin)
        n = features.shape[0]
        if phase == PATCH_MASKING:
            keep = _choose(n, ratio, gen)
            visible = torch.zeros(n, dtype=torch.bool)
            visible[keep] = True
            hidden_packs = torch.zeros(full.num_packs, dtype=torch.bool)
        else:
            keep = _choose(full.num_packs, ratio, gen)
            hidden_packs = torch.ones(full.num_packs, dtype=torch.bool)
            hidden_packs[keep] = False
            visible = ~hidden_packs[full.patch_pack]
        vis = visible.nonzero()[:, 0]
        hid = (~visible).nonzero()[:, 0]
        mean_visible = features[vis].mean(0)
        hp = hidden_packs.nonzero()[:, 0]
        pack_target = summaries if has_summaries else segment_mean(features, full.patch_pack, full.num_packs)
        tgt_tok += [full.patch_token[hid] + tok_off, full.pack_summary_token[hp] + tok_off]
        tgt += [features[hid], pack_target[hp]]
        base.append(mean_visible.expand(hid.numel() + hp.numel(), -1))
        fulls.append(full)
        visible_layout = TopoLayout.from_coords(coords[vis], patch_size, pack_size, origin=origin)
        viss.append(visible_layout)
        if has_summaries:  # a visible pack's row: the full pack of its patches
            rows = torch.zeros(visible_layout.num_packs, dtype=torch.long)
            summ.append(summaries[rows.scatter_(0, visible_layout.patch_pack.long(), full.patch_pack[vis].long())])
        feats.append(features[vis])
        vis_idx.append(vis + patch_off)
        tok_off += full.num_tokens
        patch_off += n
    full, layout = TopoLayout.cat(fulls), TopoLayout.cat(viss)
    vis_idx = torch.cat(vis_idx)
    # encoder token -> full token: patches by input index, summaries through their patches' packs
    v2f = torch.empty(layout.num_tokens, dtype=torch.long)
    v2f[layout.patch_token] = full.patch_token[vis_idx]
    v2f[layout.pack_summary_token[layout.patch_pack]] = full.pack_summary_token[full.patch_pack[vis_idx]]
    v2f[layout.slide_global_token] = full.slide_global_token
    return MaskedBatch(torch.cat(feats)[None], layout, full, v2f, torch.cat(tgt_tok), torch.cat(tgt),
                       torch.cat(base), pack_neighbours(full), phase,
                       torch.cat(summ)[None] if has_summaries else None,
                       torch.stack([c.global_ for c in crops])[None] if has_global else None)


def _choose(n: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the max(1, n - round(ratio * n)) items that stay visible."""
    keep = max(1, n - round(ratio * n))
    return torch.randperm(n, generator=gen)[:keep]


class MAE(nn.Module):
    """Encoder + light decoder; forward(batch) -> (loss, metrics) so DDP sees the whole loss."""

    def __init__(self, encoder: SlideEncoder, cfg: MAEConfig = MAEConfig()):
        super().__init__()
        if cfg.dec_dim % 4:
            raise ValueError(f"dec_dim must be divisible by 4 (position code), got {cfg.dec_dim}")
        self.cfg = cfg
        self.encoder = encoder
        enc = encoder.cfg
        self.dec_embed = nn.Linear(enc.dim, cfg.dec_dim)
        self.mask_token = nn.Parameter(torch.randn(cfg.dec_dim) * 0.02)
        self.dec_type = nn.Embedding(3, cfg.dec_dim)
        self.dec_slot = nn.Embedding(enc.pack_size ** 2, cfg.dec_dim)  # a patch's place inside its pack
        self.pos_gain = nn.Parameter(torch.tensor(0.1))  # full-size sin-cos codes swamp the content early on
        for emb in (self.dec_type, self.dec_slot):
            nn.init.normal_(emb.weight, std=0.02)
        rules = RULES_BY_NAME[cfg.dec_rules]
        self.dec_blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, 4 * cfg.dec_dim, 0.0, rules, enc.backend)
                                        for _ in range(cfg.dec_depth))
        self.dec_norm = nn.LayerNorm(cfg.dec_dim)
        self.head = nn.Linear(cfg.dec_dim, enc.in_dim)
        nn.init.zeros_(self.head.weight)  # start at the trivial guess (see predict)
        nn.init.zeros_(self.head.bias)

    def predict(self, batch: MaskedBatch) -> torch.Tensor:
        """[M, C] predicted input features of the hidden tokens: the mean of the visible
        patches of the slide plus a learned correction (so training starts at the trivial guess)."""
        tokens = self.encoder(batch.features, batch.layout, batch.summary_features, batch.global_features).tokens
        full = batch.full_layout
        y = self.dec_embed(tokens)
        x = self.mask_token.to(y.dtype).expand(1, full.num_tokens, -1).index_copy(1, batch.visible_to_full, y)
        # hidden tokens start from their nearest visible context: a hidden summary adds the mean of
        # its adjacent visible summaries, then a hidden patch adds its pack's summary
        hidden = torch.ones(full.num_tokens, dtype=torch.bool, device=x.device)
        hidden[batch.visible_to_full] = False
        s_tok = full.pack_summary_token
        nb_tok = s_tok[batch.neighbours.clamp_min(0)]  # [P, 8]
        w = ((batch.neighbours >= 0) & ~hidden[nb_tok]).to(x.dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1)
        ctx = torch.einsum("pk,bpkd->bpd", w, x[:, nb_tok])
        x = x.index_add(1, s_tok, ctx * hidden[s_tok].to(x.dtype)[:, None])
        t = full.patch_token[hidden[full.patch_token]]
        x = x.index_add(1, t, x[:, s_tok[full.token_pack[t]]])
        pos = self.pos_gain * token_positions(full, self.cfg.dec_dim)
        x = x + self.dec_type(full.token_kind.long()) + pos.to(x.dtype)
        k = full.pack_size
        slot = self.dec_slot((full.patch_cell[:, 0] % k) * k + full.patch_cell[:, 1] % k)
        x = x.index_add(1, full.patch_token, slot[None].to(x.dtype))
        for block in self.dec_blocks:
            x = block(x, full)
        x = self.dec_norm(x)
        return batch.baseline + self.head(x[0, batch.target_token]).float()

    def forward(self, batch: MaskedBatch):
        pred = self.predict(batch).float()
        loss = F.mse_loss(pred, batch.target)
        with torch.no_grad():
            base = F.mse_loss(batch.baseline, batch.target)
        return loss, {"mse": float(loss.detach()), "baseline_mse": float(base), "phase": float(batch.phase)}


@torch.no_grad()
def evaluate(model: MAE, batches) -> dict[str, float]:
    """Masked-token MSE and the mean-of-visible baseline over fixed batches (eval mode)."""
    was = model.training
    model.eval()
    err = base = count = 0.0
    for b in batches:
        pred = model.predict(b).float()
        err += float(((pred - b.target) ** 2).sum())
        base += float(((b.baseline - b.target) ** 2).sum())
        count += b.target.numel()
    model.train(was)
    return {"masked_mse": err / count, "mean_baseline_mse": base / count}
