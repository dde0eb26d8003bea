"""benchmarks/llm_step.py: the meta-device build and one LoRA step, on the tiny shape."""
import torch

from benchmarks import llm_step


def test_meta_build_equals_a_normal_build_in_distribution_and_buffers():
    torch.manual_seed(0)
    model = llm_step.build_llm(llm_step.TINY, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(**llm_step.TINY, tie_word_embeddings=False))
    for (name, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b.float(), r.float(), rtol=1e-2, atol=0, msg=name)  # rotary tables recomputed (bf16)
    std = model.model.layers[0].mlp.up_proj.weight.float().std()
    assert 0.015 < float(std) < 0.025  # initializer_range 0.02


def test_tiny_step_trains_lora_only(tmp_path):
    r = llm_step.main(["--device", "cpu", "--tiny", "--side", "9", "--in-dim", "8", "--batch", "2", "--lora-r", "4",
                       "--steps", "1", "--json", str(tmp_path / "r.json")])
    assert 0 < r["lora_params"] < r["llm_params"] and r["trainable_params"] > r["lora_params"]  # + the Q-Former
    assert r["step_s"] > 0 and r["loss"] == r["loss"]  # finite, not NaN
    assert r["patches"] == 81 and r["packs"] == 9
