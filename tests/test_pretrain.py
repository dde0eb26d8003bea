"""MAE masking and decoder, MoCo pieces, and `topopack pretrain` (flags, held-out split, resume, OUT, torchrun)."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from topopack import TopoLayout
from topopack.io import load_slides, split_slides
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, load_encoder
from topopack.model.mae import MAE, MAEConfig, mask_slides
from topopack.model.moco import MoCo, MoCoConfig, contrast_batch, pack_neighbours
from topopack.model import pretrain as pretrain_module
from topopack.model import trainer
from topopack.model.crops import crop, sample_crops
from topopack.model.pretrain import QUICK, add_arguments, pretrain
from topopack.model.synth import write_synthetic
from topopack.model.trainer import CHECKPOINT, batch_generator, load_checkpoint
from topopack.model.vqa_data import load_vqa, make_vqa_files

C = 8
TINY = dict(dim=16, depth=1, heads=2, mlp_dim=32, dec_dim=16, dec_heads=2, max_patches=40, slides_per_step=2,
            eval_crops=1, queue=256, lr=3e-3, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    write_synthetic(d, 5, seed=3, min_patches=300, max_patches=400, dim=C, progress=False)
    return d


def random_crop(seed: int, h: int = 9, w: int = 11, patch_size: int = 16):
    """(features, coords, patch_size, origin) of a ragged crop whose origin lies outside it."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)[torch.rand(h * w, generator=g) < 0.75]
    cells = cells[torch.randperm(len(cells), generator=g)] + torch.tensor([2, 1])
    origin = torch.tensor([5, 7])
    return torch.randn(len(cells), C, generator=g), cells * patch_size + origin, patch_size, origin


def full_index(layout: TopoLayout, token: torch.Tensor) -> torch.Tensor:
    """Input patch index of each patch token."""
    inv = torch.full((layout.num_tokens,), -1)
    inv[layout.patch_token] = torch.arange(layout.num_patches)
    return inv[token]


# ---- MAE --------------------------------------------------------------------------------
@pytest.mark.parametrize("phase", [1, 2])
def test_masking_keeps_cells_and_targets(phase):
    crops = [random_crop(0), random_crop(1, h=6, w=7)]
    b = mask_slides(crops, 3, 0.75, phase, torch.Generator().manual_seed(phase))
    full, vis, v2f = b.full_layout, b.layout, b.visible_to_full
    feats = torch.cat([c[0] for c in crops])
    # every encoder token sits at the same place and kind in the full layout
    assert torch.equal(full.token_kind[v2f], vis.token_kind)
    fi = full_index(full, v2f[vis.patch_token])
    assert torch.equal(full.patch_cell[fi], vis.patch_cell)
    assert torch.equal(feats[fi], b.features[0])
    assert torch.equal(full.pack_cell[full.token_pack[v2f[vis.pack_summary_token]]], vis.pack_cell)
    assert torch.equal(full.token_slide[v2f], vis.token_slide)
    # targets: exactly the hidden patches (+ hidden packs' summaries), never a visible token
    assert not set(b.target_token.tolist()) & set(v2f.tolist())
    is_patch = full.token_kind[b.target_token] == 2
    hidden = full_index(full, b.target_token[is_patch])
    assert torch.equal(b.target[is_patch], feats[hidden])
    assert len(hidden) + vis.num_patches == full.num_patches
    for s, (f, *_), in enumerate(crops):
        n_vis = int((vis.pack_slide[vis.patch_pack] == s).sum())
        if phase == 1:
            assert n_vis == f.shape[0] - round(0.75 * f.shape[0])
        rows = full.token_slide[b.target_token] == s
        vis_mean = b.features[0, vis.pack_slide[vis.patch_pack] == s].mean(0)
        torch.testing.assert_close(b.baseline[rows], vis_mean.expand(int(rows.sum()), -1))
    if phase == 1:
        assert bool(is_patch.all())
    else:  # whole packs: a pack is either fully visible or fully hidden, its summary a target
        hidden_packs = full.token_pack[b.target_token[~is_patch]]
        assert set(full.patch_pack[hidden].tolist()) == set(hidden_packs.tolist())
        assert vis.num_packs + len(hidden_packs) == full.num_packs
        for p, t in zip(hidden_packs.tolist(), b.target[~is_patch]):
            torch.testing.assert_close(t, feats[full.patch_pack == p].mean(0))


