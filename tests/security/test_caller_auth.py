"""Issue 10: only the operator's Envoys may call the service.

A real `extproc serve` process and a real grpc.aio client speaking ext_proc and
ext_authz the way an attacker's pod would: without the caller token, with a
wrong one, with a forged mTLS peer attribute. What the store holds afterwards
is read back through the service's own admin API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as az
from envoy.service.auth.v3 import external_auth_pb2_grpc as azg
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from google.protobuf import struct_pb2
from google.rpc import code_pb2

from extproc.server.callers import CALLER_TOKEN_KEY
from extproc.server.tokens import PLACEHOLDER
from extproc.stack import die_with_parent, free_port, stop_process, wait_connect

pytestmark = pytest.mark.integration

VICTIM_KEY = "sk-victim"
VICTIM_PEER = "spiffe://acme/victim-agent"
POLICY = f"""
version: 1
prices:
  models:
    gpt-4o-mini: {{ input: "0.15", output: "0.60", output_limit: 4096 }}
keys:
  - {{ sha256: {hashlib.sha256(VICTIM_KEY.encode()).hexdigest()}, principal: victim, team: t, org: o }}
principals:
  - {{ name: victim-agent, team: t, org: o, peer_ids: ["{VICTIM_PEER}"] }}
identity:
  mtls_peer: true
  edge_strips_headers: true
routes:  # what ext_authz gates (it meters nothing, so metered routes are ext_proc's)
  - {{ path: /dispatch, action: unmetered }}
budgets:
  - scope: key
    limits: [{{ dimension: cost, limit: "1.00" }}]
runs:
  headers: [x-run-id]
  limits: [{{ dimension: requests, limit: 5 }}]
"""
ADMIN_TOKEN = "admin-secret-for-tests"
CHAT = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
}


@dataclass
class Service:
    proc: subprocess.Popen[Any]
    grpc: str
    admin: str
    log: Path

    def admin_get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(f"http://{self.admin}{path}", params=params, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)

    def ledger(self) -> list[dict[str, Any]]:
        r = self.admin_get("/admin/ledger")
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line]

    def run_state(self, principal: str, run: str) -> dict[str, Any] | None:
        r = self.admin_get("/admin/budgets", principal=principal, run=run)
        assert r.status_code == 200, r.text
        return r.json().get("run_state")


def start_serve(tmp_path: Path, *args: str, grpc_addr: str | None = None) -> tuple[subprocess.Popen[Any], str, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    grpc_addr = grpc_addr or f"127.0.0.1:{free_port()}"
    log = tmp_path / "extproc.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(policy), "--store", f"sqlite:{tmp_path / 'b.db'}",
         "--grpc", grpc_addr, *args],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "EXTPROC_ADMIN_TOKEN": ADMIN_TOKEN}, preexec_fn=die_with_parent,
    )
    return proc, grpc_addr, log


def _serve(tmp_path: Path, procs: list[subprocess.Popen[Any]], *args: str, grpc_addr: str | None = None) -> Service:
    admin = f"127.0.0.1:{free_port()}"
    proc, addr, log = start_serve(tmp_path, "--admin", admin, *args, grpc_addr=grpc_addr)
    procs.append(proc)
    try:
        wait_connect(addr, 30, proc)
        wait_connect(admin, 30, proc)
    except Exception:
        print(log.read_text())
        raise
    return Service(proc, addr, admin, log)


@pytest.fixture
def serve(tmp_path):
    procs: list[subprocess.Popen[Any]] = []
    yield lambda *args, grpc_addr=None: _serve(tmp_path, procs, *args, grpc_addr=grpc_addr)
    for p in procs:
        stop_process(p)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One service whose caller token is "right-token", for the tests that change nothing in
    it but their own calls (each names its own request and run ids, and compares the books
    with what they were before it)."""
    procs: list[subprocess.Popen[Any]] = []
    d = tmp_path_factory.mktemp("guarded")
    yield _serve(d, procs, "--caller-token-file", str(token_file(d, "right-token")))
    for p in procs:
        stop_process(p)


