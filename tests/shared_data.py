"""The real data some tests read from ``../shared/data`` (the PETA sets, the ImageNet MobileNetV2
weights): where it is, and what a test does when it is missing.

On a developer's machine a missing folder skips the test, saying where it looked. Under CI
(``CI=true``, or ``HPC_REID_REQUIRE_DATA=1`` anywhere) it fails instead, as the SLURM integration
tests do: a CI run whose data went missing would otherwise pass while checking nothing.
``HPC_REID_SHARED_DATA`` points at another copy of the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: ``../shared/data`` next to the repository root (tests/ is one level below that root).
DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_root() -> Path:
    """The shared data folder: ``$HPC_REID_SHARED_DATA``, else ``../shared/data``; read at each
    call, so that a test (or a CI job) can redirect it after this module is imported."""
    return Path(os.environ.get("HPC_REID_SHARED_DATA") or DEFAULT_ROOT)


def data_required() -> bool:
    """Whether a missing data folder is a failure: under CI or when asked for explicitly."""
    return os.environ.get("CI") == "true" or os.environ.get("HPC_REID_REQUIRE_DATA") == "1"


def require_shared_data(relative: str | Path, directory: bool = False) -> Path:
    """The path ``relative`` inside the shared data folder, which must be a file (or a folder when
    ``directory``); when it is not there, skips the calling test, or fails it under CI."""
    path = shared_data_root() / relative
    if path.is_dir() if directory else path.is_file():
        return path
    kind = "folder" if directory else "file"
    reason = (
        f"shared test data {kind} {path} not found (set HPC_REID_SHARED_DATA to the folder "
        f"holding {relative})"
    )
    if data_required():
        pytest.fail(f"CI=true or HPC_REID_REQUIRE_DATA=1, but {reason}", pytrace=False)
    pytest.skip(reason)