@pytest.mark.parametrize("phase", [1, 2])
def test_decoder_never_sees_hidden_features(phase):
    torch.manual_seed(0)
    enc = SlideEncoder(SlideEncoderConfig(in_dim=C, dim=16, depth=1, heads=2, mlp_dim=16))
    model = MAE(enc, MAEConfig(dec_dim=16, dec_heads=2)).eval()
    crop_ = random_crop(4)
    a = mask_slides([crop_], 3, 0.75, phase, torch.Generator().manual_seed(9))
    hidden = full_index(a.full_layout, a.target_token[a.full_layout.token_kind[a.target_token] == 2])
    poisoned = crop_[0].clone()
    poisoned[hidden] = float("nan")
    b = mask_slides([(poisoned, *crop_[1:])], 3, 0.75, phase, torch.Generator().manual_seed(9))
    pa, pb = model.predict(a), model.predict(b)
    assert torch.isfinite(pa).all()
    assert torch.equal(pa, pb)


# ---- MoCo -------------------------------------------------------------------------------
def test_pack_neighbours_match_brute_force():
    layout = TopoLayout.cat([TopoLayout.from_coords(c[1], c[2], 2, origin=c[3]) for c in (random_crop(5), random_crop(6))])
    nb = pack_neighbours(layout)
    for p in range(layout.num_packs):
        d = (layout.pack_cell - layout.pack_cell[p]).abs().amax(1)
        want = ((d == 1) & (layout.pack_slide == layout.pack_slide[p])).nonzero()[:, 0]
        assert sorted(nb[p][nb[p] >= 0].tolist()) == want.tolist()


def test_contrast_positives():
    crops = [random_crop(7), random_crop(8)]
    always = contrast_batch(crops, 3, MoCoConfig(neighbour_prob=1.0), torch.Generator().manual_seed(0))
    has_nb = (always.neighbours >= 0).any(1)
    p = torch.arange(len(has_nb))
    assert torch.equal(always.positive[~has_nb], p[~has_nb])
    assert (always.neighbours[has_nb] == always.positive[has_nb, None]).any(1).all()
    never = contrast_batch(crops, 3, MoCoConfig(neighbour_prob=0.0, noise_std=0.2), torch.Generator().manual_seed(0))
    assert torch.equal(never.positive, p)
    feats = torch.cat([c[0] for c in crops])
    noise = (never.query[0] - feats) / feats.std(0)  # per-crop std is close to the pooled one
    assert 0.1 < float(noise.std()) < 0.3
    assert not torch.equal(never.query, never.key)


def test_momentum_update_and_queue():
    torch.manual_seed(0)
    enc = SlideEncoder(SlideEncoderConfig(in_dim=C, dim=8, depth=1, heads=2, mlp_dim=8))
    model = MoCo(enc, MoCoConfig(momentum=0.9, queue=8, proj_dim=4))
    assert not any(p.requires_grad for p in model.key_params())
    assert {"queue", "queue_ptr"} <= set(model.state_dict())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.key_params()]
    online = [p.clone() for p in list(model.encoder.parameters()) + list(model.head.parameters())]
    keys = torch.randn(5, 4)
    model._pending.append(keys)
    model.momentum_step()
    for k, k0, q in zip(model.key_params(), before, online):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q)
    assert torch.equal(model.queue[:5], keys) and int(model.queue_ptr) == 5
    more = torch.randn(6, 4)
    model._pending += [more[:2], more[2:]]
    model.momentum_step()
    assert torch.equal(model.queue[5:], more[:3]) and torch.equal(model.queue[:3], more[3:])
    assert int(model.queue_ptr) == 3 and not model._pending
    # the loss is InfoNCE with the positive in column 0
    b = contrast_batch([random_crop(9)], 3, model.cfg, torch.Generator().manual_seed(1))
    model.eval()
    loss, _ = model(b)
    q = model.embed(b.query, b.layout)
    k = model.embed(b.key, b.layout, key=True)[b.positive]
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.t()], 1) / 0.07
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)))


# ---- data helpers -----------------------------------------------------------------------
def test_crops(data):
    slides = load_slides(data)
    s = slides[0]
    g = torch.Generator().manual_seed(0)
    f, coords, ps, origin, *_ = crop(s, 50, g, pack_size=3)
    shift = s.coords.min(0).values - origin  # whole packs, so packs keep their patches
    assert f.shape[0] == 50 and (shift >= 0).all() and (shift % (3 * ps) == 0).all()
    cells = (coords - s.coords.min(0).values) // ps
    assert int((cells - cells[0]).abs().amax()) <= 2 * int(50 ** 0.5)  # one compact window
    rows = (s.coords[:, None] == coords[None]).all(-1).nonzero()
    assert torch.equal(s.features[rows[:, 0]], f[rows[:, 1]]) and len(rows) == 50
    assert len(sample_crops(slides, 3, 10_000, g)) == 3


