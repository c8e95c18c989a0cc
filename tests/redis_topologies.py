"""Real Redis topologies from Debian's redis-server: a Redis Cluster (3 masters, 3 replicas) and a Sentinel
group (a master, a replica, three Sentinels), each on free ports, with fast failover settings so a test sees
a killed master replaced within seconds."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Self

from tests.servers import HOST, RedisServer, free_ports, wait_until

NODE_TIMEOUT_MS = 1000  # a master unreachable this long is failed over (cluster) / down (Sentinel)


def command(port: int, *args: str, timeout: float = 5.0) -> str:
    """One redis-cli command's answer (raw), or "" when the node does not answer."""
    try:
        done = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-h", HOST, "-p", str(port), "--raw", *args],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Cluster:
    """Six nodes; ``redis-cli --cluster create`` with one replica per master."""

    def __init__(self, workdir: Path) -> None:
        ports = free_ports(12)  # each node's own and its cluster bus port (by default +10000: maybe taken)
        self.nodes = [RedisServer(workdir / f"node-{port}", ["--cluster-enabled", "yes", "--cluster-port", str(bus),
                                                               "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                                                               "--cluster-replica-validity-factor", "0",
                                                               "--cluster-config-file", "nodes.conf"], port=port)
                      for port, bus in zip(ports[:6], ports[6:], strict=True)]
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes[:3])

    def __enter__(self) -> Self:
        for node in self.nodes:
            node.start()
        subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                        *(f"{HOST}:{n.port}" for n in self.nodes), "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self.healthy, 30, "cluster_state:ok on every node")
        wait_until(self.replicated, 30, "every replica in sync with its master")
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.stop()

    def healthy(self) -> bool:
        live = [n for n in self.nodes if n.running]
        return all("cluster_state:ok" in command(n.port, "cluster", "info") for n in live)

    def replicated(self) -> bool:
        roles = [command(n.port, "info", "replication") for n in self.nodes if n.running]
        replicas = [r for r in roles if "role:slave" in r]
        return len(replicas) >= 3 and all("master_link_status:up" in r for r in replicas)

    def serves(self, key: str) -> bool:
        """A live master serves ``key``'s slot, and every live node says the cluster is ok (after a kill: the
        failover is over)."""
        try:
            return self.master_of(key).running and self.healthy()
        except LookupError:
            return False

    def master_of(self, key: str) -> RedisServer:
        asked = next(n for n in self.nodes if n.running)
        slot = int(command(asked.port, "cluster", "keyslot", key).strip())
        for line in command(asked.port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")


class SentinelGroup:
    """A master, its replica and three Sentinels watching it as ``mymaster`` (quorum 2)."""

    service = "mymaster"

    def __init__(self, workdir: Path) -> None:
        master_port, replica_port, *sentinel_ports = free_ports(5)
        self.master = RedisServer(workdir / "master", port=master_port)
        self.replica = RedisServer(workdir / "replica", ["--replicaof", HOST, str(master_port)], port=replica_port)
        self.sentinels = [_Sentinel(workdir / f"sentinel-{p}", p, master_port) for p in sentinel_ports]
        self.url = "redis+sentinel://" + ",".join(f"{HOST}:{p}" for p in sentinel_ports) + f"/{self.service}"

    def __enter__(self) -> Self:
        self.master.start()
        self.replica.start()
        wait_until(lambda: "master_link_status:up" in command(self.replica.port, "info", "replication"), 30,
                   "the replica in sync")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(lambda: all(self.sentinel_master(s) == self.master.port for s in self.sentinels), 30,
                   "every Sentinel naming the master")
        return self

    def __exit__(self, *exc: object) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()

    def sentinel_master(self, sentinel: RedisServer) -> int | None:
        lines = command(sentinel.port, "sentinel", "get-master-addr-by-name", self.service).split()
        return int(lines[1]) if len(lines) == 2 and lines[1].isdigit() else None

    def failed_over(self) -> bool:
        return all(self.sentinel_master(s) == self.replica.port for s in self.sentinels if s.running)


class _Sentinel(RedisServer):
    name = "sentinel"

    def __init__(self, workdir: Path, port: int, master_port: int) -> None:
        super().__init__(workdir, port=port)
        self.master_port = master_port

    def command(self) -> list[str]:
        config = self.workdir / "sentinel.conf"
        if not config.exists():  # Sentinel rewrites its file: written once, kept across restarts
            config.write_text(
                f"port {self.port}\nbind {HOST}\ndir {self.workdir}\n"
                f"sentinel monitor {SentinelGroup.service} {HOST} {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {SentinelGroup.service} {NODE_TIMEOUT_MS}\n"
                f"sentinel failover-timeout {SentinelGroup.service} 5000\n"
                f"sentinel parallel-syncs {SentinelGroup.service} 1\n")
        binary = shutil.which("redis-server") or "redis-server"
        return [binary, str(config), "--sentinel"]

    def is_ready(self) -> bool:
        return _answers(self.port)
