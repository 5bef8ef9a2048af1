"""The policy schema. One validated shape; every field has a named default.

Money is written as decimal strings ("5.00" USD, prices in USD per 1M tokens)
and converted to integer nano-USD here, once, at load time.
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from functools import cached_property
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..money import Price, decimal_str, usd_to_nano
from ..rules import Mode
from .routes import RouteSpec, RouteTable, default_routes
from .selfhosted import SelfHostedSpec

MAX_EXACT = 2**53 - 1  # counters stay exact in Redis Lua below this
Dimension = Literal[
    "cost", "input_tokens", "output_tokens", "total_tokens", "requests", "concurrency", "duration", "retries", "tool_calls"
]
Encoding = Literal["o200k_base", "cl100k_base"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")




class Capabilities(_Frozen):
    tools: bool = True
    vision: bool = False
    json_mode: bool = True


class ModelSpec(_Frozen):
    """One model's price (USD per 1M tokens) and what it can do."""

    input: str
    output: str
    cached_input: str | None = None
    cache_write: str | None = None
    output_limit: int = Field(4096, gt=0, le=10_000_000)
    context_window: int = Field(128_000, gt=0, le=100_000_000)
    encoding: Encoding = "o200k_base"
    token_safety_factor: Decimal = Field(Decimal("1.0"), ge=1, le=10, description="multiplies input estimates for non-OpenAI tokenizers")
    capabilities: Capabilities = Capabilities()
    downshift_to: tuple[str, ...] = ()
    reasoning: bool = Field(False, description="generates hidden reasoning: a stream whose usage is lost is charged its reservation")
    audio_input: str | None = Field(None, description="USD per 1M audio input tokens (default: `input`)")
    audio_output: str | None = Field(None, description="USD per 1M audio output tokens (default: `output`)")
    tool_calls: dict[str, str] = Field(
        {}, description="USD per call of a built-in tool (web_search, file_search, ...); a request enabling an unlisted one is refused"
    )
    tool_calls_reserved: int = Field(4, ge=0, le=1000, description="calls of the priciest enabled tool reserved per request")
    expected_output_tokens: int | None = Field(
        None, gt=0, le=10_000_000,
        description="output a streamed call reserves per choice before this caller's history is known "
        "(the reservation then grows with the stream); unset: the worst case until history exists",
    )  # fmt: skip
    upstream_stream: bool = Field(
        False,
        description="ask the backend to stream a JSON call, grow its reservation as tokens arrive and return "
        "the JSON assembled from the stream (right-sized reservations for non-streamed calls too)",
    )

    _money = field_validator("input", "output", "cached_input", "cache_write", "audio_input", "audio_output", mode="before")(
        lambda cls, v: None if v is None else decimal_str(v)
    )
    _tool_money = field_validator("tool_calls", mode="before")(
        lambda cls, v: {k: decimal_str(x) for k, x in v.items()} if isinstance(v, dict) else v
    )

    @cached_property
    def price(self) -> Price:
        return Price.per_million(self.input, self.output, self.cached_input, self.cache_write)

    @cached_property
    def audio_price(self) -> Price:
        """Audio token prices (input, output), for the premium over the text price."""
        return Price.per_million(self.audio_input or self.input, self.audio_output or self.output)

    @cached_property
    def tool_call_nano(self) -> dict[str, int]:
        return {k: usd_to_nano(v) for k, v in self.tool_calls.items()}


class PriceTable(_Frozen):
    version: str = "unversioned"
    models: dict[str, ModelSpec]
    # Price unknown models like this one instead of refusing them (fail closed by default).
    default_model: str | None = None


