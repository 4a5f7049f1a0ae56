"""Settings: every bad setting stops a command with one line naming it and exit code 2."""

from __future__ import annotations

import socket
from pathlib import Path as FsPath

import pytest

from pipeline.config import Secret, load_settings, redact_url
from pipeline.errors import SettingsError
from pipeline.localredis import free_port
from pipeline.streams import Path, parse_stream_kind, plan_connections
from tests.conftest import ROOT, run_cli


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


# --- numbers, URLs, secrets, retention, prefix: refused at start, one line, exit 2 ----------

NUMERIC = ("PIPELINE_SILENCE_TIMEOUT", "PIPELINE_ROTATE_AFTER", "PIPELINE_BUFFER_FRAMES",
           "PIPELINE_METRICS_PORT")


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "-1", "1e12", "soon", ""])
def test_every_numeric_setting_must_be_a_finite_number_in_its_range(name: str,
                                                                    value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={name: value})
    assert str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize(("name", "value"), [
    ("PIPELINE_BUFFER_FRAMES", "1.5"), ("PIPELINE_METRICS_PORT", "9100.5"),
    ("PIPELINE_ROTATE_AFTER", "86400"),  # the server's own 24 h close would come first
])
def test_counts_are_whole_and_rotation_comes_before_the_servers_close(name: str,
                                                                      value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}: "):
        load_settings(env={name: value})


def test_numbers_in_range_are_taken() -> None:
    s = load_settings(env={"PIPELINE_SILENCE_TIMEOUT": "2.5", "PIPELINE_ROTATE_AFTER": "3600",
                           "PIPELINE_BUFFER_FRAMES": "2e5", "PIPELINE_METRICS_PORT": "9100"})
    assert (s.silence_timeout, s.rotate_after, s.buffer_frames, s.metrics_port) == (
        2.5, 3600.0, 200_000, 9100)


@pytest.mark.parametrize(("name", "value"), [
    ("REDIS_URL", "http://[::1"),
    ("REDIS_URL", "redis://[::1"),
    ("REDIS_URL", "redis://localhost:99999/0"),
    ("REDIS_URL", "redis://localhost:port/0"),
    ("REDIS_URL", "redis://localhost/zero"),
    ("REDIS_URL", "redis://local host/0"),
    ("REDIS_URL", "redis://:pässword@localhost/0"),
    ("BINANCE_WS_URL", "ws://[::1"),
    ("BINANCE_WS_URL", "wss://fstream.binance.com?x=1"),
    ("BINANCE_WS_URL", "wss://fstream.binance.com\n"),
    ("BINANCE_WS_URL", "wss:///no-host"),
    ("BINANCE_REST_URL", "http://[::1"),
    ("BINANCE_REST_URL", "https://fapi.binance.com/#top"),
    ("BINANCE_REST_URL", "https://fapi.binance.com:0"),
    ("BINANCE_REST_URL", "https://fäpi.binance.com"),
])
def test_urls_are_parsed_strictly(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={name: value})
    assert str(err.value).startswith(f"{name}: ")
    assert "pässword" not in str(err.value)


def test_well_formed_urls_are_taken() -> None:
    s = load_settings(env={"REDIS_URL": "rediss://app:pw@[::1]:6380/2?ssl_cert_reqs=none",
                           "BINANCE_WS_URL": "ws://127.0.0.1:8765/",
                           "BINANCE_REST_URL": "https://proxy.example/binance"})
    assert s.redis_url == "rediss://app:pw@[::1]:6380/2?ssl_cert_reqs=none"
    assert (s.ws_url, s.rest_url) == ("ws://127.0.0.1:8765", "https://proxy.example/binance")


@pytest.mark.parametrize(("name", "value"), [
    ("BINANCE_API_KEY", "ключ-api"), ("BINANCE_API_KEY", "key with space"),
    ("BINANCE_API_KEY", "key\x00nul"), ("BINANCE_API_SECRET", "sécret"),
    ("BINANCE_API_SECRET", "tab\tsecret"),
])
def test_api_key_and_secret_must_be_printable_ascii(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env={name: value})
    assert str(err.value).startswith(f"{name}: ") and value not in str(err.value)


def test_a_pem_secret_keeps_its_line_breaks(tmp_path: FsPath) -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----"
    (tmp_path / "secret").write_text(pem + "\n")
    s = load_settings(env={"BINANCE_API_KEY": "AKEY123",
                           "BINANCE_API_SECRET_FILE": str(tmp_path / "secret")})
    assert s.api_secret is not None and s.api_secret.value == pem
    (tmp_path / "key").write_text("ключ\n")
    with pytest.raises(SettingsError, match=r"^BINANCE_API_KEY_FILE: "):
        load_settings(env={"BINANCE_API_KEY_FILE": str(tmp_path / "key")})


