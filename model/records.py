"""VQA and caption records for training and eval: which files a stage reads, and how batches sample them."""
from __future__ import annotations

from pathlib import Path

import torch

# the files vqa_data.make_vqa_files writes; a --data directory means these
STAGE_FILES = {"connector": ("captions.json",), "vqa": ("vqa_train.json",), "eval": ("vqa_test.json",)}
STAGE_TYPES = {"connector": {"caption"}, "vqa": {"single_choice", "multi_choice", "open"},
               "eval": {"single_choice", "multi_choice", "open"}}


def json_files(data, stage: str) -> list[Path]:
    """``data`` itself when it is a file, else the stage's files in that directory (see STAGE_FILES)."""
    p = Path(data)
    files = [p] if p.is_file() else [p / name for name in STAGE_FILES[stage]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--data {data}: missing {', '.join(missing)} (give a VQA JSON file, or a directory "
                                f"written by topopack.model.vqa_data.make_vqa_files)")
    return files


def load_records(data, stage: str) -> list[dict]:
    """The stage's records from ``data`` (validated by vqa_data.load_vqa), slide paths made absolute."""
    from topopack.model.vqa_data import load_vqa

    records = []
    for f in json_files(data, stage):
        for r in load_vqa(f):
            if r["type"] in STAGE_TYPES[stage]:
                slide = Path(r["slide"])
                records.append({**r, "slide": str(slide if slide.is_absolute() else (f.parent / slide).resolve())})
    if not records:
        raise ValueError(f"--data {data}: no records of type {sorted(STAGE_TYPES[stage])} for stage {stage}")
    return records


def vocabulary_texts(records: list[dict]) -> list[str]:
    """Text for the embedded tokenizer: the training turns plus every question and option of the generator."""
    from topopack.model.vqa_data import FAMILIES

    texts = [t for r in records for t in turn(r)]
    for fam in FAMILIES.values():
        texts += [*fam.questions, *fam.options]
    return texts


def turn(record: dict) -> tuple[str, str]:
    """(human text with <image>, gpt answer text) of a record."""
    conv = record["conversations"]
    return conv[0]["value"], conv[1]["value"]


SAMPLING = ("family", "uniform")


def sample_weights(records: list[dict], sampling: str = "family",
                   family_weights: dict[str, float] | None = None) -> torch.Tensor:
    """Batch sampling weights: "uniform" over records, or "family": every question family (tumor, count, ...,
    patch_class) equally often, so the few whole-slide questions per slide are not drowned by region ones.
    ``family_weights`` (family "family" only) multiplies a family's share (default 1), e.g. more steps on the hard
    whole-slide families; it depends on the question family only, never on the answer."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    if sampling == "uniform":
        if family_weights:
            raise ValueError("family_weights needs sampling='family'")
        return torch.ones(len(records), dtype=torch.float64)
    keys = [r.get("family") or r["scale"] for r in records]
    counts = {k: keys.count(k) for k in set(keys)}
    fw = dict(family_weights or {})
    unknown = sorted(set(fw) - set(counts))
    if unknown:
        raise ValueError(f"family_weights names families not in the data: {unknown} (have {sorted(counts)})")
    if any(not (w > 0) for w in fw.values()):
        raise ValueError(f"family_weights must be > 0, got {fw}")
    return torch.tensor([fw.get(k, 1.0) / counts[k] for k in keys], dtype=torch.float64)


def parse_family_weights(text: str) -> dict[str, float]:
    """"location=3,count=2" -> {"location": 3.0, "count": 2.0}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--family-weights: expected FAMILY=WEIGHT items, got {item!r} in {text!r}")
    return out