def token_file(tmp_path: Path, *tokens: str, name: str = "caller-token") -> Path:
    path = tmp_path / name
    path.write_text("".join(t + "\n" for t in tokens))
    return path


def rotate(path: Path, *tokens: str) -> None:
    """Replace the file the way a Secret volume does: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text("".join(t + "\n" for t in tokens))
    os.replace(tmp, path)


def headers_msg(headers: dict[str, str], *, peer: str | None = None) -> ep.ProcessingRequest:
    req = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]),
            end_of_stream=False,
        )
    )
    if peer is not None:
        attrs = struct_pb2.Struct()
        attrs.update({"connection.uri_san_peer_certificate": peer})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


def chat_headers(rid: str, **extra: str) -> dict[str, str]:
    return {":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json", "x-request-id": rid, **extra}


def dispatch_headers(rid: str, **extra: str) -> dict[str, str]:
    return {**chat_headers(rid, **extra), ":path": "/dispatch"}


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else ((CALLER_TOKEN_KEY, token),)


async def metered_call(addr: str, token: str | None, rid: str, run: str) -> list[ep.ProcessingResponse]:
    """One whole ext_proc exchange for a metered chat completion, as Envoy sends it."""
    msgs = [
        headers_msg(chat_headers(rid, authorization=f"Bearer {VICTIM_KEY}", **{"x-run-id": run})),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=json.dumps(CHAT).encode(), end_of_stream=True)),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"200"),
            base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
        ]))),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=json.dumps(ANSWER).encode(), end_of_stream=True)),
    ]
    out = []
    async with grpc.aio.insecure_channel(addr) as ch:
        call = epg.ExternalProcessorStub(ch).Process(metadata=metadata(token))
        for m in msgs:
            await call.write(m)
            resp = await call.read()
            out.append(resp)
            if resp.HasField("immediate_response"):
                break
        await call.done_writing()
    return out


async def refused_with(addr: str, token: str | None, wait: float = 10.0) -> grpc.StatusCode | None:
    """How the server ends a Process call it refuses, before anything is sent (a refused
    caller is aborted at once; writing first would race that abort). None: still open."""
    async with grpc.aio.insecure_channel(addr) as ch:
        call = epg.ExternalProcessorStub(ch).Process(metadata=metadata(token))
        try:
            return await asyncio.wait_for(call.code(), wait)
        except TimeoutError:
            call.cancel()
            return None


async def first_reply(addr: str, token: str | None, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
    async with grpc.aio.insecure_channel(addr) as ch:
        call = epg.ExternalProcessorStub(ch).Process(metadata=metadata(token))
        await call.write(msg)
        resp = await call.read()
        await call.done_writing()
        return resp


async def check(addr: str, token: str | None, headers: dict[str, str], *, principal: str = "") -> az.CheckResponse:
    req = az.CheckRequest()
    req.attributes.source.principal = principal
    req.attributes.request.http.path = headers[":path"]
    req.attributes.request.http.method = headers[":method"]
    req.attributes.request.http.headers.update({k: v for k, v in headers.items() if not k.startswith(":")})
    async with grpc.aio.insecure_channel(addr) as ch:
        return await azg.AuthorizationStub(ch).Check(req, metadata=metadata(token), timeout=10)


async def settled(svc: Service, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Settlement runs after the stream closes: wait for `n` ledger entries."""
    deadline = time.monotonic() + timeout
    while True:
        entries = svc.ledger()
        if len(entries) >= n or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


