"""A connection that cannot make progress ends within seconds, says why, and reconnects.

Each test runs one `WsConnection` with the production `Timing` against a hostile websocket
server (tests/hostile_ws.py) that writes exactly the bytes under test over a real loopback
socket, on Trio's MockClock with autojump; the connection logs to an in-memory sink. What a
user checks: a `closed` entry with the reason in the connection stream, the TCP connection
really closed, a new connection after the backoff, `pipeline_reconnects_total{reason}` counted,
`pipeline_connections` back to one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from pipeline import metrics
from pipeline.config import load_settings
from pipeline.eventlog import route_frame
from pipeline.ingest_market import market_connections
from pipeline.localredis import free_port
from pipeline.wsconn import ConnSpec, WsConnection
from projections.core.keys import KEY_CONN_MARKET
from tests.hostile_ws import HostileServer, Peer, Script, silent_forever
from tests.recorder import Recorder


def agg(i: int) -> bytes:
    return b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","a":%d}}' % i


def mark(i: int) -> bytes:
    return b'{"stream":"btcusdt@markPrice@1s","data":{"e":"markPriceUpdate","E":%d}}' % i


def spec(base: str, silence_timeout: float | None = None) -> ConnSpec:
    stream = "btcusdt@markPrice@1s" if silence_timeout else "btcusdt@aggTrade"
    url = f"{base}/market/stream?streams={stream}"
    return ConnSpec("mkt-1", "market", lambda: url, route_frame,
                    silence_timeout=silence_timeout, streams=1)


@asynccontextmanager
async def hostile(server: HostileServer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.run)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(spec_: ConnSpec, sink: Recorder) -> AsyncIterator[WsConnection]:
    """Production timing; jitter at its top (`rand` 1.0): backoff 0.5 s, 1 s, 2 s, ..."""
    conn = WsConnection(spec_, sink, conn_key=KEY_CONN_MARKET, rand=lambda: 1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        yield conn
        nursery.cancel_scope.cancel()


async def delivers(peer: Peer) -> None:
    """A well-behaved server: a frame a second."""
    await peer.accept()
    for i in range(1, 10_000):
        await peer.text(agg(i))
        await trio.sleep(1)


def reconnects(reason: str) -> float:
    return float(metrics.RECONNECTS.labels(reason)._value.get())


def open_market_links() -> float:
    return float(metrics.CONNECTIONS.labels("market")._value.get())


async def test_a_text_frame_that_is_not_utf8_ends_the_link_at_once_and_it_reconnects(
        autojump_clock: trio.testing.MockClock) -> None:
    async def not_utf8(peer: Peer) -> None:
        await peer.accept()
        await peer.text(agg(1))
        await peer.text(b'{"stream":"btcusdt@aggTrade","data":"\xff\xfe"}')
        await peer.hang()  # the TCP connection stays open: only the client can end it

    server = HostileServer(lambda n: not_utf8 if n == 1 else delivers)
    rec = Recorder()
    counted, links = reconnects("protocol_error"), open_market_links()
    async with hostile(server) as url, connected(spec(url), rec):
        await rec.until(lambda: len(rec.frames()) >= 3, within=60)
        assert open_market_links() == links + 1  # the first one is gone
    first, second = rec.controls("opened")
    closed = rec.controls("closed")[0]
    assert (closed.conn, closed.body["reason"]) == (first.conn, "protocol_error: 1007")
    good = rec.frames()[0]
    assert good.conn == first.conn and closed.at - good.at < 0.01  # at once, no waiting
    assert server.peers[0].client_closed_at == pytest.approx(closed.at, abs=0.01)
    assert second.at - closed.at == pytest.approx(0.5)  # it had delivered: the first step
    assert {f.conn for f in rec.frames()[1:]} == {second.conn}  # every later frame is logged
    assert reconnects("protocol_error") == counted + 1


async def test_a_close_the_server_never_completes_ends_the_link_and_it_reconnects(
        autojump_clock: trio.testing.MockClock) -> None:
    async def close_and_stay(peer: Peer) -> None:
        await peer.accept()
        await peer.text(agg(1))
        await peer.close_frame(1001)
        await peer.hang()  # never closes the TCP connection, as a server must

    server = HostileServer(lambda n: close_and_stay if n == 1 else delivers)
    rec = Recorder()
    async with hostile(server) as url, connected(spec(url), rec):
        await rec.until(lambda: len(rec.controls("opened")) == 2 and len(rec.frames()) >= 2,
                        within=60)
    first, second = rec.controls("opened")
    closed = rec.controls("closed")[0]
    assert (closed.conn, closed.body["reason"]) == (first.conn, "server_closed: 1001")
    assert closed.body["frames"] == 1
    peer = server.peers[0]
    assert peer.client_sent_close  # the closing handshake was answered
    assert peer.client_closed_at == pytest.approx(closed.at, abs=0.01)  # then the TCP cut
    assert second.at - closed.at == pytest.approx(0.5)


async def test_a_server_that_ignores_our_close_is_cut_after_3_s_and_the_reason_is_kept(
        autojump_clock: trio.testing.MockClock) -> None:
    async def one_frame_then_nothing(peer: Peer) -> None:
        await peer.accept()
        await peer.text(mark(1))
        await peer.hang()  # stuck: neither frames nor an answer to the client's Close

    server = HostileServer(lambda n: one_frame_then_nothing)
    rec = Recorder()
    async with hostile(server) as url, connected(spec(url, silence_timeout=30.0), rec):
        await rec.until(lambda: len(rec.controls("opened")) == 2, within=60)
    silent, = rec.controls("silent")
    closed = rec.controls("closed")[0]
    assert closed.conn == silent.conn and closed.body["reason"] == "silent"
    assert closed.at - silent.at == pytest.approx(3.0, abs=0.01)  # disconnect timeout
    peer = server.peers[0]
    assert peer.client_sent_close and peer.client_closed_at == pytest.approx(closed.at, abs=0.01)


async def refuse_with_429(peer: Peer) -> None:
    await peer.reject(429)


@pytest.mark.parametrize(("script", "reason", "tries_for"), [
    (None, "connect_failed: ConnectionRefusedError", 0.0),  # nothing listens
    (refuse_with_429, "connect_failed: rejected 429", 0.0),
    (silent_forever, "connect_failed: timeout", 10.0),  # TCP accepted, no handshake answer
])
async def test_a_failed_connect_is_recorded_in_the_connection_stream(
        autojump_clock: trio.testing.MockClock, script: Script | None, reason: str,
        tries_for: float) -> None:
    rec = Recorder()
    counted = reconnects("connect_failed")
    server = HostileServer(lambda n: script) if script else None
    async with hostile(server or HostileServer(lambda n: delivers)) as url:
        base = url if server else f"ws://127.0.0.1:{free_port()}"
        async with connected(spec(base), rec):
            await rec.until(lambda: len(rec.controls("closed")) >= 3, within=120)
    assert rec.controls("opened") == []
    closes = rec.controls("closed")[:3]
    for entry in closes:
        assert entry.key == KEY_CONN_MARKET and entry.conn.startswith("mkt-1-")
        assert entry.body == {"reason": reason, "frames": 0, "name": "mkt-1", "path": "market",
                              "url": f"{base}/market/stream?streams=btcusdt@aggTrade"}
    assert len({e.conn for e in closes}) == 3
    # one entry per attempt, and attempts are paced by the backoff: 0.5 s, then 1 s
    gaps = [b.at - a.at for a, b in itertools.pairwise(closes)]
    assert gaps == pytest.approx([0.5 + tries_for, 1.0 + tries_for], abs=0.01)
    assert reconnects("connect_failed") >= counted + 3


async def test_a_storm_of_accept_and_close_stays_under_binances_connection_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    async def accept_and_close(peer: Peer) -> None:
        await peer.accept()  # and the server closes the TCP connection at once

    symbols = tuple(f"S{i:02d}USDT" for i in range(12))
    server = HostileServer(lambda n: accept_and_close)
    rec = Recorder()
    async with hostile(server) as url, trio.open_nursery() as nursery:
        settings = load_settings(env={"BINANCE_WS_URL": url, "PIPELINE_SYMBOLS": ",".join(symbols),
                                      "PIPELINE_MARKET_STREAMS": "aggTrade"})
        conns = market_connections(settings, symbols, rec, max_per_connection=1)
        assert len(conns) == 12
        for conn in conns:
            nursery.start_soon(conn.run)
        await trio.sleep(900)
        nursery.cancel_scope.cancel()
    attempts = sorted(p.accepted_at for p in server.peers)
    # Binance: 300 attempts per IP in any 5 minutes; one process takes at most 70 of them
    for i, start in enumerate(attempts):
        assert sum(1 for t in attempts[i:] if t < start + 300) <= 70
    assert sum(1 for t in attempts if t < 0.01) == 10  # the burst: every connection at start
    assert len(attempts) >= 170  # and then one every 5 s: the connections keep trying


async def test_a_connection_that_should_deliver_is_unhealthy_after_its_silence_time_until_it_does(
        autojump_clock: trio.testing.MockClock) -> None:
    flowing = [True]

    async def frames_while_flowing(peer: Peer) -> None:
        await peer.accept()
        for i in range(1, 10_000):
            if flowing[0]:
                await peer.text(mark(i))
            await trio.sleep(1)

    server = HostileServer(lambda n: frames_while_flowing)
    rec = Recorder()
    async with hostile(server) as url, connected(spec(url, silence_timeout=30.0), rec) as conn:
        await trio.sleep(10)
        assert conn.healthy
        flowing[0] = False  # the server keeps the connections and stops sending
        await trio.sleep(0.5)
        last = rec.frames()[-1].at
        await trio.sleep_until(last + 29)
        assert conn.healthy  # a pause shorter than the silence timeout is not a page
        await trio.sleep_until(last + 31.5)
        assert not conn.healthy
        for _ in range(10):  # replaced by connections that stay silent: still unhealthy
            await trio.sleep(10)
            assert not conn.healthy
        assert len(rec.controls("silent")) >= 3
        flowing[0] = True
        resumed = trio.current_time()
        await rec.until(lambda: rec.frames()[-1].at > resumed, within=40)
        await trio.sleep(1.5)
        assert conn.healthy


async def test_a_connection_without_a_silence_rule_is_unhealthy_while_no_link_stays_up(
        autojump_clock: trio.testing.MockClock) -> None:
    stable = [False]

    async def accept_then_maybe_close(peer: Peer) -> None:
        await peer.accept()
        if stable[0]:
            await peer.hang(pong=True)  # up and quiet, as a user stream with nothing to say

    server = HostileServer(lambda n: accept_then_maybe_close)
    rec = Recorder()
    async with hostile(server) as url, connected(spec(url), rec) as conn:
        await trio.sleep(29)
        assert conn.healthy  # `Timing.down_after`: 30 s
        await trio.sleep(2)
        assert not conn.healthy
        await trio.sleep(60)
        assert not conn.healthy and len(rec.controls("opened")) >= 7
        stable[0] = True
        n = len(rec.controls("opened"))
        await rec.until(lambda: len(rec.controls("opened")) > n, within=40)
        await trio.sleep(2.5)
        assert conn.healthy
        await trio.sleep(3600)
        assert conn.healthy  # quiet for an hour, but up


async def test_a_quiet_link_whose_server_no_longer_answers_pings_is_replaced(
        autojump_clock: trio.testing.MockClock) -> None:
    async def gone_without_a_word(peer: Peer) -> None:
        await peer.accept()
        await peer.hang()  # reads, answers nothing: as a TCP connection whose peer vanished

    async def quiet_but_alive(peer: Peer) -> None:
        await peer.accept()
        await peer.hang(pong=True)

    server = HostileServer(lambda n: gone_without_a_word if n == 1 else quiet_but_alive)
    rec = Recorder()
    async with hostile(server) as url, connected(spec(url), rec):  # no silence rule
        await rec.until(lambda: len(rec.controls("opened")) == 2, within=200)
        await trio.sleep(600)  # pinged every minute, and answering
    first, second = rec.controls("opened")
    closed, = rec.controls("closed")[:1]
    assert (closed.conn, closed.body["reason"]) == (first.conn, "ping_timeout")
    assert closed.at - first.at == pytest.approx(60 + 10, abs=3.5)  # and the disconnect wait
    assert server.peers[0].client_closed_at == pytest.approx(closed.at, abs=0.01)
    assert rec.reasons()[second.conn] == "shutdown"  # the second stayed up to the end
    pings = [p for op, p in server.peers[1].client_frames() if op == 0x9]
    assert len(pings) >= 9


async def test_a_link_retired_by_rotation_is_not_pinged_after_its_close(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    async def quiet_and_deaf_to_close(peer: Peer) -> None:
        await peer.accept()
        await peer.hang(pong=True)  # answers Pings, never the client's Close

    server = HostileServer(lambda n: quiet_and_deaf_to_close)
    rec = Recorder()
    url = "/private/ws?listenKey=k"
    async with hostile(server) as base:
        # a quiet user stream: handed over at connect, retired 5 s before its next Ping
        quiet = ConnSpec("usr", "private", lambda: base + url, route_frame, rotate_after=3595,
                         handover_on_connect=True)
        async with connected(quiet, rec):
            await rec.until(lambda: len(rec.controls("closed")) >= 1, within=4000)
    first, second = rec.controls("opened")
    closed = rec.controls("closed")[0]
    assert (closed.conn, closed.body["reason"]) == (first.conn, "rotated")
    # read for the whole overlap (10 s), then our unanswered Close waited out (3 s)
    assert closed.at - second.at == pytest.approx(13.0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    old_peer = server.peers[0]
    frames = old_peer.client_frames()
    close_at = next(i for i, (op, _) in enumerate(frames) if op == 0x8)
    assert all(op != 0x9 for op, _ in frames[close_at:])  # no Ping after the Close
