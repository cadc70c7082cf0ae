"""The machine a number was measured on, for the headings of bench/RESULTS.md.

Float kernels differ between CPU models (an AMD EPYC and an Intel Xeon give different losses from
the same seed after a few steps, and real-data results that differ by more than their paired
spread), so a result names the CPU model, not just the architecture.
"""

from __future__ import annotations

import contextlib
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; the processor or architecture elsewhere."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
