"""The Triton config table, its lookup, tuning and benchmarks/tune_triton.py, without running a kernel.

The kernels themselves run with every config of the table (and every tuning candidate)
in tests/test_triton.py, against the float64 reference.
"""
import copy
import json
import re

import pytest
import torch

from benchmarks import tune_triton
from topopack.kernels import triton_configs as configs, triton_meta as meta

SEED_ROW = {"arch": "*", "head_dim": "*", "pack_size": "*", "size": "*",
            "configs": copy.deepcopy(configs.lookup(configs.Key("no-such-arch", 0, 0, 0)))}


def write_table(tmp_path, *rows, name="table.json"):
    path = tmp_path / name
    path.write_text(configs.dumps({"about": "test", "rows": list(rows)}))
    return str(path)


def row(arch="*", head_dim="*", pack_size="*", size="*", **launches):
    return {"arch": arch, "head_dim": head_dim, "pack_size": pack_size, "size": size, "configs": launches}


def test_committed_table_is_complete_and_round_trips():
    rows = configs.table()
    assert any(all(r[f] == configs.ANY for f in configs.FIELDS) for r in rows)
    unnamed = dict(arch="x", head_dim=0, pack_size=0, size=0)  # matches '*' only
    for r in rows:  # every row resolves to every parameter of every launch
        got = configs.lookup(configs.Key(**{f: unnamed[f] if r[f] == configs.ANY else r[f] for f in configs.FIELDS}))
        assert {l: set(p) for l, p in got.items()} == {l: set(p) for l, p in configs.PARAMS.items()}
    text = configs.TABLE.read_text()
    assert configs.dumps(json.loads(text)) == text  # tune_triton rewrites it in the same format


def test_lookup_applies_rows_from_the_least_to_the_most_specific(tmp_path):
    path = write_table(
        tmp_path, SEED_ROW,
        row("sm90", fwd={"PATCH_BLOCK_M": 64}, bwd={"num_warps": 8}),
        row("*", 64, fwd={"PATCH_BLOCK_M": 16, "SUMMARY_BLOCK_M": 128}),  # less specific than an arch row
        row("sm90", 64, 3, 65536, fwd={"num_stages": 4}))
    seed = SEED_ROW["configs"]
    exact = configs.lookup(configs.Key("sm90", 64, 3, 65536), path)
    assert exact["fwd"] == {**seed["fwd"], "SUMMARY_BLOCK_M": 128, "PATCH_BLOCK_M": 64, "num_stages": 4}
    assert exact["bwd"] == {**seed["bwd"], "num_warps": 8}
    # a key the table lacks falls back to its arch's row, then to '*'
    assert configs.lookup(configs.Key("sm90", 128, 2, 16384), path)["fwd"] == {**seed["fwd"], "PATCH_BLOCK_M": 64}
    assert configs.lookup(configs.Key("sm80", 32, 2, 16384), path) == seed
    assert configs.lookup(configs.Key("sm80", 64, 2, 16384), path)["fwd"]["PATCH_BLOCK_M"] == 16


@pytest.mark.parametrize("rows, match", [
    ([row("sm90", fwd={"PATCH_BLOCK_M": 32})], "needs a row with every key field '\\*'"),
    ([SEED_ROW, row("sm90", fwd={"BLOCK_Q": 32})], r"row 1 .*unknown launch or parameters fwd \['BLOCK_Q'\]"),
    ([SEED_ROW, row("sm90", attn={"num_warps": 4})], "row 1 .*unknown launch or parameters attn"),
    ([SEED_ROW, row("sm90", fwd={"SUMMARY_BLOCK_N": 48})], "row 1 .*SUMMARY_BLOCK_N.*powers of two"),
    ([SEED_ROW, row("sm90", bwd={"PATCH_BLOCK_M": 8})], "row 1 .*PATCH_BLOCK_M at least 16"),
    ([SEED_ROW, {"arch": "sm90", "configs": {}}], "row 1 .*must have the fields"),
], ids=["no-default-row", "unknown-param", "unknown-launch", "not-power-of-two", "patch-block-too-small",
        "missing-field"])
