"""The Redis shell around the pure core (see `projections.shell.loop` for the path of a batch).

`project` (the `pipeline project` command), `loop` (one projection's consumer loop), `groups`
(its consumer group's Redis calls), `viewstore` + `orderstore` + `lua/` (atomic, forward-only
writes), `lease` (one holder for an exclusive projection), `registry` (which projections
exist), `replay`, `snapshots` (REST depth snapshots into the log), `health`.
"""
