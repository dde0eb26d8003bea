"""Finetuning end to end on tiny synthetic slides: stages, frozen encoder, resume, --llm checkpoints, eval, ask."""
import json

import pytest
import torch
from worlds import finetune_world

from topopack.model.encoder import load_encoder
from topopack.model.finetune import finetune
from topopack.model.model_dir import load_model
from topopack.model.records import load_records, turn
from topopack.model.summaries import SummaryCache
from topopack.model.llm import LoraSettings, TinyLlamaConfig, build_default_llm, build_tokenizer, save_llm
from topopack.model.qformer import QFormerConfig
from topopack.model.regions import RegionError

SMALL = dict(qformer_cfg=QFormerConfig(dim=16, num_queries=4, depth=1, heads=2, anchors=2),
             tiny=TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
             lora=LoraSettings(r=4, alpha=8), batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return finetune_world(tmp_path_factory.mktemp("ft"))


def test_stages_eval_and_ask(world, capfd):
    from topopack.model.cli import main as cli
    from topopack.model.ask import ask
    from topopack.model.evaluate import evaluate

    root, data, enc = world
    conn = finetune("connector", data, enc, root / "conn", steps=2, **SMALL)
    assert len(conn["history"]) == 2
    m = json.loads((root / "conn" / "model.json").read_text())
    assert m["stage"] == "connector" and "adapter" not in m and (root / "conn" / "llm" / "config.json").exists()
    vqa = finetune("vqa", data, enc, root / "vqa", init=root / "conn", steps=3, **SMALL)
    assert len(vqa["history"]) == 3
    vlm, encoder, meta = load_model(root / "vqa")
    assert meta["adapter"] == "adapter" and meta["stage"] == "vqa"
    # the Q-Former continued from the connector run, and trained further
    q_conn = torch.load(root / "conn" / "qformer.pt")["model"]["queries"]
    assert not torch.equal(q_conn, vlm.qformer.queries.detach())
    # the slide encoder is frozen: identical to the one given
    ref = load_encoder(enc)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), encoder.state_dict().values()))
    metrics = evaluate(root / "vqa", data, root / "eval")
    assert set(metrics["scales"]) == {"WSI", "ROI", "Patch"}
    values = [v for m in metrics["scales"].values() for k, v in m.items() if not k.startswith("n_") and v is not None]
    assert values and all(0 <= v <= 1 for v in values)
    saved = json.loads((root / "eval" / "metrics.json").read_text())["eval"]
    assert saved["scales"] == metrics["scales"] and (root / "eval" / "eval.md").read_text().startswith("| level")
    recs = load_records(data, "eval")
    i, rec = next((i, r) for i, r in enumerate(recs) if r["region"] is not None)
    # ask answers a record exactly as eval's batched, left-padded generation did
    pred = json.loads((root / "eval" / "predictions.jsonl").read_text().splitlines()[i])
    assert pred["question_id"] == rec["id"] and pred["ground_truth"] == rec["answer"]
    assert ask(rec["slide"], turn(rec)[0], rec["region"], model=root / "vqa") == pred["prediction"]
    ask_args = ["ask", rec["slide"], "Is there a tumor in this slide?", "--model", str(root / "vqa"),
                "--region", ",".join(str(v) for v in rec["region"]), "--sample", "--seed", "1"]
    capfd.readouterr()
    assert cli(ask_args) == 0
    first = capfd.readouterr()
    assert cli(ask_args) == 0  # seeded sampling repeats
    assert capfd.readouterr().out == first.out
    # the answer alone on stdout, nothing from transformers/peft/tqdm on stderr
    assert len(first.out.splitlines()) == 1 and first.err == ""
    with pytest.raises(SystemExit, match="2"):
        cli(["ask", rec["slide"], "q", "--model", str(root / "vqa"), "--max-new-tokens", "0"])
    with pytest.raises(RegionError, match="intersects no tissue"):
        ask(rec["slide"], "What tissue?", [-900, -900, -800, -800], model=root / "vqa")