@pytest.mark.parametrize("token", [None, "not-the-token", PLACEHOLDER], ids=["no-token", "wrong-token", "placeholder"])
async def test_a_caller_without_the_token_is_refused_before_the_store_is_touched(guarded, token):
    svc = guarded  # each case refuses once per API with its own reason, and names its own ids
    reason = {None: "missing", "not-the-token": "wrong", PLACEHOLDER: "placeholder"}[token]
    ledger_before = svc.ledger()
    budgets_before = svc.admin_get("/admin/budgets", principal="victim").json()["budgets"]

    assert await refused_with(svc.grpc, token) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as refused_authz:
        await check(svc.grpc, token, dispatch_headers(f"rid-2-{reason}", authorization=f"Bearer {VICTIM_KEY}", **{"x-run-id": f"run-2-{reason}"}))
    assert refused_authz.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # nothing was reserved, charged or created for the victim
    assert svc.ledger() == ledger_before
    assert svc.run_state("victim", f"run-2-{reason}") is None
    budgets = svc.admin_get("/admin/budgets", principal="victim").json()["budgets"]
    assert budgets == budgets_before
    assert all(b["reserved"] == "0" for b in budgets), budgets

    # the same exchange with the right token is metered: the refusal above was the token's doing
    replies = await metered_call(svc.grpc, "right-token", f"rid-3-{reason}", f"run-3-{reason}")
    assert not any(r.HasField("immediate_response") for r in replies)
    (entry,) = (await settled(svc, len(ledger_before) + 1))[len(ledger_before):]
    assert entry["principal"] == "victim"
    assert svc.run_state("victim", f"run-3-{reason}") is not None
    ok = await check(svc.grpc, "right-token", dispatch_headers(f"rid-4-{reason}", authorization=f"Bearer {VICTIM_KEY}"))
    assert ok.status.code == code_pb2.OK
    metrics = httpx.get(f"http://{svc.admin}/metrics", timeout=10).text
    assert f'extproc_grpc_callers_refused_total{{reason="{reason}"}} 2.0' in metrics


async def test_the_token_file_rotates_without_a_restart(serve, tmp_path):
    path = token_file(tmp_path, "old-token")
    svc = serve("--caller-token-file", str(path))
    probe = headers_msg(chat_headers("r", authorization=f"Bearer {VICTIM_KEY}"))
    assert (await first_reply(svc.grpc, "old-token", probe)).HasField("request_headers")

    rotate(path, "old-token", "new-token")  # overlap: both Envoys generations work
    deadline = time.monotonic() + 10
    while True:
        if await refused_with(svc.grpc, "new-token", wait=0.5) is None:  # accepted: left open
            break
        assert time.monotonic() < deadline, "the new token is not accepted"
        time.sleep(0.2)
    assert (await first_reply(svc.grpc, "old-token", probe)).HasField("request_headers")

    rotate(path, "new-token")  # the old token is retired
    deadline = time.monotonic() + 10
    while True:
        if await refused_with(svc.grpc, "old-token", wait=0.5) == grpc.StatusCode.UNAUTHENTICATED:
            break
        assert time.monotonic() < deadline, "the retired token is still accepted"
        time.sleep(0.2)
    assert (await first_reply(svc.grpc, "new-token", probe)).HasField("request_headers")
    assert svc.proc.poll() is None  # same process throughout
    assert "re-read: 2 token(s)" in svc.log.read_text()


