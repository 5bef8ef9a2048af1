"""compose/: checked structurally (no Docker engine here), its Envoy config validated by
the real binary and run through the local twin of the topology."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
import yaml

from extproc.cli import build_parser
from extproc.costrate.__main__ import load_spec
from extproc.policy.loader import load_policy
from extproc.server.tokens import PLACEHOLDER, Tokens
from extproc.stack import Stack, envoy_binary, free_port, render_envoy_config, stop_process

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

COMPOSE_DIR = ROOT / "compose"
COMPOSE = load(COMPOSE_DIR / "docker-compose.yaml")
SERVICES: dict[str, Any] = COMPOSE["services"]
EXTPROC_IMAGE_SERVICES = ("extproc", "mock-gpu", "costrate")


def mounts(service: str) -> dict[str, Path]:
    """container path -> host path (relative to the compose file) of each bind mount."""
    out: dict[str, Path] = {}
    for v in SERVICES[service].get("volumes", []):
        host, container, *_ = v.split(":")
        if host.startswith((".", "/")):
            out[container] = (COMPOSE_DIR / host).resolve()
    return out


def host_file(service: str, container_path: str) -> Path:
    for container, host in mounts(service).items():
        if container_path == container:
            return host
    raise AssertionError(f"{service}: {container_path} is not mounted")


def argv(service: str) -> list[str]:
    return [str(a) for a in SERVICES[service]["command"]]


def published(service: str) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in SERVICES[service].get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def test_services_images_and_build():
    assert set(SERVICES) == {"envoy", "extproc", "redis", "mock-gpu", "costrate"}
    assert re.fullmatch(r"envoyproxy/envoy:v1\.40[.\w-]*", SERVICES["envoy"]["image"])
    assert re.fullmatch(r"redis:7[.\w-]*", SERVICES["redis"]["image"])
    images = {SERVICES[s]["image"] for s in EXTPROC_IMAGE_SERVICES}
    assert len(images) == 1  # one image, three roles
    for s in EXTPROC_IMAGE_SERVICES:
        build = SERVICES[s]["build"]
        dockerfile = (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile == (COMPOSE_DIR / "Dockerfile").resolve() and dockerfile.exists()


def test_dockerfile_copies_what_exists_and_runs_extproc():
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    context = (COMPOSE_DIR / SERVICES["extproc"]["build"]["context"]).resolve()
    assert context == ROOT
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (context / src).exists(), f"Dockerfile copies missing {src}"
    assert 'ENTRYPOINT ["extproc"]' in text
    assert re.search(r"^USER \d+", text, re.M), "runs as a non-root user"


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    for name, svc in SERVICES.items():
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] > 0, name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in SERVICES and cond == {"condition": "service_healthy"}, (name, dep)
    assert set(SERVICES["envoy"]["depends_on"]) == {"extproc", "mock-gpu"}
    assert set(SERVICES["extproc"]["depends_on"]) == {"redis"}
    assert set(SERVICES["costrate"]["depends_on"]) == {"redis", "mock-gpu"}


def test_every_mounted_file_exists():
    for name in SERVICES:
        for container, host in mounts(name).items():
            assert host.is_file(), f"{name}: {host} (mounted at {container}) does not exist"


@pytest.mark.integration
def test_envoy_mounts_a_config_the_real_binary_validates():
    cmd = argv("envoy")
    config = host_file("envoy", cmd[cmd.index("-c") + 1])
    assert config == COMPOSE_DIR / "envoy.yaml"
    envoy_validate(config)


def test_envoy_config_points_at_the_compose_services():
    cfg = load(host_file("envoy", "/etc/envoy/envoy.yaml"))
    h = hcm(cfg)
    assert [f["name"] for f in h["http_filters"]] == [HEADER_MUTATION, EXT_PROC, ROUTER]
    ext = http_filter(h, EXT_PROC)
    assert ext["failure_mode_allow"] is False
    ext_ep = endpoint(cluster(cfg, ext["grpc_service"]["envoy_grpc"]["cluster_name"]))["socket_address"]
    serve = build_parser().parse_args(argv("extproc"))
    assert serve.command == "serve"
    assert f"{ext_ep['address']}:{ext_ep['port_value']}" == "extproc:" + serve.grpc.rsplit(":", 1)[1]
    route_cluster = h["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"]
    app_ep = endpoint(cluster(cfg, route_cluster))["socket_address"]
    mock = build_parser().parse_args(argv("mock-gpu"))
    assert mock.command == "mock-backend" and mock.host == "0.0.0.0"
    assert (app_ep["address"], app_ep["port_value"]) == ("mock-gpu", mock.port)
    listen = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert published("envoy") == {listen: listen}


def test_extproc_policy_exists_and_passes_validation_and_the_store_is_the_redis_service():
    args = build_parser().parse_args(argv("extproc"))
    policy = host_file("extproc", args.policy)
    assert policy == COMPOSE_DIR / "policy.yaml"
    assert load_policy(policy).keys
    store = urlparse(args.store)
    assert store.scheme == "redis" and store.hostname == "redis" and store.port == 6379
    assert args.grpc.startswith("0.0.0.0:")  # reachable from the envoy container
    assert args.admin.startswith("127.0.0.1:")  # admin API stays inside the container
    assert SERVICES["extproc"]["environment"]["EXTPROC_ADMIN_TOKEN"]


def test_the_compose_policy_is_the_demo_policy_with_the_gpu_metrics_of_the_mock_gpu_service():
    """In the extproc container 127.0.0.1 is extproc itself: the self-hosted backend's metrics
    must come from the compose service that serves them, or the price falls back to TDP. The
    rest of the policy is the demo policy, line for line."""
    compose = (COMPOSE_DIR / "policy.yaml").read_text()
    demo = (ROOT / "policies" / "demo.yaml").read_text()

    def code(t: str) -> list[str]:
        return [c for ln in t.splitlines() if "metrics_url" not in ln and (c := ln.split("#")[0].rstrip())]

    assert code(compose) == code(demo)
    mock = build_parser().parse_args(argv("mock-gpu"))
    for name, backend in load_policy(COMPOSE_DIR / "policy.yaml").self_hosted.backends.items():
        url = urlparse(backend.metrics_url or "")
        assert url.hostname in SERVICES, f"{name}: {url.hostname} is not a compose service"
        assert (url.hostname, url.port, url.path) == ("mock-gpu", mock.port, "/metrics"), name


def test_envoy_sends_the_caller_token_the_service_reads():
    """The token in compose/envoy.yaml is one the extproc container's --caller-token-file lists,
    and not the placeholder the service refuses to start with."""
    args = build_parser().parse_args(argv("extproc"))
    tokens = Tokens.from_file(host_file("extproc", args.caller_token_file), "caller token")
    h = hcm(load(COMPOSE_DIR / "envoy.yaml"))
    sent = caller_token(http_filter(h, EXT_PROC))
    assert tokens.accepts(sent) and sent != PLACEHOLDER
    assert PATH_HYGIENE.items() <= h.items()


def test_costrate_samples_the_mock_gpu_and_publishes_to_redis():
    cmd = argv("costrate")
    assert SERVICES["costrate"]["entrypoint"] == ["python", "-m", "extproc.costrate"]
    spec = load_spec(host_file("costrate", cmd[cmd.index("--config") + 1]))
    (backend,) = spec.backends.values()
    url = urlparse(backend.metrics_url)
    mock = build_parser().parse_args(argv("mock-gpu"))
    assert (url.hostname, url.port, url.path) == ("mock-gpu", mock.port, "/metrics")
    assert backend.gpu_count == mock.gpus and backend.tdp_watts == int(mock.tdp_watts)
    assert urlparse(cmd[cmd.index("--store") + 1]).hostname == "redis"
    port = int(cmd[cmd.index("--metrics-port") + 1])
    assert published("costrate") == {port: port}
    # the self-hosted backend is the cluster Envoy routes to
    envoy_cfg = load(COMPOSE_DIR / "envoy.yaml")
    assert list(spec.backends) == [c["name"] for c in envoy_cfg["static_resources"]["clusters"] if c["name"] != "extproc"]


@pytest.mark.integration
async def test_compose_envoy_config_runs_in_the_local_twin(tmp_path):
    """compose/envoy.yaml with its addresses rewritten, in front of the real service."""
    stack = Stack(
        policy=str(ROOT / "policies" / "demo.yaml"),
        envoy_config=str(COMPOSE_DIR / "envoy.yaml"),
        backends=("mock-gpu",),
        workdir=tmp_path / "stack",
    )
    try:
        stack.start()
        body = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{stack.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-demo-bob"}
            ) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-mock-backend"] == "mock-gpu"
                cost = r.headers["x-budget-cost-usd"]
        stack.stop()
        assert any(e["status"] == 200 and e["cost_usd"] == cost for e in access_log(stack.log("envoy")))
    finally:
        stack.stop()


def compose_healthcheck(service: str, rewrite: dict[str, str]) -> list[str]:
    """The service's healthcheck argv, run as Docker runs a CMD test (no shell around it);
    `rewrite` swaps in-container addresses for the local ones (ports only)."""
    cmd = [str(a) for a in SERVICES[service]["healthcheck"]["test"]]
    assert cmd[0] == "CMD"
    out = cmd[1:]
    for old, new in rewrite.items():
        assert any(old in a for a in out), f"{old} not in {out}"
        out = [a.replace(old, new) for a in out]
    return out


def healthy_within_retries(service: str, argv_: list[str]) -> bool:
    """Docker's loop: run the test every `interval` up to `retries` times; healthy on exit 0."""
    hc = SERVICES[service]["healthcheck"]
    interval = float(str(hc["interval"]).rstrip("s"))
    timeout = float(str(hc["timeout"]).rstrip("s"))
    for _ in range(int(hc["retries"])):
        try:
            if subprocess.run(argv_, capture_output=True, timeout=timeout).returncode == 0:
                return True
        except subprocess.TimeoutExpired:
            pass
        time.sleep(interval)
    return False


