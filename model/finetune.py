"""`topopack finetune`: stage A (connector on captions, LLM frozen) and stage B (connector + LoRA on the VQA).

The slide encoder is frozen: every slide is encoded once and its summary tokens are cached. A model directory
(written at the end of a run, read by ``--init``, ``topopack eval`` and ``topopack ask``) holds:

    model.json   what to load (LLM path, adapter, Q-Former config, blind flag)
    qformer.pt   Q-Former weights          encoder.pt  the frozen slide encoder (a copy)
    llm/         the embedded default LLM + tokenizer (save_pretrained); a real --llm is referenced by path
    adapter/     LoRA adapters (peft save_pretrained), stage vqa only
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from topopack.io import load_slide
from topopack.model.encoder import SlideEncoder, load_encoder
from topopack.model.llm import (LoraSettings, TinyLlamaConfig, add_lora, build_default_llm, build_tokenizer, freeze,
                                load_llm, load_lora, save_llm)
from topopack.model.qformer import QFormer, QFormerConfig
from topopack.model.regions import pack_positions, packs_in_region
from topopack.model.trainer import add_train_arguments, run_training, train_config_from_args, write_metrics
from topopack.model.vlm import HepatoLLaVA, Sample, tokenize_turn

STAGES = ("connector", "vqa")
# the embedded LLM is untrained: its output head trains in full in stage vqa (peft modules_to_save)
EMBEDDED_TRAINED = ("lm_head",)


# ---- data -----------------------------------------------------------------------------------
# the files vqa_data.make_vqa_files writes; a --data directory means these
STAGE_FILES = {"connector": ("captions.json",), "vqa": ("vqa_train.json",), "eval": ("vqa_test.json",)}
STAGE_TYPES = {"connector": {"caption"}, "vqa": {"single_choice", "multi_choice", "open"},
               "eval": {"single_choice", "multi_choice", "open"}}


def json_files(data, stage: str) -> list[Path]:
    """``data`` itself when it is a file, else the stage's files in that directory (see STAGE_FILES)."""
    p = Path(data)
    files = [p] if p.is_file() else [p / name for name in STAGE_FILES[stage]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--data {data}: missing {', '.join(missing)} (give a VQA JSON file, or a directory "
                                f"written by topopack.model.vqa_data.make_vqa_files)")
    return files


def load_records(data, stage: str) -> list[dict]:
    """The stage's records from ``data`` (validated by vqa_data.load_vqa), slide paths made absolute."""
    from topopack.model.vqa_data import load_vqa

    records = []
    for f in json_files(data, stage):
        for r in load_vqa(f):
            if r["type"] in STAGE_TYPES[stage]:
                slide = Path(r["slide"])
                records.append({**r, "slide": str(slide if slide.is_absolute() else (f.parent / slide).resolve())})
    if not records:
        raise ValueError(f"--data {data}: no records of type {sorted(STAGE_TYPES[stage])} for stage {stage}")
    return records


def vocabulary_texts(records: list[dict]) -> list[str]:
    """Text for the embedded tokenizer: the training turns plus every question and option of the generator."""
    from topopack.model.vqa_data import FAMILIES

    texts = [t for r in records for t in turn(r)]
    for fam in FAMILIES.values():
        texts += [*fam.questions, *fam.options]
    return texts


def turn(record: dict) -> tuple[str, str]:
    """(human text with <image>, gpt answer text) of a record."""
    conv = record["conversations"]
    return conv[0]["value"], conv[1]["value"]


@dataclass
class EncodedSlide:
    summaries: torch.Tensor   # [P, D + C] frozen encoder summary tokens, then the pack's raw mean feature (cpu f32)
    positions: torch.Tensor   # [P, 2] pack centres in [0, 1]
    layout: object            # the slide's TopoLayout (cpu), for region -> packs
    origin: tuple[int, int]
    patch_size: int


class SummaryCache:
    """Encodes each slide once with the frozen encoder; ``region(path, box)`` -> (memory, positions).

    A pack's memory token is its encoded summary token concatenated with the mean of its input patch features
    (the input the encoder's summary token starts from), so the connector sees the slide's features directly too.
    """

    def __init__(self, encoder: SlideEncoder, device="cpu"):
        self.encoder = freeze(encoder).eval().to(device)
        self.device = torch.device(device)
        self.slides: dict[str, EncodedSlide] = {}

    @torch.no_grad()
    def get(self, path) -> EncodedSlide:
        key = str(Path(path).resolve())
        if key not in self.slides:
            s = load_slide(key)
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
            self.slides[key] = EncodedSlide(memory, pack_positions(layout), layout, s.origin, s.patch_size)
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
        idx = packs_in_region(e.layout, e.origin, e.patch_size, box)
        return e.summaries[idx], e.positions[idx]


SAMPLING = ("family", "uniform")


def sample_weights(records: list[dict], sampling: str = "family",
                   family_weights: dict[str, float] | None = None) -> torch.Tensor:
    """Batch sampling weights: "uniform" over records, or "family": every question family (tumor, count, ...,
    patch_class) equally often, so the few whole-slide questions per slide are not drowned by region ones.
    ``family_weights`` (family "family" only) multiplies a family's share (default 1), e.g. more steps on the hard
    whole-slide families; it depends on the question family only, never on the answer."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if sampling == "uniform":
        if family_weights:
            raise ValueError("family_weights needs sampling='family'")
        return torch.ones(len(records), dtype=torch.float64)
    keys = [r.get("family") or r["scale"] for r in records]
    counts = {k: keys.count(k) for k in set(keys)}
    fw = dict(family_weights or {})
    unknown = sorted(set(fw) - set(counts))
    if unknown:
        raise ValueError(f"family_weights names families not in the data: {unknown} (have {sorted(counts)})")
    if any(not (w > 0) for w in fw.values()):
        raise ValueError(f"family_weights must be > 0, got {fw}")
    return torch.tensor([fw.get(k, 1.0) / counts[k] for k in keys], dtype=torch.float64)


def make_samples(records: list[dict], tokenizer, cache: SummaryCache, with_answer: bool = True) -> list[Sample]:
    cache.encode_all(r["slide"] for r in records)
    out = []
    for r in records:
        q, a = turn(r)
        before, after, ans = tokenize_turn(tokenizer, q, a if with_answer else None)
        mem, pos = cache.region(r["slide"], r.get("region"))
        out.append(Sample(before, after, ans, mem, pos))
    return out


def parse_family_weights(text: str) -> dict[str, float]:
    """"location=3,count=2" -> {"location": 3.0, "count": 2.0}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--family-weights: expected FAMILY=WEIGHT items, got {item!r} in {text!r}")
    return out


# ---- model directories ----------------------------------------------------------------------
def save_model(out, vlm: HepatoLLaVA, meta: dict, encoder_path) -> None:
    """Write the model directory described in the module docstring."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = vlm.llm
    meta = dict(meta)
    if hasattr(llm, "peft_config"):
        llm.save_pretrained(out / "adapter")
        meta["adapter"] = "adapter"
    torch.save({"config": asdict(vlm.qformer.cfg), "model": vlm.qformer.state_dict()}, out / "qformer.pt")
    if Path(encoder_path).resolve() != (out / "encoder.pt").resolve():
        shutil.copyfile(encoder_path, out / "encoder.pt")
    meta["encoder"] = "encoder.pt"
    (out / "model.json").write_text(json.dumps({**meta, "blind": vlm.blind}, indent=2))


def load_model(model_dir, *, device="cpu", lora_trainable: bool = False, blind: bool | None = None):
    """(HepatoLLaVA, encoder, meta) from a model directory; the LLM path is resolved against it."""
    d = Path(model_dir)
    if not (d / "model.json").exists():
        raise FileNotFoundError(f"{d}: not a model directory (no model.json; train one with `topopack finetune`)")
    meta = json.loads((d / "model.json").read_text())
    llm_path = Path(meta["llm"])
    llm, tokenizer = load_llm(llm_path if llm_path.is_absolute() else d / llm_path)
    freeze(llm)
    if meta.get("adapter"):
        llm = load_lora(llm, d / meta["adapter"], trainable=lora_trainable)
    q = torch.load(d / "qformer.pt", map_location="cpu", weights_only=True)
    qformer = QFormer(QFormerConfig(**q["config"]))
    qformer.load_state_dict(q["model"])
    vlm = HepatoLLaVA(qformer, llm, tokenizer, blind=meta.get("blind", False) if blind is None else blind)
    encoder = load_encoder(d / meta["encoder"])
    return vlm.to(device), encoder, meta


def build_model(stage: str, encoder: SlideEncoder, texts: list[str], *, llm_path=None, init=None, blind=False,
                qformer_cfg: QFormerConfig | None = None, tiny: TinyLlamaConfig | None = None,
                lora: LoraSettings | None = None, seed: int = 0, out=None,
                memory_dim: int | None = None) -> tuple[HepatoLLaVA, dict]:
    """The model a stage trains, and its meta. connector: Q-Former only; vqa: Q-Former + fresh LoRA.
    ``memory_dim``: width of the region memory tokens (SummaryCache.memory_dim; default the encoder width).

    The embedded LLM's base weights are written to OUT/llm here, before LoRA wraps the model.
    """
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    if init is not None:
        vlm, _, meta = load_model(init, blind=blind)
        if meta.get("adapter"):
            raise ValueError(f"--init {init}: already has LoRA adapters (stage vqa); init from a connector run")
        meta = {k: v for k, v in meta.items() if k not in ("adapter", "encoder", "blind")}
        if not Path(meta["llm"]).is_absolute():  # the embedded LLM travels with the model directory
            meta["embedded"] = True
        llm, tokenizer, qformer = vlm.llm, vlm.tokenizer, vlm.qformer
        if qformer.cfg.enc_dim != (memory_dim or encoder.cfg.dim):
            raise ValueError(f"--init {init}: its Q-Former reads {qformer.cfg.enc_dim}-wide memory tokens but "
                             f"--encoder and the slides give {memory_dim or encoder.cfg.dim}; use the encoder and "
                             f"slide features the connector was trained with")
    else:
        if llm_path is not None:
            llm, tokenizer = load_llm(llm_path)
            meta = {"llm": str(Path(llm_path).resolve()), "embedded": False}
        else:
            tokenizer = build_tokenizer(texts)
            llm = build_default_llm(tokenizer, tiny, seed=seed)
            meta = {"llm": "llm", "embedded": True, "tiny_llm": asdict(tiny or TinyLlamaConfig())}
        cfg = qformer_cfg or QFormerConfig()
        cfg.enc_dim, cfg.llm_dim = memory_dim or encoder.cfg.dim, llm.get_input_embeddings().weight.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            qformer = QFormer(cfg)
    freeze(llm)
    if meta.get("embedded"):
        if out is None:
            raise ValueError("build_model: the embedded LLM needs an output directory to be saved in")
        save_llm(Path(out) / "llm", llm, tokenizer)
        meta["llm"] = "llm"
    if stage == "vqa":
        lora = lora or LoraSettings()
        if lora.modules_to_save is None and meta.get("embedded"):
            lora = replace(lora, modules_to_save=list(EMBEDDED_TRAINED))
        with torch.random.fork_rng(devices=[]):  # LoRA A init: a function of the seed only
            torch.manual_seed(seed + 1)
            llm = add_lora(llm, lora)
        meta["lora"] = asdict(lora)
    meta["stage"] = stage
    return HepatoLLaVA(qformer, llm, tokenizer, blind=blind), meta


# ---- the command ----------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--stage", choices=STAGES, required=True, help="connector: captions, LLM frozen; vqa: + LoRA")
    p.add_argument("--data", required=True, help="VQA JSON file, or a directory with captions.json (stage connector) "
                                                 "/ vqa_train.json (stage vqa)")
    p.add_argument("--encoder", required=True, help="slide encoder checkpoint (topopack pretrain's encoder.pt)")
    p.add_argument("--llm", default=None, help="local HF causal-LM checkpoint directory (default: embedded tiny Llama)")
    p.add_argument("--init", default=None, help="model directory of a connector run to start stage vqa from")
    p.add_argument("--blind", action="store_true", help="control: visual tokens replaced by zeros")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sampling", choices=SAMPLING, default="family",
                   help="family: every question family equally often; uniform: every record equally often")
    p.add_argument("--family-weights", default=None, type=parse_family_weights,
                   help="with --sampling family: extra share per family, e.g. location=3,count=2 (default 1 each)")
    p.add_argument("--queries", type=int, default=32, help="Q-Former queries = visual tokens")
    p.add_argument("--qformer-dim", type=int, default=512)
    p.add_argument("--qformer-depth", type=int, default=2)
    p.add_argument("--qformer-heads", type=int, default=8)
    p.add_argument("--anchors", type=int, default=3,
                   help="side of the grid of spatially anchored queries (anchors^2 <= --queries; 0 = none)")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="all-linear",
                   help="'all-linear' (all but lm_head) or comma-separated module names")
    p.add_argument("--lora-save", default=None,
                   help="comma-separated modules trained in full next to LoRA (peft modules_to_save); default: "
                        "lm_head for the embedded LLM (its random output head), none for --llm")
    p.add_argument("--tiny-dim", type=int, default=TinyLlamaConfig.hidden_size, help="embedded LLM width")
    p.add_argument("--tiny-layers", type=int, default=TinyLlamaConfig.num_hidden_layers)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_train_arguments(p, steps=300, lr=3e-4, ckpt_every=100, warmup=0.05)


def finetune(stage: str, data, encoder_path, out, *, llm=None, init=None, blind=False, batch_size=16, steps=300,
             lr=3e-4, resume=False, device="cpu", qformer_cfg=None, tiny=None, lora=None, seed=0, desc=None,
             train_kw=None, stop_after=None, cache: SummaryCache | None = None, sampling: str = "family",
             family_weights: dict[str, float] | None = None) -> dict:
    """Python entry point of `topopack finetune`; returns the training result and writes the model directory."""
    from topopack.model.trainer import TrainConfig

    cfg = TrainConfig(out=str(out), steps=steps, lr=lr, resume=resume, seed=seed, **(train_kw or {}))
    return _run(stage, data, encoder_path, cfg, llm=llm, init=init, blind=blind, batch_size=batch_size,
                device=device, qformer_cfg=qformer_cfg, tiny=tiny, lora=lora, desc=desc, stop_after=stop_after,
                cache=cache, sampling=sampling, family_weights=family_weights)


def _run(stage, data, encoder_path, cfg, *, llm, init, blind, batch_size, device, qformer_cfg, tiny, lora, desc=None,
         stop_after=None, cache=None, sampling="family", family_weights=None):
    records = load_records(data, stage)
    texts = vocabulary_texts(records)
    encoder = load_encoder(encoder_path)
    cache = cache or SummaryCache(encoder, device)  # a shared cache must hold this encoder's summaries
    cache.encode_all(r["slide"] for r in records)
    vlm, meta = build_model(stage, encoder, texts, llm_path=llm, init=init, blind=blind, qformer_cfg=qformer_cfg,
                            tiny=tiny, lora=lora, seed=cfg.seed, out=cfg.out,
                            memory_dim=cache.memory_dim(records[0]["slide"]))
    vlm.to(device)
    samples = make_samples(records, vlm.tokenizer, cache)

    weights = sample_weights(records, sampling, family_weights)

    def make_batch(step, micro, gen):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
        return [samples[i] for i in idx]

    result = run_training(cfg, vlm, lambda model, batch, step: model(batch), make_batch,
                          desc=desc or f"finetune {stage}{' blind' if blind else ''}", stop_after=stop_after)
    save_model(cfg.out, vlm, meta, encoder_path)
    write_metrics(cfg.out, {"stage": stage, "blind": blind, "final_loss": result["final_loss"],
                            "steps": result["steps"], "train_records": len(records),
                            "trainable_params": sum(p.numel() for p in vlm.parameters() if p.requires_grad)})
    return result


def main(args) -> int:
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    qcfg = QFormerConfig(dim=args.qformer_dim, num_queries=args.queries, depth=args.qformer_depth,
                         heads=args.qformer_heads, anchors=args.anchors)
    tiny = TinyLlamaConfig(hidden_size=args.tiny_dim, intermediate_size=2 * args.tiny_dim,
                           num_hidden_layers=args.tiny_layers)
    save = None if args.lora_save is None else [m for m in args.lora_save.split(",") if m]
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets,
                        modules_to_save=save)
    result = _run(args.stage, args.data, args.encoder, train_config_from_args(args), llm=args.llm, init=args.init,
                  blind=args.blind, batch_size=args.batch_size, device=args.device, qformer_cfg=qcfg, tiny=tiny,
                  lora=lora, sampling=args.sampling, family_weights=args.family_weights)
    print(f"finetune {args.stage}: final loss {result['final_loss']:.4f} after {result['steps']} steps -> {args.out}")
    return 0
