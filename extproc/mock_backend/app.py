"""aiohttp handlers: parse, count, decide the usage, then pace the bytes out.

Everything about *what* is sent lives in ``usage`` (figures) and ``generate``
(shapes); this module only decides *when*: it sleeps the first-byte and
per-token delays and writes each streamed token as it is "generated", so a
client sees the first chunk long before the last and the GPU model sees load.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import generate as g
from . import tools
from .config import MockConfig
from .gpu import SimulatedGPU
from .stats import Stats
from .usage import BadRequest, Knobs, Usage, decide

INFERENCE_PATHS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
}

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_METRICS_HEADERS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Backend:
    """The state of one mock backend: config, counters and simulated GPUs."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.gpu = SimulatedGPU(
            gpus=config.gpus, tdp_watts=config.tdp_watts, idle_watts=config.idle_watts, hostname=config.name
        )

    # ------------------------------------------------------------------ plumbing

    def handler(self, api: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.hit(request.path)
            self.stats.in_flight += 1
            self.gpu.begin()
            try:
                return await self._inference(request, api)
            finally:
                self.stats.in_flight -= 1
                self.gpu.end()

        return handle

    def _generated(self, model: str, n: int) -> None:
        if n:
            self.stats.generated(model, n)
            self.gpu.add_tokens(n)

    @staticmethod
    def _error(api: str, status: int, message: str, param: str | None = None) -> web.Response:
        body = g.anthropic_error(status, message) if api == "messages" else g.openai_error(status, message, param)
        return web.Response(status=status, body=_dumps(body).encode(), content_type=_JSON)

    # ------------------------------------------------------------------ inference

    async def _inference(self, request: web.Request, api: str) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model:
            self.stats.model(model)
        try:
            knobs = Knobs.from_headers(request.headers)
        except BadRequest as e:
            return self._error(api, 400, e.message)
        if knobs.status is not None:
            if knobs.first_byte_delay_ms:
                await asyncio.sleep(knobs.first_byte_delay_ms / 1000)
            err = self._error(api, knobs.status, f"mock backend forced status {knobs.status}")
            if knobs.retry_after_ms is not None:
                err.headers["retry-after-ms"] = f"{knobs.retry_after_ms:g}"
            return err
        if not isinstance(body, dict):
            return self._error(api, 400, "request body is not a valid JSON object")
        if not isinstance(model, str) or not model:
            param = "model"
            return self._error(api, 400, "model: Field required" if api == "messages" else "'model' is required", param)
        try:
            usage = decide(api, body, knobs, self.config.default_output_tokens)
        except BadRequest as e:
            return self._error(api, 400, e.message, e.param)
        self.stats.prompt(model, usage.prompt)

        delay_ms = self.config.token_delay_ms if knobs.delay_ms is None else knobs.delay_ms
        delay_s = delay_ms / 1000
        first_s = knobs.first_byte_delay_ms / 1000
        with_usage = not knobs.no_usage
        created = int(time.time())

        if api == "embeddings":
            if first_s:
                await asyncio.sleep(first_s)
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            fmt = "base64" if body.get("encoding_format") == "base64" else "float"
            obj = g.embeddings_json(model=model, inputs=inputs, usage=usage, encoding_format=fmt)
            return web.Response(body=_dumps(obj).encode(), content_type=_JSON)

        tool = tools.forced(api, body)  # the request forces a tool call: the model makes one
        if body.get("stream") is True:
            plan = self._plan(api, body, model, usage, created, with_usage)
            if tool is not None:
                plan = tools.with_call_stream(api, plan, tool, chunk_id=f"chatcmpl-{uuid.uuid4().hex}", model=model)
            return await self._stream(request, plan, model, usage, first_s, delay_s)

        total = first_s + delay_s * usage.output
        if total > 0:
            await asyncio.sleep(total)
        obj = self._json(api, body, model, usage, created, with_usage)
        if tool is not None:
            obj = tools.with_call(api, obj, tool)
        self._generated(model, usage.completion)
        return web.Response(body=_dumps(obj).encode(), content_type=_JSON)

    @staticmethod
    def _json(api: str, body: dict[str, Any], model: str, usage: Usage, created: int, with_usage: bool) -> Any:
        hexid = uuid.uuid4().hex
        if api == "chat":
            return g.chat_json(id=f"chatcmpl-{hexid}", created=created, model=model, usage=usage, with_usage=with_usage)
        if api == "completions":
            return g.completion_json(id=f"cmpl-{hexid}", created=created, model=model, usage=usage, with_usage=with_usage)
        if api == "responses":
            return g.responses_json(
                id=f"resp_{hexid}", msg_id=f"msg_{hexid}", created=created, body=body, usage=usage, with_usage=with_usage
            )
        return g.messages_json(id=f"msg_{hexid[:24]}", model=model, usage=usage, with_usage=with_usage)

    @staticmethod
    def _plan(api: str, body: dict[str, Any], model: str, usage: Usage, created: int, with_usage: bool) -> g.SSEPlan:
        hexid = uuid.uuid4().hex
        if api in ("chat", "completions"):
            opts = body.get("stream_options")
            include = isinstance(opts, dict) and opts.get("include_usage") is True
            build = g.chat_stream if api == "chat" else g.completion_stream
            prefix = "chatcmpl-" if api == "chat" else "cmpl-"
            return build(
                id=prefix + hexid,
                created=created,
                model=model,
                usage=usage,
                include_usage=include,
                with_usage=with_usage,
            )
        if api == "responses":
            return g.responses_stream(
                id=f"resp_{hexid}", msg_id=f"msg_{hexid}", created=created, body=body, usage=usage, with_usage=with_usage
            )
        return g.messages_stream(id=f"msg_{hexid[:24]}", model=model, usage=usage, with_usage=with_usage)

    async def _stream(
        self, request: web.Request, plan: g.SSEPlan, model: str, usage: Usage, first_s: float, delay_s: float
    ) -> web.StreamResponse:
        if first_s > 0:
            await asyncio.sleep(first_s)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        sent, unsent, completed = 0, 0, False
        try:
            if delay_s <= 0:
                await resp.write(plan.joined())
                sent = usage.completion
                self._generated(model, sent)
                await resp.write_eof()
            else:
                await resp.write(plan.head)
                sent = usage.reasoning * usage.n
                self._generated(model, sent)
                for step in plan.steps:
                    await asyncio.sleep(delay_s)  # the next token is being generated
                    self._generated(model, usage.n)
                    unsent = usage.n
                    if request.transport is None:  # its client left meanwhile: generated for nobody; stop
                        raise ConnectionResetError
                    await resp.write(step)
                    sent, unsent = sent + unsent, 0
                await resp.write(plan.tail)
                await resp.write_eof()
            completed = True
        except ConnectionError:  # the client went away (a cancelled handler too): stop generating
            pass
        finally:
            rid = request.headers.get("x-request-id", "")
            self.stats.stream_ended(rid, model, sent, after_disconnect=None if completed else unsent)
        return resp

    # ------------------------------------------------------------------ introspection

    async def stats_get(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps(self.stats.snapshot()).encode(), content_type=_JSON)

    async def streams(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps(list(self.stats.streams)).encode(), content_type=_JSON)

    async def stats_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.Response(body=_dumps(self.stats.snapshot()).encode(), content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        text = self.gpu.prometheus() + self.stats.prometheus()
        return web.Response(body=text.encode(), headers=_METRICS_HEADERS)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def dispatch(self, request: web.Request) -> web.Response:
        """Stands in for an orchestrator's task dispatch (the ext_authz demo's upstream)."""
        return web.json_response({"accepted": True})


BACKEND = web.AppKey("mock_backend", Backend)
"""``app[BACKEND]`` is the app's Backend (stats, simulated GPU) for in-process tests."""


async def _tag(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-mock-backend"] = request.app[BACKEND].config.name


def make_app(config: MockConfig | None = None) -> web.Application:
    """The mock backend as an aiohttp application (no middlewares, nothing per request but the work)."""
    backend = Backend(config or MockConfig())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BACKEND] = backend
    for path, api in INFERENCE_PATHS.items():
        app.router.add_post(path, backend.handler(api))
    app.router.add_get("/stats", backend.stats_get)
    app.router.add_post("/stats/reset", backend.stats_reset)
    app.router.add_get("/stats/streams", backend.streams)
    app.router.add_get("/metrics", backend.metrics)
    app.router.add_get("/healthz", backend.healthz)
    app.router.add_post("/dispatch", backend.dispatch)
    app.on_response_prepare.append(_tag)
    return app


def make_metrics_app(app: web.Application) -> web.Application:
    """Only `/metrics` of `app`'s backend (DCGM + vLLM counters), for a port of its own: the
    exporter port a cost-rate sampler scrapes, outside the inference port that a budget
    sidecar guards (where /metrics is refused to callers)."""
    metrics = web.Application()
    metrics.router.add_get("/metrics", app[BACKEND].metrics)
    return metrics
