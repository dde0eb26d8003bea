"""The shared training loop: exact resume, atomic checkpoints, flags checked at parse time, schedule, metrics,
progress in a log."""
import argparse
import io
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from topopack.model.progress import progress
from topopack.model.trainer import (CHECKPOINT, TrainConfig, add_train_arguments, build_scheduler, load_checkpoint,
                                    run_training, write_metrics)


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
    return model, run_training(cfg, model, loss_fn, make_batch, run_config={"model": "toy"}, **kw)


def test_resume_is_exact(tmp_path):
    full_model, full = train(tmp_path, "a")
    _, part = train(tmp_path, "b", stop_after=6)  # "killed" after step 6; last checkpoint at step 4
    assert part["steps"] == 6
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 4
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


# ---- flags ------------------------------------------------------------------------------
BAD_FLAGS = [["--steps", "0"], ["--steps", "-5"], ["--ckpt-every", "0"], ["--grad-accum", "0"], ["--lr", "0"],
             ["--lr", "-1e-3"], ["--lr", "nan"], ["--warmup", "1"], ["--warmup", "-0.1"], ["--clip", "-1"],
             ["--weight-decay", "-0.1"], ["--min-lr-ratio", "1.5"], ["--seed", "-1"], ["--steps", "2.5"]]


@pytest.mark.parametrize("flag", BAD_FLAGS, ids=lambda f: " ".join(f))
def test_bad_numeric_flags_fail_at_parse_time(flag, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", "o", *flag])
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err


def test_bad_settings_fail_in_python_too():
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(out="o", steps=0)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        TrainConfig(out="o", resume=True, overwrite=True)


def test_command_defaults_override_the_dataclass():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, steps=7, lr=0.5)
    args = parser.parse_args(["--out", "o"])
    assert (args.steps, args.lr, args.ckpt_every) == (7, 0.5, TrainConfig.ckpt_every)
    assert "(default: 7)" in parser.format_help()


# ---- schedule ---------------------------------------------------------------------------
def test_schedule_warms_up_linearly_then_decays_to_min_ratio():
    steps, warm, lr, floor = 100, 10, 0.5, 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, TrainConfig(out="", steps=steps, lr=lr, warmup=warm / steps, min_lr_ratio=floor))
    values = []
    for _ in range(steps + 1):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert values[:warm + 1] == pytest.approx([lr * s / warm for s in range(warm + 1)])
    assert all(a > b for a, b in zip(values[warm:steps], values[warm + 1:steps + 1]))
    for s in (25, 50, 75, steps):  # half a cosine from lr down to floor * lr
        want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
        assert values[s] == pytest.approx(want)


def test_importing_the_trainer_does_not_import_transformers():
    code = "import sys, topopack.model.trainer; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- metrics ----------------------------------------------------------------------------
def test_write_metrics_merges(tmp_path):
    write_metrics(tmp_path, {"a": 1.0})
    write_metrics(tmp_path, {"b": 2.0})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_write_metrics_refuses_non_finite_numbers(tmp_path, bad):
    write_metrics(tmp_path, {"a": 1.0})
    with pytest.raises(ValueError, match=r"eval\.loss\[1\]|eval\.loss\.1"):
        write_metrics(tmp_path, {"eval": {"loss": [0.5, bad]}})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1.0}  # still valid JSON, unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ---- progress ---------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_prints_a_line_every_10_percent():
    log = io.StringIO()
    bar = progress(range(1000), desc="job", file=log)
    for i in bar:
        bar.set_postfix({"loss": f"{1 / (i + 1):.3g}"})
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert [line.split()[1] for line in lines] == [f"{n}/1000" for n in range(100, 1001, 100)]
    assert lines[-1].startswith("job: 1000/1000 (100%) loss=0.001")


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm.auto import tqdm

    assert isinstance(progress(range(3), file=Terminal()), tqdm)


def test_training_log_off_a_terminal_has_status_lines_not_a_redrawn_bar(tmp_path, capsys):
    train(tmp_path, "log")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "train: 12/12 (100%)" in err and len(err.splitlines()) <= 12
