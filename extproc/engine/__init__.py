"""The budget engine: which budgets apply, what to reserve, what to charge.

Knows nothing of gRPC or HTTP; talks to a `stores.base.Store`.
"""

from .budget import Decision, Engine, Hold, Identity

__all__ = ["Decision", "Engine", "Hold", "Identity"]
