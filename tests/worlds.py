"""Shared test material: a small synthetic finetuning world, and a pickle that runs code when loaded."""
from __future__ import annotations

import torch

EXECUTED: list[str] = []


def _record(text):
    EXECUTED.append(text)
    return {}


class Payload:
    """Unpickling it appends to EXECUTED: a checkpoint loader that runs code from a file shows it."""

    def __reduce__(self):
        return _record, ("code from the checkpoint ran",)


def finetune_world(root):
    """Six small synthetic slides, caption/VQA JSON (train = 4 slides, test = 2) and a tiny random encoder:
    (root, data dir, encoder path)."""
    from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, save_encoder
    from topopack.model.synth import write_synthetic
    from topopack.model.vqa_data import generate_captions, generate_vqa, write_json

    slides = write_synthetic(root / "slides", 6, seed=3, min_patches=300, max_patches=420, progress=False)
    data = root / "data"
    write_json(data / "captions.json", generate_captions(slides[:4], 0, per_slide=3, root=data))
    write_json(data / "vqa_train.json", generate_vqa(slides[:4], 0, per_slide=6, root=data))
    write_json(data / "vqa_test.json", generate_vqa(slides[4:], 1, per_slide=6, root=data))
    torch.manual_seed(0)
    save_encoder(root / "encoder.pt", SlideEncoder(SlideEncoderConfig(in_dim=64, dim=16, depth=1, heads=2, mlp_dim=32)))
    return root, data, root / "encoder.pt"
