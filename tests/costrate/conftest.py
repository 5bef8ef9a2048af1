"""Shared fixtures: a self-hosted backend spec and the real mock GPU backend on a real port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from extproc.mock_backend import BACKEND, MockConfig, make_app
from extproc.mock_backend.app import Backend
from extproc.policy.selfhosted import SelfHostedBackend

SPEC: dict[str, Any] = {
    "gpu_model": "NVIDIA H100 80GB HBM3",
    "gpu_count": 1,
    "purchase_price_usd": "30000",
    "amortization_years": 3,
    "yearly_maintenance_share": "0.10",
    "tdp_watts": 700,
    "usd_per_kwh": "0.12",
    "pue": "1.3",
}


def closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_spec(**over: Any) -> SelfHostedBackend:
    return SelfHostedBackend.model_validate({**SPEC, **over})


StartMock = Callable[..., Awaitable[tuple[str, Backend]]]


@pytest.fixture
async def start_mock() -> AsyncIterator[StartMock]:
    """``url, backend = await start_mock(**MockConfig fields)``: the real mock app on 127.0.0.1."""
    servers: list[TestServer] = []

    async def start(**config: Any) -> tuple[str, Backend]:
        app = make_app(MockConfig(**config))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", app[BACKEND]

    yield start
    for server in servers:
        await server.close()
