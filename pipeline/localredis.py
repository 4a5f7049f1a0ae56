"""Start a private `redis-server` on a free port in a folder of its own.

Used by `pipeline demo` (no Redis needed on the machine beyond the binary) and by the tests,
which kill and restart it, and configure AOF or an ACL file. Never touches another server's data.
"""

from __future__ import annotations

import random
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


def free_cluster_port(rand: random.Random | None = None) -> int:
    """A free port below 55536 whose cluster bus port (port + 10000) is free too."""
    rng = rand or random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


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


CLUSTER_NODE_TIMEOUT_MS = 1_000  # a killed master's replica takes over after ~2-3 s


class LocalCluster:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, every node a
    `LocalRedis` in a folder of its own under `folder`, created with
    `redis-cli --cluster create`. `url` names the first master: the pipeline discovers the rest.
    For the tests and bench/bench_cluster.py; never touches another server's data."""

    def __init__(self, folder: Path, *, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
                 args: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.args = list(args)
        self.nodes: list[LocalRedis] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def _node_args(self) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # a replica whose master went away is promoted however long the link was down
                "--cluster-replica-validity-factor", "0",
                "--cluster-require-full-coverage", "no", *self.args]

    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # no node left running after a failed start
            raise

    def _start(self, timeout: float) -> LocalCluster:
        count = self.masters * (1 + self.replicas)
        for i in range(count):
            for attempt in range(5):
                node = LocalRedis(self.folder / f"node{i}", port=free_cluster_port(),
                                  args=self._node_args())
                try:
                    self.nodes.append(node.start())
                    break
                except RuntimeError:  # the port was taken meanwhile: another one
                    if attempt == 4:
                        raise
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (apt-get install -y redis-tools)")
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas",
                        str(self.replicas), "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0, *, masters: int | None = None) -> None:
        """Until every live node says cluster_state:ok and sees `masters` (default: as many as
        created) masters serving slots, and every live replica's link to its master is up."""
        want = self.masters if masters is None else masters
        deadline = time.monotonic() + timeout
        while True:
            if all(self._ok(n, want) for n in self.nodes if n.proc is not None):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(node: LocalRedis, masters: int) -> bool:
        try:
            with node.client(socket_timeout=2) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
                if int(fields.get("cluster_size", 0)) != masters:
                    return False
                # every node agrees on the slot map: no slot in migration
                nodes = c.execute_command("CLUSTER", "NODES")
                text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
                if "->-" in text or "-<-" in text:
                    return False
                # a replica is in sync with its master (WAIT 1 answers at once)
                repl = c.info("replication")
                if repl.get("role") == "slave":
                    return repl.get("master_link_status") == "up"
                return True
        except (redis.RedisError, OSError):
            return False

    def master_nodes(self) -> list[LocalRedis]:
        """The live nodes that are masters now (after a failover, a former replica)."""
        out = []
        for n in self.nodes:
            if n.proc is None:
                continue
            with n.client(socket_timeout=2) as c:
                role = c.execute_command("ROLE")
            if role[0] in (b"master", "master"):
                out.append(n)
        return out

    def node_of_slot(self, slot: int) -> LocalRedis:
        """The live master serving `slot`, as the masters themselves say (each one's own line
        of CLUSTER NODES: another node's view may lag behind a reshard or a failover); of two
        claims (a restarted old master that has not yet heard), the newer config epoch."""
        claims: list[tuple[int, LocalRedis]] = []
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                with n.client(socket_timeout=2) as c:
                    raw = c.execute_command("CLUSTER", "NODES")
            except (redis.RedisError, OSError):
                continue
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            for line in text.splitlines():
                parts = line.split()
                if len(parts) < 8 or "myself" not in parts[2] or "master" not in parts[2]:
                    continue
                for rng in parts[8:]:
                    if rng.startswith("["):
                        continue  # a slot being migrated or imported
                    lo, _, hi = rng.partition("-")
                    if int(lo) <= slot <= int(hi or lo):
                        claims.append((int(parts[6]), n))
        if not claims:
            raise RuntimeError(f"no live master serves slot {slot}")
        return max(claims, key=lambda c: c[0])[1]

    def replicas_of(self, master: LocalRedis) -> list[LocalRedis]:
        """The live replicas of `master`."""
        by_port = {n.port: n for n in self.nodes if n.proc is not None}
        with master.client(socket_timeout=2) as c:
            myid = c.execute_command("CLUSTER", "MYID")
            rows = c.execute_command("CLUSTER", "REPLICAS", myid)
        out = []
        for row in rows:
            text = row.decode() if isinstance(row, bytes) else str(row)
            port = int(text.split()[1].split("@")[0].rsplit(":", 1)[1])
            if port in by_port:
                out.append(by_port[port])
        return out

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