# ---- the command ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["mae", "moco"])
def test_resume_is_exact(tmp_path, data, stage):
    kw = dict(TINY, steps=6, ckpt_every=2, phase2_at=0.5)
    whole = pretrain(stage, data, tmp_path / "whole", **kw)
    pretrain(stage, data, tmp_path / "cut", stop_after=2, **kw)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 2
    resumed = pretrain(stage, data, tmp_path / "cut", resume=True, **kw)
    assert resumed["final_loss"] == whole["final_loss"]
    a = load_checkpoint(tmp_path / "whole" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "cut" / CHECKPOINT)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    keys = ("heldout_masked_mse", "heldout_mean_baseline_mse") if stage == "mae" else ("heldout_pos_cos", "heldout_neg_cos")
    assert all(isinstance(metrics[k], float) for k in keys)
    enc = load_encoder(tmp_path / "cut" / "encoder.pt")
    assert enc.cfg.dim == 16 and enc.cfg.in_dim == C


def test_init_conflicts_with_architecture_flags(tmp_path, data):
    with pytest.raises(ValueError, match="--init"):
        pretrain("moco", data, tmp_path, init=str(tmp_path / "enc.pt"), dim=32)


def test_torchrun_two_processes(tmp_path, data):
    """DDP over gloo on the CPU; the MoCo queue receives the keys of both ranks."""
    out = tmp_path / "ddp"
    args = ["--stage", "moco", "--data", str(data), "--out", str(out), "--steps", "3", "--ckpt-every", "3"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "topopack.model.cli", "pretrain", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    state = load_checkpoint(out / CHECKPOINT)["model"]
    train, _ = split_slides(load_slides(data), 0.2)
    keys = 0
    for step in range(3):
        for rank in range(2):
            for f, coords, ps, origin, *_ in sample_crops(train, 2, 40, batch_generator(0, step, 0, rank)):
                keys += TopoLayout.from_coords(coords, ps, 3, origin=origin).num_packs
    assert int(state["queue_ptr"]) == keys % TINY["queue"]


# ---- flags, log, held-out split ---------------------------------------------------------
@pytest.mark.parametrize("flag", [["--steps", "0"], ["--mask-ratio", "1.5"], ["--heldout", "1"], ["--dim", "0"],
                                  ["--max-patches", "0"], ["--queue", "0"], ["--temperature", "0"],
                                  ["--dropout", "1"], ["--rules", "sideways"]], ids=lambda f: " ".join(f))
def test_bad_flags_fail_at_parse_time(flag, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--stage", "mae", "--data", "d", "--out", "o", *flag])
    assert flag[0] in capsys.readouterr().err


QUICK_RUN = dict(quick=True, steps=1, max_patches=40, slides_per_step=2, eval_crops=1, threads=1)


def test_quick_architecture_is_in_help_and_log(tmp_path, data, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helptext = " ".join(parser.format_help().split())
    assert all(f"{k}={v}" in helptext for k, v in QUICK.items())
    pretrain("mae", data, tmp_path, **QUICK_RUN)
    enc = load_encoder(tmp_path / "encoder.pt").cfg
    log = capsys.readouterr().out
    assert f"encoder dim={enc.dim} depth={enc.depth} heads={enc.heads} mlp_dim={enc.mlp_dim}" in log and "--quick" in log
    assert (enc.dim, enc.depth, enc.heads, enc.mlp_dim) == tuple(QUICK[k] for k in ("dim", "depth", "heads", "mlp_dim"))


def test_heldout_slides_are_the_vqa_test_slides(tmp_path, data):
    """pretrain holds out the slides `topopack synth --vqa` keeps for vqa_test.json (same --heldout)."""
    make_vqa_files(data, tmp_path, per_slide=1, heldout=0.4)
    vqa_test = {os.path.basename(r["slide"]) for r in load_vqa(tmp_path / "vqa_test.json")}
    metrics = pretrain("mae", data, tmp_path / "run", heldout=0.4, **QUICK_RUN)
    assert set(metrics["heldout_files"]) == vqa_test and metrics["heldout_slides"] == len(vqa_test) == 2


# ---- resume and OUT ---------------------------------------------------------------------
def test_resume_refuses_changed_settings(tmp_path, data):
    kw = dict(TINY, steps=4, ckpt_every=2)
    pretrain("mae", data, tmp_path / "cut", stop_after=2, **kw)
    other = tmp_path / "copy"
    shutil.copytree(data, other)
    for change, text in [(dict(mask_ratio=0.5), "mask_ratio: 0.75 -> 0.5"), (dict(data=other), "data: "),
                         (dict(dim=32), "dim: 16 -> 32"), (dict(lr=1e-2), "lr: 0.003 -> 0.01")]:
        with pytest.raises(ValueError, match=r"--resume: settings differ") as e:
            pretrain("mae", change.pop("data", data), tmp_path / "cut", resume=True, **{**kw, **change})
        assert text in str(e.value)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["step"] == 2


def test_new_run_refuses_a_finished_run_before_reading_data(tmp_path, data):
    pretrain("mae", data, tmp_path, **QUICK_RUN)
    before = (tmp_path / "encoder.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        pretrain("mae", tmp_path / "no such data", tmp_path, **QUICK_RUN)
    assert (tmp_path / "encoder.pt").read_bytes() == before


def test_only_rank_zero_writes(tmp_path, data, monkeypatch):
    for module in (trainer, pretrain_module):
        monkeypatch.setattr(module, "init_distributed", lambda: (1, 1))
    assert pretrain("mae", data, tmp_path / "out", **QUICK_RUN) == {}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("phase", [1, 2])
def test_pretraining_feeds_the_files_summary_and_global_features(tmp_path, phase):
    """With summary/global features in the file, a crop carries the rows of its packs, MAE's encoder gets them as
    the summary and global tokens' inputs and predicts them for hidden packs, and MoCo's views start from them:
    the tokens finetune and ask feed the encoder."""
    import numpy as np

    from topopack.io import load_slide, save_slide
    from topopack.model.synth import make_slide

    raw = make_slide(np.random.default_rng(3), 400, dim=C)
    full_layout = TopoLayout.from_coords(torch.from_numpy(raw["coords"]), raw["patch_size"], 3)
    gen = torch.Generator().manual_seed(0)
    S, G = torch.randn(full_layout.num_packs, C, generator=gen), torch.randn(C, generator=gen)
    save_slide(tmp_path / "s.h5", raw["features"], raw["coords"], raw["patch_size"], summary_features=S,
               global_features=G)
    slide = load_slide(tmp_path / "s.h5")
    slide_pack = slide.layout(3, origin=slide.origin).patch_pack
    where = {tuple(xy): i for i, xy in enumerate(slide.coords.tolist())}

    whole = crop(slide, 10 ** 6, torch.Generator().manual_seed(1), pack_size=3)
    assert torch.equal(whole.summaries, S) and torch.equal(whole.global_, G)  # finetune's rows, in its order
    c = crop(slide, 60, torch.Generator().manual_seed(2), pack_size=3)
    own = TopoLayout.from_coords(c.coords, c.patch_size, 3, origin=c.origin)
    for j, xy in enumerate(c.coords.tolist()):
        assert torch.equal(c.summaries[own.patch_pack[j]], S[slide_pack[where[tuple(xy)]]])

    enc = SlideEncoder(SlideEncoderConfig(in_dim=C, dim=8, depth=1, heads=2, mlp_dim=8))
    seen = []
    plain_forward = enc.forward
    enc.forward = lambda f, layout, s=None, g=None: seen.append((s, g)) or plain_forward(f, layout, s, g)
    b = mask_slides([c], 3, 0.75, phase, torch.Generator().manual_seed(3))
    MAE(enc, MAEConfig(dec_dim=8, dec_depth=1, dec_heads=2))(b)
    summ, glob = seen[-1]
    full = b.full_layout
    enc_pack = full.token_pack[b.visible_to_full[b.layout.pack_summary_token]]
    torch.testing.assert_close(summ[0], c.summaries[enc_pack])
    torch.testing.assert_close(glob[0, 0], G)
    hidden_summary = full.token_kind[b.target_token] == 1
    assert hidden_summary.any() or phase == 1
    torch.testing.assert_close(b.target[hidden_summary], c.summaries[full.token_pack[b.target_token[hidden_summary]]])

    batch = contrast_batch([c], 3, MoCoConfig(noise_std=0.0), torch.Generator().manual_seed(4))
    torch.testing.assert_close(batch.query_summaries[0], c.summaries)
    MoCo(enc, MoCoConfig(queue=16))(batch)
    torch.testing.assert_close(seen[-2][0][0], c.summaries)  # the query encoder's call
    with pytest.raises(ValueError, match="some slides of a batch have summary_features"):
        mask_slides([c, c._replace(summaries=None)], 3, 0.75, phase, torch.Generator())
