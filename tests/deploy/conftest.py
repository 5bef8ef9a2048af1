"""Helpers for the deployment files: real Envoy validation, YAML documents, filter lookup."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from extproc.server.callers import CALLER_TOKEN_KEY
from extproc.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
EXT_PROC = "envoy.filters.http.ext_proc"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
ROUTER = "envoy.filters.http.router"


def envoy_validate(path: Path) -> None:
    """`envoy --mode validate -c path` with the real binary; fails the test with Envoy's words."""
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{path}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "OK" in (r.stdout + r.stderr)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager of a static single-listener config."""
    (listener,) = cfg["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (f,) = chain["filters"]
    assert f["name"] == "envoy.filters.network.http_connection_manager"
    return f["typed_config"]


def http_filter(h: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in h["http_filters"] if f["name"] == name)["typed_config"]


def cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)


def endpoint(c: dict[str, Any]) -> dict[str, Any]:
    return c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]


def without_grpc_cluster(ext_proc: dict[str, Any]) -> dict[str, Any]:
    """An ext_proc config with the service's address and the caller token's value taken
    out (both belong to the deployment): what must not drift."""
    out = json.loads(json.dumps(ext_proc))
    out["grpc_service"]["envoy_grpc"].pop("cluster_name")
    for md in out["grpc_service"].get("initial_metadata", []):
        md.pop("value")
    return out


def caller_token(ext_filter: dict[str, Any]) -> str:
    """The caller token an ext_proc / ext_authz filter sends (exactly one entry)."""
    (value,) = [m["value"] for m in ext_filter["grpc_service"]["initial_metadata"] if m["key"] == CALLER_TOKEN_KEY]
    return value


PATH_HYGIENE = {"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST"}


def access_log(text: str) -> list[dict[str, Any]]:
    """The JSON access log lines in an Envoy log (read it after Envoy exits: it flushes then)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
