"""Eval metric arithmetic on hand-checkable cases, computed from the definitions."""
import pytest

from topopack.model.evaluate import (exact_match, markdown_table, match_option, parse_multi, score_multi,
                                     score_records, score_single, token_f1)

CLASSES = ["normal parenchyma", "tumor", "tumor margin", "necrosis", "fibrous septa"]


def test_token_f1_and_exact_match():
    # pred "the tumor margin" vs gold "tumor margin": common 2, precision 2/3, recall 1 -> F1 = 0.8
    assert token_f1("the tumor margin", "tumor margin") == pytest.approx(0.8)
    assert token_f1("3", "2") == 0.0
    assert token_f1("Tumor  Margin.", "tumor margin") == 1.0
    # repeated words count once per occurrence: pred "a a b", gold "a b b": common 2 -> P = R = 2/3
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert exact_match(" Upper Left.", "upper left") == 1.0
    assert exact_match("upper", "upper left") == 0.0


def test_match_option():
    assert match_option("tumor", CLASSES) == "tumor"              # exact, not the longer "tumor margin"
    assert match_option("Tumor margin.", CLASSES) == "tumor margin"
    assert match_option("B", CLASSES) == "tumor"                  # option letter
    assert match_option("septa", CLASSES) == "fibrous septa"      # best token F1
    assert match_option("banana", CLASSES) is None


def test_multi_choice_scores():
    gold = ["tumor", "necrosis", "fibrous septa"]
    assert score_multi("fibrous septa, tumor, necrosis", gold, CLASSES) == 1.0   # order-free
    assert score_multi("tumor and necrosis", gold, CLASSES) == 0.5               # strict subset
    assert score_multi("tumor, tumor margin", gold, CLASSES) == 0.0              # a wrong option
    assert score_multi("tumor, necrosis, fibrous septa, normal parenchyma", gold, CLASSES) == 0.0  # superset
    assert score_multi("", gold, CLASSES) == 0.0
    assert score_multi("tumor, kidney", gold, CLASSES) == 0.0                    # not an option
    assert parse_multi("Tumor margin; necrosis", CLASSES) == {"tumor margin", "necrosis"}


def test_score_records_by_scale():
    recs = [
        {"scale": "WSI", "type": "single_choice", "answer": "yes", "options": ["yes", "no"]},
        {"scale": "WSI", "type": "single_choice", "answer": "no", "options": ["yes", "no"]},
        {"scale": "WSI", "type": "open", "answer": "2"},
        {"scale": "ROI", "type": "multi_choice", "answer": ["tumor", "necrosis"], "options": CLASSES},
        {"scale": "ROI", "type": "multi_choice", "answer": ["tumor"], "options": CLASSES},
        {"scale": "Patch", "type": "single_choice", "answer": "necrosis", "options": CLASSES},
    ]
    preds = ["yes", "yes", "2", "tumor", "tumor", "necrosis"]
    m = score_records(recs, preds)
    assert m["scales"]["WSI"]["single_choice"] == 0.5
    assert m["scales"]["WSI"]["chance_single_choice"] == 0.5
    assert m["scales"]["WSI"]["open_f1"] == 1.0 and m["scales"]["WSI"]["open_em"] == 1.0
    assert m["scales"]["ROI"]["multi_choice"] == (0.5 + 1.0) / 2
    assert m["scales"]["Patch"]["single_choice"] == 1.0
    assert m["scales"]["Patch"]["chance_single_choice"] == pytest.approx(1 / 5)
    assert m["overall"]["single_choice"] == pytest.approx(2 / 3)
    assert list(m["scales"]) == ["WSI", "ROI", "Patch"]
    table = markdown_table(m, {"blind": {"WSI": 0.25}})
    assert "| WSI | 0.500 |" in table and table.count("\n") == 5
    assert score_single("no", "yes", ["yes", "no"]) == 0.0