class KeySpec(_Frozen):
    """An API key, stored as the sha256 of the key, never the key itself."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    principal: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:-]+$")
    team: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    org: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    user: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    labels: dict[str, str] = {}

    @staticmethod
    def hash_key(api_key: str) -> str:
        return hashlib.sha256(api_key.encode()).hexdigest()


class LimitSpec(_Frozen):
    """One limit of a budget. `limit` is USD (decimal string) for cost, an integer otherwise."""

    dimension: Dimension
    limit: str | int
    window: Literal["total", "day", "week", "month", "rolling"] = "total"
    seconds: int | None = Field(None, gt=0, le=366 * 86400, description="rolling window length")
    timezone: str = "UTC"
    soft_threshold: Decimal | None = Field(None, gt=0, lt=1)
    mode: Mode | None = None

    @model_validator(mode="after")
    def _check(self) -> LimitSpec:
        if self.dimension == "cost":
            decimal_str(self.limit)
        elif isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise ValueError(f"{self.dimension} limit must be a non-negative integer")
        if self.value > MAX_EXACT:
            raise ValueError(f"limit is above the exact counter range ({MAX_EXACT} units)")
        if (self.window == "rolling") != (self.seconds is not None):
            raise ValueError("`seconds` is required for a rolling window and only allowed there")
        if self.dimension in ("concurrency", "duration") and self.window != "total":
            raise ValueError(f"{self.dimension} limits have no window (use window: total)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {self.timezone!r}") from e
        return self

    @cached_property
    def value(self) -> int:
        """The limit in internal units: nano-USD for cost, else tokens/requests/seconds."""
        return usd_to_nano(str(self.limit)) if self.dimension == "cost" else int(self.limit)

    @cached_property
    def window_id(self) -> str:
        """The window's shape, part of the counter key: `total`, `day@Europe/Paris`, `roll3600s`."""
        if self.window == "rolling":
            return f"roll{self.seconds}s"
        if self.window == "total":
            return "total"
        return f"{self.window}@{self.timezone}"


SCOPES = ("org", "team", "key", "user", "run")


class BudgetSpec(_Frozen):
    """Limits for one scope. Without `id` it applies to every instance of the scope
    (each key, each team…); with `id`, to that instance only."""

    scope: str = Field(description="org | team | key | user | run | label:<name>")
    id: str | None = None
    limits: tuple[LimitSpec, ...] = Field(min_length=1)
    mode: Mode | None = None

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str) -> str:
        if v not in SCOPES and not re.match(r"^label:[A-Za-z0-9_.-]+$", v):
            raise ValueError(f"scope must be one of {', '.join(SCOPES)} or label:<name>")
        return v

    @cached_property
    def counter_scope(self) -> str:
        """The scope part of this budget's counter keys. A budget for one instance (`id`)
        counts on its own counters (`key@id:alice|…`), never on those of the budget for
        every instance (`key:alice|…`): both limits hold, each counts a call once.
        Derived from the spec alone, so stable across restarts and reloads."""
        return self.scope if self.id is None else f"{self.scope}@id"


class EscalationSpec(_Frozen):
    """Past `threshold` of a run's cost limit, a call asking for a model pricier than
    any the run has used so far is downshifted to a model the run used (or refused)."""

    threshold: Decimal = Field(gt=0, lt=1)
    action: Literal["downshift", "refuse"] = "downshift"


class RunsSpec(_Frozen):
    """Runs: one autonomous session's limits (README "Runs"), nested runs and retries."""

    headers: tuple[str, ...] = ("x-run-id",)
    ttl_seconds: int = Field(3600, gt=0)
    max_active_per_principal: int = Field(100, gt=0)
    limits: tuple[LimitSpec, ...] = ()
    # nested runs: the parent from a header, or W3C baggage members (run and parent run)
    parent_headers: tuple[str, ...] = ("x-parent-run-id",)
    baggage_run: str | None = "budget.run"
    baggage_parent: str | None = "budget.parent_run"
    max_depth: int = Field(4, ge=0, le=16, description="ancestors a run may have (0: no nesting)")
    # retries: an attempt's retry count from a header (the official SDKs send x-stainless-retry-count),
    # or the attempts of one idempotency key in the run
    retry_headers: tuple[str, ...] = ("x-stainless-retry-count",)
    idempotency_header: str | None = "idempotency-key"
    max_attempts_per_call: int | None = Field(None, gt=0, description="attempts of one call (first + retries)")
    escalation: EscalationSpec | None = None

    @field_validator("headers", "parent_headers", "retry_headers")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in v)

    @field_validator("idempotency_header")
    @classmethod
    def _lower_one(cls, v: str | None) -> str | None:
        return v.lower() if v else v


