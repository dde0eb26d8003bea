"""Pretraining data read from disk only when a batch needs it, so memory does not grow with the number of slides.

``SlideFiles`` is a sequence of slide files: each file's patch count and feature width come from its header
(the h5 dataset's shape, a memory-mapped .pt), and indexing loads that one slide. ``StepBatches`` is a map-style
``torch.utils.data.Dataset`` whose item ``step * grad_accum + micro`` is the whole batch of that micro-step, built
with the trainer's ``batch_generator(seed, step, micro, rank, grad_accum)``: a pure function of the step, so --resume is exact
and the number of workers never changes a batch. ``StepLoader`` is run_training's ``make_batch``: it reads those
items in step order from a DataLoader whose spawned workers build the next batches while the model trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from topopack.io import SUFFIXES, Slide, SlideError, load_slide, split_slides

from .crops import sample_crops
from .trainer import batch_generator


def read_header(path) -> tuple[int, int]:
    """(patches, feature width) of a slide file, from the shape of its 'features' without reading them."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise SlideError(f"{path}: unsupported file type '{path.suffix}', expected one of {', '.join(SUFFIXES)}")
    try:
        if path.suffix.lower() in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                shape = f["features"].shape if "features" in f else None
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shape = tuple(obj["features"].shape) if isinstance(obj, dict) and "features" in obj else None
    except Exception as e:  # noqa: BLE001 -- h5py / torch raise many types; load_slide would say the same
        raise SlideError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None
    if shape is None:
        raise SlideError(f"{path}: missing dataset 'features'")
    if len(shape) != 2:
        raise SlideError(f"{path}: 'features' must be 2-D [N, C], got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


class SlideFiles(Sequence):
    """Slide files as a sequence of Slides, each loaded (load_slide) when indexed; nothing is kept in memory but
    the paths and the header sizes. All files must share one feature width."""

    def __init__(self, paths, headers: list[tuple[int, int]] | None = None):
        self.paths = [str(p) for p in paths]
        if headers is None:
            headers, errors = [], []
            for p in self.paths:
                try:
                    headers.append(read_header(p))
                except SlideError as e:
                    errors.append(str(e))
            if errors:
                raise SlideError(f"{len(errors)} bad slide file(s):\n  " + "\n  ".join(errors))
        self.sizes = [n for n, _ in headers]
        widths: dict[int, str] = {}
        for p, (_, c) in zip(self.paths, headers):
            widths.setdefault(c, p)
        if len(widths) > 1:
            raise SlideError("slides have different feature widths: " + ", ".join(f"{c} ({p})" for c, p in
                             widths.items()) + "; a run needs one width: put each encoder's files in its own folder")
        self.in_dim = next(iter(widths), None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Slide:
        s = load_slide(self.paths[i])
        if (s.num_patches, s.in_dim) != (self.sizes[i], self.in_dim):
            raise SlideError(f"{s.path}: holds {s.num_patches} x {s.in_dim} features, but its header said "
                             f"{self.sizes[i]} x {self.in_dim} when the run started: was the file replaced? "
                             "Restart the run")
        return s

    def split(self, heldout: float) -> tuple[SlideFiles, SlideFiles]:
        """(train, held-out) as topopack.io.split_slides splits the paths."""
        header = {p: (n, self.in_dim) for p, n in zip(self.paths, self.sizes)}
        train, held = split_slides(self.paths, heldout)
        return SlideFiles(train, [header[p] for p in train]), SlideFiles(held, [header[p] for p in held])


class StepBatches(Dataset):
    """Item ``step * grad_accum + micro``: ``build(crops, step, gen)`` of ``per_step`` crops of slides of similar
    size (crops.sample_crops), all drawn from ``gen = batch_generator(seed, step, micro, rank, grad_accum)``."""

    def __init__(self, files: SlideFiles, build: Callable, *, steps: int, grad_accum: int, seed: int, rank: int,
                 per_step: int, max_patches: int, pack_size: int):
        self.files, self.build = files, build
        self.steps, self.grad_accum, self.seed, self.rank = steps, grad_accum, seed, rank
        self.per_step, self.max_patches, self.pack_size = per_step, max_patches, pack_size

    def __len__(self) -> int:
        return self.steps * self.grad_accum

    def generator(self, i: int) -> torch.Generator:
        step, micro = divmod(i, self.grad_accum)
        return batch_generator(self.seed, step, micro, self.rank, self.grad_accum)

    def __getitem__(self, i: int):
        gen = self.generator(i)
        crops = sample_crops(self.files, self.per_step, self.max_patches, gen, self.pack_size, self.files.sizes)
        return self.build(crops, i // self.grad_accum, gen)


def _as_is(batch):
    return batch


class StepLoader:
    """``make_batch(step, micro, gen)`` for run_training: item (step, micro) of ``dataset``, on ``device``.

    With ``workers`` > 0 a DataLoader of spawned workers builds the items from the first step asked for onwards,
    ``prefetch`` per worker ahead; asking out of order starts it again there. ``close()`` stops the workers.
    The DataLoader gets its own generator: left alone it would draw its workers' seed from the global RNG, which
    the trainer checkpoints for dropout.
    """

    def __init__(self, dataset: StepBatches, workers: int = 0, device="cpu", prefetch: int = 2):
        self.dataset, self.workers, self.device, self.prefetch = dataset, workers, device, prefetch
        self._it, self._next = None, None

    def __call__(self, step: int, micro: int, gen: torch.Generator):
        i = step * self.dataset.grad_accum + micro
        if gen.initial_seed() != self.dataset.generator(i).initial_seed():
            raise RuntimeError(f"StepLoader: the trainer's generator for step {step}, micro-batch {micro} is not the "
                               "dataset's: build StepBatches with the run's seed, grad_accum and rank")
        if self.workers == 0:
            return self.dataset[i].to(self.device)
        if self._it is None or self._next != i:
            self.close()
            loader = DataLoader(self.dataset, batch_size=None, sampler=range(i, len(self.dataset)),
                                num_workers=self.workers, prefetch_factor=self.prefetch, collate_fn=_as_is,
                                multiprocessing_context="spawn", generator=torch.Generator().manual_seed(0))
            self._it = iter(loader)
        batch = next(self._it)
        self._next = i + 1
        return batch.to(self.device)

    def close(self) -> None:
        self._it = None  # the iterator's finaliser stops its workers
