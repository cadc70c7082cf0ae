"""The machine's cores are shared with other suites: the model tests run on one thread."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every model test on one thread (tests/conftest.py's ``one_thread``)."""
