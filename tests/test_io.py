"""topopack.io: round trips, TRIDENT/CLAM attribute variants, one error per bad-file case."""
import json

import h5py
import numpy as np
import pytest
import torch

from topopack import TopoLayout
from topopack.io import Slide, SlideError, find_slides, load_slide, load_slides, save_slide


def random_slide(rng, n=None, c=8, ps=224):
    """Random ragged grid of unique cells, features, labels, facts.

    The cells start with a 2x2 block, so the coords step by ``ps`` (load_slide rejects a larger step).
    """
    h, w = rng.integers(3, 12, 2)
    n = n or int(rng.integers(1, h * w + 1))
    block = [0, 1, w, w + 1]
    cells = np.concatenate([block, rng.permutation(np.setdiff1d(np.arange(h * w), block))])[:n]
    origin = rng.integers(0, 10_000, 2)
    coords = np.stack([origin[0] + (cells % w) * ps, origin[1] + (cells // w) * ps], 1)
    return dict(features=rng.normal(size=(n, c)).astype(np.float32), coords=coords, patch_size=ps,
                labels=rng.integers(0, 5, n), facts={"has_tumor": bool(rng.random() < 0.5), "n": int(n)})


@pytest.mark.parametrize("suffix", [".h5", ".pt"])
@pytest.mark.parametrize("seed", range(3))
def test_round_trip(tmp_path, suffix, seed):
    rng = np.random.default_rng(seed)
    s = random_slide(rng)
    glob_f = rng.normal(size=8).astype(np.float32)
    path = save_slide(tmp_path / f"s{suffix}", s["features"], s["coords"], s["patch_size"], labels=s["labels"],
                      facts=s["facts"], global_features=glob_f)
    slide = load_slide(path)
    assert isinstance(slide, Slide) and slide.path == str(path)
    assert slide.features.dtype == torch.float32 and slide.coords.dtype == torch.int64
    np.testing.assert_array_equal(slide.features.numpy(), s["features"])
    np.testing.assert_array_equal(slide.coords.numpy(), s["coords"])
    np.testing.assert_array_equal(slide.labels.numpy(), s["labels"])
    np.testing.assert_array_equal(slide.global_features.numpy(), glob_f)
    assert slide.patch_size == s["patch_size"] and slide.facts == s["facts"]
    assert slide.in_dim == 8 and slide.num_patches == len(s["coords"])
    ref = TopoLayout.from_coords(torch.as_tensor(s["coords"]), s["patch_size"], 2)
    lay = slide.layout(pack_size=2)
    assert torch.equal(lay.patch_token, ref.patch_token) and torch.equal(lay.pack_cell, ref.pack_cell)


def write_h5(path, features, coords, coord_attrs=None, file_attrs=None, **datasets):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=coords)
        for k, v in (coord_attrs or {}).items():
            f["coords"].attrs[k] = v
        for k, v in (file_attrs or {}).items():
            f.attrs[k] = v
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


@pytest.mark.parametrize("attrs,where,expect", [
    ({"patch_size_level0": 512, "patch_size": 256}, "coords", 512),  # TRIDENT (20x from 40x)
    ({"patch_size": 256, "downsample": [2.0, 2.0], "patch_level": 1}, "coords", 512),  # CLAM
    ({"patch_size": 256, "downsample": 4.0}, "file", 1024),
    ({"patch_size": 256, "patch_level": 0}, "file", 256),
])
def test_attribute_variants(tmp_path, attrs, where, expect):
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(6) * expect + 7, np.zeros(6, int)], 1)
    kw = {"coord_attrs": attrs} if where == "coords" else {"file_attrs": attrs}
    path = write_h5(tmp_path / "t.h5", rng.normal(size=(6, 4)), coords, **kw)
    assert load_slide(path).patch_size == expect
    assert load_slide(path).layout(3).num_packs == 2


def test_pt_dict_with_clam_keys(tmp_path):
    coords = torch.tensor([[0, 0], [512, 0], [0, 512]])
    torch.save({"features": torch.randn(3, 5), "coords": coords, "patch_size": 256, "downsample": 2}, tmp_path / "a.pt")
    assert load_slide(tmp_path / "a.pt").patch_size == 512