def test_bad_tables_are_refused_naming_the_row(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        configs.table(write_table(tmp_path, *rows))


def test_size_buckets():
    b = meta.MIN_SIZE_BUCKET
    assert [meta.size_bucket(n) for n in (1, b, b + 1, 4 * b, 4 * b + 1)] == [b, b, 4 * b, 4 * b, 16 * b]


def test_tune_takes_the_fastest_candidate_of_each_knob_and_skips_those_that_do_not_fit():
    from triton.runtime.errors import OutOfResources

    def run(cfg):
        if cfg["fwd"]["SUMMARY_BLOCK_M"] == 128 and cfg["fwd"]["SUMMARY_BLOCK_N"] == 64:
            raise OutOfResources(300000, 232448, "shared memory")
        return cfg

    def bench(fn):  # a made-up cost: fastest at (128, 32) among what fits, and at PATCH_BLOCK_M 16
        cfg = fn()["fwd"]
        return abs(cfg["SUMMARY_BLOCK_M"] - 128) + abs(cfg["SUMMARY_BLOCK_N"] - 32) + abs(cfg["PATCH_BLOCK_M"] - 16)

    base = SEED_ROW["configs"]
    got = configs.tune(base, configs.knobs(("fwd",), global_sees_all=False)[:2], run, bench)
    assert got["fwd"] == {**base["fwd"], "SUMMARY_BLOCK_M": 128, "SUMMARY_BLOCK_N": 32, "PATCH_BLOCK_M": 16}
    assert got["bwd"] == base["bwd"] and base == SEED_ROW["configs"]  # the base is not mutated


def test_knobs_leave_out_what_paper_never_reads():
    paper = configs.knobs(("fwd", "fwd_merge"), global_sees_all=False)
    both = configs.knobs(("fwd", "fwd_merge"))
    assert {(k.launch, k.names) for k in both} - {(k.launch, k.names) for k in paper} == {
        ("fwd_merge", ("BLOCK", "num_warps"))}
    for k in configs.KNOBS:  # every candidate is a valid table value
        for values in k.values:
            configs.check_rows([SEED_ROW, row("x", **{k.launch: dict(zip(k.names, values))})], "candidates")


def test_autotune_is_off_unless_asked_and_refused_on_the_interpreter(monkeypatch):
    monkeypatch.delenv("TOPOPACK_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(meta, "INTERPRET", False)
    assert configs.autotune_requested(None) is False
    monkeypatch.setenv("TOPOPACK_TRITON_AUTOTUNE", "1")
    assert configs.autotune_requested(None) is True and configs.autotune_requested(False) is False
    monkeypatch.setattr(meta, "INTERPRET", True)
    with pytest.raises(ValueError, match="interpreter cannot; unset TOPOPACK_TRITON_AUTOTUNE"):
        configs.autotune_requested(None)
    monkeypatch.delenv("TOPOPACK_TRITON_AUTOTUNE")
    with pytest.raises(ValueError, match="interpreter cannot"):
        configs.autotune_requested(True)


def test_resolve_tunes_only_when_asked_and_once_per_size_bucket(monkeypatch):
    monkeypatch.setattr(configs, "arch", lambda device: "sm90")
    monkeypatch.setattr(configs, "_TUNED", {})
    timed = []
    monkeypatch.setattr(configs, "bench_ms", lambda fn: timed.append(fn()) or -float(len(timed)))  # last fastest
    run = lambda cfg: cfg  # noqa: E731
    b = meta.MIN_SIZE_BUCKET

    def resolve(tokens, autotune):
        q = torch.empty(1, 1, tokens, 64)
        return configs.resolve(q, 3, ("fwd",), False, autotune, run)

    table = configs.lookup(configs.Key("sm90", 64, 3, b))
    assert resolve(100, False) is table and not timed
    tuned = resolve(100, True)
    n = sum(len(k.values) for k in configs.knobs(("fwd",), global_sees_all=False))
    assert len(timed) == n and tuned["fwd"] == {**table["fwd"], **{name: k.values[-1][i] for k in configs.knobs(
        ("fwd",), global_sees_all=False) for i, name in enumerate(k.names)}}
    assert resolve(b, True) is tuned and resolve(b - 7, False) is tuned and len(timed) == n  # same bucket
    resolve(b + 1, True)
    assert len(timed) == 2 * n  # a new bucket is a new key


def test_tune_script_dry_run_lists_every_key_and_candidate(capsys):
    assert tune_triton.main(["--dry-run", "--arch", "sm80", "--head-dims", "64", "128", "--pack-sizes", "2", "3",
                             "--sizes", "10000", "100000"]) == 0
    out = capsys.readouterr().out
    keys = [line for line in out.splitlines() if line.startswith("key ")]
    b = meta.MIN_SIZE_BUCKET
    assert len(keys) == 8 and all(f"size {s}:" in "".join(keys) for s in (b, 16 * b))
    for line in keys:  # the synthetic slide lands in its bucket
        size, tokens = re.search(r" size (\d+): .*, (\d+) tokens", line).groups()
        assert meta.size_bucket(int(tokens)) == int(size)
    for knob in configs.KNOBS:
        assert out.count(f"{knob.launch} {','.join(knob.names)}: ") == 8
    assert out.strip().endswith(f"{8 * sum(len(k.values) for k in configs.KNOBS)} timings")


def test_tune_script_replaces_the_row_of_its_key(tmp_path):
    path = tmp_path / "table.json"  # new: starts as the committed table
    before = configs.table()
    cfg = copy.deepcopy(configs.lookup(configs.Key("sm90", 64, 3, 65536)))
    cfg["fwd"]["PATCH_BLOCK_M"] = 64
    new = dict(configs.Key("sm90", 64, 3, 65536)._asdict(), source="test", configs=cfg)
    tune_triton.write_row(path, new)
    cfg = copy.deepcopy(cfg)
    cfg["fwd"]["PATCH_BLOCK_M"] = 16
    tune_triton.write_row(path, dict(new, configs=cfg))
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == len(before) + 1 and all(r in rows for r in before)
    assert configs.lookup(configs.Key("sm90", 64, 3, 65536), str(path))["fwd"]["PATCH_BLOCK_M"] == 16
