"""Settings: every bad setting stops a command with one line naming it and exit code 2."""

from __future__ import annotations

import socket

import pytest

from pipeline.config import Secret, load_settings, redact_url
from pipeline.errors import SettingsError
from pipeline.localredis import free_port
from pipeline.streams import Path, parse_stream_kind, plan_connections
from tests.conftest import run_cli


def test_defaults_match_the_spec() -> None:
    s = load_settings(env={})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.ws_url == "wss://fstream.binance.com"
    assert s.rest_url == "https://fapi.binance.com"
    assert s.symbols == ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    assert [k.spec for k in s.market_streams] == ["markPrice@1s", "depth20@100ms", "aggTrade",
                                                  "kline_1m"]
    assert s.view_prefix == "websocket"


def test_flag_wins_over_environment() -> None:
    s = load_settings({"PIPELINE_SYMBOLS": "ethusdt"}, env={"PIPELINE_SYMBOLS": "BTCUSDT"})
    assert s.symbols == ("ETHUSDT",)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PIPELINE_MARKET_STREAMS", "markPrice@1s,depth7@100ms"),
        ("PIPELINE_MARKET_STREAMS", "kline_7m"),
        ("PIPELINE_MARKET_STREAMS", "depth20@250ms"),  # 250 ms is written without a suffix
        ("PIPELINE_SYMBOLS", "BTC-USDT"),
        ("REDIS_URL", "http://localhost:6379"),
        ("BINANCE_WS_URL", "https://fstream.binance.com"),
        ("PIPELINE_SILENCE_TIMEOUT", "soon"),
        ("PIPELINE_RETENTION", "depth20=lots"),
    ],
)
def test_bad_setting_names_itself(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={name: value})
    assert str(err.value).startswith(name)


def test_redis_url_may_be_tls_with_user_and_password_or_a_unix_socket() -> None:
    for url in ("rediss://app:pw@redis.example:6380/1", "unix:///run/redis/redis.sock"):
        assert load_settings(env={"REDIS_URL": url}).redis_url == url


def test_all_symbols_is_resolved_later() -> None:
    assert load_settings(env={"PIPELINE_SYMBOLS": "ALL"}).symbols is None


def test_streams_are_routed_to_their_path() -> None:
    assert parse_stream_kind("depth20@100ms").path is Path.PUBLIC
    assert parse_stream_kind("depth@100ms").path is Path.PUBLIC
    assert parse_stream_kind("bookTicker").path is Path.PUBLIC
    for spec in ("markPrice@1s", "aggTrade", "kline_1m", "forceOrder", "!markPrice@arr@1s"):
        assert parse_stream_kind(spec).path is Path.MARKET


def test_depth_speeds_are_binances_own() -> None:
    for spec in ("depth", "depth@100ms", "depth@500ms", "depth5", "depth10@100ms",
                 "depth20@500ms"):
        assert parse_stream_kind(spec).spec == spec
    for spec in ("depth@250ms", "depth20@250ms", "depth20@1000ms", "depth20@"):
        with pytest.raises(SettingsError):
            parse_stream_kind(spec)


def test_more_than_1024_streams_are_spread_over_connections() -> None:
    symbols = [f"S{i:04d}USDT" for i in range(700)]
    kinds = [parse_stream_kind(s) for s in ("markPrice@1s", "aggTrade", "depth20@100ms")]
    conns = plan_connections(symbols, kinds)
    assert all(len(subs) <= 1024 for _, subs in conns)
    assert sum(len(subs) for _, subs in conns) == 2100
    for path, subs in conns:
        assert {s.kind.path for s in subs} == {path}
    market = [subs for path, subs in conns if path is Path.MARKET]
    # both market kinds of one symbol are on the same connection
    for subs in market:
        names = {s.name.split("@")[0] for s in subs}
        assert len(subs) == 2 * len(names)


def test_secrets_are_masked_in_repr_and_urls() -> None:
    s = load_settings(env={"BINANCE_API_KEY": "AKEYVALUE123456", "BINANCE_API_SECRET": "SSSSSSSS99",
                           "REDIS_URL": "redis://app:hunter22@redis:6379/0"})
    text = repr(s)
    assert "AKEYVALUE123456" not in text and "SSSSSSSS99" not in text
    assert "hunter22" not in redact_url(s.redis_url)
    assert "abc" not in redact_url("wss://x/private/ws?listenKey=abcdef&events=A")
    assert str(Secret("topsecretvalue")) == "Secret('***')"


def test_cli_unknown_stream_kind_exits_2_with_one_line() -> None:
    res = run_cli("ingest", "market", env={"PIPELINE_MARKET_STREAMS": "markPrice@1s,bogus"})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "PIPELINE_MARKET_STREAMS" in lines[0] and "bogus" in lines[0]


def test_cli_undocumented_depth_speed_exits_2_with_one_line_giving_the_speeds() -> None:
    # a Redis URL nothing listens on: were the setting taken, the command could go no further
    res = run_cli("ingest", "market", env={"PIPELINE_MARKET_STREAMS": "depth20@250ms",
                                           "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert res.returncode == 2
    line, = res.stderr.strip().splitlines()
    assert "PIPELINE_MARKET_STREAMS" in line and "depth20@250ms" in line
    assert "@100ms" in line and "@500ms" in line


def test_cli_unreachable_redis_exits_2_naming_redis_url() -> None:
    res = run_cli("ingest", "market", "--redis-url", "redis://:pw123secret@127.0.0.1:1/0")
    assert res.returncode == 2
    assert "REDIS_URL" in res.stderr and "pw123secret" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("ingest", "market"), ("project",)])
def test_a_metrics_port_in_use_stops_the_command_before_it_connects(command: tuple[str, ...]
                                                                     ) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # nothing listens on the Redis URL: only a check made before connecting names the port
        res = run_cli(*command, env={"PIPELINE_METRICS_PORT": str(port),
                                     "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert res.returncode == 2
    line, = res.stderr.strip().splitlines()
    assert "PIPELINE_METRICS_PORT" in line and str(port) in line
