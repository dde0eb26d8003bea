"""The training loop shared by pretraining and fine-tuning.

The data position is the step: ``make_batch(step, micro, gen)`` gets a generator
seeded from (seed, step, global micro-batch), the global micro-batch of rank r being
r * grad_accum + micro, so a step's data is the same however its micro-batches are
split over processes (2 processes x grad_accum 1 = 1 process x grad_accum 2). Losses in
the history are means over all ranks. Model-internal randomness (dropout) uses the
global RNGs, checkpointed for every rank. Together with the model, optimiser and
scheduler state this makes ``--resume`` continue exactly where a run stopped.

--dist ddp (default): DistributedDataParallel under torchrun, checkpoints in
OUT/checkpoint.pt. --dist fsdp: FSDP2 under torchrun (``shard_units`` of run_training
say which modules are groups of their own) and DCP checkpoints in OUT/checkpoint.dcp
(model/distributed.py), at any world size: a 1-process --dist fsdp run trains
unsharded and resumes a 2-process checkpoint.

OUT rules: a new run refuses an OUT that holds a run (RUN_FILES) unless --overwrite;
--resume refuses settings that differ from the checkpoint's ``run_config`` unless
--allow-changed names each; only rank 0 writes. Checkpoints load with
weights_only=True after their zip CRC-32 checksums are verified.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import FRACTION, NON_NEGATIVE, POSITIVE, Check, add_config_arguments, config_from_args, option, validate
from .distributed import TRAIN_STATE, Sharding, check_dcp, dcp_path, gather_objects, load_dcp, save_dcp, unshard
from .progress import progress

CHECKPOINT = "checkpoint.pt"
DCP_CHECKPOINT = "checkpoint.dcp"  # a directory (--dist fsdp)
METRICS = "metrics.json"
# an OUT holding any of these holds a run: a new run there needs --resume or --overwrite
RUN_FILES = (CHECKPOINT, DCP_CHECKPOINT, DCP_CHECKPOINT + ".prev", METRICS, "encoder.pt", "model.json")
DIST = {"ddp": CHECKPOINT, "fsdp": DCP_CHECKPOINT}  # strategy -> its checkpoint
# run_config fields that may differ on --resume
FREE_ON_RESUME = frozenset({"out", "resume", "overwrite", "allow_changed", "device", "threads", "progress",
                            "workers"})
START_OVER = "delete it or pass --overwrite to start over"


@dataclass
class TrainConfig:
    out: str = option(help="output directory")
    steps: int = option(1000, "optimizer steps", check=POSITIVE)
    lr: float = option(3e-4, "peak learning rate", check=POSITIVE)
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)", check=NON_NEGATIVE)
    warmup: float = option(0.05, "fraction of the steps with linear warm-up, then cosine decay", check=FRACTION)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of --lr",
                                 check=Check(lambda x: 0 <= x <= 1, "in [0, 1]"))
    grad_accum: int = option(1, "micro-batches per optimizer step", check=POSITIVE)
    clip: float = option(1.0, "grad-norm clip, 0 = off", check=NON_NEGATIVE)
    ckpt_every: int = option(50, "checkpoint every N steps (and at the end)", check=POSITIVE)
    seed: int = option(0, "seed of the weights, data order and dropout", check=NON_NEGATIVE)
    resume: bool = option(False, "continue exactly from OUT/checkpoint.pt (--dist fsdp: OUT/checkpoint.dcp)")
    overwrite: bool = option(False, "replace the run in OUT (deletes its checkpoint, metrics and model files)")
    allow_changed: list[str] = option([], "with --resume: accept these changed settings, e.g. lr,steps")
    bf16: bool = option(True, "bf16 autocast on CUDA")
    progress: bool | None = option(None, "progress bar (default: on a terminal; else a status line every 10%%)")
    dist: str = option("ddp", "under torchrun: ddp (replicated weights, OUT/checkpoint.pt) or fsdp (FSDP2: sharded "
                       "weights, gradients and optimiser state; DCP checkpoints in OUT/checkpoint.dcp, which also "
                       "resume on another number of processes); one process trains unsharded either way",
                       choices=tuple(DIST))

    def __post_init__(self):
        unset = [f for f, v in asdict(self).items() if v is None and f != "progress"]
        if unset:
            raise ValueError(f"TrainConfig: {', '.join(unset)} must be set")
        validate(self)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in OUT and --overwrite replaces it: pass one of them")


def add_train_arguments(parser, **defaults) -> None:
    """The TrainConfig flags; ``defaults`` overrides its defaults for one command."""
    add_config_arguments(parser, TrainConfig, defaults=defaults)


def train_config_from_args(args) -> TrainConfig:
    return config_from_args(TrainConfig, args)


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


# ---- files ----------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """write(binary file) to PATH.<random>.tmp in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _non_finite(value, name: str = "") -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{name} = {value}"]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [bad for k, v in items for bad in _non_finite(v, f"{name}.{k}" if name else str(k))]


