"""Running the mock backend on a real socket: in a loop (``serve``) or as a process (``run``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys

from aiohttp import web

from .. import startup
from ..tokenizers import get_encoding
from .app import make_app, make_metrics_app
from .config import MockConfig

SHUTDOWN_GRACE_S = 0.5
"""On SIGTERM, requests in flight get this long to finish, then are cut, as when a model
server's pod goes. Its clients are usually gone already (a stack stops Envoy first): a long
generation (a per-token delay) must not hold the stop up for the rest of its sleep."""


async def _start(host: str, port: int, config: MockConfig) -> tuple[web.AppRunner, int]:
    get_encoding("o200k_base")  # load the BPE ranks before the first request, not during it
    runner = web.AppRunner(make_app(config), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound


async def serve(
    host: str, port: int, config: MockConfig, *, started: asyncio.Future[int] | None = None
) -> None:
    """Serve until cancelled. ``started``, if given, receives the bound port (useful with port 0)."""
    runner, bound = await _start(host, port, config)
    try:
        if started is not None and not started.done():
            started.set_result(bound)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(
    host: str, port: int, config: MockConfig, *, metrics_port: int | None = None, also: dict[str, int] | None = None
) -> None:
    """Blocking entry point for ``extproc mock-backend``: one log line, clean exit on SIGINT/SIGTERM.
    ``metrics_port``: also serve only /metrics there (the DCGM exporter's port). ``also``: more
    backends from this process, {name: port}, each its own app (counters, name) with ``config``'s
    other settings: one process start (and BPE load) for the several clusters of a stack."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        runners: list[web.AppRunner] = []
        try:
            listening = []
            for cfg, p in [(config, port), *((dataclasses.replace(config, name=n), q) for n, q in (also or {}).items())]:
                runner, bound = await _start(host, p, cfg)
                runners.append(runner)
                listening.append((cfg, bound))
            if metrics_port is not None:
                runners.append(web.AppRunner(make_metrics_app(runners[0].app), access_log=None, handle_signals=False))
                await runners[-1].setup()
                await web.TCPSite(runners[-1], host, metrics_port).start()
            startup.settle()
            for cfg, bound in listening:
                print(
                    f"mock-backend {cfg.name!r} listening on http://{host}:{bound} "
                    f"(token_delay_ms={cfg.token_delay_ms:g}, gpus={cfg.gpus})",
                    file=sys.stderr,
                    flush=True,
                )
            await stop.wait()
        finally:
            for r in reversed(runners):
                await r.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
