"""Scoring like Hepato-LLaVA's main table: choice answers as letters, texts or both; open-ended text metrics;
aggregation by level x format. Expected values are worked out by hand from the definitions."""
import pytest

from topopack.model import scoring
from topopack.model.scoring import (choose_multi, choose_single, exact_match, markdown_table, meteor,
                                    parse_options, resolve_multi, resolve_single, rouge_l, score_multi,
                                    score_records, score_single, token_f1, wordnet_status)

# options whose texts hold "and" and a comma, as the authors' questions do
OPTS = ["Trabecular", "Solid", "Pseudoglandular", "Necrosis and hemorrhage", "Fibrosis, mild"]
CLASSES = ["normal parenchyma", "tumor", "tumor margin", "necrosis", "fibrous septa"]


def test_parse_options_from_a_human_turn():
    q = "<image>\nWhich growth pattern dominates?\nA. Trabecular\nB) Solid\n(C) Necrosis and hemorrhage\n" \
        "D. Fibrosis, mild\nAnswer with the option's letter."
    assert parse_options(q) == ["Trabecular", "Solid", "Necrosis and hemorrhage", "Fibrosis, mild"]
    assert parse_options("<image>\nHow many nodules are there?") == []
    assert parse_options("A. only one option") == []          # a single "option" is no option list
    assert parse_options("B. Solid\nC. Trabecular") == []     # letters must start at A


@pytest.mark.parametrize("pred", ["B", "b", "B.", "(B)", "B)", "B. Solid", "b) solid", "The answer is B",
                                  "the answer is b.", "Answer: B", "Solid", "solid!", "SOLID", "A solid tumor"])
def test_single_choice_accepts_the_letter_the_text_or_both(pred):
    assert score_single(pred, "B", OPTS) == 1.0
    assert score_single(pred, "Solid", OPTS) == 1.0    # the gold answer may be the letter or the text


@pytest.mark.parametrize("pred", ["B or C", "B. Trabecular", "Solid, not Trabecular", "A, B", "", "E is wrong",
                                  "kidney", "A tumor"])
def test_single_choice_rejects_two_options_or_none(pred):
    assert score_single(pred, "B", OPTS) == 0.0


def test_single_choice_option_text_with_and():
    assert score_single("Necrosis and hemorrhage", "D", OPTS) == 1.0
    assert score_single("D. Necrosis and hemorrhage", "Necrosis and hemorrhage", OPTS) == 1.0
    assert score_single("Fibrosis, mild.", "E", OPTS) == 1.0


def test_single_choice_keeps_the_old_evaluate_behaviour():
    assert choose_single("tumor", CLASSES) == 1                 # exact, not the longer "tumor margin"
    assert choose_single("Tumor margin.", CLASSES) == 2
    assert choose_single("B", CLASSES) == 1                     # option letter
    assert choose_single("septa", CLASSES) == 4                 # the one option with the best token F1
    assert choose_single("banana", CLASSES) is None
    assert score_single("no", "yes", ["yes", "no"]) == 0.0


@pytest.mark.parametrize("pred", ["A, C", "A and C", "A,C", "a, c", "C, A", "A\nC", "A; C", "(A), (C)",
                                  "A. Trabecular, C. Pseudoglandular", "Trabecular and Pseudoglandular",
                                  "trabecular, pseudoglandular", "The answers are A and C"])
def test_multi_choice_exact_set_in_every_form(pred):
    for gold in ("A, C", ["A", "C"], ["Trabecular", "Pseudoglandular"], "Trabecular, Pseudoglandular"):
        assert score_multi(pred, gold, OPTS) == 1.0, gold


def test_multi_choice_options_holding_and_or_commas_stay_whole():
    gold = ["Necrosis and hemorrhage", "Fibrosis, mild"]
    assert choose_multi("Necrosis and hemorrhage, Fibrosis, mild", OPTS) == {3, 4}
    assert score_multi("Necrosis and hemorrhage and Fibrosis, mild", gold, OPTS) == 1.0
    assert score_multi("D, E", gold, OPTS) == 1.0
    assert score_multi("D. Necrosis and hemorrhage, E. Fibrosis, mild", "D, E", OPTS) == 1.0
    assert score_multi("Necrosis and hemorrhage", gold, OPTS) == 0.5                    # strict subset
    assert score_multi("Fibrosis mild", gold, OPTS) == 0.5                             # text without its comma


def test_multi_choice_subsets_supersets_and_wrong_parts():
    gold = "A, C, D"
    assert score_multi("A, C", gold, OPTS) == 0.5
    assert score_multi("D", gold, OPTS) == 0.5
    assert score_multi("A, C, D, E", gold, OPTS) == 0.0         # a superset
    assert score_multi("A, B", gold, OPTS) == 0.0               # a wrong option
    assert score_multi("A, kidney", gold, OPTS) == 0.0          # a part that names no option
    assert score_multi("Trabecular, necrosis", gold, OPTS) == 0.0   # "necrosis" alone is no option text
    assert score_multi("A. Solid", "A, B", OPTS) == 0.0         # the letter contradicts its text
    assert score_multi("", gold, OPTS) == 0.0
    assert score_multi("F, A", gold, OPTS) == 0.0               # F is no option letter


