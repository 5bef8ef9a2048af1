"""Issue 10, "No way around the meter": every attack through real Envoy, on every shipped shape.

Each test runs against every (shape, backend) stack of `tests/security/shapes.py`
(Envoy and the backend once per pair for the whole module, in front of one extproc service
per transport: TCP for gateway, ext_authz and istio, a Unix socket for the sidecar) and ends
by checking the books: the
ledger reconciles with the counters, nothing stays reserved past the reservation
TTL, and no budget is spent past its limit.

The rule for a request that tries to get around the meter is the same
everywhere: served (2xx) => charged to the caller; not charged => the backend
was not reached (its hit counter did not move and the answer is not the
backend's), unless the call was metered and released because the backend
refused it (a released ledger entry of the caller); only 2xx or 4xx, never a
5xx. A caller without a key is never served, and an encoded slash or a
backslash in the path is a 4xx.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from extproc.stack import Stack
from tests.deploy.conftest import envoy_validate
from tests.integration.reconcile import reconcile

from .shapes import (
    ATTACKER,
    ATTACKER_KEY,
    BACKENDS,
    METERING_SHAPES,
    MODEL,
    NORMALIZING_SHAPES,
    RESERVATION_TTL_S,
    SHAPES,
    UPLOAD_CUT,
    VICTIM,
    VICTIM_KEY,
    Response,
    Target,
    chat_body,
    istio_like_config,
    start_service,
    start_target,
)

pytestmark = pytest.mark.integration


def _ids(shapes: tuple[str, ...]) -> list[str]:
    return [f"{s}:{b}" for s in shapes for b in BACKENDS]


on_every_shape = pytest.mark.parametrize("target", _ids(SHAPES), indirect=True)
on_metering_shapes = pytest.mark.parametrize("target", _ids(METERING_SHAPES), indirect=True)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """The extproc service, started once per transport (TCP, Unix socket) for the module: every
    target calls one of them, so the books each test checks are the service's whole books."""
    started: dict[bool, Stack] = {}

    def get(shape: str) -> Stack:
        unix = shape == "sidecar"
        if unix not in started:
            started[unix] = start_service(tmp_path_factory.mktemp("sec-unix" if unix else "sec-tcp"), unix=unix)
        return started[unix]

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def target(request, tmp_path_factory, services):
    shape, backend = request.param.split(":")
    t = start_target(shape, backend, tmp_path_factory.mktemp(f"sec-{shape}-{backend}"), services(shape))
    yield t
    t.stack.stop()


async def books(t: Target) -> None:
    await reconcile(t.stack, timeout=RESERVATION_TTL_S + 5, within_limits=True)


def logs(t: Target) -> str:
    return f"--- envoy ---\n{t.stack.log('envoy')[-1500:]}\n--- extproc ---\n{t.service.log('extproc')[-1500:]}"


# --------------------------------------------------------------------------- paths

# (method, path): spellings of a metered endpoint, and the backend's other inference routes.
ATTACKS: list[tuple[str, str]] = [
    ("POST", "/v1/chat/completion%73"),
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/v1/chat%2fcompletions"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/./chat/completions"),
    ("POST", "/v1/x/../chat/completions"),
    ("POST", "/v1/x/%2e%2e/chat/completions"),
    ("POST", "/V1/Chat/Completions"),
    ("POST", "/v1/chat/completions;a=b"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
    ("POST", "/v1/embedding%73"),
    ("POST", "/invocations"),
    ("POST", "/v1/rerank"),
    ("POST", "/pooling"),
    ("POST", "/score"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1\\chat\\completions"),
    ("POST", "/v1/chat%5Ccompletions"),
    ("POST", "/v1/chat%252Fcompletions"),
    ("PUT", "/v1/chat/completions"),
    ("POST", "http://inference.local/v1/chat/completion%73"),  # absolute-form request target
]
# An encoded slash or backslash has no honest use in an inference path: always refused.
ALWAYS_4XX = ("%2F", "%2f", "\\", "%5C")


def must_refuse(t: Target, path: str) -> bool:
    """Encoded slash or backslash. Where Envoy normalises paths (Istio's normalize_path) a bare
    backslash is already a "/" before any filter runs: the service sees the plain path, and
    the general rule (metered or refused) is what can hold there."""
    if t.shape in NORMALIZING_SHAPES:
        return any(s in path for s in ALWAYS_4XX if s != "\\")
    return any(s in path for s in ALWAYS_4XX)


def body_for_any_api() -> dict[str, Any]:
    """One JSON body every OpenAI-style endpoint accepts (chat, completions, pooling, rerank...)."""
    return {**chat_body(), "prompt": "hi", "input": "hi", "query": "hi", "documents": ["a"], "text_1": "a", "text_2": "b"}


@on_every_shape
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "key"])
@pytest.mark.parametrize("method,path", ATTACKS, ids=[f"{m} {p}" for m, p in ATTACKS])
async def test_no_path_around_the_meter(target: Target, method: str, path: str, keyed: bool):
    before, hits = await target.ledger(), target.hits()
    r = target.request(method, path, body_for_any_api(), key=ATTACKER_KEY if keyed else None)
    served = 200 <= r.status < 300
    entries = await target.new_charges(before, ATTACKER, charged=False, timeout=0.5 if served else 0.0) if keyed else []
    charged = any(e.charged.get("cost", 0) > 0 for e in entries)
    reached = target.hits() > hits or target.answered_by_backend(r)
    where = f"{method} {path} on {target.shape}/{target.backend}: {r}"

    assert r.status < 500, f"5xx: {where}"
    assert served or 400 <= r.status < 500, f"neither served nor refused: {where}"
    assert not (served and not keyed), f"served without an API key: {where}"
    assert not served or charged, f"served, nothing charged to the caller: {where}"
    # Not charged => not reached, unless it was metered and released (the backend refused it).
    assert charged or bool(entries) or not reached, f"reached the backend without a reservation: {where}"
    if must_refuse(target, path):
        assert 400 <= r.status < 500, f"encoded slash/backslash not refused: {where}"
    await books(target)


