"""deploy/istio: the EnvoyFilter's filter config, extracted from the file, validated and run
by real Envoy; the Kubernetes objects checked against each other."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from extproc.cli import build_parser
from extproc.policy.loader import parse_policy
from extproc.server.tokens import PLACEHOLDER
from extproc.stack import Stack, free_port, wait_http

from .conftest import (
    EXT_PROC,
    HEADER_MUTATION,
    PATH_HYGIENE,
    ROOT,
    ROUTER,
    access_log,
    caller_token,
    docs,
    envoy_validate,
    hcm,
    http_filter,
    load,
    without_grpc_cluster,
)

ISTIO = ROOT / "deploy" / "istio"
SELECTOR = {"extproc.io/budget": "enabled"}
HCM = "envoy.filters.network.http_connection_manager"


def objects(folder: Path = ISTIO) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += docs(path)
    return out


def one(kind: str, name: str | None = None, folder: Path = ISTIO) -> dict[str, Any]:
    found = [o for o in objects(folder) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def envoy_filter() -> dict[str, Any]:
    return one("EnvoyFilter")


def patches(kind: str) -> list[dict[str, Any]]:
    return [p for p in envoy_filter()["spec"]["configPatches"] if p["applyTo"] == kind]


def inserted_filter(name: str) -> dict[str, Any]:
    (p,) = [p for p in patches("HTTP_FILTER") if p["patch"]["value"]["name"] == name]
    return p


def grpc_cluster_name() -> str:
    return inserted_filter(EXT_PROC)["patch"]["value"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]


def istio_bootstrap(*, listen_port: int, admin_port: int, app: tuple[str, int], extproc: tuple[str, int]) -> dict[str, Any]:
    """What an Istio sidecar's inbound side looks like after this EnvoyFilter: a listener
    with an HCM whose chain is [router], a cluster for the app and Istio's outbound
    cluster for the service; then every patch of the EnvoyFilter applied in order,
    the way istiod does (INSERT_BEFORE the router, MERGE into listener and cluster)."""
    ext_cluster = grpc_cluster_name()
    listener: dict[str, Any] = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": HCM,
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "inbound_0.0.0.0_8000",
                            "access_log": [
                                {
                                    "name": "envoy.access_loggers.stdout",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                                        "log_format": {
                                            "json_format": {
                                                "path": "%REQ(:PATH)%",
                                                "status": "%RESPONSE_CODE%",
                                                "cost_usd": "%DYNAMIC_METADATA(extproc.budget:cost_usd)%",
                                                "details": "%RESPONSE_CODE_DETAILS%",
                                            }
                                        },
                                    },
                                }
                            ],
                            "route_config": {
                                "virtual_hosts": [
                                    {"name": "inbound", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8000||"}}]}
                                ]
                            },
                            "http_filters": [
                                {"name": ROUTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                            ],
                        },
                    }
                ]
            }
        ],
    }
    app_cluster: dict[str, Any] = {
        "name": "inbound|8000||",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "inbound|8000||", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": app[0], "port_value": app[1]}}}}]}]},
    }
    grpc_cluster = {
        "name": ext_cluster,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": ext_cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": extproc[0], "port_value": extproc[1]}}}}]}]},
    }
    hcm_config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    chain = hcm_config["http_filters"]
    for p in envoy_filter()["spec"]["configPatches"]:
        assert p["match"]["context"] == "SIDECAR_INBOUND"
        value = copy.deepcopy(p["patch"]["value"])
        if p["applyTo"] == "HTTP_FILTER":
            assert p["patch"]["operation"] == "INSERT_BEFORE"
            assert p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == ROUTER
            at = next(i for i, f in enumerate(chain) if f["name"] == ROUTER)
            chain.insert(at, value)
        elif p["applyTo"] == "NETWORK_FILTER":
            assert p["patch"]["operation"] == "MERGE" and value["name"] == HCM
            assert value["typed_config"]["@type"] == hcm_config["@type"]
            hcm_config.update(value["typed_config"])
        elif p["applyTo"] == "LISTENER":
            assert p["patch"]["operation"] == "MERGE"
            listener.update(value)
        elif p["applyTo"] == "NETWORK_FILTER":
            assert p["patch"]["operation"] == "MERGE" and p["match"]["listener"]["filterChain"]["filter"]["name"] == HCM
            listener["filter_chains"][0]["filters"][0]["typed_config"].update(value["typed_config"])
        elif p["applyTo"] == "HTTP_ROUTE":
            assert p["patch"]["operation"] == "MERGE" and p["match"]["routeConfiguration"]["portNumber"] == 8000
            vhosts = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
            for route in (r for vh in vhosts for r in vh["routes"]):
                route["match"].setdefault("headers", []).extend(value["match"]["headers"])
                route.setdefault("request_headers_to_remove", []).extend(value["request_headers_to_remove"])
        elif p["applyTo"] == "CLUSTER":
            assert p["patch"]["operation"] == "MERGE" and p["match"]["cluster"]["portNumber"] == 8000
            app_cluster.update(value)
        else:
            raise AssertionError(f"unexpected patch {p['applyTo']}")
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": [app_cluster, grpc_cluster]},
    }


# ---------------------------------------------------------------------------- Envoy


@pytest.mark.integration
def test_envoyfilter_config_validates_with_real_envoy(tmp_path):
    cfg = istio_bootstrap(listen_port=15006, admin_port=15000, app=("127.0.0.1", 8000), extproc=("127.0.0.1", 50051))
    path = tmp_path / "istio-sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    envoy_validate(path)
    names = [f["name"] for f in hcm(cfg)["http_filters"]]
    assert names == [HEADER_MUTATION, EXT_PROC, ROUTER]  # patches in order: strip first
    assert PATH_HYGIENE.items() <= hcm(cfg).items()
    assert cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 16 * 1024 * 1024


def test_envoyfilter_selects_by_label_on_the_inbound_inference_port():
    ef = envoy_filter()
    assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
    assert ef["metadata"]["namespace"] == "istio-system"  # root namespace: every namespace's workloads
    assert ef["spec"]["workloadSelector"]["labels"] == SELECTOR
    (hygiene,) = patches("NETWORK_FILTER")
    for match in [inserted_filter(name)["match"] for name in (HEADER_MUTATION, EXT_PROC)] + [hygiene["match"]]:
        assert match["context"] == "SIDECAR_INBOUND"
        assert match["listener"]["filterChain"]["filter"]["name"] == HCM
        assert match["listener"]["portNumber"] == 8000
    kinds = [p["patch"]["value"]["name"] for p in patches("HTTP_FILTER")]
    assert kinds == [HEADER_MUTATION, EXT_PROC]


def test_the_filter_is_the_sidecars_filter_but_for_its_address():
    """One filter config for the sidecar, the compose gateway and Istio: no drift."""
    istio = inserted_filter(EXT_PROC)["patch"]["value"]["typed_config"]
    sidecar = http_filter(hcm(load(ROOT / "envoy" / "sidecar.yaml")), EXT_PROC)
    compose = http_filter(hcm(load(ROOT / "compose" / "envoy.yaml")), EXT_PROC)
    assert without_grpc_cluster(istio) == without_grpc_cluster(sidecar) == without_grpc_cluster(compose)
    strip = inserted_filter(HEADER_MUTATION)["patch"]["value"]["typed_config"]
    assert strip == http_filter(hcm(load(ROOT / "envoy" / "sidecar.yaml")), HEADER_MUTATION)
    assert istio["failure_mode_allow"] is False


def test_prometheus_can_scrape_the_metrics_port_and_only_that():
    """Metrics were only on the loopback admin address. --metrics binds all interfaces and
    serves /metrics alone; the pod declares the port and the scrape annotations, and a
    NetworkPolicy lets scrapes in; the admin API stays on loopback."""
    dep = one("Deployment", "extproc")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    host, _, port = args.metrics.rpartition(":")
    assert host == "0.0.0.0" and args.admin.startswith("127.0.0.1:") and args.admin != args.metrics
    (cp,) = [p for p in c["ports"] if p["containerPort"] == int(port)]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == port and ann["prometheus.io/path"] == "/metrics"
    netpol = one("NetworkPolicy", "extproc-metrics")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (rule,) = netpol["spec"]["ingress"]
    assert {"port": cp["containerPort"], "protocol": "TCP"} in rule["ports"]
    assert all(p["port"] != int(args.admin.rsplit(":", 1)[1]) for p in rule["ports"])


@pytest.mark.integration
async def test_metrics_address_serves_metrics_and_not_the_admin_api(tmp_path):
    """A real `serve --metrics`: /metrics answers there with the service's metrics, the admin
    API does not (even with its token); the admin address keeps serving it."""
    metrics = f"127.0.0.1:{free_port()}"
    stack = Stack(policy=str(ROOT / "policies" / "demo.yaml"), workdir=tmp_path / "stack", extra_service_args=("--metrics", metrics))
    auth = {"authorization": f"Bearer {stack.admin_token}"}
    try:
        stack.start_service()
        # the gRPC port answers first; the HTTP listeners start right after it
        wait_http(f"http://{metrics}/metrics", 30, stack.procs_by_name("extproc"))
        wait_http(f"{stack.admin_url}/healthz", 30, stack.procs_by_name("extproc"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{metrics}/metrics") as r:
                assert r.status == 200 and "extproc_" in await r.text()
            for path in ("/admin/budgets?principal=alice", "/admin/ledger", "/healthz"):
                async with http.get(f"http://{metrics}{path}", headers=auth) as r:
                    assert r.status == 404, path
            async with http.get(f"{stack.admin_url}/admin/budgets?principal=alice", headers=auth) as r:
                assert r.status == 200, await r.text()
    finally:
        stack.stop()


def _images(o: dict[str, Any]) -> list[str]:
    spec = o.get("spec", {}).get("template", {}).get("spec", {})
    return [c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])]


def test_every_image_is_set_in_one_place_the_kustomization():
    """The image name was in two files with no `images:` entry: `kustomize edit set image`
    (or a registry change) missed one. Every container image of each folder is named by its
    kustomization's images:, with the same tag."""
    for folder in (ISTIO, ISTIO / "example"):
        entries = {i["name"]: i for i in load(folder / "kustomization.yaml").get("images", [])}
        used = {img for o in objects(folder) for img in _images(o)}
        assert used
        for img in used:
            name, _, tag = img.partition(":")
            assert name in entries, f"{folder.name}: image {img} has no kustomize images: entry"
            assert str(entries[name]["newTag"]) == tag and entries[name].get("newName", name) == name
    base = {i["name"]: i for i in load(ISTIO / "kustomization.yaml")["images"]}
    example = {i["name"]: i for i in load(ISTIO / "example" / "kustomization.yaml")["images"]}
    assert base["extproc"] == example["extproc"]


