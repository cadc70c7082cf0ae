"""Benchmarks of hpc-reid itself: per-rank throughput and time split (:mod:`.runner`), reports and
scaling summaries (:mod:`.report`), and the all-reduce time model (:mod:`.comm_model`).

``hpc-reid bench`` runs :func:`run_bench` under any launcher; ``hpc-reid bench summarize`` and
``hpc-reid bench model`` wrap :func:`write_scaling` and :func:`predict_step`.
"""

from hpc_reid.bench.comm_model import fit_latency_bandwidth, predict_step
from hpc_reid.bench.report import load_runs, run_markdown, write_scaling
from hpc_reid.bench.runner import run_bench

__all__ = [
    "fit_latency_bandwidth",
    "load_runs",
    "predict_step",
    "run_bench",
    "run_markdown",
    "write_scaling",
]
