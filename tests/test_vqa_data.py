"""model/vqa_data: answers follow the labels, answers are balanced, the schema is enforced."""
import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from topopack.io import load_slide
from topopack.model.vqa_data import (FAMILIES, MIN_PRESENT, VQAError, answer_stats, chance_accuracy, generate_captions,
                                     generate_vqa, load_vqa, make_vqa_files, slide_path, validate_record, write_json)
from topopack.model.synth import TISSUE_CLASSES, TUMOR, write_synthetic

K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = write_synthetic(root, 18, seed=3, min_patches=300, max_patches=1200, dim=8, progress=False)
    records = generate_vqa(paths, seed=0, per_slide=12)
    return root, paths, records


def patches_in(slide, region):
    """Brute force: patches whose level-0 square intersects the box."""
    x0, y0, x1, y1 = region
    x, y, ps = slide.coords[:, 0], slide.coords[:, 1], slide.patch_size
    return (x < x1) & (x + ps > x0) & (y < y1) & (y + ps > y0)


def packs_in(slide, region):
    """Brute force: packs whose level-0 square (origin + pack_cell * k * ps, side k * ps) intersects the box."""
    lay = slide.layout(K)
    ox, oy = slide.coords.min(0).values
    side = K * slide.patch_size
    px, py = ox + lay.pack_cell[:, 1] * side, oy + lay.pack_cell[:, 0] * side
    x0, y0, x1, y1 = region
    return ((px < x1) & (px + side > x0) & (py < y1) & (py + side > y0)).nonzero()[:, 0]


def test_schema_and_answers_follow_labels(data):
    root, paths, records = data
    slides = {p.name: load_slide(p) for p in paths}
    assert len({r["id"] for r in records}) == len(records)
    seen = Counter()
    for i, r in enumerate(records):
        validate_record(r, f"record {i}")
        s = slides[r["slide"]]
        fam = r["family"]
        seen[(r["scale"], r["type"])] += 1
        if r["type"] == "single_choice":
            assert sorted(r["options"]) == sorted(FAMILIES[fam].options)
            assert r["conversations"][1]["value"] == r["answer"]
            for j, o in enumerate(r["options"]):
                assert f"\n{chr(65 + j)}. {o}" in r["conversations"][0]["value"]
        if r["region"] is None:
            f = s.facts
            has_tumor = bool((s.labels == TUMOR).any())
            expect = {"tumor": "yes" if has_tumor else "no",
                      "count": ("0", "1", "2", "3 or more")[min(3, f["num_nodules"])] if r["type"] != "open"
                      else str(f["num_nodules"]),
                      "size": f["largest_size"], "location": f["largest_location"]}[fam]
            assert r["answer"] == expect, r
            continue
        inside = patches_in(s, r["region"])
        # the box covers whole packs: the patches it touches are exactly those of the packs it touches
        packs = packs_in(s, r["region"])
        assert torch.equal(inside.nonzero()[:, 0], torch.isin(s.layout(K).patch_pack, packs).nonzero()[:, 0])
        counts = torch.bincount(s.labels[inside], minlength=len(TISSUE_CLASSES))
        if fam == "patch_class":
            assert len(packs) == 1 and r["scale"] == "Patch"
            assert r["answer"] == TISSUE_CLASSES[int(counts.argmax())] and 2 * counts.max() > counts.sum()
        else:
            assert r["scale"] == "ROI" and len(packs) >= 2
            assert not ((counts > 0) & (counts < MIN_PRESENT)).any()
            present = [c for c, n in zip(TISSUE_CLASSES, counts.tolist()) if n >= MIN_PRESENT]
            if fam == "roi_margin":
                assert r["answer"] == ("yes" if "tumor margin" in present else "no")
            elif r["type"] == "multi_choice":
                assert r["answer"] == [o for o in r["options"] if o in present]
                assert r["conversations"][1]["value"] == ", ".join(r["answer"])
            else:
                assert r["answer"] == ", ".join(present)
    assert {k for k in seen} == {("WSI", "single_choice"), ("WSI", "open"), ("ROI", "single_choice"), ("ROI", "open"),
                                 ("ROI", "multi_choice"), ("Patch", "single_choice"), ("Patch", "open")}
    scales = Counter(r["scale"] for r in records)
    assert max(scales.values()) - min(scales.values()) <= 3


