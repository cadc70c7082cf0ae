"""SAN's target textures (hpc_reid.methods.san.textures) on the tiny synthetic set: the true
textures against the identity PNGs read here, the field equal between the torch and DALI loaders
and untouched by flips and erasures, the pseudo-texture writer (folder, .h5, two ranks' shards,
resume) against the arrays written, pack records keyed as their folder's, and the errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hpc_reid.data.build import dataset_from_config, dataset_root
from hpc_reid.data.datasets import build_dataset
from hpc_reid.data.fields import batch_fields
from hpc_reid.data.pack import pack_dataset
from hpc_reid.methods.san.textures import (
    PseudoTextures,
    TextureError,
    TextureWriter,
    decode_texture,
    image_key,
)
from tests.engine.test_trainer import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ["texture", "texture_valid"]
TEX = (128, 64)  # the synthetic set's texture maps (H, W): no resize in the reference


def config_of(tmp, *extra):
    """The tiny set (one cache folder for the module) with textures of ``extra``."""
    return tiny_config(tmp, f"model.san.texture_size=[{TEX[0]},{TEX[1]}]", *extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("san_textures")
    config = config_of(tmp, "data.textures.kind=synthetic")
    dataset = dataset_from_config(config.data, announce=lambda _: None)
    return tmp, config, dataset.train, dataset_root(config.data, announce=lambda _: None)[1]


def reference(path: Path, size=None) -> np.ndarray:
    """(3, H, W) float32: ToTensor + Normalize(0.5, 0.5) of an RGB PNG, resized by torch's
    bilinear interpolation (not PIL's, which the code uses) when ``size`` is given."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
    if size is not None:
        x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear")[0]
    return ((x.numpy() / 255.0 - 0.5) / 0.5).astype(np.float32)


def true_texture(root: Path, record) -> np.ndarray:
    return reference(root / "textures" / f"{Path(record.path).name.split('_')[0]}.png")


def fields(config, records, indices):
    return batch_fields(FIELDS, records, torch.as_tensor(indices), config=config)


def test_synthetic_texture_of_every_training_image_is_its_identity_png_normalised(tiny):
    _, config, records, root = tiny
    got = fields(config, records, np.arange(len(records)))
    assert got["texture"].dtype == torch.float32 and got["texture"].shape == (len(records), 3, *TEX)
    assert got["texture_valid"].dtype == torch.bool and bool(got["texture_valid"].all())
    for i, record in enumerate(records):
        np.testing.assert_allclose(got["texture"][i].numpy(), true_texture(root, record), atol=1e-6)
    # the relabelled pid does not pick the texture: one texture per identity, distinct ones
    by_pid = {}
    for i, record in enumerate(records):
        by_pid.setdefault(record.pid, []).append(got["texture"][i])
    firsts = [ts[0] for ts in by_pid.values()]
    assert all(torch.equal(t, ts[0]) for ts in by_pid.values() for t in ts)
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


def test_the_torch_and_dali_loaders_give_equal_textures_unflipped_and_unerased(tiny):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from hpc_reid.data.loaders import dali_loader, torch_loader
    from hpc_reid.data.samplers import IdentitySampler

    _, config, records, root = tiny
    sampler = IdentitySampler([r.pid for r in records], [r.camid for r in records], 2, 4, seed=3)
    always = {"flip_prob": 1.0, "random_erasing_prob": 1.0}
    cfg = config.loader.model_copy(
        update={"augment": config.loader.augment.model_copy(update=always)}
    )
    h, w = config.data.height, config.data.width
    torch_l = torch_loader.build_train_loader(records, sampler, cfg, h, w, 3)
    dali_l = dali_loader.build_train_loader(records, sampler, cfg, h, w, 3, device="cpu")
    sampler.set_epoch(0)
    pairs = list(zip(list(torch_l), list(dali_l), strict=True))
    assert pairs
    truth = {i: true_texture(root, r) for i, r in enumerate(records)}
    # the references are not mirror-symmetric: a flipped texture would not pass
    assert all(not np.allclose(t, t[..., ::-1]) for t in truth.values())
    for a, b in pairs:
        assert torch.equal(a["indices"], b["indices"])
        fa, fb = fields(config, records, a["indices"]), fields(config, records, b["indices"])
        assert torch.equal(fa["texture"], fb["texture"])
        assert torch.equal(fa["texture_valid"], fb["texture_valid"])
        for j, i in enumerate(a["indices"].tolist()):
            np.testing.assert_allclose(fa["texture"][j].numpy(), truth[i], atol=1e-6)


def test_a_term_declaring_the_texture_field_receives_it_in_training(tiny, monkeypatch):
    """The trainer passes its config to the configured fields: a term (here in place of
    loss.center) declaring texture and texture_valid gets the true textures of its batches."""
    from hpc_reid import losses
    from hpc_reid.engine.trainer import train

    tmp, _, records, root = tiny
    seen = []

    def build(section, num_classes, feature_dim):
        def term(outputs, pids, batch):
            seen.append((batch["indices"].tolist(), batch["texture"], batch["texture_valid"]))
            return outputs["global"].sum() * 0.0

        return term

    losses.available_losses()
    term = losses.LossTerm("center", frozenset({"global"}), build, frozenset(FIELDS))
    monkeypatch.setitem(losses._LOSSES, "center", term)
    run = config_of(tmp, "data.textures.kind=synthetic", "loss.center.weight=1.0")
    assert train(run, max_steps=2)["stopped_at_step"] == 2
    assert len(seen) == 2
    for indices, textures, valid in seen:
        assert bool(valid.all()) and textures.shape == (len(indices), 3, *TEX)
        for j, i in enumerate(indices):
            np.testing.assert_allclose(
                textures[j].numpy(), true_texture(root, records[i]), atol=1e-6
            )


def random_textures(n, seed=0, size=(24, 16)):
    rng = np.random.default_rng(seed)
    keys = [f"split{k % 3}/sub/{k:03d}_c1.jpg" for k in range(n)]
    return {k: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for k in keys}


def read_back(store: PseudoTextures, keys, size=(24, 16)):
    return {k: decode_texture(store.read(k), store.where(k), size) for k in keys}


@pytest.mark.parametrize("suffix", ["", ".h5"])
@pytest.mark.parametrize("world", [1, 2])
def test_written_textures_read_back_bit_exact_from_one_or_two_ranks(tmp_path, suffix, world):
    textures = random_textures(10)
    out = tmp_path / f"pseudo{suffix}"
    for rank in range(world):
        with TextureWriter(out, rank, world, attrs={"checkpoint": "pg.pt", "size": [24, 16]}) as w:
            for k in list(textures)[rank::world]:
                w.write(k, textures[k])
    store = PseudoTextures(out, tmp_path)
    assert all(store.has(k) for k in textures) and not store.has("split0/sub/999_c1.jpg")
    got = read_back(store, textures)
    assert all(np.array_equal(got[k], textures[k]) for k in textures)
    assert not list(tmp_path.rglob("*.tmp"))  # every temporary renamed
    if suffix:
        files = sorted(tmp_path.glob("*.h5"))
        names = ["pseudo.h5"] if world == 1 else [f"pseudo-rank0000{r}-of-00002.h5" for r in (0, 1)]
        assert [f.name for f in files] == names
        with h5py.File(files[-1]) as f:
            assert f.attrs["format"] == "hpc-reid textures" and f.attrs["checkpoint"] == "pg.pt"
            assert (f.attrs["shard"], f.attrs["num_shards"]) == (world - 1, world)
        # one shard named reads back the whole pack too
        assert PseudoTextures(files[0], tmp_path).rows == store.rows
    else:
        assert (out / "split1/sub/001_c1.png").is_file() and (out / "textures.json").is_file()


def test_a_texture_pack_missing_a_rank_s_shard_is_refused_naming_the_shards(tmp_path):
    textures = random_textures(4, seed=3)
    out = tmp_path / "pseudo.h5"
    for rank in range(3):
        w = TextureWriter(out, rank, 3)
        for k in list(textures)[rank::3]:
            w.write(k, textures[k])
        if rank != 1:  # rank 1 never finishes: its shard stays pseudo-rank00001-of-00003.h5.tmp
            w.close()
    with pytest.raises(TextureError, match=r"ranks 0\.\.2 of one run expected") as err:
        PseudoTextures(out, tmp_path)
    assert "pseudo-rank00000-of-00003.h5" in str(err.value)
    assert "pseudo-rank00001-of-00003.h5'" not in str(err.value)


@pytest.mark.parametrize("suffix", ["", ".h5"])
def test_an_interrupted_writer_resumes_from_what_exists(tmp_path, suffix):
    textures = random_textures(9, seed=1)
    keys, out = list(textures), tmp_path / f"pseudo{suffix}"
    with pytest.raises(KeyboardInterrupt), TextureWriter(out) as w:
        for k in keys[:5]:
            w.write(k, textures[k])
        raise KeyboardInterrupt
    if suffix:  # nothing at the final name until the pack is complete
        assert not out.exists() and out.with_name("pseudo.h5.tmp").is_file()
        with pytest.raises(TextureError, match="not found"):
            PseudoTextures(out, tmp_path)
    written = []
    with TextureWriter(out) as w:
        assert [w.exists(k) for k in keys] == [True] * 5 + [False] * 4
        for k in keys:
            if not w.exists(k):
                w.write(k, textures[k])
                written.append(k)
    assert written == keys[5:]
    with TextureWriter(out) as w:  # a finished store: everything exists, one more is added
        assert all(w.exists(k) for k in keys)
        extra = "split9/new.jpg"
        w.write(extra, textures[keys[0]])
    store = PseudoTextures(out, tmp_path)
    got = read_back(store, [*keys, extra])
    assert all(np.array_equal(got[k], textures[k]) for k in keys)
    assert np.array_equal(got[extra], textures[keys[0]])
    if suffix:
        assert len(store.rows) == 10 and not out.with_name("pseudo.h5.tmp").exists()


def test_an_h5_writer_keeps_only_the_rows_committed_before_a_crash(tmp_path):
    """Rows appended after the last committed count (a crash mid-append) are dropped on resume."""
    textures = random_textures(4, seed=2)
    keys, out = list(textures), tmp_path / "pseudo.h5"
    w = TextureWriter(out)
    for k in keys[:3]:
        w.write(k, textures[k])
    w.flush()
    f = w._file
    f.attrs["count"] = 2  # as if the process died between appending row 3 and committing it
    f.close()
    with TextureWriter(out) as w:
        assert [w.exists(k) for k in keys] == [True, True, False, False]
        for k in keys[2:]:
            w.write(k, textures[k])
    got = read_back(PseudoTextures(out, tmp_path), keys)
    assert all(np.array_equal(got[k], textures[k]) for k in keys)


def test_pack_records_are_keyed_as_their_folder_images(tiny, tmp_path):
    """Pseudo textures written for a folder data set serve its HDF5 pack: same keys, same order."""
    _, _, records, root = tiny
    folder = build_dataset("market1501", root)
    pack_dataset(folder, tmp_path / "tiny.h5")
    packed = build_dataset("market1501", tmp_path / "tiny.h5")
    for split in ("train", "query", "gallery"):
        a, b = getattr(folder, split), getattr(packed, split)
        keys = [image_key(r.path, root) for r in a]
        assert keys == [image_key(r.path, "/elsewhere") for r in b]
        assert all(k.startswith({"train": "bounding_box_train/"}.get(split, "")) for k in keys)
    assert image_key(records[0].path, root) == f"bounding_box_train/{Path(records[0].path).name}"


def pseudo_for(tmp_path, records, root, size=(40, 24), skip=(), seed=4):
    """Random pseudo textures of ``size`` for every training image but the indices ``skip``."""
    rng = np.random.default_rng(seed)
    out, truth = tmp_path / "pseudo", {}
    with TextureWriter(out) as w:
        for i, r in enumerate(records):
            if i not in skip:
                truth[i] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                w.write(image_key(r.path, root), truth[i])
    return out, truth


def test_a_training_image_without_a_texture_is_an_error_naming_it(tiny, tmp_path):
    tmp, _, records, root = tiny
    out, _ = pseudo_for(tmp_path, records, root, skip={7})
    config = config_of(tmp, "data.textures.kind=pseudo", f"data.textures.root={out}")
    expected = out / Path(image_key(records[7].path, root)).with_suffix(".png")
    with pytest.raises(TextureError) as err:
        fields(config, records, [0, 1])  # checked for every record, not only the batch's
    assert records[7].path in str(err.value) and str(expected) in str(err.value)
    assert "1 of" in str(err.value)


def test_missing_skip_gives_a_zero_texture_marked_invalid(tiny, tmp_path):
    tmp, _, records, root = tiny
    out, truth = pseudo_for(tmp_path, records, root, size=TEX, skip={3, 11})
    config = config_of(
        tmp, "data.textures.kind=pseudo", f"data.textures.root={out}", "data.textures.missing=skip"
    )
    indices = [2, 3, 11, 12, 3]
    got = fields(config, records, indices)
    assert got["texture_valid"].tolist() == [True, False, False, True, False]
    for j, i in enumerate(indices):
        if i in truth:
            expected = (truth[i].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
            np.testing.assert_allclose(got["texture"][j].numpy(), expected, atol=1e-6)
        else:
            assert not got["texture"][j].any()


def test_a_texture_of_another_size_is_resized_bilinearly(tiny, tmp_path):
    """Upsampled 40x24 -> 128x64 against torch's bilinear interpolation (within PIL's rounding to
    whole levels: 1/255 on the 0-1 scale, 2/255 after the normalisation)."""
    tmp, _, records, root = tiny
    out, truth = pseudo_for(tmp_path, records, root, size=(40, 24))
    config = config_of(tmp, "data.textures.kind=pseudo", f"data.textures.root={out}")
    got = fields(config, records, [5, 0])["texture"]
    assert got.shape == (2, 3, *TEX)
    for j, i in enumerate([5, 0]):
        file = out / Path(image_key(records[i].path, root)).with_suffix(".png")
        assert np.array_equal(np.array(Image.open(file)), truth[i])
        np.testing.assert_allclose(got[j].numpy(), reference(file, TEX), atol=2 / 255 + 1e-6)


@pytest.mark.parametrize("bad", ["truncated", "grey"])
def test_a_texture_that_is_not_an_rgb_image_is_an_error_naming_the_file(tiny, tmp_path, bad):
    tmp, _, records, root = tiny
    out, _ = pseudo_for(tmp_path, records, root)
    file = out / Path(image_key(records[4].path, root)).with_suffix(".png")
    if bad == "truncated":
        file.write_bytes(file.read_bytes()[:40])
    else:
        Image.new("L", (24, 40), 128).save(file)
    config = config_of(tmp, "data.textures.kind=pseudo", f"data.textures.root={out}")
    fields(config, records, [3, 5])  # the others are fine: decoded per batch
    message = "not a readable image" if bad == "truncated" else "is a L image; expected RGB"
    with pytest.raises(TextureError, match=message) as err:
        fields(config, records, [3, 4])
    assert str(file) in str(err.value)


def test_the_texture_field_needs_the_run_config_and_a_texture_kind(tiny):
    tmp, _, records, _ = tiny
    with pytest.raises(ValueError, match="batch field 'texture' needs the run's config"):
        batch_fields(["texture"], records, torch.tensor([0]))
    with pytest.raises(TextureError, match=r"data\.textures\.kind is 'none'"):
        fields(config_of(tmp), records, [0])
