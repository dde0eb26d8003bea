"""Evidence maps (model/evidence.py): rollout against hand computations, planted models whose answer can only come
from known packs, gradient x input against finite differences, the JSON, the PNG and the nodule ratio."""
import argparse
import json
import sys

import pytest
import torch

from topopack.model import evidence as E
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, save_encoder
from topopack.model.llm import build_tokenizer
from topopack.model.prompt import encode_conversation
from topopack.model.qformer import QFormer, QFormerConfig, region_positions
from topopack.model.regions import pack_boxes
from topopack.model.summaries import SummaryCache
from topopack.model.vlm import HepatoLLaVA, Sample

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "where is the largest tumor nodule?"
ANSWER = "upper left"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four small synthetic slides (0 and 2 with tumour), a tiny random encoder, its SummaryCache, a tokenizer."""
    from topopack.model.synth import write_synthetic

    root = tmp_path_factory.mktemp("evidence")
    slides = write_synthetic(root / "slides", 4, seed=3, min_patches=300, max_patches=400, progress=False)
    torch.manual_seed(0)
    enc = SlideEncoder(SlideEncoderConfig(in_dim=64, dim=16, depth=1, heads=2, mlp_dim=32))
    save_encoder(root / "encoder.pt", enc)
    tok = build_tokenizer([QUESTION, ANSWER, "is there a tumor in this region ? yes no center"])
    return root, slides, SummaryCache(enc), tok


def tiny_vlm(world, *, depth=1, num_queries=4, sharp=True, planted=False):
    """Q-Former (2 x 2 anchors) + a 1-layer Llama with attention biases. ``sharp``: each anchored query attends
    only to the packs nearest its anchor (and the register). ``planted``: query 0's visual token carries a marker
    (channel 0) and every LLM row attends to the marker, so the answer can only come from query 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, slides, cache, tok = world
    torch.manual_seed(1)
    qf = QFormer(QFormerConfig(enc_dim=cache.memory_dim(slides[0]), llm_dim=32, dim=16, num_queries=num_queries,
                               depth=depth, heads=2, anchors=2))
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        if sharp:
            for layer in qf.layers:
                layer.log_sigma.fill_(-6.0)
        if planted:
            qf.queries[0, 5] += 20.0                    # query 0 stands out along channel 5 ...
            qf.out.weight[0].zero_()
            qf.out.weight[0, 5], qf.out.bias[0] = 1.0, 0.0  # ... which becomes its visual token's channel 0
            llm.model.embed_tokens.weight[:, 0] = 0.0   # text tokens have none of it
            for layer in llm.model.layers:
                a = layer.self_attn
                for t in (a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias):
                    t.zero_()
                for h in range(2):  # dim 7 of a 16-wide head: the slowest RoPE frequency, so position barely matters
                    a.q_proj.bias[h * 16 + 7] = 40.0
                    a.k_proj.weight[h * 16 + 7, 0] = 1.0
    return HepatoLLaVA(qf, llm, tok).eval()


def sample_for(world, slide, box=None, answer=ANSWER):
    _, _, cache, tok = world
    before, after, labels = encode_conversation(tok, [(QUESTION, answer)], "plain")
    mem, pos = cache.region(slide, box)
    return Sample(before, after, labels, mem, pos)


def nearest_packs(anchor_xy, positions):
    """Per anchor, the set of packs nearest to it in region-normalised positions (ties kept)."""
    local = region_positions(positions[None], torch.zeros(1, len(positions), dtype=torch.bool))[0]
    d2 = (local[None] - anchor_xy[:, None]).square().sum(-1)
    return [set((d <= d.min() + 1e-9).nonzero().flatten().tolist()) for d in d2]


# ---- rollout ---------------------------------------------------------------------------
def test_rollout_one_layer_one_head_by_hand():
    """The weights QFormer returns are the hand-computed softmaxes, and the rollout of one layer is half the
    cross-attention to the packs (self-attention before any key is read mixes only the learned queries)."""
    torch.manual_seed(2)
    qf = QFormer(QFormerConfig(enc_dim=6, llm_dim=5, dim=8, num_queries=3, depth=1, heads=1, anchors=0,
                               pos_freqs=0, registers=1)).eval().double()
    mem = torch.randn(1, 4, 6, dtype=torch.float64)
    _, weights = qf(mem, None, None, need_weights=True)
    (self_w, cross_w), = weights
    layer = qf.layers[0]

    def softmax_attn(mha, x, y):
        wq, wk, _ = mha.in_proj_weight.chunk(3)
        bq, bk, _ = mha.in_proj_bias.chunk(3)
        return torch.softmax((x @ wq.T + bq) @ (y @ wk.T + bk).T / 8 ** 0.5, -1)

    with torch.no_grad():
        q0 = qf.queries
        h = layer.norm1(q0)
        s = softmax_attn(layer.self_attn, h, h)
        wv, bv = layer.self_attn.in_proj_weight.chunk(3)[2], layer.self_attn.in_proj_bias.chunk(3)[2]
        q1 = q0 + layer.self_attn.out_proj(s @ (h @ wv.T + bv))
        keys = layer.norm_mem(torch.cat([qf.registers, qf.mem_proj(mem[0])]))
        c = softmax_attn(layer.cross_attn, layer.norm2(q1), keys)
    torch.testing.assert_close(self_w[0, 0], s)
    torch.testing.assert_close(cross_w[0, 0], c)
    torch.testing.assert_close(E.rollout(weights, 1)[0], 0.5 * c[:, 1:])


