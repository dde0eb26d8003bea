"""VQA scoring as in Hepato-LLaVA's main table: by level (WSI, ROI, Patch) x format (single, multi, open).

- single choice: accuracy. A prediction names an option by its letter ("B", "B.", "(B)", "The answer is B"), its
  text (any case or punctuation), or both ("B. Solid"); naming two different options is wrong. Failing both, the
  one option with the best token F1 (a paraphrase such as "septa" for "fibrous septa").
- multi choice: 1 for the exact set, 0.5 for a non-empty strict subset, 0 otherwise. Option texts are found first,
  longest first, so texts holding commas or "and" stay whole; the rest is split at commas, semicolons, slashes,
  "&" and "and", and every part must name an option (a letter, a text, or "A. text"), else the answer is wrong.
- open: exact match and token F1 on lower-cased words, ROUGE-L F1 (rouge-score), METEOR (nltk, needs WordNet;
  None when its data is missing), and WSI-Precision / WSI-Relevance when judge scores are given (judge.py).

Choice answers may be letters ("B", "A, C", ["A", "C"]) or option texts; options come from the record's
``options`` or from "A. text" lines in its question.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping, Sequence

SCALES = ("WSI", "ROI", "Patch")
TYPES = ("single_choice", "multi_choice", "open")
METEOR_UNAVAILABLE = ("METEOR unavailable: nltk WordNet data not found; install it with "
                      "`python -m nltk.downloader wordnet` (needs the network) or put wordnet.zip under "
                      "<dir>/corpora/ for a <dir> in nltk.data.path (or NLTK_DATA)")


# ---- open-ended -----------------------------------------------------------------------------
def words(text) -> list[str]:
    """Lower-cased alphanumeric words (punctuation and spacing do not matter)."""
    return re.findall(r"[a-z0-9]+", str(text or "").lower())


def exact_match(pred: str, gold: str) -> float:
    return float(words(pred) == words(gold))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style F1 over words (a repeated word counts once per occurrence)."""
    p, g = words(pred), words(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(pred: str, gold: str) -> float:
    """ROUGE-L F1 from rouge-score (its tokenizer: lower case, alphanumeric runs, no stemming)."""
    return _rouge().score(str(gold or ""), str(pred or ""))["rougeL"].fmeasure


def wordnet_status():
    """(nltk's WordNet reader, None) when its data is installed, else (None, the reason); never downloads."""
    import nltk

    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):  # where nltk's corpus loader looks
        try:
            nltk.data.find(resource)
            break
        except LookupError:
            pass
    else:
        return None, METEOR_UNAVAILABLE
    from nltk.corpus import wordnet
    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError, ValueError) as e:
        return None, f"METEOR unavailable: nltk WordNet data could not be read ({type(e).__name__}: {e})"
    return wordnet, None


def meteor(pred: str, gold: str, wordnet=None) -> float | None:
    """METEOR (nltk, default parameters) on lower-cased words; None when WordNet is missing (see wordnet_status).
    ``wordnet``: a reader with ``synsets(word)``, default nltk's."""
    if wordnet is None:
        wordnet, _ = wordnet_status()
        if wordnet is None:
            return None
    from nltk.translate.meteor_score import single_meteor_score

    p, g = words(pred), words(gold)
    if not p or not g:
        return float(p == g)
    return float(single_meteor_score(g, p, wordnet=wordnet))


# ---- options --------------------------------------------------------------------------------
_OPTION_LINE = re.compile(r"^[ \t]*(?:\(([A-Za-z])\)|([A-Za-z])[.)])[ \t]+(\S.*?)[ \t]*$", re.M)


def parse_options(question_text: str) -> list[str]:
    """The options listed as "A. text", "A) text" or "(A) text" lines (A, B, C, ... in order); [] if none."""
    out: list[str] = []
    for m in _OPTION_LINE.finditer(str(question_text or "")):
        letter = (m.group(1) or m.group(2)).upper()
        if ord(letter) - 65 == len(out):
            out.append(m.group(3))
        elif out:
            break
    return out if len(out) >= 2 else []


def letter(i: int) -> str:
    return chr(65 + i)


