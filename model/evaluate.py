"""`topopack eval`: score a fine-tuned model on held-out questions by level (WSI, ROI, Patch) x format, like the
paper's main table: single choice (accuracy), multi choice (1 exact set, 0.5 strict subset), open-ended (ROUGE-L,
METEOR, and with ``--judge`` the LLM-judged WSI-Precision / WSI-Relevance on whole-slide open questions), plus exact
match and token F1. The arithmetic lives in model/scoring.py, the judge in model/judge.py.

    topopack eval --model DIR --data FILE_OR_DIR [--judge LOCAL_LLM]   generate, then score
    topopack eval --predictions predictions.jsonl [--judge LOCAL_LLM]  score a batch `topopack ask` output

Writes OUT/metrics.json, OUT/eval.md (the table) and OUT/predictions.jsonl (model/predictions.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from topopack.model.config import positive_int
from topopack.model.scoring import markdown_table, score_records
from topopack.model.vlm import MAX_NEW_TOKENS

SCALES = ("WSI", "ROI", "Patch")


# ---- running a model ------------------------------------------------------------------------
@torch.no_grad()
def predict(vlm, samples, batch_size: int = 32, **gen_kw) -> list[str]:
    from topopack.model.progress import progress

    vlm.eval()
    preds = []
    for i in progress(range(0, len(samples), batch_size), desc="generate"):
        preds += vlm.answer(samples[i:i + batch_size], **gen_kw)
    return preds


def judge_scores(judge_path, records, preds, device="cpu") -> list[dict | None]:
    """WSI-P / WSI-R of the whole-slide open answers (None for the other records)."""
    from topopack.model.judge import Judge

    judge = Judge(judge_path, device=device)
    which = [i for i, r in enumerate(records) if r["type"] == "open" and r["scale"] == "WSI"]
    scores = judge.score_records([records[i] for i in which], [preds[i] for i in which])
    out: list[dict | None] = [None] * len(records)
    for i, sc in zip(which, scores):
        out[i] = sc
    return out


def write_report(out, records, preds, extra_metrics: dict, *, judge=None, device="cpu") -> dict:
    """Score, then write OUT/metrics.json (key "eval"), OUT/eval.md and OUT/predictions.jsonl (rank 0 only)."""
    from topopack.model.parallel import is_main_process
    from topopack.model.predictions import write_predictions
    from topopack.model.trainer import write_metrics

    metrics = score_records(records, preds, judge_scores(judge, records, preds, device) if judge else None)
    metrics.update(extra_metrics)
    if is_main_process():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(out, {"eval": metrics})
        (out / "eval.md").write_text(markdown_table(metrics))
        if extra_metrics.get("predictions") is None:
            write_predictions(out / "predictions.jsonl", records, preds)
    return metrics


def answer_records(model_dir, records, *, device="cpu", batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS,
                   patch_size: int | None = None, cache=None) -> tuple[list[str], dict]:
    """(greedy answers to the last question of each record, the model's meta), from a model directory; slides are
    encoded into ``cache`` (default: the user's on-disk summary cache)."""
    from topopack.model.model_dir import load_model
    from topopack.model.summaries import SummaryCache, make_samples, user_cache_dir

    vlm, encoder, meta = load_model(model_dir, device=device)
    cache = cache or SummaryCache(encoder, device, patch_size, user_cache_dir())
    samples = make_samples(records, vlm.tokenizer, cache, meta["prompt"], with_answer=False)
    return predict(vlm, samples, batch_size, max_new_tokens=max_new_tokens), meta


def evaluate(model_dir, data, out=None, *, device="cpu", batch_size: int = 32, limit: int | None = None,
             cache=None, max_new_tokens: int = MAX_NEW_TOKENS, patch_size: int | None = None, image_root=None,
             judge=None) -> dict:
    """Score ``model_dir`` on the questions in ``data``; writes metrics.json, eval.md, predictions.jsonl to out."""
    from topopack.model.records import load_records

    records = load_records(data, "eval", image_root=image_root)[:limit]
    preds, meta = answer_records(model_dir, records, device=device, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, patch_size=patch_size, cache=cache)
    return write_report(out or model_dir, records, preds, {"model": str(model_dir), "blind": bool(meta.get("blind"))},
                        judge=judge, device=device)


def evaluate_predictions(path, out=None, *, judge=None, device="cpu") -> dict:
    """Score a predictions.jsonl (batch `topopack ask`, or an earlier eval) against its ground_truth."""
    from topopack.model.predictions import read_predictions

    records, preds = read_predictions(path)
    return write_report(out or Path(path).parent, records, preds, {"predictions": str(path)}, judge=judge,
                        device=device)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model directory written by `topopack finetune`")
    p.add_argument("--data", default=None, help="held-out questions: a JSON/JSONL file (either schema) or a "
                                                "directory with vqa_test.json")
    p.add_argument("--predictions", default=None, help="score this predictions.jsonl instead of running a model")
    p.add_argument("--judge", default=None, help="local HF causal LM that judges WSI-Precision / WSI-Relevance")
    p.add_argument("--out", default=None, help="where to write metrics.json and eval.md (default: the model dir, "
                                               "or the predictions file's dir)")
    p.add_argument("--image-root", default=None, help="directory the records' images are relative to "
                                                      "(default: the data file's directory)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N questions")
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS, help="answer length cap")
    p.add_argument("--patch-size", type=positive_int, default=None,
                   help="level-0 patch size of the slide files, for files that lack it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args) -> int:
    if args.predictions is not None:
        if args.model or args.data:
            raise ValueError("give either --predictions FILE or --model DIR --data FILE, not both")
        metrics = evaluate_predictions(args.predictions, args.out, judge=args.judge, device=args.device)
    elif args.model is None or args.data is None:
        raise ValueError("give --model DIR and --data FILE_OR_DIR (or --predictions FILE)")
    else:
        metrics = evaluate(args.model, args.data, args.out, device=args.device, batch_size=args.batch_size,
                           limit=args.limit, max_new_tokens=args.max_new_tokens, patch_size=args.patch_size,
                           image_root=args.image_root, judge=args.judge)
    print(markdown_table(metrics))
    return 0
