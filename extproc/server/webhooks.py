"""HTTP delivery of budget alerts (the engine decides what to send; this module sends it)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp


async def aiohttp_post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST `body` and return the HTTP status (raises on a connection error): `engine.alerts.Post`."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
        http.post(url, data=body, headers=dict(headers)) as resp,
    ):
        return resp.status
