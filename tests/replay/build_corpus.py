"""Import recorded provider exchanges from VCR cassettes into tests/replay/corpus/.

A developer tool, not run by the tests: the cassettes live in public
repositories (see corpus/SOURCES.md), fetched as git mirrors. It copies data
only (one interaction of one cassette = one exchange file), scrubs secrets
from headers, and records the usage the provider reported, read from the
recorded body by `reference.reported_usage`.

    python -m tests.replay.build_corpus --mirror OWNER/NAME=/path/to/git/dir ...

Exchange file (JSON, one per exchange):
    id, api, kind ("json" | "sse" | "error"),
    source: {repo, path, interaction, commit, license}, derived: null | {from, how},
    request: {method, path, headers: {name: value}, body: <text>},
    response: {status, headers: [[name, value], ...], body: <text> | body_base64: <base64>},
    usage: null | {reported: <the provider's usage object(s)>, buckets: {input, cached_input,
                   cache_write, output, reasoning}}
`body` is the exact recorded text when it is UTF-8 and not content-encoded;
otherwise `body_base64` holds the recorded bytes (e.g. gzip as sent).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.replay.reference import reported_usage

CORPUS = Path(__file__).parent / "corpus"

REPOS = {
    "O": ("traceloop/openllmetry", "Apache-2.0"),
    "D": ("DataDog/dd-trace-py", "Apache-2.0 OR BSD-3-Clause"),
}
OL = "packages/opentelemetry-instrumentation-"
DDO = "tests/contrib/openai/cassettes/v1/"
DDA = "tests/contrib/anthropic/cassettes/"
DDL = "tests/contrib/litellm/cassettes/"

# (id, repo key, cassette path, interaction index)
SELECTION: list[tuple[str, str, str, int]] = [
    # OpenAI Chat Completions, JSON
    ("oai-chat-json-plain-gpt35", "O", OL + "openai/tests/traces/cassettes/test_chat/test_chat.yaml", 1),
    ("oai-chat-json-cached-langchain", "O", OL + "langchain/tests/cassettes/test_llms/test_openai.yaml", 0),
    ("oai-chat-json-cache-miss", "O", OL + "openai/tests/traces/cassettes/test_prompt_caching/test_openai_prompt_caching.yaml", 0),
    ("oai-chat-json-cached", "O", OL + "openai/tests/traces/cassettes/test_prompt_caching/test_openai_prompt_caching.yaml", 1),
    ("oai-chat-json-reasoning-gpt5nano", "O", OL + "openai/tests/traces/cassettes/test_chat/test_chat_reasoning.yaml", 0),
    ("oai-chat-json-reasoning-gpt5nano-960", "O", OL + "openai/tests/traces/cassettes/test_chat/test_chat_with_messages_attributes.yaml", 0),
    ("oai-chat-json-reasoning-gpt5-service-tier", "O", OL + "openai/tests/traces/cassettes/test_chat/test_chat_with_service_tier.yaml", 0),
    ("oai-chat-json-tools-parallel", "O", OL + "openai/tests/traces/cassettes/test_functions/test_open_ai_function_calls_tools_parallel.yaml", 1),
    ("oai-chat-json-tools-pydantic", "O", OL + "openai/tests/traces/cassettes/test_chat/test_chat_tool_calls.yaml", 1),
    ("oai-chat-json-tools-gpt41nano", "O", OL + "langchain/tests/cassettes/test_tool_calls/test_parallel_tool_calls.yaml", 0),
    ("oai-chat-json-tools-agno", "O", OL + "agno/tests/cassettes/test_agent/test_agent_with_tools.yaml", 0),
    ("oai-chat-json-reasoning-o3mini", "D", DDL + "completion_reasoning.yaml", 0),
    ("oai-chat-json-reasoning-gpt5-custom-tool", "D", DDO + "chat_completion_custom_tool_call.yaml", 0),
    ("oai-chat-json-cache-write-gpt56", "D", DDO + "chat_completion_prompt_caching_5_6_cache_write.yaml", 0),
    ("oai-chat-json-cached-gpt4o", "D", DDO + "chat_completion_prompt_caching_cache_read.yaml", 0),
    ("oai-chat-json-n2", "D", DDL + "completion_multiple_choices.yaml", 0),
    ("oai-chat-json-crewai", "D", "tests/contrib/crewai/cassettes/test_basic_crew.yaml", 2),
    ("oai-chat-json-parse", "D", DDO + "chat_completion_parse.yaml", 0),
    # OpenAI Chat Completions, SSE
    ("oai-chat-sse-usage", "D", DDL + "completion_stream.yaml", 0),
    ("oai-chat-sse-no-usage", "D", DDL + "completion_stream_exclude_usage.yaml", 0),
    ("oai-chat-sse-usage-n2", "D", DDL + "completion_stream_multiple_choices.yaml", 0),
    ("oai-chat-sse-usage-tools", "D", DDL + "completion_stream_with_tools.yaml", 0),
    ("oai-chat-sse-usage-cached", "D", DDO + "chat_completion_stream_prompt_caching_cache_read.yaml", 0),
    ("oai-chat-sse-usage-tools-pydantic-ai", "D", "tests/contrib/pydantic_ai/cassettes/agent_run_stream_with_tools.yaml", 0),
    ("oai-chat-sse-no-usage-llamaindex", "D", "tests/contrib/llama_index/cassettes/llama_index_chat_stream.yaml", 0),
    ("oai-chat-sse-usage-agno", "O", OL + "agno/tests/cassettes/test_agent/test_agent_arun_streaming.yaml", 0),
    ("oai-chat-sse-no-usage-tools", "O", OL + "langchain/tests/cassettes/test_agents/test_agents.yaml", 2),
    # OpenAI legacy Completions
    ("oai-completions-json", "O", OL + "langchain/tests/cassettes/test_chains/test_asequential_chain.yaml", 0),
    ("oai-completions-sse", "O", OL + "openai/tests/traces/cassettes/test_completions/test_async_completion_streaming.yaml", 0),
    # OpenAI Embeddings
    ("oai-embeddings-ada", "D", "tests/contrib/llama_index/cassettes/llama_index_openai_embedding.yaml", 0),
    # OpenAI Responses
    ("oai-responses-json-reasoning-gpt5mini", "D", DDO + "response_reasoning_tokens.yaml", 0),
    ("oai-responses-json-cached", "D", DDO + "responses_prompt_caching_cache_read.yaml", 0),
    ("oai-responses-json-cache-write-gpt56", "D", DDO + "responses_prompt_caching_5_6_cache_write.yaml", 0),
    ("oai-responses-json-custom-tool-gpt5", "D", DDO + "response_custom_tool_call.yaml", 0),
    ("oai-responses-json-function-call", "D", DDO + "response_function_call.yaml", 0),
    ("oai-responses-json-reasoning-gpt5nano", "O", OL + "openai/tests/traces/cassettes/test_responses/test_responses_reasoning.yaml", 0),
    ("oai-responses-json-agents-tool", "O", OL + "openai-agents/tests/cassettes/test_openai_agents/test_agent_with_function_tool_spans.yaml", 0),
    ("oai-responses-sse", "D", DDO + "response_stream.yaml", 0),
    ("oai-responses-sse-cached", "D", DDO + "responses_stream_prompt_caching_cache_read.yaml", 0),
    ("oai-responses-sse-incomplete", "D", DDO + "response_stream_incomplete.yaml", 0),
    ("oai-responses-sse-function-call", "D", DDO + "response_function_call_streamed.yaml", 0),
    ("oai-responses-sse-gpt41nano", "O", OL + "openai/tests/traces/cassettes/test_responses/test_responses_streaming.yaml", 0),
    # Anthropic Messages, JSON
    ("ant-json-opus", "D", DDA + "anthropic_completion.yaml", 0),
    ("ant-json-tools", "D", DDA + "anthropic_completion_tools.yaml", 0),
    ("ant-json-cache-write", "D", DDA + "anthropic_completion_cache_write.yaml", 0),
    ("ant-json-cache-read", "D", DDA + "anthropic_completion_cache_read.yaml", 0),
    ("ant-json-cache-write-1h", "D", DDA + "anthropic_completion_cache_write_1h_ttl.yaml", 0),
    ("ant-json-thinking", "D", DDA + "anthropic_completion_thinking.yaml", 0),
    ("ant-json-thinking-tools", "D", DDA + "anthropic_completion_thinking_tools.yaml", 0),
    ("ant-json-server-tool-use", "D", DDA + "anthropic_completion_tools_server_tool_use.yaml", 0),
    ("ant-json-cache-read-write-sonnet45", "D", DDL + "completion_anthropic.yaml", 0),
    ("ant-json-thinking-37", "O", OL + "anthropic/tests/cassettes/test_thinking/test_anthropic_thinking_legacy.yaml", 0),
    ("ant-json-cache-write-35", "O", OL + "anthropic/tests/cassettes/test_prompt_caching/test_anthropic_prompt_caching_legacy.yaml", 0),
    ("ant-json-cache-read-35", "O", OL + "anthropic/tests/cassettes/test_prompt_caching/test_anthropic_prompt_caching_legacy.yaml", 1),
    # Anthropic Messages, SSE
    ("ant-sse-opus", "D", DDA + "anthropic_completion_stream.yaml", 0),
    ("ant-sse-cache-write", "D", DDA + "anthropic_completion_stream_cache_write.yaml", 0),
    ("ant-sse-cache-read", "D", DDA + "anthropic_completion_stream_cache_read.yaml", 0),
    ("ant-sse-thinking", "D", DDA + "anthropic_completion_stream_thinking.yaml", 0),
    ("ant-sse-tools", "D", DDA + "anthropic_completion_tools_stream.yaml", 0),
    ("ant-sse-gzip-beta-tools", "D", DDA + "anthropic_completion_beta_tools_stream.yaml", 0),
    ("ant-sse-thinking-37", "O", OL + "anthropic/tests/cassettes/test_thinking/test_anthropic_thinking_streaming_legacy.yaml", 0),
    ("ant-sse-cache-write-35", "O", OL + "anthropic/tests/cassettes/test_prompt_caching/test_anthropic_prompt_caching_stream_legacy.yaml", 0),
    ("ant-sse-cache-read-35", "O", OL + "anthropic/tests/cassettes/test_prompt_caching/test_anthropic_prompt_caching_stream_legacy.yaml", 1),
    ("ant-sse-tools-35", "O", OL + "anthropic/tests/cassettes/test_messages/test_anthropic_tools_streaming_legacy.yaml", 0),
    # Errors
    ("err-oai-chat-400", "O", OL + "openai/tests/traces/cassettes/test_vision/test_vision.yaml", 2),
    ("err-oai-chat-404-gzip", "O", OL + "llamaindex/tests/cassettes/test_agents/test_agents_and_tools.yaml", 2),
    ("err-oai-chat-401", "D", "tests/contrib/llama_index/cassettes/llama_index_chat_error.yaml", 0),
    ("err-oai-completions-401-stream", "D", DDO + "completion_stream_wrong_api_key.yaml", 0),
    ("err-oai-responses-401", "D", DDO + "response_error.yaml", 0),
    ("err-ant-400", "D", DDA + "anthropic_completion_error.yaml", 0),
    ("err-ant-401", "D", DDA + "anthropic_completion_invalid_api_key.yaml", 0),
    ("err-ant-401-stream", "D", "tests/cassettes/anthropic/anthropic_v1_messages_post_a6302ed3.yaml", 0),
]

# Derived exchanges: the recorded response gzip-compressed (as a provider would send it with
# Content-Encoding: gzip). Real compressed recordings are in the corpus too; these add SSE.
GZIP_DERIVED = ["oai-chat-sse-usage", "oai-responses-sse", "ant-sse-cache-read"]
# Derived exchanges: a compressed recording decompressed (Content-Encoding removed), so what the
# recording shows about usage is tested apart from compression (only compressed copies exist).
IDENTITY_DERIVED = ["oai-chat-json-cache-write-gpt56", "oai-responses-json-cache-write-gpt56", "ant-json-thinking", "oai-chat-json-reasoning-o3mini"]

APIS = {
    "/v1/chat/completions": "openai.chat_completions",
    "/v1/completions": "openai.completions",
    "/v1/responses": "openai.responses",
    "/v1/embeddings": "openai.embeddings",
    "/v1/messages": "anthropic.messages",
}
SECRET_HEADERS = {
    "authorization", "x-api-key", "api-key", "cookie", "set-cookie", "openai-organization",
    "openai-project", "anthropic-organization-id", "x-openai-client-user-agent",
}
SECRET_PATTERNS = [re.compile(p) for p in (r"sk-[A-Za-z0-9_-]{16,}", r"sk-ant-[A-Za-z0-9_-]{10,}", r"org-[A-Za-z0-9]{16,}", r"__cf_bm=", r"_cfuvid=")]


class _Loader(yaml.SafeLoader):
    """Cassettes written through aiohttp keep multidict's case-insensitive header keys."""


