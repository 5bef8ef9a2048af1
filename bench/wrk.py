"""The second load generator: `wrk` (C, epoll, HdrHistogram), beside bench/load.py.

So the figures do not depend on one harness. wrk drives the same POST (body and
headers from a generated Lua script) in the same closed loop: `connections`
keep-alive connections, each sending its next request when the previous answer
is complete. It reports total latency only (no time to first byte), and it
stops at the deadline without waiting for requests in flight (up to one per
connection is cut off; the enforcement check allows for them).

wrk is a Debian package (`apt-get install wrk`); when it is missing the run says
so in its report and measures with bench/load.py alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MARK = "WRK_JSON "

# done() prints one JSON line; latencies are microseconds.
_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    MARK, summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def binary() -> str | None:
    return shutil.which("wrk")


def missing_note() -> str:
    return "wrk not installed (`apt-get install wrk`): the second load generator was not run, bench/load.py figures only"


def _lua_str(s: str) -> str:
    """A Lua string literal (double-quoted; backslash, quote and control characters escaped)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\{ord(ch):03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def script(body: bytes, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_str(body.decode())}", 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items()]
    lines.append(f"MARK = {_lua_str(MARK)}")
    return "\n".join(lines) + "\n" + _DONE


def run(url: str, *, body: bytes, headers: dict[str, str], connections: int, duration_s: float, path: str) -> dict[str, Any]:
    """One closed-loop cell; the summary has the keys bench/load.py's `Result.summary()` has for JSON."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError(missing_note())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script(body, headers))
        lua = Path(f.name)
    try:
        cmd = [exe, "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration_s))}s", "--timeout", "30s", "-s", str(lua), url.rstrip("/") + path]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    finally:
        lua.unlink(missing_ok=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith(MARK)), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-400:]}")
    r = json.loads(line[len(MARK):])
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    ok = r["requests"] - r["status"]  # answered with 2xx/3xx (wrk counts other statuses as errors.status)
    seconds = r["duration_us"] / 1e6
    return {
        "concurrency": connections,
        "requests": ok,
        "errors": errors,
        "rps": round(ok / seconds, 1) if seconds else 0.0,
        "p50_ms": round(r["p50_us"] / 1000, 3),
        "p90_ms": round(r["p90_us"] / 1000, 3),
        "p99_ms": round(r["p99_us"] / 1000, 3),
        "max_ms": round(r["max_us"] / 1000, 3),
        "in_flight_cut": connections,  # at most one request per connection is cut off at the deadline
        "first_error": "" if not errors else f"wrk errors: {json.dumps({k: r[k] for k in ('connect', 'read', 'write', 'status', 'timeout')})}",
    }
