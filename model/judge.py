"""WSI-Precision and WSI-Relevance with a local LLM as the judge (prompts in judge_prompts.py).

    judge = Judge("/models/qwen2.5-7b-instruct", device="cuda")
    judge.precision(prediction, reference)   # JudgeResult(score, claims, scores, malformed)
    per_record = judge.score_records(records, predictions)   # -> scoring.score_records(..., judge_scores=)

The arithmetic (ClaimJudge) only needs a function prompt -> text, so any generator, or a deterministic stub in
tests, can be the judge; Judge adds a local Hugging Face causal LM (never downloaded). Judge output is parsed
leniently: a claim without a valid score (0, 0.3, 0.7, 1) scores 0 and counts in ``malformed``; so does a
non-empty text from which the judge extracts no claims (score 0).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from topopack.model.judge_prompts import CLAIM_SCORES, extract_prompt, precision_prompt, relevance_prompt
from topopack.model.scoring import words

KINDS = ("precision", "relevance")


@dataclass
class JudgeResult:
    score: float          # mean of ``scores``; 0 without claims
    claims: list[str]
    scores: list[float]   # one per claim; 0 where the judge gave no valid score
    malformed: int        # claims without a valid score, or 1 when no claim could be extracted


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*(.+?)\s*$")
_SCORE = re.compile(r"^\s*[-*]?\s*(?:claim\s*)?(?:(\d+)\s*[.):-]?\s*)?score\s*[:=]\s*([0-9]*\.?[0-9]+)", re.I)


def parse_claims(text: str, max_claims: int = 32) -> list[str]:
    """The "- claim" (or "* claim", "1. claim") lines of the judge's output, at most ``max_claims``."""
    claims = []
    for line in str(text or "").splitlines():
        m = _BULLET.match(line)
        if m and words(m.group(1)) and not _SCORE.match(line):
            claims.append(m.group(1))
    return claims[:max_claims]


def parse_scores(text: str, n: int) -> tuple[list[float], int]:
    """(a score per claim, how many claims lacked a valid one) from lines "<k>. score: <v>" (or "score: <v>",
    taken in order); v must be one of 0, 0.3, 0.7, 1; other lines are ignored."""
    given: dict[int, float | None] = {}
    unnumbered = []
    for line in str(text or "").splitlines():
        m = _SCORE.match(line)
        if not m:
            continue
        v = float(m.group(2))
        v = v if any(abs(v - s) < 1e-9 for s in CLAIM_SCORES) else None
        if m.group(1) is None:
            unnumbered.append(v)
        elif 1 <= int(m.group(1)) <= n:
            given.setdefault(int(m.group(1)) - 1, v)
    rest = iter(unnumbered)
    for k in range(n):
        if k not in given:
            given[k] = next(rest, None)
    scores = [given[k] if given[k] is not None else 0.0 for k in range(n)]
    return scores, sum(given[k] is None for k in range(n))


def answer_text(record: Mapping) -> str:
    a = record["answer"]
    return a if isinstance(a, str) else ", ".join(a)


class ClaimJudge:
    """WSI-Precision / WSI-Relevance from a text generator ``generate(prompt) -> str`` (see the module doc)."""

    def __init__(self, generate: Callable[[str], str] | None = None, *, batch_size: int = 8, max_claims: int = 32):
        if generate is not None:
            self.generate = generate
        self.batch_size, self.max_claims = batch_size, max_claims

    def generate(self, prompt: str) -> str:
        raise NotImplementedError("give ClaimJudge a generate(prompt) -> str function, or use Judge(model_path)")

    def generate_many(self, prompts: Sequence[str]) -> list[str]:
        return [self.generate(p) for p in prompts]

    def precision(self, prediction: str, reference: str) -> JudgeResult:
        """Claims of the prediction, each scored against the reference."""
        return self.judge_pairs([(prediction, reference)], "precision")[0]

    def relevance(self, prediction: str, reference: str) -> JudgeResult:
        """Claims of the reference, each scored against the prediction."""
        return self.judge_pairs([(prediction, reference)], "relevance")[0]

    def judge_pairs(self, pairs: Sequence[tuple[str, str]], kind: str) -> list[JudgeResult]:
        """``kind`` ("precision" or "relevance") for each (prediction, reference), two generate_many calls."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        sources = [str(p if kind == "precision" else r) for p, r in pairs]
        asked = [i for i, s in enumerate(sources) if words(s)]  # an empty text has no claims: nothing to ask
        claims: list[list[str]] = [[] for _ in pairs]
        for i, out in zip(asked, self.generate_many([extract_prompt(sources[i]) for i in asked])):
            claims[i] = parse_claims(out, self.max_claims)
        todo = [i for i in asked if claims[i]]
        prompts = [precision_prompt(claims[i], str(pairs[i][1])) if kind == "precision" else
                   relevance_prompt(claims[i], str(pairs[i][0])) for i in todo]
        outs = dict(zip(todo, self.generate_many(prompts)))
        results = []
        for i in range(len(pairs)):
            if i not in outs:
                results.append(JudgeResult(0.0, [], [], int(i in asked)))
                continue
            scores, bad = parse_scores(outs[i], len(claims[i]))
            results.append(JudgeResult(sum(scores) / len(scores), claims[i], scores, bad))
        return results

    def score_records(self, records: Sequence[Mapping], predictions: Sequence[str], *, desc: str = "judge",
                      bar: bool | None = None) -> list[dict | None]:
        """Per record: None unless open, else {"wsi_precision", "wsi_relevance", "malformed"} (both metrics'
        malformed counts added), for scoring.score_records(..., judge_scores=)."""
        from topopack.model.progress import progress

        if len(records) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
        todo = [i for i, r in enumerate(records) if r["type"] == "open"]
        chunks = [todo[k:k + self.batch_size] for k in range(0, len(todo), self.batch_size)]
        out: list[dict | None] = [None] * len(records)
        for chunk in progress(chunks, desc=desc, bar=bar):
            pairs = [(predictions[i], answer_text(records[i])) for i in chunk]
            prec, rel = self.judge_pairs(pairs, "precision"), self.judge_pairs(pairs, "relevance")
            for i, p, r in zip(chunk, prec, rel):
                out[i] = {"wsi_precision": p.score, "wsi_relevance": r.score, "malformed": p.malformed + r.malformed}
        return out


class Judge(ClaimJudge):
    """A local Hugging Face causal LM as the judge: greedy decoding, the tokenizer's chat template when it has
    one, prompts batched ``batch_size`` at a time (left padding)."""

    def __init__(self, model_path, device: str = "cpu", max_new_tokens: int = 256, *, batch_size: int = 8,
                 max_claims: int = 32, dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(model_path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"judge model {model_path}: not a local checkpoint directory with config.json "
                                    f"(nothing is downloaded; save the model with save_pretrained first)")
        super().__init__(batch_size=batch_size, max_claims=max_claims)
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            fill = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fill is None:
                raise ValueError(f"judge model {model_path}: the tokenizer has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fill
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype).to(self.device)
        self.model.eval()

    def format_prompt(self, prompt: str) -> str:
        """The prompt as the model reads it: a user turn of its chat template, or the plain text."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def generate(self, prompt: str) -> str:
        return self.generate_many([prompt])[0]

    def generate_many(self, prompts: Sequence[str]) -> list[str]:
        import torch

        templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template writes its own specials
        out = []
        for k in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer([self.format_prompt(p) for p in prompts[k:k + self.batch_size]], return_tensors="pt",
                                 padding=True, add_special_tokens=not templated).to(self.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out
