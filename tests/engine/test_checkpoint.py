"""Atomic checkpoint writes, pruning, best and latest."""

from __future__ import annotations

import pytest
import torch

from hpc_reid.engine import checkpoint as ckpt
from hpc_reid.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint


def test_save_keeps_last_n_and_latest_points_to_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    paths = [manager.save({"w": torch.tensor([float(e)])}, epoch=e, step=10 * e) for e in range(4)]
    assert manager.checkpoints() == paths[-2:]
    assert manager.latest() == paths[-1]
    assert load_checkpoint(manager.latest())["w"].item() == 3.0
    leftovers = [p.name for p in manager.folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_best_is_a_link_that_survives_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save({"w": torch.tensor([1.0])}, epoch=1, step=1)
    best = manager.mark_best(first)
    manager.save({"w": torch.tensor([2.0])}, epoch=2, step=2)
    assert not first.exists()
    assert load_checkpoint(best)["w"].item() == 1.0


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    good = manager.save({"w": torch.tensor([1.0])}, epoch=1, step=1)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # as a preemption mid-write would

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"w": torch.tensor([2.0])}, epoch=2, step=2)
    assert manager.latest() == good
    assert sorted(p.name for p in manager.folder.iterdir()) == sorted([good.name, "latest"])


def test_latest_falls_back_to_newest_by_name_without_pointer(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for epoch, step in [(1, 9), (2, 3), (10, 1)]:
        manager.save({}, epoch=epoch, step=step)
    (manager.folder / "latest").unlink()
    assert manager.latest().name == "epoch_0010_step_00000001.pt"
    assert CheckpointManager(tmp_path / "empty").latest() is None


def test_unreadable_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an hpc-reid checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_the_latest_pointer_a_checkpoints_folder_or_a_run_folder_load_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    for e in range(3):
        manager.save({"w": torch.tensor([float(e)])}, epoch=e, step=e)
    for path in (manager.folder / "latest", manager.folder, tmp_path / "run"):
        assert load_checkpoint(path)["w"].item() == 2.0, path
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*empty/checkpoints"):
        load_checkpoint(tmp_path / "empty")