def test_summary_features_checked_against_packs(tmp_path):
    rng = np.random.default_rng(1)
    coords = np.stack([np.arange(9) * 100, np.zeros(9, int)], 1)  # 1 x 9 grid: 3 packs at k=3
    path = save_slide(tmp_path / "s.h5", rng.normal(size=(9, 4)), coords, 100, summary_features=rng.normal(size=(3, 4)))
    slide = load_slide(path)
    assert slide.layout(3).num_packs == 3
    with pytest.raises(SlideError, match=r"s\.h5.*summary_features has 3 rows.*5 packs"):
        slide.layout(2)


GOOD_COORDS = np.array([[0, 0], [256, 0], [0, 256], [512, 512]])


def bad_cases(tmp_path):
    """(file, expected message regex) for each bad-file case."""
    f4 = np.ones((4, 3), np.float32)
    attrs = {"patch_size_level0": 256}
    nan = f4.copy()
    nan[2, 1] = np.nan
    inf_c = GOOD_COORDS.astype(float)
    inf_c[1, 0] = np.inf
    cases = {
        "missing_coords.h5": (lambda p: h5py.File(p, "w").create_dataset("features", data=f4).file.close(),
                              r"missing dataset.*'coords'"),
        "nan.h5": (lambda p: write_h5(p, nan, GOOD_COORDS, attrs), r"'features' contains NaN or inf"),
        "inf_coords.h5": (lambda p: write_h5(p, f4, inf_c, attrs), r"'coords' contains NaN or inf"),
        "off_grid.h5": (lambda p: write_h5(p, f4, GOOD_COORDS + [[0, 0], [0, 0], [3, 0], [0, 0]], attrs),
                        r"not on the patch grid"),
        "duplicate.h5": (lambda p: write_h5(p, f4, GOOD_COORDS[[0, 1, 2, 2]], attrs), r"duplicate coords"),
        "empty.h5": (lambda p: write_h5(p, np.zeros((0, 3)), np.zeros((0, 2)), attrs), r"zero patches"),
        "mismatch.h5": (lambda p: write_h5(p, np.ones((5, 3)), GOOD_COORDS, attrs), r"mismatched lengths: 5 features but 4"),
        "wrong_dims.h5": (lambda p: write_h5(p, np.ones((4, 3, 2)), GOOD_COORDS, attrs), r"'features' must be 2-D"),
        "coords_dims.h5": (lambda p: write_h5(p, f4, np.ones((4, 3)), attrs), r"'coords' must have shape \[N, 2\]"),
        "no_patch_size.h5": (lambda p: write_h5(p, f4, GOOD_COORDS), r"missing the patch size"),
        "bad_labels.h5": (lambda p: write_h5(p, f4, GOOD_COORDS, attrs, labels=np.array([0, 1, -1, 2])),
                          r"'labels' must be non-negative integers"),
        "bad_facts.h5": (lambda p: write_h5(p, f4, GOOD_COORDS, attrs, file_attrs={"facts": "{not json"}),
                         r"'facts' is not valid JSON"),
        "corrupt.h5": (lambda p: p.write_bytes(b"this is not an hdf5 file"), r"unreadable file"),
        "corrupt.pt": (lambda p: p.write_bytes(b"garbage"), r"unreadable file"),
        "list.pt": (lambda p: torch.save([1, 2], p), r"must hold a dict"),
    }
    out = []
    for name, (make, pattern) in cases.items():
        path = tmp_path / name
        make(path)
        out.append((path, pattern))
    return out


def test_each_bad_file_names_file_and_problem(tmp_path):
    for path, pattern in bad_cases(tmp_path):
        with pytest.raises(SlideError) as info:
            load_slide(path)
        msg = str(info.value)
        assert msg.startswith(str(path)), msg
        assert __import__("re").search(pattern, msg), (pattern, msg)


