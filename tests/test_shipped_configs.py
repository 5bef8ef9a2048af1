"""Every Envoy config and policy the repo ships is validated by the real tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.cli import main as cli
from extproc.server.callers import CALLER_TOKEN_KEY
from extproc.server.tokens import PLACEHOLDER
from extproc.stack import caller_filters, envoy_binary, render_envoy_config

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIGS = sorted((ROOT / "envoy").glob("*.yaml"))
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))


def envoy_validate(path: Path) -> None:
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{path}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "OK" in (r.stdout + r.stderr)


@pytest.mark.integration
@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_shipped_envoy_config_validates(path):
    envoy_validate(path)


@pytest.mark.integration
@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: p.name)
def test_rendered_stack_config_validates_and_sends_the_stacks_caller_token(tmp_path, path):
    cfg = render_envoy_config(
        path, listen_port=18080, admin_port=18081, backends={"backend": "127.0.0.1:18082"}, extproc="unix:/tmp/x.sock",
        caller_token="tok-123",
    )
    filters = caller_filters(cfg)
    assert filters and all(f["grpc_service"]["initial_metadata"] == [{"key": CALLER_TOKEN_KEY, "value": "tok-123"}] for f in filters)
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump(cfg))
    envoy_validate(out)


@pytest.mark.parametrize("path", ENVOY_CONFIGS + [ROOT / "compose" / "envoy.yaml"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_gateway_authenticates_to_the_service_and_cleans_paths(path):
    """Each ext_proc / ext_authz filter sends the caller token (the placeholder, except in the
    compose demo, whose token file is checked in tests/deploy), and each HTTP connection
    manager normalizes paths, merges slashes and refuses encoded slashes."""
    cfg = yaml.safe_load(path.read_text())
    filters = caller_filters(cfg)
    assert filters
    for f in filters:
        (md,) = f["grpc_service"]["initial_metadata"]
        assert md["key"] == CALLER_TOKEN_KEY
        assert (md["value"] == PLACEHOLDER) == (path.parent.name == "envoy")
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
                assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"


def test_ext_proc_filter_fails_closed_and_strips_internal_headers():
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.ext_proc")
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    assert ext["failure_mode_allow"] is False
    assert ext["allow_mode_override"] is True
    assert hcm["preserve_external_request_id"] is False


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_shipped_policy_passes_policy_check(path, capsys):
    assert cli(["policy", "check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


EXT_PROC_CONFIGS = [p for p in ENVOY_CONFIGS + [ROOT / "compose" / "envoy.yaml"] if "ext_proc.v3.ExternalProcessor" in p.read_text()]


@pytest.mark.parametrize("path", EXT_PROC_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_ext_proc_filter_lets_the_service_switch_sse_to_full_duplex(path):
    """The service ends a spent stream through a per-request switch to FULL_DUPLEX_STREAMED.
    Envoy ignores every mode_override when the static body modes are already full duplex or
    the body is sent without waiting for the header response (ext_proc.cc, onReceiveMessage),
    and an allow-list, if any, must name the mode."""
    ext_procs = [f for f in caller_filters(yaml.safe_load(path.read_text())) if "ExternalProcessor" in f["@type"]]
    assert ext_procs
    for f in ext_procs:
        mode = f["processing_mode"]
        assert f["allow_mode_override"] is True
        assert "FULL_DUPLEX_STREAMED" not in (mode.get("request_body_mode"), mode.get("response_body_mode"))
        assert not f.get("send_body_without_waiting_for_header_response", False)
        allowed = f.get("allowed_override_modes", [])
        assert not allowed or any(m.get("response_body_mode") == "FULL_DUPLEX_STREAMED" for m in allowed)
