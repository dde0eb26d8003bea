"""LLM precision and memory flags: bf16 base weights with fp32 LoRA, QLoRA's errors off CUDA, --max-length,
activation checkpointing."""
import pytest
import torch

from topopack.model.finetune import fit_length
from topopack.model.llm import (LoraSettings, TinyLlamaConfig, add_lora, build_default_llm, build_tokenizer, load_llm,
                                load_lora, quantization_config, resolve_dtype, save_llm)
from topopack.model.prompt import IGNORE, encode_conversation
from topopack.model.vlm import Sample

TINY = TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXTS = ["is there a tumor? yes no", "where is the largest nodule? upper left"]


def test_bf16_base_and_fp32_lora(tmp_path):
    tok = build_tokenizer(TEXTS)
    save_llm(tmp_path / "llm", build_default_llm(tok, TINY, seed=0), tok)
    llm, _ = load_llm(tmp_path / "llm", resolve_dtype("bf16", "cpu"))
    llm = add_lora(llm, LoraSettings(r=4, alpha=8, modules_to_save=["lm_head"]))
    trainable = {n: p.dtype for n, p in llm.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in llm.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    # a training step through the composed model (which autocasts to the LLM's dtype) runs on the CPU
    from topopack.model.qformer import QFormer, QFormerConfig
    from topopack.model.vlm import HepatoLLaVA

    qf = QFormer(QFormerConfig(enc_dim=4, llm_dim=32, dim=16, num_queries=4, heads=2, anchors=0))
    vlm = HepatoLLaVA(qf, llm, tok)
    b, a, lab = encode_conversation(tok, [("is there a tumor?", "yes")], "plain")
    loss, _ = vlm([Sample(b, a, lab, torch.randn(3, 4), torch.rand(3, 2))])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in llm.parameters() if p.requires_grad)
    llm.save_pretrained(tmp_path / "adapter")
    base, _ = load_llm(tmp_path / "llm", torch.bfloat16)
    again = load_lora(base, tmp_path / "adapter")
    assert {p.dtype for n, p in again.named_parameters() if "lora_" in n} == {torch.float32}
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16


def test_qlora_needs_cuda_and_says_so():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        quantization_config("4bit", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        quantization_config("3bit", "cuda")
    assert quantization_config(None, "cpu") is None


def test_fit_length_truncates_or_drops_and_counts():
    tok = build_tokenizer(TEXTS)

    def sample(answer):
        b, a, lab = encode_conversation(tok, [("is there a tumor?", answer)], "plain")
        return Sample(b, a, lab, torch.zeros(1, 4), torch.zeros(1, 2))

    short, long_ = sample("yes"), sample("upper left " * 20)
    n_short = short.before.numel() + 3 + short.after.numel()
    room = n_short + 3  # the long answer is cut three tokens past the short sample's end
    samples = [sample("yes"), sample("upper left " * 20)]
    keep, truncated, dropped = fit_length(samples, room, 3, "truncate")
    assert (keep, truncated, dropped) == ([0, 1], 1, 0)
    assert samples[1].before.numel() + 3 + samples[1].after.numel() == room
    assert (samples[1].labels != IGNORE).any() and torch.equal(samples[0].after, short.after)
    assert fit_length([sample("yes"), sample("upper left " * 20)], room, 3, "drop") == ([0], 0, 1)
    # a cut that leaves no answer token drops the sample
    assert fit_length([sample("upper left " * 20)], short.before.numel() + 3 + 2, 3, "truncate") == ([], 0, 1)
    assert long_.after.numel() > samples[1].after.numel()
