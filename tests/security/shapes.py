"""Every shipped deployment shape, each in front of either backend, as one running stack.

A target is Envoy in its shape plus the backend; the extproc service it calls is started
apart (`start_service`), so one service can answer every shape that reaches it the same way.

Shapes (the Envoy config the operator ships, with its addresses rewritten by `Stack`):
  gateway    envoy/envoy.yaml: front gateway, service over TCP, clusters backend/backend_small
  sidecar    envoy/sidecar.yaml: the pod sidecar, service over a Unix socket, cluster local_app
  ext_authz  envoy/ext_authz.yaml: the header-only gate, cluster backend
  istio      an Istio inbound sidecar listener with Istio's HCM defaults and
             deploy/istio/envoyfilter.yaml's patches applied (see `istio_like_config`)
Backends:
  mock       `extproc mock-backend` (aiohttp)
  vllm       tests/security/vllm_like.py (FastAPI/uvicorn, routes like vLLM's server)

Requests go out raw (`http.client`, the path exactly as written: no client-side
normalisation), so what Envoy, the service and the backend each make of a path
is what is tested.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import http.client
import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.stack import Stack
from extproc.stores.base import LedgerEntry
from tests.deploy.conftest import EXT_PROC, ROOT, hcm, http_filter
from tests.deploy.test_istio import istio_bootstrap
from tests.integration.conftest import open_store

ATTACKER_KEY, VICTIM_KEY = "sk-sec-attacker", "sk-sec-victim"
ATTACKER, VICTIM = "attacker", "victim"
MODEL = "gpt-4o-mini"
RESERVATION_TTL_S = 5


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# A key each for two principals in one org (one budget tree: their reservation ids
# share a namespace), a team and a cost budget each, and a header identity for the
# victim that only a trusted edge may assert.
POLICY = f"""
version: 1
prices:
  version: sec-1
  models:
    {MODEL}: {{ input: "0.15", output: "0.60", output_limit: 16384, context_window: 128000 }}
keys:
  - {{ sha256: {sha(ATTACKER_KEY)}, principal: {ATTACKER}, team: red, org: acme }}
  - {{ sha256: {sha(VICTIM_KEY)}, principal: {VICTIM}, team: blue, org: acme }}
principals:
  - {{ name: {VICTIM}, team: blue, org: acme }}
identity:
  principal_header: x-extproc-principal
  edge_strips_headers: true
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "20.00" }}]
  - scope: team
    limits: [{{ dimension: cost, limit: "30.00" }}]
