"""The authors' instruction format end to end: JSONL, multi-turn conversations, letter answers, captions without
info and a pre-encoded region file go through finetune (both stages), eval, batch ask and `data check` as they are."""
import json

import pytest
import torch

from topopack.model.cli import main as cli
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, load_encoder, save_encoder
from topopack.model.finetune import finetune
from topopack.model.llm import LoraSettings, TinyLlamaConfig
from topopack.model.qformer import QFormerConfig
from topopack.model.records import RecordError, load_records, read_records
from topopack.model.summaries import SummaryCache, make_samples, write_region_file

SMALL = dict(qformer_cfg=QFormerConfig(dim=16, num_queries=4, depth=1, heads=2, anchors=2),
             tiny=TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
             lora=LoraSettings(r=4, alpha=8), batch_size=4)
FORMAT = {"single_choice": "single", "multi_choice": "multi", "open": "open"}

pytestmark = pytest.mark.usefixtures("one_thread")


def letters(options):
    return "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


def authors_qa(r: dict, image: str, with_region: bool = True) -> dict:
    """One of topopack's generated records as the authors write it: options as lettered lines, letter answers."""
    q = r["question"]
    if r["type"] == "single_choice":
        human, gpt = f"<image>\n{q}\n{letters(r['options'])}", chr(65 + r["options"].index(r["answer"]))
    elif r["type"] == "multi_choice":
        human = f"<image>\n{q}\n{letters(r['options'])}"
        gpt = ", ".join(chr(65 + r["options"].index(a)) for a in r["answer"])
    else:
        human, gpt = f"<image>\n{q}", r["answer"]
    rec = {"id": r["id"], "image": image,
           "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
           "info": {"belong_level": r["scale"], "format": FORMAT[r["type"]], "subcategory": r["family"],
                    "belong_cluster_id": 0}}
    if with_region and r["region"] is not None:
        rec["region"] = r["region"]
    return rec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    from topopack.model.synth import write_synthetic
    from topopack.model.vqa_data import generate_captions, generate_vqa

    root = tmp_path_factory.mktemp("authors")
    slides = write_synthetic(root / "slides", 5, seed=5, min_patches=300, max_patches=400, progress=False)
    torch.manual_seed(0)
    save_encoder(root / "encoder.pt", SlideEncoder(SlideEncoderConfig(in_dim=64, dim=16, depth=1, heads=2, mlp_dim=32)))
    rel = lambda p: f"slides/{p.name}"  # noqa: E731
    train = [r for r in generate_vqa(slides[:3], 0, per_slide=6, root=root)]
    qa = [authors_qa(r, r["slide"]) for r in train]
    # a multi-turn conversation: a follow-up question on the same slide, both answers supervised
    a, b = (r for r in qa if r["image"] == qa[0]["image"] and "region" not in r and r["info"]["format"] != "multi")
    qa.append({"id": "multi-turn-1", "image": a["image"], "info": b["info"],
               "conversations": a["conversations"] + [{"from": "human", "value": b["conversations"][0]["value"]
                                                       .replace("<image>\n", "")}, b["conversations"][1]]})
    # a pre-encoded region file standing for one ROI record's box
    roi = next(r for r in train if r["scale"] == "ROI")
    cache = SummaryCache(load_encoder(root / "encoder.pt"))
    write_region_file(root / "regions" / "roi_0.pt", cache, root / roi["slide"], roi["region"])
    qa.append({**authors_qa(roi, "regions/roi_0.pt", with_region=False), "id": "region-file-1"})
    write_jsonl(root / "qa_train.jsonl", qa)
    caps = generate_captions(slides[:3], 0, per_slide=3, root=root)
    write_jsonl(root / "caption_merged.jsonl",
                [{"id": c["id"], "image": rel(root / c["slide"]), "conversations": c["conversations"],
                  **({"region": c["region"]} if c["region"] else {})} for c in caps])
    test = generate_vqa(slides[3:], 1, per_slide=6, root=root)
    write_jsonl(root / "qa_test.jsonl", [authors_qa(r, r["slide"]) for r in test])
    (root / "qa_test.json").write_text(json.dumps([authors_qa(r, r["slide"]) for r in test]))  # a JSON list too
    return root


def test_records_read_as_written(authors):
    recs = load_records(authors / "qa_train.jsonl", "vqa")
    by_id = {r["id"]: r for r in recs}
    multi = by_id["multi-turn-1"]
    assert len(multi["turns"]) == 2 and multi["info"]["belong_cluster_id"] == 0
    single = next(r for r in recs if r["type"] == "single_choice")
    assert single["answer"] in "ABCDEFGHI" and len(single["options"]) >= 2
    assert load_records(authors / "qa_test.json", "eval") == load_records(authors / "qa_test.jsonl", "eval")
    caps = load_records(authors / "caption_merged.jsonl", "connector")
    assert {r["type"] for r in caps} == {"caption"} and all(r["info"] is None for r in caps)


def test_every_answer_of_a_multi_turn_record_is_supervised(authors):
    from topopack.model.llm import build_tokenizer
    from topopack.model.prompt import IGNORE
    from topopack.model.records import vocabulary_texts

    recs = load_records(authors / "qa_train.jsonl", "vqa")
    multi = next(r for r in recs if r["id"] == "multi-turn-1")
    tok = build_tokenizer(vocabulary_texts(recs))
    (s,) = make_samples([multi], tok, SummaryCache(load_encoder(authors / "encoder.pt")), "plain")
    want = []
    for _, a in multi["turns"]:
        want += tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.labels[s.labels != IGNORE].tolist() == want


