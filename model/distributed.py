"""Multi-process pieces of the trainer: FSDP2 sharding and its undoing, DCP checkpoints, per-rank RNG states.

``--dist fsdp`` under torchrun: ``Sharding`` calls ``fully_shard`` on each unit (an encoder block, an LLM decoder
layer), then on the root; ``unshard`` gathers the full weights back into plain parameters after training, so rank 0
alone can evaluate and save the model as after a single-process run.

A DCP checkpoint is a directory: the shards and ``.metadata`` DCP writes (one ``__<rank>_0.distcp`` per rank), and
TRAIN_STATE, which rank 0 writes beside them: step, history, RNG of every rank, run_config, scheduler, the
optimiser's param_groups and the size and CRC-32 of every other file. Only tensors go through DCP (its non-tensor
values load with pickle), and its pickled ``.metadata`` is read by a restricted unpickler first, so loading runs no
code from the checkpoint. It is written to ``<name>.<step>.tmp`` and renamed into place; the checkpoint it replaces
is renamed to ``<name>.prev`` first and deleted last, so a complete checkpoint exists at every instant.
"""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

TRAIN_STATE = "train_state.pt"
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


# ---- what to shard ------------------------------------------------------------------------
def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a pretraining model: the encoder's, the MAE decoder's, MoCo's key encoder's."""
    from .encoder import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers (Hugging Face ``*DecoderLayer`` classes; peft wrapping keeps them)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError("--dist fsdp: the LLM has no decoder layers to shard (no module class named *DecoderLayer); "
                         "use --dist ddp")
    return layers


# ---- sharding -----------------------------------------------------------------------------
class Sharding:
    """FSDP2 over all ranks: each unit a group of its own (fully_shard bottom-up), then the root with the rest.
    Records the class, attributes and forward hooks fully_shard gave each module (``unshard`` takes
    them away again), and the parameters left replicated: FSDP2 cannot shard 0-dim ones (MAE's pos_gain)."""

    def __init__(self, model: nn.Module, units: list[nn.Module], device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        def hooks(m):
            return {d: set(getattr(m, d)) for d in _HOOK_DICTS}

        before = {m: (type(m), set(vars(m)), hooks(m)) for m in model.modules()}
        self.replicated = [p for p in model.parameters() if p.ndim == 0]
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for unit in [*units, model]:
            fully_shard(unit, mesh=mesh, ignored_params=set(self.replicated))
        self.added = {m: (cls, set(vars(m)) - attrs, {d: set(keys) - old[d] for d, keys in hooks(m).items()})
                      for m, (cls, attrs, old) in before.items()}

    def average_replicated_grads(self) -> None:
        """The replicated parameters' gradients averaged over the ranks, as FSDP does for the sharded ones."""
        for p in self.replicated:
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def unshard(model: nn.Module, sharding: Sharding) -> None:
    """Back to a plain module with full parameters on every rank (a collective: all ranks call it)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # the sharded parameters registered
    full: dict[int, nn.Parameter] = {}  # shared (tied) parameters stay shared
    for m in model.modules():  # the same order on every rank
        for name, p in m._parameters.items():
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                m._parameters[name] = full[id(p)]
    for m, (cls, attrs, hooks) in sharding.added.items():
        for d, keys in hooks.items():
            for k in keys:
                getattr(m, d).pop(k, None)
        for k in attrs:
            delattr(m, k)
        m.__class__ = cls


# ---- collectives --------------------------------------------------------------------------
def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- DCP checkpoints ----------------------------------------------------------------------
def dcp_path(final: Path) -> Path | None:
    """The complete DCP checkpoint at ``final``: itself, or ``final.prev`` when a save was killed between its
    two renames; None if neither exists."""
    prev = final.with_name(final.name + ".prev")
    return final if final.exists() else prev if prev.exists() else None


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(directory: Path) -> dict[str, list[int]]:
    return {p.name: [p.stat().st_size, _crc(p)] for p in sorted(directory.iterdir()) if p.name != TRAIN_STATE}


@contextmanager
def _single_process_is_fine():
    """Without a process group DCP reads and writes alone, and warns that it does so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp(final: Path, step: int, model: nn.Module, opt, train_state: dict, rank: int) -> None:
    """Writes the checkpoint described in the module docstring (all ranks call it; rank 0 writes all but the
    shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = final.with_name(f"{final.name}.{step}.tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    msd, osd = get_state_dict(model, opt)
    with _single_process_is_fine():
        dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=tmp)
    if rank != 0:
        return
    with open(tmp / TRAIN_STATE, "wb") as f:
        torch.save({**train_state, "param_groups": osd["param_groups"], "files": _manifest(tmp)}, f)
        f.flush()
        os.fsync(f.fileno())
    prev = final.with_name(final.name + ".prev")
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)  # a leftover; ``final`` is complete
        os.replace(final, prev)
    os.replace(tmp, final)
    if prev.exists():
        shutil.rmtree(prev)


_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` with only its own classes, torch.Size, dtypes and paths allowed."""

    def find_class(self, module, name):
        obj = super().find_class(module, name) if module.split(".")[0] in ("torch", "pathlib", "collections") else None
        ok = ((module, name) in _METADATA_GLOBALS or isinstance(obj, torch.dtype)
              or (module == _METADATA_MODULE and isinstance(obj, type) and obj.__module__ == module))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return obj


def check_dcp(path: Path, files: dict, start_over: str) -> None:
    """ValueError naming the problem unless every file of the checkpoint at ``path`` matches ``files`` (its
    TRAIN_STATE's manifest) and its metadata reads safely and describes tensors only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    found = {p.name for p in path.iterdir() if p.name != TRAIN_STATE}
    if found != set(files):
        raise ValueError(f"{path}: files {sorted(found ^ set(files))} missing or unexpected; {start_over}")
    for name, (size, crc) in files.items():
        if (path / name).stat().st_size != size or _crc(path / name) != crc:
            raise ValueError(f"{path / name}: checksum mismatch, the file is damaged; {start_over}")
    try:
        stored = _stored(path)
    except Exception as e:
        raise ValueError(f"{path / '.metadata'}: cannot be loaded safely ({e}); {start_over}") from None
    if not all(isinstance(v, TensorStorageMetadata) for v in stored.values()):
        raise ValueError(f"{path}: holds non-tensor values, which DCP would unpickle; {start_over}")


def _stored(path: Path) -> dict:
    """{flat key: metadata} of the tensors of the checkpoint at ``path``, read with _MetadataUnpickler."""
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load().state_dict_metadata


def load_dcp(path: Path, model: nn.Module, opt, param_groups: list) -> None:
    """Model and optimiser state from the checkpoint at ``path``, resharded to this world size (checked first
    with check_dcp). A parameter without optimiser state in the checkpoint (no gradient yet) gets none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)  # a fresh optimiser gets state for every parameter here
    stored = _stored(path)
    ostate = {fqn: s for fqn, s in osd["state"].items() if all(f"optim.{fqn}.{k}" in stored for k in s)}
    try:
        with _single_process_is_fine():
            dcp.load({"model": msd, "optim": ostate}, checkpoint_id=path)
    except Exception as e:  # DCP names missing keys and wrong sizes
        raise ValueError(f"{path}: its weights do not fit this model ({str(e).splitlines()[0][:300]}); resume with "
                         f"the checkpoint's architecture") from None
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict={"state": ostate, "param_groups": param_groups},
                   options=StateDictOptions(strict=False))  # dcp.load above refused missing weights
