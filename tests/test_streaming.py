"""Data that streams: pretraining reads slides when a batch needs them (peak memory flat in the number of slides),
batches of similar-size slides, DataLoader workers that change no batch, and finetune's summary cache on disk."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from topopack.io import SlideError, load_slide, save_slide
from topopack.model.crops import pick_slides
from topopack.model.datasets import SlideFiles
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, load_encoder, save_encoder
from topopack.model.parallel import usable_cores
from topopack.model.pretrain import pretrain
from topopack.model.summaries import SummaryCache
from topopack.model.synth import write_synthetic
from topopack.model.trainer import CHECKPOINT, load_checkpoint

TINY = dict(dim=16, depth=1, heads=2, mlp_dim=32, dec_dim=16, dec_heads=2, max_patches=40, slides_per_step=2,
            eval_crops=1, lr=3e-3, threads=1)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """200 synthetic slides (~3,500 patches of 64 features: the old load-everything pretrain grew its peak RSS by
    ~36% from 20 to 200 of them) and a folder linking the first 20."""
    root = tmp_path_factory.mktemp("many")
    paths = write_synthetic(root / "200", 200, seed=0, min_patches=3000, max_patches=4000, dim=64, progress=False,
                            workers=min(2, usable_cores()))
    (root / "20").mkdir()
    for p in sorted(paths)[:20]:
        (root / "20" / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    d = tmp_path_factory.mktemp("few")
    write_synthetic(d, 6, seed=5, min_patches=200, max_patches=900, dim=8, progress=False)
    return d


PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from topopack.model.pretrain import pretrain
    pretrain("mae", sys.argv[1], sys.argv[2], quick=True, steps=3, eval_crops=1, threads=1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_of_pretraining_does_not_grow_with_the_slides(many, tmp_path):
    peak = {}
    for n in (20, 200):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(many / str(n)), str(tmp_path / str(n))],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        peak[n] = int(proc.stdout.split()[-1]) / 1024  # MB
        assert json.loads((tmp_path / str(n) / "metrics.json").read_text())["train_slides"] == n - n // 5
    assert abs(peak[200] - peak[20]) < 0.2 * peak[20], peak


def test_pick_slides_groups_similar_sizes_and_draws_every_slide_equally():
    sizes = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(256)
    for _ in range(20_000):
        pick = pick_slides(sizes, 4, gen, bucket=32)
        ranks = [sizes[i] for i in pick]  # sizes are the ranks here
        assert len({r // 32 for r in ranks}) == 1  # one size bucket
        counts[pick] += 1
    assert float((counts / counts.mean() - 1).abs().max()) < 0.3


def test_slide_files_read_headers_and_refuse_mixed_widths(few, tmp_path):
    files = SlideFiles(sorted(few.glob("*.h5")))
    slides = [load_slide(p) for p in files.paths]
    assert files.sizes == [s.num_patches for s in slides] and files.in_dim == 8
    s = slides[0]
    save_slide(tmp_path / "a.pt", s.features, s.coords, s.patch_size)  # .pt: header from a memory-mapped load
    save_slide(tmp_path / "b.h5", torch.zeros(s.num_patches, 4), s.coords, s.patch_size)
    assert SlideFiles([tmp_path / "a.pt"]).sizes == [s.num_patches]
    with pytest.raises(SlideError, match=r"different feature widths: 8 \(.*a.pt\), 4 \(.*b.h5\)"):
        SlideFiles([tmp_path / "a.pt", tmp_path / "b.h5"])
    one = SlideFiles([tmp_path / "a.pt"])
    save_slide(tmp_path / "a.pt", s.features[:-1], s.coords[:-1], s.patch_size)  # replaced after the start
    with pytest.raises(SlideError, match="was the file replaced"):
        one[0]


def test_workers_and_resume_give_the_uninterrupted_runs_batches(few, tmp_path):
    """A run cut after step 2 and resumed, its batches built by two spawned workers, ends with the weights of an
    uninterrupted run built in one process: each batch is a function of (seed, step) alone."""
    kw = dict(TINY, steps=4, ckpt_every=2)
    whole = pretrain("mae", few, tmp_path / "whole", workers=0, **kw)
    pretrain("mae", few, tmp_path / "cut", workers=2, stop_after=2, **kw)
    resumed = pretrain("mae", few, tmp_path / "cut", workers=2, resume=True, **kw)
    assert resumed["final_loss"] == whole["final_loss"]
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "cut" / CHECKPOINT)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_summary_cache_is_reused_from_disk_and_not_across_encoders(few, tmp_path):
    paths = [tmp_path / p.name for p in sorted(few.glob("*.h5"))[:3]]
    for p in paths:
        p.write_bytes((few / p.name).read_bytes())
    torch.manual_seed(0)
    save_encoder(tmp_path / "enc.pt", SlideEncoder(SlideEncoderConfig(in_dim=8, dim=16, depth=1, heads=2, mlp_dim=16)))
    calls = []

    def cache(encoder):
        encoder.register_forward_hook(lambda *a: calls.append(1))
        return SummaryCache(encoder, cache_dir=tmp_path / "cache")

    first = cache(load_encoder(tmp_path / "enc.pt"))
    tokens = [first.region(p)[0].clone() for p in paths]
    assert len(calls) == 3
    again = cache(load_encoder(tmp_path / "enc.pt"))  # a rerun: same encoder file
    for p, t in zip(paths, tokens):
        assert torch.equal(again.region(p)[0], t)
    assert len(calls) == 3
    other = load_encoder(tmp_path / "enc.pt")
    with torch.no_grad():
        for w in other.parameters():
            w.add_(0.01)
    changed = cache(other)
    assert not any(torch.equal(changed.region(p)[0], t) for p, t in zip(paths, tokens))
    assert len(calls) == 6
    s = load_slide(paths[0])
    save_slide(paths[0], s.features + 1, s.coords, s.patch_size, labels=s.labels, facts=s.facts)  # the file changes
    assert not torch.equal(cache(load_encoder(tmp_path / "enc.pt")).region(paths[0])[0], tokens[0])
    assert len(calls) == 7
