"""`pipeline demo`: from a clean state it shows views and order events, and it leaves no
process behind, whether it ends by itself (`--seconds`) or by Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis

from pipeline.localredis import LocalRedis, free_port
from tests.conftest import ROOT, run_cli


def clean_env(tmp_path: Path) -> dict[str, str]:
    # TMPDIR: the demo's temporary folder lands where the test can see it is removed
    return {"TMPDIR": str(tmp_path), "PIPELINE_SILENCE_TIMEOUT": "30"}


def pids_of(stderr: str) -> list[int]:
    return [int(p) for p in re.findall(r"^demo: started [\w-]+ pid (\d+)$", stderr, re.M)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def summary(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_demo_from_a_clean_state_shows_prices_books_and_order_events_then_stops_all(
    tmp_path: Path,
) -> None:
    done = run_cli("demo", "--seconds", "8", env=clean_env(tmp_path), timeout=90)
    assert done.returncode == 0, done.stderr
    facts = summary(done.stdout)
    assert re.fullmatch(r"(\w+ [\d.]+, ){2}\w+ [\d.]+", facts["mark prices"]), facts
    assert "BTCUSDT bid" in facts["order books"] and "ask" in facts["order books"]
    assert int(facts["order events seen"].split()[0]) > 0
    # issue #13: the account's views, the candles from the first seconds on
    assert int(facts["position events seen"].split()[0]) > 0
    assert int(facts["account events seen"].split()[0]) > 0
    assert re.fullmatch(r"BTCUSDT \d+, ETHUSDT \d+, SOLUSDT \d+", facts["leverage"]), facts
    assert [int(n) for n in re.findall(r"\w+ (\d+)", facts["1m candles held"])] == [500] * 3
    assert "mark_price 3" in facts["views found"] and "orderbook 3" in facts["views found"]
    frames = int(facts["frames logged"].split()[0])
    assert frames > 100

    pids = pids_of(done.stderr)
    assert len(pids) == 5  # redis-server, simulator, two ingestors, projector
    assert not [p for p in pids if alive(p)]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_demo_and_every_child_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
    env.update(clean_env(tmp_path))
    out_file = tmp_path / "stdout.txt"
    with open(out_file, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "demo"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        for line in proc.stderr or ():
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("started project pid" in x for x in seen):
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(lines.get(timeout=30))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()
    while not lines.empty():
        seen.append(lines.get())
    assert proc.returncode == 0, "".join(seen)
    assert "pipeline demo summary" in out_file.read_text()
    pids = pids_of("".join(seen))
    assert len(pids) == 5
    assert not [p for p in pids if alive(p)]


def test_demo_uses_the_redis_it_is_given_and_leaves_it_running(
    tmp_path: Path, redis_server: LocalRedis, r: redis.Redis,
) -> None:
    done = run_cli("demo", "--seconds", "3", env={**clean_env(tmp_path),
                                                  "REDIS_URL": redis_server.url}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "redis-server" not in done.stderr
    assert r.ping() and r.xlen("raw:market:markPrice") > 0


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(50):
        base = free_port()
        if base + count <= 65536 and all(_bindable(base + i) for i in range(count)):
            return base
    raise AssertionError("no run of free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scrape(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.headers.get("Content-Type", ""), resp.read().decode()


def sample(text: str, series: str) -> float:
    """The value of one sample line (`name{labels} value`) of the Prometheus text."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_demo_with_a_metrics_port_serves_each_childs_metrics_where_it_says(
    tmp_path: Path,
) -> None:
    base = free_port_run(3)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIPELINE_", "BINANCE_", "REDIS_URL"))}
    env.update(clean_env(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "demo", "--seconds", "40",
                             "--metrics-port", str(base)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr or ()],
                     daemon=True).start()
    urls: dict[str, str] = {}
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while len(urls) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            seen.append(lines.get(timeout=30))
            if m := re.match(r"^demo: metrics of ([\w-]+) at (http://\S+/metrics)$", seen[-1]):
                urls[m[1]] = m[2]
        assert urls == {name: f"http://127.0.0.1:{base + i}/metrics" for i, name in
                        enumerate(("ingest-market", "ingest-user", "project"))}
        # each port answers with its own process's series once it has done some work
        expect: dict[str, Callable[[str], bool]] = {
            "ingest-market": lambda t: sample(t, 'pipeline_frames_logged_total'
                                                 '{key="raw:market:markPrice"}') > 0,
            "ingest-user": lambda t: sample(t, 'pipeline_frames_received_total'
                                               '{path="private"}') > 0,
            "project": lambda t: sample(t, 'pipeline_events_projected_total'
                                           '{projection="mark_price"}') > 0,
        }
        for name, ok in expect.items():
            text = ""
            while not ok(text):
                assert time.monotonic() < deadline, f"{name}: {text[-500:]}"
                try:
                    ctype, text = scrape(urls[name])
                except OSError:
                    time.sleep(0.2)
                    continue
                assert ctype.startswith("text/plain") and "# TYPE pipeline_" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    for url in urls.values():  # the servers went with their processes
        try:
            scrape(url)
        except OSError:
            continue
        raise AssertionError(f"{url} still answers after the demo stopped")


def test_demo_refuses_a_metrics_port_that_is_taken_before_starting_anything(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the first of the demo's three ports: a neighbour of a free port may be taken by
        # anything else on a busy machine, this one is ours
        done = run_cli("demo", "--seconds", "1", "--metrics-port", str(port),
                       env=clean_env(tmp_path), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"pipeline: bad setting --metrics-port: port {port} (for ingest-market) is not free: "
        "Address already in use"]
    assert list(tmp_path.iterdir()) == []
