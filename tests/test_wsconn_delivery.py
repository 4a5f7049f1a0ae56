"""How frames get from trio-websocket's reader to the writer (`wsconn.WsConnection._read`):
every frame, in the order the server sent it, with seq 1, 2, ... per link, also the frames the
reader had queued before the link took them over; and a burst is taken where the reader makes
the messages, not with a task switch per frame (the channel hand-off cost a third of a bare
receive loop's CPU, issue #16). A hostile server (tests/hostile_ws.py) writes the exact bytes:
the 101 answer and the first frames in one write, so they arrive in one read.
"""

from __future__ import annotations

import trio
import trio.testing

from pipeline.eventlog import route_frame
from pipeline.wsconn import ConnSpec, WsConnection
from projections.core.keys import KEY_CONN_MARKET
from tests.hostile_ws import TEXT, HostileServer, Peer, frame
from tests.recorder import Recorder

BURST = 2000


def agg(i: int) -> bytes:
    return b'{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","a":%d}}' % i


class Steps(trio.abc.Instrument):
    """Counts task steps: every time any Trio task runs."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


class CountingRecorder(Recorder):
    """Notes the task steps taken when the frame with a given seq was handed over."""

    def __init__(self, steps: Steps) -> None:
        super().__init__()
        self.counter = steps
        self.steps_at: dict[int, int] = {}

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        self.steps_at[seq] = self.counter.steps
        return super().append_frame(key, frame, recv_ts, conn, seq)


async def test_every_frame_in_order_and_a_burst_without_a_switch_per_frame(
        autojump_clock: trio.testing.MockClock) -> None:
    async def script(peer: Peer) -> None:
        # the handshake's answer and five frames in one write: the reader queues them before
        # the link has taken over
        await peer.accept(then=b"".join(frame(TEXT, agg(i)) for i in range(1, 6)))
        await trio.sleep(1)
        await peer.stream.send_all(b"".join(frame(TEXT, agg(i)) for i in range(6, 6 + BURST)))
        await peer.hang()

    server = HostileServer(lambda n: script)
    steps = Steps()
    rec = CountingRecorder(steps)
    url_spec = "btcusdt@aggTrade"
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            base = await nursery.start(server.run)
            conn = WsConnection(ConnSpec("mkt-1", "market",
                                         lambda: f"{base}/market/stream?streams={url_spec}",
                                         route_frame, silence_timeout=None, streams=1),
                                rec, conn_key=KEY_CONN_MARKET, rand=lambda: 1.0)
            nursery.start_soon(conn.run)
            await rec.until(lambda: len(rec.frames()) >= 5 + BURST, within=30)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
    got = rec.frames()
    assert [f.frame for f in got] == [agg(i) for i in range(1, 6 + BURST)]
    assert [f.seq for f in got] == list(range(1, 6 + BURST))
    assert len({f.conn for f in got}) == 1
    # 2,000 frames of ~70 bytes (~150 KB) arrive in a few reads of up to 64 KB: the reader
    # hands them over as it parses them, a few task steps a read; a channel hand-off takes two
    # or more a frame (5,342 for this burst). The bound leaves room for reads of 1 KB.
    taken = rec.steps_at[5 + BURST] - rec.steps_at[6]
    assert taken < BURST // 4, taken
