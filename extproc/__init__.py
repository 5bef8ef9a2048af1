"""extproc: budget enforcement for LLM inference traffic behind Envoy ext_proc.

The public surface is what `__all__` lists; every other module is internal.

    policy = load_policy("policies/demo.yaml")          # Policy, or PolicyError
    engine = Engine(open_store("sqlite:var/budget.db"))  # or redis://…, redis+cluster://…
    await serve("policies/demo.yaml", "redis://127.0.0.1:6379", "127.0.0.1:50051")

`Store` is the interface a budget store implements; the error types are the
roots of `extproc.errors` (its docstring draws the tree). The command line is
`extproc.cli` (`extproc serve`, `extproc policy check`, …).

Names are imported on first use, so `import extproc.protocols` (sans-IO) does
not pull in gRPC, Redis or pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import ClientError, ConfigError, ExtprocError, PolicyError, StoreUnavailable, UpstreamError

if TYPE_CHECKING:
    from .app import open_store, serve
    from .engine.budget import Decision, Engine, Identity
    from .policy.loader import PolicyHolder, load_policy
    from .policy.model import Policy
    from .stores.base import Store

__version__ = "0.1.0"

_LAZY = {
    "Engine": "extproc.engine.budget",
    "Identity": "extproc.engine.budget",
    "Decision": "extproc.engine.budget",
    "Policy": "extproc.policy.model",
    "PolicyHolder": "extproc.policy.loader",
    "load_policy": "extproc.policy.loader",
    "Store": "extproc.stores.base",
    "open_store": "extproc.app",
    "serve": "extproc.app",
}

__all__ = [
    # budgets
    "Engine",
    "Identity",
    "Decision",
    # policy
    "Policy",
    "PolicyHolder",
    "load_policy",
    # stores and the service
    "Store",
    "open_store",
    "serve",
    # errors
    "ExtprocError",
    "ClientError",
    "UpstreamError",
    "PolicyError",
    "ConfigError",
    "StoreUnavailable",
    "__version__",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'extproc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
