"""Model directories: what `topopack finetune` writes and `eval`, `ask` and `--init` read.

    model.json   what to load (LLM path, adapter, Q-Former config, blind flag)
    qformer.pt   Q-Former weights          encoder.pt  the frozen slide encoder (a copy)
    llm/         the embedded default LLM + tokenizer (save_pretrained); a real --llm is referenced by path
    adapter/     LoRA adapters (peft save_pretrained), stage vqa only
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from topopack.model.encoder import SlideEncoder, load_encoder
from topopack.model.llm import (LoraSettings, TinyLlamaConfig, add_lora, build_default_llm, build_tokenizer, freeze,
                                load_llm, load_lora, resolve_dtype, save_llm)
from topopack.model.prompt import default_style
from topopack.model.qformer import QFormer, QFormerConfig
from topopack.model.vlm import HepatoLLaVA

STAGES = ("connector", "vqa")
# the embedded LLM is untrained: its output head trains in full in stage vqa (peft modules_to_save)
EMBEDDED_TRAINED = ("lm_head",)


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


def place(vlm: HepatoLLaVA, device) -> HepatoLLaVA:
    """``vlm`` on ``device``; a 4/8-bit LLM is already placed by bitsandbytes and cannot move."""
    if getattr(vlm.llm, "is_loaded_in_4bit", False) or getattr(vlm.llm, "is_loaded_in_8bit", False):
        vlm.qformer.to(device)
        return vlm
    return vlm.to(device)


def load_model(model_dir, *, device="cpu", lora_trainable: bool = False, blind: bool | None = None,
               llm_dtype: str | None = None, llm_quant: str | None = None):
    """(HepatoLLaVA, encoder, meta) from a model directory; the LLM path is resolved against it. The LLM loads in
    ``llm_dtype`` (auto: bf16 on CUDA, fp32 on the CPU), optionally 4/8-bit (``llm_quant``, CUDA only)."""
    d = Path(model_dir)
    if not (d / "model.json").exists():
        raise FileNotFoundError(f"{d}: not a model directory (no model.json; train one with `topopack finetune`)")
    meta = json.loads((d / "model.json").read_text())
    meta.setdefault("prompt", "plain")  # model directories from before prompt styles
    llm_path = Path(meta["llm"])
    llm, tokenizer = load_llm(llm_path if llm_path.is_absolute() else d / llm_path, resolve_dtype(llm_dtype, device),
                              llm_quant, device)
    freeze(llm)
    if meta.get("adapter"):
        llm = load_lora(llm, d / meta["adapter"], trainable=lora_trainable)
    q = torch.load(d / "qformer.pt", map_location="cpu", weights_only=True)
    qformer = QFormer(QFormerConfig(**q["config"]))
    qformer.load_state_dict(q["model"])
    vlm = HepatoLLaVA(qformer, llm, tokenizer, blind=meta.get("blind", False) if blind is None else blind)
    encoder = load_encoder(d / meta["encoder"])
    return place(vlm, device), encoder, meta


def build_model(stage: str, encoder: SlideEncoder, texts: list[str], *, llm_path=None, init=None, blind=False,
                qformer_cfg: QFormerConfig | None = None, tiny: TinyLlamaConfig | None = None,
                lora: LoraSettings | None = None, seed: int = 0, out=None,
                memory_dim: int | None = None, write: bool = True, device="cpu", llm_dtype: str | None = None,
                llm_quant: str | None = None) -> tuple[HepatoLLaVA, dict]:
    """The model a stage trains, and its meta. connector: Q-Former only; vqa: Q-Former + fresh LoRA.
    ``memory_dim``: width of the region memory tokens (SummaryCache.memory_dim; default the encoder width).

    The embedded LLM's base weights are written to OUT/llm here (if ``write``: rank 0), before LoRA wraps the model.
    """
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    if init is not None:
        vlm, _, meta = load_model(init, blind=blind, device=device, llm_dtype=llm_dtype, llm_quant=llm_quant)
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
            llm, tokenizer = load_llm(llm_path, resolve_dtype(llm_dtype, device), llm_quant, device)
            meta = {"llm": str(Path(llm_path).resolve()), "embedded": False}
        else:
            tokenizer = build_tokenizer(texts)
            if llm_quant is not None:
                raise ValueError("--llm-quant quantizes a pretrained --llm; the embedded LLM trains in full precision")
            llm = build_default_llm(tokenizer, tiny, seed=seed).to(resolve_dtype(llm_dtype, device))
            meta = {"llm": "llm", "embedded": True, "tiny_llm": asdict(tiny or TinyLlamaConfig())}
        cfg = replace(qformer_cfg or QFormerConfig(), enc_dim=memory_dim or encoder.cfg.dim,
                      llm_dim=llm.get_input_embeddings().weight.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            qformer = QFormer(cfg)
    freeze(llm)
    if meta.get("embedded"):
        if out is None:
            raise ValueError("build_model: the embedded LLM needs an output directory to be saved in")
        if write:
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
    meta.setdefault("prompt", default_style(tokenizer, meta.get("embedded", False)))
    return HepatoLLaVA(qformer, llm, tokenizer, blind=blind), meta

