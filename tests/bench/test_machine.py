"""The CPU model that bench headings name: read from /proc/cpuinfo, the architecture elsewhere."""

import builtins
import platform
import re
from pathlib import Path

import pytest

from hpc_reid.bench.machine import cpu_model


def test_cpu_model_is_cpuinfos_model_name():
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+?)\s*$", info.read_text(), flags=re.M)
    if not names:
        pytest.skip("/proc/cpuinfo has no model name (not x86)")
    assert cpu_model() == names[0]


def test_cpu_model_without_cpuinfo(monkeypatch):
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    assert cpu_model() == (platform.processor() or platform.machine())
    assert cpu_model()
