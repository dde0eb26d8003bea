"""Evidence maps: which packs of the asked region an answer drew on.

    ev = evidence(assistant, "slide.h5", "Where is the largest tumor nodule?")     # generates the answer
    render_evidence(ev, assistant.cache.get("slide.h5"), "map.png"); ev.save("map.json")
    topopack ask slide.h5 "Where is the largest tumor nodule?" --evidence map.png [--evidence-method gradient]

Two methods give each pack of the region a relevance for the answer, teacher-forced on the answer as training
encodes it (its tokens and the end marker), then normalised to sum 1:

- ``attention``: the Q-Former's attention rolled out through its layers (``rollout``), each query weighted by the
  attention the LLM paid to that query's visual token from the rows that predict the answer tokens (mean over
  layers, heads and rows; the LLM runs with eager attention for this one pass).
- ``gradient``: |d log p(answer) / d memory . memory| per pack (gradient x input summed over channels). The
  absolute value, not the positive part: the sign is relative to a zero memory token, which is no "absent tissue"
  state (the tokens are not centred), so the positive part would drop packs the answer depends on whose tokens
  happen to point the other way.

The JSON written by ``Evidence.save`` (for downstream tools)::

    {"slide": feature file, "question": str, "answer": str, "method": "attention" | "gradient",
     "region": [x0, y0, x1, y1] level-0 box asked about, or null for the whole slide,
     "pack_indices": [n] the packs' indices in the slide's TopoLayout (row-major pack order),
     "boxes": [n][4] each pack's level-0 rectangle [x0, y0, x1, y1] (half-open, model/regions.pack_boxes),
     "weights": [n] evidence per pack, >= 0, sum 1}
"""
from __future__ import annotations

import json
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topopack.model.prompt import IGNORE, encode_conversation
from topopack.model.regions import check_box, pack_boxes, packs_in_region

METHODS = ("gradient", "attention")
# the default: on the demo's held-out slides its mass on the largest nodule was 4.2x the nodules' share of the
# packs, against 2.8x for the attention rollout (README, "Evidence maps")
DEFAULT_METHOD = "gradient"


class EvidenceError(ValueError):
    """Evidence cannot be computed for this model or input."""


@dataclass
class Evidence:
    weights: torch.Tensor        # [n] float64, sum 1, one per pack of the region
    pack_indices: torch.Tensor   # [n] int64 pack indices in the slide's layout
    boxes: torch.Tensor          # [n, 4] int64 level-0 pack rectangles
    method: str
    question: str
    answer: str
    slide: str
    region: list | None = field(default=None)

    def to_dict(self) -> dict:
        return {"slide": self.slide, "question": self.question, "answer": self.answer, "method": self.method,
                "region": self.region, "pack_indices": self.pack_indices.tolist(), "boxes": self.boxes.tolist(),
                "weights": self.weights.tolist()}

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Evidence":
        d = json.loads(Path(path).read_text())
        return cls(torch.tensor(d["weights"], dtype=torch.float64), torch.tensor(d["pack_indices"], dtype=torch.long),
                   torch.tensor(d["boxes"], dtype=torch.long).reshape(-1, 4), d["method"], d["question"], d["answer"],
                   d["slide"], d["region"])


# ---- the two relevance methods --------------------------------------------------------
def rollout(weights, num_registers: int) -> torch.Tensor:
    """Attention rollout of the Q-Former: [B, Q, M] how much of each query's final state comes from each memory
    token. ``weights``: QFormer(..., need_weights=True)'s [(self [B, H, Q, Q], cross [B, H, Q, R + M])] per layer.

    Each query state is tracked as a distribution over sources (the learned queries, then the keys). Heads are
    averaged; a residual adds the identity: self-attention maps D -> (I + A) D / 2, cross-attention
    D -> (D + [0 | C]) / 2. The FFN is token-wise and leaves D as it is. The register keys' share is dropped."""
    s0 = weights[0][0]
    b, _, q, _ = s0.shape
    eye = torch.eye(q, dtype=torch.float64, device=s0.device).expand(b, q, q)
    from_queries = eye.clone()
    from_keys = torch.zeros(b, q, weights[0][1].shape[-1], dtype=torch.float64, device=s0.device)
    for self_w, cross_w in weights:
        mix = 0.5 * (eye + self_w.double().mean(1))
        from_queries, from_keys = mix @ from_queries, mix @ from_keys
        from_queries, from_keys = 0.5 * from_queries, 0.5 * (from_keys + cross_w.double().mean(1))
    return from_keys[..., num_registers:]


