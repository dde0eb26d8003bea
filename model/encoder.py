"""The slide encoder: a pre-LN transformer whose every attention is topo-pack attention.

One TopoLayout is built per slide (or per batch of slides, via TopoLayout.cat) and
passed through all blocks. Inputs are patch features in the slide's input order;
summary and global tokens start as the mean of their pack / slide unless given.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from topopack import RULES_BY_NAME, TopoLayout, TopoPackAttention
from topopack.layout import segment_mean
from topopack.model.timing import median_seconds

from .config import FRACTION, NON_NEGATIVE, POSITIVE, option, validate
from .trainer import atomic_save


@dataclass
class SlideEncoderConfig:
    """Defaults follow the authors' slide encoder (width 512, 6 blocks, 8 heads, packs of 3x3)."""

    in_dim: int = option(help="width of the input patch features (read from the data)", check=POSITIVE, cli=False)
    dim: int = option(512, "encoder width", check=POSITIVE)
    depth: int = option(6, "transformer blocks", check=NON_NEGATIVE)
    heads: int = option(8, "attention heads", check=POSITIVE)
    mlp_dim: int = option(2048, "FFN width", check=POSITIVE)
    dropout: float = option(0.1, "dropout", check=FRACTION)
    pack_size: int = option(3, "pack side k (k x k patches per pack)", check=POSITIVE)
    rules: str = option("paper", "attention rules", choices=tuple(RULES_BY_NAME))
    pos_embed: bool = option(False, "add a 2D sin-cos code of the grid cells (off in the authors' code)")
    center_input: bool = option(True, "subtract each slide's mean patch feature first (removes slide-wide stain "
                                      "shifts)")
    backend: str = option("auto", "attention backend: auto, triton, portable, flex, reference")

    def __post_init__(self):
        validate(self)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.pos_embed and self.dim % 4:
            raise ValueError(f"pos_embed needs dim divisible by 4, got {self.dim}")


class EncoderOutput(NamedTuple):
    patches: torch.Tensor    # [B, N, dim] in the input patch order
    summaries: torch.Tensor  # [B, P, dim] in pack order
    globals: torch.Tensor    # [B, S, dim] one per slide
    tokens: torch.Tensor     # [B, L, dim] in the layout's token order


def sincos_2d(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sin-cos position code of (row, col) positions [n, 2] -> [n, dim] (MAE style, dim % 4 == 0)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=cells.device, dtype=torch.float32) / max(1, quarter))
    out = [f(cells[:, i, None].float() * omega) for i in (0, 1) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1)


def token_positions(layout: TopoLayout, dim: int) -> torch.Tensor:
    """[L, dim] sin-cos codes in token order: patches at their grid cell, summaries at their
    pack's centre (in patch units), global tokens zero."""
    k = layout.pack_size
    pos = torch.zeros(layout.num_tokens, dim, device=layout.device)
    pos[layout.patch_token] = sincos_2d(layout.patch_cell, dim)
    pos[layout.pack_summary_token] = sincos_2d(layout.pack_cell.float() * k + (k - 1) / 2, dim)
    return pos


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x), layout), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, rules, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TopoPackAttention(dim, heads, rules=rules, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: TopoLayout) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), layout))
        return x + self.mlp(self.norm2(x))


