"""Synthetic hierarchical VQA (LLaVA-style JSON) from slides with labels and facts (topopack.model.synth).

One record per question::

    {"id": "slide_000-wsi-3", "slide": "slide_000.h5", "scale": "WSI|ROI|Patch",
     "region": null | [x0, y0, x1, y1], "type": "single_choice|multi_choice|open|caption",
     "family": "tumor", "question": "...", "options": [...] | null, "answer": "..." | [...],
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

- ``slide`` is relative to the JSON file's directory (``slide_path(json_path, record)``).
- ``region`` is in level-0 pixels, null = whole slide. Region boxes follow the pack grid
  (origin = the slide's smallest coords, pack p covers ``origin + pack_cell * k * patch_size``,
  side ``k * patch_size``) and are inset by a quarter patch, so a box intersects exactly the
  packs it was drawn from. Answers come from the labels of the patches inside those packs:
  Patch = the majority class of one pack, ROI = the classes with >= MIN_PRESENT patches
  (boxes where a class has 1..MIN_PRESENT-1 patches are not asked about).
- Answer convention: the gpt turn is the option TEXT (not a letter); multi-choice answers
  are the chosen option texts joined by ", " in display order. Options are shuffled per record.
- Balance: within each question family, records are drawn round-robin over answers
  (candidates reused at most ``max_repeat`` times), so every single-choice answer is about
  equally frequent and the question text alone does not give it away. The question text
  never contains the region or anything else that depends on the answer.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from topopack.io import find_slides, load_slide, split_slides
from topopack.model.synth import LOCATIONS, MARGIN, SIZE_CLASSES, TISSUE_CLASSES, TUMOR

SCALES = ("WSI", "ROI", "Patch")
TYPES = ("single_choice", "multi_choice", "open", "caption")
YES_NO = ("yes", "no")
COUNT_OPTIONS = ("0", "1", "2", "3 or more")
MIN_PRESENT = 2  # a class is "present" in a region with at least this many patches
MIN_PACK_PATCHES = 3  # Patch questions only about packs with at least this many patches


@dataclass(frozen=True)
class Family:
    name: str
    scale: str
    questions: tuple[str, ...]  # paraphrases, picked at random (independent of the answer)
    options: tuple[str, ...]
    forms: tuple[str, ...]  # the record types this family is asked in


FAMILIES = {f.name: f for f in (
    Family("tumor", "WSI", ("Is there a tumor in this slide?", "Does this slide contain tumor?"), YES_NO,
           ("single_choice", "open")),
    Family("count", "WSI", ("How many tumor nodules are in this slide?", "How many nodules of tumor does the slide show?"),
           COUNT_OPTIONS, ("single_choice", "open")),
    Family("size", "WSI", ("What is the size of the largest tumor nodule?", "How large is the biggest nodule?"),
           SIZE_CLASSES, ("single_choice", "open")),
    Family("location", "WSI", ("Where is the largest tumor nodule?", "In which part of the slide is the biggest nodule?"),
           LOCATIONS, ("single_choice", "open")),
    Family("roi_classes", "ROI", ("Which tissue types are present in this region?", "What kinds of tissue does this region contain?"),
           TISSUE_CLASSES, ("multi_choice", "open")),
    Family("roi_margin", "ROI", ("Is tumor margin present in this region?", "Does this region contain tumor margin?"),
           YES_NO, ("single_choice", "open")),
    Family("patch_class", "Patch", ("What tissue type is in this region?", "What kind of tissue does this region show?"),
           TISSUE_CLASSES, ("single_choice", "open")),
)}


class VQAError(ValueError):
    """An invalid VQA record or file; the message names the file, the record and the problem."""


# ---- per-slide candidates ------------------------------------------------------------------
@dataclass
class _Candidate:
    family: str
    slide: int
    answer: object  # str, or tuple of class names for roi_classes
    region: list | None


def _slide_candidates(idx: int, path, pack_size: int, rng, roi_boxes: int) -> tuple[dict, list[_Candidate]]:
    """The slide's facts and every question it can answer: one per WSI family, one per clean pack, ROI boxes."""
    slide = load_slide(path)
    if slide.labels is None or slide.facts is None:
        raise VQAError(f"{path}: needs 'labels' and 'facts' (write it with topopack.model.synth)")
    f = slide.facts
    nc = len(TISSUE_CLASSES)
    out = [_Candidate("tumor", idx, "yes" if f["has_tumor"] else "no", None),
           _Candidate("count", idx, COUNT_OPTIONS[min(3, f["num_nodules"])], None)]
    if f["has_tumor"]:
        out += [_Candidate("size", idx, f["largest_size"], None), _Candidate("location", idx, f["largest_location"], None)]

    layout = slide.layout(pack_size)
    k, ps = pack_size, slide.cell_size
    ox, oy = slide.origin
    cell = layout.pack_cell.numpy()  # [P, 2] (row, col)
    counts = np.zeros((layout.num_packs, nc), np.int64)
    np.add.at(counts, (layout.patch_pack.numpy(), slide.labels.numpy()), 1)
    inset = ps // 4

    def box(r0, c0, r1, c1):  # pack rows r0..r1, cols c0..c1 inclusive -> level-0 box
        return [int(v) for v in (ox + c0 * k * ps + inset, oy + r0 * k * ps + inset,
                                 ox + (c1 + 1) * k * ps - inset, oy + (r1 + 1) * k * ps - inset)]

    total = counts.sum(1)
    top = counts.argmax(1)
    for p in np.nonzero((total >= MIN_PACK_PATCHES) & (2 * counts.max(1) > total))[0]:
        r, c = cell[p]
        out.append(_Candidate("patch_class", idx, TISSUE_CLASSES[top[p]], box(r, c, r, c)))

    grid = np.zeros((cell[:, 0].max() + 1, cell[:, 1].max() + 1, nc), np.int64)
    grid[cell[:, 0], cell[:, 1]] = counts
    integral = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0)))
    tumor_packs = np.nonzero(counts[:, TUMOR] + counts[:, MARGIN] > 0)[0]
    for j in range(roi_boxes):  # half the boxes near tumour, when there is any
        anchor = rng.choice(tumor_packs) if len(tumor_packs) and j % 2 == 0 else rng.integers(layout.num_packs)
        bh, bw = rng.integers(2, 6, 2)
        r0 = int(np.clip(cell[anchor, 0] - rng.integers(0, bh), 0, max(0, grid.shape[0] - bh)))
        c0 = int(np.clip(cell[anchor, 1] - rng.integers(0, bw), 0, max(0, grid.shape[1] - bw)))
        r1, c1 = min(grid.shape[0], r0 + bh) - 1, min(grid.shape[1], c0 + bw) - 1
        cnt = (integral[r1 + 1, c1 + 1] - integral[r0, c1 + 1] - integral[r1 + 1, c0] + integral[r0, c0])
        if cnt.sum() < 0.3 * (r1 - r0 + 1) * (c1 - c0 + 1) * k * k or ((cnt > 0) & (cnt < MIN_PRESENT)).any():
            continue
        region = box(r0, c0, r1, c1)
        present = tuple(TISSUE_CLASSES[i] for i in range(nc) if cnt[i] >= MIN_PRESENT)
        out.append(_Candidate("roi_classes", idx, present, region))
        out.append(_Candidate("roi_margin", idx, "yes" if cnt[MARGIN] >= MIN_PRESENT else "no", region))
    return f, out


