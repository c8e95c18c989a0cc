"""The demand forecast (sidecar/forecast): the model on synthetic series, its error, the lead, capacity,
the CSV format, both histories (SQLite, and a real redis-server whose round trips are counted), the
forecaster and its Prometheus families, and the autoscaling recipes that read them.

Time is an injected clock everywhere: nothing here sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml

from sidecar.config import ForecastConfig, keys
from sidecar.errors import ConfigError
from sidecar.forecast import commands
from sidecar.forecast.capacity import MIN_MISS_SHARE, Capacity, PeakRate, capacity, from_latency, parse_overrides
from sidecar.forecast.csvio import CsvError, format_minute, parse_minute, read_rows, write_rows
from sidecar.forecast.history import DAY_MINUTES, History, HistoryLimits, MinuteSeries, Pending
from sidecar.forecast.history_redis import RedisHistory, day_key
from sidecar.forecast.history_sqlite import SQLiteHistory
from sidecar.forecast.lead import LocalLeadSamples, RedisLeadSamples, lead_time, percentile
from sidecar.forecast.model import WEEK_MINUTES, ModelSettings, backtest, forecast, lookback, predict
from sidecar.forecast.service import Forecaster, settings_from
from sidecar.forecast.signals import NAMES, ForecastCollector
from sidecar.latency import LatencyModel
from tests.kube import K8S, NATIVE_OLDEST, NEWEST, OLDEST, load_documents, validate
from tests.servers import RedisServer

DAY0 = 20_010  # 2024-10-14, a Monday
T0 = DAY0 * DAY_MINUTES


class Clock:
    def __init__(self, minute: int = T0) -> None:
        self.now = minute * 60.0

    def __call__(self) -> float:
        return self.now

    def minutes(self, n: float) -> None:
        self.now += n * 60.0


# -- synthetic series -------------------------------------------------------------------------------


def daily(minutes: np.ndarray, peak: float = 600.0) -> np.ndarray:
    """Calls per minute: a night trough, a morning ramp, an evening fall (smooth, no noise)."""
    h = (minutes % DAY_MINUTES) / 60.0
    return peak * (0.15 + 0.85 * np.exp(-0.5 * ((h - 13.0) / 3.5) ** 2))


def weekly(minutes: np.ndarray, peak: float = 600.0) -> np.ndarray:
    """``daily`` on weekdays; weekends at a third of it, and later."""
    weekday = (minutes // DAY_MINUTES + 3) % 7
    weekend = peak / 3 * (0.2 + 0.8 * np.exp(-0.5 * (((minutes % DAY_MINUTES) / 60.0 - 16.0) / 3.0) ** 2))
    return np.where(weekday >= 5, weekend, daily(minutes, peak))


def series_of(rate: Callable[[np.ndarray], np.ndarray], days: float, start: int = T0, noise: float = 0.0,
              seed: int = 0) -> MinuteSeries:
    minutes = start + np.arange(int(days * DAY_MINUTES))
    values = rate(minutes)
    if noise:
        values = values * np.exp(np.random.default_rng(seed).normal(0, noise, values.size))
    return MinuteSeries(start, values.astype(np.float64))


SETTINGS = ModelSettings()


def at(minute: int, seconds: float = 0.0) -> float:
    return minute * 60.0 + seconds


# -- the model --------------------------------------------------------------------------------------


def test_daily_pattern_forecasts_the_minute_ahead() -> None:
    s = series_of(daily, 3)
    now = T0 + 2 * DAY_MINUTES + 9 * 60  # day 3, 09:00: on the morning ramp
    f = forecast("m", s, at(now), lead=600, settings=SETTINGS)
    assert f is not None and f.method == "day"
    truth = float(daily(np.array([now + 10, now + 11])).max()) / 60
    assert f.rate == pytest.approx(truth, rel=0.01)
    assert f.level == pytest.approx(1.0, abs=0.01)
    assert f.at == at(now) + 600 and f.lead == 600
    assert f.current == pytest.approx(float(daily(np.array([now - 1]))[0]) / 60)
    assert set(f.as_dict()) == {"requests_per_second", "at", "lead_seconds", "baseline", "level", "method",
                                "samples", "current"}


def test_weekly_pattern_knows_weekends() -> None:
    s = series_of(weekly, 20)
    now = T0 + 19 * DAY_MINUTES + 11 * 60  # the third Saturday, 11:00
    truth = float(weekly(np.array([now + 30, now + 31])).max()) / 60
    week = forecast("m", s, at(now), lead=1800, settings=SETTINGS)
    days_only = forecast("m", s, at(now), lead=1800, settings=ModelSettings(weeks=0))
    assert week is not None and days_only is not None
    assert week.method == "week" and week.rate == pytest.approx(truth, rel=0.03)
    # Past days alone give a weekday's shape: the level corrects the scale, not the shape.
    assert days_only.method == "day" and abs(days_only.rate - truth) > 3 * abs(week.rate - truth)


def test_trend_is_carried_by_the_level() -> None:
    def growing(minutes: np.ndarray) -> np.ndarray:
        return daily(minutes) * (1 + 0.03 * (minutes - T0) / DAY_MINUTES)  # +3 % a day

    s = series_of(growing, 16)
    now = T0 + 16 * DAY_MINUTES - 6 * 60
    known = MinuteSeries(s.start, s.window(s.start, now))
    f = forecast("m", known, at(now), lead=300, settings=SETTINGS)
    assert f is not None and f.method == "week"
    truth = float(growing(np.array([now + 5, now + 6])).max()) / 60
    assert f.level > 1.15  # a week (and two) of growth
    assert f.rate == pytest.approx(truth, rel=0.02)
    assert f.baseline < truth * 0.9  # without the level it would be 15-20 % low


def test_missing_data_is_skipped_not_read_as_zero() -> None:
    s = series_of(weekly, 15)
    counts = s.counts.copy()
    now = T0 + 15 * DAY_MINUTES - 10 * 60
    counts[now - WEEK_MINUTES - 60 - T0: now - WEEK_MINUTES + 60 - T0] = np.nan  # last week's sample: an outage
    counts[now - 20 - T0: now - T0] = np.nan  # and most of the level window
    f = forecast("m", MinuteSeries(T0, counts[: now - T0]), at(now), lead=120, settings=SETTINGS)
    assert f is not None
    assert f.samples[0] is None and f.samples[1] is not None  # the other week stands in
    assert f.level == 1.0  # too little of the level window: no correction, not a collapse
    assert f.rate == pytest.approx(float(weekly(np.array([now + 2, now + 3])).max()) / 60, rel=0.02)
    # Zeros, on the other hand, are data: a recorded zero yesterday is a quiet day, not a gap.
    zeros = MinuteSeries(T0, np.where(np.isnan(counts), 0.0, counts)[: now - T0])
    quiet = forecast("m", zeros, at(now), lead=120, settings=SETTINGS)
    assert quiet is not None and quiet.samples[0] == 0.0


def test_a_new_model_has_no_forecast_not_zero() -> None:
    young = series_of(daily, 0.5)
    assert forecast("m", young, at(young.end), lead=60, settings=SETTINGS) is None
    silent = MinuteSeries(T0, np.zeros(3 * DAY_MINUTES))
    assert forecast("m", silent, at(silent.end), lead=60, settings=SETTINGS) is None
    unknown = MinuteSeries(T0, np.full(3 * DAY_MINUTES, np.nan))
    assert forecast("m", unknown, at(unknown.end), lead=60, settings=SETTINGS) is None
    # Old enough, but nobody recorded the minutes its pattern would come from.
    gap = np.full(3 * DAY_MINUTES, np.nan)
    gap[0] = 5.0
    assert forecast("m", MinuteSeries(T0, gap), at(T0 + 3 * DAY_MINUTES), 60, SETTINGS) is None


def test_a_spike_raises_the_level_within_bounds() -> None:
    s = series_of(daily, 8)
    now = T0 + 8 * DAY_MINUTES - 8 * 60
    counts = s.window(T0, now)
    counts[-30:] *= 2.0  # the last half hour: twice the pattern
    f = forecast("m", MinuteSeries(T0, counts), at(now), lead=60, settings=SETTINGS)
    assert f is not None and f.level == pytest.approx(2.0, rel=0.02)
    counts[-30:] *= 10.0
    capped = forecast("m", MinuteSeries(T0, counts), at(now), lead=60, settings=SETTINGS)
    assert capped is not None and capped.level == SETTINGS.level_bounds[1]


def test_predict_never_reads_the_future() -> None:
    s = series_of(weekly, 16, noise=0.05)
    issues = np.arange(T0 + 15 * DAY_MINUTES, T0 + 15 * DAY_MINUTES + 300)
    targets = issues + 3
    clean = predict(s, issues, targets, SETTINGS)
    cut = int(issues.min()) - T0
    tampered = s.counts.copy()
    tampered[cut:] = 1e9  # everything from the first issue minute on
    for k in (0, 150, 299):  # each forecast against a series that ends at its own issue minute
        alone = MinuteSeries(T0, s.counts[: int(issues[k]) - T0])
        p = predict(alone, issues[k : k + 1], targets[k : k + 1], SETTINGS)
        assert p.value[0] == pytest.approx(clean.value[k])
    first = predict(MinuteSeries(T0, tampered), issues[:1], targets[:1], SETTINGS)
    assert first.value[0] == pytest.approx(clean.value[0])
    with pytest.raises(ValueError):
        predict(s, issues, issues - 1, SETTINGS)


def test_error_of_yesterdays_forecasts() -> None:
    exact = series_of(weekly, 16)
    yesterday = np.arange(T0 + 15 * DAY_MINUTES, T0 + 16 * DAY_MINUTES)
    perfect = backtest(exact, yesterday, 120, SETTINGS)
    assert perfect is not None and perfect.mape < 0.01 and perfect.minutes > 1000
    noisy = series_of(weekly, 16, noise=0.1, seed=3)
    err = backtest(noisy, yesterday, 120, SETTINGS)
    assert err is not None and 0.05 < err.mape < 0.2 and abs(err.bias) < 0.05
    assert set(err.as_dict()) == {"mape", "bias", "minutes"}
    # Quiet minutes (under error_min_calls) are not judged; a model with too few busy minutes has no error.
    quiet = series_of(lambda m: daily(m, peak=30.0), 16)
    assert backtest(quiet, yesterday, 120, SETTINGS) is None


def test_lookback_covers_the_oldest_sample() -> None:
    assert lookback(SETTINGS) > 2 * WEEK_MINUTES + SETTINGS.level_window
    assert lookback(ModelSettings(weeks=0, days=1, min_history=10)) == DAY_MINUTES + 2 + 30 + 1
    with pytest.raises(ValueError):
        ModelSettings(weeks=0, days=0)


# -- lead -------------------------------------------------------------------------------------------


def test_lead_is_a_measured_high_percentile_plus_extra() -> None:
    samples = [20.0 + i for i in range(10)]  # 20..29
    assert percentile(samples, 0.9) == 28.0 and percentile(samples, 1.0) == 29.0 and percentile([5.0], 0.9) == 5.0
    measured = lead_time(samples, share=0.9, extra=30)
    assert (measured.seconds, measured.source, measured.measured, measured.samples) == (58.0, "measured", 28.0, 10)
    assert lead_time(samples, configured=300).as_dict()["source"] == "configured"
    assert lead_time(samples, configured=300).seconds == 300
    assert lead_time([], default=120, extra=30).seconds == 150 and lead_time([]).source == "default"


async def test_local_lead_samples_are_capped_and_sane() -> None:
    local = LocalLeadSamples(cap=3)
    for v in (1.0, float("nan"), -5.0, 1e9, 2.0, 3.0, 4.0):
        await local.record(v)
    assert await local.samples() == [2.0, 3.0, 4.0]


# -- capacity ---------------------------------------------------------------------------------------


def test_capacity_from_the_latency_model() -> None:
    latency = LatencyModel()
    assert from_latency(latency, "m") is None
    for batch, seconds in ((1, 0.010), (8, 0.020), (32, 0.080)):
        latency.observe("m", batch, seconds)
    assert from_latency(latency, "m") == pytest.approx(400.0)  # batch 8: 8 / 0.02 (32 / 0.08 is the same)
    assert from_latency(latency, "m", instances=2) == pytest.approx(800.0)
    assert from_latency(latency, "m", miss_share=0.5) == pytest.approx(800.0)  # half the calls are hits
    assert from_latency(latency, "m", miss_share=0.0) == pytest.approx(400.0 / MIN_MISS_SHARE)


def test_capacity_sources_and_peak() -> None:
    peak = PeakRate(window=3600, bucket=60)
    peak.observe("m", 100.0, 0.0)
    peak.observe("m", 250.0, 30.0)
    peak.observe("m", 120.0, 70.0)
    assert peak.peak("m", 100.0) == 250.0
    assert peak.peak("m", 3700.0) == 120.0  # the first minute left the window
    assert peak.peak("other", 0.0) is None
    peak.forget({"x"})
    assert peak.peak("m", 100.0) is None
    configured = parse_overrides(("m=2449", "a=b=10"))
    assert configured == {"m": 2449.0, "a=b": 10.0}
    assert capacity("m", configured=configured, estimate=10, peak=20) == Capacity(2449.0, "configured")
    assert capacity("x", configured={}, estimate=300, peak=200) == Capacity(300, "latency")
    assert capacity("x", configured={}, estimate=100, peak=200) == Capacity(200, "peak")  # served more than estimated
    assert capacity("x", configured={}, estimate=None, peak=None) is None


# -- CSV --------------------------------------------------------------------------------------------


def test_csv_round_trip() -> None:
    rows = [(T0 + i, model, i * 3) for model in ("minilm", "a,b \"quoted\"") for i in range(5)]
    out = io.StringIO()
    assert write_rows(out, rows) == 10
    text = out.getvalue()
    assert text.startswith("timestamp,model,requests\n2024-10-14T00:00:00Z,minilm,0\n")
    parsed = read_rows(io.StringIO(text), now_minute=T0 + 10)
    assert sorted((m, model, c) for model, m, c in parsed) == sorted(rows)


def test_csv_timestamps() -> None:
    assert parse_minute("2024-10-14T00:01:00Z") == T0 + 1
    assert parse_minute("2024-10-14T02:01:00+02:00") == T0 + 1
    assert parse_minute(str((T0 + 1) * 60)) == T0 + 1
    assert parse_minute(f"{(T0 + 1) * 60}.000") == T0 + 1
    assert format_minute(T0 + 1) == "2024-10-14T00:01:00Z"
    for bad, why in (("2024-10-14T00:01:00", "no time zone"), ("2024-10-14T00:01:30Z", "whole minute"),
                     (str((T0 * 60) + 30), "whole minute"), ("1700000000000", "neither|between 2000 and 3000"),
                     ("170000000040", "between 2000 and 3000"),
                     ("yesterday", "neither ISO")):
        with pytest.raises(ValueError, match=why):
            parse_minute(bad)


def test_csv_errors_name_their_lines() -> None:
    now = T0 + 100
    good = f"{format_minute(T0)},m,1"
    text = "\n".join([
        "\ufefftimestamp,model,requests",  # a spreadsheet's byte order mark is fine
        good,
        f"{format_minute(T0 + 1)},m",  # 3: two fields
        f"{format_minute(T0 + 2)},m,-1",  # 4: negative
        f"{format_minute(T0 + 3)},m,99999999999",  # 5: too large
        f"{format_minute(T0 + 200)},m,1",  # 6: the future
        "",  # 7: empty
        f"{format_minute(T0 + 4)}, m ,1",  # 8: spaces around the name
        f"{format_minute(T0 + 5)},{'x' * 5000},1",  # 9: longer than a line may be
        good,  # 10: repeats line 2
    ])
    with pytest.raises(CsvError) as caught:
        read_rows(io.StringIO(text), now_minute=now)
    lines = [p.split(":")[0] for p in caught.value.problems]
    assert lines == [f"line {n}" for n in (3, 4, 5, 6, 7, 8, 9, 10)], caught.value.problems
    assert "repeats line 2" in caught.value.problems[-1]
    with pytest.raises(CsvError, match="line 1: header"):
        read_rows(io.StringIO("time,model,count\n"), now_minute=now)
    with pytest.raises(CsvError, match="empty file"):
        read_rows(io.StringIO(""), now_minute=now)
    many = "timestamp,model,requests\n" + "\n".join(f"nope,m,{i}" for i in range(50))
    with pytest.raises(CsvError, match="stopped after 20"):
        read_rows(io.StringIO(many), now_minute=now)
    rows = "timestamp,model,requests\r\n" + "".join(f"{format_minute(T0 + i)},m,{i}\r\n" for i in range(5))
    with pytest.raises(CsvError, match="more than 3 rows"):
        read_rows(io.StringIO(rows), now_minute=now, max_rows=3)
    assert len(read_rows(io.StringIO(rows), now_minute=now)) == 5  # CRLF is fine


# -- the pending buffer -----------------------------------------------------------------------------


def test_pending_is_bounded_and_covers_flush_minutes() -> None:
    p = Pending(max_models=2, max_entries=3)
    p.add("a", 10, 1)
    p.add("b", 10, 1)
    p.add("c", 10, 5)  # a third model: over the cap
    assert p.dropped == 5
    p.add("a", 11, 1)
    p.add("a", 12, 1)
    p.add("a", 13, 2)  # the buffer is full: the oldest minute goes
    assert len(p) == 3 and p.dropped == 5 + 2
    p.flushing(20)
    p.flushing(21)
    p.flushing(30)  # a gap of 9 minutes: a stalled process, only its own minute is claimed
    assert {20, 21, 30} <= p.covered and 25 not in p.covered
    tools = Pending(recording=False)
    tools.flushing(20)
    assert not tools.covered


def test_counter_feed_adds_what_each_model_gained() -> None:
    from sidecar.forecast.feed import CounterFeed, by_model

    added: list[tuple[str, int, int]] = []

    class Recording:
        def add(self, model: str, minute: int, count: int) -> None:
            added.append((model, minute, count))

    values: dict[tuple[str, ...], float] = {("infer", "m", "200"): 5.0, ("infer", "other", "200"): 9.0,
                                            ("health", "", "200"): 3.0}
    clock = Clock(T0)
    feed = CounterFeed(Recording(), lambda: by_model(values), clock=clock)  # type: ignore[arg-type]
    feed.tick()
    assert added == []  # calls before the feed started belong to no minute it knows
    values[("infer", "m", "200")] += 4
    values[("infer", "m", "503")] = 2.0
    values[("infer", "n", "200")] = 1.0
    clock.minutes(1)
    feed.tick()
    assert added == [("m", T0 + 1, 6), ("n", T0 + 1, 1)]
    values[("infer", "m", "200")] = 0.0  # a reset: nothing negative, counting restarts from there
    feed.tick()
    values[("infer", "m", "200")] = 3.0
    feed.tick()
    assert added[-1] == ("m", T0 + 1, 3)


# -- the histories ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis-forecast")) as server:
        yield server


class Counting:
    """A redis.asyncio client whose round trips (pipelines and single commands) are counted."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return await execute(*args, **kwargs)

        pipe.execute = counted
        return pipe

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.round_trips += 1
        return await self.client.execute_command(*args, **kwargs)

    async def lrange(self, *args: Any) -> Any:
        self.round_trips += 1
        return await self.client.lrange(*args)


