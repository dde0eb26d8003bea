"""The shared training loop: exact resume, atomic checkpoints, schedule, metrics."""
import json

import pytest
import torch
from torch import nn

from topopack.model.trainer import CHECKPOINT, TrainConfig, lr_lambda, run_training, write_metrics


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 1))

    def forward(self, batch):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()


def make_batch(step, micro, gen):
    x = torch.randn(16, 8, generator=gen)
    return x, x.sum(1, keepdim=True).sin()


def loss_fn(model, batch, step):
    return model(batch), {}


def train(tmp_path, name, **kw):
    torch.manual_seed(0)
    model = Toy()
    cfg = TrainConfig(out=str(tmp_path / name), steps=12, lr=1e-2, ckpt_every=4, grad_accum=2,
                      resume=kw.pop("resume", False))
    return model, run_training(cfg, model, loss_fn, make_batch, **kw)


def test_resume_is_exact(tmp_path):
    full_model, full = train(tmp_path, "a")
    _, part = train(tmp_path, "b", stop_after=6)  # "killed" after step 6; last checkpoint at step 4
    assert part["steps"] == 6
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 4
    resumed_model, resumed = train(tmp_path, "b", resume=True)
    assert resumed["final_loss"] == full["final_loss"]
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=CHECKPOINT):
        train(tmp_path, "none", resume=True)


def test_no_temporary_files_left(tmp_path):
    train(tmp_path, "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [CHECKPOINT]


def test_schedule_warms_up_then_decays():
    f = lr_lambda(TrainConfig(out="", steps=100, warmup=0.1, min_lr_ratio=0.1))
    values = [f(s) for s in range(100)]
    assert values[0] < values[5] < values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_write_metrics_merges(tmp_path):
    write_metrics(tmp_path, {"a": 1.0})
    write_metrics(tmp_path, {"b": 2.0})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1.0, "b": 2.0}
