"""The `topopack` console script: dispatch, help, the demo's attention step and its pipeline on a tiny config."""
import json
import re

import pytest

from topopack.model.cli import COMMANDS, main


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_attention_step_reports_sparsity_and_speedup(capsys):
    assert main(["demo", "--attention-only", "--side", "12", "--repeats", "1", "--rules", "bidirectional"]) == 0
    out = capsys.readouterr().out
    assert "patches=144" in out
    assert re.search(r"\d+\.\d+% of dense attention", out)
    assert re.search(r"speed-up \d+\.\d+x", out)


TINY_DEMO = ["demo", "--side", "6", "--repeats", "1", "--train-slides", "6", "--test-slides", "3", "--mae-steps", "2",
             "--connector-steps", "2", "--vqa-steps", "3", "--per-slide", "4", "--qformer-dim", "32"]


def test_demo_pipeline_blind_control_alongside_equals_sequential(tmp_path):
    """The blind control trained in a second process ends where the in-process run ends: same loss, same answers."""
    results = {}
    for mode in ("--parallel-blind", "--no-parallel-blind"):
        out = tmp_path / mode.strip("-")
        assert main(TINY_DEMO + ["--out", str(out), mode]) == 0
        metrics = json.loads((out / "blind" / "metrics.json").read_text())
        evaluation = json.loads((out / "eval.json").read_text())
        assert evaluation["device"] == "cpu" and set(evaluation["scales"]) == {"WSI", "ROI", "Patch"}
        rows = [json.loads(line) for line in (out / "blind" / "predictions.jsonl").read_text().splitlines()]
        preds = [{k: v for k, v in r.items() if k != "image"} for r in rows]  # image paths differ by OUT
        results[mode] = (metrics["final_loss"], metrics["steps"], preds)
    assert results["--parallel-blind"][1] == 3
    assert results["--parallel-blind"] == results["--no-parallel-blind"]


def test_user_mistake_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["ask", str(tmp_path / "missing.h5"), "q", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topopack ask: error:") and "model.json" in err and len(err.splitlines()) == 1


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from topopack.model.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'topopack --help imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "COMMAND" in done.stdout


def test_single_process_commands_refuse_torchrun(monkeypatch, capsys):
    """Under torchrun only pretrain and finetune run (rank 0 writes); the others would write from every rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["synth", "--out", "x"]) == 2
    assert "launch it without torchrun" in capsys.readouterr().err
