"""The LLM side: prompt splicing and labels, KV-cache generation, a saved HF checkpoint loading through --llm."""
import pytest
import torch

from topopack.model.llm import (LoraSettings, TinyLlamaConfig, add_lora, build_default_llm, build_tokenizer, load_llm,
                                save_llm)
from topopack.model.qformer import QFormer, QFormerConfig
from topopack.model.prompt import IGNORE, encode_conversation
from topopack.model.vlm import HepatoLLaVA, Sample

TEXTS = ["Is there a tumor in this slide? Options: yes, no", "Where is the largest nodule? upper left",
         "Which tissue is in the box? tumor margin, necrosis, fibrous septa, normal parenchyma"]
TINY = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_vlm(blind=False, lora=True, seed=0):
    tok = build_tokenizer(TEXTS)
    llm = build_default_llm(tok, TINY, seed=seed)
    if lora:
        llm = add_lora(llm, LoraSettings(r=4, alpha=8))
    torch.manual_seed(seed)
    qf = QFormer(QFormerConfig(enc_dim=12, llm_dim=32, dim=16, num_queries=5, heads=2, dropout=0.0, anchors=0))
    return HepatoLLaVA(qf, llm, tok, blind=blind).eval()


def sample(tok, q, a, m, seed):
    g = torch.Generator().manual_seed(seed)
    b, af, lab = encode_conversation(tok, [(q, a)], "plain")
    return Sample(b, af, lab, torch.randn(m, 12, generator=g), torch.rand(m, 2, generator=g))


def answer_ids(x: Sample) -> torch.Tensor:
    return x.labels[x.labels != IGNORE]


def test_tokenizer_and_default_llm_are_local_and_deterministic():
    tok = build_tokenizer(TEXTS)
    ids = tok("Where is the tumor margin?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "where is the tumor margin?"
    a, b = build_default_llm(tok, TINY, seed=3), build_default_llm(tok, TINY, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tok)


def test_labels_and_visual_splice():
    vlm = make_vlm()
    tok = vlm.tokenizer
    s = [sample(tok, "<image>\nIs there a tumor in this slide?", "yes", 4, 0),
         sample(tok, "Which tissue is in the box?\n<image>", "tumor margin", 7, 1)]
    embeds, mask, labels = vlm.assemble(s)
    vis = vlm.qformer(*[t for t in _padded(s)])
    emb = vlm.llm.get_input_embeddings()
    q = vlm.qformer.cfg.num_queries
    for i, x in enumerate(s):
        nb, na, nn_ = x.before.numel(), x.after.numel(), answer_ids(x).numel()
        n = nb + q + na
        assert mask[i].sum() == n and (mask[i, :n] == 1).all()
        assert (labels[i, :nb + q + na - nn_] == IGNORE).all()                # prompt + visual: ignored
        assert torch.equal(labels[i, n - nn_:n], x.after[-nn_:])              # answer (+ eos): scored
        assert (labels[i, n:] == IGNORE).all()                                # padding: ignored
        assert x.after[-1] == tok.eos_token_id
        torch.testing.assert_close(embeds[i, nb:nb + q], vis[i])             # visual tokens at <image>
        torch.testing.assert_close(embeds[i, :nb], emb(x.before))
        torch.testing.assert_close(embeds[i, nb + q:nb + q + na], emb(x.after))
    # the second prompt has its image at the end of the human text: nothing of it lands after the image but the
    # assistant prompt and the answer
    assert tok.decode(s[1].after[:-nn_]).replace(" ", "") == "assistant:"
    # blind control: zeros where the visual tokens go
    blind = make_vlm(blind=True)
    e2, _, _ = blind.assemble(s)
    nb = s[0].before.numel()
    assert (e2[0, nb:nb + q] == 0).all() and not (embeds[0, nb:nb + q] == 0).all()


def _padded(samples):
    from topopack.model.vlm import pad_memory
    return pad_memory(samples)


def test_loss_only_on_answer_tokens():
    """Changing the answer changes the loss; the loss equals a hand-computed CE over the answer tokens (and eos),
    and every other position is ignored."""
    vlm = make_vlm()
    s = [sample(vlm.tokenizer, "Is there a tumor in this slide?", "no", 3, 2)]
    loss, _ = vlm(s)
    embeds, mask, labels = vlm.assemble(s)
    ans_pos = (labels[0] != IGNORE).nonzero().flatten()
    assert torch.equal(labels[0, ans_pos], answer_ids(s[0]))  # exactly the answer ids + eos, at the end of the row
    assert ans_pos.tolist() == list(range(labels.shape[1] - answer_ids(s[0]).numel(), labels.shape[1]))
    logits = vlm.llm(inputs_embeds=embeds, attention_mask=mask).logits[0]
    manual = torch.nn.functional.cross_entropy(logits[ans_pos - 1], labels[0, ans_pos])
    torch.testing.assert_close(loss, manual)
    other, _ = vlm([sample(vlm.tokenizer, "Is there a tumor in this slide?", "yes", 3, 2)])
    assert not torch.isclose(loss, other)


def teacher_forced_greedy(vlm, s: Sample, n: int) -> list[int]:
    """Greedy decoding the slow way: re-run the whole prompt + answer so far, take the argmax at the end."""
    ids: list[int] = []
    for _ in range(n):
        grown = torch.cat([s.after, torch.tensor(ids, dtype=torch.long)])
        embeds, mask, _ = vlm.assemble([Sample(s.before, grown, torch.full_like(grown, IGNORE), s.memory, s.positions)])
        nxt = int(vlm.llm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].argmax())
        if nxt == vlm.tokenizer.eos_token_id:
            break
        ids.append(nxt)
    return ids