class PrincipalSpec(_Frozen):
    """A principal known by name: resolved from a trusted header or an mTLS peer identity."""

    name: str = Field(pattern=r"^[A-Za-z0-9._@:-]+$")
    team: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    org: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    user: str | None = Field(None, pattern=r"^[A-Za-z0-9._@:-]+$")
    labels: dict[str, str] = {}
    peer_ids: tuple[str, ...] = Field((), description="mTLS peer URI SANs (e.g. SPIFFE ids) that are this principal")


class IdentitySpec(_Frozen):
    """Where the principal comes from, in order: API key map, trusted header, mTLS peer.

    A header is trusted only when `edge_strips_headers` says the Envoy edge
    removes client copies of it (the shipped configs do), else it is ignored.
    """

    api_keys: bool = True
    principal_header: str | None = "x-extproc-principal"
    edge_strips_headers: bool = False
    mtls_peer: bool = False

    @field_validator("principal_header")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v


class Decisions(_Frozen):
    """How decisions may change a request instead of refusing it."""

    downshift: bool = True  # past a soft threshold or when the model does not fit, use a cheaper capable model
    output_clamp: bool = False  # lower max output to what fits instead of refusing
    min_clamped_output_tokens: int = Field(64, gt=0)
    budget_path: str = "/v1/budget"
    route_header: str = "x-extproc-model"  # set to the selected model; Envoy routes on it


class InputsSpec(_Frozen):
    """Worst-case input tokens of what is not text (see estimate.py `media_tokens`).

    Images of known pixel size are priced by the provider's formula; the rest by
    these numbers. Per-KiB rates apply to the decoded bytes of inline data. A part
    of unknown size (a URL, an uploaded file id) and a Responses call continuing a
    stored conversation (`previous_response_id`) are refused with a 400 unless a
    worst case is set here: a gate that guesses low lets spending through.
    """

    image_tokens: int = Field(
        1640, ge=0, le=1_000_000,
        description="an image whose pixel size is unknown (URL, file id, unreadable header): the most one image costs "
        "(OpenAI tiles: 1445 at 768x2048; Anthropic: ~1,640 at its largest unresized size)",
    )  # fmt: skip
    audio_tokens_per_kib: int = Field(
        32, ge=0, le=1_000_000,
        description="inline audio: at most 32 tokens per second (Gemini; OpenAI ~10) at 8 kbit/s (1 KB/s, the lowest common MP3 rate)",
    )  # fmt: skip
    file_tokens_per_kib: int = Field(
        2048, ge=0, le=1_000_000,
        description="inline files (PDF, text): text has at most 1024 tokens per KiB (a token is at least a byte); "
        "a compressed PDF page (~1.5 KiB) is billed as its text and a page image (~3,000 tokens)",
    )  # fmt: skip
    document_tokens_per_kib: int = Field(2048, ge=0, le=1_000_000, description="inline Anthropic documents (PDF): as files")
    unsized_part_tokens: int | None = Field(
        None, ge=0, le=100_000_000,
        description="audio/file/document given by URL or file id, size unknown: reserved per part; unset = refuse such requests",
    )  # fmt: skip
    previous_response_tokens: int | None = Field(
        None, ge=0, le=100_000_000,
        description="Responses `previous_response_id` (a stored conversation, unseen): reserved per call; unset = refuse such requests",
    )  # fmt: skip


