"""Fixtures: a mock backend on a real ephemeral port, plus a plain HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from extproc.mock_backend import MockConfig, make_app

StartMock = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_mock() -> AsyncIterator[StartMock]:
    """``base = await start_mock(**MockConfig fields)`` -> ``http://127.0.0.1:PORT``."""
    servers: list[TestServer] = []

    async def start(**config: object) -> str:
        server = TestServer(make_app(MockConfig(**config)), host="127.0.0.1")  # type: ignore[arg-type]
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def base(start_mock: StartMock) -> str:
    return await start_mock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