def test_rollout_two_layers_by_hand():
    """Two layers, two heads: D = 1/4 (I + S2)/2 C1 + 1/2 C2 (head means), registers dropped."""
    g = torch.Generator().manual_seed(3)
    stoch = lambda *s: torch.softmax(torch.randn(*s, generator=g), -1)  # noqa: E731
    s1, c1, s2, c2 = stoch(1, 2, 3, 3), stoch(1, 2, 3, 6), stoch(1, 2, 3, 3), stoch(1, 2, 3, 6)
    mix2 = 0.5 * (torch.eye(3) + s2.mean(1)[0])
    expect = 0.25 * mix2 @ c1.mean(1)[0] + 0.5 * c2.mean(1)[0]
    got = E.rollout([(s1, c1), (s2, c2)], 2)[0]
    torch.testing.assert_close(got, expect[:, 2:].double())


def test_need_weights_keeps_the_output():
    qf = QFormer(QFormerConfig(enc_dim=6, llm_dim=5, dim=8, num_queries=4, depth=2, heads=2, anchors=2)).eval()
    mem, pos = torch.randn(2, 5, 6), torch.rand(2, 5, 2)
    out, weights = qf(mem, None, pos, need_weights=True)
    torch.testing.assert_close(out, qf(mem, None, pos))
    assert len(weights) == 2 and weights[0][1].shape == (2, 2, 4, 1 + 5)


# ---- planted models --------------------------------------------------------------------
@pytest.mark.parametrize("method", E.METHODS)
def test_planted_answer_points_to_its_pack(world, method):
    """The LLM reads only query 0, and query 0 reads only the packs nearest its anchor: all evidence lies there."""
    vlm = tiny_vlm(world, planted=True)
    s = sample_for(world, world[1][0])
    assert E.visual_attention(vlm, s)[0] > 0.999  # the plant holds
    w = E.pack_relevance(vlm, s, method)
    target = sorted(nearest_packs(vlm.qformer.anchor_xy, s.positions)[0])
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
    assert float(w[target].sum()) > 0.999
    assert vlm.llm.config._attn_implementation == "sdpa"  # eager only for the evidence pass


@pytest.mark.parametrize("method", E.METHODS)
def test_sharp_anchors_confine_evidence_to_anchor_packs(world, method):
    """Two layers, every query anchored: only the packs nearest the four anchors are ever attended."""
    vlm = tiny_vlm(world, depth=2, num_queries=4)
    s = sample_for(world, world[1][2])
    w = E.pack_relevance(vlm, s, method)
    anchored = sorted(set().union(*nearest_packs(vlm.qformer.anchor_xy, s.positions)))
    assert len(anchored) < len(w) / 4
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
    assert float(w[anchored].sum()) > 1 - 1e-6


def test_gradient_is_the_log_likelihood_directional_derivative(world):
    """Per pack, |d/de log p(answer | memory with pack p scaled by 1 + e)| at e = 0 by central differences on a
    float64 copy (log-likelihood summed here, not through vlm.forward) equals gradient x input, normalised.
    HF's RMSNorm computes in float32 even in a float64 model, so e = 1e-3 and a 2% tolerance."""
    import copy

    from topopack.io import load_slide

    vlm = tiny_vlm(world, sharp=False)
    ref = copy.deepcopy(vlm).double()
    (cx, cy), side = load_slide(world[1][0]).facts["nodules"][0]["center"], 3 * world[2].get(world[1][0]).cell_size
    s = sample_for(world, world[1][0], [cx - side, cy - side, cx + side, cy + side])  # 4 to 9 packs

    def loglik(mem):
        with torch.no_grad():
            embeds, mask, labels = ref.assemble([Sample(s.before, s.after, s.labels, mem, s.positions.double())])
            logp = ref.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, :-1].log_softmax(-1)
            rows = (labels[0, 1:] != -100).nonzero().flatten()
            return float(logp[rows, labels[0, 1:][rows]].sum())

    eps, fd, mem = 1e-3, [], s.memory.double()
    for p in range(mem.shape[0]):
        up, down = mem.clone(), mem.clone()
        up[p] *= 1 + eps
        down[p] *= 1 - eps
        fd.append(abs(loglik(up) - loglik(down)) / (2 * eps))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert len(fd) >= 3
    torch.testing.assert_close(E.pack_relevance(vlm, s, "gradient"), fd / fd.sum(), rtol=2e-2, atol=1e-4)


