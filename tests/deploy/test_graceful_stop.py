"""Rollouts must not cut streamed generations: the pod's stop sequence (preStop, SIGTERM,
--shutdown-grace, terminationGracePeriodSeconds) checked in the manifest, and a real
service process stopped with SIGTERM in the middle of a stream through real Envoy."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from extproc.cli import build_parser
from extproc.stack import Stack

from .conftest import ROOT, hcm, load
from .test_istio import one


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def longest_stream_s() -> float:
    """The longest stream the sidecar lets a route run: its route timeout."""
    vhosts = hcm(load(ROOT / "envoy" / "sidecar.yaml"))["route_config"]["virtual_hosts"]
    return max(_seconds(r["route"]["timeout"]) for vh in vhosts for r in vh["routes"] if "timeout" in r.get("route", {}))


def test_default_grace_is_not_the_old_five_seconds():
    args = build_parser().parse_args(["serve", "--policy", "p.yaml"])
    assert args.shutdown_grace >= 30


def test_the_pod_outlives_its_longest_stream():
    dep = one("Deployment", "extproc")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    grace = build_parser().parse_args(c["args"]).shutdown_grace
    assert grace >= longest_stream_s()
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and float(pre_stop[1]) >= 5  # endpoints go before SIGTERM does
    # the kubelet kills at terminationGracePeriodSeconds, counted from the start of preStop
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace
    proxy = json.loads(pod["metadata"]["annotations"]["proxy.istio.io/config"])
    assert _seconds(proxy["terminationDrainDuration"]) >= longest_stream_s()  # the sidecar drains, not cuts


@pytest.mark.integration
async def test_a_stream_in_flight_completes_after_sigterm(tmp_path):
    """SIGTERM the service while Envoy streams a response through its ext_proc stream: the
    stream finishes (every chunk, [DONE], charged), new calls are refused (fail closed), and
    the process exits on its own within the grace."""
    stack = Stack(
        policy=str(ROOT / "policies" / "demo.yaml"), token_delay_ms=100, workdir=tmp_path / "stack",
        extra_service_args=("--shutdown-grace", "8"),
    )
    body = {"model": "gpt-4o-mini", "max_tokens": 60, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-demo-carol"}
    try:
        stack.start()
        service = stack.procs_by_name("extproc")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                first = await r.content.readline()
                assert first.startswith(b"data:")
                service.send_signal(signal.SIGTERM)  # what the kubelet does after preStop
                stopped_at = time.monotonic()
                rest = await r.content.read()
            assert b"data: [DONE]" in rest and b"x-budget-cost-usd=" in rest, rest[-300:]  # whole, and charged
            assert time.monotonic() - stopped_at > 0.5  # the stream did run on after SIGTERM
            async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as r2:
                assert r2.status in (503, 504)  # no service: fail closed, never unmetered
        deadline = time.monotonic() + 8
        while service.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.returncode == 0, stack.log("extproc")[-2000:]
        assert "stopping: 8 s for the calls in flight" in stack.log("extproc")
    except Exception:
        for name in ("extproc", "envoy"):
            print(f"--- {name} log ---\n{stack.log(name)[-3000:]}")
        raise
    finally:
        stack.stop()
