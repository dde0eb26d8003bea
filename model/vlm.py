"""Hepato-LLaVA: region summary tokens -> Q-Former -> visual tokens at ``<image>`` in an LLM prompt.

A Sample is a tokenized conversation (model/prompt.py): the ids before ``<image>``, the Q-Former's ``num_queries``
visual tokens, then the ids after it with their labels (answers supervised, the rest IGNORE).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from topopack.model.prompt import IGNORE

MAX_NEW_TOKENS = 512  # default answer length cap of eval and ask (generation stops at eos)


@dataclass
class Sample:
    """One conversation, tokenized (model/prompt.encode_conversation). At inference ``after`` ends with the
    prompt of the answer to generate."""
    before: torch.Tensor          # [Tb] int64 ids before <image>
    after: torch.Tensor           # [Ta] ids after <image>: questions and answers
    labels: torch.Tensor          # [Ta] the supervised ids of ``after``, IGNORE elsewhere
    memory: torch.Tensor          # [M, enc_dim] summary tokens of the region's packs
    positions: torch.Tensor       # [M, 2] pack centres in [0, 1]


def pad_memory(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged regions -> memory [B, M, C], pad_mask [B, M] (True = padding), positions [B, M, 2]."""
    m = max(s.memory.shape[0] for s in samples)
    c = samples[0].memory.shape[1]
    mem = samples[0].memory.new_zeros(len(samples), m, c)
    pos = samples[0].positions.new_zeros(len(samples), m, 2)
    pad = torch.ones(len(samples), m, dtype=torch.bool)
    for i, s in enumerate(samples):
        k = s.memory.shape[0]
        mem[i, :k], pos[i, :k], pad[i, :k] = s.memory, s.positions, False
    return mem, pad, pos


class HepatoLLaVA(nn.Module):
    """The composed model. ``llm`` is a HF causal LM (optionally peft-wrapped); ``blind`` zeroes the visual tokens."""

    def __init__(self, qformer: nn.Module, llm: nn.Module, tokenizer, *, blind: bool = False):
        super().__init__()
        self.qformer, self.llm, self.tokenizer, self.blind = qformer, llm, tokenizer, blind

    @property
    def device(self) -> torch.device:
        return self.qformer.queries.device

    def visual_tokens(self, samples: list[Sample]) -> torch.Tensor:
        """[B, Q, llm_dim] visual tokens (zeros for the blind control)."""
        q, d = self.qformer.cfg.num_queries, self.qformer.cfg.llm_dim
        if self.blind:
            return torch.zeros(len(samples), q, d, device=self.device)
        mem, pad, pos = (t.to(self.device) for t in pad_memory(samples))
        return self.qformer(mem, pad, pos)

    def assemble(self, samples: list[Sample], *, left_pad: bool = False):
        """Spliced (inputs_embeds [B, T, D], attention_mask [B, T], labels [B, T]) for a batch."""
        vis = self.visual_tokens(samples)
        emb = self.llm.get_input_embeddings()
        rows, labels = [], []
        for i, s in enumerate(samples):
            before, after = s.before.to(self.device), s.after.to(self.device)
            rows.append(torch.cat([emb(before), vis[i].to(emb.weight.dtype), emb(after)], 0))
            ignore = torch.full((before.numel() + vis.shape[1],), IGNORE, dtype=torch.long)
            labels.append(torch.cat([ignore, s.labels.cpu()]))
        t = max(r.shape[0] for r in rows)
        b, d = len(rows), rows[0].shape[1]
        embeds = rows[0].new_zeros(b, t, d)
        mask = torch.zeros(b, t, dtype=torch.long, device=self.device)
        lab = torch.full((b, t), IGNORE, dtype=torch.long, device=self.device)
        for i, (r, l) in enumerate(zip(rows, labels)):
            sl = slice(t - r.shape[0], t) if left_pad else slice(0, r.shape[0])
            embeds[i, sl], mask[i, sl], lab[i, sl] = r, 1, l.to(self.device)
        return embeds, mask, lab

    def llm_precision(self):
        """Autocast to the LLM's half dtype (bf16/fp16 base weights beside fp32 LoRA and trained heads), on any
        device; nothing for an fp32 LLM."""
        dtype = self.llm.get_input_embeddings().weight.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp_min(0)

    def forward(self, samples: list[Sample]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over the answer tokens, plus answer-token accuracy."""
        embeds, mask, labels = self.assemble(samples)
        with self.llm_precision():
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions(mask)).logits
        logits, target = logits[:, :-1].float(), labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
        with torch.no_grad():
            scored = target != IGNORE
            acc = (logits.argmax(-1)[scored] == target[scored]).float().mean()
        return loss, {"token_acc": float(acc)}

    @torch.no_grad()
    def generate(self, samples: list[Sample], *, max_new_tokens: int = MAX_NEW_TOKENS, sample: bool = False,
                 temperature: float = 1.0, use_cache: bool = True, seed: int | None = None) -> list[list[int]]:
        """Greedy (or sampled, seeded by ``seed``) answers through the LLM's own ``generate``: one id list per
        sample, stopped at eos (stripped). Batched with left padding; KV cache unless use_cache=False."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        embeds, mask, _ = self.assemble(samples, left_pad=True)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        decoding = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            with self.llm_precision():
                out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos, pad_token_id=pad, use_cache=use_cache, **decoding)
        return [row[:row.index(eos)] if eos in row else row for row in out.tolist()]  # only new tokens

    def answer(self, samples: list[Sample], **kw) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.generate(samples, **kw)]
