"""What a projection is, and the writes it asks for. Pure: imports neither trio nor redis.

A projection folds one log entry at a time: `apply(entry) -> list[Output]`. It never touches
Redis. The shell (`projections.shell.loop`) coalesces the outputs of a batch, hands them to
`projections.shell.viewstore`, which performs each as one atomic, forward-only Redis operation, and
acknowledges the batch afterwards. Every write carries a version; the store keeps whichever is
newer, so redelivery, a second consumer, or a replay never moves a view backwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.orderwrites import AlgoOrderWrite, OrderWrite

Entry = FrameEntry | ControlEntry


class PoisonEntry(Exception):
    """The entry cannot be parsed or applied. The runner retries it a bounded number of times,
    then moves it to the projection's dead-letter stream."""


@attrs.frozen
class ViewWrite:
    """SET `key` to the JSON `value` if `version` > the number in the stored JSON's
    `version_field` (or the key is missing), with PEXPIREAT `expire_at_ms` (0: no expiry).
    Nothing is written when `expire_at_ms` is already past: replaying old frames brings back
    no stale key.

    `event_s`: the event time of the value (seconds; every view stores it as `timestamp`), 0
    when it has none. `ids`: the version is an id (a book's `u`, a trade id), not a time. The
    store uses both to refuse an id no stream can reach and to overwrite a held view whose
    version is implausible (`projections.core.plausible`)."""

    key: str
    value: bytes
    version: float
    version_field: str
    expire_at_ms: int = 0
    event_s: float = 0.0
    ids: bool = False


@attrs.frozen
class ListPushIfNewer:
    """LPUSH the JSON `value` onto the capped list `key` (LTRIM to `cap`) if `version` > the
    number in the head element's `version_field`. Used for closed klines. `event_s` as for
    ViewWrite."""

    key: str
    value: bytes
    version: float
    version_field: str
    cap: int
    event_s: float = 0.0


@attrs.frozen
class ListMerge:
    """Merge the JSON `values` (any order) into the capped list `key`, kept newest first by
    the number in each element's `version_field`: an element whose version the list already
    holds is not added again, the rest go where their version puts them, the list is cut to
    the `cap` newest. For kline history from REST: rows older than the list's head must land
    in order, without a duplicate of a candle the stream already pushed. `event_s`: the event
    time of the newest value (seconds)."""

    key: str
    values: tuple[bytes, ...]
    version_field: str
    cap: int
    event_s: float = 0.0


@attrs.frozen
class StreamAppend:
    """XADD `fields` to the stream `key` exactly once, with entry id `{at_ms}-{seq}`.

    `event_key` names the event (a duplicate frame, a redelivery or a replay gives the same
    key): the store appends nothing when an entry with that key is already there, or when
    `at_ms` is older than `max_age_ms` by the server's clock (the stream is trimmed to that
    age, `MINID`). Entry ids follow event times; an event older than the stream's last entry is
    appended after it (ids only grow) and still found as a duplicate later. The store adds the
    field `event_key` itself."""

    key: str
    at_ms: int  # event time in ms: the entry id's time part
    event_key: str
    fields: tuple[tuple[str, bytes], ...]
    max_age_ms: int


@attrs.frozen
class NeedSnapshot:
    """A sequencer needs a REST snapshot for `symbol` (diff depth). The shell fetches it and
    appends it to the log as a `snapshot` control entry; the projection applies it from there,
    so a replay sees exactly what the live projector saw."""

    symbol: str
    reason: str


@attrs.frozen
class LogGap:
    """A break the projection detected (e.g. a `pu` that is not the previous `u`); the shell
    appends a `gap` control entry to `raw_key`."""

    raw_key: str
    body: dict[str, object]


@attrs.frozen
class Unrecognized:
    """An event this version does not know (a new user-data type or order status): ignored,
    counted by the shell (`pipeline_unknown_events_total`) and logged once per type."""

    event_type: str


Output = (ViewWrite | ListPushIfNewer | ListMerge | StreamAppend | NeedSnapshot | LogGap
          | Unrecognized | OrderWrite | AlgoOrderWrite)
# What the shell writes (`projections.shell.viewstore` has a performer for each), what it acts
# on itself, and what it only counts. Any other output is a programming error: the entry that
# produced it fails (and is dead-lettered) instead of the batch.
WRITE_TYPES: frozenset[type] = frozenset((ViewWrite, ListPushIfNewer, ListMerge, StreamAppend,
                                          OrderWrite, AlgoOrderWrite))
EFFECT_TYPES: frozenset[type] = frozenset((NeedSnapshot, LogGap))
OUTPUT_TYPES = WRITE_TYPES | EFFECT_TYPES | {Unrecognized}


def check_output(out: object) -> None:
    """Raise TypeError, while the entry that produced `out` is known, for an unknown type."""
    if type(out) not in OUTPUT_TYPES:
        raise TypeError(f"no performer for output type {type(out).__name__}")


class Projection(Protocol):
    name: str  # consumer group name and dead-letter stream `dlq:{name}`
    sources: Sequence[str]  # raw: keys it reads
    # True when the fold keeps state in memory (diff-depth book, orders): only one process runs
    # it at a time, holding a lease; the others wait as standbys.
    exclusive: bool

    def apply(self, entry: Entry) -> Iterable[Output]: ...


def coalesce(outputs: Iterable[Output]) -> list[Output]:
    """Keep only the newest ViewWrite per key (in first-seen key order); others pass through.

    Within a batch the newest event of a view wins anyway; writing only it saves Redis work.
    """
    outs = list(outputs)
    return [outs[i] for i in newest_per_view(outs)]


def newest_per_view(outputs: Sequence[Output]) -> list[int]:
    """`coalesce` as indexes into `outputs`, so a caller can keep what goes with each output:
    the newest ViewWrite per key (in first-seen key order), then every other output."""
    newest: dict[str, tuple[int, ViewWrite]] = {}
    rest: list[int] = []
    order: list[str] = []
    for i, out in enumerate(outputs):
        if isinstance(out, ViewWrite):
            held = newest.get(out.key)
            if held is None:
                order.append(out.key)
                newest[out.key] = (i, out)
            elif out.version > held[1].version:
                newest[out.key] = (i, out)
        else:
            rest.append(i)
    return [newest[k][0] for k in order] + rest
