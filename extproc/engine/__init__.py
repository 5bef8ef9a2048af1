"""The budget engine: which budgets apply, what to reserve, what to charge.

Knows nothing of gRPC or HTTP; talks to a `stores.base.Store`.
"""

from .budget import BudgetSnapshot, Decision, Engine, Hold, Identity
from .runs import RUN_LOWER_HEADERS, run_overrides_from_headers

__all__ = ["BudgetSnapshot", "Decision", "Engine", "Hold", "Identity", "RUN_LOWER_HEADERS", "run_overrides_from_headers"]
