"""topopack.model.synth: reproducible, anatomically sensible synthetic slides."""
import numpy as np
import pytest
import torch

from topopack.model.cli import main as cli_main
from topopack.io import load_slide, load_slides
from topopack.model.synth import (LOCATIONS, MARGIN, NECROSIS, SEPTA, SIZE_CLASSES, TISSUE_CLASSES, TUMOR,
                            class_prototypes, make_slide, size_class, write_synthetic)


def grid_of(s):
    """Tissue mask and label image from a slide dict (background = -1)."""
    cell = (s["coords"] - s["coords"].min(0)) // s["patch_size"]
    img = np.full((cell[:, 1].max() + 3, cell[:, 0].max() + 3), -1)  # 1-cell background border
    img[cell[:, 1] + 1, cell[:, 0] + 1] = s["labels"]
    return img


def enclosed_background(img) -> int:
    """Background cells not connected to the border (holes), by flood fill."""
    bg = img < 0
    reach = np.zeros_like(bg)
    reach[0, :] = reach[-1, :] = reach[:, 0] = reach[:, -1] = True
    reach &= bg
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= bg
        if (grown == reach).all():
            return int((bg & ~reach).sum())
        reach = grown


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = write_synthetic(out, 12, seed=5, min_patches=300, max_patches=2500, dim=16, progress=False)
    return paths, load_slides(out)


def test_seeded_reproducibility(tmp_path, slides):
    paths, loaded = slides
    again = write_synthetic(tmp_path, 3, seed=5, min_patches=300, max_patches=2500, dim=16, progress=False)
    for p, q in zip(paths, again):
        a, b = load_slide(p), load_slide(q)
        assert torch.equal(a.features, b.features) and torch.equal(a.coords, b.coords) and a.facts == b.facts
    other = write_synthetic(tmp_path / "o", 1, seed=6, min_patches=300, max_patches=2500, dim=16, progress=False)
    assert not torch.equal(load_slide(other[0]).features[:10], loaded[0].features[:10])


def test_balance_holes_classes_and_facts(slides):
    _, loaded = slides
    assert sum(s.facts["has_tumor"] for s in loaded) == 6  # about half, exactly half by plan
    all_labels = torch.cat([s.labels for s in loaded])
    assert set(all_labels.tolist()) == set(range(len(TISSUE_CLASSES)))
    for s in loaded:
        f = s.facts
        img = grid_of({"coords": s.coords.numpy(), "labels": s.labels.numpy(), "patch_size": s.patch_size})
        assert enclosed_background(img) > 0, f"{s.path}: no tissue holes"
        counts = np.bincount(s.labels.numpy(), minlength=5)
        assert {k: int(v) for k, v in zip(TISSUE_CLASSES, counts)} == f["class_counts"]
        assert f["num_nodules"] == len(f["nodules"]) and (f["num_nodules"] > 0) == f["has_tumor"]
        assert (counts[TUMOR] > 0) == f["has_tumor"] and (counts[MARGIN] > 0) == f["has_tumor"]
        assert counts[SEPTA] > 0
        if f["has_tumor"]:
            big = f["nodules"][0]
            assert big["radius"] == max(n["radius"] for n in f["nodules"])
            assert f["largest_size"] == big["size"] == size_class(big["radius"] / s.patch_size)
            assert f["largest_location"] in LOCATIONS
            assert (counts[NECROSIS] > 0) == (f["largest_size"] == "large")
            # the largest nodule's centre is tumour (or necrosis) tissue, in the named ninth of the tissue box
            x, y = big["center"]
            hit = ((s.coords[:, 0] <= x) & (x < s.coords[:, 0] + s.patch_size)
                   & (s.coords[:, 1] <= y) & (y < s.coords[:, 1] + s.patch_size))
            if hit.any():  # the centre may fall in a vessel hole
                assert int(s.labels[hit][0]) in (TUMOR, NECROSIS)
            x0, y0, x1, y1 = f["tissue_box"]
            assert x0 == s.coords[:, 0].min() and y0 == s.coords[:, 1].min()
            row, col = min(2, int(3 * (y - y0) / (y1 - y0))), min(2, int(3 * (x - x0) / (x1 - x0)))
            assert f["largest_location"] == LOCATIONS[3 * row + col]
    sizes = {s.facts["largest_size"] for s in loaded if s.facts["has_tumor"]}
    assert sizes == set(SIZE_CLASSES)


