"""Batch fields: per-sample targets computed from a batch's dataset indices; a loss term declaring
one receives it in training (both loaders give the same indices: tests/data/test_dali_loader.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.data.fields import available_batch_fields, batch_fields, register_batch_field


def test_frames_are_the_records_frames_at_the_batch_indices_and_minus_one_without():
    rng = np.random.default_rng(0)
    records = [
        ImageRecord(f"{i}.jpg", i % 5, i % 3, None if i % 4 == 0 else int(rng.integers(0, 10**6)))
        for i in range(40)
    ]
    indices = torch.from_numpy(rng.integers(0, 40, size=16))
    got = batch_fields(["frames"], records, indices)["frames"]
    expected = [-1 if records[i].frame is None else records[i].frame for i in indices.tolist()]
    assert got.dtype == torch.int64 and got.tolist() == expected


def test_unknown_and_reserved_fields_are_refused_naming_them():
    with pytest.raises(KeyError, match=r"unknown batch field\(s\) \['no_such_field'\]"):
        batch_fields(["no_such_field"], [], torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="'pids' is already defined"):
        register_batch_field("pids")(lambda records, idx: torch.zeros(len(idx)))
    assert "frames" in available_batch_fields()


def test_a_term_declaring_a_field_receives_it_for_every_training_batch(tmp_path, monkeypatch):
    """A loss term registered with batch_fields=("frames",) (here in place of loss.center) is
    called with the batch, whose frames are the training records' frames at that batch's indices
    (the synthetic set's file names carry Market's frame numbers)."""
    from hpc_reid import losses
    from hpc_reid.data.build import dataset_from_config
    from hpc_reid.engine.trainer import train
    from tests.engine.test_trainer import tiny_config

    seen = []

    def build(section, num_classes, feature_dim):
        def term(outputs, pids, batch):
            seen.append((batch["indices"].tolist(), batch["frames"].tolist()))
            return outputs["global"].sum() * 0.0

        return term

    losses.available_losses()  # the registry as every run sees it, then one term replaced
    term = losses.LossTerm("center", frozenset({"global"}), build, frozenset({"frames"}))
    monkeypatch.setitem(losses._LOSSES, "center", term)
    config = tiny_config(tmp_path, "loss.center.weight=1.0")
    summary = train(config, max_steps=3)
    assert summary["stopped_at_step"] == 3
    records = dataset_from_config(config.data, announce=lambda _: None).train
    assert len(seen) == 3
    for indices, frames in seen:
        assert frames == [records[i].frame for i in indices] and min(frames) >= 0