@pytest.mark.parametrize("item", ["depth20=0", "depth20=-5", "aggTrade=age:0",
                                  "aggTrade=age:-60", "aggTrade=age:nan", "aggTrade=age:inf",
                                  "aggTrade=age:1e309", "user=1e309", "conn=10000000000000"])
def test_retention_counts_and_ages_must_be_above_zero_and_finite(item: str) -> None:
    with pytest.raises(SettingsError, match=r"^PIPELINE_RETENTION: "):
        load_settings(env={"PIPELINE_RETENTION": item})


@pytest.mark.parametrize("prefix", ["web*socket", "web?socket", "web[s]ocket", "web:socket",
                                    "web socket", "websöcket", "web/socket", "web\\socket"])
def test_the_view_prefix_takes_only_what_the_acl_renderer_allows(prefix: str) -> None:
    with pytest.raises(SettingsError, match=r"^PIPELINE_VIEW_PREFIX: "):
        load_settings(env={"PIPELINE_VIEW_PREFIX": prefix})
    assert load_settings(env={"PIPELINE_VIEW_PREFIX": "Web.socket-2_a"}).view_prefix == \
        "Web.socket-2_a"


def test_the_acl_renderer_and_the_settings_agree_on_the_view_prefix() -> None:
    script = (ROOT / "deploy" / "redis" / "render-acl.sh").read_text()
    assert "[A-Za-z0-9_.-]" in script


@pytest.mark.parametrize(("url", "hidden"), [
    ("redis://localhost:6379/0?password=hunter22", "hunter22"),
    ("redis://u@localhost/0?Password=hunter22&ssl=true", "hunter22"),
    ("https://x.example/path?token=abc123xyz&a=1", "abc123xyz"),
    ("wss://x/private/ws?listenKey=abcdef123&events=A", "abcdef123"),
    ("redis://user:hunter22@[::1", "hunter22"),  # does not even parse
    ("redis://:hunter22@host:port?password=p4ss", "p4ss"),
])
def test_redact_url_masks_passwords_and_tokens_wherever_they_are(url: str, hidden: str) -> None:
    redacted = redact_url(url)
    assert hidden not in redacted and "***" in redacted


def test_redact_url_keeps_what_is_not_secret() -> None:
    assert redact_url("redis://app:pw@h:6379/0?ssl_cert_reqs=none&password=x") == \
        "redis://app:***@h:6379/0?ssl_cert_reqs=none&password=***"


@pytest.mark.parametrize(("argv", "env", "setting"), [
    (("ingest", "market"), {"PIPELINE_SILENCE_TIMEOUT": "nan"}, "PIPELINE_SILENCE_TIMEOUT"),
    (("ingest", "market"), {"PIPELINE_BUFFER_FRAMES": "1e309"}, "PIPELINE_BUFFER_FRAMES"),
    (("ingest", "market"), {"PIPELINE_METRICS_PORT": "70000"}, "PIPELINE_METRICS_PORT"),
    (("ingest", "market"), {"REDIS_URL": "http://[::1"}, "REDIS_URL"),
    (("ingest", "market"), {"BINANCE_WS_URL": "ws://[::1"}, "BINANCE_WS_URL"),
    (("ingest", "market"), {"PIPELINE_RETENTION": "depth20=0"}, "PIPELINE_RETENTION"),
    (("ingest", "market"), {"PIPELINE_VIEW_PREFIX": "w*"}, "PIPELINE_VIEW_PREFIX"),
    (("ingest", "user"), {"BINANCE_API_KEY": "ключ", "BINANCE_API_SECRET": "s"},
     "BINANCE_API_KEY"),
    (("ingest", "user", "--reconcile-every", "inf"), {}, "--reconcile-every"),
    (("project", "--batch", "nan"), {}, "--batch"),
    (("project", "--block-ms", "999999"), {}, "--block-ms"),
    (("project", "--lease-ttl-ms", "0"), {}, "--lease-ttl-ms"),
    (("status", "--max-lag", "-1"), {}, "--max-lag"),
    (("status", "--sample", "1e309"), {}, "--sample"),
    (("demo", "--seconds", "1e309"), {}, "--seconds"),
])
def test_a_bad_setting_or_flag_is_one_line_naming_it_and_exit_2(
        argv: tuple[str, ...], env: dict[str, str], setting: str) -> None:
    # nothing listens on the Redis URL: a setting taken would fail later, naming REDIS_URL
    res = run_cli(*argv, env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", **env})
    assert res.returncode == 2, res.stderr
    line, = res.stderr.strip().splitlines()
    assert setting in line and "Traceback" not in res.stderr
