"""What the topo-pack Triton kernels need besides q, k, v: layout tensors, mask flags, sizes.

Everything here derives from tensor shapes and the rules only (no host sync, no
data-dependent sizes), so the launchers trace under torch.compile and a new
slide size never changes a compile-time constant except through a bucket.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from triton import knobs

from topopack.layout import TopoLayout
from topopack.rules import GLOBAL, PATCH, KeyGroup, TopoRules, sparse_key_groups

# Decided when the kernels are decorated (triton.jit reads TRITON_INTERPRET then).
INTERPRET = bool(knobs.runtime.interpret)
AUTOTUNE = os.environ.get("TOPOPACK_TRITON_AUTOTUNE", "1") != "0"

# Tests set this to pre-fill every output and scratch buffer with NaN, so a row
# that no program writes shows up as NaN instead of stale memory.
POISON_OUTPUTS = False

MAX_HEAD_DIM = 256
GLOBAL_CHUNK = 2048  # tokens per split of a slide-wide row or column (before bucketing)
MAX_SPLITS = 128


class LayoutArgs(NamedTuple):
    """The layout tensors the kernels read (int64, on the data's device)."""

    pack_patch_start: torch.Tensor  # [P] first patch token of each pack
    pack_patch_count: torch.Tensor  # [P]
    pack_summary_token: torch.Tensor  # [P]
    pack_slide: torch.Tensor  # [P]
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

    def constexprs(self, *names: str) -> dict:
        """The kernel constexprs `names` (a kernel takes only the flags it reads)."""
        every = dict(PATCH_SEES_SUMMARY=self.patch_sees_summary, GLOBAL_SEES_ALL=self.global_sees_all)
        return {n: every[n] for n in names}


def block_d(d: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (tl.dot's minimum); the pad is masked."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head_dim must be 1..{MAX_HEAD_DIM}, got {d}")
    return max(16, triton.next_power_of_2(d))


def size_bucket(n: int) -> int:
    """Autotune key for a size: its next power of two, so a new slide size reuses the tuned config."""
    return triton.next_power_of_2(max(1, n))


def num_splits(num_tokens: int) -> int:
    """Splits of a slide-wide row/column: a power of two from the total token count (a shape)."""
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(num_tokens, GLOBAL_CHUNK)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs stay exact (ieee); fp16/bf16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def new_buffer(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def configs(*options, interpret: dict | None = None) -> list:
    """Autotune configs from (block sizes, num_warps, num_stages); the first is the default.

    One config only under the interpreter (`interpret` or the default; autotuning there
    is only slow), or with TOPOPACK_TRITON_AUTOTUNE=0 (quick checks: one compile per variant).
    """
    if INTERPRET:
        return [triton.Config(interpret or options[0][0], num_warps=4, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in (options if AUTOTUNE else options[:1])]
