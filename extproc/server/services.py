"""What every session of one worker process shares."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engine.alerts import Alerter
from ..engine.budget import Decision, Engine
from ..engine.calls import Caller, Plan, Planner
from ..engine.growth import OutputHistory, expected_output
from ..engine.holds import Settled
from ..engine.recent import DecisionLog, RecentStates
from ..estimate import Counts, TokenCounter
from ..policy.loader import PolicyHolder
from ..policy.model import ModelSpec, Policy
from ..protocols.usage import Usage
from . import metrics
from .render import logged


@dataclass
class Services:
    """The policy source, the engine, the token cache, this process's recent decisions, the
    live cost rates of self-hosted backends, the threshold alerter, and the background tasks
    (settle retries, alert checks and deliveries)."""

    policy: PolicyHolder
    engine: Engine
    counter: TokenCounter = field(default_factory=TokenCounter)
    decisions: DecisionLog = field(default_factory=DecisionLog)
    recent: RecentStates = field(default_factory=RecentStates)
    rates: Any = None  # costrate.CostRates when the policy has self-hosted backends
    background: set[asyncio.Future[Any]] = field(default_factory=set)
    alerts: Alerter | None = None  # threshold alerts (policy `alerts`), sent from background tasks
    history: OutputHistory = field(default_factory=OutputHistory)  # what callers' calls really generated

    def spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def expected_output(self, policy: Policy, principal: str, model: str, spec: ModelSpec) -> int | None:
        """Output per choice a right-sized call of `principal` reserves (engine.growth)."""
        return expected_output(self.history, policy.streaming, spec, principal, model)

    def planner(self, policy: Policy, principal: str | None = None) -> Planner:
        """A Planner over this process's engine and live prices; with `principal`, right-sizing
        streams from what that caller's calls really generated."""
        live = self.rates.price_for_model if self.rates is not None else None
        expected = functools.partial(self.expected_output, policy, principal) if principal is not None else None
        return Planner(self.engine, policy, live_price=live, spawn=self.spawn, expected_output=expected)

    def decided(self, policy: Policy, caller: Caller, plan: Plan, counts: Iterable[Counts]) -> None:
        """What a decision leaves in this process, once its reply is on its way: the caller's recent
        state (early refusals), the decision log (budget endpoint), and for an allowed call the token
        counts of its messages (cache)."""
        d = plan.decision
        self.recent.put(caller.who, caller.run_id, d, now := self.engine.clock())
        self.decisions.add(logged(caller.who.principal, caller.run_id, plan, policy.prices.version, now))
        if d.allowed:
            for c in counts:
                self.counter.remember(c)

    def settled(
        self, policy: Policy, caller: Caller | None, plan: Plan | None, d: Decision, done: Settled, source: str, t0: float
    ) -> None:
        """What follows a settle: what the caller really generates, metrics (the settle's time since
        `t0`, perf_counter), threshold alerts."""
        self.learn_output(policy, caller, plan, done.usage, source)
        metrics.settled(d, done, time.perf_counter() - t0)
        self.after_settle(policy, d, done)

    def learn_output(self, policy: Policy, caller: Caller | None, plan: Plan | None, usage: Usage | None, source: str) -> None:
        """Remember what a completed call generated, per choice (not a cut or estimated one)."""
        if caller is None or plan is None or usage is None or source not in ("body", "stream"):
            return
        n = max(1, plan.facts.n)
        self.history.add(caller.who.principal, plan.chosen.name, usage.output_tokens // n, size=policy.streaming.history_calls)

    def after_settle(self, policy: Policy, decision: Decision, done: Settled) -> None:
        """What follows a settle the store took: threshold alerts (checked in the background)."""
        if self.alerts is not None and done.stored and not done.replayed:
            self.alerts.settled(policy, decision, done.overrun)