class WebhookSpec(_Frozen):
    """Where threshold alerts go. `slack`: a Slack incoming-webhook body ({"text": ...});
    `signed`: the alert as JSON with `x-extproc-signature: sha256=<hex>`, the HMAC-SHA256
    of the body under a secret read (at each delivery) from `secret_file` or `secret_env`."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    kind: Literal["slack", "signed"] = "signed"
    secret_file: str | None = None
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_seconds: Decimal = Field(Decimal("5"), gt=0, le=60)

    @model_validator(mode="after")
    def _check(self) -> WebhookSpec:
        sources = (self.secret_file is not None) + (self.secret_env is not None)
        if self.kind == "signed" and sources != 1:
            raise ValueError("a signed webhook needs exactly one of secret_file or secret_env")
        if self.kind == "slack" and sources:
            raise ValueError("a slack webhook is not signed: remove secret_file / secret_env")
        return self


class AlertsSpec(_Frozen):
    """Threshold alerts: each cost limit (of `scopes`, default every scope) alerts once
    per threshold per period (calendar bucket; once ever for total windows) when its
    settled spend reaches threshold × limit. Rolling windows do not alert here (their
    spend falls again); the PrometheusRule covers them from the metrics."""

    thresholds: tuple[Decimal, ...] = (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))
    webhooks: tuple[WebhookSpec, ...] = ()
    scopes: tuple[str, ...] | None = Field(
        None, description="scopes whose cost limits alert (org, team, key, user, run, label:<name>); null = all"
    )
    attempts: int = Field(6, ge=1, le=20, description="deliveries tried per webhook before giving up")
    backoff_seconds: Decimal = Field(Decimal("1"), gt=0, le=600, description="first retry delay; doubles per attempt")

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
        for t in v:
            if not 0 < t <= 1:
                raise ValueError(f"alert threshold {t} is not in (0, 1]: a fraction of the limit")
        if len(set(v)) != len(v):
            raise ValueError("alert thresholds repeat a value")
        return tuple(sorted(v))

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for scope in v or ():
            BudgetSpec._scope(scope)
        return v


class StreamingSpec(_Frozen):
    """Right-sized reservations for calls the service sees stream (engine/growth.py).

    A streamed call reserves its input plus an *expected* output: the
    `history_percentile` of what this principal's last `history_calls` calls
    of the model produced (once `min_history` are known), else the model's
    `expected_output_tokens`, else the worst case; never more than the call's
    own cap. As output passes, the reservation grows in steps of at least
    `extend_step_tokens` (or a quarter of what is reserved, whichever is larger)
    before the chunk that needs it is released; when a step does not fit the
    stream ends cleanly in the API's terms. `admission_headroom` keeps room for
    the calls already streaming: a new call is admitted only if its budget also
    has `admission_headroom` times its expected output left beyond it.
    """

    right_size: bool = True
    history_calls: int = Field(20, ge=1, le=1000)
    history_percentile: int = Field(95, ge=50, le=100)
    min_history: int = Field(3, ge=1, le=1000)
    extend_step_tokens: int = Field(256, ge=16, le=1_000_000)
    admission_headroom: Decimal = Field(Decimal("1"), ge=0, le=100)


class Enforcement(_Frozen):
    mode: Mode = Mode.HARD_GATE
    soft_gate_margin: Decimal = Field(Decimal("0.1"), ge=0, le=10)


class Policy(_Frozen):
    version: Literal[1] = 1
    prices: PriceTable
    keys: tuple[KeySpec, ...] = ()
    principals: tuple[PrincipalSpec, ...] = ()
    identity: IdentitySpec = IdentitySpec()
    decisions: Decisions = Decisions()
    self_hosted: SelfHostedSpec = SelfHostedSpec()
    budgets: tuple[BudgetSpec, ...] = ()
    runs: RunsSpec = RunsSpec()
    enforcement: Enforcement = Enforcement()
    streaming: StreamingSpec = StreamingSpec()
    alerts: AlertsSpec | None = Field(None, description="threshold alerts to webhooks (see engine/alerts.py)")
    failure_mode: Literal["fail_closed", "fail_open"] = "fail_closed"
    reservation_ttl_seconds: int = Field(600, gt=0, le=86400)
    ledger_retention_days: int | None = Field(
        90, ge=1, le=36500, description="ledger entries older than this are trimmed by the reaper (export first); null keeps them forever"
    )
    fallback_output_tokens: int = Field(4096, gt=0)
    inputs: InputsSpec = InputsSpec()
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    routes: tuple[RouteSpec, ...] = Field((), description="matched before the defaults, in order (see policy/routes.py)")
    default_routes: bool = Field(True, description="append extproc's shipped routes after `routes`")
    deployments: dict[str, str] = Field({}, description="Azure-style deployment name -> priced model")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: object) -> object:
        """The top-level `image_tokens` of older policies is `inputs.image_tokens`."""
        if isinstance(data, dict) and "image_tokens" in data:
            inputs = data.get("inputs") or {}
            if isinstance(inputs, dict):
                if "image_tokens" in inputs:
                    raise ValueError(
                        "image_tokens is set both at the top level (the old place) and in inputs; keep only inputs.image_tokens"
                    )
                data = {k: v for k, v in data.items() if k != "image_tokens"} | {"inputs": {**inputs, "image_tokens": data["image_tokens"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Policy:
        seen: set[str] = set()
        for k in self.keys:
            if k.sha256 in seen:
                raise ValueError(f"duplicate API key sha256 {k.sha256[:12]}…")
            seen.add(k.sha256)
        for name, m in self.prices.models.items():
            for target in m.downshift_to:
                if target not in self.prices.models:
                    raise ValueError(f"model {name!r} downshifts to {target!r}, which has no price")
        if self.prices.default_model is not None and self.prices.default_model not in self.prices.models:
            raise ValueError(f"prices.default_model {self.prices.default_model!r} has no price")
        self.self_hosted.check_models_priced(self.prices.models)
        for name, target in self.deployments.items():
            if target not in self.prices.models:
                raise ValueError(f"deployment {name!r} maps to {target!r}, which has no price")
        names = [p.name for p in self.principals]
        if len(names) != len(set(names)):
            raise ValueError("duplicate principal names")
        self._check_counters()
        return self

    def _check_counters(self) -> None:
        """Two limits on one counter would count every call twice on it: refuse them.

        A counter is (counter scope, instance, dimension, window shape); `runs.limits`
        is a budget of scope run. A budget with an `id` has its own counters, apart
        from those of the same scope without one (BudgetSpec.counter_scope)."""
        budgets = [(f"budgets[{i}]", b) for i, b in enumerate(self.budgets)]
        if self.runs.limits:
            budgets.append(("runs", BudgetSpec(scope="run", limits=self.runs.limits)))
        owners: dict[tuple[str, str | None, str, str], str] = {}
        for name, b in budgets:
            for j, lim in enumerate(b.limits):
                # run budgets apply to every run whatever their id (the engine ignores it)
                counter = (b.counter_scope, b.id if b.scope != "run" else None, lim.dimension, lim.window_id)
                here = f"{name}.limits[{j}]"
                first = owners.setdefault(counter, here)
                if first != here:
                    who = f"{b.scope} {b.id}" if b.id is not None else f"every {b.scope}"
                    raise ValueError(
                        f"{first} and {here} both limit {lim.dimension} over window {lim.window_id} for {who}: "
                        "they would share one counter and count every call twice on it; merge them into one limit"
                    )

    def model(self, name: str) -> ModelSpec | None:
        """The price entry for `name`, else the policy's default model, else None (refuse)."""
        spec = self.prices.models.get(name)
        if spec is None and self.prices.default_model:
            return self.prices.models[self.prices.default_model]
        return spec

    @cached_property
    def route_table(self) -> RouteTable:
        return RouteTable(self.routes + (default_routes() if self.default_routes else ()))

    @cached_property
    def principals_by_name(self) -> dict[str, PrincipalSpec]:
        return {p.name: p for p in self.principals}

    @cached_property
    def principals_by_peer(self) -> dict[str, PrincipalSpec]:
        return {peer: p for p in self.principals for peer in p.peer_ids}

    @cached_property
    def keys_by_hash(self) -> dict[str, KeySpec]:
        return {k.sha256: k for k in self.keys}

    @cached_property
    def _seen_keys(self) -> dict[str, KeySpec | None]:
        return {}

    def key_spec(self, api_key: str) -> KeySpec | None:
        """The entry of a presented API key (hashing each distinct key once per policy)."""
        seen = self._seen_keys
        try:
            return seen[api_key]
        except KeyError:
            if len(seen) >= 10_000:  # bounded: unknown keys from a scanner must not grow it forever
                seen.clear()
            spec = seen[api_key] = self.keys_by_hash.get(KeySpec.hash_key(api_key))
            return spec
