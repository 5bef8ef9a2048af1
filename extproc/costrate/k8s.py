"""Publish a backend's rate as ``status.costRatePerHour`` of its KServe ``InferenceService``.

A JSON merge patch on the status subresource (``PATCH …/inferenceservices/NAME/status``,
``application/merge-patch+json``) so nothing else of the status is touched. The
value is a decimal string (``"1.278410959"``): exact, and a Kubernetes quantity.

The ``kubernetes`` client is synchronous; calls run in a worker thread. Needs
RBAC ``patch`` on ``inferenceservices/status`` (deploy/istio/rbac.yaml). Failures
are logged and retried on the next sample, never raised: the status is a
convenience for operators, not part of enforcement. Note that a CRD whose status
schema does not list ``costRatePerHour`` (and does not preserve unknown fields)
prunes it silently.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..policy.selfhosted import SelfHostedSpec
from .formula import CostRate
from .publish import header_value

log = logging.getLogger("extproc.costrate")

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
FIELD = "costRatePerHour"


def status_patch(rate: CostRate) -> dict[str, Any]:
    """The merge patch body for one rate."""
    return {"status": {FIELD: header_value(rate)}}


class KubernetesStatusPublisher:
    """``api_client``: a ``kubernetes.client.ApiClient``; default: the in-cluster config."""

    def __init__(self, spec: SelfHostedSpec, api_client: Any = None) -> None:
        self.spec = spec
        self._api_client = api_client
        self._api: Any = None
        self._last: dict[str, str] = {}

    def _custom_objects(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            if self._api_client is None:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                self._api_client = client.ApiClient()
            self._api = client.CustomObjectsApi(self._api_client)
        return self._api

    def _patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        api = self._custom_objects()
        args = (GROUP, VERSION, namespace, PLURAL, name, body)
        try:
            api.patch_namespaced_custom_object_status(*args, _content_type="application/merge-patch+json")
        except TypeError:  # older clients pick merge-patch for dict bodies themselves
            api.patch_namespaced_custom_object_status(*args)

    async def publish(self, rate: CostRate) -> None:
        backend = self.spec.backends.get(rate.backend)
        ref = backend.inference_service if backend else None
        if ref is None:
            return
        value = header_value(rate)
        if self._last.get(rate.backend) == value:
            return
        try:
            await asyncio.to_thread(self._patch, ref.namespace, ref.name, status_patch(rate))
        except Exception as e:  # ApiException, connection errors: log, try again next sample
            log.warning("InferenceService %s/%s status not patched: %s", ref.namespace, ref.name, e)
            return
        self._last[rate.backend] = value

    async def close(self) -> None:
        if self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)
