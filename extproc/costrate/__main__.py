"""``python -m extproc.costrate``: sample self-hosted backends and publish their cost rates.

    python -m extproc.costrate --config compose/selfhosted.yaml --store redis://redis:6379/0 \\
        [--metrics-port 9464] [--once] [--kubernetes-status]

``--config``: a YAML file with a top-level ``self_hosted:`` section (a policy
file that has one works). Publishes to the store (one value for every sidecar),
serves the Prometheus gauges on ``--metrics-port`` (``/metrics``), and prints
one line per backend and sample. ``--once`` samples once and exits (0 even on
TDP fallback; the line says so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import yaml

from ..policy.selfhosted import SelfHostedSpec
from .formula import CostRate
from .publish import PrometheusGauges, RateSink, header_value
from .service import CostRates
from .store import open_rate_publisher


def load_spec(path: str | Path) -> SelfHostedSpec:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "self_hosted" not in data:
        raise SystemExit(f"{path}: no top-level self_hosted: section")
    return SelfHostedSpec.model_validate(data["self_hosted"])


def describe(rate: CostRate | None, backend: str) -> str:
    if rate is None:
        return f"{backend}: no cost rate yet"
    price = "unpriced (no tokens yet)" if rate.usd_per_million_tokens is None else f"${rate.usd_per_million_tokens}/1M tokens"
    why = f" ({rate.reason})" if rate.reason else ""
    return (
        f"{backend}: ${header_value(rate)}/h source={rate.source}{why} power={rate.power_watts}W "
        f"tokens/h={rate.tokens_per_hour if rate.tokens_per_hour is not None else '-'} {price}"
    )


async def _main(args: argparse.Namespace) -> int:
    spec = load_spec(args.config)
    sinks: list[RateSink] = [PrometheusGauges.default()]
    sampler_sinks: list[RateSink] = []
    if args.kubernetes_status or spec.kubernetes_status:
        from .k8s import KubernetesStatusPublisher

        sampler_sinks.append(KubernetesStatusPublisher(spec))
    rates = CostRates(
        spec, store=open_rate_publisher(args.store) if args.store else None, sinks=sinks, sampler_sinks=sampler_sinks
    )
    try:
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.metrics_host)
        if args.once:
            for name, rate in (await rates.refresh_all()).items():
                print(describe(rate, name), flush=True)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        interval = min(b.sample_interval_seconds for b in spec.backends.values()) if spec.backends else 60
        while not stop.is_set():
            for name, rate in (await rates.refresh_all()).items():
                print(describe(rate, name), flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        return 0
    finally:
        await rates.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extproc.costrate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML file with a self_hosted: section")
    p.add_argument("--store", default=None, help="sqlite:PATH | redis://HOST:PORT | redis+cluster://HOST:PORT")
    p.add_argument("--metrics-port", type=int, default=0, help="serve the gauges on this port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--once", action="store_true")
    p.add_argument("--kubernetes-status", action="store_true", help="patch InferenceService status.costRatePerHour")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