reservation_ttl_seconds: {RESERVATION_TTL_S}
"""

SHAPES = ("gateway", "sidecar", "ext_authz", "istio")
METERING_SHAPES = ("gateway", "sidecar", "istio")  # ext_proc: the ones that reserve and settle
# Envoy normalises the path (RFC 3986, "\\" -> "/") before any filter: every shipped shape sets
# normalize_path, and Istio's inbound listener does by default.
UPLOAD_CUT = 0  # Response.status when the connection was cut while the body was uploading
NORMALIZING_SHAPES = ("gateway", "sidecar", "ext_authz", "istio")
BACKENDS = ("mock", "vllm")
VLLM_LIKE = Path(__file__).with_name("vllm_like.py")
ISTIO_APP_CLUSTER = "inbound|8000||"

# backend -> (hit counter path, its JSON field, the header every answer of it carries)
_COUNTERS = {"mock": ("/stats", "hits", "x-mock-backend"), "vllm": ("/_hits", "total", "x-backend")}


def istio_like_config(dest: Path) -> Path:
    """An Istio inbound sidecar after deploy/istio/envoyfilter.yaml, as real Envoy config.

    tests/deploy/test_istio.py's `istio_bootstrap` builds the inbound listener and
    applies the EnvoyFilter's configPatches in order (LISTENER MERGE, CLUSTER MERGE,
    HTTP_FILTER INSERT_BEFORE the router). On top, Istio's own HCM defaults for an
    inbound listener: the peer is the mesh, not the client (use_remote_address false,
    so Envoy keeps the client's x-request-id), path normalisation BASE
    (normalize_path true, merge_slashes false, escaped slashes kept unchanged) and a
    catch-all route without a timeout. The gRPC cluster is renamed to `extproc` so
    `Stack` points it at the local service (TCP or Unix socket); ports are
    placeholders that `Stack` rewrites.
    """
    cfg = istio_bootstrap(listen_port=15006, admin_port=15000, app=("127.0.0.1", 8000), extproc=("127.0.0.1", 50051))
    h = hcm(cfg)
    h["use_remote_address"] = False
    h["normalize_path"] = True
    h["merge_slashes"] = False
    h.pop("path_with_escaped_slashes_action", None)
    for vh in h["route_config"]["virtual_hosts"]:
        for route in vh["routes"]:
            route["route"]["timeout"] = "0s"
    grpc = http_filter(h, EXT_PROC)["grpc_service"]["envoy_grpc"]
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == grpc["cluster_name"]]
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = grpc["cluster_name"] = "extproc"
    dest.write_text(yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False))
    return dest


def start_service(workdir: Path, *, unix: bool) -> Stack:
    """The extproc service alone (POLICY, its own store), for every shape that reaches it the same
    way: over TCP (gateway, ext_authz, istio) or over a Unix socket (sidecar)."""
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    service = Stack(policy=str(policy), store=f"sqlite:{workdir / 'budget.db'}", workdir=workdir / "service", backends=(),
                    grpc=f"unix:{workdir / 'extproc.sock'}" if unix else None)
    try:
        service.start_service()
    except Exception:
        print(f"--- extproc log ---\n{service.log('extproc')[-3000:]}")
        service.stop()
        raise
    return service


def build_stack(shape: str, backend: str, workdir: Path, service: Stack) -> Stack:
    """Envoy in `shape` in front of `backend`, calling the running `service` with its caller token."""
    workdir.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {}
    if backend == "vllm":
        kw.update(backend_command=(sys.executable, str(VLLM_LIKE), "--port", "{port}"), backend_ready_path="/health")
    if shape == "gateway":
        kw.update(envoy_config=str(ROOT / "envoy" / "envoy.yaml"))
    elif shape == "sidecar":
        kw.update(envoy_config=str(ROOT / "envoy" / "sidecar.yaml"), backends=("local_app",))
    elif shape == "ext_authz":
        kw.update(envoy_config=str(ROOT / "envoy" / "ext_authz.yaml"), backends=("backend",))
    elif shape == "istio":
        kw.update(envoy_config=str(istio_like_config(workdir / "istio-inbound.yaml")), backends=(ISTIO_APP_CLUSTER,))
    else:
        raise ValueError(shape)
    return Stack(policy=service.policy, store=service.store, grpc=service.grpc, caller_token=service.caller_token,
                 workdir=workdir / "stack", **kw)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def __str__(self) -> str:
        return f"{self.status} {self.body[:300]!r}"


@dataclass
class Target:
    """One running (shape, backend) stack and what the tests ask of it."""

    shape: str
    backend: str
    stack: Stack  # Envoy and the backend; `service` is the extproc service it calls
    service: Stack

    @property
    def meters(self) -> bool:
        return self.shape in METERING_SHAPES

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
                headers: dict[str, str] | None = None, *, key: str | None = None) -> Response:
        """One request through Envoy with the path sent byte for byte as given."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = {"content-type": "application/json", **(headers or {})}
        if key:
            hdrs["authorization"] = f"Bearer {key}"
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=60)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        except (ConnectionResetError, BrokenPipeError) as e:
            # Envoy answered (a refusal on the headers) and closed while a large body was
            # still uploading: status 0, "refused before the body was read".
            return Response(UPLOAD_CUT, {}, repr(e).encode())
        finally:
            conn.close()

    def direct(self, method: str, path: str) -> Response:
        """The same request straight to the backend, bypassing Envoy (what "forwarded" looks like)."""
        name = self.stack.backends[0]
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.backend_ports[name], timeout=10)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def hits(self) -> int:
        """Requests the backend(s) counted, asked directly (never through Envoy)."""
        path, field, _ = _COUNTERS[self.backend]
        total = 0
        for port in self.stack.backend_ports.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                total += json.loads(r.read())[field]
        return total

    def answered_by_backend(self, r: Response) -> bool:
        return _COUNTERS[self.backend][2] in r.headers

    async def ledger(self) -> list[LedgerEntry]:
        store = open_store(self.stack.store or "")
        try:
            return await store.ledger()
        finally:
            await store.close()

    async def new_charges(self, before: list[LedgerEntry], principal: str, *, expect: int = 1,
                          timeout: float = 3.0, charged: bool = True) -> list[LedgerEntry]:
        """Ledger entries written since `before` that charge `principal` money (with
        charged=False: any closed reservation of theirs, released ones too); waits for `expect`."""
        seen = {e.seq for e in before}
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            fresh = [e for e in await self.ledger() if e.seq not in seen and e.meta.get("principal") == principal
                     and (e.charged.get("cost", 0) > 0 or not charged)]
            if len(fresh) >= expect or asyncio.get_running_loop().time() > deadline:
                return fresh
            await asyncio.sleep(0.05)


def start_target(shape: str, backend: str, workdir: Path, service: Stack) -> Target:
    stack = build_stack(shape, backend, workdir, service)
    try:
        stack.start_backends()
        stack.start_envoy()
    except Exception:
        for name in ("envoy", *(f"mock-{b}" for b in stack.backends)):
            print(f"--- {name} log ---\n{stack.log(name)[-3000:]}")
        stack.stop()
        raise
    return Target(shape, backend, stack, service)


def chat_body(content: str = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": content}], **kw}
