"""Load a policy file with precise errors; hold the last good one for reloads.

Each request reads `holder.current` once and works from that snapshot, so a
reload never changes the rules under a request in flight (as envoyproxy/
ratelimit does with its config snapshots).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import PolicyError
from .model import Policy

log = logging.getLogger("extproc.policy")


def _where(loc: tuple[object, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping")
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: {e.error_count()} problem(s)"]
        for err in e.errors():
            lines.append(f"  {source}: {_where(err['loc'])}: {err['msg']}")
        raise PolicyError("\n".join(lines)) from None


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PolicyError(f"{p}: cannot read: {e.strerror}") from e
    return parse_policy(text, str(p))


class PolicyHolder:
    """The current policy and where it came from; `reload()` keeps the old one on error."""

    def __init__(self, policy: Policy, path: str | Path | None = None) -> None:
        self.current = policy
        self.path = Path(path) if path else None
        self._mtime = self._stat()

    @classmethod
    def from_file(cls, path: str | Path) -> PolicyHolder:
        return cls(load_policy(path), path)

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime if self.path else None
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read the file; returns True if a new policy took effect."""
        if self.path is None:
            return False
        self._mtime = self._stat()
        try:
            new = load_policy(self.path)
        except PolicyError as e:
            log.error("policy reload rejected, keeping the previous policy: %s", e)
            return False
        self.current = new
        log.info("policy reloaded from %s (price table %s)", self.path, new.prices.version)
        return True

    def changed_on_disk(self) -> bool:
        return self.path is not None and self._stat() != self._mtime