def test_nodules_span_pack_borders_and_layout_builds(slides):
    _, loaded = slides
    spanning = 0
    for s in loaded:
        layout = s.layout(pack_size=3)
        assert layout.num_patches == s.num_patches and layout.num_packs < s.num_patches
        assert (layout.pack_patch_count < 9).any()  # ragged packs at the outline and holes
        if s.facts["has_tumor"]:
            packs = torch.unique(layout.patch_pack[s.labels == TUMOR])
            spanning += int(packs.numel() > 1)
    assert spanning == 6


def test_size_range_and_features(tmp_path):
    rng = np.random.default_rng(0)
    small = make_slide(rng, 300, dim=8)
    assert 250 <= len(small["labels"]) <= 400
    big = make_slide(np.random.default_rng(1), 120_000, dim=64, has_tumor=True, num_nodules=2, largest_size="large")
    assert len(big["labels"]) > 100_000
    # class prototypes are shared by all slides: per-class means agree across slides
    for s in (small, big):
        protos = class_prototypes(s["features"].shape[1])
        for c in np.unique(s["labels"]):
            err = np.abs(s["features"][s["labels"] == c].mean(0) - protos[c]).max()
            assert err < 1.5, err
    # nearest-prototype decoding recovers most classes
    d = (protos ** 2).sum(1) - 2 * big["features"] @ protos.T
    assert (d.argmin(1) == big["labels"]).mean() > 0.95
    # neighbours predict a patch better than the slide mean (spatial smoothness)
    img = grid_of(big)
    idx = np.full(img.shape, -1)
    cell = (big["coords"] - big["coords"].min(0)) // big["patch_size"] + 1
    idx[cell[:, 1], cell[:, 0]] = np.arange(len(cell))
    f = big["features"]
    inner = (idx[1:-1, 1:-1] >= 0) & (idx[:-2, 1:-1] >= 0) & (idx[2:, 1:-1] >= 0) & (idx[1:-1, :-2] >= 0) & (idx[1:-1, 2:] >= 0)
    ys, xs = np.nonzero(inner)
    ys, xs = ys + 1, xs + 1
    nb = (f[idx[ys - 1, xs]] + f[idx[ys + 1, xs]] + f[idx[ys, xs - 1]] + f[idx[ys, xs + 1]]) / 4
    mse_nb = ((f[idx[ys, xs]] - nb) ** 2).mean()
    mse_mean = ((f[idx[ys, xs]] - f.mean(0)) ** 2).mean()
    assert mse_nb < 0.7 * mse_mean, (mse_nb, mse_mean)


def test_cli(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path), "--slides", "2", "--max-patches", "400", "--dim", "8",
                     "--format", "pt"]) == 0
    loaded = load_slides(tmp_path)
    assert len(loaded) == 2 and loaded[0].in_dim == 8 and loaded[0].path.endswith("slide_000.pt")
    assert "wrote 2 slides" in capsys.readouterr().out
    with pytest.raises(ValueError, match="min_patches"):
        write_synthetic(tmp_path, 1, min_patches=10, max_patches=5)


def test_parallel_writing_and_reading_give_the_same_slides_and_questions(tmp_path):
    """Two worker processes write the same files and generate the same VQA as one process."""
    import h5py

    from topopack.model.vqa_data import generate_vqa

    one = write_synthetic(tmp_path / "one", 6, seed=4, min_patches=300, max_patches=400, progress=False)
    two = write_synthetic(tmp_path / "two", 6, seed=4, min_patches=300, max_patches=400, progress=False, workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        with h5py.File(a) as f, h5py.File(b) as g:
            assert f.attrs["facts"] == g.attrs["facts"]
            assert all(np.array_equal(f[k][:], g[k][:]) for k in ("features", "coords", "labels"))
    assert generate_vqa(one, 1, 8, root=tmp_path / "one") == generate_vqa(two, 1, 8, root=tmp_path / "two", workers=2)
