"""The training loop shared by pretraining and fine-tuning.

The data position is the step: ``make_batch(step, micro, gen)`` gets a generator
seeded from (seed, step, micro, rank), so the data order is a pure function of the
step. Model-internal randomness (dropout) uses the global RNGs, which are
checkpointed. Together with the model, optimiser and scheduler state this makes
``--resume`` continue exactly where a run stopped.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    out: str
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of steps with linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0  # max grad norm; 0 turns clipping off
    ckpt_every: int = 50
    seed: int = 0
    resume: bool = False
    bf16: bool = True  # autocast on CUDA only


def add_train_arguments(parser, **defaults) -> None:
    """Adds the shared training flags; ``defaults`` overrides TrainConfig's per command."""
    d = {**{k: v for k, v in asdict(TrainConfig(out="")).items()}, **defaults}
    parser.add_argument("--out", required="out" not in defaults, default=defaults.get("out"), help="output directory")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps")
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    parser.add_argument("--warmup", type=float, default=d["warmup"], help="warm-up fraction of the steps")
    parser.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per step")
    parser.add_argument("--clip", type=float, default=d["clip"], help="grad-norm clip, 0 = off")
    parser.add_argument("--ckpt-every", type=int, default=d["ckpt_every"], help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast on CUDA")


def train_config_from_args(args) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})


# ---- distributed ----------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """(rank, world_size); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- atomic files ---------------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_metrics(out, metrics: dict) -> Path:
    """Merges ``metrics`` into OUT/metrics.json atomically."""
    path = Path(out) / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(metrics)
    fd, tmp = tempfile.mkstemp(prefix="metrics", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(old, f, indent=2)
    os.replace(tmp, path)
    return path


# ---- RNG state ------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def batch_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def run_training(cfg: TrainConfig, model: nn.Module, loss_fn, make_batch, *, on_step_end=None,
                 desc: str = "train", stop_after: int | None = None) -> dict:
    """Trains ``model`` for cfg.steps optimizer steps; see the module docstring.

    loss_fn(model, batch, step) -> (loss, {name: float}); make_batch(step, micro, gen) -> batch;
    on_step_end(step, bare_model) after each optimizer step. ``stop_after`` ends the run after
    that step as if it had been killed (for resume tests).
    """
    from tqdm.auto import tqdm

    rank, world = init_distributed()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("run_training: the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, history = 0, []
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        _set_rng_state(state["rng"])
    else:
        seed_everything(cfg.seed + rank)
    bare = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext())

    def save(step: int) -> None:
        if rank == 0:
            atomic_save({"model": bare.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step, "history": history, "rng": _rng_state(), "config": asdict(cfg)}, ckpt_path)

    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=rank != 0, dynamic_ncols=True)
    model.train()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = make_batch(step, micro, batch_generator(cfg.seed, step, micro, rank))
            sync = micro == cfg.grad_accum - 1 or world == 1
            with autocast, (nullcontext() if sync else model.no_sync()):
                loss, metrics = loss_fn(model, batch, step)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"{desc}: loss is {totals['loss']} at step {step}; last checkpoint kept at {ckpt_path}")
        if cfg.clip > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        opt.step()
        sched.step()
        if on_step_end is not None:
            on_step_end(step, bare)
        history.append({"step": step + 1, "lr": sched.get_last_lr()[0], **totals})
        bar.set_postfix({k: f"{v:.4g}" for k, v in totals.items() if k != "grad_norm"})
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save(done)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    final = history[-1]["loss"] if history else float("nan")
    return {"final_loss": final, "history": history, "steps": len(history) and history[-1]["step"]}
