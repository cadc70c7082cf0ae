"""Files written whole or not at all: a temporary sibling, renamed over the target.

A reader (another rank, a resumed run, a teammate's ``tensorboard``) never sees half a file, and a
crash, pre-emption or full disk leaves the previous version in place. The file gets the
permissions a plain ``open(path, "w")`` would give (0666 less the process's umask), not the
owner-only 0600 of ``tempfile.mkstemp``: run folders, packs and textures on a cluster are read by
other users of the project.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


@functools.cache
def umask() -> int:
    """The process's umask, read once (``os.umask`` only reads it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_sibling(path: Path) -> Path:
    """A new, empty temporary file beside ``path`` (``.NAME.XXXXXXXX.tmp``), with the permissions
    ``path`` would get from ``open``; the caller renames it over ``path`` or removes it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())
    return Path(tmp)


def write_atomic(
    path: str | Path,
    data: str | bytes | Callable[[BinaryIO], object],
    *,
    fsync: bool = True,
) -> Path:
    """Write ``data`` to a temporary sibling, then rename over ``path``: text (UTF-8), bytes, or
    a function that writes to the open binary file (``lambda f: torch.save(state, f)``).

    ``fsync`` flushes the data to the disk before the rename, so that even a power loss leaves
    the old file or the new one; ``fsync=False`` is for many small files written in one go (a
    data set conversion), where a crash means running the conversion again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