Opener = Callable[..., History]


@pytest.fixture(params=["sqlite", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens histories sharing one backing (a file, a Redis namespace), as replicas of a fleet do."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    clients: list[Any] = []
    opened: list[History] = []

    def open_(clock: Clock, **limits: Any) -> History:
        lim = HistoryLimits(**{"namespace": namespace, **limits})
        if request.param == "sqlite":
            history: History = SQLiteHistory(tmp_path / "history.db", lim, clock=clock)
        else:
            client = aioredis.Redis.from_url(request.getfixturevalue("redis_server").url)
            clients.append(client)
            history = RedisHistory(client, lim, clock=clock, refresh=0.0)
        opened.append(history)
        return history

    yield open_
    for history in opened:
        await history.close()
    for client in clients:
        await client.aclose()


async def test_history_round_trip_with_coverage(opener: Opener) -> None:
    clock = Clock(T0 + 5)
    h = opener(clock)
    h.add("m", T0 + 1, 3)
    h.add("m", T0 + 1, 4)
    h.add("m", T0 + 3, 1)
    h.cover(T0 + 2)  # recorded, quiet
    await h.flush()
    s = await h.series("m", T0, T0 + 10)
    assert s.start == T0 and s.counts.size == 10
    assert s.counts[1] == 7 and s.counts[2] == 0 and s.counts[3] == 1
    assert np.isnan(s.counts[0])  # nobody recorded minute 0
    assert s.counts[5] == 0  # the flush itself recorded the minute it ran in
    assert await h.models() == ["m"]
    assert (await h.series("unknown", T0, T0 + 4)).counts.tolist()[1:4] == [0, 0, 0]


async def test_history_replicas_add_up_and_replace_is_idempotent(opener: Opener) -> None:
    clock = Clock(T0 + 100)
    a, b = opener(clock), opener(clock)
    a.add("m", T0 + 50, 10)
    b.add("m", T0 + 50, 5)
    b.add("n", T0 + 99, 1)
    await a.flush()
    await b.flush()
    assert (await a.series("m", T0 + 50, T0 + 51)).counts[0] == 15
    for _ in range(2):  # an import run twice
        a.replace("m", T0 + 50, 7)
        await a.flush()
    assert (await b.series("m", T0 + 50, T0 + 51)).counts[0] == 7
    assert await b.models() == ["n", "m"]  # the most recently seen first


async def test_history_retention_and_model_cap(opener: Opener) -> None:
    clock = Clock(T0)
    h = opener(clock, retention=2 * 86400.0, max_models=3)
    h.add("old", T0, 1)
    await h.flush()
    clock.minutes(3 * DAY_MINUTES)
    h.add("a", T0 + 3 * DAY_MINUTES, 1)
    h.add("b", T0 + 3 * DAY_MINUTES, 1)
    h.add("c", T0 + 3 * DAY_MINUTES, 1)  # a third model for this replica: over the cap, dropped
    h.add("a", T0 - DAY_MINUTES, 1)  # older than the retention: not written
    await h.flush()
    assert h.dropped == 1
    assert sorted(await h.models()) == ["a", "b"]  # "old" left with its retention
    assert np.isnan((await h.series("old", T0, T0 + 1)).counts[0])


async def test_sqlite_history_survives_reopening_and_refuses_a_bad_path(tmp_path: Path) -> None:
    clock = Clock(T0 + 1)
    h = SQLiteHistory(tmp_path / "h.db", HistoryLimits(), clock=clock)
    h.add("m", T0, 2)
    await h.close()  # close flushes
    again = SQLiteHistory(tmp_path / "h.db", HistoryLimits(), clock=clock)
    assert (await again.series("m", T0, T0 + 1)).counts[0] == 2
    await again.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot open"):
        SQLiteHistory(tmp_path / "file" / "h.db", HistoryLimits())


async def test_sqlite_history_run_flushes_each_interval(tmp_path: Path) -> None:
    clock = Clock(T0)
    h = SQLiteHistory(tmp_path / "h.db", HistoryLimits(), clock=clock)
    ticks = 0

    async def tick(interval: float) -> None:
        nonlocal ticks
        ticks += 1
        if ticks > 3:
            raise asyncio.CancelledError
        h.add("m", int(clock.now // 60), 1)
        clock.now += interval

    with pytest.raises(asyncio.CancelledError):
        await h.run(60.0, sleep=tick)
    s = await h.series("m", T0, T0 + 4)
    assert s.counts.tolist() == [1, 1, 1, 0]  # each minute flushed by the next tick; the last, recorded, quiet
    await h.close()


async def test_redis_history_keys_are_hash_tagged_and_expire(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    ns = f"t{uuid.uuid4().hex[:8]}"
    h = RedisHistory(client, HistoryLimits(namespace=ns), clock=Clock(T0 + 1))
    h.add("a{b}", T0, 1)  # braces would move the Cluster hash tag: escaped
    await h.flush()
    key = day_key(ns, "a{b}", DAY0)
    assert key == f"{{{ns}:a%7Bb%7D}}:d:{DAY0}"
    names = {k.decode() for k in await client.keys(f"*{ns}*")}
    assert names == {key, f"{{{ns}}}:c:{DAY0}", f"{{{ns}}}:models"}
    ttl = await client.ttl(key)
    assert 14 * 86400 < ttl <= 16 * 86400
    assert await client.strlen(key) == 4  # minute 0 only: the vector grows to the last minute written
    await client.aclose()


async def test_redis_history_costs_one_round_trip_per_second_whatever_the_traffic(
        redis_server: RedisServer) -> None:
    """A minute of heavy traffic (100,000 calls of 50 models) and forecasts reading every model: the
    replica's flush loop makes one round trip per interval, reads included, and the sums are exact."""
    client = Counting(aioredis.Redis.from_url(redis_server.url))
    clock = Clock(T0 + 30)
    h = RedisHistory(client, HistoryLimits(namespace=f"t{uuid.uuid4().hex[:8]}"), clock=clock)
    seconds = 0
    span = (T0 + 29, T0 + 33)

    async def tick(interval: float) -> None:  # run()'s sleep: a simulated second passes, traffic arrives
        nonlocal seconds
        seconds += 1
        if seconds > 60:
            raise asyncio.CancelledError
        clock.now += interval
        for i in range(100_000 // 60):
            h.add(f"model-{i % 50}", int(clock.now // 60), 1)

    loop = asyncio.create_task(h.run(1.0, sleep=tick))
    await asyncio.sleep(0)  # the loop's first round trip is under way: reads now wait for its next ones
    reads = await asyncio.gather(*(h.series(f"model-{i}", *span) for i in range(50)))
    assert all(r.counts.size == 4 for r in reads)
    with pytest.raises(asyncio.CancelledError):
        await loop
    await h.flush()
    assert client.round_trips == h.round_trips <= seconds + 1  # one per simulated second, and the last
    reader = RedisHistory(client.client, h.limits, clock=clock)  # another replica: its mirror is empty
    total = 0.0
    for i in range(50):
        total += float(np.nansum((await reader.series(f"model-{i}", *span)).counts))
    assert total == (100_000 // 60) * 60  # every call counted once
    await client.client.aclose()


async def test_redis_history_down_drops_counts_and_never_raises(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r") as server:
        client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        h = RedisHistory(client, HistoryLimits(namespace="down"), clock=Clock(T0 + 1), timeout=1.0)
    h.add("m", T0, 5)  # the server has stopped
    await h.flush()
    assert h.dropped == 5
    s = await h.series("m", T0, T0 + 2)
    assert np.isnan(s.counts).all()
    assert await h.models() == []
    await client.aclose()


async def test_redis_reads_beyond_one_round_trips_budget_complete(redis_server: RedisServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.forecast import history_redis

    monkeypatch.setattr(history_redis, "READ_BYTES", 2 * DAY_MINUTES * 4)  # two day vectors a round trip
    client = Counting(aioredis.Redis.from_url(redis_server.url))
    clock = Clock(T0 + 6 * DAY_MINUTES)
    h = RedisHistory(client, HistoryLimits(namespace=f"t{uuid.uuid4().hex[:8]}"), clock=clock)
    for day in range(6):
        h.add("m", T0 + day * DAY_MINUTES, day + 1)
    await h.flush()
    s = await h.series("m", T0, T0 + 6 * DAY_MINUTES)
    assert [s.counts[d * DAY_MINUTES] for d in range(6)] == [1, 2, 3, 4, 5, 6]
    assert h.round_trips >= 1 + 3  # the write, then three trips of two days
    await client.client.aclose()


async def test_redis_lead_samples_are_fleet_wide(redis_server: RedisServer) -> None:
    client = Counting(aioredis.Redis.from_url(redis_server.url))
    clock = Clock(T0)
    ns = f"t{uuid.uuid4().hex[:8]}"
    pod_a = RedisLeadSamples(client, ns, cap=3, retention=3600, refresh=300, clock=clock)
    pod_b = RedisLeadSamples(client, ns, cap=3, retention=3600, refresh=300, clock=clock)
    for seconds in (20.0, 25.0, 30.0, 35.0):
        await pod_a.record(seconds)
    assert sorted(await pod_b.samples()) == [25.0, 30.0, 35.0]  # capped: the newest three
    trips = client.round_trips
    await pod_b.samples()
    assert client.round_trips == trips  # cached for `refresh`
    clock.minutes(120)  # past the retention: old measurements are not planned with
    assert await pod_b.samples() == []
    await client.client.aclose()
    with RedisServer(Path(redis_server.workdir) / "gone") as gone:
        down = aioredis.Redis.from_url(gone.url, socket_connect_timeout=0.2, socket_timeout=0.2)
    lonely = RedisLeadSamples(down, ns, clock=clock, timeout=0.5)
    await lonely.record(42.0)  # Redis is gone: kept locally, no exception
    assert await lonely.samples() == [42.0]
    await down.aclose()


# -- the forecaster, its signals, the commands ------------------------------------------------------


async def _history_with(tmp_path: Path, clock: Clock, days: int) -> SQLiteHistory:
    h = SQLiteHistory(tmp_path / "h.db", HistoryLimits(), clock=clock, recording=False)
    minutes = np.arange(T0, T0 + days * DAY_MINUTES)
    for minute, count in zip(minutes, weekly(minutes), strict=True):
        h.replace("old", int(minute), int(count))
    for minute in minutes[-60:]:
        h.replace("new", int(minute), 100)
    await h.flush()
    return h


async def test_forecaster_refreshes_and_exports(tmp_path: Path) -> None:
    clock = Clock(T0 + 15 * DAY_MINUTES)
    history = await _history_with(tmp_path, clock, 15)
    lead = LocalLeadSamples()
    await lead.record(25.0)
    cfg = ForecastConfig(extra_lead=35.0)
    f = Forecaster(history, lead, cfg, clock=clock)
    await f.refresh()
    assert f.lead.seconds == 60.0 and f.lead.source == "measured"
    assert set(f.forecasts) == {"old"} and "new" in f.results  # the new model: no forecast, not zero
    assert f.forecasts["old"].rate == pytest.approx(float(weekly(np.array([clock() // 60 + 1]))[0]) / 60, rel=0.05)
    assert f.errors["old"].mape < 0.05
    status = f.status()
    assert status["models"]["new"] == {"forecast": None, "error": None}  # type: ignore[index]
    collector = ForecastCollector(f, lambda: {"old": Capacity(50.0, "latency"), "caller-made": Capacity(1, "peak")},
                                  label=lambda m: m if m in ("old", "new") else "other")
    families = {m.name: m for m in collector.collect()}
    assert list(families) == list(NAMES)
    assert [s.labels for s in families["sidecar_forecast_requests_per_second"].samples] == [{"model": "old"}]
    assert families["sidecar_forecast_lead_seconds"].samples[0].value == 60.0
    assert [s.labels["model"] for s in families["sidecar_capacity_requests_per_second"].samples] == ["old"]
    assert [m.name for m in collector.describe()] == list(families)
    await history.close()


async def test_forecaster_over_a_driven_redis_history_shares_round_trips(redis_server: RedisServer) -> None:
    """Forty models' 16 days are read in a handful of round trips, not one (or one second) per model."""
    from sidecar.forecast.history import encode_coverage, encode_day
    from sidecar.forecast.history_redis import coverage_key, models_key

    client = aioredis.Redis.from_url(redis_server.url)
    ns = f"t{uuid.uuid4().hex[:8]}"
    days = 16
    clock = Clock(T0 + days * DAY_MINUTES)
    for day in range(days):  # written straight into Redis's layout: the test is about the reads
        minutes = np.arange(T0 + day * DAY_MINUTES, T0 + (day + 1) * DAY_MINUTES)
        vector = encode_day(weekly(minutes).astype(np.uint32))
        await client.set(coverage_key(ns, DAY0 + day), encode_coverage(np.ones(DAY_MINUTES, dtype=bool)))
        for m in range(40):
            await client.set(day_key(ns, f"m{m}", DAY0 + day), vector)
    await client.zadd(models_key(ns), {f"m{m}": T0 + days * DAY_MINUTES - 1 for m in range(40)})
    history = RedisHistory(client, HistoryLimits(namespace=ns), clock=clock)
    loop = asyncio.create_task(history.run(1.0, sleep=lambda _: asyncio.sleep(0)))
    f = Forecaster(history, LocalLeadSamples(), ForecastConfig(), clock=clock)
    await f.refresh()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert len(f.forecasts) == 40 and len(f.errors) == 40
    assert history.round_trips <= 12, history.round_trips
    await client.aclose()


def test_forecast_config_keys_and_settings() -> None:
    found = {k.path: k for k in keys(ForecastConfig(), "forecast.")}
    assert found["forecast.history"].default == 14 * 86400 and found["forecast.history"].help
    assert found["forecast.flush_interval"].check is not None and found["forecast.flush_interval"].check(0.5)
    assert found["forecast.capacity"].check is not None and found["forecast.capacity"].check(("m",))
    assert found["forecast.capacity"].check(("m=10", "n=0.5")) is None
    assert found["forecast.namespace"].check is not None and found["forecast.namespace"].check("a{b}")
    settings = settings_from(ForecastConfig(level_window=900, smoothing=60, min_history=3600))
    assert (settings.level_window, settings.smoothing, settings.min_history) == (15, 1, 60)
    assert commands.history_location(ForecastConfig(), "/data/traffic.db") == "/data/history.db"
    assert commands.history_location(ForecastConfig(), "redis://r:6379/0") == "redis://r:6379/0"
    assert commands.history_location(ForecastConfig(store="/x.db"), "redis://r") == "/x.db"


async def test_history_import_export_round_trip(tmp_path: Path) -> None:
    clock = Clock(T0 + 3 * DAY_MINUTES)
    source = await _history_with(tmp_path, clock, 2)
    exported = io.StringIO()
    written = await commands.export_csv(source, exported, clock=clock)
    assert written == 2 * 2 * DAY_MINUTES  # both models, every recorded minute (zeros included)
    await source.close()
    (tmp_path / "in.csv").write_text(exported.getvalue())
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    commands.add_parser(sub, lambda p: p.add_argument("--store"))
    cfg = ForecastConfig(store=str(tmp_path / "copy.db"))
    ns = parser.parse_args(["history", "import", str(tmp_path / "in.csv")])
    out = io.StringIO()
    assert await asyncio.to_thread(commands.run, ns, cfg, "", clock=clock, stdout=out) == 0
    assert out.getvalue().startswith(f"imported {written} rows of 2 models")
    assert await asyncio.to_thread(commands.run, ns, cfg, "", clock=clock, stdout=io.StringIO()) == 0  # again
    ns = parser.parse_args(["history", "export", "-o", str(tmp_path / "out.csv")])
    assert await asyncio.to_thread(commands.run, ns, cfg, "", clock=clock) == 0
    assert (tmp_path / "out.csv").read_text() == exported.getvalue()
    (tmp_path / "bad.csv").write_text("timestamp,model,requests\nx,m,1\n")
    ns = parser.parse_args(["history", "import", str(tmp_path / "bad.csv")])
    assert await asyncio.to_thread(commands.run, ns, cfg, "", clock=clock) == commands.EXIT_USAGE


# -- the autoscaling recipes ------------------------------------------------------------------------

RECIPES = [K8S / "autoscaling" / "triton-hpa-forecast.yaml",
           K8S / "autoscaling" / "tfserving-scaledobject-forecast.yaml",
           K8S / "monitoring" / "prometheus-adapter-rules.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_validate_strictly(path: Path) -> None:
    for obj in load_documents(path):
        for version in (OLDEST, NATIVE_OLDEST, NEWEST):
            validate(obj, version)


def test_recipes_scale_on_max_of_demand_and_forecast_and_in_on_demand() -> None:
    (hpa,) = load_documents(RECIPES[0])
    (scaled,) = load_documents(RECIPES[1])
    (rules_cm,) = load_documents(RECIPES[2])
    rules = [r for r in yaml.safe_load(rules_cm["data"]["config.yaml"])["rules"]
             if r["name"]["as"].startswith("warm_sidecar_")]
    served = {r["name"]["as"] for r in rules}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted == {"sidecar_queue_depth"} | served  # the queue's rule is k8s/monitoring's own
    assert served == {"warm_sidecar_demand_pods", "warm_sidecar_forecast_pods"}
    for rule in rules:  # every pod has a value (0: no opinion), so no missing series blocks scale-down
        assert "or sum by (<<.GroupBy>>) (0 * sidecar_warm_capacity" in " ".join(rule["metricsQuery"].split())
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == 600 and down["policies"] == [
        {"type": "Percent", "value": 20, "periodSeconds": 120}]
    shipped = load_documents(K8S / "overlays" / "triton" / "hpa.yaml")[0]
    assert (hpa["metadata"]["name"], hpa["spec"]["scaleTargetRef"]) == (shipped["metadata"]["name"],
                                                                       shipped["spec"]["scaleTargetRef"])
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"queue-depth", "demand", "forecast"}
    assert all(t["metricType"] == "AverageValue" for t in triggers.values())
    assert "or vector(0)" in triggers["forecast"]["metadata"]["query"]
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == down


def test_recipes_read_only_series_the_sidecar_exports() -> None:
    import re

    from sidecar.metrics import Metrics

    families = {line.split()[2] for line in Metrics().render().decode().splitlines() if line.startswith("# TYPE")}
    families |= set(NAMES)
    used: set[str] = set()
    for path in RECIPES:
        used |= set(re.findall(r"\b(sidecar_[a-z_]+)\b", path.read_text()))
    assert used and used <= families, sorted(used - families)
    assert {"sidecar_forecast_requests_per_second", "sidecar_capacity_requests_per_second"} <= used
