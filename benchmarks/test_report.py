"""The benchmark's report: ratios, the markdown table against the measured records, the JSON round trip."""
import datetime
import json
from dataclasses import asdict

import pytest
import torch

from benchmarks.attention import run
from benchmarks.contenders import Config
from benchmarks.report import Record, add_ratios, markdown, write_json

WHEN = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="module")
def measured():
    """A real tiny run on the CPU, with the contenders that need no compile."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = Config(device="cpu", sizes=(4,), heads=2, head_dim=8, quick=True,
                 impls=("topopack-triton", "topopack-portable", "dense", "authors", "floor"))
    try:
        return cfg, run(cfg)
    finally:
        torch.set_num_threads(n)


def rows(text):
    """The table's body rows as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| side")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def close(cell, value, rel=6e-3):
    """A cell printed to 3 (or 4) significant digits shows value; '—' shows None."""
    if value is None:
        return cell == "—"
    return cell != "—" and float(cell) == pytest.approx(value, rel=rel, abs=1e-300)


def pair(cell, a, b, rel=6e-3):
    if a is None and b is None:
        return cell == ""
    left, right = cell.split(" / ")
    return close(left, a, rel) and close(right, b, rel)


def test_table_rows_show_the_measured_records(measured):
    cfg, records = measured
    table = rows(markdown(records, cfg, 1.0))
    assert len(table) == len(records) == 5
    for cells, r in zip(table, (asdict(r) for r in records)):
        assert cells[:4] == [str(r["grid_side"]), str(r["n_patches"]), str(r["n_tokens"]), r["impl"]]
        if r["status"] != "ok":
            assert r["impl"] == "topopack-triton" and cells[-1] == f"skipped: {r['note']}"
            continue
        assert close(cells[4], r["fwd_ms"]) and close(cells[5], r["fwd_vs_topopack"])
        assert close(cells[6], r["fwdbwd_ms"]) and close(cells[7], r["fwdbwd_vs_topopack"])
        assert pair(cells[8], r["fwd_x_floor"], r["fwdbwd_x_floor"])
        assert pair(cells[9], r["fwd_vs_best_flex"], r["fwdbwd_vs_best_flex"])
        assert close(cells[10], r["peak_mem_mb"], rel=6e-4)
        assert cells[11] == "" if r["setup_ms"] is None else cells[11].startswith(f"{r['setup_ms']:.3g} (")
        assert pair(cells[12], r["first_call_ms"], r["first_fwdbwd_ms"])
        assert pair(cells[13], r["host_fwd_us"], r["host_fwdbwd_us"])
        assert cells[14] == f"{r['launches_fwd']} / {r['launches_fwdbwd']}"
        assert close(cells[15], r["max_abs_err"], rel=0.06) and cells[16] == r["note"]


def test_measured_records_hold_every_column(measured):
    _, records = measured
    for r in records:
        if r.impl == "topopack-triton":
            assert r.status == "skipped"
            continue
        assert r.status == "ok", r.note
        assert r.fwd_ms > 0 and r.fwdbwd_ms > 0 and r.host_fwd_us > 0 and r.host_fwdbwd_us > 0
        assert r.launches_fwd >= 1 and r.launches_fwdbwd > r.launches_fwd  # the backward adds ops
        assert r.fwd_vs_best_flex is None  # no flex contender ran
    by = {(r.grid_side, r.impl): r for r in records}
    assert by[4, "authors"].max_abs_err < 1e-5  # against topopack-portable's output
    assert by[4, "topopack-portable"].fwd_x_floor == pytest.approx(
        by[4, "topopack-portable"].fwd_ms / by[4, "floor"].fwd_ms)


def test_markdown_json_round_trip(measured, tmp_path):
    cfg, records = measured
    write_json(records, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded == [asdict(r) for r in records]
    again = [Record(**d) for d in loaded]
    assert markdown(again, cfg, 12.0, WHEN) == markdown(records, cfg, 12.0, WHEN)


def record(impl, fwd, fwdbwd=None, status="ok"):
    return Record(impl=impl, device="cuda", device_name="gpu", grid_side=9, n_patches=81, n_tokens=91, heads=8,
                  head_dim=64, dtype="bf16", rules="paper", status=status, fwd_ms=fwd, fwdbwd_ms=fwdbwd)


def test_add_ratios_divide_by_topopack_the_fastest_ok_flex_and_the_floor():
    recs = [record("topopack-triton", 2.0, 8.0), record("topopack-portable", 20.0, 80.0),
            record("flex", 6.0, 10.0), record("flex-arith", 4.0, 16.0), record("flex-interleaved", 1.0, 1.0, "failed"),
            record("floor", 1.0, 4.0)]
    add_ratios(recs)
    triton, portable, flex, arith, interleaved, floor = recs
    assert (flex.fwd_vs_topopack, flex.fwdbwd_vs_topopack) == (6.0 / 2.0, 10.0 / 8.0)  # triton, where it ran
    assert (triton.fwd_vs_best_flex, triton.fwdbwd_vs_best_flex) == (2.0 / 4.0, 8.0 / 10.0)  # best of each kind
    assert (arith.fwd_vs_best_flex, flex.fwdbwd_vs_best_flex) == (1.0, 1.0)
    assert (triton.fwd_x_floor, portable.fwdbwd_x_floor) == (2.0 / 1.0, 80.0 / 4.0)
    assert flex.fwd_x_floor is None and interleaved.fwd_vs_best_flex is None  # floor ratios: topopack rows only


def test_table_names_the_launch_column_by_device():
    recs = [record("topopack-triton", 2.0)]
    cfg = Config(device="cuda", sizes=(9,))
    assert "| kernels fwd / f+b |" in markdown(recs, cfg, 1.0, WHEN)
    recs[0].device = "cpu"
    assert "| aten ops fwd / f+b |" in markdown(recs, cfg, 1.0, WHEN)
