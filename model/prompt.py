"""The prompt a model is trained with and asked in: a conversation of (question, answer) turns -> token ids.

Styles (the model directory records which one its model was trained with):
- ``chat_template``: the tokenizer's own chat template (a real instruction-tuned ``--llm`` that has one);
- ``llava_v1``: the authors' conversation, as in LLaVA's ``conv_vicuna_v1``:
  ``SYSTEM USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`` (a ``--llm`` without a template);
- ``plain``: llava_v1 without the system sentence (the embedded tiny LLM, trained from scratch: the sentence carries
  nothing for it and would cost a third of every sequence).

``<image>`` (in the first question; prepended when absent) never goes through the tokenizer: it splits the ids into
``before`` and ``after`` and is replaced by the Q-Former's visual tokens. Every answer (and its end marker) is
supervised; everything else is labelled IGNORE.
"""
from __future__ import annotations

import torch

IMAGE = "<image>"
IGNORE = -100
STYLES = ("chat_template", "llava_v1", "plain")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def default_style(tokenizer, embedded: bool) -> str:
    if embedded:
        return "plain"
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "llava_v1"


def _with_image(turns):
    """The turns with exactly one <image>, in the first question (prepended when absent)."""
    if not turns:
        raise ValueError("a conversation needs at least one question")
    total = sum(q.count(IMAGE) for q, _ in turns)
    if total > 1 or any(IMAGE in q for q, _ in turns[1:]):
        raise ValueError(f"a conversation may hold one {IMAGE} placeholder, in its first question; got {total}")
    first = turns[0][0] if IMAGE in turns[0][0] else IMAGE + "\n" + turns[0][0]
    return [(first, turns[0][1]), *turns[1:]]


def _pieces_llava(tokenizer, turns, system: bool) -> list[tuple[str | int, bool]]:
    pieces: list[tuple[str | int, bool]] = []
    for i, (q, a) in enumerate(turns):
        head = (LLAVA_V1_SYSTEM + " " if system and i == 0 else "") + "USER: "
        before, sep, after = q.partition(IMAGE)
        if sep:
            pieces += [(head + before.strip(), False), (IMAGE, False), (after.strip() + " ASSISTANT:", False)]
        else:
            pieces.append((head + q.strip() + " ASSISTANT:", False))
        if a is not None:
            pieces += [(" " + a.strip(), True), (tokenizer.eos_token_id, True)]
    return pieces


def _pieces_template(tokenizer, turns) -> list[tuple[str | int, bool]]:
    """Differences of the template rendered on growing prefixes of the conversation: each added user turn (with the
    generation prompt) is unsupervised, each added assistant turn (with its end marker) supervised."""
    msgs, prev, pieces = [], "", []
    for q, a in turns:
        for role, content, supervised in (("user", q, False), ("assistant", a, True)):
            if content is None:
                break
            msgs.append({"role": role, "content": content})
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=role == "user")
            if not text.startswith(prev):
                raise ValueError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                 "continuation; train with the llava_v1 style instead")
            piece = text[len(prev):]
            prev = text
            if role == "user" and IMAGE in piece:
                before, _, after = piece.partition(IMAGE)
                pieces += [(before, False), (IMAGE, False), (after, False)]
            else:
                pieces.append((piece, supervised))
    return pieces


def encode_conversation(tokenizer, turns, style: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(before, after, labels): int64 ids before <image>, ids after it, and the labels of ``after`` (the id where
    supervised, else IGNORE). ``turns``: [(question, answer), ...]; the last answer may be None (to be generated)."""
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    turns = _with_image([(q, a) for q, a in turns])
    if any(a is None for _, a in turns[:-1]):
        raise ValueError("only the last turn may lack an answer")
    if style == "chat_template":
        pieces = _pieces_template(tokenizer, turns)
        bos = []
    else:
        pieces = _pieces_llava(tokenizer, turns, system=style == "llava_v1")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    before, after, labels = list(bos), [], []
    seen_image = False
    for piece, supervised in pieces:
        if piece == IMAGE:
            seen_image = True
            continue
        ids = [piece] if isinstance(piece, int) else tokenizer(piece, add_special_tokens=False)["input_ids"]
        if not seen_image:
            before += ids
        else:
            after += ids
            labels += ids if supervised else [IGNORE] * len(ids)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(before), as_long(after), as_long(labels)