def test_summary_cache_encodes_each_slide_once(world):
    root, data, enc = world
    encoder = load_encoder(enc)
    calls = []
    encoder.register_forward_hook(lambda *a: calls.append(1))
    cache = SummaryCache(encoder)
    recs = load_records(data, "vqa")
    for r in recs:
        mem, pos = cache.region(r["slide"], r["region"])
        assert mem.shape[0] == pos.shape[0] >= 1
    assert len(calls) == len({r["slide"] for r in recs})
    whole = cache.region(recs[0]["slide"])[0]
    assert whole.shape[0] == cache.get(recs[0]["slide"]).layout.num_packs


def test_resume_matches_uninterrupted(world):
    root, data, enc = world
    kw = dict(SMALL, steps=4, train_kw={"ckpt_every": 2})
    full = finetune("vqa", data, enc, root / "r_full", **kw)
    finetune("vqa", data, enc, root / "r_cut", stop_after=2, **kw)
    resumed = finetune("vqa", data, enc, root / "r_cut", resume=True, **kw)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-5)


def test_local_hf_checkpoint_through_llm(world, tmp_path):
    """A tiny HF model saved with save_pretrained trains through --llm (CLI) and generates."""
    from topopack.model.cli import main as cli

    root, data, enc = world
    tok = build_tokenizer([t["conversations"][0]["value"] for t in load_records(data, "vqa")])
    save_llm(tmp_path / "hf", build_default_llm(tok, SMALL["tiny"], seed=1), tok)
    out = tmp_path / "model"
    rc = cli(["finetune", "--stage", "vqa", "--data", str(data), "--encoder", str(enc), "--out", str(out),
              "--llm", str(tmp_path / "hf"), "--steps", "2", "--batch-size", "2", "--qformer-num-queries", "4",
              "--qformer-dim", "16", "--qformer-heads", "2", "--qformer-anchors", "2", "--lora-r", "4",
              "--lora-alpha", "8"])
    assert rc == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["llm"] == str((tmp_path / "hf").resolve()) and not (out / "llm").exists()
    from topopack.model.ask import Assistant
    from topopack.model.evaluate import evaluate

    evaluate(out, data, tmp_path / "eval", limit=1)
    pred = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    rec = load_records(data, "eval")[0]
    assert Assistant(out)(rec["slide"], turn(rec)[0], rec["region"]) == pred["prediction"]


def test_bad_inputs_name_the_problem(world, tmp_path):
    root, data, enc = world
    with pytest.raises(FileNotFoundError, match="captions.json"):
        finetune("connector", tmp_path, enc, tmp_path / "x", steps=1, **SMALL)
    with pytest.raises(FileNotFoundError, match="not a local checkpoint"):
        finetune("vqa", data, enc, tmp_path / "y", llm=tmp_path / "nope", steps=1, **SMALL)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)


def test_family_sampling_weights(world):
    from topopack.model.records import sample_weights

    recs = load_records(world[1], "vqa")
    w = sample_weights(recs, "family")
    per_family = {}
    for r, x in zip(recs, w.tolist()):
        per_family[r["family"]] = per_family.get(r["family"], 0.0) + x
    assert len(per_family) > 1 and all(v == pytest.approx(1.0) for v in per_family.values())
    assert torch.equal(sample_weights(recs, "uniform"), torch.ones(len(recs), dtype=torch.float64))
    with pytest.raises(ValueError, match="sampling"):
        sample_weights(recs, "bogus")


def test_memory_tokens_are_summary_then_raw_pack_mean(world):
    """A pack's memory token = the encoder's summary token, then the mean of the pack's input patch features
    (checked against a loop over the patches)."""
    from topopack.io import load_slide

    root, data, enc = world
    encoder = load_encoder(enc)
    cache = SummaryCache(encoder)
    path = load_records(data, "vqa")[0]["slide"]
    e = cache.get(path)
    s = load_slide(path)
    d = encoder.cfg.dim
    assert cache.memory_dim(path) == d + s.features.shape[1]
    layout = e.layout
    with torch.no_grad():
        ref = encoder(s.features[None], layout).summaries[0]
    torch.testing.assert_close(e.summaries[:, :d], ref.float())
    for p in range(layout.num_packs):
        members = [i for i in range(layout.num_patches) if int(layout.patch_pack[i]) == p]
        torch.testing.assert_close(e.summaries[p, d:], s.features[members].float().mean(0))