def visual_attention(vlm, sample) -> torch.Tensor:
    """[Q] the LLM's attention from the rows that predict the answer tokens to each visual token, averaged over
    layers, heads and rows (one eager-attention pass, teacher-forced)."""
    embeds, mask, labels = vlm.assemble([sample])
    rows = (labels[0, 1:] != IGNORE).nonzero().flatten()  # row t predicts token t + 1
    first = sample.before.numel()
    cols = torch.arange(first, first + vlm.qformer.cfg.num_queries, device=embeds.device)
    with eager_attention(vlm.llm), vlm.llm_precision():
        out = vlm.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=vlm.positions(mask),
                      output_attentions=True)
    if not out.attentions or any(a is None for a in out.attentions):
        raise EvidenceError("the LLM returned no attention weights; the attention method needs a transformers "
                            "model with eager attention (use --evidence-method gradient)")
    return torch.stack([a[0][:, rows][:, :, cols].double().mean((0, 1)) for a in out.attentions]).mean(0)


@contextmanager
def eager_attention(llm):
    """Eager attention (which returns its weights) for the duration; the previous implementation is restored."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    old = base.config._attn_implementation
    if old != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old != "eager":
            base.set_attn_implementation(old)


@torch.no_grad()
def attention_relevance(vlm, sample) -> torch.Tensor:
    mem = sample.memory.to(vlm.device)[None]
    pos = sample.positions.to(vlm.device)[None]
    _, weights = vlm.qformer(mem, None, pos, need_weights=True)
    per_query = rollout(weights, vlm.qformer.cfg.registers)[0]    # [Q, M]
    return visual_attention(vlm, sample) @ per_query


def gradient_relevance(vlm, sample) -> torch.Tensor:
    from topopack.model.vlm import Sample

    mem = sample.memory.to(vlm.device).detach().clone().requires_grad_(True)
    s = Sample(sample.before, sample.after, sample.labels, mem, sample.positions)
    with torch.enable_grad():
        loss, _ = vlm([s])  # mean cross-entropy over the answer tokens
        n = int((sample.labels != IGNORE).sum())
        (grad,) = torch.autograd.grad(-loss * n, mem)
    return (grad * mem.detach()).sum(-1).abs().double()


def pack_relevance(vlm, sample, method: str = "attention") -> torch.Tensor:
    """[M] relevance of each memory token of ``sample`` (its labels mark the answer), >= 0, sum 1."""
    if method not in METHODS:
        raise EvidenceError(f"evidence method must be one of {METHODS}, got {method!r}")
    if vlm.blind:
        raise EvidenceError("a blind model (visual tokens zeroed) reads no tissue: it has no evidence map")
    if not bool((sample.labels != IGNORE).any()):
        raise EvidenceError("the sample has no answer tokens to explain; pass the answer")
    was = vlm.training
    vlm.eval()
    try:
        rel = (attention_relevance if method == "attention" else gradient_relevance)(vlm, sample).cpu()
    finally:
        vlm.train(was)
    total = rel.sum()
    if not (torch.isfinite(rel).all() and total > 0):
        raise EvidenceError(f"the {method} evidence is {'zero' if total == 0 else 'not finite'} over every pack: "
                            "the answer does not depend on the region's tokens in this model")
    return rel / total


# ---- one question about one slide -----------------------------------------------------
def evidence(model, slide, question: str, region=None, *, answer: str | None = None, method: str = "attention",
             cache=None, style: str | None = None, max_new_tokens: int = 64) -> Evidence:
    """Evidence per pack of ``region`` (level-0 box; None = whole slide) of ``slide`` for the answer to
    ``question``. ``model``: an ``Assistant`` (model/ask.py), or a HepatoLLaVA with its ``cache``
    (SummaryCache) and prompt ``style``. Without ``answer`` the greedy answer is generated first."""
    from topopack.model.summaries import EncodedRegion
    from topopack.model.vlm import Sample

    if hasattr(model, "vlm"):
        vlm, cache, style = model.vlm, model.cache, model.meta["prompt"]
    else:
        vlm, style = model, style or "plain"
        if cache is None:
            raise EvidenceError("evidence(vlm, ...) needs cache= (the SummaryCache of the model's encoder)")
    box = None if region is None else list(check_box(region))
    enc = cache.get(slide)
    if isinstance(enc, EncodedRegion):
        raise EvidenceError(f"{slide}: a pre-encoded region file has no pack boxes to map; give the slide's "
                            "feature file and --region")
    idx = packs_in_region(enc.layout, enc.origin, enc.cell_size, box)
    mem, pos = enc.summaries[idx], enc.positions[idx]
    if answer is None:
        before, after, labels = encode_conversation(vlm.tokenizer, [(question, None)], style)
        answer = vlm.answer([Sample(before, after, labels, mem, pos)], max_new_tokens=max_new_tokens)[0]
    before, after, labels = encode_conversation(vlm.tokenizer, [(question, answer)], style)
    weights = pack_relevance(vlm, Sample(before, after, labels, mem, pos), method)
    boxes = pack_boxes(enc.layout, enc.origin, enc.cell_size)[idx]
    return Evidence(weights, idx.cpu(), boxes.cpu(), method, question, answer, str(slide), box)


# ---- rendering ------------------------------------------------------------------------
def render_evidence(ev: Evidence, encoded, png_path, *, wsi=None, size_px: int = 800) -> Path:
    """The per-pack weights as a heat map over the slide, a colour bar, the question and answer in the title.
    ``encoded``: the slide's EncodedSlide (SummaryCache.get). Background: a thumbnail of ``wsi`` (an
    OpenSlide-readable file, optional) or, without one, the tissue patches in grey. PNG of size_px x size_px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layout, cell = encoded.layout, int(encoded.cell_size)
    ox, oy = (int(v) for v in encoded.origin)
    rc = layout.patch_cell.cpu().numpy()
    h, w = rc[:, 0].max() + 1, rc[:, 1].max() + 1
    extent = (ox, ox + w * cell, oy + h * cell, oy)  # level-0 pixels, y down
    heat = np.full((h, w), np.nan)
    per_pack = np.full(layout.num_packs, np.nan)
    per_pack[ev.pack_indices.numpy()] = ev.weights.numpy()
    heat[rc[:, 0], rc[:, 1]] = per_pack[layout.patch_pack.cpu().numpy()]

    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    try:
        if wsi is not None:
            thumb, (w0, h0) = _wsi_thumbnail(wsi)
            ax.imshow(thumb, extent=(0, w0, h0, 0), interpolation="bilinear")
        else:
            tissue = np.zeros((h, w, 4))
            tissue[rc[:, 0], rc[:, 1]] = (0.72, 0.72, 0.72, 1.0)
            ax.imshow(tissue, extent=extent, interpolation="nearest")
        cmap = plt.get_cmap("YlOrRd").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # packs outside the region: clear
        im = ax.imshow(np.ma.masked_invalid(heat), extent=extent, cmap=cmap, vmin=0.0,
                       vmax=float(ev.weights.max()), alpha=0.6 if wsi is not None else 0.9, interpolation="nearest")
        lo_x, hi_x, hi_y, lo_y = extent
        if ev.region is not None:
            x0, y0, x1, y1 = ev.region
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="tab:blue", lw=1.5))
            lo_x, hi_x, lo_y, hi_y = min(lo_x, x0), max(hi_x, x1), min(lo_y, y0), max(hi_y, y1)
        pad = 0.03 * max(hi_x - lo_x, hi_y - lo_y)
        ax.set_xlim(lo_x - pad, hi_x + pad)
        ax.set_ylim(hi_y + pad, lo_y - pad)
        ax.set_aspect("equal")
        ax.set_xlabel("x (level-0 px)")
        ax.set_ylabel("y (level-0 px)")
        ax.tick_params(labelsize=7)
        from mpl_toolkits.axes_grid1 import make_axes_locatable

        cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.1)
        fig.colorbar(im, cax=cax,
                     label=f"evidence per pack ({ev.method}; {ev.weights.numel()} packs, sum 1)")
        lines = [*textwrap.wrap("Q: " + ev.question, 80), *textwrap.wrap("A: " + ev.answer, 80)]
        ax.set_title("\n".join(lines), fontsize=9, loc="left")
        fig.tight_layout()
        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, dpi=dpi)
    finally:
        plt.close(fig)
    return png_path


