"""`topopack pretrain`: self-supervised pretraining of the slide encoder (MAE or MoCo).

    topopack pretrain --stage mae --data DIR --out OUT [--steps N] [--quick] [--resume]
    topopack pretrain --stage moco --data DIR --out OUT --init OUT_MAE/encoder.pt

Each step draws a few slides (random crops of at most --max-patches patches, so any
slide size fits; the grid origin moves by a random whole number of packs so absolute
positions cannot be memorised), masks or augments them and trains through the shared trainer
(model/trainer.py: AdamW, warm-up + cosine, accumulation, clipping, bf16 on CUDA,
atomic checkpoints, exact --resume, torchrun). A deterministic fraction of the files
(--heldout) is never trained on; the held-out metrics and OUT/encoder.pt are written
at the end. Python: ``pretrain("mae", data_dir, out_dir, quick=True)``.
"""
from __future__ import annotations

import argparse
import os
import time
import zlib
from dataclasses import asdict

import torch
import torch.distributed as dist

from topopack.io import Slide, load_slides

from .encoder import SlideEncoder, SlideEncoderConfig, load_encoder, save_encoder
from .mae import MAE, PACK_MASKING, PATCH_MASKING, MAEConfig, mask_slides
from .mae import evaluate as evaluate_mae
from .moco import MoCo, MoCoConfig, contrast_batch
from .moco import evaluate as evaluate_moco
from .trainer import add_train_arguments, init_distributed, run_training, train_config_from_args, write_metrics

# encoder/decoder size, steps and crop size with --quick (small, for CPU) and without
ARCH = ("dim", "depth", "heads", "mlp_dim")
QUICK = dict(dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0, dec_dim=64, steps=600, max_patches=256, slides_per_batch=4)
FULL = dict(dim=512, depth=6, heads=8, mlp_dim=2048, dropout=0.1, dec_dim=256, steps=2000, max_patches=4096, slides_per_batch=4)
EVAL_SEED = 1234


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=("mae", "moco"), required=True)
    p.add_argument("--data", required=True, help="directory of slide feature files (.h5 / .pt)")
    add_train_arguments(p, steps=None, lr=1e-3, ckpt_every=50)
    p.add_argument("--quick", action="store_true", help="small model, few steps, small crops (for a CPU)")
    p.add_argument("--init", help="start from this encoder.pt (its architecture wins)")
    p.add_argument("--dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--mlp-dim", type=int)
    p.add_argument("--dropout", type=float, help="encoder dropout (0.1; 0 with --quick)")
    p.add_argument("--pack-size", type=int, default=3)
    p.add_argument("--rules", choices=("paper", "bidirectional"), default="paper")
    p.add_argument("--pos-embed", action="store_true", help="2D sin-cos position code in the encoder")
    p.add_argument("--no-center-input", dest="center_input", action="store_false",
                   help="feed raw features (default: the encoder subtracts each slide's mean feature)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of the files held out for the metrics")
    p.add_argument("--max-patches", type=int, help="crop size (patches) per slide in a batch")
    p.add_argument("--slides-per-batch", type=int)
    p.add_argument("--eval-crops", type=int, default=4, help="crops per held-out slide for the metrics")
    g = p.add_argument_group("MAE")
    g.add_argument("--mask-ratio", type=float, default=0.75)
    g.add_argument("--phase2-at", type=float, default=0.5, help="fraction of the steps after which whole packs are masked")
    g.add_argument("--dec-dim", type=int)
    g.add_argument("--dec-depth", type=int, default=2)
    g.add_argument("--dec-heads", type=int, default=4)
    g = p.add_argument_group("MoCo")
    g.add_argument("--momentum", type=float, default=0.999)
    g.add_argument("--queue", type=int, default=8192)
    g.add_argument("--temperature", type=float, default=0.07)
    g.add_argument("--noise-std", type=float, default=0.2)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 with --quick, else torch's default); "
                   "small models run much faster on one thread, above all on a busy machine")


