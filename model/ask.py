"""`topopack ask`: answer questions about slides.

    topopack ask SLIDE.h5 "question" [--region x0,y0,x1,y1]                 one question, the answer on stdout
    topopack ask --slides DIR_OR_FILE --questions FILE --out predictions.jsonl   a batch (model/predictions.py)

The questions file is in either schema (model/records.py), answers optional; with --slides DIR the images are
resolved against DIR, with --slides FILE every question is about that slide. Python: ``ask(slide, question,
region=None, model="demo-out/vqa")`` (a loaded ``Assistant`` is reused: the encoder runs once per slide).
"""
from __future__ import annotations

from pathlib import Path

import torch

from topopack.model.config import positive_float, positive_int
from topopack.model.evidence import add_evidence_arguments, write_evidence
from topopack.model.regions import check_box
from topopack.model.vlm import MAX_NEW_TOKENS

DEFAULT_MODEL = "demo-out/vqa"


class Assistant:
    """A loaded model: ``assistant(slide, question, region=None, sample=False, temperature=1.0) -> str``."""

    def __init__(self, model_dir=DEFAULT_MODEL, device="cpu", patch_size: int | None = None, cache_dir=None):
        """``cache_dir``: the on-disk summary cache (default: the user's, model/summaries.user_cache_dir)."""
        from topopack.model.model_dir import load_model
        from topopack.model.summaries import SummaryCache, user_cache_dir

        self.vlm, encoder, self.meta = load_model(model_dir, device=device)
        self.vlm.eval()
        self.cache = SummaryCache(encoder, device, patch_size, cache_dir=cache_dir or user_cache_dir())

    def __call__(self, slide, question: str, region=None, *, sample: bool = False, temperature: float = 1.0,
                 max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None) -> str:
        from topopack.model.prompt import encode_conversation
        from topopack.model.vlm import Sample

        box = None if region is None else list(check_box(region))
        before, after, labels = encode_conversation(self.vlm.tokenizer, [(question, None)], self.meta["prompt"])
        mem, pos = self.cache.region(slide, box)
        return self.vlm.answer([Sample(before, after, labels, mem, pos)], sample=sample, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed)[0]


_LOADED: dict = {}


def ask(slide, question: str, region=None, *, model=DEFAULT_MODEL, sample: bool = False, temperature: float = 1.0,
        device="cpu", patch_size: int | None = None, **kw) -> str:
    """Answer ``question`` about ``slide`` (an h5/pt feature file) in ``region`` (level-0 box) or the whole slide."""
    key = (str(model), str(device), patch_size)
    if key not in _LOADED:
        _LOADED[key] = Assistant(model, device, patch_size)
    return _LOADED[key](slide, question, region, sample=sample, temperature=temperature, **kw)


def parse_region(text: str | None):
    if text is None:
        return None
    return list(check_box(text.split(","), "--region"))


def add_arguments(p) -> None:
    p.add_argument("slide", nargs="?", help="slide feature file (.h5 / .pt), for one question")
    p.add_argument("question", nargs="?")
    p.add_argument("--region", default=None, help="x0,y0,x1,y1 in level-0 pixels (default: the whole slide)")
    g = p.add_argument_group("batch")
    g.add_argument("--slides", default=None, help="directory the questions' images are relative to, or one slide "
                                                  "file that every question is about")
    g.add_argument("--questions", default=None, help="JSON/JSONL questions, either schema, answers optional")
    g.add_argument("--out", default=None, help="predictions.jsonl to write (with --questions)")
    g.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory from `topopack finetune --stage vqa`")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for --sample")
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patch-size", type=positive_int, default=None,
                   help="level-0 patch size of the slide files, for files that lack it")
    add_evidence_arguments(p)


def ask_batch(questions, out, *, slides=None, model=DEFAULT_MODEL, device="cpu", batch_size: int = 16,
              max_new_tokens: int = MAX_NEW_TOKENS, patch_size: int | None = None) -> Path:
    """Answer every question in ``questions`` (greedy, batched) and write ``out`` (predictions.jsonl)."""
    from topopack.model.evaluate import answer_records
    from topopack.model.predictions import write_predictions
    from topopack.model.records import RecordError, raise_bad, read_records

    one = slides is not None and Path(slides).is_file()
    if slides is not None and not one and not Path(slides).is_dir():
        raise FileNotFoundError(f"--slides {slides}: no such file or directory")
    records, errors = read_records(questions, image_root=None if one else slides, need_answer=False,
                                   image=slides if one else None)
    raise_bad(errors, "question")
    if not records:
        raise RecordError(f"{questions}: no questions")
    preds, _ = answer_records(model, records, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              patch_size=patch_size)
    return write_predictions(out, records, preds)


def main(args) -> int:
    from topopack.model.llm import quiet_transformers

    quiet_transformers()
    if args.questions is not None:
        if args.slide or args.question or args.region:
            raise ValueError("give either SLIDE QUESTION [--region] or --questions FILE, not both")
        if args.evidence:
            raise ValueError("--evidence explains one answer: give SLIDE QUESTION, not --questions")
        if args.out is None:
            raise ValueError("--questions needs --out predictions.jsonl")
        path = ask_batch(args.questions, args.out, slides=args.slides, model=args.model, device=args.device,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, patch_size=args.patch_size)
        print(f"wrote {path}")
        return 0
    if args.slide is None or args.question is None:
        raise ValueError("give SLIDE and QUESTION, or --questions FILE --out predictions.jsonl")
    answer = ask(args.slide, args.question, parse_region(args.region), model=args.model, sample=args.sample,
                 temperature=args.temperature, device=args.device, seed=args.seed,
                 max_new_tokens=args.max_new_tokens, patch_size=args.patch_size)
    if args.evidence:
        assistant = _LOADED[(str(args.model), str(args.device), args.patch_size)]
        write_evidence(assistant, args.slide, args.question, parse_region(args.region), answer, args.evidence,
                       args.evidence_json, args.evidence_method, wsi=args.evidence_wsi)
    print(answer)
    return 0
