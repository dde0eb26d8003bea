"""`topopack extract` on small pyramidal TIFFs written offline, with a tiny random ViT as the patch encoder."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("openslide")
pytest.importorskip("tifffile")
pytest.importorskip("skimage")
h5py = pytest.importorskip("h5py")

from slide_fixtures import slide_image, write_slide, write_vit  # noqa: E402

from topopack.io import load_slide  # noqa: E402
from topopack.model import extract as extract_mod  # noqa: E402
from topopack.model.cli import main  # noqa: E402

K = 3
# name -> (image seed, objective power, mpp): 40x slides are read at level 1 (downsample 2)
SLIDES = {"a20": (1, 20, 0.5), "b20": (2, 20, 0.5), "c40": (3, 40, 0.25)}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return write_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Folder of Aperio TIFFs, and per slide (levels as written, true tissue mask of level 0)."""
    folder = tmp_path_factory.mktemp("slides")
    truth = {}
    for name, (seed, mag, mpp) in SLIDES.items():
        image, tissue = slide_image(2048, 1536, seed=seed)
        truth[name] = (write_slide(folder / f"{name}.tiff", image, mag=mag, mpp=mpp), tissue)
    return folder, truth


def run(*args) -> int:
    return main(["extract", *map(str, args)])


@pytest.fixture(scope="module")
def extracted(slides, vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    assert run("--slides", slides[0], "--out", out, "--encoder", vit, "--workers", 0) == 0
    return out


def vit_cls(vit, images) -> torch.Tensor:
    """The tiny ViT's CLS embedding of PIL images through its own processor (independent of extract)."""
    from transformers import AutoImageProcessor, ViTModel

    model, proc = ViTModel.from_pretrained(vit).eval(), AutoImageProcessor.from_pretrained(vit)
    with torch.no_grad():
        return model(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]


def test_extract_writes_trident_files_that_load_slide_reads_and_pretrain_trains_on(extracted, slides, tmp_path):
    from topopack.model.pretrain import pretrain

    for name, (_, mag, _) in SLIDES.items():
        path = extracted / f"{name}.h5"
        slide = load_slide(path)
        assert slide.summary_features.shape == (slide.layout(K).num_packs, 32)
        assert slide.global_features.shape == (32,)
        with h5py.File(path) as f:
            attrs = dict(f["coords"].attrs)
            assert f["coords"].dtype == np.int64 and f["features"].shape == (slide.num_patches, 32)
            assert f.attrs["pack_size"] == K
        assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 256 * mag // 20
        assert (attrs["level0_magnification"], attrs["target_magnification"], attrs["overlap"]) == (mag, 20, 0)
        assert (attrs["level0_width"], attrs["level0_height"]) == (2048, 1536)
    metrics = pretrain("mae", extracted, tmp_path / "mae", quick=True, steps=2, heldout=0)
    assert (tmp_path / "mae" / "encoder.pt").is_file() and metrics


def test_kept_patches_are_those_with_enough_true_tissue(extracted, slides):
    for name, (_, mag, _) in SLIDES.items():
        tissue = slides[1][name][1]
        ps0 = 256 * mag // 20
        kept = {tuple(c) for c in load_slide(extracted / f"{name}.h5").coords.tolist()}
        for y in range(0, 1536 - ps0 + 1, ps0):
            for x in range(0, 2048 - ps0 + 1, ps0):
                frac = tissue[y:y + ps0, x:x + ps0].mean()
                if frac >= 0.4:
                    assert (x, y) in kept, (name, x, y, frac)
                elif frac < 0.1:
                    assert (x, y) not in kept, (name, x, y, frac)


def _patches_and_mosaics(slide, levels, mag):
    """Patches cut from the written pyramid level at 20x, and the mosaic of every pack built here."""
    from PIL import Image

    level, down = (levels[0], 1) if mag == 20 else (levels[1], 2)
    ps0 = 256 * down
    coords = slide.coords.numpy()
    patches = [Image.fromarray(level[y // down:y // down + 256, x // down:x // down + 256]) for x, y in coords]
    cells = (coords - coords.min(0)) // ps0  # (col, row)
    packs = sorted({(r // K, c // K) for c, r in cells})  # existing packs, row-major
    mosaics = {p: Image.new("RGB", (K * 256, K * 256), (255, 255, 255)) for p in packs}
    for img, (c, r) in zip(patches, cells):
        mosaics[(r // K, c // K)].paste(img, ((c % K) * 256, (r % K) * 256))
    return patches, [mosaics[p] for p in packs], [int(((cells // K)[:, ::-1] == p).all(1).sum()) for p in packs]


@pytest.mark.parametrize("name", ["a20", "c40"])
def test_summary_features_are_embeddings_of_pack_mosaics_built_independently(extracted, slides, vit, name):
    slide = load_slide(extracted / f"{name}.h5")
    _, mosaics, counts = _patches_and_mosaics(slide, slides[1][name][0], SLIDES[name][1])
    assert len(mosaics) == slide.summary_features.shape[0]
    assert min(counts) < K * K  # some pack has a missing (white) cell
    torch.testing.assert_close(slide.summary_features, vit_cls(vit, mosaics), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["a20", "c40"])
def test_patch_features_are_embeddings_of_the_patches(extracted, slides, vit, name):
    slide = load_slide(extracted / f"{name}.h5")
    patches, _, _ = _patches_and_mosaics(slide, slides[1][name][0], SLIDES[name][1])
    torch.testing.assert_close(slide.features, vit_cls(vit, patches), atol=1e-5, rtol=1e-4)


def test_rerun_skips_finished_slides_and_redoes_only_a_missing_one(extracted, slides, vit, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    (out / ".a20.h5.part-999999999").write_bytes(b"half a file of a killed run")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert run("--slides", slides[0], "--out", out, "--encoder", vit, "--workers", 0) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    assert not list(out.glob(".*part*"))  # the dead run's temporary file is gone
    (out / "b20.h5").unlink()
    assert run("--slides", slides[0], "--out", out, "--encoder", vit, "--workers", 0) == 0
    assert "1 written, 2 already done" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert after.pop("b20.h5") and after == {k: v for k, v in before.items() if k != "b20.h5"}


def test_a_crash_while_writing_leaves_no_file_that_counts_as_finished(slides, vit, tmp_path, monkeypatch, capsys):
    real, calls = extract_mod.add_tokens, []

    def crash_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("killed while writing")
        return real(*a, **kw)

    monkeypatch.setattr(extract_mod, "add_tokens", crash_once)
    slide = slides[0] / "a20.tiff"
    assert run("--slides", slide, "--out", tmp_path, "--encoder", vit, "--workers", 0) == 1
    assert "killed while writing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert run("--slides", slide, "--out", tmp_path, "--encoder", vit, "--workers", 0) == 0
    assert "1 written, 0 already done" in capsys.readouterr().out
    assert load_slide(tmp_path / "a20.h5").summary_features is not None


def test_corrupt_slide_fails_by_name_while_the_others_finish(slides, vit, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides[0] / "a20.tiff", folder)
    bad = folder / "broken.tiff"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert run("--slides", folder, "--out", tmp_path / "out", "--encoder", vit, "--workers", 0) == 1
    err = capsys.readouterr().err
    assert f"{bad}: not a slide format OpenSlide can read" in err and "1 slide(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a20.h5"]


def test_coords_from_keeps_coords_and_features_and_adds_the_pack_tokens(extracted, slides, vit, tmp_path):
    """A TRIDENT file without tokens (features replaced by a marker): only summary/global are added; they equal
    a full extraction's (read here through a DataLoader worker)."""
    src = tmp_path / "trident"
    src.mkdir()
    marker = np.random.default_rng(0).normal(size=(load_slide(extracted / "a20.h5").num_patches, 32))
    with h5py.File(extracted / "a20.h5") as f, h5py.File(src / "a20.h5", "w") as g:
        g.create_dataset("coords", data=f["coords"][()])
        for key, value in f["coords"].attrs.items():
            if key in ("patch_size", "patch_size_level0", "level0_magnification", "overlap"):
                g["coords"].attrs[key] = value
        g.create_dataset("features", data=marker.astype(np.float32))
        g.create_dataset("annotations", data=np.arange(3))
        g.attrs["encoder"] = "someone else's"
    out = tmp_path / "out"
    assert run("--slides", slides[0] / "a20.tiff", "--out", out, "--encoder", vit, "--workers", 1,
               "--coords-from", src) == 0
    full, got = load_slide(extracted / "a20.h5"), load_slide(out / "a20.h5")
    torch.testing.assert_close(got.features, torch.from_numpy(marker.astype(np.float32)), atol=0, rtol=0)
    assert torch.equal(got.coords, full.coords)
    torch.testing.assert_close(got.summary_features, full.summary_features, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.global_features, full.global_features, atol=1e-6, rtol=1e-5)
    with h5py.File(out / "a20.h5") as f:
        assert f["annotations"][()].tolist() == [0, 1, 2] and f.attrs["encoder"] == "someone else's"


def test_coords_from_refuses_features_of_another_width(extracted, slides, vit, tmp_path, capsys):
    src = tmp_path / "trident"
    src.mkdir()
    with h5py.File(extracted / "a20.h5") as f, h5py.File(src / "a20.h5", "w") as g:
        g.create_dataset("coords", data=f["coords"][()])
        g["coords"].attrs["patch_size_level0"] = 256
        g.create_dataset("features", data=np.zeros((f["coords"].shape[0], 16), np.float32))
    assert run("--slides", slides[0] / "a20.tiff", "--out", tmp_path / "out", "--encoder", vit, "--workers", 0,
               "--coords-from", src) == 1
    assert "features are 16 wide but --encoder" in capsys.readouterr().err


def test_unknown_magnification_is_named_and_the_flag_overrides_it(vit, tmp_path, capsys):
    image, _ = slide_image(1024, 768, seed=4)
    write_slide(tmp_path / "plain.tiff", image, mag=None, mpp=None)
    assert run("--slides", tmp_path / "plain.tiff", "--out", tmp_path / "out", "--encoder", vit, "--workers", 0) == 1
    err = capsys.readouterr().err
    assert "plain.tiff: its level-0 magnification is unknown" in err and "--magnification" in err
    assert run("--slides", tmp_path / "plain.tiff", "--out", tmp_path / "out", "--encoder", vit, "--workers", 0,
               "--magnification", 20) == 0
    with h5py.File(tmp_path / "out" / "plain.h5") as f:
        assert f["coords"].attrs["level0_magnification"] == 20
    assert load_slide(tmp_path / "out" / "plain.h5").num_patches > 0


def test_magnification_and_mpp_together_are_refused(vit, tmp_path, capsys):
    assert run("--slides", tmp_path, "--out", tmp_path, "--encoder", vit, "--magnification", 20, "--mpp", 0.5) == 2
    assert "not both" in capsys.readouterr().err


class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch deprecates torch.jit
@pytest.mark.parametrize("kind", ["pt2", "torchscript"])
def test_exported_and_torchscript_encoders_embed_normalised_patches(slides, tmp_path, kind):
    from PIL import Image

    model, example = TinyConv().eval(), torch.zeros(2, 3, 32, 32)
    if kind == "pt2":
        path = tmp_path / "enc.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), path)
    else:
        path = tmp_path / "enc.ts"
        torch.jit.trace(model, example).save(str(path))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    assert run("--slides", slides[0] / "a20.tiff", "--out", tmp_path / "out", "--encoder", path, "--workers", 0,
               "--input-size", 32, "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std))) == 0
    slide = load_slide(tmp_path / "out" / "a20.h5")
    patches, _, _ = _patches_and_mosaics(slide, slides[1]["a20"][0], 20)
    x = np.stack([np.asarray(p.resize((32, 32), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255
                  for p in patches])
    x = (x - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    with torch.no_grad():
        expected = model(torch.from_numpy(x.astype(np.float32)))
    torch.testing.assert_close(slide.features, expected, atol=1e-5, rtol=1e-4)
    assert slide.summary_features.shape == (slide.layout(K).num_packs, 8)
