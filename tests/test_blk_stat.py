"""mqrt.block.blk_stat: fio's histogram arithmetic, percentiles, moments and JSON shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqrt.block.blk_stat import (
    DEFAULT_PERCENTILES,
    PLAT_NR,
    LatHist,
    dir_stats_json,
    format_percentiles_text,
    iodepth_level,
    parse_percentile_list,
    percentile_precision,
    percentile_unit,
    plat_idx_array,
    plat_idx_to_val,
    plat_val_to_idx,
)

# (value, fio bin index, bin value) worked out by hand from fio's formulas.
BOUNDARIES = [
    (0, 0, 0.0),
    (1, 1, 1.0),
    (63, 63, 63.0),
    (64, 64, 64.0),
    (127, 127, 127.0),
    (128, 128, 129.0),  # first 2-wide bin [128, 130)
    (129, 128, 129.0),
    (255, 191, 255.0),  # last bin of the 128..255 group
    (256, 192, 258.0),  # first 4-wide bin [256, 260)
    (1000, 317, 1004.0),  # [1000, 1008)
    (10**6, 954, 1003520.0),
    (10**9, 1591, 1002438656.0),
    (2**34 - 1, PLAT_NR - 1, 2**33 + 63.5 * 2**27),
    (2**34, PLAT_NR - 1, 2**33 + 63.5 * 2**27),
    (10**15, PLAT_NR - 1, 2**33 + 63.5 * 2**27),
    (2**64 - 1, PLAT_NR - 1, 2**33 + 63.5 * 2**27),
]

FIO_DIR_KEYS = [
    "io_bytes", "io_kbytes", "bw_bytes", "bw", "iops", "runtime", "total_ios", "short_ios",
    "drop_ios", "slat_ns", "clat_ns", "lat_ns", "bw_min", "bw_max", "bw_agg", "bw_mean",
    "bw_dev", "bw_samples", "iops_min", "iops_max", "iops_mean", "iops_stddev", "iops_samples",
]  # fmt: skip
LAT_KEYS = ["min", "max", "mean", "stddev", "N"]


@pytest.mark.parametrize(("val", "idx", "bin_val"), BOUNDARIES)
def test_boundaries(val, idx, bin_val):
    assert plat_val_to_idx(val) == idx
    assert plat_idx_to_val(idx) == bin_val
    dtype = np.uint64 if val >= 2**63 else np.int64
    assert plat_idx_array(np.array([val], dtype=dtype)).tolist() == [idx]


def test_scalar_rejects_out_of_range():
    with pytest.raises(ValueError):
        plat_val_to_idx(-1)
    with pytest.raises(ValueError):
        plat_idx_to_val(PLAT_NR)
    with pytest.raises(ValueError):
        plat_idx_array(np.array([5, -3]))
    with pytest.raises(TypeError):
        plat_idx_array(np.array([1.5]))


def test_every_index_round_trips_through_its_value():
    for i in range(PLAT_NR):
        assert plat_val_to_idx(int(plat_idx_to_val(i))) == i


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_vectorised_equals_scalar(dtype):
    rng = np.random.default_rng(1234)
    # Log-uniform over 0 .. 2**40 so every group (and the clamp) is exercised.
    vals = (2.0 ** rng.uniform(0, 40, 20_000)).astype(dtype)
    vals = np.concatenate([vals, np.arange(0, 2048, dtype=dtype)])
    vec = plat_idx_array(vals)
    assert vec.dtype == np.int64
    assert vec.tolist() == [plat_val_to_idx(int(v)) for v in vals]


@given(st.integers(min_value=128, max_value=2**34 - 1))
def test_bin_value_relative_error_below_one_64th(v):
    approx = plat_idx_to_val(plat_val_to_idx(v))
    assert abs(approx - v) / v < 1 / 64


@given(st.integers(min_value=0, max_value=127))
def test_small_values_are_exact(v):
    assert plat_idx_to_val(plat_val_to_idx(v)) == v


def test_percentiles_of_uniform_within_one_percent():
    vals = np.arange(1, 100_001)
    h = LatHist()
    h.add_many(vals)
    pct = h.percentiles()
    assert list(pct) == [f"{p:f}" for p in DEFAULT_PERCENTILES]
    for p in DEFAULT_PERCENTILES:
        exact = np.percentile(vals, p)
        assert abs(pct[f"{p:f}"] - exact) / exact < 0.01, p


def test_percentiles_follow_fios_rule_and_sort():
    h = LatHist()
    h.add_many([10] * 50 + [20] * 50)
    # 50% reached exactly at the 10 bin (sum >= p/100*N); anything above needs 20.
    assert h.percentiles([100, 50, 50.1]) == {"50.000000": 10, "50.100000": 20, "100.000000": 20}
    assert LatHist().percentiles() == {}
    with pytest.raises(ValueError, match="0 < p <= 100"):
        h.percentiles([0])


def test_merge_equals_adding_everything():
    rng = np.random.default_rng(7)
    a_vals = rng.integers(0, 10**7, 5000)
    b_vals = rng.integers(10**5, 10**9, 3000)
    a, b, both = LatHist(), LatHist(), LatHist()
    a.add_many(a_vals)
    b.add_many(b_vals)
    both.add_many(np.concatenate([a_vals, b_vals]))
    a.merge(b)
    assert np.array_equal(a.bins, both.bins)
    assert (a.n, a.min, a.max, a.sum) == (both.n, both.min, both.max, both.sum)
    assert a.stddev() == pytest.approx(both.stddev(), rel=1e-12)
    assert a.sumsq == pytest.approx(both.sumsq, rel=1e-12)
    empty = LatHist()
    empty.merge(a)
    assert empty.fio_json(bins=True) == a.fio_json(bins=True)


def test_add_matches_add_many():
    vals = [5, 130, 999_999, 7, 2**40]
    one, many = LatHist(), LatHist()
    for v in vals:
        one.add(v)
    many.add_many(vals)
    assert np.array_equal(one.bins, many.bins)
    assert (one.n, one.min, one.max, one.sum) == (many.n, many.min, many.max, many.sum)
    assert one.stddev() == pytest.approx(many.stddev(), rel=1e-12)


def test_bytes_round_trip():
    rng = np.random.default_rng(3)
    h = LatHist()
    h.add_many(rng.integers(0, 10**8, 10_000))
    h.add(2**63 + 5)  # sum no longer fits 64 bits
    back = LatHist.from_bytes(h.to_bytes())
    assert np.array_equal(back.bins, h.bins)
    assert (back.n, back.min, back.max, back.sum, back.m2) == (h.n, h.min, h.max, h.sum, h.m2)
    empty = LatHist.from_bytes(LatHist().to_bytes())
    assert empty.n == 0 and not empty.bins.any()
    assert len(LatHist().to_bytes()) < 64
    with pytest.raises(ValueError):
        LatHist.from_bytes(b"\x93\x01\x02\x03")


def test_mean_stddev_against_numpy():
    rng = np.random.default_rng(11)
    vals = rng.integers(10**9, 10**9 + 100, 50_000)  # large mean, small spread
    h = LatHist()
    for chunk in np.array_split(vals, 7):
        h.add_many(chunk)
    assert h.sum == int(vals.sum())
    assert h.mean() == pytest.approx(vals.mean(), rel=1e-15)
    assert h.stddev() == pytest.approx(np.std(vals, ddof=1), rel=1e-9)
    assert h.sumsq == pytest.approx(float(np.sum(vals.astype(float) ** 2)), rel=1e-12)
    single = LatHist()
    single.add(42)
    assert (single.mean(), single.stddev()) == (42.0, 0.0)
    assert (LatHist().mean(), LatHist().stddev()) == (0.0, 0.0)


def test_parse_percentile_list():
    assert parse_percentile_list("1:5:99.9") == (1.0, 5.0, 99.9)
    assert parse_percentile_list("100") == (100.0,)
    for bad in ["0", "100.5", "-1", "abc", "1::5", "1:5:", "", "nan"]:
        with pytest.raises(ValueError, match="0 < p <= 100") as info:
            parse_percentile_list(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bad entry 'abc'"):
        parse_percentile_list("1:abc")
    with pytest.raises(ValueError, match="at most 20 percentiles"):
        parse_percentile_list(":".join(["50"] * 21))
    assert len(parse_percentile_list(":".join(["50"] * 20))) == 20


def test_fio_json_shapes():
    empty = LatHist().fio_json(bins=True)
    assert empty == {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    h = LatHist()
    h.add_many([100, 100, 1000, 5000])
    out = h.fio_json(plist=[50, 99.9], bins=True)
    assert out["min"] == 100 and out["max"] == 5000 and out["N"] == 4
    assert out["percentile"] == {"50.000000": 100, "99.900000": 5024}
    assert out["bins"] == {"100": 2, "1004": 1, "5024": 1}
    assert "percentile" not in h.fio_json(None)


def _check_dir(d):
    assert list(d) == FIO_DIR_KEYS
    for key in ("slat_ns", "clat_ns", "lat_ns"):
        assert list(d[key])[:5] == LAT_KEYS
    assert "percentile" not in d["lat_ns"] and "percentile" not in d["slat_ns"]


def test_dir_stats_json_empty_direction():
    d = dir_stats_json(
        io_bytes=0, runtime_ms=0, total_ios=0, clat=LatHist(), lat=LatHist(), slat=LatHist()
    )
    _check_dir(d)
    for key in FIO_DIR_KEYS:
        if not key.endswith("_ns"):
            assert d[key] == 0, key
    assert isinstance(d["iops"], float) and isinstance(d["bw_agg"], float)


def test_dir_stats_json_non_empty_direction():
    clat, lat, slat = LatHist(), LatHist(), LatHist()
    clat.add_many(np.arange(1000, 2000))
    lat.add_many(np.arange(1100, 2100))
    slat.add_many(np.full(1000, 100))
    d = dir_stats_json(
        io_bytes=1000 * 4096,
        runtime_ms=2000,
        total_ios=1000,
        clat=clat,
        lat=lat,
        slat=slat,
        iops_samples=[400, 500, 600],
        bw_samples_kib=[1600.0, 2000.0, 2400.0],
    )
    _check_dir(d)
    assert d["io_kbytes"] == 4000 and d["bw_bytes"] == 2048000 and d["bw"] == 2000
    assert d["iops"] == 500.0 and d["runtime"] == 2000 and d["total_ios"] == 1000
    assert list(d["clat_ns"]["percentile"]) == [f"{p:f}" for p in DEFAULT_PERCENTILES]
    assert "99.000000" in d["clat_ns"]["percentile"]
    assert "99.900000" in d["clat_ns"]["percentile"]
    assert (d["bw_min"], d["bw_max"], d["bw_agg"], d["bw_samples"]) == (1600, 2400, 100.0, 3)
    assert d["bw_mean"] == pytest.approx(2000.0) and d["bw_dev"] == pytest.approx(400.0)
    assert (d["iops_min"], d["iops_max"], d["iops_samples"]) == (400, 600, 3)
    assert d["iops_mean"] == pytest.approx(500.0) and d["iops_stddev"] == pytest.approx(100.0)


def test_latency_buckets():
    h = LatHist()
    # 1 ns, 3 ns, 999 ns, 1 us, 1.5 ms, 1500 ms, 3 s: bins that straddle no bucket edge.
    h.add_many([1, 3, 999, 1000, 1_500_000, 1_500_000_000, 3_000_000_000])
    ns, us, ms = h.latency_buckets()
    assert list(ns) == ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000"]
    assert list(us) == list(ns) and list(ms) == [*ns, "2000", ">=2000"]
    share = 100 / 7
    assert ns["2"] == pytest.approx(share) and ns["4"] == pytest.approx(share)
    assert ns["1000"] == pytest.approx(share) and us["2"] == pytest.approx(share)
    assert ms["2"] == pytest.approx(share) and ms["2000"] == pytest.approx(share)
    assert ms[">=2000"] == pytest.approx(share)
    rng = np.random.default_rng(5)
    h.add_many((2.0 ** rng.uniform(0, 33, 10_000)).astype(np.int64))
    total = sum(sum(t.values()) for t in h.latency_buckets())
    assert total == pytest.approx(100.0)
    assert all(v == 0.0 for t in LatHist().latency_buckets() for v in t.values())


def test_iodepth_level():
    out = iodepth_level({1: 10, 2: 5, 3: 5, 7: 20, 8: 10, 31: 10, 32: 20, 64: 10, 1000: 10})
    assert out == {
        "1": 10.0,
        "2": 10.0,
        "4": 20.0,
        "8": 10.0,
        "16": 10.0,
        "32": 20.0,
        ">=64": 20.0,
    }
    assert iodepth_level({}) == dict.fromkeys(out, 0.0)
    assert iodepth_level({0: 1})["1"] == 100.0
    with pytest.raises(ValueError):
        iodepth_level({4: -1})


def test_percentile_unit_is_fios_choice():
    # fio: msec when the smallest is over 2 ms and the largest over 99.999999 ms,
    # usec when the smallest is over 2 us and the largest over 99.999 us
    assert percentile_unit([100, 9_999]) == ("nsec", 1, 0)
    assert percentile_unit([1_000, 50_000_000]) == ("nsec", 1, 0)  # min too small
    assert percentile_unit([2_001, 100_000]) == ("usec", 1000, 1)
    assert percentile_unit([2_000_001, 99_999_999]) == ("usec", 1000, 1)
    assert percentile_unit([2_000_001, 100_000_000]) == ("msec", 1_000_000, 2)
    assert percentile_precision("") == 2
    assert percentile_precision("1:50:99") == 0
    assert percentile_precision("50:99.999") == 3


def test_format_percentiles_text():
    pct = {f"{p:f}": int(p * 1000) + 3000 for p in (1, 5, 10, 20, 99.9)}
    text = format_percentiles_text(pct)
    assert text == (
        "    clat percentiles (usec):\n"
        "     |  1.00th=[    4],  5.00th=[    8], 10.00th=[   13], 20.00th=[   23],\n"
        "     | 99.90th=[  103]\n"
    )
    # msec values round up twice, as fio's do: never a [1] for 1.5 ms
    ms = format_percentiles_text({"50.000000": 2_500_000, "99.000000": 150_000_000}, "lat")
    assert ms.splitlines() == [
        "    lat percentiles (msec):",
        "     | 50.00th=[    3], 99.00th=[  150]",
    ]
    wide = format_percentiles_text({"100.000000": 1_234_567_890}, "slat", precision=0)
    assert wide == "    slat percentiles (msec):\n     | 100th=[ 1235]\n"
    assert format_percentiles_text({}) == ""
    h = LatHist()
    h.add_many(np.arange(1, 1001) * 1000)
    lines = format_percentiles_text(h.percentiles()).splitlines()[1:]
    assert len(lines) == math.ceil(len(DEFAULT_PERCENTILES) / 4)
    assert all(line.startswith("     |") for line in lines)
