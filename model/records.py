"""Instruction records for training and eval, in either schema, and how batches sample them.

Two schemas are read as they are, from a JSON list or JSONL (one record per line):

- topopack's own (model/vqa_data.py): ``{"id", "slide", "scale", "region", "type", "family", "question",
  "options", "answer", "conversations": [human, gpt]}``;
- the authors' (Hepato-LLaVA's HepatoPathoVQA files): ``{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\nQuestion\nA. ...\nB. ..."}, {"from": "gpt", "value": "A"}, ...], "info": {"belong_level":
  "WSI|ROI|Patch", "format": "single|multi|open", "subcategory", ...}}``; captions have no ``info``, and a record
  may carry ``region`` (a level-0 box). ``image`` is a slide feature file (h5/pt) or a pre-encoded region ``.pt``
  (``{"features": [n_packs, C], "pack_indices", "region_coords", "num_tokens"}``, model/summaries.py).

Both become one record: the topopack keys (``slide`` = the image's absolute path; for the authors' records
``options`` parsed from the question, ``answer`` = the last gpt turn) plus ``turns`` [(question, answer), ...],
every answer supervised, and ``info`` (kept through training, eval and predictions).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

# the files vqa_data.make_vqa_files writes; a --data directory means these
STAGE_FILES = {"connector": ("captions.json",), "vqa": ("vqa_train.json",), "eval": ("vqa_test.json",)}
QUESTION_TYPES = ("single_choice", "multi_choice", "open")
STAGE_TYPES = {"connector": {"caption"}, "vqa": set(QUESTION_TYPES), "eval": set(QUESTION_TYPES)}
AUTHORS_FORMATS = {"single": "single_choice", "multi": "multi_choice", "open": "open"}
LEVELS = ("WSI", "ROI", "Patch")


class RecordError(ValueError):
    """A bad instruction file or record; the message names the file, the record index and the field."""


def json_files(data, stage: str) -> list[Path]:
    """``data`` itself when it is a file, else the stage's files in that directory (see STAGE_FILES)."""
    p = Path(data)
    files = [p] if p.is_file() else [p / name for name in STAGE_FILES[stage]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--data {data}: missing {', '.join(missing)} (give a JSON/JSONL instruction file, or "
                                f"a directory written by topopack.model.vqa_data.make_vqa_files)")
    return files


def read_json_records(path) -> list:
    """The records of a JSON list or a JSONL file (by content: a file that is not one JSON value is read as JSONL)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecordError(f"{path}: unreadable ({e})") from None
    if path.suffix.lower() != ".jsonl":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise RecordError(f"{path}: not valid JSON ({e})") from None
        else:
            if not isinstance(value, list):
                raise RecordError(f"{path}: must hold a JSON list of records (or one record per line), got "
                                  f"{type(value).__name__}")
            return value
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: line {n} is not valid JSON ({e})") from None
    return records


def _conversation_turns(conv, where: str, need_answer: bool = True) -> list[tuple[str, str | None]]:
    """[(human, gpt), ...] of a conversations list; the last gpt turn may be absent when not ``need_answer``."""
    if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) for t in conv):
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns = []
    for i, t in enumerate(conv):
        role, value = t.get("from"), t.get("value")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise RecordError(f"{where}: conversations[{i}].from must be {expected!r}, got {role!r}")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{where}: conversations[{i}].value must be a non-empty string")
        if role == "human":
            turns.append((value, None))
        else:
            turns[-1] = (turns[-1][0], value)
    if need_answer and turns[-1][1] is None:
        raise RecordError(f"{where}: conversations must end with a gpt turn")
    return turns


def _authors_record(rec: dict, where: str, need_answer: bool) -> dict:
    from topopack.model.scoring import parse_options

    for key in ("id", "image", "conversations"):
        if key not in rec:
            raise RecordError(f"{where}: missing field '{key}'")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise RecordError(f"{where}: 'image' must be a non-empty path string")
    turns = _conversation_turns(rec["conversations"], where, need_answer)
    info = rec.get("info")
    region = rec.get("region")
    if info is None:
        kind, level = "caption", "ROI" if region is not None else "WSI"
    else:
        if not isinstance(info, dict):
            raise RecordError(f"{where}: 'info' must be an object")
        level, fmt = info.get("belong_level"), info.get("format")
        if level not in LEVELS:
            raise RecordError(f"{where}: info.belong_level must be one of {LEVELS}, got {level!r}")
        if fmt not in AUTHORS_FORMATS:
            raise RecordError(f"{where}: info.format must be one of {sorted(AUTHORS_FORMATS)}, got {fmt!r}")
        kind = AUTHORS_FORMATS[fmt]
    question = turns[-1][0].replace("<image>", "").strip()
    options = parse_options(question) if kind in ("single_choice", "multi_choice") else None
    if kind in ("single_choice", "multi_choice") and len(options) < 2:
        raise RecordError(f"{where}: a {info['format']} question must list its options as 'A. ...' lines")
    return {"id": str(rec["id"]), "slide": rec["image"], "scale": level, "region": region, "type": kind,
            "family": (info or {}).get("subcategory") or kind, "question": question, "options": options,
            "answer": turns[-1][1], "turns": turns, "info": info}


def normalize_record(rec, where: str, need_answer: bool = True) -> dict:
    """One record of either schema as the common record (see the module docstring); RecordError names the field."""
    from topopack.model.regions import check_box
    from topopack.model.vqa_data import VQAError, validate_record

    if not isinstance(rec, dict):
        raise RecordError(f"{where}: must be an object, got {type(rec).__name__}")
    if "slide" in rec and "scale" in rec:  # topopack's schema
        try:
            validate_record(rec, where)
        except VQAError as e:
            raise RecordError(str(e)) from None
        out = {**rec, "turns": _conversation_turns(rec["conversations"], where), "info": rec.get("info")}
    elif "image" in rec or "conversations" in rec:
        out = _authors_record(rec, where, need_answer)
        if out["region"] is not None:
            try:
                out["region"] = list(check_box(out["region"], f"{where}: 'region'"))
            except ValueError as e:
                raise RecordError(str(e)) from None
    else:
        raise RecordError(f"{where}: neither schema: needs 'image' and 'conversations' (the authors') or 'slide', "
                          f"'scale', 'type', ... (topopack's)")
    return out


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def read_records(path, *, image_root=None, need_answer: bool = True, image=None) -> tuple[list[dict], list[str]]:
    """(records, errors) of one file: every bad record is reported (file, index, field), the good ones kept.
    Image paths are resolved against ``image_root`` (default: the file's directory); ``image`` replaces every
    record's image (questions about one slide)."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    records, errors, seen = [], [], set()
    for i, rec in enumerate(read_json_records(path)):
        where = f"{path}: record {i}"
        if image is not None and isinstance(rec, dict):
            rec = {**rec, ("slide" if "slide" in rec and "scale" in rec else "image"): str(image)}
        try:
            r = normalize_record(rec, where, need_answer)
            if r["id"] in seen:
                raise RecordError(f"{where}: duplicate id {r['id']!r}")
            r["slide"] = _resolve(r["slide"], base)
            if not Path(r["slide"]).is_file():
                raise RecordError(f"{where}: image file {r['slide']} not found")
        except RecordError as e:
            errors.append(str(e))
            continue
        seen.add(r["id"])
        records.append(r)
    return records, errors


def raise_bad(errors: list[str], what: str = "record") -> None:
    """One RecordError listing the first 20 of ``errors`` (read_records' list), if there are any."""
    if errors:
        raise RecordError(f"{len(errors)} bad {what}(s):\n  " + "\n  ".join(errors[:20]) +
                          (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))


def load_records(data, stage: str, *, image_root=None) -> list[dict]:
    """The stage's records from ``data`` (a file of either schema, or a make_vqa_files directory); any bad record
    is an error that lists them all."""
    records, errors = [], []
    for f in json_files(data, stage):
        recs, errs = read_records(f, image_root=image_root)
        records += [r for r in recs if r["type"] in STAGE_TYPES[stage]]
        errors += errs
    raise_bad(errors)
    if not records:
        raise RecordError(f"--data {data}: no records of type {sorted(STAGE_TYPES[stage])} for stage {stage}")
    return records


def census(records: list[dict]) -> Counter:
    """Counts by (level, type)."""
    return Counter((r["scale"], r["type"]) for r in records)


def vocabulary_texts(records: list[dict]) -> list[str]:
    """Text for the embedded tokenizer: the training turns plus every question and option of the generator."""
    from topopack.model.vqa_data import FAMILIES

    texts = [t for r in records for turn in r["turns"] for t in turn if t]
    for fam in FAMILIES.values():
        texts += [*fam.questions, *fam.options]
    return texts


def turn(record: dict) -> tuple[str, str]:
    """(human text with <image>, gpt answer text) of a record's first turn."""
    return record["turns"][0]


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

