"""Power-of-two threshold rules and the calibration histogram, on crafted data."""

from __future__ import annotations

import numpy as np
import pytest

from onnxdgh.quantization import thresholds as th
from onnxdgh.quantization.calibrate import PowerOfTwoHistogram, TensorStats
from onnxdgh.quantization.plan import activation_threshold

from .helpers_quantize import is_pow2


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, 1.0), (1.0000001, 2.0), (0.75, 1.0), (0.5, 0.5), (3.0, 4.0), (2.0**-20 * 1.5, 2.0**-19), (1e-300, 2.0**-40)],
)
def test_pow2_ceil(value: float, expected: float) -> None:
    assert float(th.pow2_ceil(value)) == expected


def test_pow2_ceil_of_zero_is_the_zero_range_threshold() -> None:
    assert float(th.pow2_ceil(0.0)) == th.ZERO_RANGE_THRESHOLD


def test_grids_and_scales() -> None:
    assert th.grid(8, True) == (-128, 127, 128)
    assert th.grid(8, False) == (0, 255, 256)
    assert th.grid(4, True) == (-8, 7, 8)
    assert th.grid(2, True) == (-2, 1, 2)
    assert float(th.scale_for(4.0, 8, True)) == 2.0**-5
    assert float(th.scale_for(4.0, 8, False)) == 2.0**-6


def test_noclip_stretches_the_positive_maximum() -> None:
    # max 1.0 exactly: a signed 8-bit grid with t = 1 tops out at 127/128, so t must be 2.
    assert float(th.noclip_threshold(-0.5, 1.0, 8, True)) == 2.0
    # the negative end reaches -t exactly: -1.0 fits t = 1.
    assert float(th.noclip_threshold(-1.0, 0.9, 8, True)) == 1.0
    # unsigned: 255/256 * t must cover the maximum.
    assert float(th.noclip_threshold(0.0, 0.99, 8, False)) == 1.0
    assert float(th.noclip_threshold(0.0, 1.0, 8, False)) == 2.0


def test_noclip_never_clips_observed_values() -> None:
    values = np.random.default_rng(0).standard_normal(10_000) * 3.7
    t = float(th.noclip_threshold(values.min(), values.max(), 8, True))
    assert is_pow2(t)
    deq = th.fake_quantize(values, t, 8, True)
    assert np.max(np.abs(deq - values)) <= t / 128 / 2 + 1e-12


def test_weight_mse_picks_the_bulk_not_the_outlier() -> None:
    # 4-bit, one channel: 999 values in [-1, 1] and one 1.9. No clipping needs t = 4
    # (1.9 > 7/8 * 2); with t = 1 the bulk's step is 4x finer and only the one value clips:
    # squared error ~1.3 + 0.8 against ~21 for t = 4.
    rng = np.random.default_rng(1)
    bulk = rng.uniform(-1, 1, size=999)
    channel = np.concatenate([bulk, [1.9]])
    noclip = th.weight_thresholds(channel[None, :], 0, 4, "noclip")
    mse = th.weight_thresholds(channel[None, :], 0, 4, "mse")
    assert noclip.tolist() == [4.0]
    assert mse.tolist() == [1.0]


def test_weight_thresholds_are_per_channel_and_zero_channels_are_harmless() -> None:
    w = np.zeros((3, 2, 3, 3), np.float32)
    w[0] = 0.3
    w[1] = -5.0
    # channel 2 all zero: gets the layer's largest threshold (bias scales stay large)
    t = th.weight_thresholds(w, 0, 8, "mse")
    assert t.shape == (3,)
    assert t[0] == 0.5 and t[1] == 8.0 and t[2] == 8.0
    assert all(is_pow2(v) for v in t)
    assert th.weight_thresholds(w, None, 8, "noclip").shape == ()


def test_weight_thresholds_follow_the_axis() -> None:
    w = np.ones((4, 3), np.float32)
    w[:, 1] = 0.2
    t = th.weight_thresholds(w, 1, 8, "noclip")
    assert t.tolist() == [2.0, 0.25, 2.0]