def test_bad_inputs_are_named(world):
    vlm = tiny_vlm(world)
    s = sample_for(world, world[1][0])
    with pytest.raises(E.EvidenceError, match="method"):
        E.pack_relevance(vlm, s, "saliency")
    vlm.blind = True
    with pytest.raises(E.EvidenceError, match="blind"):
        E.pack_relevance(vlm, s, "gradient")
    vlm.blind = False
    no_answer = sample_for(world, world[1][0], answer=None)
    with pytest.raises(E.EvidenceError, match="no answer tokens"):
        E.pack_relevance(vlm, no_answer, "attention")
    with pytest.raises(E.EvidenceError, match="cache="):
        E.evidence(vlm, world[1][0], QUESTION, answer=ANSWER)


def test_region_file_has_no_boxes_to_map(world, tmp_path):
    from topopack.model.summaries import write_region_file

    _, slides, cache, _ = world
    e = cache.get(slides[0])
    region = write_region_file(tmp_path / "r.pt", cache, slides[0], pack_boxes(e.layout, e.origin, e.cell_size)[0])
    with pytest.raises(E.EvidenceError, match="pre-encoded region file has no pack boxes"):
        E.evidence(tiny_vlm(world), region, QUESTION, answer=ANSWER, cache=cache)


# ---- one slide end to end: JSON, PNG, the Assistant path --------------------------------
def test_evidence_json_round_trip_and_map(world, tmp_path):
    import matplotlib.image as mpimg

    root, slides, cache, _ = world
    vlm = tiny_vlm(world, sharp=False)
    e = cache.get(slides[0])
    ev = E.evidence(vlm, slides[0], QUESTION, cache=cache, style="plain", method="gradient", max_new_tokens=3)
    assert ev.weights.numel() == e.layout.num_packs and ev.answer == vlm.answer(
        [sample_for(world, slides[0], answer=None)], max_new_tokens=3)[0]
    back = E.Evidence.load(ev.save(tmp_path / "ev.json"))
    assert back.to_dict() == ev.to_dict()
    assert json.loads((tmp_path / "ev.json").read_text())["boxes"][0] == ev.boxes[0].tolist()
    png = E.render_evidence(ev, e, tmp_path / "map.png", size_px=500)
    img = mpimg.imread(png)
    assert img.shape[:2] == (500, 500) and img.shape[2] in (3, 4)


def test_write_evidence_through_an_assistant(world, tmp_path):
    """A saved model directory loaded as the Assistant `topopack ask` uses; a region; the demo figure."""
    import shutil

    import matplotlib.image as mpimg

    from topopack.io import load_slide
    from topopack.model.ask import Assistant
    from topopack.model.llm import save_llm
    from topopack.model.model_dir import save_model

    root, slides, _, tok = world
    vlm = tiny_vlm(world, sharp=False)
    save_llm(tmp_path / "m" / "llm", vlm.llm, tok)
    save_model(tmp_path / "m", vlm, {"llm": "llm", "prompt": "plain"}, root / "encoder.pt")
    assistant = Assistant(tmp_path / "m")
    nod = max(load_slide(slides[0]).facts["nodules"], key=lambda d: d["radius"])
    (cx, cy), r = nod["center"], 1.5 * nod["radius"]
    region = [cx - r, cy - r, cx + r, cy + r]
    question = "Is there a tumor in this region?"
    answer = assistant(slides[0], question, region, max_new_tokens=4)
    png, js = E.write_evidence(assistant, slides[0], question, region, answer, tmp_path / "map.png",
                               method="gradient")
    ev = E.Evidence.load(js)
    assert js == tmp_path / "map.json" and ev.region == region and ev.answer == answer
    e = assistant.cache.get(slides[0])
    from topopack.model.regions import packs_in_region
    assert ev.pack_indices.tolist() == packs_in_region(e.layout, e.origin, e.cell_size, region).tolist()
    assert mpimg.imread(png).shape[:2] == (800, 800)
    shutil.copyfile(png, "/tmp/evidence_demo.png")


def test_wsi_background_needs_openslide(world, tmp_path, monkeypatch):
    _, slides, cache, _ = world
    ev = E.Evidence(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long),
                    "attention", "q", "a", str(slides[0]))
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    with pytest.raises(E.EvidenceError, match="openslide-python, which is not installed"):
        E.render_evidence(ev, cache.get(slides[0]), tmp_path / "m.png", wsi=tmp_path / "slide.svs")