def write_metrics(out, metrics: dict) -> Path:
    """Merges ``metrics`` into OUT/metrics.json atomically; refuses NaN and inf (not JSON)."""
    path = Path(out) / METRICS
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **metrics}
    bad = _non_finite(merged)
    if bad:
        raise ValueError(f"write_metrics {path}: {', '.join(bad)} is not a finite number, which JSON cannot hold; "
                         f"nothing written")
    text = json.dumps(merged, indent=2, allow_nan=False)
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _checkpoint_of(out: Path, dist_: str) -> Path | None:
    """The checkpoint in OUT that a --dist ``dist_`` run resumes from, or None."""
    path = out / DIST[dist_]
    return dcp_path(path) if dist_ == "fsdp" else path if path.exists() else None


def prepare_output(cfg: TrainConfig, rank: int = 0) -> Path:
    """Checks OUT before any expensive work: a new run refuses an OUT holding a run unless --overwrite
    (then rank 0 deletes the RUN_FILES); --resume needs the checkpoint of its --dist. Rank 0 creates OUT and
    removes temporary files our atomic writes left there when killed."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and _checkpoint_of(out, cfg.dist) is None:
        other = next((d for d in DIST if d != cfg.dist and _checkpoint_of(out, d)), None)
        fix = (f"OUT holds {DIST[other]} of a --dist {other} run: resume with --dist {other}" if other
               else "run without --resume to start")
        raise FileNotFoundError(f"--resume: no checkpoint at {out / DIST[cfg.dist]}; {fix}")
    if found and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(found)}): pass --resume to continue it "
                              f"or --overwrite to replace it")
    if rank == 0:
        if cfg.overwrite:
            for name in found:
                _remove(out / name)
        for name in RUN_FILES:
            for tmp in out.glob(f"{name}*.tmp"):
                _remove(tmp)
        out.mkdir(parents=True, exist_ok=True)
    return out


def load_checkpoint(path) -> dict:
    """The state run_training saved in ``path`` (on the CPU), its checksums verified, loaded with weights_only."""
    return load_verified(path, {"model", "optimizer", "scheduler", "step", "history", "rng", "run_config"})


def load_verified(path, keys: set[str]) -> dict:
    """The dict torch.save wrote to ``path`` (on the CPU) after the zip CRC-32 check, loaded with weights_only;
    ValueError naming the problem unless it holds ``keys``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # CRC-32 of every member, as torch.save stored them
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: damaged or not a checkpoint ({e}); {START_OVER}") from None
    if bad is not None:
        raise ValueError(f"{path}: checksum mismatch in {bad}, the file is damaged; {START_OVER}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path}: cannot be loaded safely ({str(e).splitlines()[0]}); {START_OVER}") from None
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"{path}: not a topopack training checkpoint (needs keys {sorted(keys)}); {START_OVER}")
    if "rng" in keys and not isinstance(state["rng"], list):
        raise ValueError(f"{path}: written by an older topopack (one RNG state for all ranks); {START_OVER}")
    return state


# ---- run config -----------------------------------------------------------------------
def _json(value, what: str):
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-able (str, int, finite float, bool, None, lists, dicts): {e}") from None