class SlideEncoder(nn.Module):
    """forward(patch_features [B, N, in_dim], layout, summary_features=None, global_features=None) -> EncoderOutput.

    B > 1 shares one layout (e.g. augmented views of one slide); several slides of
    different sizes go in one call as B = 1 with ``TopoLayout.cat``.
    """

    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        self.cfg = cfg
        rules = RULES_BY_NAME[cfg.rules]
        self.proj = nn.Linear(cfg.in_dim, cfg.dim)
        self.type_embed = nn.Embedding(3, cfg.dim)  # global, summary, patch
        nn.init.normal_(self.type_embed.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.dropout, rules, cfg.backend)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.grad_checkpointing = False  # a training setting, not part of the architecture

    def embed(self, patch_features, layout: TopoLayout, summary_features=None, global_features=None):
        """Input tokens [B, L, dim] before the blocks (projection + type and optional position codes)."""
        cfg = self.cfg
        if patch_features.ndim != 3:
            raise ValueError(f"patch_features must be [B, N, in_dim], got {tuple(patch_features.shape)}")
        if patch_features.shape[-1] != cfg.in_dim:
            raise ValueError(f"patch_features have width {patch_features.shape[-1]}, the encoder expects in_dim={cfg.in_dim}")
        if layout.pack_size != cfg.pack_size:
            raise ValueError(f"layout has pack_size {layout.pack_size}, the encoder was built for {cfg.pack_size}")
        if cfg.center_input:
            patch_slide = layout.pack_slide[layout.patch_pack]
            mean = segment_mean(patch_features, patch_slide, layout.num_slides)
            patch_features = patch_features - mean[..., patch_slide, :]
            summary_features = None if summary_features is None else summary_features - mean[..., layout.pack_slide, :]
            global_features = None if global_features is None else global_features - mean
        x = layout.tokens_from_patches(patch_features, summary_features, global_features)
        x = self.proj(x) + self.type_embed(layout.token_kind.long())
        if cfg.pos_embed:
            x = x + token_positions(layout, cfg.dim).to(x.dtype)
        return self.drop(x)

    def forward_tokens(self, x: torch.Tensor, layout: TopoLayout) -> torch.Tensor:
        """The blocks and the final norm on embedded tokens [B, L, dim]; with ``grad_checkpointing`` each block's
        activations are recomputed in backward instead of kept (whole slides in training)."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return self.norm(x)

    def forward(self, patch_features, layout: TopoLayout, summary_features=None, global_features=None) -> EncoderOutput:
        tokens = self.forward_tokens(self.embed(patch_features, layout, summary_features, global_features), layout)
        return EncoderOutput(layout.patches_from_tokens(tokens), layout.summaries_from_tokens(tokens),
                             layout.globals_from_tokens(tokens), tokens)


@torch.no_grad()
def encoder_throughput(encoder: SlideEncoder, layout: TopoLayout, features: torch.Tensor, backends,
                       repeats: int = 5) -> dict[str, float]:
    """Patches per second of ``encoder`` on one slide with each attention backend: the median of ``repeats`` timed
    forwards after a warm-up (which compiles and autotunes); bf16 autocast on CUDA. The blocks' backend is restored."""
    cuda = features.device.type == "cuda"
    saved = [block.attn.backend for block in encoder.blocks]
    rates = {}
    try:
        for backend in backends:
            for block in encoder.blocks:
                block.attn.backend = backend

            def forward():
                with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                    encoder(features, layout)

            rates[backend] = layout.num_patches / median_seconds(forward, repeats, features.device)
    finally:
        for block, backend in zip(encoder.blocks, saved):
            block.attn.backend = backend
    return rates


def save_encoder(path, encoder: SlideEncoder) -> None:
    """Write {"config": asdict(cfg), "model": state_dict} atomically (tmp file, then rename)."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    atomic_save({"config": asdict(encoder.cfg), "model": state}, path)


def load_encoder(path, map_location=None, backend: str | None = None) -> SlideEncoder:
    """Load a SlideEncoder written by save_encoder (``backend`` overrides the saved one)."""
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: encoder checkpoint not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable encoder checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or not {"config", "model"} <= set(ckpt):
        raise ValueError(f"{path}: not an encoder checkpoint (needs keys 'config' and 'model')")
    known = {f.name for f in fields(SlideEncoderConfig)}
    cfg = SlideEncoderConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    if backend is not None:
        cfg.backend = backend
    enc = SlideEncoder(cfg)
    try:
        enc.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the saved config: {e}") from e
    if map_location is not None:
        enc.to(map_location)
    return enc
