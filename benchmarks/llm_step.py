"""One finetune step of the paper's model shape, without a download: peak memory and step time.

    python -m benchmarks.llm_step --device cuda              # Llama with the 7B (Vicuna) configuration, bf16
    python -m benchmarks.llm_step --device cpu --tiny        # the same code on a tiny shape (a smoke run)

The LLM is a randomly initialised Llama built on the meta device and materialised in bf16 on the device (no 28 GB
fp32 copy in host memory), wrapped with LoRA r 128 / alpha 256 on every linear layer (fp32 adapters). The frozen
full-size slide encoder (6 x 512, 1024-wide features) encodes one slide of --side^2 patches into memory tokens; the
Q-Former (32 queries) turns them into visual tokens; a batch of --batch questions is trained for one AdamW step.
The step time is the median of --steps steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from topopack import TopoLayout
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig
from topopack.model.llm import LoraSettings, add_lora, build_tokenizer
from topopack.model.prompt import encode_conversation
from topopack.model.qformer import QFormer, QFormerConfig
from topopack.model.vlm import HepatoLLaVA, Sample

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=512)
QUESTION = ("<image>\nDescribe the tumour in this whole-slide image: how many nodules are there, how large is the "
            "largest, where does it lie, and which tissue surrounds it?")
ANSWER = ("Two tumour nodules; the largest is large and lies in the upper left part of the slide, with a rim of "
          "tumour margin, fibrous septa and normal parenchyma around it.")


def build_llm(shape: dict, device: torch.device, dtype=torch.bfloat16):
    """A random Llama of ``shape``: built on the meta device, materialised in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()  # also recomputes the rotary buffers
    return model


def run(args) -> dict:
    device = torch.device(args.device)
    shape = TINY if args.tiny else VICUNA_7B
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    tokenizer = build_tokenizer([QUESTION, ANSWER])
    llm = add_lora(build_llm(shape, device, torch.bfloat16 if cuda or args.tiny else torch.float32),
                   LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    if args.grad_ckpt:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enc_cfg = SlideEncoderConfig(in_dim=args.in_dim, **({"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}
                                                        if args.tiny else {}))
    encoder = SlideEncoder(enc_cfg).to(device).eval()
    layout = TopoLayout.from_grid(args.side, args.side, 3, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        summaries = encoder(torch.randn(1, layout.num_patches, args.in_dim, device=device), layout).summaries[0]
    qformer = QFormer(QFormerConfig(enc_dim=enc_cfg.dim, llm_dim=shape["hidden_size"])).to(device)
    vlm = HepatoLLaVA(qformer, llm, tokenizer).train()
    before, after, labels = encode_conversation(tokenizer, [(QUESTION, ANSWER)], "llava_v1")
    positions = (layout.pack_cell.float() + 0.5) / layout.pack_cell.max().clamp_min(1)
    batch = [Sample(before, after, labels, summaries.float(), positions.flip(-1).float()) for _ in range(args.batch)]
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = vlm(batch)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first step allocates the optimiser state
            times.append(time.perf_counter() - t0)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "llm": shape,
              "llm_params": sum(p.numel() for p in llm.parameters()),
              "lora_params": sum(p.numel() for p in llm.parameters() if p.requires_grad),
              "trainable_params": sum(p.numel() for p in params),
              "patches": layout.num_patches, "packs": layout.num_packs, "batch": args.batch,
              "sequence": before.numel() + qformer.cfg.num_queries + after.numel(), "grad_ckpt": args.grad_ckpt,
              "step_s": statistics.median(times), "loss": float(loss),
              "peak_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None}
    print(json.dumps(result, indent=1))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny LLM and encoder (smoke run)")
    p.add_argument("--side", type=int, default=192, help="grid side of the slide (192 = 36,864 patches)")
    p.add_argument("--in-dim", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="questions per step")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the LLM")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
