"""A streaming JSON scan that keeps only the values at a few key paths.

An SSE event can be larger than we are willing to hold (`sse.py` caps an
event at 1 MiB): the Responses API's terminal `response.completed` echoes
the whole `instructions` and `output`, and its `response.usage` is what we
bill on. `PathScanner` reads such a document in pieces of any size, tracks
only where it is (in a string or not, the key path of the enclosing
objects), and copies out the raw bytes of the values whose key path is
wanted, each up to `max_value_bytes`. Everything else is skipped as it goes.

Memory is the wanted values plus the key stack of the objects on the way to
them (a path never goes deeper than the longest wanted path); nesting
below that is one counter. Strings are skipped with memchr
and one regex search that stops only at quotes which may end them, so the
cost is per structural character, not per byte.

    scan = PathScanner({("type",), ("response", "usage")})
    for piece in pieces: scan.feed(piece)
    scan.result()   # {"type": "response.completed", "response": {"usage": {...}}}

Arrays end a path (no wanted path goes through one). Malformed JSON never
raises: the scan just finds less, and a captured value that does not parse
is left out of the result.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRUCT = re.compile(rb'["{}\[\],:]')
# a quote not right after a non-backslash and a backslash: the only quotes that may end a string
_QUOTE = re.compile(rb'"(?<![^\\]\\")')

MAX_KEY_BYTES = 256
DEFAULT_MAX_VALUE_BYTES = 64 << 10


def _string_end(data: bytes, i: int, n: int) -> int:
    """Where the string content starting at `i` (not inside an escape) stops: its closing
    quote, a backslash ending the piece (its escape goes on in the next one), or `n`.

    A quote ends the string when an even number of backslashes precede it. Escapes
    (`\\n`, `\\"`) are not walked one by one: memchr finds a string with none, else
    `_QUOTE` skips every quote after a lone backslash and the few left are checked.
    """
    q = data.find(b'"', i)
    if q < 0:
        q = n
    if data.find(b"\\", i, q) < 0:
        return q
    while True:
        m = _QUOTE.search(data, i)
        q = m.start() if m is not None else n
        k = q
        while k > i and data[k - 1] == 0x5C:
            k -= 1
        if (q - k) % 2 == 0:
            return q
        if q == n:  # an odd run of backslashes ends the piece: the last one escapes what comes next
            return n - 1
        i = q + 1  # after an escaped quote


class PathScanner:
    """Feed one JSON document in pieces; `result()` holds the wanted values."""

    __slots__ = (
        "_wanted",
        "_prefixes",
        "_max_value",
        "_stack",
        "_deep",
        "_in_string",
        "_escape",
        "_key",
        "_key_path",
        "_expect_key",
        "_capture",
        "_capture_path",
        "_capture_level",
        "_found",
    )

    def __init__(
        self, paths: set[tuple[str, ...]] | frozenset[tuple[str, ...]], *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> None:
        if not paths or any(not p for p in paths):
            raise ValueError("paths must be non-empty key tuples")
        self._wanted = frozenset(paths)
        self._prefixes = frozenset(p[:i] for p in paths for i in range(len(p)))
        self._max_value = max_value_bytes
        # one entry per open object whose path is a prefix of a wanted path:
        # its path; below the last such object only the depth is counted
        self._stack: list[tuple[str, ...]] = []
        self._deep = 0  # open containers below the tracked stack (or any array)
        self._in_string = False
        self._escape = False  # a backslash ended the previous piece inside a string
        self._key: bytearray | None = None  # bytes of the key being read (tracked objects only)
        self._key_path: tuple[str, ...] | None = None  # path of the value after the next ":"
        self._expect_key = False
        self._capture: bytearray | None = None
        self._capture_path: tuple[str, ...] = ()
        self._capture_level = 0
        self._found: dict[tuple[str, ...], bytes] = {}

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        n = len(data)
        i = 0
        capture_from = 0  # start of the bytes of `data` not yet copied to the capture
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    self._key_bytes(data, i, i + 1)
                    i += 1
                    continue
                j = _string_end(data, i, n)
                if j == n or data[j] == 0x5C:  # the piece ends in the string (maybe after a backslash)
                    self._key_bytes(data, i, n)
                    self._escape = j < n
                    i = n
                    break
                self._key_bytes(data, i, j)
                self._in_string = False
                if self._key is not None:
                    self._end_key()
                i = j + 1
                continue
            m = _STRUCT.search(data, i)
            if m is None:
                break
            j = m.start()
            c = data[j]
            i = j + 1
            if c == 0x22:  # '"'
                self._in_string = True
                if self._expect_key and not self._deep and self._capture is None:
                    self._key = bytearray()
                    self._expect_key = False
            elif c in (0x7B, 0x5B):  # '{' '['
                if (
                    c == 0x7B
                    and not self._deep
                    and self._capture is None
                    and (path := self._value_path()) is not None
                    and path in self._prefixes
                ):
                    self._stack.append(path)
                    self._expect_key = True
                else:
                    self._deep += 1
                self._key_path = None
            elif c in (0x7D, 0x5D):  # '}' ']'
                if self._deep:
                    self._deep -= 1
                else:
                    if self._capture is not None and len(self._stack) == self._capture_level:
                        capture_from = self._end_capture(data, capture_from, j)
                    if self._stack:
                        self._stack.pop()
                    self._expect_key = False
            elif c == 0x2C:  # ','
                if not self._deep:
                    if self._capture is not None and len(self._stack) == self._capture_level:
                        capture_from = self._end_capture(data, capture_from, j)
                    self._expect_key = bool(self._stack)
                    self._key_path = None
            elif c == 0x3A and not self._deep and self._capture is None and self._key_path in self._wanted:  # ':'
                self._capture = bytearray()
                self._capture_path = self._key_path
                self._capture_level = len(self._stack)
                capture_from = i
        if self._capture is not None:
            self._append_capture(data, capture_from, n)

    def _value_path(self) -> tuple[str, ...] | None:
        """Path of a container opening here: the root, or the value of the last key."""
        return self._key_path if self._stack else ()

    def _key_bytes(self, data: bytes, a: int, b: int) -> None:
        key = self._key
        if key is not None and a < b:
            if len(key) + (b - a) > MAX_KEY_BYTES:
                self._key = None  # too long to be a key we want: stop reading it
                self._key_path = None
            else:
                key += data[a:b]

    def _end_key(self) -> None:
        assert self._key is not None
        try:
            name = json.loads(b'"' + bytes(self._key) + b'"')
        except ValueError:
            name = None
        self._key = None
        self._key_path = self._stack[-1] + (name,) if isinstance(name, str) and self._stack else None

    def _append_capture(self, data: bytes, a: int, b: int) -> None:
        cap = self._capture
        assert cap is not None
        if len(cap) + (b - a) > self._max_value:
            self._capture = None  # too large to be the value we want: give it up
            return
        cap += data[a:b]

    def _end_capture(self, data: bytes, a: int, end: int) -> int:
        self._append_capture(data, a, end)
        if self._capture is not None:
            self._found[self._capture_path] = bytes(self._capture)
        self._capture = None
        return end

    def result(self) -> dict[str, Any]:
        """The wanted values found so far, parsed and nested by their paths."""
        out: dict[str, Any] = {}
        for path, raw in self._found.items():
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            node = out
            for key in path[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = node[key] = {}
                node = child
            node[path[-1]] = value
        return out
