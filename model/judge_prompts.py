"""Prompts for the claim-based judge metrics WSI-Precision and WSI-Relevance (WSI-LLaVA, used by Hepato-LLaVA).

WSI-Precision: claims are extracted from the model's answer and each is scored against the reference answer
(is what the model said right?). WSI-Relevance: claims are extracted from the reference answer and each is scored
against the model's answer (did the model say what matters?). A claim scores 1, 0.7, 0.3 or 0; a metric is the
mean over claims. Outputs are one item per line so a small judge can follow them and judge.py can parse them.
"""
from __future__ import annotations

CLAIM_SCORES = (0.0, 0.3, 0.7, 1.0)

EXTRACT = """You split a pathology answer into its factual claims.
A claim is one short, self-contained statement of fact (a finding, a diagnosis, a grade, a location, a count).
Write every claim of the text below on its own line, starting with "- ". Do not add claims that the text does \
not make. Write nothing else.

Text:
{text}

Claims:
"""

_SCALE = """Score each claim with one of these values:
1 - {one}
0.7 - {seven}
0.3 - {three}
0 - {zero}
Write one line per claim, in the order given, exactly as "<claim number>. score: <value>", for example \
"2. score: 0.7". Write nothing else."""

PRECISION = """You are an impartial pathology judge. Decide whether each claim made by a model is correct \
according to the reference answer.
""" + _SCALE.format(
    one="the reference fully supports the claim",
    seven="the claim is mostly correct, with a minor inaccuracy",
    three="the reference addresses the claim, but its core content is wrong (e.g. the grade, the malignancy, "
          "the tissue type)",
    zero="the claim is wrong, or the reference gives nothing that supports it") + """

Reference answer:
{reference}

Claims made by the model:
{claims}

Scores:
"""

RELEVANCE = """You are an impartial pathology judge. Decide whether each claim of the reference answer is \
covered by the model's answer.
""" + _SCALE.format(
    one="the model's answer states the claim correctly",
    seven="the model's answer states the claim, with a minor omission or deviation",
    three="the model's answer touches the claim's subject, but misses or contradicts its core content",
    zero="the model's answer does not address the claim") + """

Model's answer:
{prediction}

Claims of the reference answer:
{claims}

Scores:
"""


def numbered(claims: list[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(claims, 1))


def extract_prompt(text: str) -> str:
    """Ask for the claims of ``text``, one "- claim" per line."""
    return EXTRACT.format(text=text.strip())


def precision_prompt(claims: list[str], reference: str) -> str:
    """Ask for a score per claim of the prediction, judged against the reference."""
    return PRECISION.format(reference=reference.strip(), claims=numbered(claims))


def relevance_prompt(claims: list[str], prediction: str) -> str:
    """Ask for a score per claim of the reference, judged against the prediction."""
    return RELEVANCE.format(prediction=prediction.strip(), claims=numbered(claims))