def test_load_slides_reports_all_bad_files(tmp_path):
    bad = bad_cases(tmp_path)
    rng = np.random.default_rng(3)
    s = random_slide(rng)
    save_slide(tmp_path / "good.h5", s["features"], s["coords"], s["patch_size"])
    with pytest.raises(SlideError) as info:
        load_slides(tmp_path)
    msg = str(info.value)
    assert f"{len(bad)} bad slide file(s)" in msg
    for path, _ in bad:
        assert str(path) in msg
    assert "good.h5" not in msg
    (tmp_path / "only").mkdir()
    save_slide(tmp_path / "only" / "b.h5", s["features"], s["coords"], s["patch_size"])
    save_slide(tmp_path / "only" / "a.pt", s["features"], s["coords"], s["patch_size"])
    assert [p.name for p in find_slides(tmp_path / "only")] == ["a.pt", "b.h5"]
    assert len(load_slides(tmp_path / "only")) == 2


def test_find_slides_errors(tmp_path):
    with pytest.raises(SlideError, match="no slide files"):
        find_slides(tmp_path)
    with pytest.raises(SlideError, match="not a directory"):
        find_slides(tmp_path / "nope")
    with pytest.raises(SlideError, match="unsupported file type"):
        load_slide(tmp_path / "x.csv")


def test_facts_json_attribute(tmp_path):
    facts = {"has_tumor": True, "nodules": [{"center": [1.5, 2.0], "size": "small"}]}
    path = save_slide(tmp_path / "f.h5", np.ones((2, 2)), [[0, 0], [10, 0]], 10, facts=facts)
    with h5py.File(path) as f:
        assert json.loads(f.attrs["facts"]) == facts
    assert load_slide(path).facts == facts


def test_layout_cache_and_origin(tmp_path):
    rng = np.random.default_rng(7)
    s = random_slide(rng, ps=100)
    slide = load_slide(save_slide(tmp_path / "c.h5", s["features"], s["coords"], 100))
    assert slide.layout(3) is slide.layout(3) is slide.layout(3, origin=slide.origin)
    shifted = (slide.origin[0] - 100, slide.origin[1] - 200)
    lay = slide.layout(3, origin=shifted)
    ref = TopoLayout.from_coords(torch.as_tensor(s["coords"]), 100, 3, origin=shifted)
    assert torch.equal(lay.pack_cell, ref.pack_cell) and torch.equal(lay.patch_token, ref.patch_token)
    with pytest.raises(SlideError, match=r"c\.h5: coords lie before the given origin"):
        slide.layout(3, origin=(slide.origin[0] + 100, slide.origin[1]))


def grid_coords(cols, rows, step, origin=(1000, 2000)):
    """Level-0 top-left coords of every cell of a cols x rows grid with the given step."""
    cy, cx = np.divmod(np.arange(cols * rows), cols)
    return np.stack([origin[0] + cx * step, origin[1] + cy * step], 1)


def cell_layout(cols, rows, k=3):
    """Reference layout of a full cols x rows grid, built from integer cells."""
    return TopoLayout.from_coords(torch.as_tensor(grid_coords(cols, rows, 1, (0, 0))), 1, k)


@pytest.mark.parametrize("attrs", [{"patch_size": 256}, {"patch_size_level0": 256, "patch_size": 256}])
def test_patch_size_smaller_than_coords_step_is_an_error(tmp_path, attrs):
    """CLAM at level 1 without downsample (or a wrong patch_size_level0): coords step 512, attribute 256."""
    rng = np.random.default_rng(0)
    path = write_h5(tmp_path / "clam.h5", rng.normal(size=(36, 4)), grid_coords(6, 6, 512), attrs)
    attr = "patch_size_level0" if "patch_size_level0" in attrs else "patch_size"
    msg = rf"clam\.h5: .*step by 512 .*patch size is 256.*patch_size=512 / --patch-size 512.*'{attr}'"
    with pytest.raises(SlideError, match=msg):
        load_slide(path)
    passed = r"clam\.h5: .*step by 512 .*patch size is 256 \(patch_size=256 as passed.*patch_size=512"
    with pytest.raises(SlideError, match=passed):
        load_slide(path, patch_size=256)  # an override is checked the same way
    with pytest.raises(SlideError, match=r"clam\.h5: coords are not on the patch grid.*512.*1024"):
        load_slide(path, patch_size=1024)  # must divide the step
    slide = load_slide(path, patch_size=512)
    ref = cell_layout(6, 6)
    lay = slide.layout(3)
    assert lay.num_packs == 4 and torch.equal(lay.pack_patch_count, ref.pack_patch_count)
    assert torch.equal(lay.patch_token, ref.patch_token) and torch.equal(lay.pack_cell, ref.pack_cell)
    with pytest.raises(SlideError, match=r"clam\.h5: .*step by 512.*patch_size=512"):
        load_slides(tmp_path)
    assert len(load_slides(tmp_path, patch_size=512)) == 1


