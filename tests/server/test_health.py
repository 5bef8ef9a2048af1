"""The grpc.health.v1 service of a real `extproc serve` process: SERVING while its
Redis answers, NOT_SERVING while Redis is down, no caller token needed, while the
ext_proc service behind the token gate still refuses a call without one."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.integration  # a real redis-server and `extproc serve`

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def _until(channel: grpc.Channel, want: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = _status(channel)
            if last == want:
                return
        except grpc.RpcError as e:
            last = e.code()
        time.sleep(0.1)
    raise AssertionError(f"health stayed {last}, wanted {want}")


@pytest.fixture
def served(tmp_path):
    redis = RedisServer().start()
    token = tmp_path / "caller-token"
    token.write_text("a-test-caller-token\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--policy", "policies/demo.yaml", "--store", redis.url,
         "--grpc", f"127.0.0.1:{port}", "--caller-token-file", str(token), "--health-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    channel.port = port  # type: ignore[attr-defined]
    try:
        yield channel, redis
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        redis.stop()


def test_health_follows_the_store_and_needs_no_token(served):
    channel, redis = served
    _until(channel, SERVING)
    for name in ("envoy.service.ext_proc.v3.ExternalProcessor", "envoy.service.auth.v3.Authorization"):
        assert _status(channel, name) == SERVING
    with pytest.raises(grpc.RpcError) as refused:  # the budget services still ask for the token
        next(iter(epg.ExternalProcessorStub(channel).Process(iter(()), timeout=5)))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _compose_healthcheck(channel.port) == 0
    redis.kill()
    _until(channel, NOT_SERVING)
    assert _status(channel, "liveness") == SERVING  # a store outage is no reason to restart the pod
    assert _compose_healthcheck(channel.port) == 1
    redis.start()
    _until(channel, SERVING)


def _compose_healthcheck(port: int) -> int:
    """Run the compose file's extproc healthcheck command against this server."""
    with open("compose/docker-compose.yaml") as f:
        cmd = yaml.safe_load(f)["services"]["extproc"]["healthcheck"]["test"]
    assert cmd[:3] == ["CMD", "python", "-c"]
    return subprocess.run([sys.executable, "-c", cmd[3].replace("50051", str(port))], capture_output=True, timeout=30).returncode
