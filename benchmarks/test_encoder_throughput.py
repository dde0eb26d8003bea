"""benchmarks/encoder_throughput.py: the FLOP count behind MFU, and a CPU smoke run of every row kind."""
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import encoder_throughput as et
from topopack import RULES_BY_NAME, TopoLayout
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig
from topopack.reference import dense_mask


def test_flops_count_matches_torchs_counter_and_the_mask(monkeypatch):
    """Projections + FFN: torch's FLOP counter with the attention stubbed out; attention: 4 d per allowed pair,
    the pairs counted from the dense mask."""
    cfg = SlideEncoderConfig(in_dim=12, dim=16, depth=2, heads=2, mlp_dim=24, dropout=0.0)
    layout = TopoLayout.from_coords(torch.tensor([[x, y] for x in range(7) for y in range(5) if (x + y) % 4]), 1, 3)
    encoder = SlideEncoder(cfg).eval()
    # attention that does no matmul (v passes through): what the counter sees is every linear layer
    monkeypatch.setattr("topopack.attention.get_backend", lambda name, device: lambda q, k, v, *a: v)
    with FlopCounterMode(display=False) as counter:
        encoder(torch.randn(1, layout.num_patches, cfg.in_dim), layout)
    pairs = int(dense_mask(layout, RULES_BY_NAME[cfg.rules]).sum())
    assert et.encoder_flops(cfg, layout) == counter.get_total_flops() + cfg.depth * 4 * cfg.dim * pairs
    assert et.encoder_flops(cfg, layout, backward=True) == 3 * et.encoder_flops(cfg, layout)


def test_cpu_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "rows.json"
    et.main(["--device", "cpu", "--sides", "9", "--in-dim", "8", "--dim", "16", "--depth", "1", "--heads", "2",
             "--mlp-dim", "16", "--repeats", "1", "--no-compile", "--whole-slide", "6", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd", "train step (grad ckpt)"]
    for r in rows:
        assert r["patches"] == r["side"] ** 2 and abs(r["patches_per_s"] * r["ms"] / 1e3 - r["patches"]) < 1e-6 * r["patches"]
        assert r["mfu"] is None  # no known peak on the CPU
    assert rows[0]["tflops"] > 0 and et.peak_tflops(torch.device("cpu"), 100.0) == 100.0
