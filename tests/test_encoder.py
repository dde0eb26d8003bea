"""SlideEncoder: wiring of the topo-pack layout through the blocks, outputs, save/load."""
import pytest
import torch

from topopack import TopoLayout
from topopack.model.encoder import (EncoderOutput, SlideEncoder, SlideEncoderConfig, load_encoder, save_encoder,
                                    sincos_2d, token_positions)

C = 12


def tiny(**kw) -> SlideEncoder:
    cfg = dict(in_dim=C, dim=16, depth=2, heads=2, mlp_dim=32)
    cfg.update(kw)
    return SlideEncoder(SlideEncoderConfig(**cfg)).eval()


def ragged_layout(seed: int, h: int = 7, w: int = 8, keep: float = 0.7, patch_size: int = 4) -> TopoLayout:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    cells = cells[torch.rand(len(cells), generator=g) < keep]
    perm = torch.randperm(len(cells), generator=g)  # input order is not token order
    return TopoLayout.from_coords(cells[perm] * patch_size + 3, patch_size, 3)


def test_outputs_are_the_layout_views_of_the_tokens():
    layout = ragged_layout(0)
    x = torch.randn(2, layout.num_patches, C)
    out = tiny()(x, layout)
    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (2, layout.num_tokens, 16)
    assert torch.equal(out.patches, out.tokens[:, layout.patch_token])
    assert torch.equal(out.summaries, out.tokens[:, layout.pack_summary_token])
    assert torch.equal(out.globals, out.tokens[:, layout.slide_global_token])
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("rules", ["paper", "bidirectional"])
def test_portable_matches_dense_reference(rules):
    layout = ragged_layout(1)
    enc = tiny(rules=rules, backend="portable").double()
    ref = tiny(rules=rules, backend="reference").double()
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(1, layout.num_patches, C, dtype=torch.float64)
    torch.testing.assert_close(enc(x, layout).tokens, ref(x, layout).tokens, rtol=1e-9, atol=1e-9)


def test_paper_rules_keep_packs_apart():
    """With given summary and global inputs, a patch only ever reaches its own pack's patches
    (and, through the summaries, every summary), never another pack's patches. (Without input centring: the
    slide's mean feature, subtracted from every patch, links them all by design.)"""
    layout = ragged_layout(2)
    enc = tiny(depth=3, center_input=False)
    x = torch.randn(1, layout.num_patches, C)
    s, g = torch.randn(1, layout.num_packs, C), torch.randn(1, 1, C)
    i = 5
    y = x.clone()
    y[0, i] += 1.0
    a, b = enc(x, layout, s, g), enc(y, layout, s, g)
    same_pack = layout.patch_pack == layout.patch_pack[i]
    changed = (a.patches - b.patches).abs().amax(-1)[0] > 0
    assert torch.equal(changed, same_pack)
    assert (a.summaries - b.summaries).abs().amax() > 0  # summaries see the pack, then each other
    assert torch.equal(a.globals, b.globals)  # paper rules: the global token sees itself


def test_slides_in_one_layout_do_not_mix():
    la, lb = ragged_layout(3), ragged_layout(4, h=5, w=9)
    enc = tiny()
    xa, xb = torch.randn(1, la.num_patches, C), torch.randn(1, lb.num_patches, C)
    both = enc(torch.cat([xa, xb], 1), TopoLayout.cat([la, lb]))
    torch.testing.assert_close(both.patches, torch.cat([enc(xa, la).patches, enc(xb, lb).patches], 1))
    torch.testing.assert_close(both.summaries, torch.cat([enc(xa, la).summaries, enc(xb, lb).summaries], 1))


def test_gradients_reach_every_parameter():
    layout = ragged_layout(5)
    enc = tiny(pos_embed=True).train()
    enc(torch.randn(1, layout.num_patches, C), layout).tokens.square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_position_code():
    cells = torch.tensor([[0, 0], [0, 1], [5, 2]])
    pe = sincos_2d(cells, 16)
    assert pe.shape == (3, 16)
    assert not torch.allclose(pe[0], pe[1]) and not torch.allclose(pe[1], pe[2])
    layout = ragged_layout(6)
    pos = token_positions(layout, 16)
    torch.testing.assert_close(pos[layout.patch_token], sincos_2d(layout.patch_cell, 16))
    assert torch.equal(pos[layout.slide_global_token], torch.zeros(1, 16))
    # a summary sits at its pack's centre
    centre = layout.pack_cell.float() * 3 + 1
    torch.testing.assert_close(pos[layout.pack_summary_token], sincos_2d(centre, 16))
    # the position code changes the output; without it the encoder ignores where patches are
    x = torch.randn(1, layout.num_patches, C)
    shifted = TopoLayout.from_coords(torch.stack([layout.patch_cell[:, 1], layout.patch_cell[:, 0]], 1) * 4 + 12, 4, 3,
                                     origin=(0, 0))
    plain, posed = tiny(), tiny(pos_embed=True)
    posed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(plain(x, layout).patches, plain(x, shifted).patches)
    assert not torch.allclose(posed(x, layout).patches, posed(x, shifted).patches)


def test_save_load_round_trip(tmp_path):
    enc = tiny(pos_embed=True, rules="bidirectional")
    save_encoder(tmp_path / "enc.pt", enc)
    back = load_encoder(tmp_path / "enc.pt").eval()
    assert back.cfg == enc.cfg
    layout = ragged_layout(7)
    x = torch.randn(1, layout.num_patches, C)
    assert torch.equal(back(x, layout).tokens, enc(x, layout).tokens)
    assert load_encoder(tmp_path / "enc.pt", backend="reference").cfg.backend == "reference"


def test_clear_errors(tmp_path):
    enc = tiny()
    layout = ragged_layout(8)
    with pytest.raises(ValueError, match="in_dim=12"):
        enc(torch.randn(1, layout.num_patches, C + 1), layout)
    with pytest.raises(ValueError, match="pack_size"):
        enc(torch.randn(1, 6, C), TopoLayout.from_grid(2, 3, pack_size=2))
    with pytest.raises(ValueError, match="multiple of heads"):
        SlideEncoderConfig(in_dim=4, dim=10, heads=3)
    with pytest.raises(ValueError, match="rules"):
        SlideEncoderConfig(in_dim=4, rules="dense")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="bad.pt.*not an encoder checkpoint"):
        load_encoder(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_encoder(tmp_path / "missing.pt")


def test_center_input_removes_slide_offsets():
    la, lb = ragged_layout(9), ragged_layout(10, h=5, w=6)
    layout = TopoLayout.cat([la, lb])
    enc = tiny(center_input=True)
    x = torch.randn(1, layout.num_patches, C)
    shifted = x.clone()
    shifted[0, la.num_patches:] += torch.randn(C) * 3  # one slide-wide offset on the second slide
    torch.testing.assert_close(enc(x, layout).tokens, enc(shifted, layout).tokens, rtol=1e-4, atol=1e-4)
    plain = tiny()
    assert not torch.allclose(plain(x, layout).tokens, plain(shifted, layout).tokens)


def test_grad_checkpointing_gives_the_same_gradients():
    """Per-block activation checkpointing recomputes in backward: same output and gradients, dropout included."""
    layout = ragged_layout(4)
    x = torch.randn(1, layout.num_patches, C)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = tiny(depth=2, dropout=0.1).train()
        enc.grad_checkpointing = ckpt
        torch.manual_seed(1)
        out = enc(x, layout).tokens
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in enc.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
