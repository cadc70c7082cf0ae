"""``hpc-reid textures``: SAN-PG's pseudo textures equal the model's decoded output for every image,
in a folder or an HDF5 file; 2 gloo ranks write what one process writes; a rerun continues where
it stopped; a model without a SAN head is refused; the written textures train SAN (kind: pseudo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from hpc_reid.cli import main as cli
from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_on_ranks, dataset_root
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.methods.san.generate import all_images, generate_textures, to_uint8
from hpc_reid.methods.san.model import decoding
from hpc_reid.methods.san.textures import PseudoTextures, TextureError, decode_texture, image_key
from hpc_reid.models import build_model
from hpc_reid.visualize import PAD  # white pixels between the picture's cells
from tests.ports import free_port
from tests.tiny import TINY_DATA, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
#: one epoch, and a small texture
TINY = ["schedule.epochs=1", "schedule.milestones=[1]", "schedule.warmup_epochs=0"]
TINY += ["model.san.texture_size=[16,8]"]


def tiny(tmp: Path, config: str, *extra: str):
    return tiny_config(tmp, config, *TINY, *extra)


@pytest.fixture(scope="module")
def san_pg(tmp_path_factory) -> tuple[Path, Path]:
    """A SAN-PG checkpoint trained 2 steps on the tiny synthetic pairs, and the temp folder."""
    tmp = tmp_path_factory.mktemp("sanpg")
    train(tiny(tmp, "configs/synthetic/san_pg.yaml"), max_steps=2)
    return CheckpointManager(tmp / "runs/san_pg_synthetic").latest(), tmp


def expected_textures(checkpoint: Path, data_config) -> dict[str, np.ndarray]:
    """Every image's texture computed here: the checkpoint's model on the test transform."""
    stored = load_config(None, [])  # a Config to validate the stored dict with
    stored = type(stored).model_validate(load_checkpoint(checkpoint)["config"])
    dataset = dataset_on_ranks(data_config.data, True)
    state = load_checkpoint(checkpoint)  # SAN-PG's classes, whatever the data set's
    model = build_model(stored.model, state["model_meta"]["num_classes"])
    model.load_state_dict(state["strategy"]["model"])
    model.eval()
    root = dataset_root(data_config.data, announce=lambda _: None)[1]
    records = all_images(dataset)
    loader = build_backend_test_loader(
        records, data_config.loader, stored.data.height, stored.data.width, "cpu"
    )
    out, i = {}, 0
    with decoding(model), torch.no_grad():
        for batch in loader:
            for texture in to_uint8(model(batch["images"])["texture"]):
                out[image_key(records[i].path, root)] = texture
                i += 1
    return out


def read_all(out: Path, data_config) -> dict[str, np.ndarray]:
    root = dataset_root(data_config.data, announce=lambda _: None)[1]
    store = PseudoTextures(out, root)
    dataset = dataset_on_ranks(data_config.data, True)
    result = {}
    for record in all_images(dataset):
        key = store.key(record.path)
        assert store.has(key), key
        result[key] = decode_texture(store.read(key), key, (16, 8))
    return result


@pytest.mark.parametrize("suffix", ["", ".h5"])
def test_every_image_gets_its_decoded_texture_and_a_rerun_writes_nothing(san_pg, suffix, capsys):
    checkpoint, tmp = san_pg
    data = tiny(tmp, "configs/synthetic/bot.yaml")
    out = tmp / f"textures{suffix or '_dir'}{suffix}"
    first = generate_textures(checkpoint, data, out, preview=2)
    expected = expected_textures(checkpoint, data)
    assert first["written"] == first["images"] == len(expected)
    got = read_all(out, data)
    assert got.keys() == expected.keys()
    for key, texture in expected.items():
        assert np.array_equal(got[key], texture), key
    assert Path(first["preview"]).stat().st_size > 0
    again = generate_textures(checkpoint, data, out, preview=0)
    assert again["written"] == 0 and again["skipped"] == len(expected)


def test_textures_for_a_set_of_other_identities_than_san_pg_trained_on(san_pg):
    """SAN-PG (8 training identities) writes the textures of a set with 10, as of a real set:
    every image's decoded texture."""
    checkpoint, tmp = san_pg
    data_config = tiny(tmp, "configs/synthetic/bot.yaml", "data.synthetic.ids=20")
    out = tmp / "other_set.h5"
    summary = generate_textures(checkpoint, data_config, out, preview=0)
    expected = expected_textures(checkpoint, data_config)
    assert summary["written"] == len(expected) and len(expected) > 0
    got = read_all(out, data_config)
    assert got.keys() == expected.keys()
    for key, texture in expected.items():
        np.testing.assert_array_equal(got[key], texture)


def test_an_interrupted_folder_continues_with_the_missing_textures_only(san_pg):
    checkpoint, tmp = san_pg
    data = tiny(tmp, "configs/synthetic/bot.yaml")
    out = tmp / "resume"
    generate_textures(checkpoint, data, out, preview=0)
    removed = sorted(out.rglob("*.png"))[:3]
    for path in removed:
        path.unlink()
    again = generate_textures(checkpoint, data, out, preview=0)
    assert again["written"] == 3 and all(p.is_file() for p in removed)


