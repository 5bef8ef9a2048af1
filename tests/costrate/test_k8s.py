"""InferenceService status.costRatePerHour through the real kubernetes client, against a
local HTTP server that records the PATCH it receives (no cluster needed)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from extproc.costrate import cost_rate
from extproc.costrate.k8s import KubernetesStatusPublisher, status_patch
from extproc.policy.selfhosted import SelfHostedSpec

from .conftest import SPEC, backend_spec, closed_port

if TYPE_CHECKING:  # imported where used: ~0.25 CPU-s that the xdist workers not running this module need not pay
    from kubernetes import client as k8s


@pytest.fixture
async def apiserver():
    """A fake API server: records each request, answers like Kubernetes does."""
    seen: list[dict[str, Any]] = []

    async def patch_status(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "content_type": request.headers.get("Content-Type"),
                "authorization": request.headers.get("Authorization"),
                "body": json.loads(body),
            }
        )
        if request.match_info["name"] == "missing":
            return web.json_response({"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(
            {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
             "metadata": {"name": request.match_info["name"]}, **json.loads(body)}
        )

    app = web.Application()
    app.router.add_route(
        "PATCH", "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}/status", patch_status
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", seen
    await server.close()


def api_client(host: str) -> k8s.ApiClient:
    from kubernetes import client as k8s

    cfg = k8s.Configuration(host=host)
    cfg.api_key = {"BearerToken": "test-token"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    return k8s.ApiClient(cfg)


def spec_with(name: str = "llama", namespace: str = "models") -> SelfHostedSpec:
    return SelfHostedSpec.model_validate(
        {
            "kubernetes_status": True,
            "backends": {"gpu": {**SPEC, "inference_service": {"namespace": namespace, "name": name}}},
        }
    )


def rate(watts: str) -> Any:
    return cost_rate("gpu", backend_spec(), power_watts=Decimal(watts), tokens_per_hour=None, sampled_at=0.0)


async def test_merge_patch_on_the_status_subresource(apiserver):
    host, seen = apiserver
    pub = KubernetesStatusPublisher(spec_with(), api_client(host))
    try:
        await pub.publish(rate("60"))
    finally:
        await pub.close()
    assert seen == [
        {
            "method": "PATCH",
            "path": "/apis/serving.kserve.io/v1beta1/namespaces/models/inferenceservices/llama/status",
            "content_type": "application/merge-patch+json",
            "authorization": "Bearer test-token",
            "body": {"status": {"costRatePerHour": "1.493378265"}},
        }
    ]


async def test_unchanged_rate_is_not_patched_again_and_a_change_is(apiserver):
    host, seen = apiserver
    pub = KubernetesStatusPublisher(spec_with(), api_client(host))
    try:
        await pub.publish(rate("60"))
        await pub.publish(rate("60"))
        await pub.publish(rate("700"))
    finally:
        await pub.close()
    assert [s["body"]["status"]["costRatePerHour"] for s in seen] == ["1.493378265", "1.593218265"]


async def test_api_errors_are_logged_not_raised_and_retried(apiserver, caplog):
    host, seen = apiserver
    pub = KubernetesStatusPublisher(spec_with(name="missing"), api_client(host))
    try:
        await pub.publish(rate("60"))
        await pub.publish(rate("60"))  # not remembered as published: tried again
    finally:
        await pub.close()
    assert len(seen) == 2
    assert "not patched" in caplog.text


async def test_unreachable_api_server_is_logged(caplog):
    pub = KubernetesStatusPublisher(spec_with(), api_client(f"http://127.0.0.1:{closed_port()}"))
    try:
        await pub.publish(rate("60"))
    finally:
        await pub.close()
    assert "not patched" in caplog.text


async def test_backends_without_an_inference_service_are_skipped(apiserver):
    host, seen = apiserver
    s = SelfHostedSpec.model_validate({"backends": {"gpu": SPEC}})
    pub = KubernetesStatusPublisher(s, api_client(host))
    try:
        await pub.publish(rate("60"))
    finally:
        await pub.close()
    assert seen == []


def test_patch_body():
    assert status_patch(rate("700")) == {"status": {"costRatePerHour": "1.593218265"}}
