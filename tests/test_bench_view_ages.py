"""The exact mark-price view age of bench/bench_full_market.py (`view_ages`, `mark_writes`):
pure arithmetic on (written_at, E) pairs, checked against ages worked out by hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench_full_market.py"
_spec = importlib.util.spec_from_file_location("bench_full_market", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_full_market"] = bench
_spec.loader.exec_module(bench)


def every_second(latency: float, seconds: int = 100, start: float = 1_000.0
                 ) -> list[tuple[float, float]]:
    """A mark price made on each whole second and written `latency` s later."""
    return [(start + k + latency, start + k) for k in range(seconds)]


def test_a_constant_latency_gives_ages_spread_evenly_over_one_second() -> None:
    # written 20 ms after E every second: between two writes the age runs 0.02 -> 1.02 s
    writes = {"BTCUSDT": every_second(0.020)}
    got = bench.view_ages(writes, 1_010.0, 1_090.0)
    assert got["p50"] == pytest.approx(0.520, abs=1e-6)
    assert got["p99"] == pytest.approx(1.010, abs=1e-6)
    assert got["max"] == pytest.approx(1.020, abs=1e-6)
    # older than 1 s for the last 20 ms of each second: the mean latency
    assert got["over_1s"] == pytest.approx(0.020, abs=1e-6)


def test_p99_within_one_second_needs_a_mean_latency_under_ten_ms() -> None:
    fast = bench.view_ages({"A": every_second(0.009)}, 1_010.0, 1_090.0)
    slow = bench.view_ages({"A": every_second(0.011)}, 1_010.0, 1_090.0)
    assert fast["p99"] < 1.0 < slow["p99"]


def test_symbols_are_weighted_by_time_alike() -> None:
    writes = {"A": every_second(0.0), "B": every_second(0.100)}
    got = bench.view_ages(writes, 1_010.0, 1_090.0)
    # A is never older than 1 s, B 10 % of the time: 5 % of all view-time
    assert got["over_1s"] == pytest.approx(0.05, abs=1e-6)
    assert got["max"] == pytest.approx(1.100, abs=1e-6)


def test_an_older_value_written_late_does_not_make_the_view_younger_or_older() -> None:
    # views.lua refuses an older E: the view keeps the newer value it holds
    rows = [*every_second(0.020), (1_050.5, 1_030.0)]
    got = bench.view_ages({"A": rows}, 1_010.0, 1_090.0)
    assert got["max"] == pytest.approx(1.020, abs=1e-6)
    assert got["over_1s"] == pytest.approx(0.020, abs=1e-6)


def test_a_view_that_stops_being_written_grows_old() -> None:
    # written until 1,049, then nothing: from 1,050 on its age runs up to 41 s
    rows = [r for r in every_second(0.0) if r[1] < 1_050.0]
    got = bench.view_ages({"A": rows}, 1_010.0, 1_090.0)
    assert got["max"] == pytest.approx(1_090.0 - 1_049.0, abs=1e-6)
    assert got["over_1s"] == pytest.approx(40.0 / 80.0, abs=1e-6)


def test_no_write_in_reach_gives_no_figure() -> None:
    got = bench.view_ages({}, 0.0, 10.0)
    assert all(math.isnan(v) for v in got.values())


def test_mark_writes_finds_each_entry_by_its_whole_id() -> None:
    # two mark prices logged in the same millisecond (ids 5-0 and 5-1) of two symbols
    ki = bench.RAW_KEYS.index(bench.market_key("markPrice"))
    marks = {(ki, 5, 0): "BTCUSDT", (ki, 5, 1): "ETHUSDT"}
    samples = [(10.0, 4_000.0, 9.0, 5.0, float(ki), 0.0, 1.0, 0.0),
               (10.5, 4_001.0, 9.1, 5.0, float(ki), 0.0, 2.0, 1.0),
               (11.0, 4_002.0, 9.2, 7.0, float(ki + 1), 0.0, 3.0, 0.0)]  # not a mark entry
    assert bench.mark_writes(samples, marks) == {"BTCUSDT": [(10.0, 4.0)],
                                                 "ETHUSDT": [(10.5, 4.001)]}


def test_mark_bursts_times_the_first_and_last_of_each_seconds_mark_prices() -> None:
    ki = float(bench.RAW_KEYS.index(bench.market_key("markPrice")))
    marks, samples = {}, []
    for second in range(3):
        e = 1_000_000.0 + 1_000 * second
        for n in range(100):  # received n/10 ms after E, logged 1 ms later, written 5 ms later
            recv = (e + n / 10) / 1000
            marks[(int(ki), int(e + n / 10 + 1), n)] = f"S{n}"
            samples.append((recv + 0.006, e, recv, float(int(e + n / 10 + 1)), ki, 0.0,
                            float(n), float(n)))
    got = bench.mark_bursts(samples, marks, 0.0, 2e6)
    assert got["symbols"] == 100
    assert got["received_first"] == pytest.approx(0.0)
    assert got["received_last"] == pytest.approx(9.9, abs=1e-6)
    assert got["written_last"] == pytest.approx(15.9, abs=1e-3)
    assert got["logged_first"] == 1.0
