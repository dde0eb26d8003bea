"""`topopack finetune`: stage A (connector on captions, LLM frozen) and stage B (connector + LoRA on the VQA).

The slide encoder is frozen: every slide is encoded once and its summary tokens are cached
(model/summaries.py). The run ends with a model directory (model/model_dir.py) that `--init`, `topopack eval` and
`topopack ask` read. Flags come from the dataclasses: FinetuneConfig below, the Q-Former's (``--qformer-*``),
LoRA's (``--lora-*``) and the embedded LLM's (``--tiny-*``), and the trainer's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from topopack.model.config import POSITIVE, Check, add_config_arguments, config_from_args, option, validate
from topopack.model.distributed import decoder_layers
from topopack.model.encoder import load_encoder
from topopack.model.llm import DTYPES, QUANT, LoraSettings, TinyLlamaConfig
from topopack.model.model_dir import STAGES, build_model, place, save_model
from topopack.model.prompt import IGNORE
from topopack.model.qformer import QFormerConfig
from topopack.model.records import SAMPLING, load_records, parse_family_weights, sample_weights, vocabulary_texts
from topopack.model.summaries import SummaryCache, make_samples, user_cache_dir
from topopack.model.trainer import (add_train_arguments, init_distributed, prepare_output, run_training,
                                    train_config_from_args, write_metrics)


def _family_weights_ok(text: str) -> bool:
    try:
        return all(w > 0 for w in parse_family_weights(text).values())
    except ValueError:
        return False


@dataclass
class FinetuneConfig:
    stage: str = option(help="connector: captions, LLM frozen; vqa: + LoRA", choices=STAGES)
    data: str = option(help="VQA JSON file, or a directory with captions.json (stage connector) / vqa_train.json "
                            "(stage vqa)")
    encoder: str = option(help="slide encoder checkpoint (topopack pretrain's encoder.pt)")
    llm: str | None = option(None, "local HF causal-LM checkpoint directory (default: embedded tiny Llama)")
    init: str | None = option(None, "model directory of a connector run to start stage vqa from")
    blind: bool = option(False, "control: visual tokens replaced by zeros")
    batch_size: int = option(16, "questions per step", check=POSITIVE)
    sampling: str = option("family", "family: every question family equally often; uniform: every record "
                                     "equally often", choices=SAMPLING)
    family_weights: str | None = option(None, "with --sampling family: extra share per family, e.g. "
                                              "location=3,count=2 (default 1 each)",
                                        check=Check(_family_weights_ok, "FAMILY=WEIGHT items with weights > 0, e.g. location=3,count=2"))
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "device")
    patch_size: int | None = option(None, "level-0 patch size of the slide files, for files that lack it (CLAM at "
                                          "level > 0 without downsample)", check=POSITIVE)
    image_root: str | None = option(None, "directory the records' images are relative to (default: the data file's "
                                          "directory)")
    llm_dtype: str = option("auto", "LLM base weights: auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16, fp32; LoRA "
                                    "and the connector stay fp32", choices=("auto", *DTYPES))
    llm_quant: str | None = option(None, "4bit or 8bit base weights through bitsandbytes (QLoRA; CUDA only)",
                                   choices=QUANT)
    grad_ckpt: bool = option(False, "activation checkpointing in the LLM (saves memory, costs a recompute)")
    max_length: int | None = option(None, "longest sequence (prompt + visual tokens + answers) in tokens; default "
                                          "the LLM's context length", check=POSITIVE)
    overlong: str = option("truncate", "longer samples: truncate (cut the end; dropped if no answer token is left) "
                                       "or drop", choices=("truncate", "drop"))

    def __post_init__(self):
        validate(self)


def fit_length(samples, max_length: int, visual: int, mode: str) -> tuple[list[int], int, int]:
    """(indices kept, truncated, dropped): samples (anything with before/after/labels, e.g. Samples.items) longer
    than ``max_length`` tokens are cut at the end, in place, or dropped; a cut sample with no supervised token left is
    dropped."""
    keep, truncated, dropped = [], 0, 0
    for i, s in enumerate(samples):
        room = max_length - s.before.numel() - visual
        if s.after.numel() <= room:
            keep.append(i)
            continue
        if mode == "drop" or room < 1 or bool((s.labels[:room] == IGNORE).all()):
            dropped += 1
            continue
        s.after, s.labels = s.after[:room], s.labels[:room]
        truncated += 1
        keep.append(i)
    return keep, truncated, dropped


# ---- the command ----------------------------------------------------------------------------
def add_arguments(p) -> None:
    add_config_arguments(p, FinetuneConfig)
    add_config_arguments(p.add_argument_group("Q-Former"), QFormerConfig, prefix="qformer_")
    add_config_arguments(p.add_argument_group("LoRA (stage vqa)"), LoraSettings, prefix="lora_")
    add_config_arguments(p.add_argument_group("embedded LLM (without --llm)"), TinyLlamaConfig, prefix="tiny_")
    add_train_arguments(p, steps=300, lr=3e-4, ckpt_every=100, warmup=0.05)


def finetune(stage: str, data, encoder_path, out, *, llm=None, init=None, blind=False, batch_size=16, steps=300,
             lr=3e-4, resume=False, device="cpu", qformer_cfg=None, tiny=None, lora=None, seed=0, desc=None,
             train_kw=None, stop_after=None, cache: SummaryCache | None = None, sampling: str = "family",
             family_weights: str | None = None, overwrite: bool = False, **options) -> dict:
    """Python entry point of `topopack finetune`; returns the training result and writes the model directory.
    ``options``: the other FinetuneConfig fields (llm_dtype=, max_length=, image_root=, ...)."""
    from topopack.model.trainer import TrainConfig

    fcfg = FinetuneConfig(stage=stage, data=str(data), encoder=str(encoder_path), llm=llm and str(llm),
                          init=init and str(init), blind=blind, batch_size=batch_size, sampling=sampling,
                          family_weights=family_weights, device=str(device), **options)
    tcfg = TrainConfig(out=str(out), steps=steps, lr=lr, resume=resume, seed=seed, overwrite=overwrite,
                       **(train_kw or {}))
    return _run(fcfg, tcfg, qformer_cfg or QFormerConfig(), tiny or TinyLlamaConfig(), lora or LoraSettings(),
                desc=desc, stop_after=stop_after, cache=cache)


def run_config(fcfg: FinetuneConfig, qformer_cfg: QFormerConfig, tiny: TinyLlamaConfig, lora: LoraSettings) -> dict:
    """Everything besides the TrainConfig that defines a finetune run (compared on --resume), flag names as keys."""
    return {**asdict(fcfg), **{f"qformer_{k}": v for k, v in asdict(qformer_cfg).items()},
            **{f"tiny_{k}": v for k, v in asdict(tiny).items()}, **{f"lora_{k}": v for k, v in asdict(lora).items()}}


def _run(fcfg: FinetuneConfig, cfg, qformer_cfg: QFormerConfig, tiny: TinyLlamaConfig, lora: LoraSettings, *,
         desc=None, stop_after=None, cache=None):
    rank, _ = init_distributed()
    prepare_output(cfg, rank)  # before encoding any slide
    records = load_records(fcfg.data, fcfg.stage, image_root=fcfg.image_root)
    texts = vocabulary_texts(records)
    encoder = load_encoder(fcfg.encoder)
    # a shared cache must hold this encoder's summaries
    cache = cache or SummaryCache(encoder, fcfg.device, patch_size=fcfg.patch_size, cache_dir=user_cache_dir())
    if rank == 0:  # one process encodes and writes the cache; the others read it
        cache.encode_all(r["slide"] for r in records)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    vlm, meta = build_model(fcfg.stage, encoder, texts, llm_path=fcfg.llm, init=fcfg.init, blind=fcfg.blind,
                            qformer_cfg=qformer_cfg, tiny=tiny, lora=lora, seed=cfg.seed, out=cfg.out,
                            memory_dim=cache.memory_dim({r["slide"] for r in records}), write=rank == 0,
                            device=fcfg.device, llm_dtype=fcfg.llm_dtype, llm_quant=fcfg.llm_quant)
    place(vlm, fcfg.device)
    if fcfg.grad_ckpt:
        vlm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = make_samples(records, vlm.tokenizer, cache, meta["prompt"])
    max_length = fcfg.max_length or getattr(vlm.llm.config, "max_position_embeddings", None)
    truncated = dropped = 0
    if max_length is not None:
        keep, truncated, dropped = fit_length(samples.items, max_length, qformer_cfg.num_queries, fcfg.overlong)
        if truncated or dropped:
            print(f"finetune: {truncated} sample(s) truncated and {dropped} dropped at --max-length {max_length}")
        if not keep:
            raise ValueError(f"--max-length {max_length}: every sample is too long to keep an answer token")
        records, samples = [records[i] for i in keep], samples.subset(keep)
    weights = sample_weights(records, fcfg.sampling, parse_family_weights(fcfg.family_weights or ""))

    def make_batch(step, micro, gen):
        idx = torch.multinomial(weights, fcfg.batch_size, replacement=True, generator=gen).tolist()
        return [samples[i] for i in idx]

    result = run_training(cfg, vlm, lambda model, batch, step: model(batch), make_batch,
                          run_config=run_config(fcfg, qformer_cfg, tiny, lora),
                          desc=desc or f"finetune {fcfg.stage}{' blind' if fcfg.blind else ''}", stop_after=stop_after,
                          shard_units=decoder_layers)
    if rank != 0:
        return result
    save_model(cfg.out, vlm, meta, fcfg.encoder)
    write_metrics(cfg.out, {"stage": fcfg.stage, "blind": fcfg.blind, "final_loss": result["final_loss"],
                            "steps": result["steps"], "train_records": len(records),
                            "truncated": truncated, "dropped": dropped,
                            "trainable_params": sum(p.numel() for p in vlm.parameters() if p.requires_grad)})
    return result


def main(args) -> int:
    result = _run(config_from_args(FinetuneConfig, args), train_config_from_args(args),
                  config_from_args(QFormerConfig, args, prefix="qformer_"),
                  config_from_args(TinyLlamaConfig, args, prefix="tiny_"),
                  config_from_args(LoraSettings, args, prefix="lora_"))
    print(f"finetune {args.stage}: final loss {result['final_loss']:.4f} after {result['steps']} steps -> {args.out}")
    return 0