def test_multi_choice_keeps_the_old_evaluate_behaviour():
    gold = ["tumor", "necrosis", "fibrous septa"]
    assert score_multi("fibrous septa, tumor, necrosis", gold, CLASSES) == 1.0
    assert score_multi("tumor and necrosis", gold, CLASSES) == 0.5
    assert score_multi("tumor, tumor margin", gold, CLASSES) == 0.0
    assert score_multi("tumor, necrosis, fibrous septa, normal parenchyma", gold, CLASSES) == 0.0
    assert score_multi("tumor, kidney", gold, CLASSES) == 0.0
    assert choose_multi("Tumor margin; necrosis", CLASSES) == {2, 3}


def test_gold_answers_that_name_no_option_are_errors():
    with pytest.raises(ValueError, match="names no single option"):
        resolve_single("kidney", OPTS)
    with pytest.raises(ValueError, match="names no single option"):
        resolve_single("A, C", OPTS)
    with pytest.raises(ValueError, match="names no set of options"):
        resolve_multi("A, kidney", OPTS)
    assert resolve_multi(["Solid", "E"], OPTS) == {1, 4}


def test_exact_match_and_token_f1():
    # pred "the tumor margin" vs gold "tumor margin": common 2, precision 2/3, recall 1 -> F1 = 0.8
    assert token_f1("the tumor margin", "tumor margin") == pytest.approx(0.8)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert token_f1("3", "2") == 0.0
    assert exact_match(" Upper Left.", "upper left") == 1.0
    assert exact_match("upper", "upper left") == 0.0


def test_rouge_l_is_rouge_scores_lcs_f1():
    from rouge_score import rouge_scorer

    # reference [the tumor is large], prediction [the large tumor]: LCS 2, P = 2/3, R = 2/4 -> F1 = 4/7
    want = rouge_scorer.RougeScorer(["rougeL"]).score("the tumor is large", "the large tumor")["rougeL"].fmeasure
    assert rouge_l("The large tumor.", "the tumor is large") == pytest.approx(4 / 7) == pytest.approx(want)
    assert rouge_l("", "tumor") == 0.0


class NoSynonyms:
    """A WordNet stand-in without synsets: METEOR then matches exact words and Porter stems only."""

    def synsets(self, word):
        return []


def test_meteor_formula_without_synonyms():
    # reference [the tumor is large], hypothesis [the tumor is small]: 3 matches in 1 chunk, P = R = 3/4,
    # Fmean = PR / (0.9 P + 0.1 R) = 3/4, penalty = 0.5 (1/3)^3 = 1/54 -> 3/4 (1 - 1/54)
    assert meteor("the tumor is small", "The tumor is large.", NoSynonyms()) == pytest.approx(0.75 * (1 - 1 / 54))
    # stems match: "tumors" ~ "tumor"; 1 match of 1 word each, 1 chunk: Fmean 1, penalty 0.5 -> 0.5
    assert meteor("tumors", "tumor", NoSynonyms()) == pytest.approx(0.5)


def test_meteor_is_a_number_or_none_with_the_reason():
    wordnet, reason = wordnet_status()
    value = meteor("the tumor is small", "the tumor is large")
    if wordnet is None:
        assert value is None and reason.startswith("METEOR unavailable: nltk WordNet data not found; install it")
    else:
        assert reason is None and 0.0 <= value <= 1.0


def test_meteor_missing_wordnet_is_none_and_noted(monkeypatch):
    monkeypatch.setattr(scoring, "wordnet_status", lambda: (None, scoring.METEOR_UNAVAILABLE))
    m = score_records([{"scale": "WSI", "type": "open", "answer": "two nodules"}], ["two nodules"])
    assert m["scales"]["WSI"]["open_meteor"] is None and m["scales"]["WSI"]["open_rouge_l"] == 1.0
    assert m["notes"] == [scoring.METEOR_UNAVAILABLE]
    assert "| WSI | - | - | 1.000 | - | - | - |" in markdown_table(m)
    assert "METEOR unavailable" in markdown_table(m)


