"""predictions.jsonl: one answer per line, with the field names of the authors' evaluation scripts.

    {"question_id", "question", "prediction", "ground_truth" (when known), "info": {"belong_level", "format",
     "subcategory", ...}, "image", "region", "options" (topopack's records: the option texts)}

Written by `topopack eval` and batch `topopack ask`; `topopack eval --predictions FILE` scores such a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from topopack.model.records import AUTHORS_FORMATS, RecordError, read_json_records

FORMAT_OF_TYPE = {v: k for k, v in AUTHORS_FORMATS.items()}


def prediction_row(record: dict, prediction: str) -> dict:
    info = record.get("info") or {"belong_level": record["scale"], "format": FORMAT_OF_TYPE.get(record["type"]),
                                  "subcategory": record.get("family")}
    row = {"question_id": record["id"], "question": record["turns"][-1][0], "prediction": prediction}
    if record.get("answer") is not None:
        row["ground_truth"] = record["answer"]
    row.update({"info": info, "image": record["slide"], "region": record.get("region")})
    if record.get("options") is not None and record.get("info") is None:
        row["options"] = record["options"]
    return row


def write_predictions(path, records: list[dict], predictions: list[str]) -> Path:
    """Atomic JSONL write of one row per record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r, p in zip(records, predictions, strict=True):
            f.write(json.dumps(prediction_row(r, p)) + "\n")
    os.replace(tmp, path)
    return path


def read_predictions(path) -> tuple[list[dict], list[str]]:
    """(records, predictions) to score from a predictions file; rows without ground_truth are an error."""
    from topopack.model.scoring import parse_options

    records, preds = [], []
    for i, row in enumerate(read_json_records(path)):
        where = f"{path}: line {i + 1}"
        for key in ("question_id", "question", "prediction", "info"):
            if key not in row:
                raise RecordError(f"{where}: missing field '{key}'")
        if row.get("ground_truth") is None:
            raise RecordError(f"{where}: no 'ground_truth' to score against (question {row['question_id']!r})")
        info = row["info"] or {}
        if info.get("format") not in AUTHORS_FORMATS or info.get("belong_level") not in ("WSI", "ROI", "Patch"):
            raise RecordError(f"{where}: info needs belong_level WSI/ROI/Patch and format single/multi/open, got {info}")
        kind = AUTHORS_FORMATS[info["format"]]
        options = row.get("options") or (parse_options(row["question"]) if kind != "open" else None)
        records.append({"id": row["question_id"], "scale": info["belong_level"], "type": kind,
                        "family": info.get("subcategory") or kind, "options": options, "answer": row["ground_truth"],
                        "info": info})
        preds.append(str(row["prediction"]))
    if not records:
        raise RecordError(f"{path}: no predictions")
    return records, preds