_TOKEN = re.compile(r"[A-Za-z0-9]+|\n|[^\sA-Za-z0-9]")
_SEPARATORS = {",", ";", "/", "&", "+", "|", "\n", "and"}
_FILLER = {"the", "answer", "answers", "is", "are", "correct", "option", "options", "choice", "choices", "both",
           "letter", "letters", "final"}
_KEYWORDS = {"answer", "is", "option", "choice", "letter"}
_NOT_A_LETTER_AFTER = {"and", "or", "is", "are", "was"}  # "A and C", "A is correct": still the letter A


def _tokens(text: str, options: Sequence[str]) -> list:
    """Tokens of ``text`` (words and punctuation marks, as str) where every option text found, longest first and
    without overlaps, is replaced by an _Opt (its index); words match case-free, punctuation between them is free."""
    toks = _TOKEN.findall(str(text or ""))
    wpos = [i for i, t in enumerate(toks) if t[0].isalnum()]
    seq = [toks[i].lower() for i in wpos]
    taken = [False] * len(seq)
    spans = []  # (first token, last token, option)
    for idx in sorted(range(len(options)), key=lambda i: -len(words(options[i]))):
        ow = words(options[idx])
        if not ow:
            continue
        k = 0
        while k + len(ow) <= len(seq):
            if seq[k:k + len(ow)] == ow and not any(taken[k:k + len(ow)]):
                taken[k:k + len(ow)] = [True] * len(ow)
                spans.append((wpos[k], wpos[k + len(ow) - 1], idx))
                k += len(ow)
            else:
                k += 1
    out, i = [], 0
    for first, last, idx in sorted(spans):
        out += toks[i:first] + [_Opt(idx, toks[first][0].islower())]
        i = last + 1
    return out + toks[i:]


class _Opt(int):
    """An option text found in a prediction: its index, and whether its first word was written in lower case."""

    def __new__(cls, idx: int, lower: bool):
        self = super().__new__(cls, idx)
        self.lower = lower
        return self


def _is_word(t) -> bool:
    return isinstance(t, str) and t[0].isalnum()


def _article(toks: list, j: int) -> bool:
    """toks[j] is "A"/"a"/"I" used as an English word: followed by a lower-case word ("A solid tumor")."""
    nxt = toks[j + 1] if j + 1 < len(toks) else None
    lower_next = (isinstance(nxt, _Opt) and nxt.lower) or (_is_word(nxt) and nxt[0].islower())
    return toks[j] in ("A", "a", "I") and lower_next and nxt not in _NOT_A_LETTER_AFTER


def _named_letter(toks: list, j: int, n: int) -> int | None:
    """The option index the single-letter word toks[j] stands for, or None (out of range, or an English word)."""
    t = toks[j]
    if len(t) != 1 or not t.isalpha() or ord(t.upper()) - 65 >= n:
        return None
    prev = toks[j - 1] if j > 0 else None
    nxt = toks[j + 1] if j + 1 < len(toks) else None
    prev_word = next((x.lower() for x in reversed(toks[:j]) if _is_word(x)), None)
    marked = nxt in (".", ")", ":") or (prev == "(" and nxt == ")")
    alone = sum(_is_word(x) or isinstance(x, _Opt) for x in toks) == 1
    if _article(toks, j):
        return None
    if t.isupper():
        return ord(t) - 65
    ends = nxt is None or (isinstance(nxt, str) and not nxt[0].isalnum() and nxt != "(")  # "answer is b."
    if marked or alone or (prev_word in _KEYWORDS and ends):
        return ord(t.upper()) - 65
    return None


def choose_single(pred: str, options: Sequence[str], fuzzy: bool = True) -> int | None:
    """The index of the one option ``pred`` names (see the module docstring), or None; ``fuzzy`` allows the
    token-F1 fallback."""
    w = words(pred)
    for i, o in enumerate(options):
        if w and words(o) == w:
            return i
    toks = _tokens(pred, options)
    named = {int(t) for t in toks if isinstance(t, _Opt)}
    named |= {k for j, t in enumerate(toks) if _is_word(t) and (k := _named_letter(toks, j, len(options))) is not None}
    if len(named) == 1:
        return named.pop()
    if named or not fuzzy:
        return None
    scores = [token_f1(pred, o) for o in options]
    best = max(scores, default=0.0)
    return scores.index(best) if best > 0 and scores.count(best) == 1 else None