@pytest.mark.integration
def test_envoy_healthcheck_passes_against_real_envoy(tmp_path):
    """The compose healthcheck command itself, against Envoy started with compose/envoy.yaml
    (ports rewritten): `docker compose up --wait` needs it to exit 0. Envoy's admin answers an
    HTTP/1.0 request with 426, which the first version of the check sent."""
    admin = free_port()
    cfg = render_envoy_config(
        COMPOSE_DIR / "envoy.yaml",
        listen_port=free_port(),
        admin_port=admin,
        backends={"mock-gpu": f"127.0.0.1:{free_port()}"},
        extproc=f"127.0.0.1:{free_port()}",
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--log-level", "warn", "--disable-hot-restart", "--concurrency", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        check = compose_healthcheck("envoy", {"/dev/tcp/127.0.0.1/9901": f"/dev/tcp/127.0.0.1/{admin}"})
        assert healthy_within_retries("envoy", check), (tmp_path / "envoy.log").read_text()[-2000:]
        assert proc.poll() is None
        # and the check is not vacuous: the HTTP/1.0 request it replaced is refused
        old = [a.replace("HTTP/1.1", "HTTP/1.0") for a in check]
        assert subprocess.run(old, capture_output=True, timeout=5).returncode != 0
    finally:
        stop_process(proc)
        log.close()


def pip_installs(dockerfile: Path) -> list[str]:
    """The requirement arguments of every `pip install` in the Dockerfile's RUN lines."""
    out: list[str] = []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        if not line.startswith("RUN "):
            continue
        for cmd in re.split(r"&&|;", line[4:]):
            words = shlex.split(cmd)
            if words[:2] == ["pip", "install"]:
                out += [w for w in words[2:] if not w.startswith("-")]
    return out


def test_the_image_installs_the_k8s_extra_the_status_patch_needs():
    """rbac.yaml grants the InferenceService status PATCH (extproc/costrate/k8s.py imports
    `kubernetes`); an image without the k8s extra fails it with No module named 'kubernetes'."""
    (spec,) = pip_installs(COMPOSE_DIR / "Dockerfile")
    m = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
    assert m, f"installs {spec!r}: the package with its extras, e.g. .[k8s]"
    extras = set(m.group(1).split(","))
    assert "dev" not in extras  # no test tooling in the image
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    provided = {re.match(r"[\w-]+", r).group(0) for e in extras for r in optional[e]}  # type: ignore[union-attr]
    assert "kubernetes" in provided
    assert re.search(r"^\s*(from kubernetes|import kubernetes)", (ROOT / "extproc/costrate/k8s.py").read_text(), re.M)


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    directories decides; `!` re-includes; `**` spans directories, `*` stays within one."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        rx = re.escape(pat.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_venv_and_git_out_of_the_build_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#")]
    for junk in (".venv/bin/envoy", ".venv/lib/python3.11/site-packages/numpy/__init__.py", ".git/HEAD",
                 "var/budget.db", "extproc/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md",
                 "extproc.egg-info/PKG-INFO", "bench/out/report.json"):
        assert dockerignored(patterns, junk), junk
    # what the Dockerfile copies is still sent
    for line in (COMPOSE_DIR / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                files = [src] if (ROOT / src).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")]
                assert files and not any(dockerignored(patterns, f) for f in files), src