def test_docs_say_portnumber_is_the_container_port_and_the_real_minimum_envoy():
    """A Service port in portNumber matches no inbound listener and disables enforcement
    without an error; the header's version note named Envoy 1.40 for fields first released
    in 1.36 (envoyproxy/envoy#41124, #41076)."""
    header = (ISTIO / "envoyfilter.yaml").read_text().split("apiVersion:")[0]
    readme = (ROOT / "deploy" / "README.md").read_text()
    for text in (header, readme):
        assert re.search(r"portNumber.{0,60}\bcontainer[\s#>]+port", text, re.S | re.I), text[:200]
        assert "Envoy 1.36" in text and "Istio 1.28" in text
    assert "1.40)" not in header and "are in Envoy 1.40" not in header
    ports = {p["match"].get("listener", p["match"].get("routeConfiguration", p["match"].get("cluster", {}))).get("portNumber")
             for p in envoy_filter()["spec"]["configPatches"]}
    ports.discard(None)
    example = one("Deployment", "mock-gpu", ISTIO / "example")["spec"]["template"]["spec"]["containers"][0]
    assert ports == {example["ports"][0]["containerPort"]}  # one container port everywhere


# ---------------------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest():
    for folder in (ISTIO, ISTIO / "example"):
        k = load(folder / "kustomization.yaml")
        assert sorted(k["resources"]) == sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")