def choose_multi(pred: str, options: Sequence[str]) -> set[int] | None:
    """The set of option indices ``pred`` names (see the module docstring); None if a part names no option or
    a letter contradicts its text ("A. Solid" when Solid is B)."""
    parts, part = [], []
    for t in _tokens(pred, options):
        if isinstance(t, str) and t.lower() in _SEPARATORS:
            parts.append(part)
            part = []
        else:
            part.append(t)
    parts.append(part)
    chosen: set[int] = set()
    for part in parts:
        texts = {int(t) for t in part if isinstance(t, _Opt)}
        rest = [t for j, t in enumerate(part) if _is_word(t) and t.lower() not in _FILLER and not _article(part, j)]
        if len(rest) == 1 and len(rest[0]) == 1 and rest[0].isalpha() and ord(rest[0].upper()) - 65 < len(options):
            k = ord(rest[0].upper()) - 65
            if texts - {k}:
                return None
            texts = {k}
        elif rest:
            return None
        chosen |= texts
    return chosen or None


def resolve_single(answer, options: Sequence[str]) -> int:
    """The index of a single-choice gold answer (a letter or an option text)."""
    i = choose_single(str(answer), options, fuzzy=False) if isinstance(answer, str) else None
    if i is None:
        raise ValueError(f"answer {answer!r} names no single option of {list(options)}; give a letter (A-"
                         f"{letter(len(options) - 1)}) or one option text")
    return i


def resolve_multi(answer, options: Sequence[str]) -> set[int]:
    """The indices of a multi-choice gold answer: "A, C", ["A", "C"], or option texts (list or one string)."""
    if isinstance(answer, str):
        chosen = choose_multi(answer, options)
        if chosen is None:
            raise ValueError(f"answer {answer!r} names no set of options of {list(options)}; give letters "
                             f"(\"A, C\") or option texts")
        return chosen
    if isinstance(answer, Sequence) and answer:
        return {resolve_single(a, options) for a in answer}
    raise ValueError(f"multi-choice answer must be a non-empty list or string, got {answer!r}")


def score_single(pred: str, answer, options: Sequence[str]) -> float:
    """1.0 when ``pred`` names the gold option, else 0.0."""
    return float(choose_single(pred, options) == resolve_single(answer, options))


def score_multi(pred: str, answer, options: Sequence[str]) -> float:
    """1 for the exact set, 0.5 for a non-empty strict subset, 0 otherwise."""
    gold, chosen = resolve_multi(answer, options), choose_multi(pred, options)
    if not chosen:
        return 0.0
    if chosen == gold:
        return 1.0
    return 0.5 if chosen < gold else 0.0


# ---- records --------------------------------------------------------------------------------
def record_options(record: Mapping) -> list[str] | None:
    """The record's ``options``, else the "A. text" lines of its question (or of its human turn); None if open."""
    if record["type"] == "open":
        return None
    opts = record.get("options")
    if not opts:
        conv = record.get("conversations") or [{}]
        opts = parse_options(record.get("question") or conv[0].get("value", ""))
    if not opts:
        raise ValueError(f"record {record.get('id', '?')}: a {record['type']} question without options; give "
                         f"'options' or list them as 'A. text' lines in the question")
    return list(opts)


def score_record(record: Mapping, pred: str, wordnet=None) -> dict[str, float | None]:
    """Per-record metrics: {"single_choice", "chance_single_choice"}, {"multi_choice"}, or the open metrics
    {"open_em", "open_f1", "open_rouge_l", "open_meteor"} (METEOR None without ``wordnet``)."""
    typ, ans = record["type"], record["answer"]
    if typ == "open":
        gold = ans if isinstance(ans, str) else ", ".join(ans)
        return {"open_em": exact_match(pred, gold), "open_f1": token_f1(pred, gold),
                "open_rouge_l": rouge_l(pred, gold),
                "open_meteor": meteor(pred, gold, wordnet) if wordnet is not None else None}
    if typ not in TYPES:
        raise ValueError(f"record {record.get('id', '?')}: unknown type {typ!r}; expected one of {TYPES}")
    opts = record_options(record)
    try:
        if typ == "single_choice":
            return {"single_choice": score_single(pred, ans, opts), "chance_single_choice": 1.0 / len(opts)}
        return {"multi_choice": score_multi(pred, ans, opts)}
    except ValueError as e:
        raise ValueError(f"record {record.get('id', '?')}: {e}") from None