_Loader.add_constructor(
    "tag:yaml.org,2002:python/object/apply:multidict._multidict.istr", lambda loader, node: loader.construct_sequence(node)[0]
)


def _secret(value: str) -> bool:
    return any(p.search(value) for p in SECRET_PATTERNS)


def _first(v: Any) -> str:
    return str(v[0] if isinstance(v, list) else v)


def _header(headers: list[list[str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _as_bytes(s: Any) -> bytes:
    if s is None:
        return b""
    return s if isinstance(s, bytes) else str(s).encode("utf-8")


def exchange_from_interaction(ident: str, repo: str, licence: str, commit: str, path: str, index: int, it: dict[str, Any]) -> dict[str, Any]:
    rq, rs = it["request"], it["response"]
    uri = rq["uri"]
    req_path = "/" + uri.split("://", 1)[1].split("/", 1)[1]
    api = APIS[req_path.split("?", 1)[0]]
    req_headers = {k.lower(): _first(v) for k, v in (rq.get("headers") or {}).items() if k.lower() not in SECRET_HEADERS and not _secret(_first(v))}
    req_body = _as_bytes(rq.get("body")).decode("utf-8")
    resp_headers = [
        [k, str(v)] for k, vs in (rs.get("headers") or {}).items() if k.lower() not in SECRET_HEADERS for v in (vs if isinstance(vs, list) else [vs]) if not _secret(str(v))
    ]
    body = _as_bytes((rs.get("body") or {}).get("string"))
    status = int(rs["status"]["code"])
    ctype = _header(resp_headers, "content-type") or ""
    enc = _header(resp_headers, "content-encoding")
    stream = "text/event-stream" in ctype
    usage = reported_usage(api, body, content_type=ctype, content_encoding=enc) if 200 <= status < 300 else None
    response: dict[str, Any] = {"status": status, "headers": resp_headers}
    if enc is None:
        response["body"] = body.decode("utf-8")
    else:
        response["body_base64"] = base64.b64encode(body).decode("ascii")
    return {
        "id": ident,
        "api": api,
        "kind": "error" if not 200 <= status < 300 else ("sse" if stream else "json"),
        "source": {"repo": repo, "path": path, "interaction": index, "commit": commit, "license": licence},
        "derived": None,
        "request": {"method": rq.get("method", "POST"), "path": req_path, "headers": req_headers, "body": req_body},
        "response": response,
        "usage": usage,
    }


def gzip_variant(ex: dict[str, Any]) -> dict[str, Any]:
    body = ex["response"]["body"].encode("utf-8")
    headers = [[k, v] for k, v in ex["response"]["headers"] if k.lower() not in ("content-length", "content-encoding")]
    headers.append(["Content-Encoding", "gzip"])
    new = json.loads(json.dumps(ex))
    new["id"] = ex["id"] + "-gzip-derived"
    new["derived"] = {"from": ex["id"], "how": "recorded body gzip-compressed (mtime 0), Content-Encoding: gzip added"}
    new["response"] = {"status": ex["response"]["status"], "headers": headers, "body_base64": base64.b64encode(gzip.compress(body, mtime=0)).decode("ascii")}
    return new


def identity_variant(ex: dict[str, Any]) -> dict[str, Any]:
    body = gzip.decompress(base64.b64decode(ex["response"]["body_base64"]))
    headers = [[k, v] for k, v in ex["response"]["headers"] if k.lower() not in ("content-length", "content-encoding")]
    new = json.loads(json.dumps(ex))
    new["id"] = ex["id"] + "-identity-derived"
    new["derived"] = {"from": ex["id"], "how": "recorded gzip body decompressed, Content-Encoding removed"}
    new["response"] = {"status": ex["response"]["status"], "headers": headers, "body": body.decode("utf-8")}
    return new


def check_no_secrets(text: str, where: str) -> None:
    for p in SECRET_PATTERNS:
        if p.search(text):
            raise SystemExit(f"{where}: looks like a secret ({p.pattern}); scrub it before committing")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", action="append", default=[], help="OWNER/NAME=path of a git directory")
    args = ap.parse_args()
    mirrors = dict(m.split("=", 1) for m in args.mirror)
    CORPUS.mkdir(exist_ok=True)
    built: dict[str, dict[str, Any]] = {}
    for ident, key, path, index in SELECTION:
        repo, licence = REPOS[key]
        git = mirrors[repo]
        commit = subprocess.run(["git", "-C", git, "log", "-1", "--format=%H", "HEAD", "--", path], capture_output=True, text=True, check=True).stdout.strip()
        raw = subprocess.run(["git", "-C", git, "show", f"HEAD:{path}"], capture_output=True, check=True).stdout
        doc = yaml.load(raw, Loader=_Loader)
        built[ident] = exchange_from_interaction(ident, repo, licence, commit, path, index, doc["interactions"][index])
    for ident in GZIP_DERIVED:
        v = gzip_variant(built[ident])
        built[v["id"]] = v
    for ident in IDENTITY_DERIVED:
        v = identity_variant(built[ident])
        built[v["id"]] = v
    for ident, ex in built.items():
        text = json.dumps(ex, indent=1, ensure_ascii=False) + "\n"
        check_no_secrets(text, ident)
        (CORPUS / f"{ident}.json").write_text(text)
    write_sources(built)
    print(f"{len(built)} exchanges written to {CORPUS}")


def write_sources(built: dict[str, dict[str, Any]]) -> None:
    lines = [
        "# Sources of the replay corpus",
        "",
        "Every exchange was recorded against the real OpenAI or Anthropic API by the tests of the",
        "repository named below (VCR cassettes) and copied here as data by `tests/replay/build_corpus.py`:",
        "one interaction of one cassette per file, request and response as recorded, with API keys,",
        "cookies and organization/project ids removed from the headers. Bodies are untouched",
        "(compressed bodies keep their recorded bytes, in `body_base64`). Files marked *derived* are",
        "a recorded exchange transformed as stated. `usage` in each file is computed from the recorded",
        "body by `tests/replay/reference.py`.",
        "",
        "Licences: traceloop/openllmetry is Apache-2.0; DataDog/dd-trace-py is dual-licensed",
        "Apache-2.0 OR BSD-3-Clause. Both are permissive; their LICENSE files require keeping the",
        "copyright notice, which is the repository named here.",
        "",
        "| file | api | status | repository | path (interaction) | commit | licence |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ident in sorted(built):
        ex = built[ident]
        src = ex["source"]
        note = f" *derived: {ex['derived']['how']}*" if ex["derived"] else ""
        lines.append(
            f"| {ident}.json{note} | {ex['api']} | {ex['response']['status']} | {src['repo']} | "
            f"`{src['path']}` ({src['interaction']}) | {src['commit'][:12]} | {src['license']} |"
        )
    (CORPUS / "SOURCES.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
