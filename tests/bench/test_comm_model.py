"""The all-reduce time model against values computed by hand, and its fit of latency and
bandwidth recovering known parameters."""

from __future__ import annotations

import math

import pytest

from hpc_reid.bench.comm_model import (
    allreduce_seconds,
    bucket_sizes,
    fit_latency_bandwidth,
    predict_step,
)
from hpc_reid.cli import main

MIB = 1024 * 1024


def test_buckets_are_full_then_the_remainder():
    assert bucket_sizes(60 * MIB, 25 * MIB) == [25 * MIB, 25 * MIB, 10 * MIB]
    assert bucket_sizes(50 * MIB, 25 * MIB) == [25 * MIB, 25 * MIB]
    assert bucket_sizes(3, 25 * MIB) == [3]
    assert bucket_sizes(0, 25 * MIB) == []


def test_resnet50_on_8_ranks_at_100_gbits_matches_the_hand_computation():
    # ResNet-50 (torchvision) has 25,557,032 parameters: 102,228,128 bytes of fp32 gradients, in
    # 25 MiB buckets 26,214,400 x 3 + 23,584,928 = 4 buckets. Ring: each rank sends 2 * 7/8 of
    # the bytes: 178,899,224 bytes at 12.5e9 B/s = 0.01431193792 s, plus 4 x 20 us.
    pred = predict_step(25_557_032, 8, 12.5e9, 20e-6, bucket_mb=25)
    assert pred.buckets == 4
    assert pred.gradient_bytes == 102_228_128
    assert pred.seconds == pytest.approx(0.01431193792 + 0.00008, rel=1e-12)


def test_one_rank_communicates_nothing_and_two_ranks_send_the_buffer_once():
    assert predict_step(1000, 1, 1e9, 1e-3).seconds == 0.0
    # p = 2: 2 * (1/2) * n = n bytes per rank; 4000 bytes at 1e9 B/s = 4 us, + 1 ms latency
    assert allreduce_seconds(4000, 2, 1e9, 1e-3) == pytest.approx(1e-3 + 4e-6)
    assert predict_step(1000, 2, 1e9, 1e-3).seconds == pytest.approx(1e-3 + 4e-6)


def test_bf16_gradients_halve_the_bandwidth_term():
    a = predict_step(10_000_000, 4, 1e10, 0.0, bytes_per_element=4).seconds
    b = predict_step(10_000_000, 4, 1e10, 0.0, bytes_per_element=2).seconds
    assert a == pytest.approx(2 * b) and a == pytest.approx(1.5 * 40e6 / 1e10)


def test_fit_recovers_the_latency_and_bandwidth_the_times_were_made_with():
    alpha, bandwidth, world = 35e-6, 3.2e9, 4
    sizes = [4096, 262144, 4194304, 26214400]
    times = [alpha + 2 * 3 / 4 * n / bandwidth for n in sizes]
    fit_alpha, fit_bw = fit_latency_bandwidth(sizes, times, world)
    assert fit_alpha == pytest.approx(alpha, rel=1e-6)
    assert fit_bw == pytest.approx(bandwidth, rel=1e-9)


def test_a_fit_without_a_size_effect_gives_infinite_bandwidth():
    alpha, bw = fit_latency_bandwidth([1000, 2000], [5e-4, 4e-4], 2)
    assert math.isinf(bw) and alpha == pytest.approx(4.5e-4)
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_latency_bandwidth([1000, 1000], [1e-3, 1e-3], 2)


def test_bench_model_cli_prints_the_prediction_per_world_size(capsys):
    code = main(
        [
            "bench",
            "model",
            "--params",
            "25557032",
            "--world",
            "1",
            "8",
            "--bandwidth-gbps",
            "100",
            "--latency-us",
            "20",
            "--step-ms",
            "100",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| 1 | 4 | 97.5 | 0.00 | 0.00 |" in out
    assert "| 8 | 4 | 97.5 | 14.39 | 0.14 |" in out


def test_bench_model_cli_refuses_a_zero_bandwidth(capsys):
    args = ["bench", "model", "--params", "1e6", "--world", "2", "--bandwidth-gbps", "0"]
    assert main(args) == 2
    assert "must be > 0" in capsys.readouterr().err