@pytest.mark.parametrize("blind", [False, True])
def test_kv_cache_generation_equals_no_cache_greedy(blind):
    vlm = make_vlm(blind=blind, seed=1)
    tok = vlm.tokenizer
    s = [sample(tok, "Is there a tumor in this slide?", None, 3, 5),
         sample(tok, "Where is the largest nodule? Options: upper left, necrosis, fibrous septa", None, 8, 6)]
    cached = vlm.generate(s, max_new_tokens=12, use_cache=True)
    plain = vlm.generate(s, max_new_tokens=12, use_cache=False)
    assert cached == plain and all(len(r) > 0 for r in cached)
    # left padding in a batch gives the same greedy answers as one sample at a time, and as slow decoding
    assert [vlm.generate([x], max_new_tokens=12)[0] for x in s] == cached
    with torch.no_grad():
        assert [teacher_forced_greedy(vlm, x, 12) for x in s] == cached
    assert vlm.generate(s, sample=True, seed=7) == vlm.generate(s, sample=True, seed=7)


def test_saved_checkpoint_loads_through_llm_path(tmp_path):
    """A tiny HF model + tokenizer saved with save_pretrained loads via load_llm, trains a LoRA step, generates."""
    tok = build_tokenizer(TEXTS)
    base = build_default_llm(tok, TINY, seed=4)
    save_llm(tmp_path / "ckpt", base, tok)
    llm, tok2 = load_llm(tmp_path / "ckpt")
    assert tok2("tumor margin")["input_ids"] == tok("tumor margin")["input_ids"]
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), llm.parameters()))
    llm = add_lora(llm, LoraSettings(r=4, alpha=8, dropout=0.0))
    names = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and not any("lm_head" in n for n in names)
    qf = QFormer(QFormerConfig(enc_dim=12, llm_dim=32, dim=16, num_queries=5, heads=2, dropout=0.0, anchors=0))
    vlm = HepatoLLaVA(qf, llm, tok2)
    s = [sample(tok2, "Is there a tumor in this slide?", "yes", 3, 0)]
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for n, p in llm.named_parameters() if "lora_B" in n]
    losses = []
    for _ in range(3):
        loss, _ = vlm(s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    after = [p for n, p in llm.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    vlm.eval()
    s = [sample(tok2, "Is there a tumor in this slide?", None, 3, 0)]
    with torch.no_grad():
        expected = teacher_forced_greedy(vlm, s[0], 4)
    assert expected  # a non-empty answer, so the comparison below means something
    assert vlm.generate(s, max_new_tokens=4)[0] == expected
    assert vlm.answer(s, max_new_tokens=4)[0] == tok2.decode(expected, skip_special_tokens=True).strip()
    with pytest.raises(FileNotFoundError, match="not a local checkpoint"):
        load_llm(tmp_path / "missing")