def test_histogram_mse_picks_the_obvious_power_of_two() -> None:
    # ReLU-like data: 100k values in [0, 0.9] plus two at 1.2. Unsigned 8 bits: t = 1 clips
    # the two (error 0.08) and halves everyone's step (rounding error 0.13 vs 0.51 at t = 2).
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.uniform(0, 0.9, size=100_000), [1.2, 1.2]]).astype(np.float32)
    stats = TensorStats("t")
    for chunk in np.array_split(values, 7):
        stats.add(chunk)
    t = th.histogram_mse_threshold(stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum, 8, False)
    assert t == 1.0
    noclip = float(th.noclip_threshold(stats.minimum, stats.maximum, 8, False))
    assert noclip == 2.0


def test_histogram_mse_without_outliers_matches_noclip() -> None:
    values = np.random.default_rng(3).uniform(-2.9, 2.9, size=50_000)
    stats = TensorStats("t")
    stats.add(values)
    t = th.histogram_mse_threshold(stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum, 8, True)
    assert t == 4.0


def test_histogram_growth_is_exact() -> None:
    rng = np.random.default_rng(4)
    small = rng.uniform(-0.3, 0.3, size=5000)
    large = rng.uniform(-37, 37, size=5000)
    grown = PowerOfTwoHistogram(bins=256)
    grown.add(small)
    grown.add(large)
    direct = PowerOfTwoHistogram(bins=256)
    direct.add(np.concatenate([large, small]))
    assert grown.radius == direct.radius == 64.0
    np.testing.assert_array_equal(grown.counts, direct.counts)
    np.testing.assert_allclose(grown.sums, direct.sums, rtol=1e-9, atol=1e-9)
    assert grown.counts.sum() == 10_000


def test_histogram_growth_far_beyond_the_bin_count() -> None:
    hist = PowerOfTwoHistogram(bins=64)
    hist.add(np.zeros(10))
    hist.add(np.array([-1.0, 3.0]))
    assert hist.radius == 4.0
    assert hist.counts.sum() == 12
    assert hist.counts[32] == 10  # the zeros sit in the bin starting at 0


def test_tensor_stats_track_min_max() -> None:
    stats = TensorStats("t")
    stats.add(np.array([1.0, 2.0]))
    stats.add(np.array([-3.0, 0.5]))
    assert (stats.minimum, stats.maximum, stats.count, stats.abs_max) == (-3.0, 2.0, 4, 3.0)


def _search(stats: TensorStats, power: float) -> float:
    return th.histogram_mse_threshold(stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum,
                                      8, True, power=power)


def test_lp_search_lies_between_mse_and_noclip() -> None:
    # 200,000 values in [-4, 4] and one at 9: MSE clips the lone value hard (4), no clipping
    # doubles the step for it (16), the cube of the error keeps it within one step of 8.
    values = np.concatenate([np.random.default_rng(5).uniform(-4, 4, size=200_000), [9.0]])
    stats = TensorStats("t")
    stats.add(values)
    assert _search(stats, 2.0) == 4.0
    assert _search(stats, th.LP_POWER) == 8.0
    assert float(th.noclip_threshold(stats.minimum, stats.maximum, 8, True)) == 16.0
    # the activation rule of the plan by name (what `--threshold mse|lp|noclip` selects)
    assert [activation_threshold(stats, 8, True, rule) for rule in ("mse", "lp", "noclip")] == [4.0, 8.0, 16.0]


def test_lp_search_keeps_a_few_rare_large_values_that_mse_clips() -> None:
    # Five values at 9..10 among 100,000 in [-4, 4]: what a detector's strongest responses
    # look like; MSE clips them at 8, lp does not.
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.uniform(-4, 4, size=100_000), rng.uniform(9, 10, size=5)])
    stats = TensorStats("t")
    stats.add(values)
    assert _search(stats, 2.0) == 8.0
    assert _search(stats, th.LP_POWER) == 16.0


def test_power_two_is_the_mse_search() -> None:
    values = np.random.default_rng(6).standard_t(3, size=20_000)
    stats = TensorStats("t")
    stats.add(values)
    default = th.histogram_mse_threshold(stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum,
                                         8, True)
    assert _search(stats, 2.0) == default


def test_lp_rule_searches_weights_by_mse() -> None:
    channel = np.concatenate([np.random.default_rng(0).normal(0.0, 0.1, 999), [1.0]])[None, :]
    assert th.weight_thresholds(channel, 0, 4, "lp").tolist() == th.weight_thresholds(channel, 0, 4, "mse").tolist() == [0.5]
    assert th.weight_thresholds(channel, 0, 4, "noclip").tolist() == [2.0]