# --------------------------------------------------------------------------- listed unmetered routes


@on_every_shape
async def test_models_without_key_is_401_and_not_forwarded(target: Target):
    hits = target.hits()
    r = target.request("GET", "/v1/models")
    assert r.status == 401, str(r)
    assert not target.answered_by_backend(r) and target.hits() == hits
    await books(target)


@on_every_shape
@pytest.mark.parametrize("path,key", [("/v1/models", ATTACKER_KEY), ("/health", None)],
                         ids=["models-with-key", "health-public"])
async def test_listed_route_is_forwarded_as_the_backend_answers_it(target: Target, path: str, key: str | None):
    direct = target.direct("GET", path)
    r = target.request("GET", path, key=key)
    assert target.answered_by_backend(r) and r.status == direct.status, str(r)
    if target.backend == "vllm":  # it has both routes
        assert r.status == 200
    await books(target)


# --------------------------------------------------------------------------- reservation ids


@on_metering_shapes
async def test_one_client_request_id_eight_calls_eight_charges(target: Target):
    before = await target.ledger()
    rid = f"sec-{uuid.uuid4().hex}"
    for _ in range(8):
        r = target.request("POST", "/v1/chat/completions", chat_body(), {"x-request-id": rid}, key=ATTACKER_KEY)
        assert r.status == 200, str(r)
    charges = await target.new_charges(before, ATTACKER, expect=8)
    assert len(charges) == 8, [(e.reservation_id, e.outcome, e.charged) for e in charges]
    assert len({e.reservation_id for e in charges}) == 8
    await books(target)


@on_metering_shapes
async def test_reusing_another_principals_request_id_charges_the_caller(target: Target):
    before = await target.ledger()
    r = target.request("POST", "/v1/chat/completions", chat_body("victim's call"),
                       {"x-request-id": f"sec-{uuid.uuid4().hex}"}, key=VICTIM_KEY)
    assert r.status == 200, str(r)
    (victim,) = await target.new_charges(before, VICTIM)

    middle = await target.ledger()
    r = target.request("POST", "/v1/chat/completions", chat_body("attacker " * 500, max_tokens=200),
                       {"x-request-id": victim.reservation_id}, key=ATTACKER_KEY)
    assert r.status == 200, str(r)
    assert len(await target.new_charges(middle, ATTACKER)) == 1, "the attacker's call was not charged to the attacker"
    after = await target.ledger()
    assert not [e for e in after if e.seq not in {m.seq for m in middle} and e.meta.get("principal") == VICTIM]
    (same,) = [e for e in after if e.seq == victim.seq]
    assert same.charged == victim.charged
    await books(target)


# --------------------------------------------------------------------------- forged identity


@on_every_shape
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "attacker-key"])
async def test_forged_principal_header_draws_nothing_from_the_victim(target: Target, keyed: bool):
    before = await target.ledger()
    r = target.request("POST", "/v1/chat/completions", chat_body(), {"x-extproc-principal": VICTIM},
                       key=ATTACKER_KEY if keyed else None)
    assert r.status < 500, str(r)
    if not keyed:  # ext_authz refuses a metered route before identity: it cannot meter it
        assert r.status == (403 if target.shape == "ext_authz" else 401), str(r)
    assert await target.new_charges(before, VICTIM, timeout=0.2) == []
    await books(target)


# --------------------------------------------------------------------------- hostile bodies

HOSTILE: dict[str, Any] = {
    "8MB-one-letter-prompt": lambda: chat_body("a" * 8_000_000),
    "150k-tiny-messages": lambda: {"model": MODEL, "max_tokens": 16,
                                   "messages": [{"role": "user", "content": "hello world"}] * 150_000},
    "1M-consecutive-spaces": lambda: chat_body("x" + " " * 1_000_000 + "x"),
}


def still_serving(t: Target) -> tuple[bool, Response]:
    """A normal call right after: served (an inference call where the shape meters, else a
    listed route answered as the backend answers it)."""
    if t.meters:
        r = t.request("POST", "/v1/chat/completions", chat_body(), key=ATTACKER_KEY)
        return r.status == 200, r
    r = t.request("GET", "/v1/models", key=ATTACKER_KEY)
    return t.answered_by_backend(r) and r.status == t.direct("GET", "/v1/models").status, r


@on_every_shape
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_body_is_refused_or_metered(target: Target, name: str):
    before = await target.ledger()
    r = target.request("POST", "/v1/chat/completions", HOSTILE[name](), key=ATTACKER_KEY)
    served = 200 <= r.status < 300
    charged = bool(await target.new_charges(before, ATTACKER, timeout=0.5 if served else 0.0))
    after = await target.ledger()
    ok, nxt = still_serving(target)  # asked before judging, so a failure shows both answers
    where = f"{name} on {target.shape}/{target.backend}: {r}; the next normal call: {nxt}"

    assert r.status < 500, f"{where}\n{logs(target)}"
    assert served or 400 <= r.status < 500 or r.status == UPLOAD_CUT, where
    assert not served or charged, f"served, nothing charged: {where}"
    assert ok, f"the service stopped serving: {where}"
    if target.meters:
        assert await target.new_charges(after, ATTACKER), f"the next normal call was not charged: {where}"
    await books(target)


# --------------------------------------------------------------------------- the Istio-like shape itself


def test_istio_like_config_validates(tmp_path):
    envoy_validate(istio_like_config(tmp_path / "istio-inbound.yaml"))