_OPEN_OPTIONAL = ("open_meteor", "open_wsi_precision", "open_wsi_relevance")


def score_records(records: Sequence[Mapping], predictions: Sequence[str],
                  judge_scores: Sequence[Mapping | None] | None = None) -> dict:
    """{"scales": {scale: metrics}, "overall": metrics, "families": {family: metrics}, "notes": [str]}.

    metrics hold the means single_choice, chance_single_choice, multi_choice, open_em, open_f1, open_rouge_l,
    open_meteor, open_wsi_precision, open_wsi_relevance and the counts n_single_choice, n_multi_choice, n_open
    (n_open_judged with judge scores); a format's keys appear where its questions exist, an open metric that was
    not computed is None. ``judge_scores``: per record None or {"wsi_precision": p, "wsi_relevance": r}
    (judge.ClaimJudge.score_records)."""
    if judge_scores is not None and len(judge_scores) != len(records):
        raise ValueError(f"judge_scores has {len(judge_scores)} entries for {len(records)} records")
    wordnet, reason = wordnet_status()
    groups: dict[str, dict[str, list[float]]] = {}
    for i, (r, pred) in enumerate(zip(records, predictions, strict=True)):
        m = score_record(r, pred, wordnet)
        js = judge_scores[i] if judge_scores is not None and r["type"] == "open" else None
        if js is not None:
            m.update(open_wsi_precision=js["wsi_precision"], open_wsi_relevance=js["wsi_relevance"])
        for key in (r["scale"], "overall", "family:" + (r.get("family") or "?")):
            g = groups.setdefault(key, {})
            for k, v in m.items():
                if v is not None:
                    g.setdefault(k, []).append(v)
            g.setdefault("n:" + r["type"], []).append(1)
    out = {}
    for key, g in groups.items():
        m = {k: sum(v) / len(v) for k, v in g.items() if not k.startswith("n:")}
        if "n:open" in g:
            m.update({k: m.get(k) for k in _OPEN_OPTIONAL})
            if "open_wsi_precision" in g:
                m["n_open_judged"] = len(g["open_wsi_precision"])
        m.update({f"n_{t}": len(g["n:" + t]) for t in TYPES if "n:" + t in g})
        out[key] = m
    overall = out.pop("overall", {})
    families = {k.split(":", 1)[1]: out.pop(k) for k in sorted(out) if k.startswith("family:")}
    notes = [reason] if reason and "n_open" in overall else []
    return {"scales": {s: out[s] for s in SCALES if s in out}, "overall": overall, "families": families,
            "notes": notes}


TABLE_COLUMNS = {"single": "single_choice", "multi": "multi_choice", "ROUGE-L": "open_rouge_l",
                 "METEOR": "open_meteor", "WSI-P": "open_wsi_precision", "WSI-R": "open_wsi_relevance"}


def markdown_table(metrics: Mapping, extra: Mapping[str, Mapping] | None = None) -> str:
    """Levels as rows (then Overall), the paper's formats as columns: single (accuracy), multi (score), open
    ROUGE-L, METEOR, WSI-P, WSI-R; "-" where absent. ``extra`` adds columns {name: {scale: value}} (the Overall
    row reads key "overall"). The notes follow the table."""
    extra = extra or {}
    head = ["level", *TABLE_COLUMNS, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = list(metrics["scales"].items())
    if metrics.get("overall"):
        rows.append(("Overall", metrics["overall"]))
    for scale, m in rows:
        key = "overall" if scale == "Overall" else scale
        row = [scale, *(fmt(m.get(c)) for c in TABLE_COLUMNS.values()), *(fmt(e.get(key)) for e in extra.values())]
        lines.append("| " + " | ".join(row) + " |")
    notes = "".join(f"\n- {n}" for n in metrics.get("notes", []))
    return "\n".join(lines) + "\n" + (f"\nNotes:{notes}\n" if notes else "")
