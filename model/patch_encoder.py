"""Patch encoders for `topopack extract`: one image -> one embedding.

``--encoder`` is one of
- a local Hugging Face image model folder (transformers AutoModel + AutoImageProcessor: Phikon, Phikon-v2, ViT,
  DINOv2, ...); embedding = the CLS token of ``last_hidden_state`` (what Phikon and Phikon-v2 publish; a ViT
  ``pooler_output`` is a dense + tanh head that SSL checkpoints never trained), or ``pooler_output`` with
  ``--pool pooler``; patches go through the model's own image processor;
- a torch.export program (``.pt2``, ``torch.export.save``) or a TorchScript file (``torch.jit.load``, deprecated
  by torch) mapping [B, 3, H, W] to [B, C] (export with a dynamic batch dimension); input size and
  normalisation from ``--input-size``, ``--mean``, ``--std``;
- ``timm:NAME`` or ``open_clip:NAME`` with ``--weights FILE`` (UNI, CONCH-style models), when timm / open_clip
  are installed (they need torchvision; not installed or tested here).

Mosaics and thumbnails are resized to the encoder's input size here (the whole image is kept: no centre crop),
then normalised like the patches.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EncoderError(ValueError):
    """An encoder that cannot be loaded or used; the message says why and what to pass instead."""


class Normalize:
    """PIL image -> [3, H, W] float tensor: resized to ``size`` (h, w) if it differs, scaled to [0, 1],
    normalised by ``mean`` / ``std``."""

    def __init__(self, size: tuple[int, int], mean, std, resample: int = 2):
        self.size, self.resample = size, resample
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), self.resample)
        x = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)


class HFPatch:
    """A patch through the model's own image processor (its resize, crop and normalisation)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img) -> torch.Tensor:
        return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class HFWhole:
    """A mosaic or thumbnail resized to the input size here, then normalised by the processor (no resize/crop)."""

    def __init__(self, processor, size: tuple[int, int]):
        self.processor, self.size = processor, size
        self.resample = getattr(processor, "resample", 2)

    def __call__(self, img) -> torch.Tensor:
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), int(self.resample))
        off = {"do_resize": False, **({"do_center_crop": False} if hasattr(self.processor, "do_center_crop") else {})}
        return self.processor(images=img.convert("RGB"), return_tensors="pt", **off)["pixel_values"][0]


@dataclass
class PatchEncoder:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]  # [B, 3, H, W] on device -> [B, C]
    patch_transform: Callable
    image_transform: Callable
    input_size: tuple[int, int]
    device: torch.device
    dim: int = 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> float32 [B, C] on the CPU; bf16 autocast on CUDA."""
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EncoderError(f"encoder {self.name}: expected [B, C] embeddings for {x.shape[0]} images, got {shape}")
        return out.float().cpu()


def _hf_size(processor) -> tuple[int, int]:
    """The processor's final input size (h, w): its crop size when it crops, else its resize target."""
    def hw(size):
        size = dict(size) if size is not None else {}
        if size.get("height") and size.get("width"):
            return int(size["height"]), int(size["width"])
        if size.get("shortest_edge"):
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        return None

    crop = hw(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = crop or hw(getattr(processor, "size", None))
    if size is None:
        raise EncoderError(f"cannot tell the input size from the image processor {type(processor).__name__}")
    return size


def _load_hf(path: Path, pool: str, device):
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise EncoderError(f"--encoder {path}: not a loadable Hugging Face image model folder (needs config.json, "
                           f"weights and preprocessor_config.json): {e}") from None
    if pool == "pooler" and any("pooler" in key for key in info.get("missing_keys", ())):
        raise EncoderError(f"--encoder {path}: the checkpoint has no pooler weights (it would be random): "
                           "use --pool cls")
    model = model.to(device).eval()

    def forward(x):
        out = model(pixel_values=x)
        if pool == "cls":
            return out.last_hidden_state[:, 0]
        if getattr(out, "pooler_output", None) is None:
            raise EncoderError(f"--encoder {path}: {type(model).__name__} has no pooler_output: use --pool cls")
        return out.pooler_output.reshape(x.shape[0], -1)

    size = _hf_size(processor)
    return forward, HFPatch(processor), HFWhole(processor, size), size


def _load_program(path: Path, device, size: int, mean, std):
    """A torch.export program (.pt2) or a TorchScript file (anything else)."""
    kind = "torch.export (.pt2)" if path.suffix.lower() == ".pt2" else "TorchScript"
    try:
        if kind == "TorchScript":
            model = torch.jit.load(str(path), map_location=device).eval()
        else:
            model = torch.export.load(str(path)).module().to(device)
    except Exception as e:  # noqa: BLE001 - both loaders raise many types for a wrong file
        first = str(e).splitlines()[0] if str(e) else ""
        raise EncoderError(f"--encoder {path}: not a {kind} file ({type(e).__name__}: {first})") from None
    t = Normalize((size, size), mean, std)
    return model, t, t, (size, size)


def _load_timm(name: str, weights, device, kwargs: dict):
    try:
        import timm
    except ImportError:
        raise EncoderError(f"--encoder timm:{name} needs timm (and torchvision): pip install timm") from None
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = tuple(int(v) for v in cfg["input_size"][1:])
    t = Normalize(size, cfg["mean"], cfg["std"])
    return model.to(device).eval(), t, t, size


def _load_open_clip(name: str, weights, device):
    try:
        import open_clip
    except ImportError:
        raise EncoderError(f"--encoder open_clip:{name} needs open_clip (and torchvision): "
                           "pip install open_clip_torch") from None
    model = open_clip.create_model(name, pretrained=str(weights)).to(device).eval()
    side = model.visual.image_size
    size = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    t = Normalize(size, mean, std)
    return model.encode_image, t, t, size


def load_patch_encoder(spec: str, *, device="cpu", weights=None, pool: str = "cls", input_size: int = 224,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, kwargs: str | None = None) -> PatchEncoder:
    """The encoder named by ``spec`` (see the module docstring), on ``device``, with its output width known."""
    device = torch.device(device)
    library, _, name = spec.partition(":")
    if library in ("timm", "open_clip") and name:
        if weights is None or not Path(weights).is_file():
            raise EncoderError(f"--encoder {spec} needs --weights pointing at a local weights file, got {weights}")
        try:
            extra = json.loads(kwargs) if kwargs else {}
        except json.JSONDecodeError as e:
            raise EncoderError(f"--encoder-kwargs is not JSON: {e}") from None
        if library == "timm":
            forward, pt, it, size = _load_timm(name, weights, device, extra)
        else:
            forward, pt, it, size = _load_open_clip(name, weights, device)
        label = spec
    else:
        path = Path(spec)
        if path.is_dir():
            forward, pt, it, size = _load_hf(path, pool, device)
            label = f"{path.name} ({pool})"
        elif path.is_file():
            forward, pt, it, size = _load_program(path, device, input_size, mean, std)
            label = path.name
        else:
            raise EncoderError(f"--encoder {spec}: no such model folder, .pt2 or TorchScript file (or timm:NAME / "
                               "open_clip:NAME with --weights)")
    enc = PatchEncoder(label, forward, pt, it, size, device)
    from PIL import Image

    probe = it(Image.new("RGB", (size[1], size[0]), (255, 255, 255)))[None]
    enc.dim = int(enc.embed(probe).shape[1])
    return enc
