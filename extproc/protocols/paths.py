"""One reading of a request's `:path`, whatever the proxy in front did to it.

The service cannot assume Envoy normalised the path (Istio's inbound listener
keeps escaped slashes and duplicate slashes by default), and backends decode
paths in their own ways: starlette serves `/v1/chat/completion%73` as
`/v1/chat/completions`, Tomcat drops `;params`, IIS folds case. So the
service decodes and normalises the path itself and matches routes on the
result, and the request is forwarded with that canonical path: what was
metered is what the backend sees.

Refused (a `BadRequest`, 400), never guessed at: encoded `/` or `\\`, a raw
`\\`, control or non-ASCII bytes, a bad or double percent-escape, a fragment,
a dot segment that climbs above the root. Everything else is normalised:
percent-decoding of other characters, `;` parameters dropped, `.` and `..`
segments resolved, duplicate slashes merged, a trailing slash dropped. Case
is kept here; route matching folds it (`policy.routes`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..errors import BadRequest

MAX_PATH_BYTES = 4096
CACHED_PATH_BYTES, CACHED_PATHS = 256, 4096  # the paths remembered: every call repeats a few (at most ~1 MB)

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(r"%(2[Ff]|5[Cc])")
# What may stand in a path after decoding: printable ASCII without the
# characters that would change how the path splits (?, #, \) or escape again (%).
_ALLOWED = re.compile(r"[\x21-\x7e]*")
_FORBIDDEN = frozenset("?#\\%")


class BadPath(BadRequest):
    """The request's path is one the service will not interpret."""

    code = "invalid_path"


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A normalised path: `segments` without empty ones; `query` as received (no `?`)."""

    segments: tuple[str, ...]
    query: str
    raw: str

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)

    @property
    def target(self) -> str:
        """Path and query, as the backend should receive them."""
        return self.path + ("?" + self.query if self.query else "")


def _refuse(why: str) -> BadPath:
    return BadPath(f"request path refused: {why}", param=None)


def normalize(raw: str) -> RequestPath:
    """Decode and normalise `raw` (the `:path` pseudo-header). Raises BadPath (never cached)."""
    return _normalize_cached(raw) if len(raw) <= CACHED_PATH_BYTES else _normalize(raw)


@functools.lru_cache(maxsize=CACHED_PATHS)
def _normalize_cached(raw: str) -> RequestPath:
    return _normalize(raw)


def _normalize(raw: str) -> RequestPath:
    if len(raw) > MAX_PATH_BYTES:
        raise _refuse(f"longer than {MAX_PATH_BYTES} bytes")
    path, _, query = raw.partition("?")
    if "#" in raw:
        raise _refuse("a fragment (#) is never part of a request")
    if not path.startswith("/"):
        raise _refuse("it must start with /")
    if not _ALLOWED.fullmatch(raw):
        raise _refuse("control, space or non-ASCII characters")
    if "\\" in path:
        raise _refuse("backslash")
    if _ENCODED_SEPARATOR.search(path):
        raise _refuse("an encoded / or \\ (%2F, %5C)")
    if path.count("%") != len(_ESCAPE.findall(path)):
        raise _refuse("a malformed percent-escape")
    decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    if not _ALLOWED.fullmatch(decoded) or any(c in _FORBIDDEN for c in decoded):
        raise _refuse("it decodes to a control, non-ASCII, %, ?, # or \\ character")
    segments: list[str] = []
    for seg in decoded.split("/"):
        seg = seg.partition(";")[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segments:
                raise _refuse("a .. segment above the root")
            segments.pop()
            continue
        segments.append(seg)
    return RequestPath(tuple(segments), query, raw)
