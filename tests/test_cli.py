"""The `topopack` console script: dispatch, help, and the demo's attention step."""
import re

import pytest

from topopack.cli import COMMANDS, main


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
