"""Hepato-LLaVA: region summary tokens -> Q-Former -> visual tokens at ``<image>`` in an LLM prompt.

Prompt format (any tokenizer; ``<image>`` never goes through the tokenizer, it is replaced by the Q-Former's
``num_queries`` embeddings):

    [bos] "USER: " <text before <image>> [visual tokens] <text after <image>> " ASSISTANT:" | " " answer [eos]

Labels are -100 on the visual and prompt tokens; only the answer (and its eos) is scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGE = "<image>"
IGNORE = -100
MAX_NEW_TOKENS = 32  # default answer length cap of eval and ask


@dataclass
class Sample:
    """One conversation turn, tokenized. ``answer`` is None at inference."""
    before: torch.Tensor          # [Tb] int64: bos + "USER: " + text before <image>
    after: torch.Tensor           # [Ta] text after <image> + " ASSISTANT:"
    answer: torch.Tensor | None   # [Tn] answer + eos
    memory: torch.Tensor          # [M, enc_dim] summary tokens of the region's packs
    positions: torch.Tensor       # [M, 2] pack centres in [0, 1]


def split_prompt(text: str) -> tuple[str, str]:
    """Split a human turn at its single ``<image>`` (prepended when absent)."""
    n = text.count(IMAGE)
    if n == 0:
        text = IMAGE + "\n" + text
    elif n > 1:
        raise ValueError(f"a prompt may hold one {IMAGE} placeholder, got {n}: {text[:80]!r}")
    before, after = text.split(IMAGE)
    return before, after


def tokenize_turn(tokenizer, question: str, answer: str | None = None):
    """(before, after, answer) id tensors of one turn in the prompt format above."""
    before, after = split_prompt(question)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    b = bos + enc("USER: " + before.strip())
    a = enc(after.strip() + " ASSISTANT:")
    ans = None if answer is None else torch.tensor(enc(" " + answer.strip()) + [tokenizer.eos_token_id])
    return torch.tensor(b, dtype=torch.long), torch.tensor(a, dtype=torch.long), ans


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
            ans = s.answer if s.answer is not None else s.before.new_zeros(0)
            text = [t.to(self.device) for t in (s.before, s.after, ans)]
            e = [emb(text[0]), vis[i].to(emb.weight.dtype), emb(text[1]), emb(text[2])]
            rows.append(torch.cat(e, 0))
            ignore = s.before.numel() + vis.shape[1] + s.after.numel()
            labels.append(torch.cat([torch.full((ignore,), IGNORE, dtype=torch.long), ans.cpu()]))
        t = max(r.shape[0] for r in rows)
        b, d = len(rows), rows[0].shape[1]
        embeds = rows[0].new_zeros(b, t, d)
        mask = torch.zeros(b, t, dtype=torch.long, device=self.device)
        lab = torch.full((b, t), IGNORE, dtype=torch.long, device=self.device)
        for i, (r, l) in enumerate(zip(rows, labels)):
            sl = slice(t - r.shape[0], t) if left_pad else slice(0, r.shape[0])
            embeds[i, sl], mask[i, sl], lab[i, sl] = r, 1, l.to(self.device)
        return embeds, mask, lab

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp_min(0)

    def forward(self, samples: list[Sample]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over the answer tokens, plus answer-token accuracy."""
        embeds, mask, labels = self.assemble(samples)
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
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos, pad_token_id=pad, use_cache=use_cache, **decoding)
        return [row[:row.index(eos)] if eos in row else row for row in out.tolist()]  # only new tokens

    def answer(self, samples: list[Sample], **kw) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.generate(samples, **kw)]
