"""Shared-secret tokens: fixed, or listed in a file that is re-read when it changes.

Used for the gRPC caller token (`--caller-token-file`) and the admin API token
(`--admin-token-file`). A file lists one token per line (blank lines and
`#` comments are skipped), so a rotation is: add the new token, move the
callers over, remove the old one; no restart. Kubernetes Secret volumes swap
the whole file atomically; elsewhere, write a new file and rename it over the
old one (a half-written file accepts fewer tokens for up to a second).

Comparison is constant-time per token (`hmac.compare_digest`). The shipped
configs carry PLACEHOLDER where a token must go; it is never accepted.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("extproc.tokens")

PLACEHOLDER = "REPLACE-WITH-A-SECRET-TOKEN"


def parse_tokens(text: str) -> tuple[bytes, ...]:
    """The tokens a file's text lists (placeholder excluded), in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line != PLACEHOLDER:
            out.append(line.encode())
    return tuple(out)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a Secret volume's ..data swap changes the inode
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Tokens:
    """The tokens a caller may present. `accepts()` re-reads the file at most once per `check_every` s."""

    def __init__(
        self,
        fixed: tuple[bytes, ...] = (),
        path: str | Path | None = None,
        *,
        check_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path) if path else None
        self._tokens = fixed
        self._check_every = check_every
        self._clock = clock
        self._checked = clock()
        self._sig = _signature(self.path) if self.path else None

    @classmethod
    def from_file(
        cls, path: str | Path, what: str, *, check_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> Tokens:
        """Read `path` now; ConfigError if it is unreadable, empty or holds the placeholder."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{what} file {p}: cannot read: {e.strerror}") from None
        if any(line.strip() == PLACEHOLDER for line in text.splitlines()):
            raise ConfigError(
                f"{what} file {p} holds the placeholder {PLACEHOLDER!r} from the shipped configs: "
                "put a real secret there (e.g. `openssl rand -hex 32`) and the same value in the Envoy config"
            )
        tokens = parse_tokens(text)
        if not tokens:
            raise ConfigError(f"{what} file {p} lists no token (one per line)")
        return cls(tokens, p, check_every=check_every, clock=clock)

    @classmethod
    def from_env(cls, name: str) -> Tokens:
        value = os.environ.get(name, "").strip()
        return cls((value.encode(),) if value and value != PLACEHOLDER else ())

    def __bool__(self) -> bool:
        return bool(self.current())

    def current(self) -> tuple[bytes, ...]:
        if self.path is not None:
            now = self._clock()
            if now - self._checked >= self._check_every:
                self._checked = now
                self._reload_if_changed()
        return self._tokens

    def accepts(self, given: str | bytes | None) -> bool:
        if not given:
            return False
        if isinstance(given, str):
            given = given.encode()
        ok = False
        for token in self.current():  # no early exit: every listed token is compared
            ok |= hmac.compare_digest(given, token)
        return ok

    def _reload_if_changed(self) -> None:
        assert self.path is not None
        sig = _signature(self.path)
        if sig == self._sig:
            return
        self._sig = sig
        try:
            text = self.path.read_text()
        except OSError as e:  # mid-rename, or removed: keep the tokens we have
            log.error("cannot re-read token file %s (%s); keeping the previous tokens", self.path, e.strerror)
            return
        self._tokens = parse_tokens(text)
        if self._tokens:
            log.info("token file %s re-read: %d token(s)", self.path, len(self._tokens))
        else:
            log.error("token file %s now lists no usable token: every caller presenting one is refused", self.path)