@pytest.mark.parametrize("cols,rows", [(1, 1), (1, 7), (7, 1)])
def test_single_row_or_column_loads(tmp_path, cols, rows):
    """An axis with one patch position has no step to check: such slides load with the file's patch size."""
    coords = grid_coords(cols, rows, 512)
    path = write_h5(tmp_path / "line.h5", np.ones((len(coords), 2)), coords, {"patch_size_level0": 512})
    slide = load_slide(path)
    assert slide.patch_size == 512 and slide.layout(3).num_packs == -(-max(cols, rows) // 3)


@pytest.mark.parametrize("attrs,problem", [
    ({"patch_size": 256, "patch_level": 1}, r"patch_level 1 but no 'downsample'"),  # CLAM at level 1
    ({}, r"missing the patch size"),
])
def test_unknown_level0_patch_size_asks_for_the_override(tmp_path, attrs, problem):
    coords = grid_coords(6, 6, 512)
    path = write_h5(tmp_path / "clam.h5", np.ones((36, 2)), coords, attrs)
    fix = r"coords step by 512.*pass patch_size=512 to load_slide / load_slides \(--patch-size 512"
    with pytest.raises(SlideError, match=rf"clam\.h5: .*{problem}.*{fix}"):
        load_slide(path)
    with pytest.raises(SlideError, match=rf"clam\.h5: .*{problem}.*{fix}"):
        load_slides(tmp_path)
    ref = cell_layout(6, 6)
    for slide in (load_slide(path, patch_size=512), load_slides(tmp_path, patch_size=512)[0]):
        assert slide.patch_size == 512 and torch.equal(slide.layout(3).pack_cell, ref.pack_cell)
    single = write_h5(tmp_path / "one.h5", np.ones((1, 2)), coords[:1], attrs)
    with pytest.raises(SlideError, match=r"one\.h5: .*pass patch_size=<level-0 patch size> to load_slide"):
        load_slide(single)  # one patch: no step to suggest


def test_scan_takes_every_slide_suffix_and_reports_broken_links(tmp_path):
    """find_slides and load_slide accept the same suffixes (SUFFIXES, any case); nothing with one is skipped."""
    from topopack.io import SUFFIXES

    s = random_slide(np.random.default_rng(4))
    names = [f"s{i}{suf}" for i, suf in enumerate(SUFFIXES)] + [f"u{i}{suf.upper()}" for i, suf in enumerate(SUFFIXES)]
    for name in names:  # save_slide picks the format by the lower-case suffix
        fmt = ".pt" if name.lower().endswith((".pt", ".pth")) else ".h5"
        save_slide(tmp_path / f"tmp{fmt}", s["features"], s["coords"], s["patch_size"]).rename(tmp_path / name)
    (tmp_path / "notes.json").write_text("{}")  # not slides: ignored
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    save_slide(tmp_path / "sub" / "deeper.h5", s["features"], s["coords"], s["patch_size"])  # not scanned
    assert [p.name for p in find_slides(tmp_path)] == sorted(names)
    assert [sl.path for sl in load_slides(tmp_path)] == [str(tmp_path / n) for n in sorted(names)]

    (tmp_path / "dangling.h5").symlink_to(tmp_path / "gone.h5")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    (tmp_path / "folder.h5").mkdir()
    assert [p.name for p in find_slides(tmp_path)] == sorted(names + ["dangling.h5", "loop.pt", "folder.h5"])
    with pytest.raises(SlideError, match=r"dangling\.h5: dangling symlink to .*gone\.h5"):
        load_slide(tmp_path / "dangling.h5")
    with pytest.raises(SlideError, match=r"loop\.pt: symlink loop"):
        load_slide(tmp_path / "loop.pt")
    with pytest.raises(SlideError, match=r"folder\.h5: not a file"):
        load_slide(tmp_path / "folder.h5")
    with pytest.raises(SlideError) as info:
        load_slides(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"3 bad slide file(s) in {tmp_path}")
    assert all(f"{n}: " in msg for n in ("dangling.h5", "loop.pt", "folder.h5"))


def trident_xy(index, ps0, ov0):
    """TRIDENT's level-0 corner of column/row ``index`` (WSIPatcher._colrow_to_xy): the first step is a whole
    patch, the later ones patch_size_level0 - overlap_level0."""
    return index * ps0 - ov0 * np.maximum(index - 1, 0)


TRIDENT_OVERLAP = {"patch_size": 256, "patch_size_level0": 512, "overlap": 64,  # 20x from 40x: 128 px at level 0
                   "level0_magnification": 40, "target_magnification": 20}


@pytest.mark.parametrize("first", [0, 3])  # the grid starts at the slide's edge (irregular first step) or inside
def test_trident_overlap(tmp_path, first):
    cy, cx = np.divmod(np.arange(49), 7)
    cx, cy = cx + first, cy + first
    coords = np.stack([trident_xy(cx, 512, 128), trident_xy(cy, 512, 128)], 1)
    path = write_h5(tmp_path / "ov.h5", np.ones((49, 2)), coords, TRIDENT_OVERLAP)
    slide = load_slide(path)
    assert slide.patch_size == 512 and slide.cell_size == 512 - 128
    ref = cell_layout(7, 7)
    lay = slide.layout(3)
    assert torch.equal(lay.patch_token, ref.patch_token) and torch.equal(lay.pack_cell, ref.pack_cell)
    # coords on the edge of the slide move onto the lattice (by overlap_level0), all others are the file's
    expect = np.where(coords == 0, 128, coords)
    np.testing.assert_array_equal(slide.coords.numpy(), expect)
    assert load_slide(path, patch_size=512).cell_size == 384


def test_trident_overlap_errors(tmp_path):
    coords = np.stack([trident_xy(np.arange(4), 512, 128), np.zeros(4, int)], 1)
    no_ps = {k: v for k, v in TRIDENT_OVERLAP.items() if k != "patch_size"}
    path = write_h5(tmp_path / "a.h5", np.ones((4, 2)), coords, no_ps)
    with pytest.raises(SlideError, match=r"a\.h5: has overlap 64 .*no 'patch_size' attribute"):
        load_slide(path)
    path = write_h5(tmp_path / "b.h5", np.ones((4, 2)), coords, dict(TRIDENT_OVERLAP, overlap=256))
    with pytest.raises(SlideError, match=r"b\.h5: overlap 256 .*512 pixels at level 0.*not smaller than the patch"):
        load_slide(path)
    path = write_h5(tmp_path / "c.h5", np.ones((4, 2)), coords, dict(TRIDENT_OVERLAP, overlap=32))
    with pytest.raises(SlideError, match=r"c\.h5: coords are not on the patch grid.*grid step 448"):
        load_slide(path)


def test_split_slides_takes_paths_or_slides(tmp_path):
    """The last ceil(heldout * n) by path are held out, whether given paths (str or Path) or loaded Slides."""
    from topopack.io import split_slides

    s = random_slide(np.random.default_rng(5))
    names = ["a.h5", "b'.h5", "c.pt", "d.h5", "e.h5"]  # a quote changes repr(Slide), which must not be the key
    paths = [save_slide(tmp_path / n, s["features"], s["coords"], s["patch_size"]) for n in names]
    slides = [load_slide(p) for p in paths]
    rng = np.random.default_rng(0)
    for heldout, n_out in ((0.0, 0), (0.2, 1), (0.3, 2), (0.5, 3)):
        expect = ([str(p) for p in paths[:5 - n_out]], [str(p) for p in paths[5 - n_out:]])
        for items in (paths, [str(p) for p in paths], slides):
            items = [items[i] for i in rng.permutation(5)]
            train, held = split_slides(items, heldout)
            key = (lambda x: x.path) if isinstance(items[0], Slide) else str
            assert ([key(x) for x in train], [key(x) for x in held]) == expect
            assert all(any(x is y for y in items) for x in train + held)  # the objects given, not copies
    with pytest.raises(ValueError, match="leaves no training slides"):
        split_slides(slides[:1], 0.5)
