"""``serve`` (in a loop, until cancelled) and ``run`` (a process, clean on SIGTERM/SIGINT)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import httpx
import pytest

from extproc.mock_backend import MockConfig, serve


async def test_serve_until_cancelled() -> None:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve("127.0.0.1", 0, MockConfig(name="svc"), started=started))
    port = await asyncio.wait_for(started, 5)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
        assert await r.text() == "ok" and r.headers["x-mock-backend"] == "svc"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with socket.socket() as s:  # the port is released
        s.bind(("127.0.0.1", port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError("mock backend did not start")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_exits_cleanly_on_signal(sig: signal.Signals) -> None:
    port = _free_port()
    code = (
        "from extproc.mock_backend import run, MockConfig; "
        f"run('127.0.0.1', {port}, MockConfig(name='proc'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(port, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], lines


def test_one_process_serves_other_backends_with_their_own_name_and_counters() -> None:
    """`extproc mock-backend --also NAME=PORT`: what Stack starts for its two clusters."""
    port, other = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "mock-backend", "--port", str(port), "--name", "big", "--also", f"small={other}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_healthy(port, proc)
        _wait_healthy(other, proc)
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=10) as c:
            r = c.post(f"http://127.0.0.1:{other}/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["x-mock-backend"] == "small"
            assert c.get(f"http://127.0.0.1:{port}/healthz").headers["x-mock-backend"] == "big"
            assert c.get(f"http://127.0.0.1:{other}/stats").json()["hits"] == 1
            assert c.get(f"http://127.0.0.1:{port}/stats").json()["hits"] == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert [line.split()[1] for line in err.decode().splitlines()] == ["'big'", "'small'"]