def test_answer_balance_and_blind_guessing(data, tmp_path):
    _, paths, records = data
    stats = answer_stats(records)
    for fam in ("tumor", "count", "size", "roi_margin", "patch_class"):
        counts = stats[fam]["answers"]
        assert set(counts) == set(FAMILIES[fam].options), (fam, counts)
        assert max(counts.values()) - min(counts.values()) <= 2, (fam, counts)
    # a blind guesser fitted on one set (question text + option order) scores near chance on other slides
    other = write_synthetic(tmp_path, 18, seed=4, min_patches=300, max_patches=1200, dim=8, progress=False)
    test = [r for r in generate_vqa(other, seed=1, per_slide=12) if r["type"] == "single_choice"]
    train = [r for r in records if r["type"] == "single_choice"]
    by_text, by_pos = defaultdict(Counter), defaultdict(Counter)
    for r in train:
        by_text[r["question"]][r["answer"]] += 1
        by_pos[r["question"]][r["options"].index(r["answer"])] += 1
    text_acc = np.mean([by_text[r["question"]].most_common(1)[0][0] == r["answer"] for r in test])
    pos_acc = np.mean([r["options"].index(r["answer"]) == by_pos[r["question"]].most_common(1)[0][0] for r in test])
    chance = chance_accuracy(test)
    assert text_acc < chance + 0.1 and pos_acc < chance + 0.1, (text_acc, pos_acc, chance)
    # options really are shuffled
    assert len({tuple(r["options"]) for r in train if r["family"] == "patch_class"}) > 5


def test_captions_and_files(data, tmp_path):
    root, paths, _ = data
    caps = generate_captions(paths[:4], seed=0, per_slide=5)
    assert len(caps) == 20 and {c["type"] for c in caps} == {"caption"}
    for c in caps:
        validate_record(c)
        if c["scale"] == "WSI":
            f = load_slide(root / c["slide"]).facts
            assert ("without tumor" in c["answer"]) == (not f["has_tumor"])
            if f["has_tumor"]:
                assert f"{f['num_nodules']} tumor nodule" in c["answer"] and f["largest_location"] in c["answer"]
    files = make_vqa_files(root, tmp_path / "out", seed=0, per_slide=4, heldout=0.2)
    train, test = load_vqa(files["train"]), load_vqa(files["test"])
    assert load_vqa(files["captions"])
    train_slides, test_slides = {r["slide"] for r in train}, {r["slide"] for r in test}
    assert not train_slides & test_slides and len(test_slides) == 4
    assert slide_path(files["train"], train[0]).resolve() == (root / train[0]["slide"].split("/")[-1]).resolve()


def test_chance_accuracy_by_hand():
    recs = [{"type": "single_choice", "options": ["a", "b"]}, {"type": "single_choice", "options": list("abcd")},
            {"type": "open", "options": None}]
    assert chance_accuracy(recs) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert np.isnan(chance_accuracy(recs[2:]))


@pytest.mark.parametrize("mutate,pattern", [
    (lambda r: r.pop("scale"), r"missing key 'scale'"),
    (lambda r: r.update(scale="Tile"), r"'scale' must be one of"),
    (lambda r: r.update(type="essay"), r"'type' must be one of"),
    (lambda r: r.update(answer="maybe"), r"'answer' 'maybe' is not one of the options"),
    (lambda r: r.update(options=["yes", "yes"]), r"duplicates"),
    (lambda r: r.update(region=[10, 0, 5, 20], scale="ROI"), r"x0 < x1"),
    (lambda r: r.update(region=[1, 2, 3]), r"'region' must be null or \[x0, y0, x1, y1\]"),
    (lambda r: r.update(scale="Patch"), r"needs a 'region' box"),
    (lambda r: r["conversations"][0].update(value="no image"), r"must start with '<image>'"),
    (lambda r: r.update(conversations=r["conversations"][:1]), r"list of 2 turns"),
    (lambda r: r.update(type="open"), r"'options' must be null"),
    (lambda r: r.update(slide="missing.h5"), r"slide file 'missing.h5' not found"),
])
def test_schema_errors(data, tmp_path, mutate, pattern):
    root, paths, records = data
    good = next(r for r in records if r["type"] == "single_choice" and r["family"] == "tumor")
    bad = json.loads(json.dumps(good))
    bad["id"] += "-bad"
    mutate(bad)
    path = write_json(root / "bad.json", [good, bad])
    with pytest.raises(VQAError) as info:
        load_vqa(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: record 1") and re.search(pattern, msg), msg


def test_file_level_errors(data):
    root, _, records = data
    (root / "broken.json").write_text("[{")
    with pytest.raises(VQAError, match=r"broken\.json: not valid JSON"):
        load_vqa(root / "broken.json")
    (root / "obj.json").write_text("{}")
    with pytest.raises(VQAError, match=r"obj\.json: must hold a JSON list"):
        load_vqa(root / "obj.json")
    path = write_json(root / "dup.json", [records[0], records[0]])
    with pytest.raises(VQAError, match=r"dup\.json: record 1: duplicate id"):
        load_vqa(path)
    with pytest.raises(VQAError, match="unknown families"):
        generate_vqa([], families=["nope"])