def split_heldout(slides: list[Slide], frac: float) -> tuple[list[Slide], list[Slide]]:
    """(train, heldout): the files with the lowest CRC32 of their name are held out (stable across runs)."""
    if not 0 <= frac < 1:
        raise ValueError(f"--heldout must be in [0, 1), got {frac}")
    n_held = min(len(slides) - 1, max(1, round(frac * len(slides)))) if frac > 0 else 0
    ranked = sorted(slides, key=lambda s: (zlib.crc32(os.path.basename(s.path).encode()), s.path))
    held = {id(s) for s in ranked[:n_held]}
    return [s for s in slides if id(s) not in held], [s for s in slides if id(s) in held]


def crop(slide: Slide, max_patches: int, gen: torch.Generator, pack_size: int = 3, max_shift: int = 16):
    """(features, coords, patch_size, origin) of a square-ish window of at most max_patches
    patches around a random patch.

    The origin is the slide's, moved up-left by a random whole number (< max_shift) of packs
    per axis: packs keep their patches while grid cells shift, so a model cannot memorise
    where things are on a training slide from absolute positions.
    """
    origin = slide.coords.min(0).values
    shift = torch.randint(max_shift, (2,), generator=gen) if max_shift > 0 else torch.zeros(2, dtype=torch.long)
    moved = origin - shift * pack_size * slide.patch_size
    n = slide.num_patches
    if n <= max_patches:
        return slide.features, slide.coords, slide.patch_size, moved
    cells = (slide.coords - origin) // slide.patch_size
    anchor = cells[int(torch.randint(n, (1,), generator=gen))]
    dist_ = (cells - anchor).abs().amax(1)
    idx = torch.argsort(dist_, stable=True)[:max_patches].sort().values
    return slide.features[idx], slide.coords[idx], slide.patch_size, moved


def sample_crops(slides, k: int, max_patches: int, gen, pack_size: int = 3):
    pick = torch.randint(len(slides), (k,), generator=gen).tolist()
    return [crop(slides[i], max_patches, gen, pack_size) for i in pick]


def eval_crops(slides, per_slide: int, k: int, max_patches: int, seed: int, pack_size: int = 3):
    """Fixed crops of every slide, grouped k per batch; generator seeded independently of training."""
    gen = torch.Generator().manual_seed(seed)
    crops = [crop(s, max_patches, gen, pack_size) for s in slides
             for _ in range(per_slide if s.num_patches > max_patches else 1)]
    return [crops[i:i + k] for i in range(0, len(crops), k)], gen


def _resolve(args) -> None:
    """Fills the size options left unset from --quick or the full defaults."""
    d = QUICK if args.quick else FULL
    for name, value in d.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def build_encoder(args, in_dim: int) -> SlideEncoder:
    if args.init:
        enc = load_encoder(args.init, backend=args.backend)
        if enc.cfg.in_dim != in_dim:
            raise ValueError(f"--init {args.init}: encoder expects in_dim={enc.cfg.in_dim}, the data has {in_dim}")
        if enc.cfg.pack_size != args.pack_size:
            raise ValueError(f"--init {args.init}: encoder uses pack_size={enc.cfg.pack_size}, got --pack-size {args.pack_size}")
        return enc
    cfg = SlideEncoderConfig(in_dim=in_dim, dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim,
                             dropout=args.dropout, pack_size=args.pack_size, rules=args.rules,
                             pos_embed=args.pos_embed, center_input=args.center_input,
                             backend=args.backend)
    return SlideEncoder(cfg)


