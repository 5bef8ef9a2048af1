"""GET /admin/page: the budget page, one self-contained HTML file (inline script and style,
no external resource: the admin address is often on a closed network).

The HTML carries no data, so it is served without the token; its script asks for the token
(or takes it from the URL fragment, which the browser never sends anywhere) and reads the
token-protected JSON endpoints of the same origin. The Content-Security-Policy allows only
this file's own script and style (by hash) and connections to the same origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def _page() -> tuple[bytes, str]:
    html = resources.files("extproc.server").joinpath("page.html").read_text(encoding="utf-8")
    scripts = " ".join(_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode(), csp


async def handler(request: web.Request) -> web.Response:
    body, csp = _page()
    return web.Response(
        body=body,
        headers={
            "content-type": "text/html; charset=utf-8",
            "content-security-policy": csp,
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
            "cache-control": "no-store",
        },
    )