def records_and_predictions():
    q = "<image>\nPattern?\nA. Trabecular\nB. Solid\nC. Necrosis and hemorrhage"
    recs = [
        # WSI: authors' style, options only in the question, letter answers
        {"scale": "WSI", "type": "single_choice", "answer": "B", "options": None, "question": q, "family": "f1"},
        {"scale": "WSI", "type": "single_choice", "answer": "A", "options": None, "question": q, "family": "f1"},
        {"scale": "WSI", "type": "multi_choice", "answer": "A, C", "options": None, "question": q, "family": "f2"},
        {"scale": "WSI", "type": "open", "answer": "the tumor is large", "options": None, "family": "f3"},
        # ROI: topopack style, option texts
        {"scale": "ROI", "type": "multi_choice", "answer": ["Solid", "Trabecular"], "options": OPTS, "family": "f2"},
        {"scale": "ROI", "type": "multi_choice", "answer": ["Solid"], "options": OPTS, "family": "f2"},
        {"scale": "ROI", "type": "open", "answer": "two", "options": None, "family": "f3"},
        {"scale": "Patch", "type": "single_choice", "answer": "Fibrosis, mild", "options": OPTS, "family": "f1"},
    ]
    preds = ["B. Solid", "C", "C", "the large tumor", "Solid", "Solid, Trabecular", "two", "fibrosis, mild"]
    return recs, preds


def test_score_records_by_level_and_format():
    recs, preds = records_and_predictions()
    judge = [None, None, None, {"wsi_precision": 1.0, "wsi_relevance": 0.5}, None, None,
             {"wsi_precision": 0.3, "wsi_relevance": 0.7}, None]
    m = score_records(recs, preds, judge)
    wsi, roi, patch, overall = m["scales"]["WSI"], m["scales"]["ROI"], m["scales"]["Patch"], m["overall"]
    assert list(m["scales"]) == ["WSI", "ROI", "Patch"]
    assert wsi["single_choice"] == 0.5 and wsi["chance_single_choice"] == pytest.approx(1 / 3)
    assert wsi["multi_choice"] == 0.5                       # {C} is a strict subset of {A, C}
    assert wsi["open_rouge_l"] == pytest.approx(4 / 7)      # see test_rouge_l_is_rouge_scores_lcs_f1
    assert wsi["open_f1"] == pytest.approx(2 * 1 * 0.75 / 1.75) and wsi["open_em"] == 0.0   # P 3/3, R 3/4
    assert wsi["open_wsi_precision"] == 1.0 and wsi["open_wsi_relevance"] == 0.5
    assert (wsi["n_single_choice"], wsi["n_multi_choice"], wsi["n_open"], wsi["n_open_judged"]) == (2, 1, 1, 1)
    assert roi["multi_choice"] == (0.5 + 0.0) / 2           # a strict subset; a superset of {Solid}
    assert roi["open_em"] == roi["open_f1"] == roi["open_rouge_l"] == 1.0
    assert "single_choice" not in roi and "open_rouge_l" not in patch
    assert patch["single_choice"] == 1.0 and patch["chance_single_choice"] == pytest.approx(1 / 5)
    assert overall["single_choice"] == pytest.approx(2 / 3)
    assert overall["multi_choice"] == pytest.approx(1 / 3)
    assert overall["open_wsi_precision"] == pytest.approx(0.65) and overall["open_wsi_relevance"] == pytest.approx(0.6)
    assert m["families"]["f2"]["multi_choice"] == pytest.approx(1 / 3)
    wordnet, reason = wordnet_status()
    assert (wsi["open_meteor"] is None) == (wordnet is None) and m["notes"] == ([reason] if reason else [])


def test_score_records_without_judge_scores_and_errors():
    recs, preds = records_and_predictions()
    m = score_records(recs, preds)
    assert m["scales"]["WSI"]["open_wsi_precision"] is None and "n_open_judged" not in m["scales"]["WSI"]
    with pytest.raises(ValueError, match="^record q7: a single_choice question without options"):
        score_records([{"id": "q7", "scale": "WSI", "type": "single_choice", "answer": "A", "options": None,
                        "question": "Pattern?"}], ["A"])
    with pytest.raises(ValueError, match="^record q8: answer 'kidney' names no single option"):
        score_records([{"id": "q8", "scale": "WSI", "type": "single_choice", "answer": "kidney", "options": OPTS}],
                      ["A"])
    with pytest.raises(ValueError, match="^record q9: unknown type 'caption'"):
        score_records([{"id": "q9", "scale": "WSI", "type": "caption", "answer": "a slide"}], ["a slide"])
    with pytest.raises(ValueError, match="2 entries for 8 records"):
        score_records(recs, preds, [None, None])


def test_markdown_table_by_level_and_format():
    recs, preds = records_and_predictions()
    m = score_records(recs, preds)
    table = markdown_table(m, {"blind": {"WSI": 0.25, "overall": 0.5}})
    lines = table.splitlines()
    assert lines[0] == "| level | single | multi | ROUGE-L | METEOR | WSI-P | WSI-R | blind |"
    meteor_cell = "-" if m["scales"]["WSI"]["open_meteor"] is None else f"{m['scales']['WSI']['open_meteor']:.3f}"
    assert lines[2] == f"| WSI | 0.500 | 0.500 | 0.571 | {meteor_cell} | - | - | 0.250 |"
    assert lines[4].startswith("| Patch | 1.000 | - | - | - | - | - | - |")
    assert lines[5].startswith("| Overall | 0.667 | 0.333 |") and lines[5].endswith("| 0.500 |")