def test_wsi_thumbnail_is_the_background(world, tmp_path, monkeypatch):
    """With a WSI the map is drawn over its thumbnail (a stand-in openslide module: a pink 'slide' image)."""
    import types

    import matplotlib.image as mpimg
    from PIL import Image

    _, slides, cache, _ = world
    e = cache.get(slides[0])
    opened = []

    class FakeSlide:
        def __init__(self, path):
            opened.append(str(path))
            x1, y1 = (int(v) for v in pack_boxes(e.layout, e.origin, e.cell_size)[:, 2:].amax(0))
            self.dimensions = (x1 + 500, y1 + 500)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_thumbnail(self, size):
            return Image.new("RGB", (size[0], size[1] * 3 // 4), (250, 20, 200))

    monkeypatch.setitem(sys.modules, "openslide", types.SimpleNamespace(OpenSlide=FakeSlide))
    n = e.layout.num_packs
    ev = E.Evidence(torch.full((n,), 1.0 / n, dtype=torch.float64), torch.arange(n),
                    pack_boxes(e.layout, e.origin, e.cell_size), "attention", "q", "a", str(slides[0]))
    png = E.render_evidence(ev, e, tmp_path / "wsi.png", wsi=tmp_path / "slide.svs", size_px=400)
    img = mpimg.imread(png)[..., :3]
    pink = (img[..., 0] > 0.9) & (img[..., 1] < 0.2) & (img[..., 2] > 0.7)
    assert opened == [str(tmp_path / "slide.svs")] and img.shape[:2] == (400, 400) and pink.sum() > 100


def test_cli_arguments():
    p = argparse.ArgumentParser()
    E.add_evidence_arguments(p)
    a = p.parse_args(["--evidence", "m.png", "--evidence-method", "attention"])
    assert (a.evidence, a.evidence_method, a.evidence_json, a.evidence_wsi) == ("m.png", "attention", None, None)
    assert p.parse_args([]).evidence_method == E.DEFAULT_METHOD == "gradient"
    with pytest.raises(SystemExit):
        p.parse_args(["--evidence-method", "saliency"])


# ---- the nodule ratio ------------------------------------------------------------------
def test_disc_packs_brute_force():
    """A box intersects the open disc iff some point of it lies inside (checked on a fine grid, away from
    tangency)."""
    g = torch.Generator().manual_seed(4)
    boxes = torch.randint(0, 40, (300, 2), generator=g)
    boxes = torch.cat([boxes, boxes + torch.randint(1, 12, (300, 2), generator=g)], 1)
    center, radius = (20.3, 17.8), 9.1
    hit = E.disc_packs(boxes, center, radius)
    for b, h in zip(boxes.tolist(), hit.tolist()):
        xs = torch.linspace(b[0], b[2], 81)
        ys = torch.linspace(b[1], b[3], 81)
        d = ((xs[:, None] - center[0]) ** 2 + (ys[None] - center[1]) ** 2).sqrt().min()
        if abs(float(d) - radius) > 0.2:
            assert h == (float(d) < radius)
    assert hit.any() and not hit.all()


def test_nodule_ratio_planted_and_control(world, monkeypatch):
    """Evidence planted on the tumour patches (from the slides' labels, not the facts' discs) reaches far above
    3x the nodule's share; its permuted control does not; tumour-free slides are skipped."""
    from topopack.io import load_slide
    from topopack.model.synth import TISSUE_CLASSES

    root, slides, cache, _ = world

    def on_tumour(assistant, path, question, method):
        s, e = load_slide(path), cache.get(path)
        tumour = torch.isin(s.labels, torch.tensor([TISSUE_CLASSES.index('tumor'), TISSUE_CLASSES.index('necrosis')]))
        tumour = tumour.double()
        w = torch.zeros(e.layout.num_packs, dtype=torch.float64).index_add_(0, e.layout.patch_pack, tumour)
        from topopack.model.regions import pack_boxes
        return E.Evidence(w / w.sum(), torch.arange(len(w)), pack_boxes(e.layout, e.origin, e.cell_size),
                          method, question, "", str(path))

    monkeypatch.setattr(E, "evidence", on_tumour)
    out = E.nodule_evidence_ratio(None, slides)
    assert out["slides"] == [str(slides[0]), str(slides[2])]
    assert out["median_ratio"] >= 3 and out["control_median_ratio"] < 3


def test_nodule_ratio_runs_on_a_model(world):
    vlm = tiny_vlm(world, sharp=False)
    root, slides, cache, _ = world

    class Asst:  # what nodule_evidence_ratio needs of an Assistant
        meta = {"prompt": "plain"}

    a = Asst()
    a.vlm, a.cache = vlm, cache
    out = E.nodule_evidence_ratio(a, slides, method="attention")
    assert len(out["ratios"]) == 2 and all(r > 0 and r == r for r in out["ratios"] + out["control_ratios"])
