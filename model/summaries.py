"""The frozen slide encoder's output per slide, computed once: region -> memory tokens for the Q-Former.

An image may also be a pre-encoded region file (the authors' format, written here by ``write_region_file``)::

    {"features": [n_packs, C] memory tokens, "pack_indices": [n_packs], "region_coords": [[x0, y0], [x1, y1]],
     "num_tokens": n_packs, "positions": [n_packs, 2] pack centres in [0, 1] (topopack's addition)}

Its tokens feed the Q-Former as they are; without ``positions`` every pack sits at the centre (the anchored
queries then see no layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from topopack.io import load_slide
from topopack.model.encoder import SlideEncoder
from topopack.model.llm import freeze
from topopack.model.prompt import encode_conversation
from topopack.model.regions import RegionError, pack_positions, packs_in_region
from topopack.model.vlm import Sample

REGION_KEYS = ("features", "pack_indices", "region_coords", "num_tokens")


@dataclass
class EncodedSlide:
    summaries: torch.Tensor   # [P, D + C] frozen encoder summary tokens, then the pack's raw mean feature (cpu f32)
    positions: torch.Tensor   # [P, 2] pack centres in [0, 1]
    layout: object            # the slide's TopoLayout (cpu), for region -> packs
    origin: tuple[int, int]
    cell_size: int            # level-0 grid step (the patch size, less any TRIDENT overlap)


@dataclass
class EncodedRegion:
    summaries: torch.Tensor   # [n, C] the file's memory tokens
    positions: torch.Tensor   # [n, 2]


def read_region_file(path) -> EncodedRegion | None:
    """The tokens of a pre-encoded region file; None if ``path`` is not one (a slide feature file)."""
    path = Path(path)
    if path.suffix.lower() not in (".pt", ".pth"):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is reported by name
        raise RegionError(f"{path}: unreadable as a .pt file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "coords" in obj or "features" not in obj or "pack_indices" not in obj:
        return None
    feats = torch.as_tensor(obj["features"]).float()
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise RegionError(f"{path}: region 'features' must be [n_packs, C] with n_packs >= 1, got {tuple(feats.shape)}")
    if "num_tokens" in obj and int(obj["num_tokens"]) != feats.shape[0]:
        raise RegionError(f"{path}: num_tokens {int(obj['num_tokens'])} but {feats.shape[0]} feature rows")
    pos = obj.get("positions")
    pos = torch.full((feats.shape[0], 2), 0.5) if pos is None else torch.as_tensor(pos).float()
    if pos.shape != (feats.shape[0], 2):
        raise RegionError(f"{path}: 'positions' must be [{feats.shape[0]}, 2], got {tuple(pos.shape)}")
    return EncodedRegion(feats, pos)


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
    def get(self, path) -> EncodedSlide | EncodedRegion:
        key = str(Path(path).resolve())
        if key not in self.slides:
            region = read_region_file(key)
            if region is not None:
                self.slides[key] = region
                return region
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

    def memory_dim(self, paths) -> int:
        """Width of the memory tokens (encoder width + input feature width); all images must agree."""
        widths = {}
        for p in ([paths] if isinstance(paths, (str, Path)) else paths):
            widths.setdefault(self.get(p).summaries.shape[1], str(p))
        if len(widths) > 1:
            raise RegionError("images give memory tokens of different widths: " +
                              ", ".join(f"{w} ({p})" for w, p in widths.items()) +
                              "; pre-encoded region files must come from the encoder used for the slides")
        return next(iter(widths))

    def encode_all(self, paths) -> None:
        from topopack.model.progress import progress

        for p in progress(sorted(set(map(str, paths))), desc="encode slides"):
            self.get(p)

    def region(self, path, box=None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.get(path)
        if isinstance(e, EncodedRegion):
            if box is not None:
                raise RegionError(f"{path}: a pre-encoded region file holds one region; it takes no region box")
            return e.summaries, e.positions
        idx = packs_in_region(e.layout, e.origin, e.cell_size, box)
        return e.summaries[idx], e.positions[idx]


def write_region_file(path, cache: SummaryCache, slide, box) -> Path:
    """A pre-encoded region file (the module docstring's format) of ``box`` of ``slide``, from ``cache``."""
    e = cache.get(slide)
    if isinstance(e, EncodedRegion):
        raise RegionError(f"{slide}: already a region file")
    idx = packs_in_region(e.layout, e.origin, e.cell_size, box)
    x0, y0, x1, y1 = (float(v) for v in box)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": e.summaries[idx].clone(), "pack_indices": idx.clone(),
                "region_coords": torch.tensor([[x0, y0], [x1, y1]]), "num_tokens": int(idx.numel()),
                "positions": e.positions[idx].clone()}, path)
    return path


def make_samples(records: list[dict], tokenizer, cache: SummaryCache, style: str,
                 with_answer: bool = True) -> list[Sample]:
    """Tokenized conversations (every answer supervised; without ``with_answer`` the last answer is left to
    generate) with the memory tokens of each record's image and region."""
    cache.encode_all(r["slide"] for r in records)
    out = []
    for r in records:
        turns = list(r["turns"]) if with_answer else [*r["turns"][:-1], (r["turns"][-1][0], None)]
        before, after, labels = encode_conversation(tokenizer, turns, style)
        mem, pos = cache.region(r["slide"], r.get("region"))
        out.append(Sample(before, after, labels, mem, pos))
    return out

