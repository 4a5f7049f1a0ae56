"""`pipeline demo`: the whole system on one machine, no account, no internet.

It starts, as child processes of its own:
- a redis-server on a free port in a temporary folder (unless REDIS_URL is given, by flag or
  environment: then that Redis is used and left as it is);
- the simulator (`pipeline simulate --script-account`), whose ready line gives the websocket
  and REST URLs, with a scripted account that places, fills, cancels and triggers orders;
- `pipeline ingest market`, `pipeline ingest user` (with the simulator's API key) and
  `pipeline project`, all pointed at the simulator and the Redis.

With `--metrics-port N` (or PIPELINE_METRICS_PORT=N) the ingestors and the projector serve
/metrics and /healthz on N, N+1 and N+2, and the demo prints the three URLs; by default none
does, so two demos (or a demo next to a deployment) never fight over a port.

Then it shows a live view (mark prices, top of book, open orders, recent order events,
position events with their cause, account events, leverage, the 1m candles held, group lag,
frames per second) until Ctrl-C or SIGTERM, or for `--seconds N` and prints a plain summary.
The scripted account places, fills and stops out orders by itself; every 10 s the demo also
asks the simulator for what it does not do by itself (a leverage change, a margin call), so
account events show too.

Either way it stops every child: each runs in a process group of its own, gets
SIGTERM, and SIGKILL if it is still there after a grace period; on Linux a child also gets
SIGTERM from the kernel if the demo itself dies (PR_SET_PDEATHSIG), so none is left behind.
Child logs go to files in the temporary folder; the tail of a child that died is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import attrs
import httpx
import redis
from rich.console import Console
from rich.live import Live

from pipeline.cli import COMMON_FLAGS
from pipeline.config import Settings, redact_url
from pipeline.demoview import Snapshot, read_snapshot, render_live, summary_lines
from pipeline.errors import PipelineError, SettingsError
from pipeline.localredis import LocalRedis
from pipeline.redisconn import connect_checked, redis_errors

SIM_API_KEY = "sim-api-key"  # the simulator's defaults (pipeline.simulator.SimConfig)
SIM_API_SECRET = "sim-api-secret"
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


# the children that serve /metrics with `--metrics-port N`: on N, N+1, N+2 in this order
METRICS_CHILDREN = ("ingest-market", "ingest-user", "project")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=None,
                        help="run this long, print a summary and exit (default: until Ctrl-C)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temporary folder with the child logs")
    parser.epilog = ("--metrics-port N: ingest-market, ingest-user and project serve "
                     "Prometheus /metrics (and /healthz) on N, N+1 and N+2; the demo prints "
                     "the URLs. Default 0: no metrics server.")


def metrics_ports(base: int) -> dict[str, int]:
    """The /metrics port of each child that serves one: none for `base` 0, else consecutive
    ports from `base`, each checked free now so that a taken one stops the demo before it
    starts anything (a child would otherwise die on it mid-demo)."""
    if base <= 0:
        return {}
    ports = {name: base + i for i, name in enumerate(METRICS_CHILDREN)}
    if max(ports.values()) > 65535:
        raise SettingsError("--metrics-port", f"{base}: the demo needs {base} to "
                                              f"{max(ports.values())}, past 65535")
    for name, port in ports.items():
        with socket.socket() as probe:
            # as pipeline.metrics.serve binds: reuse allowed, so only a listener makes it taken
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                raise SettingsError("--metrics-port", f"port {port} (for {name}) is not free: "
                                                      f"{exc.strerror}") from None
    return ports


class DemoFailed(PipelineError):
    """A part of the demo could not start (the message says which, and why)."""


class _StoppedEarly(Exception):
    """Ctrl-C or SIGTERM before everything had started: stop quietly."""


@attrs.define
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stopping: bool = False
    died_early: bool = False

    @property
    def state(self) -> str:
        code = self.proc.poll()
        return "running" if code is None else f"exited {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo's process dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """The demo's child processes: started in their own process groups, stopped together."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], *, extra_env: dict[str, str] | None = None,
              stdout: int | None = None) -> Child:
        log = self.folder / f"{name}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *argv], env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else err,
                stderr=err, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def died(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None and not c.stopping]

    def stop_all(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group, wait up to `grace` s in total, then SIGKILL."""
        for c in reversed(self.children):
            c.died_early = c.proc.poll() is not None and not c.stopping
            c.stopping = True
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(c.proc, signal.SIGKILL)
                c.proc.wait(5)
        for c in self.children:  # anything the child itself started in its group
            _signal_group(c.proc, signal.SIGKILL)

    def describe(self) -> str:
        return "  ".join(f"{c.name} {c.state}" for c in self.children)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_ready_line(child: Child, stop: threading.Event) -> tuple[str, str]:
    """Read the simulator's `simulator ready ws=... rest=...` line; keep draining after."""
    assert child.proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        assert child.proc.stdout is not None
        with open(child.log, "ab") as log:
            for raw in child.proc.stdout:
                lines.put(raw.decode(errors="replace"))
                log.write(raw)
                log.flush()

    threading.Thread(target=drain, name="sim-stdout", daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if child.proc.poll() is not None:
                break
            continue
        if line.startswith("simulator ready "):
            fields = dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)
            return fields["ws"], fields["rest"]
    if stop.is_set():
        raise _StoppedEarly
    raise DemoFailed(f"the simulator did not get ready: {_tail(child.log)}")


@contextlib.contextmanager
def _redis(explicit: str | None, folder: Path) -> Iterator[tuple[str, LocalRedis | None]]:
    if explicit:
        yield explicit, None
        return
    server = LocalRedis(folder / "redis").start()
    assert server.proc is not None
    Console(stderr=True).print(f"demo: started redis-server pid {server.proc.pid}")
    try:
        yield server.url, server
    finally:
        server.stop()


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """SIGINT, SIGTERM and SIGHUP (the terminal closed) set the event instead of interrupting
    whatever runs, so the children are always stopped in order."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def child_env(settings: Settings, args: argparse.Namespace, redis_url: str, ws: str,
              rest: str) -> dict[str, str]:
    """The environment of every child: this one's, the flags given to the demo, the URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINANCE_")}
    env.update({name: str(getattr(args, name)) for name in COMMON_FLAGS.values()
                if getattr(args, name, None) is not None})
    env.update({"REDIS_URL": redis_url, "PIPELINE_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    if ws and rest:  # the simulator's own URLs, once it told them
        env.update({"BINANCE_WS_URL": ws, "BINANCE_REST_URL": rest})
    return env


def main(settings: Settings, args: argparse.Namespace) -> int:
    explicit = args.REDIS_URL or os.environ.get("REDIS_URL")
    symbols = settings.symbols or DEFAULT_SYMBOLS
    ports = metrics_ports(settings.metrics_port)
    folder = Path(tempfile.mkdtemp(prefix="pipeline-demo-"))
    console = Console(stderr=True, soft_wrap=True)  # a URL is never cut in two lines
    try:
        with _stop_signals() as stop, _redis(explicit and settings.redis_url, folder) as (
                redis_url, server):
            children = Children(folder, child_env(settings, args, redis_url, "", ""))
            try:
                snap = _run(settings, args, children, redis_url, symbols, ports, stop, console)
            except DemoFailed as exc:
                console.print(f"pipeline demo: {exc}")
                return 1
            except _StoppedEarly:
                return 0
            finally:
                children.stop_all()
            return _report(snap, children, server, console)
    finally:
        if args.keep_logs:
            console.print(f"logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _run(settings: Settings, args: argparse.Namespace, children: Children, redis_url: str,
         symbols: Sequence[str], ports: dict[str, int], stop: threading.Event,
         console: Console) -> Snapshot:
    client = connect_checked(redis_url, name="pipeline-demo")
    sim = children.start("simulator", ["simulate", "--ws-port", "0", "--rest-port", "0",
                                       "--script-account", "--symbols", ",".join(symbols)],
                         stdout=subprocess.PIPE)
    ws, rest = _wait_ready_line(sim, stop)
    children.env = child_env(settings, args, redis_url, ws, rest)
    console.print(f"demo: redis {redact_url(redis_url)}, simulator ws={ws} rest={rest}")
    def metrics_env(name: str) -> dict[str, str]:
        return {"PIPELINE_METRICS_PORT": str(ports.get(name, 0))}

    children.start("ingest-market", ["ingest", "market"], extra_env=metrics_env("ingest-market"))
    children.start("ingest-user", ["ingest", "user"],
                   extra_env={"BINANCE_API_KEY": SIM_API_KEY, "BINANCE_API_SECRET": SIM_API_SECRET,
                              **metrics_env("ingest-user")})
    children.start("project", ["project"], extra_env=metrics_env("project"))
    for c in children.children:
        console.print(f"demo: started {c.name} pid {c.proc.pid}")
    for name, port in ports.items():
        console.print(f"demo: metrics of {name} at http://127.0.0.1:{port}/metrics")
    try:
        return _watch(client, settings.view_prefix, symbols, children, args.seconds, stop,
                      console, lambda n: _nudge_account(rest, symbols, n))
    finally:
        client.close()


def _nudge_account(rest: str, symbols: Sequence[str], n: int) -> None:
    """The `n`-th of the account events the scripted account does not make itself: a
    leverage change, then a margin call on its open positions (none open: the simulator says
    so, and nothing happens)."""
    name, body = (("leverage", {"symbol": symbols[0], "leverage": 5 + 5 * (n // 2 % 4)})
                  if n % 2 == 0 else ("margin_call", {}))
    try:
        httpx.post(f"{rest}/sim/account/{name}", json=body, timeout=2.0)
    except httpx.HTTPError:
        pass  # the simulator is going: the demo ends anyway


def _watch(client: redis.Redis, prefix: str, symbols: Sequence[str], children: Children,
           seconds: float | None, stop: threading.Event, console: Console,
           nudge: Callable[[int], None] = lambda n: None) -> Snapshot:
    """Refresh the view twice a second until stopped or `seconds` have passed; every 10 s
    (from 4 s on, the user stream up by then) `nudge` the account."""
    end = None if seconds is None else time.monotonic() + seconds
    rate = _Rate()
    with redis_errors():
        snap = read_snapshot(client, prefix, symbols)
    live = Live(render_live(snap, 0.0, children.describe()), console=console,
                refresh_per_second=4) if console.is_terminal else None
    reported: set[str] = set()
    ticks = 0
    with live or contextlib.nullcontext():
        while not stop.is_set() and (end is None or time.monotonic() < end):
            stop.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic())))
            with redis_errors():
                snap = read_snapshot(client, prefix, symbols)
            fps = rate.update(snap.frames_total)
            ticks += 1
            if ticks % 20 == 8:
                nudge(ticks // 20)
            for c in children.died():
                if c.name not in reported:
                    reported.add(c.name)
                    console.print(f"demo: {c.name} {c.state}; its log ends:\n{_tail(c.log)}")
            if live is not None:
                live.update(render_live(snap, fps, children.describe()))
            elif seconds is None and ticks % 10 == 0:
                console.print(f"demo: frames {snap.frames_total} ({fps:,.0f}/s), order events "
                              f"{snap.order_events}, {children.describe()}")
    return snap


class _Rate:
    """Frames per second between two readings of the total."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.total: int | None = None

    def update(self, total: int) -> float:
        now = time.monotonic()
        fps = 0.0 if self.total is None else (total - self.total) / max(1e-3, now - self.at)
        self.at, self.total = now, total
        return fps


def _report(snap: Snapshot, children: Children, server: LocalRedis | None,
            console: Console) -> int:
    """Print the summary; 1 when a child ended by itself (its log's tail is shown), else 0."""
    print("pipeline demo summary")
    for line in summary_lines(snap):
        print(line)
    states = [f"{c.name} pid {c.proc.pid} {_ended(c)}" for c in children.children]
    if server is not None:
        states.append(f"redis-server port {server.port} stopped")
    print("processes: " + ", ".join(states))
    died = [c for c in children.children if _ended(c) == "died"]
    for c in died:
        console.print(f"demo: {c.name} died with exit code {c.proc.returncode}; its log ends:\n"
                      f"{_tail(c.log)}")
    return 1 if died else 0


def _ended(c: Child) -> str:
    """`stopped` when the demo stopped it, `died` when it ended before."""
    return "died" if c.died_early else "stopped"
