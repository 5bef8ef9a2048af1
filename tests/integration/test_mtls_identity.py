"""Issue 5: the principal from the mTLS peer (an Envoy attribute a client cannot forge)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.stack import Stack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

POLICY = """
version: 1
prices:
  models:
    gpt-4o-mini: { input: "0.15", output: "0.60", output_limit: 4096 }
principals:
  - { name: agent-1, team: agents, org: acme, peer_ids: ["spiffe://acme/agent-1"] }
identity:
  mtls_peer: true
budgets:
  - scope: key
    limits: [{ dimension: cost, limit: "1.00" }]
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # P-256: generated at once (RSA: ~0.25 s a key)


def make_pki(d: Path) -> None:
    """A CA, a server cert for 127.0.0.1, and two client certs: one with a known SPIFFE id, one unknown."""
    openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    for name, san in (("server", "IP:127.0.0.1"), ("agent", "URI:spiffe://acme/agent-1"), ("stranger", "URI:spiffe://acme/nobody")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("req", *EC_KEY, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def client_tls(d: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / f"{name}.crt"), str(d / f"{name}.key"))
    return ctx


def mtls_envoy_config(d: Path) -> Path:
    """The shipped gateway config (which already sends the peer's URI SAN to ext_proc)
    with client-certificate TLS on its listener."""
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    chain = cfg["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(d / "server.crt")}, "private_key": {"filename": str(d / "server.key")}}],
                "validation_context": {"trusted_ca": {"filename": str(d / "ca.crt")}},
            },
        },
    }
    hcm = chain["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    assert ext["request_attributes"] == ["connection.uri_san_peer_certificate"]
    out = d / "envoy-mtls.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


async def test_principal_comes_from_the_client_certificate(tmp_path, worker_backend):
    make_pki(tmp_path)
    (tmp_path / "policy.yaml").write_text(POLICY)
    stack = Stack(policy=str(tmp_path / "policy.yaml"), envoy_config=str(mtls_envoy_config(tmp_path)),
                  backends=(), backend_ports=dict(worker_backend.backend_ports),  # the worker's mock
                  workdir=tmp_path / "stack", store=f"sqlite:{tmp_path / 'b.db'}")
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    url = f"https://127.0.0.1:{stack.port}/v1/chat/completions"
    try:
        stack.start()
        async with httpx.AsyncClient(verify=client_tls(tmp_path, "agent"), timeout=15) as c:
            ok = await c.post(url, json=body)
            # a forged principal header is stripped at the edge and changes nothing
            forged = await c.post(url, json=body, headers={"x-extproc-principal": "someone-else"})
        async with httpx.AsyncClient(verify=client_tls(tmp_path, "stranger"), timeout=15) as c:
            stranger = await c.post(url, json=body)
    finally:
        stack.stop()
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-budget-scope"] == "key:agent-1"
    assert forged.status_code == 200 and forged.headers["x-budget-scope"] == "key:agent-1"
    assert stranger.status_code == 401 and stranger.json()["error"]["code"] == "invalid_api_key"
