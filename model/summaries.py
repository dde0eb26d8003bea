"""The frozen slide encoder's output per slide, computed once and kept on disk: region -> memory tokens for the
Q-Former.

Each slide's memory tokens, pack positions and patch coords are written once to a cache directory as .npy files,
keyed by the slide file (path, size, mtime, --patch-size) under a fingerprint of the encoder (its weights, config
and device type), and read back memory-mapped: a rerun with the same encoder reuses them, another encoder never
sees them, and RAM holds only the slides in use. Commands keep the cache in ``user_cache_dir()``
($TOPOPACK_CACHE, else $XDG_CACHE_HOME/topopack or ~/.cache/topopack; delete it to free the space);
``SummaryCache`` without ``cache_dir`` uses a private temporary directory.

An image may also be a pre-encoded region file (the authors' format, written here by ``write_region_file``)::

    {"features": [n_packs, C] memory tokens, "pack_indices": [n_packs], "region_coords": [[x0, y0], [x1, y1]],
     "num_tokens": n_packs, "positions": [n_packs, 2] pack centres in [0, 1] (topopack's addition)}

Its tokens feed the Q-Former as they are; without ``positions`` every pack sits at the centre (the anchored
queries then see no layout).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from topopack import TopoLayout
from topopack.io import load_slide
from topopack.model.encoder import SlideEncoder, load_encoder
from topopack.model.llm import freeze
from topopack.model.prompt import encode_conversation
from topopack.model.regions import RegionError, pack_positions, packs_in_region
from topopack.model.vlm import Sample

FORMAT = 1  # of the cache entries: part of the encoder fingerprint
RECENT = 1024  # encoded slides kept open (memory maps)
RECENT_LAYOUTS = 8  # of them, the ones whose layout (rebuilt for region boxes) stays in RAM


def user_cache_dir() -> Path:
    """The commands' summary cache: $TOPOPACK_CACHE, else $XDG_CACHE_HOME/topopack, else ~/.cache/topopack."""
    if os.environ.get("TOPOPACK_CACHE"):
        return Path(os.environ["TOPOPACK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "topopack"


def encoder_fingerprint(encoder: SlideEncoder, device) -> str:
    """Hash of the encoder's weights and buffers, config, the device type and the cache format."""
    h = hashlib.blake2b(digest_size=16)
    cfg = asdict(encoder.cfg)
    h.update(json.dumps([FORMAT, torch.device(device).type, cfg], sort_keys=True, default=str).encode())
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class EncodedSlide:
    """One slide in the cache: ``summaries`` [P, D + C] (the frozen encoder's summary tokens, then each pack's
    raw mean feature) and ``positions`` [P, 2] (pack centres in [0, 1]), memory-mapped; ``layout`` is rebuilt
    from the cached coords when first asked for (region boxes need it)."""

    def __init__(self, entry: Path):
        meta = json.loads((entry / "meta.json").read_text())
        self.summaries = torch.from_numpy(np.load(entry / "memory.npy", mmap_mode="c"))
        self.positions = torch.from_numpy(np.load(entry / "positions.npy", mmap_mode="c"))
        self.origin = tuple(meta["origin"])
        self.cell_size = meta["cell_size"]  # level-0 grid step (the patch size, less any TRIDENT overlap)
        self.pack_size = meta["pack_size"]
        self._entry, self._layout = entry, None

    def release_layout(self) -> None:
        self._layout = None

    @property
    def layout(self) -> TopoLayout:
        if self._layout is None:
            coords = torch.from_numpy(np.load(self._entry / "coords.npy"))
            self._layout = TopoLayout.from_coords(coords, self.cell_size, self.pack_size, origin=self.origin)
        return self._layout


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
    """Encodes each slide once with the frozen encoder into ``cache_dir`` (see the module docstring);
    ``region(path, box)`` -> (memory, positions).

    A pack's memory token is its encoded summary token concatenated with the mean of its input patch features
    (the input the encoder's summary token starts from), so the connector sees the slide's features directly too.
    The encoder's fingerprint is taken here: do not change its weights while the cache is in use.
    """

    def __init__(self, encoder: SlideEncoder, device="cpu", patch_size: int | None = None, cache_dir=None):
        self.encoder = freeze(encoder).eval().to(device)
        self.device = torch.device(device)
        self.patch_size = patch_size  # level-0 patch size for files that lack or misstate it (load_slide)
        self._tmp = tempfile.TemporaryDirectory(prefix="topopack-summaries-") if cache_dir is None else None
        self.root = Path(self._tmp.name if cache_dir is None else cache_dir) / "summaries" / \
            encoder_fingerprint(self.encoder, self.device)
        self._recent: OrderedDict[str, EncodedSlide] = OrderedDict()
        self._layouts: OrderedDict[int, EncodedSlide] = OrderedDict()

    def _entry(self, key: str) -> Path | None:
        """The cache entry of slide file ``key`` (it may not exist yet); None if the file cannot be stat'ed."""
        try:
            st = os.stat(key)
        except OSError:
            return None
        name = f"{key}\0{st.st_size}\0{st.st_mtime_ns}\0{self.patch_size}"
        return self.root / hashlib.blake2b(name.encode(), digest_size=16).hexdigest()

    @torch.no_grad()
    def _encode(self, key: str, entry: Path) -> None:
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
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", suffix=".tmp", dir=self.root))
        np.save(tmp / "memory.npy", memory.numpy())
        np.save(tmp / "positions.npy", pack_positions(layout).numpy())
        np.save(tmp / "coords.npy", s.coords.numpy())
        (tmp / "meta.json").write_text(json.dumps({"slide": key, "origin": list(s.origin), "cell_size": s.cell_size,
                                                   "pack_size": k}))
        try:
            os.rename(tmp, entry)  # atomic: a reader sees a whole entry or none
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp)

    def get(self, path) -> EncodedSlide | EncodedRegion:
        key = str(path)
        if key not in self._recent:  # the records' paths are absolute already: resolve only on a miss
            key = str(Path(path).resolve())
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        entry = self._entry(key)
        if entry is None or not entry.exists():
            region = read_region_file(key)
            if region is not None:  # kept with the slides: taking a sample must not load the file again
                self._recent[key] = region
                return region
            self._encode(key, entry)
        self._recent[key] = EncodedSlide(entry)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return self._recent[key]

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

    def packs(self, path, box=None) -> torch.Tensor | None:
        """The indices of the packs of ``box`` (RegionError if it holds none); None for a whole slide or a
        pre-encoded region file (all its tokens)."""
        return self._packs(self.get(path), path, box)

    def region(self, path, box=None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.get(path)
        idx = self._packs(e, path, box)
        return (e.summaries, e.positions) if idx is None else (e.summaries[idx], e.positions[idx])

    def _packs(self, e, path, box) -> torch.Tensor | None:
        if isinstance(e, EncodedRegion):
            if box is not None:
                raise RegionError(f"{path}: a pre-encoded region file holds one region; it takes no region box")
            return None
        if box is None:
            return None
        self._layouts[id(e)] = e
        self._layouts.move_to_end(id(e))
        if len(self._layouts) > RECENT_LAYOUTS:
            self._layouts.popitem(last=False)[1].release_layout()
        return packs_in_region(e.layout, e.origin, e.cell_size, box)


def _fill_job(job: tuple) -> None:
    encoder_path, backend, device, cache_dir, patch_size, paths = job
    cache = SummaryCache(load_encoder(encoder_path, backend=backend), device, patch_size, cache_dir)
    for p in paths:
        cache.get(p)


def fill_cache(encoder_path, paths, cache_dir, *, backend: str | None = None, device="cpu",
               patch_size: int | None = None, workers: int = 1) -> None:
    """Encode ``paths`` into the on-disk cache at ``cache_dir`` in ``workers`` processes (each loads the encoder
    from ``encoder_path``), so that a SummaryCache over the same encoder, backend and directory only reads."""
    from topopack.model.parallel import parallel_map

    paths = sorted({str(Path(p).resolve()) for p in paths})
    chunks = [paths[i::max(1, workers) * 8] for i in range(max(1, workers) * 8)]
    parallel_map(_fill_job, [(str(encoder_path), backend, str(device), str(cache_dir), patch_size, c)
                             for c in chunks if c], workers, desc="encode slides")


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


@dataclass
class SampleIds:
    """A tokenized record without its memory tokens: what Samples keeps in RAM."""
    before: torch.Tensor
    after: torch.Tensor
    labels: torch.Tensor
    slide: str
    packs: torch.Tensor | None  # the region's pack indices (None: every token of the image)


class Samples(Sequence):
    """Tokenized records whose memory tokens are read from the cache when a sample is taken: RAM holds the ids and
    the region's pack indices, not the tokens. Regions are resolved (and checked) once, slide by slide."""

    def __init__(self, records: list[dict], tokenizer, cache: SummaryCache, style: str, with_answer: bool = True):
        cache.encode_all(r["slide"] for r in records)
        self.cache, self.items = cache, [None] * len(records)
        for i in sorted(range(len(records)), key=lambda j: records[j]["slide"]):  # one layout per slide in turn
            r = records[i]
            turns = list(r["turns"]) if with_answer else [*r["turns"][:-1], (r["turns"][-1][0], None)]
            self.items[i] = SampleIds(*encode_conversation(tokenizer, turns, style), r["slide"],
                                      cache.packs(r["slide"], r.get("region")))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self.items[i]
        e = self.cache.get(s.slide)
        memory, positions = (e.summaries, e.positions) if s.packs is None else (e.summaries[s.packs],
                                                                                e.positions[s.packs])
        return Sample(s.before, s.after, s.labels, memory, positions)

    def subset(self, indices) -> "Samples":
        out = Samples.__new__(Samples)
        out.cache, out.items = self.cache, [self.items[i] for i in indices]
        return out


def make_samples(records: list[dict], tokenizer, cache: SummaryCache, style: str,
                 with_answer: bool = True) -> Samples:
    """Tokenized conversations (every answer supervised; without ``with_answer`` the last answer is left to
    generate) with the memory tokens of each record's image and region, read when a sample is taken."""
    return Samples(records, tokenizer, cache, style, with_answer)