def _rank(rank: int, port: int, checkpoint: str, tmp: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    generate_textures(checkpoint, tiny(Path(tmp), "configs/synthetic/bot.yaml"), out, preview=1)


def test_two_ranks_write_the_textures_one_process_writes(san_pg):
    checkpoint, tmp = san_pg
    data = tiny(tmp, "configs/synthetic/bot.yaml")
    one, two = tmp / "one.h5", tmp / "two.h5"
    generate_textures(checkpoint, data, one, preview=0)
    mp.spawn(_rank, args=(free_port(), str(checkpoint), str(tmp), str(two)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp.glob("two*.h5")) == [
        "two-rank00000-of-00002.h5",
        "two-rank00001-of-00002.h5",
    ]
    a, b = read_all(one, data), read_all(two, data)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_the_cli_refuses_a_checkpoint_without_a_san_head(tmp_path, capsys):
    config = tiny(tmp_path, "configs/synthetic/bot.yaml", "logging.run_name=bot")
    train(config, max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/bot").latest()
    args = ["textures", "--checkpoint", str(checkpoint), "--config"]
    args += [str(REPO / "configs/synthetic/bot.yaml"), "--out", str(tmp_path / "t")]
    args += [
        f"--set=data.synthetic.cache_dir={tmp_path / 'cache'}",
        *(f"--set={s}" for s in TINY_DATA),
    ]
    with pytest.raises(ValueError, match="has no SAN head"):
        cli(args)


def test_pseudo_textures_train_san(san_pg):
    """The written textures as SAN's targets (data.textures.kind=pseudo): the texture loss is
    computed against them in a short run."""
    checkpoint, tmp = san_pg
    out = tmp / "targets.h5"
    generate_textures(checkpoint, tiny(tmp, "configs/synthetic/bot.yaml"), out, preview=0)
    config = tiny(
        tmp,
        "configs/synthetic/san.yaml",
        "data.textures.kind=pseudo",
        f"data.textures.root={out}",
        "logging.run_name=san_pseudo",
        "loss.decoder_triplet.weight=0",
    )
    train(config, max_steps=2)
    state = load_checkpoint(CheckpointManager(tmp / "runs/san_pseudo").latest())
    assert state["step"] == 2


def test_visualize_textures_draws_input_decoded_true_and_pseudo_texture_rows(san_pg, capsys):
    """`hpc-reid visualize textures` on SAN-PG with pseudo targets set: a row per query image
    spread over the split, its cells the input as the model saw it, the decoded texture, the
    identity's true texture and the pseudo texture, each 16 x 8 texture magnified 4x to 64 x 32."""
    checkpoint, tmp = san_pg
    data_config = tiny(tmp, "configs/synthetic/bot.yaml")
    out = tmp / "vis_targets.h5"
    generate_textures(checkpoint, data_config, out, preview=0)
    pseudo = read_all(out, data_config)
    args = ["visualize", "textures", "--checkpoint", str(checkpoint), "--num", "3"]
    args += ["--out", str(tmp / "vis"), "--set=data.textures.kind=pseudo"]
    assert cli([*args, f"--set=data.textures.root={out}"]) == 0
    printed = capsys.readouterr().out
    assert "columns: image, decoded texture, true texture, pseudo texture" in printed
    png = np.asarray(Image.open(tmp / "vis" / "textures_query.png").convert("RGB"))
    assert png.shape == (3 * (64 + PAD) - PAD, 4 * (32 + PAD) - PAD, 3)
    decoded = expected_textures(checkpoint, data_config)
    root = dataset_root(data_config.data, announce=lambda _: None)[1]
    dataset = dataset_on_ranks(data_config.data, True)
    records = [dataset.query[i * len(dataset.query) // 3] for i in range(3)]
    loader = build_backend_test_loader(records, data_config.loader, 64, 32, "cpu")
    x = torch.cat([b["images"] for b in loader])
    mean = torch.tensor(data_config.loader.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(data_config.loader.augment.std).view(1, 3, 1, 1)
    inputs = ((x * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for i, record in enumerate(records):
        key = image_key(record.path, root)
        true = Image.open(root / "textures" / f"{record.pid:04d}.png").convert("RGB")
        true = np.asarray(true.resize((8, 16), Image.BILINEAR))
        cells = [inputs[i], *(np.kron(t, np.ones((4, 4, 1), np.uint8))
                              for t in (decoded[key], true, pseudo[key]))]  # fmt: skip
        for j, cell in enumerate(cells):
            top, left = i * (64 + PAD), j * (32 + PAD)
            np.testing.assert_array_equal(png[top : top + 64, left : left + 32], cell)


def test_a_training_image_without_its_texture_stops_the_run_before_any_step(san_pg):
    checkpoint, tmp = san_pg
    out = tmp / "holes"
    generate_textures(checkpoint, tiny(tmp, "configs/synthetic/bot.yaml"), out, preview=0)
    gone = sorted((out / "bounding_box_train").glob("*.png"))[0]
    gone.unlink()
    config = tiny(
        tmp,
        "configs/synthetic/san.yaml",
        "data.textures.kind=pseudo",
        f"data.textures.root={out}",
        "logging.run_name=san_holes",
        "loss.decoder_triplet.weight=0",
        "evaluation.at_start=true",
    )
    with pytest.raises(TextureError, match=gone.stem):
        train(config, max_steps=1)
    # raised while the run is built: before the evaluation at start, before any file of the run
    assert not (tmp / "runs/san_holes/results_start.json").exists()
    assert not (tmp / "runs/san_holes/config.yaml").exists()
