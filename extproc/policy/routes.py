"""Which paths exist for the budget gate, and what each one is.

Closed world: a request is metered (its API schema, or a flat price per
request), listed as unmetered (identity still required) or public (no
identity), explicitly denied, or it matches nothing and is refused. Nothing
is forwarded because it was not understood.

Patterns are `/`-separated; a `{name}` segment matches any one segment
(Azure's `{deployment}`, a model id), and a final `*` matches one or more
remaining segments. Literal segments match case-insensitively. The policy's
own routes come first, in order, then extproc's defaults
(`extproc/data/default_routes.yaml`) unless `default_routes: false`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..money import decimal_str

Action = Literal["meter", "flat", "unmetered", "public", "deny"]
ApiName = Literal["openai.chat", "openai.completions", "openai.responses", "openai.embeddings", "anthropic.messages"]
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_SEGMENT = re.compile(r"^([A-Za-z0-9._~!$&'()+,=:@-]+|\{[a-z_]+\}|\*)$")


class RouteSpec(BaseModel):
    """One path pattern and what requests to it are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="/v1/chat/completions, /openai/deployments/{deployment}/chat/completions, /v1/audio/*")
    methods: tuple[str, ...] = ("POST",)
    action: Action = "meter"
    api: ApiName | None = Field(None, description="meter: the API schema of the body")
    price: str | None = Field(None, description="flat: USD charged per request")
    model_param: str | None = Field(None, description="meter: the path parameter that names the model (Azure {deployment})")
    note: str | None = Field(None, description="shown to the caller when the route is denied")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or v != v.strip():
            raise ValueError("a route path starts with / and has no spaces around it")
        parts = v.strip("/").split("/")
        for i, seg in enumerate(parts):
            if not _SEGMENT.match(seg):
                raise ValueError(f"route path segment {seg!r} is not a literal, a {{name}} or a final *")
            if seg == "*" and i != len(parts) - 1:
                raise ValueError("* may only be the last segment of a route path")
        return v

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, v: object) -> str | None:
        return None if v is None else decimal_str(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(m.upper() for m in v)
        bad = [m for m in out if m not in METHODS]
        if bad or not out:
            raise ValueError(f"methods must be a non-empty list of {', '.join(sorted(METHODS))}")
        return out

    @model_validator(mode="after")
    def _check(self) -> RouteSpec:
        if (self.action == "meter") != (self.api is not None):
            raise ValueError("`api` is required for action meter and only allowed there")
        if (self.action == "flat") != (self.price is not None):
            raise ValueError("`price` is required for action flat and only allowed there")
        if self.model_param is not None and f"{{{self.model_param}}}" not in self.path:
            raise ValueError(f"model_param {self.model_param!r} is not a parameter of {self.path}")
        return self


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A request's route: the spec, the path parameters and the canonical path to forward."""

    spec: RouteSpec
    params: Mapping[str, str]
    path: str


@dataclass(frozen=True, slots=True)
class _Compiled:
    spec: RouteSpec
    parts: tuple[str, ...]  # literal segments lower-cased, "{name}" or "*"


def _compile(spec: RouteSpec) -> _Compiled:
    parts = tuple(p if p.startswith("{") or p == "*" else p.lower() for p in spec.path.strip("/").split("/"))
    return _Compiled(spec, parts)


def _match(c: _Compiled, segments: tuple[str, ...]) -> dict[str, str] | None:
    parts = c.parts
    wild = parts[-1] == "*"
    if (len(segments) < len(parts)) if wild else (len(segments) != len(parts)):
        return None
    params: dict[str, str] = {}
    for part, seg in zip(parts, segments, strict=False):  # a trailing * matches the rest
        if part == "*":
            break
        if part.startswith("{"):
            params[part[1:-1]] = seg
        elif part != seg.lower():
            return None
    return params


def _canonical(c: _Compiled, segments: tuple[str, ...]) -> str:
    """The route's own spelling of the literal segments, the request's of the rest."""
    literal = c.spec.path.strip("/").split("/")
    out = [lit if not (lit.startswith("{") or lit == "*") else seg for lit, seg in zip(literal, segments, strict=False)]
    if literal[-1] == "*":
        out[len(literal) - 1 :] = segments[len(literal) - 1 :]
    return "/" + "/".join(out)


FOUND_MAX = 4096  # (path, method) answers a route table remembers


class RouteTable:
    """Routes in match order. `find` returns the first route whose path matches (any method)
    and whether the method is allowed there, so the caller can answer 404 or 405."""

    def __init__(self, specs: tuple[RouteSpec, ...]) -> None:
        self._routes = tuple(_compile(s) for s in specs)
        self._found: dict[tuple[tuple[str, ...], str], tuple[RouteMatch | None, bool]] = {}  # every call repeats a few

    def find(self, segments: tuple[str, ...], method: str) -> tuple[RouteMatch | None, bool]:
        key = (segments, method)
        found = self._found.get(key)
        if found is None:
            found = self._find(segments, method)
            if len(self._found) >= FOUND_MAX:  # paths a caller made up: start over rather than grow
                self._found.clear()
            self._found[key] = found
        return found

    def _find(self, segments: tuple[str, ...], method: str) -> tuple[RouteMatch | None, bool]:
        path_seen = False
        for c in self._routes:
            params = _match(c, segments)
            if params is None:
                continue
            path_seen = True
            if method in c.spec.methods:
                return RouteMatch(c.spec, params, _canonical(c, segments)), True
        return None, path_seen

    @property
    def specs(self) -> tuple[RouteSpec, ...]:
        return tuple(c.spec for c in self._routes)


@functools.cache
def default_routes() -> tuple[RouteSpec, ...]:
    """The routes extproc ships (OpenAI, OpenAI-compatible servers, Azure OpenAI, Anthropic)."""
    text = resources.files("extproc").joinpath("data/default_routes.yaml").read_text()
    return tuple(RouteSpec.model_validate(r) for r in yaml.safe_load(text)["routes"])
