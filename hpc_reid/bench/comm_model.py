"""An analytic model of DDP's gradient all-reduce time per step, to plan runs on machines we lack.

DDP averages gradients in buckets of ``bucket_cap_mb`` (25 MiB by default), one all-reduce per
bucket. A ring all-reduce of ``n`` bytes over ``p`` ranks moves ``2 (p - 1) / p * n`` bytes
through every rank's link (a reduce-scatter and an all-gather, each ``(p - 1) / p * n``; Patarasuk
& Yuan, JPDC 2009, and Thakur et al., IJHPCA 2005), so with a per-call latency ``alpha`` and a
link bandwidth ``B`` (bytes/s)

    t(n) = alpha + 2 (p - 1) / p * n / B          and per step   T = sum over buckets t(n_b).

``alpha`` lumps the ring's ``2 (p - 1)`` message latencies and the call's fixed cost; both
parameters are fitted by :func:`fit_latency_bandwidth` from timed all-reduces of a few sizes, or
given for a machine we do not have (``hpc-reid bench model``). ``B`` is the slowest link of the
ring: across nodes, the network's bandwidth per node (NCCL rings run through every node once).
The model ignores the overlap of the all-reduce with the backward pass (what is exposed is
measured separately by the benchmark) and DDP's smaller first bucket (1 MiB: one extra ``alpha``
at most). See bench/COMM_MODEL.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 2**20


def bucket_sizes(total_bytes: int, bucket_bytes: int) -> list[int]:
    """DDP-style buckets of ``total_bytes`` of gradients: full buckets, then the remainder."""
    if total_bytes < 0 or bucket_bytes < 1:
        raise ValueError(
            f"need total_bytes >= 0 and bucket_bytes >= 1, got {total_bytes}, {bucket_bytes}"
        )
    full, rest = divmod(total_bytes, bucket_bytes)
    return [bucket_bytes] * full + ([rest] if rest else [])


def ring_bytes_per_rank(nbytes: float, world: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2.0 * (world - 1) / world * nbytes if world > 1 else 0.0


def allreduce_seconds(nbytes: float, world: int, bandwidth_Bps: float, latency_s: float) -> float:
    """Time of one ring all-reduce of ``nbytes`` over ``world`` ranks (0 on one rank)."""
    if world <= 1:
        return 0.0
    return latency_s + ring_bytes_per_rank(nbytes, world) / bandwidth_Bps


@dataclass(frozen=True)
class CommPrediction:
    """What :func:`predict_step` computed, for reports."""

    params: int
    bytes_per_element: int
    bucket_bytes: int
    world: int
    bandwidth_Bps: float
    latency_s: float
    buckets: int
    gradient_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "params": self.params,
            "bytes_per_element": self.bytes_per_element,
            "bucket_mb": self.bucket_bytes / MIB,
            "world": self.world,
            "bandwidth_gbps": self.bandwidth_Bps * 8 / 1e9,
            "latency_us": self.latency_s * 1e6,
            "buckets": self.buckets,
            "gradient_mib": self.gradient_bytes / MIB,
            "seconds": self.seconds,
        }


def predict_step(
    params: int,
    world: int,
    bandwidth_Bps: float,
    latency_s: float,
    bucket_mb: float = 25.0,
    bytes_per_element: int = 4,
) -> CommPrediction:
    """All-reduce time per step for ``params`` gradients (fp32 gradients: 4 bytes, also under
    bf16 autocast, whose parameters stay fp32)."""
    if bandwidth_Bps <= 0 or latency_s < 0 or world < 1 or params < 0:
        raise ValueError(
            f"need bandwidth > 0, latency >= 0, world >= 1, params >= 0; got {bandwidth_Bps}, "
            f"{latency_s}, {world}, {params}"
        )
    total = int(params) * bytes_per_element
    bucket = max(1, int(bucket_mb * MIB))
    sizes = bucket_sizes(total, bucket)
    seconds = sum(allreduce_seconds(n, world, bandwidth_Bps, latency_s) for n in sizes)
    return CommPrediction(
        int(params),
        bytes_per_element,
        bucket,
        world,
        bandwidth_Bps,
        latency_s,
        len(sizes),
        total,
        seconds,
    )


def fit_latency_bandwidth(
    sizes_bytes: Sequence[float], seconds: Sequence[float], world: int
) -> tuple[float, float]:
    """Least-squares (latency_s, bandwidth_Bps) of ``t = alpha + x / B`` with
    ``x = 2 (p - 1) / p * n``, from all-reduces of at least two distinct sizes.

    A fit whose slope is not positive (timing noise swamping the size effect) gives an infinite
    bandwidth; a negative intercept is clipped to 0.
    """
    if world <= 1:
        raise ValueError("a bandwidth fit needs world >= 2")
    if len(sizes_bytes) != len(seconds) or len(set(sizes_bytes)) < 2:
        raise ValueError("need timings of at least two distinct sizes")
    xs = [ring_bytes_per_rank(n, world) for n in sizes_bytes]
    mx, my = sum(xs) / len(xs), sum(seconds) / len(seconds)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, seconds, strict=True)) / sxx
    if slope <= 0:
        return max(my, 0.0), math.inf
    return max(my - slope * mx, 0.0), 1.0 / slope