def _wsi_thumbnail(path, max_side: int = 1024):
    """(RGB thumbnail, level-0 (width, height)) of an OpenSlide-readable file."""
    try:
        import openslide
    except ImportError:
        raise EvidenceError(f"--evidence-wsi {path}: reading a WSI needs openslide-python, which is not installed "
                            "(pip install openslide-python openslide-bin); without --evidence-wsi the map is "
                            "drawn from the patch coordinates") from None
    with openslide.OpenSlide(str(path)) as s:
        return s.get_thumbnail((max_side, max_side)).convert("RGB"), s.dimensions


# ---- `topopack ask ... --evidence` ----------------------------------------------------
def add_evidence_arguments(parser) -> None:
    g = parser.add_argument_group("evidence map (one question)")
    g.add_argument("--evidence", default=None, metavar="MAP.png",
                   help="write a heat map of the packs the answer drew on (and MAP.json with the weights)")
    g.add_argument("--evidence-method", choices=METHODS, default=DEFAULT_METHOD,
                   help="gradient: |gradient x input| of the answer per pack; attention: Q-Former rollout weighted "
                        "by the LLM's attention")
    g.add_argument("--evidence-json", default=None, help="where to write the weights (default: MAP.json)")
    g.add_argument("--evidence-wsi", default=None, help="the slide image (OpenSlide-readable) as the background")


