"""Helpers shared by the mock backend tests (SSE and Prometheus text parsing)."""

from __future__ import annotations

import json
import re
from typing import Any


def parse_sse(raw: bytes) -> list[tuple[str | None, str]]:
    """``(event, data)`` per SSE event; every event must end with a blank line."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        event, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        events.append((event, "\n".join(data)))
    return events


def sse_json(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of an OpenAI-style stream, checking it ends with [DONE]."""
    events = parse_sse(raw)
    assert events[-1] == (None, "[DONE]")
    return [json.loads(data) for _, data in events[:-1]]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(metric name -> TYPE, samples) from Prometheus text exposition format."""
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        labels = dict(_LABEL.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def sample(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]
