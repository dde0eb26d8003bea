"""`topopack eval`: score a fine-tuned model on held-out VQA, broken down by scale (WSI, ROI, Patch).

- single choice: accuracy. The generated text is mapped to an option: exact match after normalisation, else the
  option letter ("B"), else the option with the best token F1.
- multi choice: 1 when the predicted set equals the answer set, 0.5 for a non-empty strict subset, 0 otherwise.
  The prediction is split at commas, semicolons and " and "; a part that is no option makes it wrong.
- open: exact match after normalisation and token F1 (SQuAD-style).
Writes OUT/metrics.json, OUT/eval.md (the table) and OUT/predictions.jsonl.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from topopack.model.config import positive_int
from topopack.model.vlm import MAX_NEW_TOKENS

SCALES = ("WSI", "ROI", "Patch")


# ---- metric arithmetic ----------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation and spacing do not matter)."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


def exact_match(pred: str, gold: str) -> float:
    return float(words(pred) == words(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = words(pred), words(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def match_option(pred: str, options: list[str]) -> str | None:
    """The option a generated answer names (see the module docstring), or None."""
    w = words(pred)
    for o in options:
        if words(o) == w:
            return o
    letters = [chr(ord("a") + i) for i in range(len(options))]
    if len(w) == 1 and w[0] in letters:
        return options[letters.index(w[0])]
    scores = [token_f1(pred, o) for o in options]
    best = max(scores, default=0.0)
    return options[scores.index(best)] if best > 0 and scores.count(best) == 1 else None


def parse_multi(pred: str, options: list[str]) -> set[str] | None:
    """The set of options a multi-choice answer names; None if any part is not an option."""
    parts = [p for p in re.split(r",|;|\band\b", str(pred).lower()) if words(p)]
    chosen = set()
    for part in parts:
        hit = [o for o in options if words(o) == words(part)]
        if not hit:
            return None
        chosen.add(hit[0])
    return chosen


def score_single(pred: str, answer: str, options: list[str]) -> float:
    return float(match_option(pred, options) == answer)


def score_multi(pred: str, answer: list[str], options: list[str]) -> float:
    chosen, gold = parse_multi(pred, options), set(answer)
    if not chosen:
        return 0.0
    if chosen == gold:
        return 1.0
    return 0.5 if chosen < gold else 0.0


def score_records(records: list[dict], predictions: list[str]) -> dict:
    """{"scales": {scale: metrics}, "overall": metrics}; a metric appears where its questions exist."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r, pred in zip(records, predictions, strict=True):
        for scale in (r["scale"], "overall", "family:" + r.get("family", "?")):
            g = groups.setdefault(scale, {})
            if r["type"] == "single_choice":
                g.setdefault("single_choice", []).append(score_single(pred, r["answer"], r["options"]))
                g.setdefault("chance_single_choice", []).append(1.0 / len(r["options"]))
            elif r["type"] == "multi_choice":
                g.setdefault("multi_choice", []).append(score_multi(pred, r["answer"], r["options"]))
            elif r["type"] == "open":
                g.setdefault("open_em", []).append(exact_match(pred, r["answer"]))
                g.setdefault("open_f1", []).append(token_f1(pred, r["answer"]))
    out = {}
    for scale, g in groups.items():
        m = {k: sum(v) / len(v) for k, v in g.items()}
        m.update({f"n_{k}": len(g[k]) for k in ("single_choice", "multi_choice", "open_f1") if k in g})
        out[scale] = m
    overall = out.pop("overall", {})
    families = {k.split(":", 1)[1]: out.pop(k) for k in sorted(out) if k.startswith("family:")}
    return {"scales": {s: out[s] for s in SCALES if s in out}, "overall": overall, "families": families}


def markdown_table(metrics: dict, extra: dict[str, dict] | None = None) -> str:
    """Scales as rows; ``extra`` adds columns {name: {scale: value}} (e.g. the blind control)."""
    cols = ["single_choice", "multi_choice", "open_em", "open_f1", "chance_single_choice"]
    extra = extra or {}
    head = ["scale", *cols, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for scale, m in metrics["scales"].items():
        row = [scale, *(fmt(m.get(c)) for c in cols), *(fmt(e.get(scale)) for e in extra.values())]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---- running a model ------------------------------------------------------------------------
@torch.no_grad()
def predict(vlm, samples, batch_size: int = 32, **gen_kw) -> list[str]:
    from tqdm.auto import tqdm

    vlm.eval()
    preds = []
    for i in tqdm(range(0, len(samples), batch_size), desc="eval", leave=False):
        preds += vlm.answer(samples[i:i + batch_size], **gen_kw)
    return preds


def evaluate(model_dir, data, out=None, *, device="cpu", batch_size: int = 32, limit: int | None = None,
             cache=None, max_new_tokens: int = MAX_NEW_TOKENS, patch_size: int | None = None) -> dict:
    """Score ``model_dir`` on the VQA records in ``data``; writes metrics.json, eval.md, predictions.jsonl to out."""
    from topopack.model.model_dir import load_model
    from topopack.model.records import load_records
    from topopack.model.summaries import SummaryCache, make_samples
    from topopack.model.trainer import write_metrics

    vlm, encoder, meta = load_model(model_dir, device=device)
    records = load_records(data, "eval")[:limit]
    samples = make_samples(records, vlm.tokenizer, cache or SummaryCache(encoder, device, patch_size),
                           meta["prompt"], with_answer=False)
    preds = predict(vlm, samples, batch_size, max_new_tokens=max_new_tokens)
    metrics = score_records(records, preds)
    metrics["model"], metrics["blind"] = str(model_dir), bool(meta.get("blind"))
    out = Path(out or model_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, {"eval": metrics})
    (out / "eval.md").write_text(markdown_table(metrics))
    with open(out / "predictions.jsonl", "w") as f:
        for r, p in zip(records, preds):
            f.write(json.dumps({"id": r["id"], "scale": r["scale"], "type": r["type"], "answer": r["answer"],
                                "prediction": p}) + "\n")
    return metrics


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model directory written by `topopack finetune`")
    p.add_argument("--data", required=True, help="held-out VQA JSON file, or a directory with vqa_test.json")
    p.add_argument("--out", default=None, help="where to write metrics.json and eval.md (default: the model dir)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N questions")
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS, help="answer length cap")
    p.add_argument("--patch-size", type=positive_int, default=None,
                   help="level-0 patch size of the slide files, for files that lack it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args) -> int:
    metrics = evaluate(args.model, args.data, args.out, device=args.device, batch_size=args.batch_size,
                       limit=args.limit, max_new_tokens=args.max_new_tokens, patch_size=args.patch_size)
    print(markdown_table(metrics))
    return 0
