"""Operator policy: prices, identities, budgets, runs, failure mode.

`model` holds the pydantic schema (frozen, extra="forbid"); `loader` reads
YAML with precise errors and keeps the last good policy on reload.
"""

from .loader import PolicyHolder, load_policy
from .model import BudgetSpec, KeySpec, LimitSpec, ModelSpec, Policy, RunsSpec

__all__ = ["BudgetSpec", "KeySpec", "LimitSpec", "ModelSpec", "Policy", "PolicyHolder", "RunsSpec", "load_policy"]
