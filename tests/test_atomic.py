"""Atomic writes: whole or not at all, with the permissions ``open`` would give."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hpc_reid import atomic
from hpc_reid.atomic import write_atomic
from hpc_reid.engine.checkpoint import CheckpointManager


@pytest.fixture
def umask_027():
    """The process umask set to 027 (a group-readable project space), restored after."""
    old = os.umask(0o027)
    atomic.umask.cache_clear()
    yield
    os.umask(old)
    atomic.umask.cache_clear()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_text_bytes_and_a_writer_function_land_whole(tmp_path):
    assert write_atomic(tmp_path / "a" / "t.txt", "h\u00e9") == tmp_path / "a" / "t.txt"
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "h\u00e9"
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.bin", lambda f: f.write(b"xyz"), fsync=False)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "c.bin", "t.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_atomic(target, "old")

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt  # as a pre-emption mid-write would

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_files_get_the_umask_s_permissions_not_mkstemp_s_private_ones(tmp_path, umask_027):
    # what a plain open() gives under the same umask is the reference
    with open(tmp_path / "plain", "w"):
        pass
    write_atomic(tmp_path / "config.yaml", "a: 1\n")
    manager = CheckpointManager(tmp_path, keep_last=1)  # writes tmp_path/checkpoints
    saved = manager.save({"w": torch.zeros(1)}, epoch=1, step=1)
    assert mode(tmp_path / "plain") == 0o640
    assert mode(tmp_path / "config.yaml") == 0o640
    assert mode(saved) == 0o640
    assert mode(tmp_path / "checkpoints" / "latest") == 0o640


def test_a_temporary_sibling_is_hidden_beside_its_target(tmp_path, umask_027):
    tmp = atomic.temporary_sibling(tmp_path / "market.h5")
    assert tmp.parent == tmp_path and tmp.name.startswith(".market.h5.")
    assert tmp.name.endswith(".tmp") and tmp.stat().st_size == 0
    assert mode(tmp) == 0o640