def write_evidence(assistant, slide, question: str, region, answer: str, png_path, json_path=None,
                   method: str = DEFAULT_METHOD, wsi=None) -> tuple[Path, Path]:
    """Evidence for ``answer``: the map at ``png_path``, the weights at ``json_path`` (default: png_path with
    .json). Returns both paths."""
    ev = evidence(assistant, slide, question, region, answer=answer, method=method)
    png = render_evidence(ev, assistant.cache.get(slide), png_path, wsi=wsi)
    return png, ev.save(json_path if json_path is not None else Path(png_path).with_suffix(".json"))


# ---- is the evidence meaningful? -------------------------------------------------------
def disc_packs(boxes: torch.Tensor, center, radius: float) -> torch.Tensor:
    """[n] bool: which boxes [x0, y0, x1, y1] intersect the open disc (center (x, y), radius), level-0 pixels."""
    b = boxes.double()
    cx, cy = (float(v) for v in center)
    dx = cx - torch.clamp(torch.full_like(b[:, 0], cx), b[:, 0], b[:, 2])
    dy = cy - torch.clamp(torch.full_like(b[:, 1], cy), b[:, 1], b[:, 3])
    return dx.square() + dy.square() < float(radius) ** 2


def mass_ratio(weights: torch.Tensor, inside: torch.Tensor) -> float:
    """Evidence mass on the ``inside`` packs divided by their share of the packs (1 = no preference)."""
    return float(weights[inside].sum()) / (float(inside.sum()) / inside.numel())


def nodule_evidence_ratio(assistant, slide_paths, question: str = "Where is the largest tumor nodule?", *,
                          method: str = "attention", seed: int = 0) -> dict:
    """Over the slides with tumour (facts from topopack.model.synth): the evidence mass on the largest nodule's
    packs (boxes intersecting its disc) over their share of the slide's packs, per slide; the median; and the same
    for a control whose weights are permuted across packs (seeded)."""
    import statistics

    from topopack.io import load_slide

    gen = torch.Generator().manual_seed(seed)
    ratios, control, slides = [], [], []
    for path in slide_paths:
        facts = load_slide(path).facts or {}
        if not facts.get("nodules"):
            continue
        largest = max(facts["nodules"], key=lambda n: n["radius"])
        ev = evidence(assistant, path, question, method=method)
        inside = disc_packs(ev.boxes, largest["center"], largest["radius"])
        if not bool(inside.any()):
            raise EvidenceError(f"{path}: no pack intersects the largest nodule at {largest['center']}")
        ratios.append(mass_ratio(ev.weights, inside))
        control.append(mass_ratio(ev.weights[torch.randperm(ev.weights.numel(), generator=gen)], inside))
        slides.append(str(path))
    if not ratios:
        raise EvidenceError("no slide with tumour nodules (facts['nodules']) among the slides given")
    return {"median_ratio": statistics.median(ratios), "ratios": ratios,
            "control_median_ratio": statistics.median(control), "control_ratios": control, "slides": slides,
            "method": method, "question": question}
