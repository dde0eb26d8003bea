"""What the topo-pack Triton kernels need besides q, k, v: layout tensors, mask flags, sizes, the launch call.

Everything here derives from tensor shapes and the rules only (no host sync, no
data-dependent sizes), so the launchers trace under torch.compile and a new
slide size never changes a compile-time constant except through its size bucket.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.library import wrap_triton
from triton import knobs

from topopack.layout import TopoLayout
from topopack.rules import GLOBAL, PATCH, KeyGroup, TopoRules, sparse_key_groups

# Decided when the kernels are decorated (triton.jit reads TRITON_INTERPRET then).
INTERPRET = bool(knobs.runtime.interpret)

# Tests set this to pre-fill every output and scratch buffer with NaN, so a row
# that no program writes shows up as NaN instead of stale memory.
POISON_OUTPUTS = False

MAX_HEAD_DIM = 256
MIN_SIZE_BUCKET = 4 ** 7  # tokens; buckets are powers of 4 from here (16384, 65536, 262144, ...)
SLIDE_CHUNK = 256  # slides a kernel scans at once when it maps a program to its slide
LOG2E = 1.4426950408889634


class LayoutArgs(NamedTuple):
    """The layout tensors the kernels read (int64, on the data's device)."""

    pack_patch_start: torch.Tensor  # [P] first patch token of each pack
    pack_patch_count: torch.Tensor  # [P]
    pack_summary_token: torch.Tensor  # [P]
    slide_token_start: torch.Tensor  # [S+1]; the slide's global token is its first
    slide_pack_start: torch.Tensor  # [S+1]

    @classmethod
    def of(cls, layout: TopoLayout) -> "LayoutArgs":
        return cls(*(getattr(layout, f) for f in cls._fields))

    @property
    def num_packs(self) -> int:
        return self.pack_patch_start.shape[0]

    @property
    def num_slides(self) -> int:
        return self.slide_token_start.shape[0] - 1


@dataclass(frozen=True)
class MaskFlags:
    """The rules' optional key groups as kernel constexprs; the kernels always compute the
    groups that topopack.rules.SPARSE_KEY_GROUPS lists as always seen."""

    patch_sees_summary: bool
    global_sees_all: bool

    @classmethod
    def from_rules(cls, rules: TopoRules) -> "MaskFlags":
        groups = sparse_key_groups(rules, "triton")
        return cls(patch_sees_summary=KeyGroup.PACK_SUMMARY in groups[PATCH],
                   global_sees_all=KeyGroup.SLIDE_ALL in groups[GLOBAL])

    @staticmethod
    @functools.cache
    def of(rules: TopoRules) -> "MaskFlags":
        """from_rules, memoised (eager calls; dynamo warns on functools caches, so compiled code uses from_rules)."""
        return MaskFlags.from_rules(rules)

    def constexprs(self) -> dict:
        return dict(PATCH_SEES_SUMMARY=self.patch_sees_summary, GLOBAL_SEES_ALL=self.global_sees_all)


def block_d(d: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (tl.dot's minimum); the pad is masked."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head_dim must be 1..{MAX_HEAD_DIM}, got {d}")
    return max(16, 1 << (int(d) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """triton.cdiv without its constexpr wrapper (microseconds a call on the host)."""
    return (a + b - 1) // b


def slide_blocks(num_packs: int, num_slides: int, block: int) -> int:
    """Programs of a part whose blocks of `block` packs never straddle slides (see triton_fwd._slide_block)."""
    return num_packs // block + num_slides


def size_bucket(num_tokens: int) -> int:
    """The config table's size key: the smallest power of 4 >= num_tokens, at least MIN_SIZE_BUCKET."""
    bucket = MIN_SIZE_BUCKET
    while bucket < num_tokens:
        bucket *= 4
    return bucket



def positive_in_fp32(x: float) -> bool:
    """x > 0 after rounding to fp32, as the kernels see a scale (1e-46 rounds to 0)."""
    return struct.unpack("f", struct.pack("f", x))[0] > 0


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs stay exact (ieee); fp16/bf16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def new_buffer(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def launch(kernel, grid, cfg: dict, *args, **constexprs) -> None:
    """kernel[grid](*args) with the config's block sizes, num_warps and num_stages.

    Eager calls launch the jit kernel directly (microseconds); under torch.compile the
    launch goes through wrap_triton, so the kernel is traced into the graph.
    """
    k = wrap_triton(kernel) if torch.compiler.is_compiling() else kernel
    k[grid](*args, **constexprs, **cfg)
