"""`topopack pretrain`: self-supervised pretraining of the slide encoder (MAE or MoCo).

    topopack pretrain --stage mae --data DIR --out OUT [--steps N] [--quick] [--resume | --overwrite]
    topopack pretrain --stage moco --data DIR --out OUT --init OUT_MAE/encoder.pt

Each step draws --slides-per-step slides of similar size (random crops of at most --max-patches
patches, so any slide size fits; the grid origin moves by a random whole number of packs so absolute
positions cannot be memorised), read from disk only then (model/datasets.py; --workers processes build
the next batches), masks or augments them and trains through the shared trainer
(model/trainer.py: AdamW, warm-up + cosine, accumulation, clipping, bf16 on CUDA,
atomic checkpoints, exact --resume, torchrun). The last --heldout fraction of the files by
name (topopack.io.split_slides, the slides `topopack synth --vqa` keeps for vqa_test.json)
is never trained on; the held-out metrics and OUT/encoder.pt are written at the end.
Python: ``pretrain("mae", data_dir, out_dir, quick=True)``.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from topopack.backends import BACKENDS
from topopack.io import find_slides
from topopack.rules import RULES_BY_NAME

from .crops import eval_crops
from .config import FRACTION, NON_NEGATIVE, POSITIVE, Check, add_config_arguments, config_from_args, option, validate
from .datasets import SlideFiles, StepBatches, StepLoader
from .distributed import encoder_blocks
from .encoder import SlideEncoder, SlideEncoderConfig, load_encoder, save_encoder
from .mae import MAE, PACK_MASKING, PATCH_MASKING, MAEConfig, mask_slides
from .mae import evaluate as evaluate_mae
from .moco import MoCo, MoCoConfig, contrast_batch
from .moco import evaluate as evaluate_moco
from .trainer import (TrainConfig, add_train_arguments, init_distributed, prepare_output, run_training,
                      write_metrics)

# sizes without and with --quick (small, for a CPU); a flag given explicitly wins
ARCH = ("dim", "depth", "heads", "mlp_dim", "dropout")  # the encoder's: from the file with --init
_E = SlideEncoderConfig
FULL = dict(dim=_E.dim, depth=_E.depth, heads=_E.heads, mlp_dim=_E.mlp_dim, dropout=_E.dropout,
            dec_dim=MAEConfig.dec_dim, steps=2000, max_patches=4096, slides_per_step=4)
QUICK = dict(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0, dec_dim=64, steps=600, max_patches=256,
             slides_per_step=4)
EVAL_SEED = 1234
CLOSED_UNIT = Check(lambda x: 0 <= x <= 1, "in [0, 1]")
OPEN_UNIT = Check(lambda x: 0 < x < 1, "in (0, 1)")


def _sized(text: str, name: str) -> str:
    quick = "" if QUICK[name] == FULL[name] else f"; {QUICK[name]} with --quick"
    return f"{text} (default {FULL[name]}{quick})"


@dataclass
class PretrainOptions:
    """Everything but the TrainConfig; size fields left None are filled from FULL or QUICK by resolved()."""

    stage: str = option(help="mae: masked patches, then masked packs; moco: contrast of pack summaries",
                        choices=("mae", "moco"))
    data: str = option(help="directory of slide feature files (.h5 / .pt)")
    quick: bool = option(False, "small and short, for a CPU: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                         + " (a flag given explicitly wins)")
    init: str | None = option(None, "start from this encoder.pt (its architecture wins)")
    dim: int | None = option(None, _sized("encoder width", "dim"), check=POSITIVE)
    depth: int | None = option(None, _sized("encoder blocks", "depth"), check=NON_NEGATIVE)
    heads: int | None = option(None, _sized("attention heads", "heads"), check=POSITIVE)
    mlp_dim: int | None = option(None, _sized("encoder FFN width", "mlp_dim"), check=POSITIVE)
    dropout: float | None = option(None, _sized("encoder dropout", "dropout"), check=FRACTION)
    pack_size: int = option(_E.pack_size, "pack side k (packs of k x k patches)", check=POSITIVE)
    rules: str = option(_E.rules, "attention rules", choices=tuple(RULES_BY_NAME))
    pos_embed: bool = option(_E.pos_embed, "2D sin-cos position code in the encoder")
    center_input: bool = option(_E.center_input, "the encoder subtracts each slide's mean feature (removes "
                                "slide-wide shifts)")
    backend: str = option(_E.backend, "attention backend", choices=("auto", *BACKENDS))
    heldout: float = option(0.2, "fraction of the files held out for the metrics: the last ones by name, "
                            "as `topopack synth --vqa` holds them out", check=FRACTION)
    max_patches: int | None = option(None, _sized("crop size (patches) per slide in a batch", "max_patches"),
                                     check=POSITIVE)
    slides_per_step: int | None = option(None, _sized("slide crops per batch, of slides of similar size",
                                                      "slides_per_step"), check=POSITIVE)
    workers: int = option(0, "processes that read slides and build the next batches while the model trains "
                          "(spawned DataLoader workers; 0: in this process)", check=NON_NEGATIVE)
    eval_crops: int = option(4, "crops per held-out slide for the metrics", check=POSITIVE)
    mask_ratio: float = option(MAEConfig.mask_ratio, "MAE: fraction of the patches (phase 1) or packs (phase 2) "
                               "hidden", check=OPEN_UNIT)
    phase2_at: float = option(0.5, "MAE: fraction of the steps after which whole packs are masked", check=CLOSED_UNIT)
    dec_dim: int | None = option(None, _sized("MAE decoder width", "dec_dim"), check=POSITIVE)
    dec_depth: int = option(MAEConfig.dec_depth, "MAE decoder blocks", check=POSITIVE)
    dec_heads: int = option(MAEConfig.dec_heads, "MAE decoder heads", check=POSITIVE)
    momentum: float = option(MoCoConfig.momentum, "MoCo: key encoder momentum", check=FRACTION)
    queue: int = option(MoCoConfig.queue, "MoCo: negatives queue length", check=POSITIVE)
    temperature: float = option(MoCoConfig.temperature, "MoCo: InfoNCE temperature", check=POSITIVE)
    noise_std: float = option(MoCoConfig.noise_std, "MoCo: feature noise of the positive view", check=NON_NEGATIVE)
    device: str | None = option(None, "default: cuda if available, else cpu")
    threads: int | None = option(None, "CPU threads (default: 1 with --quick, else torch's default); small models "
                                 "run much faster on one thread, above all on a busy machine", check=POSITIVE)

    def __post_init__(self):
        validate(self)
        given = [a for a in ARCH if getattr(self, a) is not None]
        if self.init is not None and given:
            flags = ", ".join("--" + a.replace("_", "-") for a in given)
            raise ValueError(f"--init sets the encoder architecture; drop {flags}")

    def resolved(self) -> PretrainOptions:
        """The size fields left None filled from QUICK (--quick) or FULL; the encoder's stay None with --init."""
        sizes = QUICK if self.quick else FULL
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in sizes.items() if k in names and getattr(self, k) is None
                                and not (self.init and k in ARCH)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PretrainOptions)
    add_train_arguments(p, steps=None, lr=1e-3, ckpt_every=50)


