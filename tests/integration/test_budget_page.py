"""Issue 15: the budget page (GET /admin/page) in a real headless Chromium.

A real `extproc serve` behind Envoy takes a few calls (some in a run, one refused), then
Chromium loads the page with the admin token in the URL fragment; the figures it renders
must be the ones `/admin/budgets` serves, with the active run and the refusal's decision id.
Without the token the page renders no figure at all.
"""

from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ledger, sha

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium absent: install Debian's chromium (.ci/run does)"),
]

KEY = "sk-page-alice"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096 }}
keys:
  - {{ sha256: {sha(KEY)}, principal: alice, team: t, org: o }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "1.00", window: day }}, {{ dimension: requests, limit: 100, window: rolling, seconds: 3600 }}]
  - scope: team
    limits: [{{ dimension: cost, limit: "5.00", window: month }}]
"""
BODY = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


class Dom(HTMLParser):
    """Rows of each table by table id: (row data-* attributes, [(cell class, text)]), and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[dict[str, str], list[tuple[str, str]]]]] = {}
        self.body: dict[str, str] = {}
        self.svg_total: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None and any(k.startswith("data-") for k in a):
            self.tables[self._table].append(({k[5:]: v for k, v in a.items() if k.startswith("data-")}, []))
        elif tag == "td" and self._table is not None and self.tables[self._table]:
            self._cell = [a.get("class", "")]
        elif tag == "svg":
            self.svg_total = a.get("data-total")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1][1].append((self._cell[0], "".join(self._cell[1:])))
            self._cell = None
        elif tag == "table":
            self._table = None


def chromium_dom(url: str, profile: Path) -> Dom:
    """The DOM after the page's scripts ran: headless Chromium, `--dump-dom`, virtual time for the fetches."""
    r = subprocess.run(
        ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dom = Dom()
    dom.feed(r.stdout)
    return dom


def cost_limit(rows: list[dict[str, object]]) -> str:
    return str(next(r["limit"] for r in rows if r["dimension"] == "cost"))


async def test_budget_page_renders_the_admin_figures_in_chromium(make_stack, tmp_path):
    stack = make_stack(POLICY)
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    user = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as c, httpx.AsyncClient(base_url=stack.admin_url, headers=admin, timeout=10) as a:
        for run in ("", "", "nightly"):
            r = await c.post("/v1/chat/completions", json=BODY, headers={**user, **({"x-run-id": run} if run else {})})
            assert r.status_code == 200, r.text
        await ledger(stack, expect=3)
        spent = (await a.get("/admin/budgets", params={"principal": "alice"})).json()["budgets"][0]["spent"]
        r = await a.post("/admin/budgets/adjust", json={"principal": "alice", "scope": "key", "dimension": "cost", "set_limit": spent, "window": "day"})
        assert r.status_code == 200, r.text
        refused = await c.post("/v1/chat/completions", json=BODY, headers=user)
        assert refused.status_code == 429, refused.text
        refused_id = refused.headers["x-budget-decision-id"]
        expected = (await a.get("/admin/budgets", params={"principal": "alice"})).json()["budgets"]
    async with httpx.AsyncClient(base_url=stack.admin_url, timeout=10) as anon:
        for path in ("/admin/principals", "/admin/activity", "/admin/refusals"):
            assert (await anon.get(path, params={"principal": "alice"})).status_code == 401, path
        html = await anon.get("/admin/page")
        assert html.status_code == 200 and "connect-src 'self'" in html.headers["content-security-policy"]
        assert "alice" not in html.text and cost_limit(expected) not in html.text

    page = f"{stack.admin_url}/admin/page"
    dom = chromium_dom(f"{page}#token={stack.admin_token}&principal=alice", tmp_path / "profile")
    assert dom.body.get("data-state") == "ready", dom.body
    rows = dom.tables["budgets"]
    assert len(rows) == len(expected) >= 3
    for (attrs, cells), want in zip(rows, expected, strict=True):
        got = {cls.split()[-1]: text for cls, text in cells if cls.startswith("num")}
        assert (attrs["scope"], attrs["dimension"], attrs["window"]) == (want["scope"], want["dimension"], want["window"])
        assert (got["limit"], got["spent"], got["reserved"], got["remaining"]) == (want["limit"], want["spent"], want["reserved"], want["remaining"])
        assert got["reset"] != "never" if want["reset_in_seconds"] is not None else got["reset"] == "never"
    cost = next(w for w in expected if w["scope"].startswith("key:") and w["dimension"] == "cost")
    assert float(cost["spent"]) > 0 and cost["spent"] == cost["limit"]
    assert [attrs["run"] for attrs, _ in dom.tables["runs"]] == ["nightly"]
    assert refused_id in [attrs["decision-id"] for attrs, _ in dom.tables["refusals"]]
    assert dom.svg_total is not None and abs(float(dom.svg_total) - float(cost["spent"])) < 1e-9

    for url in (page, f"{page}#token=wrong&principal=alice"):
        blind = chromium_dom(url, tmp_path / "profile-blind")
        assert blind.body.get("data-state") in ("login", "error")
        assert all(rows == [] for rows in blind.tables.values()), blind.tables
        assert blind.svg_total is None
