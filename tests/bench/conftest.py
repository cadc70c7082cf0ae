"""The bench scripts are run as ``python bench/NAME.py``; tests import them the same way."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_script(monkeypatch):
    """``bench_script(name)``: bench/NAME.py imported as the script is run (bench/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module