def full_run_config(cfg: TrainConfig, run_config: dict) -> dict:
    """``run_config`` plus the TrainConfig fields, as JSON values."""
    train = _json(asdict(cfg), "TrainConfig")
    extra = _json(run_config, "run_config")
    clash = sorted(k for k in set(train) & set(extra) if train[k] != extra[k])
    if clash:
        raise ValueError(f"run_config disagrees with the TrainConfig on {clash}")
    return {**extra, **train}


def check_resume(saved: dict, new: dict, step: int, path) -> dict:
    """The changed fields of ``new`` against the checkpoint's ``saved`` run config, {name: (old, new)};
    ValueError unless new["allow_changed"] names them all, or if new["steps"] is below the checkpoint's step."""
    if new["steps"] < step:
        raise ValueError(f"--resume: --steps {new['steps']} is below the step of {path} ({step}); "
                         f"pass --steps {step} or more")
    names = sorted((set(saved) | set(new)) - FREE_ON_RESUME)
    pairs = {k: (saved.get(k, "(absent)"), new.get(k, "(absent)")) for k in names}
    changes = {k: (old, now) for k, (old, now) in pairs.items() if old != now}
    unknown = sorted(set(new["allow_changed"]) - set(saved) - set(new))
    if unknown:
        raise ValueError(f"--allow-changed {','.join(unknown)}: no such setting; settings: {', '.join(names)}")
    refused = [k for k in changes if k not in new["allow_changed"]]
    if refused:
        lines = "".join(f"\n  {k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ValueError(f"--resume: settings differ from {path}:{lines}\nresume with the checkpoint's settings, "
                         f"or accept the change with --allow-changed {','.join(refused)}")
    return changes


# ---- RNG state (plain tensors and numbers, so weights_only can load it) ---------------------
def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": {"version": version, "state": list(mt), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def batch_generator(seed: int, step: int, micro: int, rank: int = 0, grad_accum: int = 1) -> torch.Generator:
    """The generator of micro-batch ``micro`` of ``rank``: global micro-batch rank * grad_accum + micro."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + rank * grad_accum + micro)


# ---- optimiser and schedule -----------------------------------------------------------------
def build_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (group 0), none on biases and norms (group 1)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)


def build_scheduler(opt, cfg: TrainConfig):
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to ``min_lr_ratio``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # costs seconds: only when training

    return get_cosine_with_min_lr_schedule_with_warmup(opt, int(cfg.warmup * cfg.steps), cfg.steps,
                                                       min_lr_rate=cfg.min_lr_ratio)


def _apply_settings(opt, sched, cfg: TrainConfig) -> None:
    """After loading their states: this run's lr and weight decay (the same values unless --allow-changed)."""
    for group, decay in zip(opt.param_groups, (cfg.weight_decay, 0.0)):
        group["initial_lr"], group["weight_decay"] = cfg.lr, decay
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for group, f in zip(opt.param_groups, sched.lr_lambdas):
        group["lr"] = cfg.lr * f(sched.last_epoch)


def _read_state(path: Path, fsdp: bool, rank: int) -> dict:
    """The checkpoint's state; for fsdp its TRAIN_STATE, rank 0 checking every file and telling all ranks."""
    if not fsdp:
        return load_checkpoint(path)
    keys = {"scheduler", "step", "history", "rng", "run_config", "param_groups", "files"}
    error = None
    if rank == 0:
        try:
            check_dcp(path, load_verified(path / TRAIN_STATE, keys)["files"], START_OVER)
        except ValueError as e:
            error = str(e)
    error = gather_objects(error)[0]
    if error:
        raise ValueError(error)
    return load_verified(path / TRAIN_STATE, keys)


def _global_mean(totals: dict[str, float], device) -> dict[str, float]:
    """``totals`` averaged over the ranks."""
    if not dist.is_initialized():
        return totals
    t = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(totals, (t / dist.get_world_size()).tolist()))


def _clip(params, max_norm: float) -> float:
    """Clips the gradients to ``max_norm`` in total (over all shards); returns the norm before. Sharded
    (DTensor) and plain parameters are measured apart: the first norm is reduced over the ranks."""
    groups = [g for g in ([p for p in params if hasattr(p, "full_tensor")],
                          [p for p in params if not hasattr(p, "full_tensor")]) if g]
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return float(norm)