def test_family_weights_scale_a_familys_share(world):
    from topopack.model.records import parse_family_weights, sample_weights

    recs = load_records(world[1], "vqa")
    fams = sorted({r["family"] for r in recs})
    fw = {fams[0]: 3.0, fams[1]: 0.5}
    w = sample_weights(recs, "family", fw)
    share = {}
    for r, x in zip(recs, w.tolist()):
        share[r["family"]] = share.get(r["family"], 0.0) + x
    assert share == pytest.approx({f: fw.get(f, 1.0) for f in fams})
    assert parse_family_weights(f"{fams[0]}=3, {fams[1]}=0.5") == fw
    with pytest.raises(ValueError, match="not in the data"):
        sample_weights(recs, "family", {"bogus": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        sample_weights(recs, "family", {fams[0]: 0.0})
    with pytest.raises(ValueError, match="FAMILY=WEIGHT"):
        parse_family_weights("location:3")


def test_patch_size_flag_reads_files_without_the_attribute(world, tmp_path):
    """A slide file whose patch size is unknown loads with --patch-size (SummaryCache(patch_size=...)) and gives the
    same memory tokens as the original file; without it the error asks for the flag."""
    import h5py

    from topopack.io import SlideError, load_slide

    root, data, enc = world
    src = load_records(data, "vqa")[0]["slide"]
    s = load_slide(src)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f["features"], f["coords"] = s.features.numpy(), s.coords.numpy()
    with pytest.raises(SlideError, match="--patch-size"):
        SummaryCache(load_encoder(enc)).get(bare)
    got = SummaryCache(load_encoder(enc), patch_size=s.patch_size).region(bare)[0]
    torch.testing.assert_close(got, SummaryCache(load_encoder(enc)).region(src)[0])


def test_grad_ckpt_and_max_length_flags(world, tmp_path):
    """--grad-ckpt trains to the same losses (checkpointing recomputes, it does not change the math); --max-length
    cuts overlong samples and says how many in metrics.json."""
    root, data, enc = world
    kw = dict(SMALL, steps=2)
    plain = finetune("vqa", data, enc, tmp_path / "plain", **kw)
    ckpt = finetune("vqa", data, enc, tmp_path / "ckpt", grad_ckpt=True, **kw)
    assert [h["loss"] for h in ckpt["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    finetune("vqa", data, enc, tmp_path / "short", max_length=50, **kw)
    m = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert m["truncated"] + m["dropped"] > 0 and m["train_records"] == len(load_records(data, "vqa")) - m["dropped"]


def test_ask_writes_an_evidence_map(world, tmp_path, capfd):
    from topopack.model.cli import main as cli

    root, data, enc = world
    finetune("connector", data, enc, tmp_path / "conn", steps=1, **SMALL)
    rec = next(r for r in load_records(data, "eval") if r["region"] is not None)
    png = tmp_path / "map.png"
    args = ["ask", rec["slide"], turn(rec)[0], "--model", str(tmp_path / "conn"), "--max-new-tokens", "4",
            "--region", ",".join(str(v) for v in rec["region"]), "--evidence", str(png)]
    assert cli(args) == 0
    ev = json.loads(png.with_suffix(".json").read_text())
    assert png.stat().st_size > 1000 and ev["answer"] == capfd.readouterr().out.strip()
    assert abs(sum(ev["weights"]) - 1) < 1e-6 and len(ev["boxes"]) == len(ev["weights"]) >= 1
    with pytest.raises(SystemExit):
        cli(args[:1] + ["--questions", "q.json", "--out", "p.jsonl", "--evidence-method", "magic"])


def test_fill_cache_in_worker_processes_leaves_nothing_to_encode(world, tmp_path):
    from topopack.model.summaries import fill_cache

    root, data, enc = world
    slides = sorted({r["slide"] for r in load_records(data, "vqa")})
    fill_cache(enc, slides, tmp_path / "cache", workers=2)
    encoder = load_encoder(enc)
    calls = []
    encoder.register_forward_hook(lambda *a: calls.append(1))
    cache = SummaryCache(encoder, cache_dir=tmp_path / "cache")
    got = [cache.region(s)[0] for s in slides]
    assert calls == []
    fresh = SummaryCache(load_encoder(enc))
    for s, g in zip(slides, got):
        torch.testing.assert_close(g, fresh.region(s)[0])
