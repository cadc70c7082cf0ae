"""Benchmarks of hpc-reid itself: per-rank throughput and time split (:mod:`.runner`, its timed
phases in :mod:`.phases`), reports and scaling summaries (:mod:`.report`), the all-reduce time model
(:mod:`.comm_model`), and the machine a number was measured on (:mod:`.machine`).

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