def _balanced_pick(rng, cands: list[_Candidate], quota: int, max_repeat: int) -> list[_Candidate]:
    """Round-robin over answers (each answer group in random order; a candidate used at most max_repeat times)."""
    groups = defaultdict(list)
    for c in cands:
        groups[c.answer].append(c)
    keys = sorted(groups, key=str)
    order = [list(rng.permutation(len(groups[a]))) for a in keys]
    uses = [0] * len(keys)
    picked = []
    while len(picked) < quota and keys:
        for g in rng.permutation(len(keys)):
            if len(picked) >= quota:
                break
            a = keys[g]
            n = len(groups[a])
            if uses[g] >= n * max_repeat:
                continue
            if uses[g] % n == 0 and uses[g]:
                order[g] = list(rng.permutation(n))
            picked.append(groups[a][order[g][uses[g] % n]])
            uses[g] += 1
        if all(uses[g] >= len(groups[keys[g]]) * max_repeat for g in range(len(keys))):
            break
    return picked


# ---- records -------------------------------------------------------------------------------
def _letters(options) -> str:
    return "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


def _record(rng, fam: Family, cand: _Candidate, form: str, slide_rel: str, rec_id: str, facts: dict) -> dict:
    question = fam.questions[int(rng.integers(len(fam.questions)))]
    options = None
    if form == "single_choice":
        options = [fam.options[i] for i in rng.permutation(len(fam.options))]
        answer = cand.answer
        prompt = f"{question}\nOptions:\n{_letters(options)}\nAnswer with the option text."
        reply = answer
    elif form == "multi_choice":
        options = [fam.options[i] for i in rng.permutation(len(fam.options))]
        answer = [o for o in options if o in cand.answer]
        prompt = f"{question}\nOptions:\n{_letters(options)}\nSelect all that apply; answer with the option texts separated by commas."
        reply = ", ".join(answer)
    elif form == "open":
        if fam.name == "count":
            answer = str(facts["num_nodules"])
        elif fam.name == "roi_classes":
            answer = ", ".join(c for c in TISSUE_CLASSES if c in cand.answer)
        else:
            answer = cand.answer
        prompt = f"{question}\nAnswer briefly."
        reply = answer
    else:
        raise ValueError(f"unknown form {form!r}")
    return {"id": rec_id, "slide": slide_rel, "scale": fam.scale, "region": cand.region, "type": form,
            "family": fam.name, "question": question, "options": options, "answer": answer,
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": reply}]}


def _relative(paths: Sequence[Path], root) -> list[str]:
    if root is None:
        root = os.path.commonpath([str(Path(p).resolve().parent) for p in paths])
    return [os.path.relpath(Path(p).resolve(), Path(root).resolve()) for p in paths]


def _candidates_job(job: tuple) -> tuple[dict, list[_Candidate]]:
    i, path, seed, pack_size, roi_boxes = job
    return _slide_candidates(i, path, pack_size, np.random.default_rng([seed, 7, i]), roi_boxes)


def _load_all(slide_paths, seed, pack_size, roi_boxes, workers: int = 1):
    from topopack.model.parallel import parallel_map

    paths = [Path(p) for p in slide_paths]
    if not paths:
        raise VQAError("no slide paths given")
    jobs = [(i, p, seed, pack_size, roi_boxes) for i, p in enumerate(paths)]
    facts, cands = [], []
    for f, c in parallel_map(_candidates_job, jobs, workers, desc="read slides", show=len(paths) > 100):
        facts.append(f)
        cands += c
    return paths, facts, cands


def generate_vqa(slide_paths: Iterable, seed: int = 0, per_slide: int = 12,
                 kinds: Sequence[str] = ("single_choice", "multi_choice", "open"), *, families: Sequence[str] | None = None,
                 pack_size: int = 3, root=None, max_repeat: int = 3, roi_boxes: int = 60,
                 workers: int = 1) -> list[dict]:
    """About ``per_slide`` * len(slides) balanced records; one third per scale, split evenly among its families.

    ``root``: directory the ``slide`` paths are relative to (default: the slides' common parent).
    """
    bad = set(kinds) - {"single_choice", "multi_choice", "open"}
    if bad:
        raise VQAError(f"unknown kinds {sorted(bad)}; choose from single_choice, multi_choice, open")
    names = list(families or FAMILIES)
    unknown = set(names) - set(FAMILIES)
    if unknown:
        raise VQAError(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    fams = [FAMILIES[n] for n in names if set(FAMILIES[n].forms) & set(kinds)]
    paths, facts, cands = _load_all(slide_paths, seed, pack_size, roi_boxes, workers)
    rels = _relative(paths, root)
    rng = np.random.default_rng([seed, 11])
    total = per_slide * len(paths)
    scales = sorted({f.scale for f in fams}, key=SCALES.index)
    by_family = defaultdict(list)
    for c in cands:
        by_family[c.family].append(c)
    records, counters = [], Counter()
    for fam in fams:
        n_in_scale = sum(f.scale == fam.scale for f in fams)
        quota = max(1, round(total / len(scales) / n_in_scale))
        forms = [k for k in fam.forms if k in kinds]
        per_answer = defaultdict(lambda: int(rng.integers(len(forms))))  # forms cycle within each answer
        for cand in _balanced_pick(rng, by_family[fam.name], quota, max_repeat):
            form = forms[per_answer[cand.answer] % len(forms)]
            per_answer[cand.answer] += 1
            stem = paths[cand.slide].stem
            counters[stem] += 1
            rec_id = f"{stem}-{fam.scale.lower()}-{counters[stem]}"
            records.append(_record(rng, fam, cand, form, rels[cand.slide], rec_id, facts[cand.slide]))
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def _caption_text(scale: str, cand: _Candidate | None, facts: dict) -> str:
    if scale == "WSI":
        present = [c for c in TISSUE_CLASSES if facts["class_counts"].get(c, 0) >= MIN_PRESENT]
        if facts["has_tumor"]:
            n = facts["num_nodules"]
            head = (f"Liver tissue with {n} tumor nodule{'s' if n > 1 else ''}; the largest is {facts['largest_size']} "
                    f"and lies in the {facts['largest_location']} part of the slide.")
        else:
            head = "Liver tissue without tumor."
        return f"{head} Tissue present: {', '.join(present)}."
    if scale == "ROI":
        return f"This region contains {', '.join(cand.answer)}."
    return f"This region shows {cand.answer}."


def generate_captions(slide_paths: Iterable, seed: int = 0, *, per_slide: int = 5, pack_size: int = 3, root=None,
                      roi_boxes: int = 30, workers: int = 1) -> list[dict]:
    """Caption records for connector pretraining: per slide one WSI caption, the rest split over ROI and Patch."""
    paths, facts, cands = _load_all(slide_paths, seed, pack_size, roi_boxes, workers)
    rels = _relative(paths, root)
    rng = np.random.default_rng([seed, 13])
    n_rest = max(0, per_slide - 1) * len(paths)
    picks = [("WSI", None, i) for i in range(len(paths))]
    roi = _balanced_pick(rng, [c for c in cands if c.family == "roi_classes"], n_rest // 2, 1)
    patch = _balanced_pick(rng, [c for c in cands if c.family == "patch_class"], n_rest - n_rest // 2, 1)
    picks += [("ROI", c, c.slide) for c in roi] + [("Patch", c, c.slide) for c in patch]
    prompts = {"WSI": ("Describe this slide.", "Give a short description of the whole slide."),
               "ROI": ("Describe this region.", "What does this region show?"),
               "Patch": ("Describe this region.", "What does this region show?")}
    records, counters = [], Counter()
    for scale, cand, i in picks:
        stem = paths[i].stem
        counters[stem] += 1
        text = _caption_text(scale, cand, facts[i])
        q = prompts[scale][int(rng.integers(2))]
        records.append({"id": f"{stem}-cap-{counters[stem]}", "slide": rels[i], "scale": scale,
                        "region": None if cand is None else cand.region, "type": "caption", "family": "caption",
                        "question": q, "options": None, "answer": text,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": text}]})
    order = rng.permutation(len(records))
    return [records[i] for i in order]


# ---- files ---------------------------------------------------------------------------------
def write_json(path, records: list[dict]) -> Path:
    """Write records as one JSON list (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)
    return path


def slide_path(json_path, record: dict) -> Path:
    """The slide file of ``record``, resolved against the JSON file's directory."""
    return Path(json_path).parent / record["slide"]


def _check(cond, where, msg):
    if not cond:
        raise VQAError(f"{where}: {msg}")


def validate_record(rec, where: str = "record") -> None:
    """Raise VQAError naming ``where`` and the problem if ``rec`` breaks the schema."""
    _check(isinstance(rec, dict), where, f"must be an object, got {type(rec).__name__}")
    where = f"{where} (id {rec.get('id')!r})"
    for key in ("id", "slide", "scale", "region", "type", "question", "options", "answer", "conversations"):
        _check(key in rec, where, f"missing key '{key}'")
    _check(isinstance(rec["id"], str) and rec["id"], where, "'id' must be a non-empty string")
    _check(isinstance(rec["slide"], str) and rec["slide"], where, "'slide' must be a non-empty path string")
    _check(rec["scale"] in SCALES, where, f"'scale' must be one of {SCALES}, got {rec['scale']!r}")
    _check(rec["type"] in TYPES, where, f"'type' must be one of {TYPES}, got {rec['type']!r}")
    region = rec["region"]
    if region is not None:
        ok = (isinstance(region, list) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region)
              and all(math.isfinite(v) for v in region))
        _check(ok, where, f"'region' must be null or [x0, y0, x1, y1] numbers, got {region!r}")
        _check(region[0] < region[2] and region[1] < region[3], where, f"'region' must have x0 < x1 and y0 < y1, got {region}")
    _check(region is not None or rec["scale"] == "WSI", where, f"scale {rec['scale']} needs a 'region' box")
    opts, ans, typ = rec["options"], rec["answer"], rec["type"]
    if typ in ("single_choice", "multi_choice"):
        _check(isinstance(opts, list) and len(opts) >= 2 and all(isinstance(o, str) for o in opts), where,
               "'options' must be a list of at least 2 strings")
        _check(len(set(opts)) == len(opts), where, f"'options' has duplicates: {opts}")
        if typ == "single_choice":
            _check(isinstance(ans, str) and ans in opts, where, f"'answer' {ans!r} is not one of the options {opts}")
        else:
            _check(isinstance(ans, list) and all(a in opts for a in ans), where,
                   f"multi_choice 'answer' must be a list of option strings, got {ans!r}")
            _check(len(set(ans)) == len(ans), where, f"'answer' has duplicates: {ans}")
    else:
        _check(opts is None, where, f"'options' must be null for type {typ}")
        _check(isinstance(ans, str) and ans, where, "'answer' must be a non-empty string")
    conv = rec["conversations"]
    _check(isinstance(conv, list) and len(conv) == 2 and all(isinstance(t, dict) for t in conv), where,
           "'conversations' must be a list of 2 turns")
    _check(conv[0].get("from") == "human" and conv[1].get("from") == "gpt", where,
           "'conversations' must be [human, gpt]")
    _check(isinstance(conv[0].get("value"), str) and conv[0]["value"].startswith("<image>"), where,
           "the human turn must start with '<image>'")
    _check(isinstance(conv[1].get("value"), str) and conv[1]["value"], where, "the gpt turn must be a non-empty string")


def load_vqa(path, check_slides: bool = True) -> list[dict]:
    """Read and validate a VQA / caption JSON file (unique ids; slide files exist when ``check_slides``)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except OSError as e:
        raise VQAError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise VQAError(f"{path}: not valid JSON ({e})") from None
    _check(isinstance(records, list), path, f"must hold a JSON list of records, got {type(records).__name__}")
    seen = set()
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        validate_record(rec, where)
        _check(rec["id"] not in seen, where, f"duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        if check_slides:
            _check(slide_path(path, rec).is_file(), where, f"slide file {rec['slide']!r} not found next to {path.name}")
    return records


def chance_accuracy(records: Sequence[dict]) -> float:
    """Mean 1 / len(options) over single-choice records (nan if there are none)."""
    vals = [1.0 / len(r["options"]) for r in records if r["type"] == "single_choice"]
    return float(np.mean(vals)) if vals else float("nan")


def answer_stats(records: Sequence[dict]) -> dict:
    """Per family (single choice): answer counts, chance, and the best blind guess's accuracy from the question text."""
    out = {}
    by_fam = defaultdict(list)
    for r in records:
        if r["type"] == "single_choice":
            by_fam[r.get("family", r["question"])].append(r)
    for fam, recs in sorted(by_fam.items()):
        by_text = defaultdict(Counter)
        for r in recs:
            by_text[r["question"]][r["answer"]] += 1
        blind = sum(c.most_common(1)[0][1] for c in by_text.values()) / len(recs)
        out[fam] = {"n": len(recs), "answers": dict(Counter(r["answer"] for r in recs)),
                    "chance": chance_accuracy(recs), "blind_majority": blind}
    return out


def make_vqa_files(slide_dir, out_dir=None, *, seed: int = 0, per_slide: int = 12, heldout: float = 0.2,
                   captions_per_slide: int = 5, pack_size: int = 3, workers: int = 1, **kwargs) -> dict[str, Path]:
    """Write vqa_train.json, vqa_test.json (held-out slides, see topopack.io.split_slides) and captions.json
    (training slides) into ``out_dir`` (default: ``slide_dir``); slide paths are relative to it."""
    out_dir = Path(out_dir or slide_dir)
    train, test = split_slides(find_slides(slide_dir), heldout)
    files = {"train": write_json(out_dir / "vqa_train.json",
                                 generate_vqa(train, seed, per_slide, pack_size=pack_size, root=out_dir,
                                              workers=workers, **kwargs)),
             "captions": write_json(out_dir / "captions.json",
                                    generate_captions(train, seed, per_slide=captions_per_slide, pack_size=pack_size,
                                                      root=out_dir, workers=workers))}
    if test:
        files["test"] = write_json(out_dir / "vqa_test.json",
                                   generate_vqa(test, seed + 1, per_slide, pack_size=pack_size, root=out_dir,
                                                workers=workers, **kwargs))
    return files