def run_training(cfg: TrainConfig, model: nn.Module, loss_fn, make_batch, *, run_config: dict, on_step_end=None,
                 desc: str = "train", stop_after: int | None = None,
                 shard_units: Callable[[nn.Module], list[nn.Module]] | None = None) -> dict:
    """Trains ``model`` for cfg.steps optimizer steps; see the module docstring.

    loss_fn(model, batch, step) -> (loss, {name: float}); make_batch(step, micro, gen) -> batch;
    on_step_end(step, bare_model) after each optimizer step. ``run_config``: JSON-able dict of everything
    else that defines the run (architecture, data path, stage options); stored in the checkpoint with the
    TrainConfig and compared on --resume. ``stop_after`` ends the run after that step as if it had been
    killed (for resume tests). ``shard_units(model)``: with --dist fsdp under torchrun, the modules that are
    FSDP groups of their own (the root holds the rest; None: the root alone). The model is unsharded again
    at the end: full weights on every rank.
    """
    rank, world = init_distributed()
    out = prepare_output(cfg, rank)
    run_config = full_run_config(cfg, run_config)
    fsdp = cfg.dist == "fsdp"
    device = next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("run_training: the model has no trainable parameters")
    sharding = Sharding(model, shard_units(model) if shard_units else [], device) if fsdp and world > 1 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg)
    sched = build_scheduler(opt, cfg)
    ckpt_path = out / DIST[cfg.dist]
    start, history = 0, []
    if cfg.resume:
        path = _checkpoint_of(out, cfg.dist)
        state = _read_state(path, fsdp, rank)
        changes = check_resume(state["run_config"], run_config, state["step"], path)
        for k, (old, new) in changes.items():
            if rank == 0:
                print(f"{desc}: --allow-changed {k}: {old!r} -> {new!r}")
        if fsdp:
            load_dcp(path, model, opt, state["param_groups"])
        else:
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as e:
                raise ValueError(f"{path}: its weights do not fit this model ({str(e).splitlines()[0]}); "
                                 f"resume with the checkpoint's architecture") from None
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _apply_settings(opt, sched, cfg)
        start, history = state["step"], state["history"]
        if rank < len(state["rng"]):
            _set_rng_state(state["rng"][rank])
        else:  # more processes than the run had
            seed_everything(cfg.seed + rank)
    else:
        seed_everything(cfg.seed + rank)
    bare = model
    if world > 1 and not fsdp:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext())

    def save(step: int) -> None:
        state = {"scheduler": sched.state_dict(), "step": step, "history": history,
                 "rng": gather_objects(_rng_state()), "run_config": run_config}
        if fsdp:
            save_dcp(ckpt_path, step, model, opt, state, rank)
        elif rank == 0:
            atomic_save({"model": bare.state_dict(), "optimizer": opt.state_dict(), **state}, ckpt_path)

    bar = progress(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, bar=cfg.progress,
                   disable=rank != 0)
    model.train()
    for step in bar:
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = make_batch(step, micro, batch_generator(cfg.seed, step, micro, rank, cfg.grad_accum))
            sync = micro == cfg.grad_accum - 1
            if sharding is not None:
                model.set_requires_gradient_sync(sync)
            with autocast, (model.no_sync() if world > 1 and not (fsdp or sync) else nullcontext()):
                loss, metrics = loss_fn(model, batch, step)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        if sharding is not None:
            sharding.average_replicated_grads()
        totals = _global_mean(totals, device)
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(f"{desc}: loss is {totals['loss']} at step {step}; last checkpoint kept at {ckpt_path}")
        if cfg.clip > 0:
            totals["grad_norm"] = _clip(params, cfg.clip)
        lr = opt.param_groups[0]["lr"]  # the rate this step uses
        opt.step()
        sched.step()
        if on_step_end is not None:
            on_step_end(step, bare)
        history.append({"step": step + 1, "lr": lr, **totals})
        bar.set_postfix({k: f"{v:.4g}" for k, v in totals.items() if k != "grad_norm"})
        done = step + 1
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save(done)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    if sharding is not None:
        unshard(bare, sharding)
    return {"final_loss": history[-1]["loss"], "history": history, "steps": history[-1]["step"]}
