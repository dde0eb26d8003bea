"""--resume and OUT: changed settings, runs already in OUT, unsafe or damaged checkpoints, stale temporary files,
writes from rank 0 only."""
import os
import zipfile

import pytest
import torch
from worlds import EXECUTED, Payload

from test_trainer import Toy, loss_fn, make_batch
from topopack.model import trainer
from topopack.model.trainer import CHECKPOINT, TrainConfig, load_checkpoint, run_training, write_metrics

RUN = {"model": "toy", "width": 16}


def run(out, *, steps=8, run_config=RUN, stop_after=None, **kw):
    torch.manual_seed(0)
    model = Toy()
    cfg = TrainConfig(out=str(out), steps=steps, lr=kw.pop("lr", 1e-2), ckpt_every=4, **kw)
    return run_training(cfg, model, loss_fn, make_batch, run_config=run_config, stop_after=stop_after)


# ---- changed settings -------------------------------------------------------------------
def test_resume_refuses_changed_settings_and_lists_each(tmp_path):
    run(tmp_path, stop_after=4)
    with pytest.raises(ValueError) as e:
        run(tmp_path, resume=True, lr=2e-2, seed=1, run_config={**RUN, "width": 32})
    msg = str(e.value)
    assert "lr: 0.01 -> 0.02" in msg and "seed: 0 -> 1" in msg and "width: 16 -> 32" in msg
    assert "--allow-changed lr,seed,width" in msg and str(tmp_path / CHECKPOINT) in msg
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4  # nothing trained


def test_allow_changed_must_name_every_change(tmp_path):
    run(tmp_path, stop_after=4)
    with pytest.raises(ValueError) as e:
        run(tmp_path, resume=True, lr=2e-2, seed=1, allow_changed=["lr"])
    assert "seed: 0 -> 1" in str(e.value) and "lr:" not in str(e.value)
    with pytest.raises(ValueError, match="--allow-changed lrr: no such setting"):
        run(tmp_path, resume=True, allow_changed=["lrr"])


def test_allowed_lr_change_is_the_rate_used_and_recorded(tmp_path):
    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=4)
    resumed = run(tmp_path / "cut", resume=True, lr=2e-2, allow_changed=["lr"])
    lrs, want = [h["lr"] for h in resumed["history"]], [h["lr"] for h in full["history"]]
    assert lrs[:4] == want[:4]
    assert lrs[4:] == pytest.approx([2 * x for x in want[4:]], rel=1e-12)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["run_config"]["lr"] == 2e-2


def test_settings_free_on_resume_need_no_flag(tmp_path):
    run(tmp_path, stop_after=4)
    out = run(tmp_path, resume=True, progress=False, run_config={**RUN, "device": "cpu", "threads": 1})
    assert out["steps"] == 8


def test_resume_refuses_fewer_steps_than_the_checkpoint(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match=r"--steps 4 is below .* \(8\)"):
        run(tmp_path, steps=4, resume=True, allow_changed=["steps"])


def test_more_steps_on_resume_is_a_change_like_any_other(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="steps: 8 -> 12"):
        run(tmp_path, steps=12, resume=True)
    assert run(tmp_path, steps=12, resume=True, allow_changed=["steps"])["steps"] == 12


# ---- a run already in OUT ---------------------------------------------------------------
@pytest.mark.parametrize("name", [CHECKPOINT, "metrics.json", "encoder.pt", "model.json"])
def test_new_run_refuses_an_output_holding_a_run(tmp_path, name):
    if name == CHECKPOINT:
        run(tmp_path)
    else:
        (tmp_path / name).write_text("{}")
    before = (tmp_path / name).read_bytes()
    with pytest.raises(FileExistsError, match=f"{name}.*--resume.*--overwrite"):
        run(tmp_path, steps=4)
    assert (tmp_path / name).read_bytes() == before


def test_overwrite_replaces_the_run(tmp_path):
    run(tmp_path)
    write_metrics(tmp_path, {"old": 1.0})
    run(tmp_path, steps=4, overwrite=True)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    assert not (tmp_path / "metrics.json").exists()  # no stale metrics of the old run


# ---- checkpoints ------------------------------------------------------------------------
def test_checkpoint_loads_with_weights_only(tmp_path):
    run(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 8 and state["run_config"]["width"] == 16




def test_resume_never_runs_code_from_the_checkpoint(tmp_path):
    run(tmp_path, stop_after=4)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    torch.save({**state, "rng": Payload()}, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match=f"{CHECKPOINT}.*cannot be loaded safely"):
        run(tmp_path, resume=True)
    assert EXECUTED == []


def _zero_tensor_bytes(path):
    """Zeros 8 bytes in the middle of the largest tensor's data in the torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + o:info.header_offset + o + 2], "little")
                           for o in (26, 28))
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    assert any(raw[at:at + 8])
    raw[at:at + 8] = bytes(8)
    path.write_bytes(bytes(raw))


DAMAGE = {"empty": lambda p: p.write_bytes(b""),
          "truncated": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
          "garbage": lambda p: p.write_bytes(os.urandom(4096)),
          "zeroed bytes in tensor data": _zero_tensor_bytes}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_named_with_the_fix(tmp_path, damage):
    run(tmp_path, stop_after=4)
    DAMAGE[damage](tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match=f"{CHECKPOINT}.*--overwrite"):
        run(tmp_path, resume=True)


def test_stale_temporary_files_of_ours_are_removed_at_start(tmp_path):
    ours = ["checkpoint.pt.k3j2.tmp", "checkpoint.ptx8a1.tmp", "metrics.json.q1.tmp", "encoder.pt.z.tmp"]
    others = ["notes.tmp", "my.checkpoint.pt.tmp", "mine.pt"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"")
    run(tmp_path / "sub")  # another OUT: nothing of tmp_path touched
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(ours + others)
    run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(others + [CHECKPOINT])


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "init_distributed", lambda: (1, 2))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, **kw: m)  # no process group
    (tmp_path / "checkpoint.pt.k3j2.tmp").write_bytes(b"")
    run(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt.k3j2.tmp"]
