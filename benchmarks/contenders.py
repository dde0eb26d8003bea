"""The benchmark's contenders: what each one runs on a grid size, on the same inputs.

Every impl takes the same random q, k, v ([B, H, L, D], topopack's token order [global, summaries, patches
pack-major]); see benchmarks/README.md for the list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from topopack.layout import TopoLayout
from topopack.rules import PATCH, RULES_BY_NAME, SUMMARY, allowed

IMPLS = ("topopack-triton", "topopack-portable", "dense", "authors", "flex", "flex-arith", "flex-interleaved", "floor")
FLEX_IMPLS = tuple(name for name in IMPLS if name.startswith("flex"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cuda": (63, 96, 192, 321, 447), "cpu": (32, 64, 96)}
QUICK_SIZES = {"cuda": (63, 192), "cpu": (32, 64)}
# flex-interleaved is near-dense (summaries spread over every block): small sizes only
INTERLEAVED_MAX_TOKENS = {"cuda": 50_000, "cpu": 1_500}


@dataclass
class Config:
    device: str = "cpu"
    sizes: tuple[int, ...] = ()
    heads: int = 8
    head_dim: int = 64
    dtype: str = ""
    rules: str = "paper"
    pack_size: int = 3
    batch: int = 1
    quick: bool = False
    impls: tuple[str, ...] = IMPLS
    max_mask_gb: float | None = None  # authors' mask limit; default from free memory
    seed: int = 0
    fresh_compile_cache: bool = True
    prewarm: bool | None = None  # compile the flex kernels first, in parallel processes; default: on CUDA

    def __post_init__(self):
        self.sizes = tuple(self.sizes) or (QUICK_SIZES if self.quick else DEFAULT_SIZES)[self.device]
        self.dtype = self.dtype or ("bf16" if self.device == "cuda" else "fp32")
        self.prewarm = self.device == "cuda" if self.prewarm is None else self.prewarm
        unknown = set(self.impls) - set(IMPLS)
        if unknown:
            raise ValueError(f"unknown impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
        if self.rules not in RULES_BY_NAME:
            raise ValueError(f"unknown rules {self.rules!r}; choose from {sorted(RULES_BY_NAME)}")


@dataclass
class Impl:
    """One contender: how to set it up for a new slide and how to call it."""

    forward: Callable  # forward(state, q, k, v) -> out in its own token order
    setup: Callable | None = None  # setup() -> state, once per new slide
    backward: bool = True
    fwdbwd: Callable | None = None  # custom forward + backward(state); default: forward then out.backward
    permute: torch.Tensor | None = None  # its token order, as indices into topopack's
    compare: bool = True  # check its output against topopack's
    skip: str = ""  # reason it does not run


class Case:
    """One grid size: the layout, the shared random inputs, the reference output."""

    def __init__(self, cfg: Config, side: int, device: torch.device):
        self.cfg, self.side, self.device = cfg, side, device
        self.rules = RULES_BY_NAME[cfg.rules]
        self.dtype = DTYPES[cfg.dtype]
        self.layout = self.new_layout()
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + side)
        shape = (cfg.batch, cfg.heads, self.layout.num_tokens, cfg.head_dim)
        self.qkv = tuple(torch.randn(shape, generator=gen).to(device, self.dtype) for _ in range(3))
        self.dout = torch.randn(shape, generator=gen).to(device, self.dtype)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.reference: torch.Tensor | None = None  # topopack-portable's forward output

    @property
    def n_tokens(self) -> int:
        return self.layout.num_tokens

    def new_layout(self) -> TopoLayout:
        """What a new slide costs topopack: its layout."""
        return TopoLayout.from_grid(self.side, self.side, self.cfg.pack_size, device=self.device)


@dataclass
class Calls:
    """A set-up contender's calls on a case's inputs: forward (no grad) and forward + backward (None if none)."""

    state: object
    inputs: tuple  # q, k, v in the contender's token order
    forward: Callable
    fwdbwd: Callable | None
    grads: tuple  # tensors whose .grad fwdbwd fills


def calls(impl: Impl, case: Case, state) -> Calls:
    q, k, v, dout = case.qkv + (case.dout,)
    if impl.permute is not None:
        q, k, v, dout = (t[:, :, impl.permute].contiguous() for t in (q, k, v, dout))
    grads = ()
    if impl.fwdbwd is not None:
        fwdbwd = lambda: impl.fwdbwd(state)
    elif impl.backward:
        grads = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
        fwdbwd = lambda: impl.forward(state, *grads).backward(dout)
    else:
        fwdbwd = None

    def forward():
        with torch.no_grad():
            return impl.forward(state, q, k, v)

    return Calls(state, (q, k, v), forward, fwdbwd, grads)


def topopack_impl(case: Case, backend: str) -> Impl:
    from topopack.backends import get_backend

    if backend == "triton" and case.device.type != "cuda":
        return Impl(forward=None, skip="the Triton kernels run on CUDA")
    try:
        fn = get_backend(backend, case.device)
    except ImportError as e:
        return Impl(forward=None, skip=f"unavailable: {e}")
    rules, scale = case.rules, case.scale
    return Impl(forward=lambda layout, q, k, v: fn(q, k, v, layout, rules, scale), setup=case.new_layout)


def dense_impl(case: Case) -> Impl:
    scale = case.scale

    def forward(_, q, k, v):
        if q.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return Impl(forward=forward, compare=False)


def authors_mask(layout: TopoLayout, rules, dtype) -> torch.Tensor:
    """The authors' dense L x L additive mask (0 allowed, -inf masked), built in row chunks.

    Rows are padded to a multiple of 16 elements so that the memory-efficient SDPA
    kernel takes the mask without copying it.
    """
    n = layout.num_tokens
    mask = torch.empty(n, -(-n // 16) * 16, dtype=dtype, device=layout.device)[:, :n]
    kind, pack, slide = layout.token_kind.long(), layout.token_pack, layout.token_slide
    step = max(1, (1 << 24) // n)
    for r in range(0, n, step):
        ok = allowed(rules, kind[r:r + step, None], pack[r:r + step, None], slide[r:r + step, None],
                     kind[None], pack[None], slide[None])
        mask[r:r + step].zero_().masked_fill_(~ok, float("-inf"))
    return mask


def authors_mask_bytes(n_tokens: int, dtype: torch.dtype) -> int:
    return n_tokens * (-(-n_tokens // 16) * 16) * torch.finfo(dtype).bits // 8


def authors_impl(case: Case, free_bytes: int) -> Impl:
    need = authors_mask_bytes(case.n_tokens, case.dtype)
    limit = free_bytes * 0.7 if case.cfg.max_mask_gb is None else case.cfg.max_mask_gb * 2 ** 30
    if need > limit:
        return Impl(forward=None, skip=f"needs {need / 2 ** 30:.1f} GiB for the L x L mask "
                                        f"(limit {limit / 2 ** 30:.1f} GiB)")
    scale, rules, dtype = case.scale, case.rules, case.dtype
    return Impl(forward=lambda mask, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
                setup=lambda: authors_mask(case.layout, rules, dtype))


def flex_impl(case: Case, variant: str) -> Impl:
    from topopack.kernels import flex

    layout, rules, scale = case.layout, case.rules, case.scale
    permute = None
    if variant == "flex":
        make = lambda: flex.layout_mask_mod(layout, rules)
    elif variant == "flex-arith":
        h, w = flex.grid_shape(layout)
        make = lambda: flex.grid_mask_mod(h, w, layout.pack_size, rules)
    else:
        if case.n_tokens > INTERLEAVED_MAX_TOKENS[case.device.type]:
            return Impl(forward=None, skip=f"small sizes only (L > {INTERLEAVED_MAX_TOKENS[case.device.type]})")
        permute = interleaved_order(layout)
        kind, pack, slide = (t[permute] for t in (layout.token_kind, layout.token_pack, layout.token_slide))
        make = lambda: flex.index_mask_mod(kind, pack, slide, rules)
    fn = flex.compiled_flex(dynamic=False)

    def setup():
        return flex.build_block_mask(make(), case.n_tokens, case.device, compile=case.device.type == "cuda")

    return Impl(forward=lambda bm, q, k, v: fn(q, k, v, block_mask=bm, scale=scale), setup=setup,
                backward=case.device.type != "cpu", permute=permute)


def interleaved_order(layout: TopoLayout) -> torch.Tensor:
    """The authors' token order [G, P1..P9, S1, P10..P18, S2, ...] as indices into topopack's order."""
    if layout.num_slides != 1:
        raise ValueError("interleaved_order: one slide only")
    kind, pack = layout.token_kind.long(), layout.token_pack
    t = torch.arange(layout.num_tokens, device=layout.device)
    # a pack's patches in token order, then its summary; the global token first
    key = torch.where(kind == PATCH, pack * (layout.num_tokens + 1) + t,
                      torch.where(kind == SUMMARY, pack * (layout.num_tokens + 1) + layout.num_tokens, -1))
    return torch.argsort(key)


def floor_impl(case: Case) -> Impl:
    """Dense SDPA over the global + summary tokens, plus copies the size of q, k, v and o."""
    n_gs = 1 + case.layout.num_packs
    q, k, v = (t[:, :, :n_gs].clone() for t in case.qkv)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dout = case.dout[:, :, :n_gs].clone()
    src = torch.empty(4 * case.qkv[0].numel(), dtype=case.dtype, device=case.device).normal_()
    dst = torch.empty_like(src)
    attend = dense_impl(case).forward

    def forward(*_):
        out = attend(None, q, k, v)
        dst.copy_(src)
        return out

    def fwdbwd(*_):
        attend(None, qg, kg, vg).backward(dout)
        for _ in range(3):
            dst.copy_(src)

    return Impl(forward=forward, fwdbwd=fwdbwd, compare=False)  # forward returns the global + summary rows only


def build_impl(name: str, case: Case, free_bytes: Callable[[], int]) -> Impl:
    """The contender ``name`` on ``case``; free_bytes() is the memory the authors' L x L mask may take 70% of."""
    if name.startswith("topopack-"):
        return topopack_impl(case, name.split("-", 1)[1])
    if name.startswith("flex"):
        return flex_impl(case, name)
    return {"dense": lambda: dense_impl(case), "authors": lambda: authors_impl(case, free_bytes()),
            "floor": lambda: floor_impl(case)}[name]()