def test_every_object_is_well_formed():
    kinds = sorted(o["kind"] for o in objects())
    assert kinds == sorted(
        ["Namespace", "StatefulSet", "Service", "Deployment", "Service", "ServiceAccount", "ConfigMap", "PodDisruptionBudget",
         "ClusterRole", "ClusterRoleBinding", "EnvoyFilter", "AuthorizationPolicy", "NetworkPolicy", "NetworkPolicy",
         "NetworkPolicy", "PrometheusRule"]
    )
    for o in objects() + objects(ISTIO / "example"):
        assert o["apiVersion"] and o["metadata"]["name"], o
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"], o


def _service_for_cluster() -> tuple[int, str, str]:
    m = re.fullmatch(r"outbound\|(\d+)\|\|([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", grpc_cluster_name())
    assert m, f"not an Istio outbound cluster name: {grpc_cluster_name()}"
    return int(m.group(1)), m.group(2), m.group(3)


def test_grpc_cluster_is_the_extproc_services_grpc_port():
    port, name, namespace = _service_for_cluster()
    svc = one("Service", name)
    assert svc["metadata"]["namespace"] == namespace
    assert one("Namespace", namespace)
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert sp["name"] == "grpc" and sp["appProtocol"] == "grpc"  # Istio speaks HTTP/2 to it

    dep = one("Deployment", name)
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert not SELECTOR.items() <= labels.items(), "the service's own sidecar must not call the service"
    (c,) = pod["spec"]["containers"]
    (cp,) = [p for p in c["ports"] if p["name"] == sp["targetPort"]]

    args = build_parser().parse_args(c["args"])  # the command the image runs is a valid one
    assert args.command == "serve"
    assert args.grpc == f"0.0.0.0:{cp['containerPort']}"
    assert urlsplit(args.store).hostname == "redis.extproc-system.svc.cluster.local" and urlsplit(args.store).port == 6379
    redis = one("Service", "redis")
    assert redis["spec"]["ports"][0]["port"] == 6379
    assert redis["spec"]["selector"].items() <= one("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"].items()