def test_region_file_gives_the_tokens_of_its_box(authors):
    cache = SummaryCache(load_encoder(authors / "encoder.pt"))
    recs = {r["id"]: r for r in load_records(authors / "qa_train.jsonl", "vqa")}
    from_file = cache.region(recs["region-file-1"]["slide"])
    src = next(r for r in recs.values() if r["scale"] == "ROI" and r["slide"].endswith(".h5"))
    from_box = cache.region(src["slide"], src["region"])
    torch.testing.assert_close(from_file[0], from_box[0])
    torch.testing.assert_close(from_file[1], from_box[1])


def test_finetune_eval_and_batch_ask_on_the_authors_files(authors, tmp_path):
    enc = authors / "encoder.pt"
    finetune("connector", authors / "caption_merged.jsonl", enc, tmp_path / "conn", steps=2, **SMALL)
    finetune("vqa", authors / "qa_train.jsonl", enc, tmp_path / "vqa", init=tmp_path / "conn", steps=2, **SMALL)
    assert cli(["eval", "--model", str(tmp_path / "vqa"), "--data", str(authors / "qa_test.jsonl"),
                "--out", str(tmp_path / "eval"), "--max-new-tokens", "8"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval"]
    assert set(metrics["scales"]) == {"WSI", "ROI", "Patch"}
    rows = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    test = load_records(authors / "qa_test.jsonl", "eval")
    assert [r["question_id"] for r in rows] == [r["id"] for r in test]
    assert all(r["info"]["belong_level"] in ("WSI", "ROI", "Patch") and "ground_truth" in r for r in rows)
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert all(col in table for col in ("single", "multi", "ROUGE-L", "METEOR", "WSI-P", "WSI-R"))
    # batch ask over the folder of slides: same answers as eval, and eval scores its file to the same metrics
    assert cli(["ask", "--slides", str(authors), "--questions", str(authors / "qa_test.jsonl"),
                "--model", str(tmp_path / "vqa"), "--out", str(tmp_path / "ask" / "predictions.jsonl"),
                "--max-new-tokens", "8"]) == 0
    asked = [json.loads(l) for l in (tmp_path / "ask" / "predictions.jsonl").read_text().splitlines()]
    assert [a["prediction"] for a in asked] == [r["prediction"] for r in rows]
    assert cli(["eval", "--predictions", str(tmp_path / "ask" / "predictions.jsonl")]) == 0
    rescored = json.loads((tmp_path / "ask" / "metrics.json").read_text())["eval"]
    assert rescored["scales"] == metrics["scales"]
    # the LLM judge (any local causal LM; here the embedded tiny one) scores the whole-slide open answers
    judge = tmp_path / "vqa" / "llm"
    assert cli(["eval", "--predictions", str(tmp_path / "ask" / "predictions.jsonl"), "--judge", str(judge),
                "--out", str(tmp_path / "judged")]) == 0
    judged = json.loads((tmp_path / "judged" / "metrics.json").read_text())["eval"]["scales"]
    n_wsi_open = sum(r["info"]["belong_level"] == "WSI" and r["info"]["format"] == "open" for r in rows)
    assert n_wsi_open and judged["WSI"]["n_open_judged"] == n_wsi_open
    assert 0 <= judged["WSI"]["open_wsi_precision"] <= 1 and 0 <= judged["WSI"]["open_wsi_relevance"] <= 1
    assert judged["ROI"].get("open_wsi_precision") is None


def test_questions_without_answers_are_answered_but_not_scored(authors, tmp_path, capsys):
    qs = [json.loads(l) for l in (authors / "qa_test.jsonl").read_text().splitlines()][:3]
    for q in qs:
        q["conversations"] = q["conversations"][:1]
        q["image"] = q["image"].split("/")[-1]  # relative to --slides
    write_jsonl(tmp_path / "q.jsonl", qs)
    finetune("connector", authors / "caption_merged.jsonl", authors / "encoder.pt", tmp_path / "conn", steps=1,
             **SMALL)
    out = tmp_path / "p.jsonl"
    assert cli(["ask", "--slides", str(authors / "slides"), "--questions", str(tmp_path / "q.jsonl"),
                "--model", str(tmp_path / "conn"), "--out", str(out), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["id"] for q in qs] and all("ground_truth" not in r for r in rows)
    capsys.readouterr()
    assert cli(["eval", "--predictions", str(out)]) == 2
    assert "no 'ground_truth'" in capsys.readouterr().err


def test_data_check_counts_and_names_every_bad_record(authors, tmp_path, capsys):
    assert cli(["data", "check", str(authors / "qa_train.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "0 bad" in out and "| WSI |" in out
    good = json.loads((authors / "qa_test.jsonl").read_text().splitlines()[0])
    bad = [good, {**good, "id": "x1", "info": {**good["info"], "belong_level": "slide"}},
           {k: v for k, v in good.items() if k != "image"} | {"id": "x2"},
           {**good, "id": "x3", "conversations": [{"from": "gpt", "value": "A"}]}]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    (tmp_path / "slides").symlink_to(authors / "slides")
    assert cli(["data", "check", str(tmp_path / "bad.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "1 good record(s), 3 bad" in out
    assert "record 1: info.belong_level" in out and "record 2: missing field 'image'" in out
    assert "record 3: conversations[0].from" in out
    with pytest.raises(RecordError, match="3 bad record"):
        load_records(tmp_path / "bad.jsonl", "eval")
    _, errors = read_records(tmp_path / "bad.jsonl")
    assert len(errors) == 3
