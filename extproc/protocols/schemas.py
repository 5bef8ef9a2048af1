"""The metered API schemas: one small description object each.

A `Schema` says declaratively what every API has in some form (its path, its
error envelope, whether it streams, which fields cap the output, which
fields multiply it, whether it knows `stream_options`) and points at the
three schema-specific readers (request content, usage object, stream event)
kept in `openai.py` and `anthropic.py`. Everything else (JSON decoding, size
and type checks, rewriting, stream framing) is written once, in `Schema`
and `StreamReader`, so there are no provider branches scattered around.

The server picks a schema by name from the route that matched `:path`
(`policy.routes`, `schema_by_name`) and keeps it for the whole exchange.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from extproc.errors import BadRequest, BodyTooLarge, UpstreamError
from extproc.protocols import anthropic, openai
from extproc.protocols.encoding import DEFAULT_MAX_DECODED_BYTES, content_decoder
from extproc.protocols.ending import ChatEnding, Ending, MessagesEnding, ResponsesEnding
from extproc.protocols.request import (
    MAX_N,
    MAX_OUTPUT_TOKENS_LIMIT,
    Content,
    RequestFacts,
    positive_int,
)
from extproc.protocols.sse import DEFAULT_MAX_EVENT_BYTES
from extproc.protocols.stream import Observation, Observer, StreamReader
from extproc.protocols.usage import (
    Usage,
    anthropic_usage,
    client_tool_calls,
    openai_usage,
    responses_usage,
)

DEFAULT_MAX_REQUEST_BYTES = 8 << 20

Envelope = Literal["openai", "anthropic"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# NaN/Infinity are not JSON; a body with them is refused rather than forwarded.
_decode_request = json.JSONDecoder(parse_constant=_reject_constant).decode


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True, eq=False)
class Schema:
    """One API schema. Instances are module constants; compare them by identity."""

    name: str
    path: str
    envelope: Envelope
    streams: bool
    max_output_fields: tuple[str, ...]
    """Fields capping output per choice, preferred first; the first is also
    the one set when the client gave none. Empty: the API generates no output."""
    n_fields: tuple[str, ...]
    """Fields multiplying the output (the largest wins); empty: always 1."""
    include_usage_option: bool
    """Streams report usage only when asked via `stream_options.include_usage`."""
    read_content: Callable[[dict[str, Any]], Content] = field(repr=False)
    read_usage: Callable[[Any], Usage | None] = field(repr=False)
    observe: Observer | None = field(repr=False)
    read_body: Callable[[dict[str, Any]], Usage | None] | None = field(default=None, repr=False)
    """Usage of a whole buffered response object; None: `read_usage` of its `usage`."""
    ending: Callable[[], Ending] | None = field(default=None, repr=False)
    """How a stream of this API is ended early (`ending.py`); None: it does not stream."""

    # --- request -------------------------------------------------------------------

    def parse_request(
        self, body: bytes, *, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES, model: str | None = None
    ) -> RequestFacts:
        """Validate a request body and extract its facts.

        `model` comes from the path when the route names it (Azure's
        `/openai/deployments/{deployment}/...`): the backend serves the
        deployment whatever the body says, so the body's `model` is ignored.
        Raises BodyTooLarge above `max_bytes`, BadRequest (with `param`) for
        anything else the client got wrong; never anything else.
        """
        if len(body) > max_bytes:
            raise BodyTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
        try:
            obj = _decode_request(bytes(body).decode("utf-8"))
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BadRequest("request body must be a JSON object")
        try:
            return self._facts(obj, model)
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None

    def _facts(self, obj: dict[str, Any], model_from_path: str | None = None) -> RequestFacts:
        model = model_from_path or obj.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` must be a non-empty string", param="model")
        stream = False
        if self.streams:
            value = obj.get("stream")
            if value is not None and not isinstance(value, bool):
                raise BadRequest("`stream` must be a boolean", param="stream")
            stream = bool(value)
        include_usage = False
        if self.include_usage_option:
            options = obj.get("stream_options")
            if options is not None:
                if not isinstance(options, dict):
                    raise BadRequest("`stream_options` must be an object", param="stream_options")
                asked = options.get("include_usage")
                if asked is not None and not isinstance(asked, bool):
                    raise BadRequest(
                        "`stream_options.include_usage` must be a boolean",
                        param="stream_options.include_usage",
                    )
                include_usage = asked is True
        max_output: int | None = None if self.max_output_fields else 0
        for key in self.max_output_fields:
            value = obj.get(key)
            if value is not None:
                value = positive_int(value, key, MAX_OUTPUT_TOKENS_LIMIT)
                if max_output is None:
                    max_output = value
        n = 1
        for key in self.n_fields:
            value = obj.get(key)
            if value is not None:
                n = max(n, positive_int(value, key, MAX_N))
        c = self.read_content(obj)
        return RequestFacts(
            model=model,
            stream=stream,
            max_output=max_output,
            n=n,
            include_usage=include_usage,
            segments=tuple(c.segments),
            images=c.images,
            has_tools=c.has_tools,
            json_mode=c.json_mode,
            pretokenized=c.pretokenized,
            media=tuple(c.media),
            previous_response_id=c.previous_response_id,
            builtin_tools=frozenset(c.builtin_tools),
            raw=obj,
        )

    def rewrite_request(
        self,
        facts: RequestFacts,
        *,
        model: str | None = None,
        include_usage: bool = False,
        max_output: int | None = None,
        cap_field: str | None = None,
        stream: bool | None = None,
    ) -> bytes:
        """New body bytes with `model` replaced, `stream_options.include_usage`
        injected (streaming chat/completions only) and the per-choice output
        cap set in the fields `cap_fields(facts, cap_field)` names (the other
        cap fields are removed when `cap_field` is given). Other fields are
        kept as they were; `facts.raw` is not touched.

        `stream=True` asks the backend to stream whatever the client asked
        (`"stream": true`, and `include_usage` as if asked: the stream of a
        non-streamed call is assembled back into JSON, see assemble.py, and
        its usage must come with it); `stream=False` asks it not to (and drops
        `stream_options`, refused without `stream`); None keeps the client's."""
        new = dict(facts.raw)
        if model is not None:
            if not isinstance(model, str) or not model:
                raise ValueError("model must be a non-empty string")
            new["model"] = model
        streams = facts.stream
        if stream is not None:
            if not self.streams:
                raise ValueError(f"{self.name} responses do not stream")
            new["stream"] = streams = stream
            include_usage = include_usage or stream
            if not stream:
                new.pop("stream_options", None)
        if include_usage and self.include_usage_option and streams:
            options = new.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            new["stream_options"] = options
        if max_output is not None and self.max_output_fields:
            if type(max_output) is not int or max_output < 1:
                raise ValueError("max_output must be a positive integer")
            keys = self.cap_fields(facts, cap_field)
            for key in self.max_output_fields:
                if key in keys:
                    new[key] = max_output
                elif cap_field is not None:
                    new.pop(key, None)
        try:
            return _dumps(new)
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None

    def cap_fields(self, facts: RequestFacts, cap_field: str | None = None) -> tuple[str, ...]:
        """The fields `rewrite_request` writes the output cap into.

        Every cap field the client used, so the backend sees the request as
        the client shaped it; if it used none, the schema's first: chat
        `max_completion_tokens` (the one reasoning models accept; `max_tokens`
        is deprecated there), completions `max_tokens`, Responses
        `max_output_tokens`, Anthropic `max_tokens`. Each caps one choice:
        with `n` choices the backend may generate `n` times the cap.

        `cap_field` forces one field (and the rewrite drops the others): a
        downshift to a reasoning model needs `max_completion_tokens` even if
        the client wrote `max_tokens`; an older OpenAI-compatible backend may
        know only `max_tokens`. Empty for schemas without output (embeddings).
        """
        if not self.max_output_fields:
            return ()
        if cap_field is not None:
            if cap_field not in self.max_output_fields:
                raise ValueError(f"{self.name} caps output with {self.max_output_fields}, not {cap_field!r}")
            return (cap_field,)
        used = tuple(k for k in self.max_output_fields if facts.raw.get(k) is not None)
        return used or self.max_output_fields[:1]

    # --- response ------------------------------------------------------------------

    def usage_from_body(
        self,
        body: bytes,
        *,
        content_encoding: str | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> Usage | None:
        """Usage of a buffered (non-streamed) JSON response; None if it has none.

        `content_encoding` is the response's header: a compressed body is
        decoded (a copy, at most `max_decoded_bytes`) before it is read.
        Raises UpstreamError (DecodeError and its kinds for the encoding).
        """
        decoder = content_decoder(content_encoding, max_decoded_bytes=max_decoded_bytes)
        if decoder is not None:
            body = decoder.decode_all(body)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise UpstreamError(f"{self.name} response body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise UpstreamError(f"{self.name} response body is not a JSON object")
        usage = self.read_body(obj) if self.read_body is not None else self.read_usage(obj.get("usage"))
        if usage is None:
            return None
        calls = client_tool_calls(obj)  # the tool calls returned for the client: a run's tool_calls budget
        return usage.plus(Usage(function_calls=calls)) if calls else usage

    def stream_reader(
        self,
        *,
        strip_usage_chunk: bool,
        count_tokens: Callable[[str], int] | None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        content_encoding: str | None = None,
        cuttable: bool = False,
        sink: Callable[[str | None, dict[str, Any]], None] | None = None,
    ) -> StreamReader:
        """A reader for one SSE response body of this schema.

        `strip_usage_chunk` only means something where the gateway can inject
        `include_usage` (OpenAI chat/completions); elsewhere usage is always
        reported and the flag is ignored. `content_encoding` is the response's
        header: an encoded stream is observed, never rewritten (see stream.py).
        `cuttable`: forward whole events only, so `reader.cut()` can end the
        stream in this API's terms at any time (identity bodies only).
        `sink` sees every decoded event first (an `assemble.Assembler` building
        the JSON answer of a call streamed upstream).
        """
        observe = self.observe
        if observe is None:
            raise ValueError(f"{self.name} responses do not stream")
        if sink is not None:
            inner = observe

            def observe(event: str | None, obj: dict[str, Any]) -> Observation:
                sink(event, obj)
                return inner(event, obj)

        return StreamReader(
            observe,
            strip_usage_chunk=strip_usage_chunk and self.include_usage_option,
            count_tokens=count_tokens,
            max_event_bytes=max_event_bytes,
            content_encoding=content_encoding,
            cuttable=cuttable,
            ending=self.ending,
        )


OPENAI_CHAT = Schema(
    name="openai.chat",
    path="/v1/chat/completions",
    envelope="openai",
    streams=True,
    max_output_fields=("max_completion_tokens", "max_tokens"),
    n_fields=("n",),
    include_usage_option=True,
    read_content=openai.read_chat,
    read_usage=openai_usage,
    observe=openai.observe_chat,
    ending=ChatEnding,
)

OPENAI_COMPLETIONS = Schema(
    name="openai.completions",
    path="/v1/completions",
    envelope="openai",
    streams=True,
    max_output_fields=("max_tokens",),
    n_fields=("n", "best_of"),  # best_of candidates are generated (and billed) server-side
    include_usage_option=True,
    read_content=openai.read_completions,
    read_usage=openai_usage,
    observe=openai.observe_completions,
    ending=partial(ChatEnding, text=True),
)

OPENAI_RESPONSES = Schema(
    name="openai.responses",
    path="/v1/responses",
    envelope="openai",
    streams=True,
    max_output_fields=("max_output_tokens",),
    n_fields=(),
    include_usage_option=False,
    read_content=openai.read_responses,
    read_usage=responses_usage,
    observe=openai.observe_responses,
    read_body=openai.responses_body,
    ending=ResponsesEnding,
)

OPENAI_EMBEDDINGS = Schema(
    name="openai.embeddings",
    path="/v1/embeddings",
    envelope="openai",
    streams=False,
    max_output_fields=(),
    n_fields=(),
    include_usage_option=False,
    read_content=openai.read_embeddings,
    read_usage=openai_usage,
    observe=None,
)

ANTHROPIC_MESSAGES = Schema(
    name="anthropic.messages",
    path="/v1/messages",
    envelope="anthropic",
    streams=True,
    max_output_fields=("max_tokens",),
    n_fields=(),
    include_usage_option=False,
    read_content=anthropic.read_messages,
    read_usage=anthropic_usage,
    observe=anthropic.observe_messages,
    ending=MessagesEnding,
)

SCHEMAS: tuple[Schema, ...] = (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    OPENAI_EMBEDDINGS,
    ANTHROPIC_MESSAGES,
)

_BY_NAME = {s.name: s for s in SCHEMAS}


def schema_by_name(name: str) -> Schema | None:
    return _BY_NAME.get(name)
