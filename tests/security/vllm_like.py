"""A backend that routes like vLLM's OpenAI server (FastAPI on uvicorn), for the bypass tests.

What matters is not the answers but the routing: uvicorn percent-decodes the
path before Starlette matches it (`/v1/chat%2Fcompletions` and
`/v1/chat/completion%73` both reach the chat handler), FastAPI redirects a
trailing slash, and the server has many more inference routes than the
gateway meters. The route list mirrors vLLM's api_server (`/invocations`,
`/pooling`, `/score`, `/rerank`, audio, LoRA loading, tokenizer, health...)
plus the unprefixed aliases other OpenAI-compatible servers (llama.cpp's
server) answer.

Every request that arrives is counted by path, whatever it is answered
(`GET /_hits`, asked directly, not through Envoy), and every answer carries
`x-backend: vllm-like`, so a test can tell "never reached the backend".

Run: python tests/security/vllm_like.py --port 8000
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

TAG = ("x-backend", "vllm-like")
HITS_PATH = "/_hits"

# path -> the kind of answer (which usage object the real API returns)
POST_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/audio/transcriptions": "audio",
    "/v1/audio/translations": "audio",
    "/v1/score": "pooling",
    "/score": "pooling",
    "/v1/rerank": "pooling",
    "/rerank": "pooling",
    "/v2/rerank": "pooling",
    "/pooling": "pooling",
    "/classify": "pooling",
    "/invocations": "chat",  # SageMaker: dispatches on the body's shape
    "/tokenize": "plain",
    "/detokenize": "plain",
    "/v1/load_lora_adapter": "plain",
    "/v1/unload_lora_adapter": "plain",
    "/ping": "plain",
    # unprefixed aliases (llama.cpp server and other OpenAI-compatible servers)
    "/chat/completions": "chat",
    "/completions": "completion",
    "/embeddings": "embedding",
}
GET_ROUTES = ("/health", "/ping", "/version", "/v1/models", "/metrics", "/load")


def usage_for(kind: str, body: dict[str, Any], raw: bytes) -> dict[str, Any] | None:
    prompt = max(1, len(raw) // 4)
    out = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens") or 16
    out = out if isinstance(out, int) and 0 < out < 1 << 20 else 16
    if kind in ("chat", "completion"):
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
    if kind in ("embedding", "pooling", "audio"):
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    if kind == "responses":
        return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out}
    if kind == "messages":
        return {"input_tokens": prompt, "output_tokens": out}
    return None


def answer(kind: str, body: dict[str, Any], raw: bytes) -> dict[str, Any]:
    model = body.get("model") if isinstance(body.get("model"), str) else "served-model"
    out: dict[str, Any] = {"id": f"{kind}-{time.monotonic_ns()}", "object": kind, "model": model}
    if kind == "chat":
        out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]
    elif kind == "completion":
        out["choices"] = [{"index": 0, "text": "ok", "finish_reason": "stop"}]
    elif kind == "embedding":
        out["data"] = [{"index": 0, "object": "embedding", "embedding": [0.0, 1.0]}]
    elif kind == "responses":
        out["output"] = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]
    elif kind == "messages":
        out["content"] = [{"type": "text", "text": "ok"}]
    elif kind == "audio":
        out["text"] = "ok"
    elif kind == "pooling":
        out["data"] = [{"index": 0, "score": 0.5}]
    usage = usage_for(kind, body, raw)
    if usage is not None:
        out["usage"] = usage
    return out


def make_app() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    hits: Counter[str] = Counter()

    @app.middleware("http")
    async def count(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path != HITS_PATH:
            hits[request.scope["path"]] += 1
        response = await call_next(request)
        response.headers[TAG[0]] = TAG[1]
        return response

    @app.get(HITS_PATH)
    async def get_hits() -> dict[str, Any]:
        return {"total": sum(hits.values()), "by_path": dict(hits)}

    def post_handler(kind: str):  # type: ignore[no-untyped-def]
        async def handle(request: Request) -> JSONResponse:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            return JSONResponse(answer(kind, body if isinstance(body, dict) else {}, raw))

        return handle

    for path, kind in POST_ROUTES.items():
        app.add_api_route(path, post_handler(kind), methods=["POST"])

    async def plain() -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "served-model", "object": "model"}]}

    for path in GET_ROUTES:
        app.add_api_route(path, models if path == "/v1/models" else plain, methods=["GET"])
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(make_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