def configs(args) -> tuple[PretrainOptions, TrainConfig]:
    """The validated options (sizes resolved) and TrainConfig of parsed ``args``."""
    opts = config_from_args(PretrainOptions, args).resolved()
    steps = args.steps if args.steps is not None else (QUICK if opts.quick else FULL)["steps"]
    return opts, config_from_args(TrainConfig, args, steps=steps)


def build_encoder(opts: PretrainOptions, in_dim: int) -> SlideEncoder:
    if opts.init:
        enc = load_encoder(opts.init, backend=opts.backend)
        if enc.cfg.in_dim != in_dim:
            raise ValueError(f"--init {opts.init}: encoder expects in_dim={enc.cfg.in_dim}, the data has {in_dim}")
        if enc.cfg.pack_size != opts.pack_size:
            raise ValueError(f"--init {opts.init}: encoder uses pack_size={enc.cfg.pack_size}, got --pack-size {opts.pack_size}")
        return enc
    return SlideEncoder(SlideEncoderConfig(in_dim=in_dim, dim=opts.dim, depth=opts.depth, heads=opts.heads,
                                           mlp_dim=opts.mlp_dim, dropout=opts.dropout, pack_size=opts.pack_size,
                                           rules=opts.rules, pos_embed=opts.pos_embed,
                                           center_input=opts.center_input, backend=opts.backend))


