"""`pipeline demo`: from a clean state it shows views and order events, and it leaves no
process behind, whether it ends by itself (`--seconds`) or by Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from pipeline.localredis import LocalRedis
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
