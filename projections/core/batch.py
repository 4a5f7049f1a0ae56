"""Folding one batch of log entries: pure, imports neither trio nor redis.

`fold_batch` decides what a batch comes to: the writes (coalesced, newest per view), the
effects the shell acts on (a REST snapshot, a gap entry), the acknowledgements, and the entries
whose fold raised (not acknowledged; the shell retries and dead-letters them). The shell
(`projections.shell.loop`) reads the batch, calls this, and writes + acks what it returns.

Each write keeps the entry that produced it (`Folded.origins`): when the store refuses a write
as implausible (an id no stream can reach), that entry, and only it, is dead-lettered. After
coalescing, a write stands for the superseded entries of its stream too; those are not the
ones at fault and stay acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from pipeline.eventlog import decode_entry
from projections.core.outputs import (
    LogGap,
    NeedSnapshot,
    Output,
    Projection,
    Unrecognized,
    check_output,
    newest_per_view,
)

# (source key, entry id, fields); fields are empty for an entry trimmed while it was pending
RawEntry = tuple[str, bytes, dict[bytes, bytes]]

ERROR_TEXT_MAX = 500


@attrs.define
class Folded:
    """What one batch comes to: the writes, the effects, the acks and the failures."""

    writes: list[Output] = attrs.Factory(list)
    origins: list[RawEntry] = attrs.Factory(list)  # the entry that produced each write
    effects: list[NeedSnapshot | LogGap] = attrs.Factory(list)
    acks: dict[str, list[bytes]] = attrs.Factory(dict)
    failures: list[tuple[RawEntry, str]] = attrs.Factory(list)
    # entries acknowledged with their write, which the store refused as implausible: the
    # shell dead-letters them at once (a redelivery would meet the same refusal)
    refused: list[tuple[RawEntry, str]] = attrs.Factory(list)
    repaired: list[str] = attrs.Factory(list)  # views written over a held value not obeyed
    unrecognized: list[str] = attrs.Factory(list)  # event types this version does not know
    applied: int = 0
    newest_recv_ts: float = 0.0
    written_at: float = 0.0  # wall clock right after the write + ack pipeline returned


def fold_batch(projection: Projection, entries: Sequence[RawEntry],
               coalescing: bool = True) -> Folded:
    """Apply each entry; an entry that raises is a failure and is not acknowledged.

    With coalescing, a projection that has `last_value_key(frame)` (the stateless market
    folds) gets only the last frame of each key in the batch: the others would be coalesced
    away anyway, and parsing them was most of the fold's cost. Superseded entries count as
    applied and are acknowledged; they are not parsed (see `superseded`).

    Hot path (every entry of every batch): plain locals, no per-entry allocation beyond what
    the fold returns.
    """
    folded = Folded()
    outputs: list[Output] = []
    origins: list[RawEntry] = []
    acks = folded.acks
    apply = projection.apply
    keyer = getattr(projection, "last_value_key", None) if coalescing else None
    skip = superseded(entries, keyer) if keyer is not None else ()
    newest = 0.0
    for i, raw in enumerate(entries):
        key, eid, fields = raw
        if i in skip:
            folded.applied += 1
        elif fields:
            try:
                entry = decode_entry(eid, fields)
                outs = apply(entry)
                if type(outs) is not list:
                    outs = list(outs)
                for out in outs:
                    check_output(out)
            except Exception as exc:  # any failure of a fold is the entry's, not the process's
                folded.failures.append((raw, f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]))
                continue
            outputs += outs
            origins += [raw] * len(outs)
            folded.applied += 1
            if entry.recv_ts > newest:
                newest = entry.recv_ts
        ids = acks.get(key)
        if ids is None:
            acks[key] = [eid]
        else:
            ids.append(eid)
    folded.newest_recv_ts = newest
    for i in newest_per_view(outputs) if coalescing else range(len(outputs)):
        out = outputs[i]
        if type(out) is NeedSnapshot or type(out) is LogGap:
            folded.effects.append(out)
        elif type(out) is Unrecognized:
            folded.unrecognized.append(out.event_type)
        else:
            folded.writes.append(out)
            folded.origins.append(origins[i])
    return folded


def superseded(entries: Sequence[RawEntry],
               keyer: Callable[[bytes], bytes | None]) -> set[int]:
    """Indexes of the frame entries that a later entry with the same `keyer(frame)` (the
    stream name, which also decides the source key) supersedes. `keyer` returns None for a
    frame that must always be folded (not a well-formed wrapper, a closed candle, a list
    payload)."""
    last: dict[bytes, int] = {}
    skip: set[int] = set()
    for i, (_key, _eid, fields) in enumerate(entries):
        frame = fields.get(b"frame")
        if frame is None:
            continue
        name = keyer(frame)
        if name is None:
            continue
        held = last.get(name)
        if held is not None:
            skip.add(held)
        last[name] = i
    return skip
