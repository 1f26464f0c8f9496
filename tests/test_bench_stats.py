"""Benchmark arithmetic on synthetic data: percentiles, throughput, timer, FLOPs, checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from perceptual_engine import FeatureSpec
from perceptual_engine.bench import harness, report, workloads
from perceptual_engine.bench.flops import gram_flops, measure_peak
from perceptual_engine.layers import conv_flops


# -- percentiles and throughput ------------------------------------------------

def test_percentiles_of_one_to_ten_have_known_values():
    samples = [7.0, 3.0, 10.0, 1.0, 5.0, 2.0, 9.0, 4.0, 8.0, 6.0]  # 1..10, shuffled
    assert harness.percentile(samples, 50) == pytest.approx(5.5)
    assert harness.percentile(samples, 90) == pytest.approx(9.1)  # rank 8.1: 9 + 0.1·(10 − 9)
    assert harness.percentile(samples, 99) == pytest.approx(9.91)
    assert harness.percentile(samples, 0) == 1.0
    assert harness.percentile(samples, 100) == 10.0


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    rng = np.random.default_rng(3)
    samples = rng.lognormal(size=37).tolist()
    assert harness.percentile(samples, q) == pytest.approx(np.percentile(samples, q))


def test_percentile_rejects_no_samples_and_bad_q():
    with pytest.raises(ValueError, match="no samples"):
        harness.percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        harness.percentile([1.0], 101)


def test_summarize_gives_items_per_second_at_the_median():
    stats = harness.summarize([40.0, 10.0, 30.0, 20.0], items_per_call=8)
    assert stats.p50 == pytest.approx(25.0)
    assert stats.throughput == pytest.approx(8 / 0.025)  # 320 images/s
    assert (stats.n, stats.min, stats.max, stats.mean) == (4, 10.0, 40.0, 25.0)
    assert stats.p90 is None and stats.p99 is None  # 4 samples support neither


def test_tail_percentiles_only_from_enough_samples():
    ten = harness.summarize([float(v) for v in range(10, 110, 10)], items_per_call=1)
    assert ten.p90 == pytest.approx(91.0) and ten.p99 is None
    hundred = harness.summarize([float(v) for v in range(1, 101)], items_per_call=1)
    assert hundred.p90 == pytest.approx(90.1) and hundred.p99 == pytest.approx(99.01)
    assert report._ms(None) == "—"


def test_summarize_of_one_sample():
    stats = harness.summarize([12.5], items_per_call=1)
    assert stats.p50 == 12.5 and stats.p90 is None and stats.p99 is None
    assert stats.throughput == pytest.approx(80.0)


def test_summarize_rejects_empty_and_zero_items():
    with pytest.raises(ValueError, match="no timing samples"):
        harness.summarize([], 1)
    with pytest.raises(ValueError, match="items_per_call"):
        harness.summarize([1.0], 0)


def test_time_calls_rotates_sets_and_syncs_around_each_sample():
    events: list[str] = []
    ticks = iter(float(t) for t in range(100))

    def call(i: int) -> None:
        events.append(f"call{i}")

    def sync() -> None:
        events.append("sync")

    samples = harness.time_calls(call, sync, n_sets=3, warmup=2, iters=4,
                                 clock=lambda: next(ticks), start=1)
    calls = [e for e in events if e.startswith("call")]
    assert calls == ["call1", "call2", "call0", "call1", "call2", "call0"]
    assert samples == [1000.0] * 4  # each sample spans one clock tick = 1 s
    # After the warm-up: sync, call, sync for every timed call.
    timed = events[events.index("call2") + 1:]
    assert timed[:4] == ["sync", "sync", "call0", "sync"]


def test_time_calls_rejects_nonsense_counts():
    with pytest.raises(ValueError):
        harness.time_calls(lambda i: None, lambda: None, n_sets=0, warmup=0, iters=1)


# -- FLOPs ------------------------------------------------------------------------

def test_conv_flops_of_relu1_2_at_10x10_by_hand():
    expected = 2 * 9 * 3 * 64 * 100 + 2 * 9 * 64 * 64 * 100
    assert conv_flops("vgg19", "relu1_2", 10, 10) == expected


def test_conv_flops_of_vgg19_to_relu4_4_at_224_is_35_3_gflop():
    assert conv_flops("vgg19", "relu4_4", 224, 224) == pytest.approx(35.3e9, rel=5e-3)


def test_gram_flops_by_hand():
    # relu1_2: 64 channels at 224²; relu2_2: 128 channels at 112².
    assert gram_flops("vgg19", ["relu1_2"], 224, 224) == 2 * 64 * 64 * 224 * 224
    assert gram_flops("vgg19", ["relu2_2"], 224, 224) == 2 * 128 * 128 * 112 * 112
    assert gram_flops("vgg19", ["relu2_2"], 41, 41) == 2 * 128 * 128 * 20 * 20  # floor at the pool


def test_workload_flops_count_x_and_y_for_a_pair_and_x_only_for_style():
    spec = FeatureSpec(weights="random")
    conv = conv_flops("vgg19", "relu4_4", 224, 224)
    grams = gram_flops("vgg19", spec.layers, 224, 224)
    assert workloads.get("features").flops_per_item(spec, 224) == conv
    assert workloads.get("distance").flops_per_item(spec, 224) == 2 * (conv + grams)
    assert workloads.get("style").flops_per_item(spec, 224) == conv + grams
    assert grams / conv < 0.05  # Grams are a few percent on top of the convolutions


def test_measure_peak_reports_a_positive_rate():
    peak = measure_peak("cpu", "fp32", n=128, reps=2)
    assert peak.n == 128 and peak.ms > 0
    assert peak.tflops == pytest.approx(2 * 128**3 / (peak.ms / 1000) / 1e12)


# -- the parity check ------------------------------------------------------------

def test_max_rel_error_is_scaled_by_the_largest_reference_value():
    ref = {"a": np.array([1.0, -4.0]), "total": np.array([2.0])}
    got = {"a": np.array([1.2, -4.0]), "total": np.array([2.0]), "extra": np.zeros(3)}
    assert workloads.max_rel_error(got, ref) == pytest.approx(0.2 / 4.0)


def test_max_rel_error_is_infinite_for_missing_misshapen_or_nan_outputs():
    ref = {"a": np.ones(3)}
    assert workloads.max_rel_error({}, ref) == math.inf
    assert workloads.max_rel_error({"a": np.ones(4)}, ref) == math.inf
    assert workloads.max_rel_error({"a": np.array([1.0, np.nan, 1.0])}, ref) == math.inf


# -- memory probes and formatting ---------------------------------------------------

def test_host_memory_probe_reads_this_process():
    import mmap

    size = 32 * 2**20
    with harness.MemoryProbe(torch_cuda=False, smi=False) as probe:
        block = mmap.mmap(-1, size)  # fresh pages (malloc might reuse resident ones)
        block.write(b"\x01" * size)
        mem = probe.read()
    block.close()
    if harness.rss_mb() is None:
        pytest.skip("no /proc on this platform")
    assert mem.host_peak_mb is not None and mem.host_peak_mb > 32
    if not mem.host_peak_since_start:
        assert mem.host_delta_mb is not None and mem.host_delta_mb >= 31
    assert (mem.gpu_mb, mem.gpu_source) == (None, "n/a")


def test_speedup_and_number_formats():
    assert report._ratio(3.14159) == "3.1×"
    assert report._ratio(0.456) == "0.46×"
    assert report._ratio(None) == "—"
    assert report._ms(123.456) == "123.5" and report._ms(1.234) == "1.23"
