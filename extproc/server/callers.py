"""Who may call the gRPC service: the Envoys the operator deployed, nobody else.

Envoy's ext_proc and ext_authz filters send a shared secret as gRPC metadata
(`grpc_service.initial_metadata`, key CALLER_TOKEN_KEY). Without it, any pod
that reaches the port could send its own ProcessingRequest or CheckRequest
with a forged mTLS peer attribute or principal header, read another
principal's budget and charge it.

    a token file is configured    a call must carry one of its tokens, else UNAUTHENTICATED
    no token, unix: address       every call is admitted and authenticated: the socket's
                                  file permissions decide who can connect
    no token, TCP address         the service does not start, unless the operator passes
                                  --allow-unauthenticated-callers; then calls are admitted
                                  but unauthenticated

Only an authenticated call may name its principal through Envoy: the mTLS
peer attribute and the trusted principal header count only then (see
identity.resolve); an unauthenticated one is identified by API key alone.
A refused call ends before any session exists or any budget is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import metrics
from .grpc_server import GRPCError, Status
from .tokens import PLACEHOLDER, Tokens

log = logging.getLogger("extproc.callers")

CALLER_TOKEN_KEY = "x-extproc-caller-token"
_LOG_EVERY_S = 10.0


@dataclass
class CallerGate:
    tokens: Tokens | None  # None: no token is asked for
    trusted_without_token: bool  # no token asked: are admitted calls authenticated (unix socket)?
    _last_log: float = float("-inf")

    @classmethod
    def configure(cls, grpc_addr: str, token_file: str | Path | None, *, allow_unauthenticated: bool = False) -> CallerGate:
        """The gate for these settings, or ConfigError saying why the service must not start."""
        if token_file:
            return cls(Tokens.from_file(token_file, "caller token"), False)
        if grpc_addr.startswith("unix:"):
            return cls(None, True)
        if allow_unauthenticated:
            return cls(None, False)
        raise ConfigError(
            f"refusing to serve gRPC on {grpc_addr} without caller authentication: any pod that reaches this port "
            "could charge any budget. Give --caller-token-file PATH (or EXTPROC_CALLER_TOKEN_FILE) and set the same "
            f"token in Envoy's grpc_service.initial_metadata ({CALLER_TOKEN_KEY}); or serve on a unix: socket; "
            "or, for local development only, pass --allow-unauthenticated-callers"
        )

    def describe(self) -> str:
        if self.tokens is not None:
            return f"callers must present a token from {self.tokens.path} in gRPC metadata {CALLER_TOKEN_KEY}"
        if self.trusted_without_token:
            return "no caller token: the Unix socket's file permissions decide who may call (every call is trusted)"
        return ("UNAUTHENTICATED CALLERS ALLOWED (--allow-unauthenticated-callers): anyone who reaches the port may call; "
                "principals come from API keys only, Envoy attributes and principal headers are ignored")

    def admit(self, metadata: Iterable[tuple[str, Any]]) -> bool | None:
        """True: authenticated; False: admitted unauthenticated; None: refused."""
        if self.tokens is None:
            return self.trusted_without_token
        given = next((v for k, v in metadata if k == CALLER_TOKEN_KEY), None)
        if self.tokens.accepts(given):
            return True
        reason = "missing" if not given else ("placeholder" if given == PLACEHOLDER else "wrong")
        self._refused(reason)
        return None

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """Whether the call is authenticated; a refused call ends here with UNAUTHENTICATED."""
        admitted = self.admit(metadata or ())
        if admitted is None:
            raise GRPCError(Status.UNAUTHENTICATED, f"missing or wrong caller token ({CALLER_TOKEN_KEY})")
        return admitted

    def _refused(self, reason: str) -> None:
        metrics.CALLERS_REFUSED.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:  # a flood of refusals must not flood the log
            self._last_log = now
            hint = " (the Envoy config still holds the shipped placeholder)" if reason == "placeholder" else ""
            log.warning("refused a gRPC call: %s caller token%s; see extproc_grpc_callers_refused_total", reason, hint)
