"""Start a private `redis-server` on a free port in a folder of its own.

Used by `pipeline demo` (no Redis needed on the machine beyond the binary) and by the tests,
which kill and restart it, and configure AOF or an ACL file. Never touches another server's data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    pass


class LocalRedis:
    """A redis-server child process. `url` is ready once `start()` returns."""

    def __init__(self, folder: Path, *, port: int | None = None, args: Sequence[str] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._auto_port = port is None
        self.port = port or free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        # A free port is only free until someone takes it: on a busy machine another process
        # can bind it between `free_port()` and redis-server's bind. A port we chose ourselves
        # is then chosen again; one the caller gave stays an error.
        for _ in range(5):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if not self._auto_port:
                    raise RuntimeError(f"redis-server: port {self.port} is in use") from None
                self.port = free_port()
        raise RuntimeError("redis-server: no free port after 5 tries")

    def _start_once(self, timeout: float) -> LocalRedis:
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--save", "", "--appendonly", "no",
            "--logfile", str(self.folder / "redis.log"), *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = (self.folder / "redis.log")
                tail = log.read_text()[-500:] if log.exists() else ""
                self.proc = None
                if "Address already in use" in tail:
                    raise _PortTaken()
                raise RuntimeError(f"redis-server exited at start: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH", b"-NOPERM")):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port can be reused by `start()`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
