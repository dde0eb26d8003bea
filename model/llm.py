"""The language model: any local HF causal LM, or the embedded tiny Llama + a locally built tokenizer; LoRA via peft.

Nothing is downloaded: ``load_llm(path)`` reads a local checkpoint only (``local_files_only=True``).
The embedded default (``build_default_llm``) is a small LlamaForCausalLM built from a config in code with a
WordLevel tokenizer trained (``tokenizers`` library) on the task's text; it is written to disk with
``save_pretrained`` so every later stage loads it through the same path as a real checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .config import FRACTION, POSITIVE, option, validate

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# always in the default vocabulary, so digits, letters and punctuation never become <unk>
BASE_TEXT = " ".join(list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:?!()[]+-/%'\"") +
                     ["user", "assistant", "yes", "no", "and"])


@dataclass
class TinyLlamaConfig:
    """The embedded default LLM (randomly initialised, trained by the finetuning stages)."""
    hidden_size: int = option(128, "embedded LLM width", check=POSITIVE)
    intermediate_size: int = option(256, "embedded LLM FFN width", check=POSITIVE)
    num_hidden_layers: int = option(2, "embedded LLM layers", check=POSITIVE)
    num_attention_heads: int = option(4, "embedded LLM heads", check=POSITIVE)
    max_position_embeddings: int = option(1024, "embedded LLM context length", check=POSITIVE)

    def __post_init__(self):
        validate(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")


@dataclass
class LoraSettings:
    """LoRA on the LLM's linear layers except lm_head (peft ``all-linear``) unless target_modules is given."""
    r: int = option(128, "LoRA rank", check=POSITIVE)
    alpha: int = option(256, "LoRA alpha", check=POSITIVE)
    dropout: float = option(0.05, "LoRA dropout", check=FRACTION)
    target_modules: str = option("all-linear", "'all-linear' (all but lm_head) or comma-separated module names")
    modules_to_save: list[str] | None = option(
        None, "comma-separated modules trained in full next to LoRA (peft modules_to_save); default: lm_head for "
              "the embedded LLM (its random output head), none for --llm")

    def __post_init__(self):
        validate(self)

    def peft_config(self):
        from peft import LoraConfig, TaskType
        targets = self.target_modules if self.target_modules == "all-linear" else [
            t.strip() for t in self.target_modules.split(",") if t.strip()]
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, modules_to_save=self.modules_to_save,
                          task_type=TaskType.CAUSAL_LM)


def build_tokenizer(texts: Iterable[str]):
    """A WordLevel tokenizer (lower-cased, split on whitespace and punctuation) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no merges
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator([BASE_TEXT, *texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])


def build_default_llm(tokenizer, cfg: TinyLlamaConfig | None = None, seed: int = 0) -> nn.Module:
    """The embedded tiny Llama for ``tokenizer`` (deterministic for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or TinyLlamaConfig()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT = ("4bit", "8bit")


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """The LLM's weight dtype: "auto" (or None) is bf16 on CUDA and fp32 on the CPU."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--llm-dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def quantization_config(quant: str | None, device):
    """bitsandbytes settings for a 4/8-bit base model (QLoRA); a clear error where they cannot run."""
    if quant is None:
        return None
    if quant not in QUANT:
        raise ValueError(f"--llm-quant must be one of {QUANT}, got {quant!r}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--llm-quant {quant} needs a CUDA device (bitsandbytes kernels); got --device {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"--llm-quant {quant} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_llm(path, dtype=torch.float32, quant: str | None = None, device="cpu"):
    """(model, tokenizer) from a local HF checkpoint directory (e.g. Qwen2.5, Vicuna); never downloads.
    ``quant`` ("4bit"/"8bit", CUDA only) loads the base weights through bitsandbytes for QLoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--llm {path}: not a local checkpoint directory (nothing is downloaded)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"--llm {path}: no config.json; save the model with save_pretrained first")
    bnb = quantization_config(quant, device)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    kw = {"quantization_config": bnb, "device_map": {"": torch.device(device).index or 0}} if bnb else {}
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype, **kw)
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--llm {path}: the tokenizer has no eos token, needed to end answers")
    return model, tokenizer


def quiet_transformers() -> None:
    """No transformers/peft warnings or loading bars on the terminal (for commands whose output is the answer)."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(transformers|peft)(\.|$)")


def save_llm(path, model, tokenizer) -> None:
    """Write a base LLM and its tokenizer as a local HF checkpoint."""
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def add_lora(model, settings: LoraSettings):
    """Wrap ``model`` with fresh LoRA adapters (only they train, in fp32 whatever the base weights' dtype)."""
    from peft import get_peft_model

    model = get_peft_model(freeze(model), settings.peft_config())
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # modules_to_save copies keep the base dtype
            p.data = p.data.float()
    return model


def load_lora(model, adapter_dir, trainable: bool = False):
    """Attach saved LoRA adapters to ``model`` (fp32 adapters, as they trained)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(freeze(model), adapter_dir, is_trainable=trainable)
    for name, p in model.named_parameters():
        if ("lora_" in name or "modules_to_save" in name) and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


__all__ = ["SPECIAL_TOKENS", "TinyLlamaConfig", "LoraSettings", "build_tokenizer", "build_default_llm", "load_llm",
           "save_llm", "freeze", "add_lora", "load_lora", "quiet_transformers"]
