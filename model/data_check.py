"""`topopack data check FILE [FILE ...]`: validate instruction files of either schema (model/records.py).

Prints the records by level x format and every bad record with its file, index and field; exit 1 when any record
is bad (so a pipeline stops before training on it).
"""
from __future__ import annotations

from topopack.model.records import LEVELS, QUESTION_TYPES, census, read_records


def add_arguments(p) -> None:
    p.add_argument("action", choices=("check",), help="check: validate and count")
    p.add_argument("files", nargs="+", help="JSON or JSONL instruction files")
    p.add_argument("--image-root", default=None, help="directory the records' images are relative to "
                                                      "(default: each file's directory)")
    p.add_argument("--no-answers", dest="need_answer", action="store_false",
                   help="questions without answers are fine (files for batch `topopack ask`)")


def table(counts) -> str:
    kinds = [*QUESTION_TYPES, "caption"]
    rows = ["| level | " + " | ".join(kinds) + " | total |", "|" + "---|" * (len(kinds) + 2)]
    for level in LEVELS:
        n = [counts.get((level, k), 0) for k in kinds]
        rows.append(f"| {level} | " + " | ".join(map(str, n)) + f" | {sum(n)} |")
    return "\n".join(rows)


def main(args) -> int:
    bad = 0
    for f in args.files:
        records, errors = read_records(f, image_root=args.image_root, need_answer=args.need_answer)
        print(f"{f}: {len(records)} good record(s), {len(errors)} bad")
        print(table(census(records)))
        for e in errors:
            print(f"  error: {e}")
        bad += len(errors)
    return 1 if bad else 0