async def test_forged_envoy_identity_counts_only_on_an_authenticated_stream(serve, guarded):
    """An admitted but unauthenticated stream (--allow-unauthenticated-callers) cannot name a
    principal through the mTLS peer attribute or the trusted principal header; an
    authenticated one (Envoy with the token) can."""
    open_svc = serve("--allow-unauthenticated-callers")
    forged_peer = headers_msg(chat_headers("f1"), peer=VICTIM_PEER)
    forged_header = headers_msg(chat_headers("f2", **{"x-extproc-principal": "victim-agent"}))
    for msg in (forged_peer, forged_header):
        resp = await first_reply(open_svc.grpc, None, msg)
        assert resp.immediate_response.status.code == 401
        assert json.loads(resp.immediate_response.body)["error"]["code"] == "invalid_api_key"
    # the budget endpoint (GET /v1/budget) does not reveal the victim's budget either
    budget = headers_msg({":path": "/v1/budget", ":method": "GET", "x-request-id": "f3"}, peer=VICTIM_PEER)
    assert (await first_reply(open_svc.grpc, None, budget)).immediate_response.status.code == 401
    denied = await check(open_svc.grpc, None, dispatch_headers("f4"), principal=VICTIM_PEER)
    assert denied.denied_response.status.code == 401
    assert open_svc.ledger() == []
    assert "UNAUTHENTICATED CALLERS ALLOWED" in open_svc.log.read_text()

    # the same attribute from the operator's Envoy (token presented) names the principal
    svc = guarded
    trusted = await first_reply(svc.grpc, "right-token", headers_msg(chat_headers("f5"), peer=VICTIM_PEER))
    assert trusted.HasField("request_headers") and not trusted.HasField("immediate_response")
    doc = await first_reply(svc.grpc, "right-token", headers_msg({":path": "/v1/budget", ":method": "GET", "x-request-id": "f6"}, peer=VICTIM_PEER))
    assert json.loads(doc.immediate_response.body)["principal"] == "victim-agent"


def _refuses_to_start(tmp_path: Path, *args: str) -> str:
    proc, _, log = start_serve(tmp_path, *args)
    try:
        assert proc.wait(60) == 2
    finally:
        stop_process(proc)
    return log.read_text()


def test_a_tcp_address_without_a_caller_token_refuses_to_start(tmp_path):
    out = _refuses_to_start(tmp_path)
    assert "without caller authentication" in out and "--caller-token-file" in out and "--allow-unauthenticated-callers" in out


@pytest.mark.parametrize("content", [PLACEHOLDER + "\n", "\n# only a comment\n"], ids=["placeholder", "empty"])
def test_a_token_file_with_the_placeholder_or_no_token_refuses_to_start(tmp_path, content):
    path = tmp_path / "caller-token"
    path.write_text(content)
    out = _refuses_to_start(tmp_path, "--caller-token-file", str(path))
    assert str(path) in out
    assert ("placeholder" in out) if PLACEHOLDER in content else ("lists no token" in out)


def test_the_token_file_may_come_from_the_environment(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    r = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(policy), "--grpc", f"127.0.0.1:{free_port()}"],
        env={**os.environ, "EXTPROC_CALLER_TOKEN_FILE": str(token_file(tmp_path, PLACEHOLDER))},
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "holds the placeholder" in r.stderr


async def test_a_unix_socket_without_a_token_is_trusted_and_says_so(serve, tmp_path):
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="xpa", dir="/tmp"))  # a socket path has ~100 bytes
    try:
        svc = serve(grpc_addr=f"unix:{short}/x.sock")
        resp = await first_reply(svc.grpc, None, headers_msg(chat_headers("u1"), peer=VICTIM_PEER))
        assert resp.HasField("request_headers")  # the pod-local Envoy's attribute counts
        assert svc.log.read_text().count("file permissions decide who may call") == 1
    finally:
        for p in short.iterdir():
            p.unlink()
        short.rmdir()


async def test_the_admin_token_file_rotates_without_a_restart(serve, tmp_path):
    admin_file = token_file(tmp_path, ADMIN_TOKEN, name="admin-token")
    svc = serve("--caller-token-file", str(token_file(tmp_path, "t")), "--admin-token-file", str(admin_file))

    def status(token: str) -> int:
        return httpx.get(f"http://{svc.admin}/admin/ledger", headers={"authorization": f"Bearer {token}"}, timeout=10).status_code

    assert (status(ADMIN_TOKEN), status("admin-2")) == (200, 401)
    rotate(admin_file, "admin-2")
    deadline = time.monotonic() + 10
    while status("admin-2") != 200:
        assert time.monotonic() < deadline, "the new admin token was never accepted"
        time.sleep(0.2)
    assert status(ADMIN_TOKEN) == 401
    assert svc.proc.poll() is None
