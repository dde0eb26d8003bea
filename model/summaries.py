"""The frozen slide encoder's output per slide, computed once: region -> memory tokens for the Q-Former."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from topopack.io import load_slide
from topopack.model.encoder import SlideEncoder
from topopack.model.llm import freeze
from topopack.model.records import turn
from topopack.model.regions import pack_positions, packs_in_region
from topopack.model.vlm import Sample, tokenize_turn

@dataclass
class EncodedSlide:
    summaries: torch.Tensor   # [P, D + C] frozen encoder summary tokens, then the pack's raw mean feature (cpu f32)
    positions: torch.Tensor   # [P, 2] pack centres in [0, 1]
    layout: object            # the slide's TopoLayout (cpu), for region -> packs
    origin: tuple[int, int]
    cell_size: int            # level-0 grid step (the patch size, less any TRIDENT overlap)


class SummaryCache:
    """Encodes each slide once with the frozen encoder; ``region(path, box)`` -> (memory, positions).

    A pack's memory token is its encoded summary token concatenated with the mean of its input patch features
    (the input the encoder's summary token starts from), so the connector sees the slide's features directly too.
    """

    def __init__(self, encoder: SlideEncoder, device="cpu", patch_size: int | None = None):
        self.encoder = freeze(encoder).eval().to(device)
        self.device = torch.device(device)
        self.patch_size = patch_size  # level-0 patch size for files that lack or misstate it (load_slide)
        self.slides: dict[str, EncodedSlide] = {}

    @torch.no_grad()
    def get(self, path) -> EncodedSlide:
        key = str(Path(path).resolve())
        if key not in self.slides:
            s = load_slide(key, patch_size=self.patch_size)
            k = self.encoder.cfg.pack_size
            layout = s.layout(pack_size=k, origin=s.origin)
            dev = self.device
            summ = None if s.summary_features is None else s.summary_features[None].to(dev)
            glob = None if s.global_features is None else s.global_features.reshape(1, 1, -1).to(dev)
            out = self.encoder(s.features[None].to(dev), layout.to(dev), summ, glob)
            feats = s.features.float()
            raw = feats.new_zeros(layout.num_packs, feats.shape[1]).index_add_(0, layout.patch_pack.long(), feats)
            raw /= layout.pack_patch_count.to(raw.dtype).clamp_min(1)[:, None]
            memory = torch.cat([out.summaries[0].float().cpu(), raw], -1)
            self.slides[key] = EncodedSlide(memory, pack_positions(layout), layout, s.origin, s.cell_size)
        return self.slides[key]

    def memory_dim(self, path) -> int:
        """Width of the memory tokens of a slide (encoder width + input feature width)."""
        return self.get(path).summaries.shape[1]

    def encode_all(self, paths) -> None:
        from tqdm.auto import tqdm
        for p in tqdm(sorted(set(paths)), desc="encode slides", leave=False):
            self.get(p)

    def region(self, path, box=None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.get(path)
        idx = packs_in_region(e.layout, e.origin, e.cell_size, box)
        return e.summaries[idx], e.positions[idx]


def make_samples(records: list[dict], tokenizer, cache: SummaryCache, with_answer: bool = True) -> list[Sample]:
    cache.encode_all(r["slide"] for r in records)
    out = []
    for r in records:
        q, a = turn(r)
        before, after, ans = tokenize_turn(tokenizer, q, a if with_answer else None)
        mem, pos = cache.region(r["slide"], r.get("region"))
        out.append(Sample(before, after, ans, mem, pos))
    return out