def run(args, stop_after: int | None = None) -> dict:
    """Pretrains per ``args`` (see add_arguments); returns the metrics written to OUT/metrics.json."""
    init_given = args.init is not None
    if init_given and any(getattr(args, a) is not None for a in ARCH):
        raise ValueError("--init sets the encoder architecture; drop --dim/--depth/--heads/--mlp-dim")
    _resolve(args)
    rank, world = init_distributed()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    slides = load_slides(args.data)
    in_dims = {s.in_dim for s in slides}
    if len(in_dims) != 1:
        raise ValueError(f"{args.data}: slides have different feature widths {sorted(in_dims)}")
    train, held = split_heldout(slides, args.heldout)
    cfg = train_config_from_args(args)
    torch.manual_seed(args.seed)  # same initial weights for every run with this seed
    encoder = build_encoder(args, in_dims.pop())
    k, maxp, spb = encoder.cfg.pack_size, args.max_patches, args.slides_per_batch

    if args.stage == "mae":
        model = MAE(encoder, MAEConfig(args.mask_ratio, args.dec_dim, args.dec_depth, args.dec_heads))

        def make_batch(step, micro, gen):
            phase = PACK_MASKING if step >= args.phase2_at * cfg.steps else PATCH_MASKING
            return mask_slides(sample_crops(train, spb, maxp, gen, k), k, args.mask_ratio, phase, gen).to(device)

        on_step_end = None
    else:
        mcfg = MoCoConfig(momentum=args.momentum, queue=args.queue, temperature=args.temperature, noise_std=args.noise_std)
        model = MoCo(encoder, mcfg)

        def make_batch(step, micro, gen):
            return contrast_batch(sample_crops(train, spb, maxp, gen, k), k, mcfg, gen).to(device)

        def on_step_end(step, bare):
            bare.momentum_step()

    model.to(device)
    threads = torch.get_num_threads()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    try:
        t0 = time.perf_counter()
        result = run_training(cfg, model, lambda m, batch, step: m(batch), make_batch, on_step_end=on_step_end,
                              desc=f"pretrain {args.stage}", stop_after=stop_after)
        train_s = time.perf_counter() - t0
        metrics = _finish(args, model, encoder, result, train_s, train, held, rank, world, device, cfg)
    finally:
        torch.set_num_threads(threads)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _finish(args, model, encoder, result, train_s, train, held, rank, world, device, cfg) -> dict:
    """Held-out metrics, OUT/encoder.pt and OUT/metrics.json (rank 0, full runs only)."""
    metrics: dict = {}
    if rank == 0 and result["steps"] == cfg.steps:  # not when stopped early (as if killed)
        metrics = {"stage": args.stage, "final_loss": result["final_loss"], "steps": result["steps"],
                   "train_wall_s": round(train_s, 2), "train_slides": len(train), "heldout_slides": len(held),
                   "encoder": asdict(encoder.cfg), "world_size": world, "args": dict(vars(args))}
        metrics.update(_evaluate(args, model, held or train, encoder.cfg.pack_size, device))
        metrics["heldout_is_train"] = not held
        save_encoder(os.path.join(args.out, "encoder.pt"), encoder)
        write_metrics(args.out, metrics)
    return metrics


def _evaluate(args, model, slides, k, device) -> dict:
    batches, gen = eval_crops(slides, args.eval_crops, args.slides_per_batch, args.max_patches, EVAL_SEED, k)
    if args.stage == "mae":
        out = {}
        for phase, prefix in ((PATCH_MASKING, "heldout_"), (PACK_MASKING, "heldout_pack_")):
            masked = [mask_slides(b, k, args.mask_ratio, phase, gen).to(device) for b in batches]
            r = evaluate_mae(model, masked)
            out[prefix + "masked_mse"] = r["masked_mse"]
            out[prefix + "mean_baseline_mse"] = r["mean_baseline_mse"]
            out[prefix + "mse_reduction"] = 1 - r["masked_mse"] / r["mean_baseline_mse"]
        return out
    mcfg = model.cfg
    r = evaluate_moco(model, [contrast_batch(b, k, mcfg, gen).to(device) for b in batches])
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