def run(args, stop_after: int | None = None) -> dict:
    """Pretrains per ``args`` (see add_arguments); returns the metrics written to OUT/metrics.json."""
    opts, cfg = configs(args)
    rank, world = init_distributed()
    prepare_output(cfg, rank)  # refuses to replace a run before any data is read
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    files = SlideFiles(find_slides(opts.data))  # sizes from the headers; a slide is read when a batch needs it
    in_dim = files.in_dim
    train, held = files.split(opts.heldout)
    torch.manual_seed(cfg.seed)  # same initial weights for every run with this seed
    encoder = build_encoder(opts, in_dim)
    if rank == 0:
        source = f"from --init {opts.init}" if opts.init else "--quick" if opts.quick else "full size"
        arch = " ".join(f"{a}={getattr(encoder.cfg, a)}" for a in ARCH)
        print(f"pretrain {opts.stage}: encoder {arch} ({source}); {len(train)} training slides, {len(held)} held out",
              flush=True)
    k, maxp, spb = encoder.cfg.pack_size, opts.max_patches, opts.slides_per_step
    run_config = {**asdict(opts), "data": str(Path(opts.data).resolve()), "in_dim": in_dim,
                  "init": opts.init and str(Path(opts.init).resolve())}

    if opts.stage == "mae":
        model = MAE(encoder, MAEConfig(opts.mask_ratio, opts.dec_dim, opts.dec_depth, opts.dec_heads))
        build = partial(mae_batch, pack_size=k, ratio=opts.mask_ratio, phase2_step=opts.phase2_at * cfg.steps)
        on_step_end = None
    else:
        mcfg = MoCoConfig(momentum=opts.momentum, queue=opts.queue, temperature=opts.temperature,
                          noise_std=opts.noise_std)
        model = MoCo(encoder, mcfg)
        build = partial(moco_batch, pack_size=k, cfg=mcfg)

        def on_step_end(step, bare):
            bare.momentum_step()

    make_batch = StepLoader(StepBatches(train, build, steps=cfg.steps, grad_accum=cfg.grad_accum, seed=cfg.seed,
                                        rank=rank, per_step=spb, max_patches=maxp, pack_size=k), opts.workers, device)
    model.to(device)
    threads = torch.get_num_threads()
    if opts.threads or opts.quick:
        torch.set_num_threads(opts.threads or 1)
    try:
        t0 = time.perf_counter()
        result = run_training(cfg, model, lambda m, batch, step: m(batch), make_batch, run_config=run_config,
                              on_step_end=on_step_end, desc=f"pretrain {opts.stage}", stop_after=stop_after,
                              shard_units=encoder_blocks)
        train_s = time.perf_counter() - t0
        metrics = {}
        if rank == 0 and result["steps"] == cfg.steps:  # not when stopped early (as if killed)
            metrics = {"stage": opts.stage, "final_loss": result["final_loss"], "steps": result["steps"],
                       "train_wall_s": round(train_s, 2), "train_slides": len(train), "heldout_slides": len(held),
                       "heldout_files": [os.path.basename(p) for p in held.paths], "encoder": asdict(encoder.cfg),
                       "world_size": world, "config": {**run_config, **asdict(cfg)}}
            metrics.update(_evaluate(opts, model, held or train, k, device))
            metrics["heldout_is_train"] = not held
            save_encoder(os.path.join(cfg.out, "encoder.pt"), encoder)
            write_metrics(cfg.out, metrics)
    finally:
        make_batch.close()
        torch.set_num_threads(threads)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def mae_batch(crops, step: int, gen, *, pack_size: int, ratio: float, phase2_step: float):
    """An MAE batch: patches masked before ``phase2_step``, whole packs from then on."""
    phase = PACK_MASKING if step >= phase2_step else PATCH_MASKING
    return mask_slides(crops, pack_size, ratio, phase, gen)


def moco_batch(crops, step: int, gen, *, pack_size: int, cfg: MoCoConfig):
    return contrast_batch(crops, pack_size, cfg, gen)


def _evaluate(opts: PretrainOptions, model, slides, k, device) -> dict:
    """Held-out metrics over fixed crops, read slide by slide (each MAE phase reads the slides again)."""
    def batches():
        return eval_crops(slides, opts.eval_crops, opts.slides_per_step, opts.max_patches, EVAL_SEED, k)

    if opts.stage == "mae":
        out = {}
        for phase, prefix in ((PATCH_MASKING, "heldout_"), (PACK_MASKING, "heldout_pack_")):
            gen = torch.Generator().manual_seed(EVAL_SEED + phase)
            r = evaluate_mae(model, (mask_slides(b, k, opts.mask_ratio, phase, gen).to(device) for b in batches()))
            out[prefix + "masked_mse"] = r["masked_mse"]
            out[prefix + "mean_baseline_mse"] = r["mean_baseline_mse"]
            out[prefix + "mse_reduction"] = 1 - r["masked_mse"] / r["mean_baseline_mse"]
        return out
    gen = torch.Generator().manual_seed(EVAL_SEED)
    r = evaluate_moco(model, (contrast_batch(b, k, model.cfg, gen).to(device) for b in batches()))
    return {"heldout_pos_cos": r["pos_cos"], "heldout_neg_cos": r["neg_cos"], "heldout_cos_gap": r["pos_cos"] - r["neg_cos"]}


def pretrain(stage: str, data_dir, out_dir, *, stop_after: int | None = None, **options) -> dict:
    """Programmatic `topopack pretrain`: options are the flags' names (quick=True, steps=100, ...)."""
    parser = argparse.ArgumentParser(prog="topopack pretrain")
    add_arguments(parser)
    args = parser.parse_args(["--stage", stage, "--data", str(data_dir), "--out", str(out_dir)])
    for name, value in options.items():
        if not hasattr(args, name):
            raise TypeError(f"pretrain: unknown option {name!r}")
        setattr(args, name, value)
    return run(args, stop_after=stop_after)


def main(args) -> int:
    m = run(args)
    if m:
        keys = [k for k in m if k.startswith("heldout_") and isinstance(m[k], float)]
        print(" ".join(f"{k}={m[k]:.4f}" for k in keys))
        print(f"wrote {os.path.join(args.out, 'encoder.pt')} and metrics.json")
    return 0