def test_policy_configmap_is_the_demo_policy_and_is_mounted_where_serve_reads_it():
    dep = one("Deployment", "extproc")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    policy_path = Path(build_parser().parse_args(c["args"]).policy)
    (mount,) = [m for m in c["volumeMounts"] if policy_path.is_relative_to(m["mountPath"])]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    cm = one("ConfigMap", vol["configMap"]["name"])
    key = str(policy_path.relative_to(mount["mountPath"]))
    text = cm["data"][key]
    demo = (ROOT / "policies" / "demo.yaml").read_text()
    in_cluster = parse_policy(text, "ConfigMap").self_hosted.backends["backend"].metrics_url
    local = parse_policy(demo, "demo").self_hosted.backends["backend"].metrics_url
    def code(t: str) -> list[str]:
        return [c for ln in t.splitlines() if "metrics_url" not in ln and (c := ln.split("#")[0].rstrip())]

    assert code(text) == code(demo)  # the demo policy, but for where the GPU metrics are
    assert in_cluster != local
    policy = parse_policy(text, f"ConfigMap {cm['metadata']['name']}")
    assert set(policy.prices.models) >= {"gpt-4o", "gpt-4o-mini"} and policy.keys


def secret_mount(flag: str) -> tuple[str, str]:
    """(Secret name, key) behind the file a `serve` flag names, from the Deployment's mounts."""
    pod = one("Deployment", "extproc")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    path = Path(getattr(build_parser().parse_args(c["args"]), flag))
    (mount,) = [m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return vol["secret"]["secretName"], str(path.relative_to(mount["mountPath"]))


def test_admin_token_comes_from_a_secret_and_the_admin_binds_loopback():
    dep = one("Deployment", "extproc")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.admin.startswith("127.0.0.1:")  # never exposed by the Service
    assert all(p["containerPort"] != int(args.admin.rsplit(":", 1)[1]) for p in c["ports"])
    assert secret_mount("admin_token_file") == ("extproc-admin", "token")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    binding = one("ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "extproc" and binding["subjects"][0]["namespace"] == "extproc-system"
    rule = one("ClusterRole")["rules"][0]
    assert rule["apiGroups"] == ["serving.kserve.io"] and rule["resources"] == ["inferenceservices/status"]
    assert "patch" in rule["verbs"]


def test_gpu_metrics_url_is_a_service_the_sampler_can_read():
    """metrics_url 127.0.0.1:8000 is the extproc pod's own loopback: every rate fell back to
    TDP. Each self-hosted backend's URL names a Service of the manifests, on a port whose
    container port is not the one the budget filter guards (it refuses /metrics)."""
    cm = one("ConfigMap", "extproc-policy")
    policy = parse_policy(cm["data"]["policy.yaml"], "ConfigMap")
    guarded = inserted_filter(EXT_PROC)["match"]["listener"]["portNumber"]
    everything = objects() + objects(ISTIO / "example")
    assert policy.self_hosted.backends
    for name, backend in policy.self_hosted.backends.items():
        url = urlsplit(str(backend.metrics_url))
        m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", url.hostname or "")
        assert m, f"{name}: {url.hostname} is not a Service's DNS name"
        (svc,) = [o for o in everything if o["kind"] == "Service" and o["metadata"]["name"] == m.group(1)
                  and o["metadata"]["namespace"] == m.group(2)]
        (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
        (dep,) = [o for o in everything if o["kind"] == "Deployment" and o["metadata"]["namespace"] == m.group(2)
                  and svc["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        (bc,) = dep["spec"]["template"]["spec"]["containers"]
        (cp,) = [p for p in bc["ports"] if p["name"] == sp["targetPort"]]
        assert cp["containerPort"] != guarded
        args = build_parser().parse_args(bc["args"])
        assert args.metrics_port == cp["containerPort"] and url.path == "/metrics"


@pytest.mark.integration
async def test_example_backend_serves_only_metrics_on_its_metrics_port(tmp_path):
    """The example container's command, on loopback ports: /metrics answers on the metrics
    port (DCGM power for the sampler) and nothing inference-shaped does."""
    import sys

    from extproc.stack import wait_http

    (bc,) = one("Deployment", "mock-gpu", ISTIO / "example")["spec"]["template"]["spec"]["containers"]
    http_port, metrics_port = free_port(), free_port()
    args = list(bc["args"])
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(http_port)
    args[args.index("--metrics-port") + 1] = str(metrics_port)
    proc = subprocess.Popen([sys.executable, "-m", "extproc", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 30, proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200 and "DCGM_FI_DEV_POWER_USAGE" in await r.text()
            async with http.post(f"http://127.0.0.1:{metrics_port}/v1/chat/completions", json={}) as r:
                assert r.status == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_secrets_are_created_once_never_applied_with_a_placeholder():
    """`kubectl apply -k` must not overwrite a real token with a placeholder: no Secret is
    in the kustomization, and the documented `kubectl create secret` commands create the
    Secrets (and keys) the Deployment mounts."""
    assert not [o for o in objects() if o["kind"] == "Secret"]
    assert "secretGenerator" not in load(ISTIO / "kustomization.yaml")
    how = (ISTIO / "kustomization.yaml").read_text()
    readme = (ROOT / "deploy" / "README.md").read_text()
    first_apply = readme.index("kubectl apply -k deploy/istio")
    refs = [secret_mount(flag) for flag in ("admin_token_file", "caller_token_file")] + [REDIS_SECRET]
    for name, key in refs:
        create = f"-n extproc-system create secret generic {name} --from-literal={key}="
        assert create in how, name
        assert readme.index(create) < first_apply, f"README: create {name} before the first apply"


def test_the_service_requires_the_caller_token_the_envoyfilter_sends():
    assert secret_mount("caller_token_file") == ("extproc-caller", "token")
    ext = inserted_filter(EXT_PROC)["patch"]["value"]["typed_config"]
    assert caller_token(ext) == PLACEHOLDER  # the service refuses to start on this value
    text = (ISTIO / "envoyfilter.yaml").read_text()
    assert "extproc-caller" in text  # the comment says where the real value lives


def test_only_budgeted_workloads_reach_the_grpc_port():
    port, name, _ = _service_for_cluster()
    svc = one("Service", name)
    labels = one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
    (container,) = one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    (cp,) = [p for p in container["ports"] if p["name"] == sp["targetPort"]]

    netpol = one("NetworkPolicy", "extproc-grpc")
    assert netpol["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert netpol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = netpol["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer == {"namespaceSelector": {}, "podSelector": {"matchLabels": SELECTOR}}  # any namespace, labelled pods
    assert rule["ports"] == [{"port": cp["containerPort"], "protocol": "TCP"}]

    authz = one("AuthorizationPolicy")
    assert authz["apiVersion"] == "security.istio.io/v1" and authz["spec"]["action"] == "ALLOW"
    assert authz["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert authz["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (allow,) = authz["spec"]["rules"]
    (source,) = allow["from"]
    principals = source["source"]["principals"]
    assert principals and all(re.fullmatch(r"[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9-]+", p) for p in principals)
    example = one("Deployment", "mock-gpu", ISTIO / "example")
    sa = example["spec"]["template"]["spec"].get("serviceAccountName", "default")
    assert f"cluster.local/ns/{example['metadata']['namespace']}/sa/{sa}" in principals
    (op,) = allow["to"]
    assert op["operation"]["ports"] == [str(cp["containerPort"])]
    assert sorted(op["operation"]["paths"]) == [
        "/envoy.service.auth.v3.Authorization/Check", "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    ]


def test_only_the_service_reaches_redis():
    netpol = one("NetworkPolicy", "redis")
    redis_labels = one("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    extproc_labels = one("Deployment", "extproc")["spec"]["template"]["metadata"]["labels"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = netpol["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= extproc_labels.items() and "namespaceSelector" not in peer
    assert rule["ports"] == [{"port": one("Service", "redis")["spec"]["ports"][0]["port"], "protocol": "TCP"}]


def test_example_workload_is_selected_on_the_patched_port():
    example = ISTIO / "example"
    dep = one("Deployment", "mock-gpu", example)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["ports"][0]["containerPort"] == inserted_filter(EXT_PROC)["match"]["listener"]["portNumber"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "mock-backend" and args.port == c["ports"][0]["containerPort"]


def test_redis_keeps_the_budgets_across_reschedules_and_never_runs_twice():
    """emptyDir loses every budget on a reschedule; a Deployment's RollingUpdate runs two
    Redis pods on one data set. A StatefulSet with a claim template and AOF does neither."""
    sts = one("StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "redis"
    assert one("Service", sts["spec"]["serviceName"])
    pod = sts["spec"]["template"]["spec"]
    assert not [v for v in pod.get("volumes", []) if "emptyDir" in v]
    (c,) = pod["containers"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    args = c["args"]
    assert args[0] == "redis-server"
    opts = dict(zip(args[1::2], args[2::2]))
    assert opts["--appendonly"] == "yes" and "--dir" not in opts
    assert mount["mountPath"] == "/data"  # the redis image's working directory, where AOF goes
    assert not [o for o in objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "redis"]


REDIS_SECRET = ("extproc-redis", "password")


def kubelet_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's env as the kubelet builds it (value, or secretKeyRef from `secrets`)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def kubelet_args(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The args with $(VAR) expanded from the container's env, the way the kubelet does."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container["args"]]


@pytest.mark.integration
async def test_redis_requires_the_password_the_service_sends(tmp_path):
    """Both containers as the kubelet starts them, with the Secret the README creates: the
    manifest's redis-server refuses a client without the password, the probe's redis-cli and
    the service's expanded --store URL get in, and the service's log masks the password."""
    from extproc.app import open_store
    from extproc.errors import StoreUnavailable
    from extproc.stores import redacted
    from tests.support.redis_server import RedisServer, redis_binary

    password = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    secrets = {REDIS_SECRET[0]: {REDIS_SECRET[1]: password}}
    (rc,) = one("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    renv = kubelet_env(rc, secrets)
    rargs = kubelet_args(rc, renv)
    assert rargs[0] == "redis-server" and password in rargs
    server = RedisServer(args=tuple(rargs[1:])).start()  # the manifest's options, on a loopback port
    try:
        probe = subprocess.run(
            [redis_binary("redis-cli"), "-p", str(server.port), *rc["readinessProbe"]["exec"]["command"][1:]],
            env={**os.environ, **renv}, capture_output=True, text=True, timeout=10,
        )
        assert probe.stdout.strip() == "PONG", probe.stdout + probe.stderr
        (ec,) = one("Deployment", "extproc")["spec"]["template"]["spec"]["containers"]
        url = build_parser().parse_args(kubelet_args(ec, kubelet_env(ec, secrets))).store
        local = url.replace("redis.extproc-system.svc.cluster.local:6379", f"127.0.0.1:{server.port}")
        assert local != url and f":{password}@" in local
        store = open_store(local)
        try:
            await store.ping()
            assert password not in store.url  # what its errors show
        finally:
            await store.close()
        anonymous = open_store(server.url)
        try:
            with pytest.raises(StoreUnavailable, match="AuthenticationError"):
                await anonymous.ping()
        finally:
            await anonymous.close()
        assert password not in redacted(url) and "***" in redacted(url)
    finally:
        server.stop()


def test_a_disruption_never_takes_every_extproc_pod():
    """Fail closed means no ready pod = every budgeted call 503: a PodDisruptionBudget keeps
    one through drains (and allows one eviction at a time), replicas prefer distinct nodes."""
    dep = one("Deployment", "extproc")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    replicas = dep["spec"]["replicas"]
    assert replicas >= 2
    pdb = one("PodDisruptionBudget", "extproc")
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    allowed = replicas - spec["minAvailable"] if "minAvailable" in spec else spec["maxUnavailable"]
    assert 1 <= allowed < replicas  # a drain can proceed, and never empties the service
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def _commands(text: str) -> list[str]:
    """Shell commands in a file's comments or a README's code blocks, continuation lines joined."""
    lines = [re.sub(r"^\s*#\s?", "", ln).strip() for ln in text.splitlines()]
    out: list[str] = []
    for ln in lines:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + ln
        elif ln.startswith(("kubectl", "curl")):
            out.append(ln)
    return out


def test_enforcement_is_checked_through_the_mesh_never_by_port_forward():
    """port-forward reaches the pod's port past its sidecar: a request without a key got 200
    there. The documented check runs curl in a mesh pod against the budgeted Service."""
    example = ISTIO / "example"
    readme = (ROOT / "deploy" / "README.md").read_text()
    istio_section = readme[readme.index("## Istio"):readme.index("\n## ", readme.index("## Istio") + 1)]
    texts = [p.read_text() for p in example.glob("*.yaml")] + [istio_section]
    commands = [c for t in texts for c in _commands(t)]
    assert not [c for c in commands if "port-forward" in c and "demo" in c], "port-forward bypasses the sidecar"
    assert not [c for c in commands if c.startswith("curl") and ("localhost" in c or "127.0.0.1" in c)]
    checks = [c for c in commands if c.startswith("kubectl -n demo exec") and "curl" in c]
    assert len(checks) >= 2  # in the example and in the README
    guarded = inserted_filter(EXT_PROC)["match"]["listener"]["portNumber"]
    svc = one("Service", "mock-gpu", example)
    (sp,) = [p for p in svc["spec"]["ports"] if p["targetPort"] == "http"]
    budgeted = one("Deployment", "mock-gpu", example)["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in budgeted["ports"] if p["name"] == "http"] == [guarded]
    for c in checks:
        m = re.search(r"exec deploy/([a-z0-9-]+) -c ([a-z0-9-]+) -- curl .*http://([a-z0-9.-]+):(\d+)/v1/", c)
        assert m, c
        client = one("Deployment", m.group(1), example)
        pod = client["spec"]["template"]
        assert m.group(2) in [k["name"] for k in pod["spec"]["containers"]]
        assert not SELECTOR.items() <= pod["metadata"]["labels"].items()  # a caller, not budgeted
        assert pod["metadata"].get("annotations", {}).get("sidecar.istio.io/inject") != "false"
        assert one("Namespace", client["metadata"]["namespace"], example)["metadata"]["labels"]["istio-injection"] == "enabled"
        assert m.group(3) in (f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local", svc["metadata"]["name"])
        assert int(m.group(4)) == sp["port"]


# ---------------------------------------------------------------------------- live


@pytest.mark.integration
async def test_envoyfilter_config_enforces_budgets_for_real(tmp_path):
    """The patched inbound chain in real Envoy, with the service behind Istio's cluster name."""
    grpc_port = free_port()
    stack = Stack(
        policy=str(ROOT / "policies" / "demo.yaml"),
        backends=("inbound|8000||",),
        grpc=f"127.0.0.1:{grpc_port}",
        workdir=tmp_path / "stack",
    )
    try:
        stack.start_backends()
        stack.start_service()
        cfg = istio_bootstrap(
            listen_port=stack.port, admin_port=stack.admin_port,
            app=("127.0.0.1", stack.backend_ports["inbound|8000||"]), extproc=("127.0.0.1", grpc_port),
        )
        path = tmp_path / "istio.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        stack.envoy_config = str(path)  # render_envoy_config keeps the addresses set above
        stack.start_envoy()
        body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{stack.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-demo-carol"}
            ) as r:
                assert r.status == 200, await r.text()
                cost = r.headers["x-budget-cost-usd"]
            async with http.post(f"{stack.url}/v1/chat/completions", json=body) as r:
                assert r.status == 401  # no key: refused by the service, before the app
                assert "error" in json.loads(await r.text())
        stack.stop()
        entries = access_log(stack.log("envoy"))
        assert any(e["status"] == 200 and e["cost_usd"] == cost for e in entries)
    except Exception:
        for name in ("extproc", "envoy"):
            print(f"--- {name} log ---\n{stack.log(name)[-3000:]}")
        raise
    finally:
        stack.stop()
