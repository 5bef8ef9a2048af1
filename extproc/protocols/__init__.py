"""Sans-IO parsing of the inference APIs: bytes in, frozen facts out.

No sockets, no gRPC, no tokenizer: token counting is injected as a callable.
Client faults raise `BadRequest`/`BodyTooLarge`; backend faults raise (or, in
a stream, record) `UpstreamError`.

    path = normalize(":path value")                   # RequestPath, or BadPath (400)
    schema = schema_by_name("openai.chat")            # the route that matched names the API
    facts = schema.parse_request(body)                # RequestFacts (media, builtin_tools, …)
    body = schema.rewrite_request(facts, model=..., include_usage=True, max_output=..., cap_field=None, stream=None)
    usage = schema.usage_from_body(response_body, content_encoding=...)   # buffered JSON response
    reader = schema.stream_reader(strip_usage_chunk=..., count_tokens=..., content_encoding=...)
    forward = reader.feed(chunk) ... reader.finish(); reader.usage, reader.counted_output_tokens
    reader.may_rewrite, reader.usage_complete, reader.terminal, reader.decode_error
    asm = assembler_for(schema.name); asm.take(event, obj) ...; asm.body(cut=..., usage=...)   # JSON from a stream
    reader = schema.stream_reader(..., cuttable=True)  # forwards whole events only
    end = reader.cut(reason="budget_exhausted", scope="key:bob", usage=..., include_usage=...)
                                                      # the API's own end (ending.py); None if encoded
"""

from extproc.protocols.assemble import Assembler, assembler_for
from extproc.protocols.encoding import (
    ContentDecoder,
    DecodedTooLarge,
    DecodeError,
    UnsupportedEncoding,
    content_decoder,
)
from extproc.protocols.media import MediaPart
from extproc.protocols.paths import BadPath, RequestPath, normalize
from extproc.protocols.request import MAX_OUTPUT_TOKENS_LIMIT, RequestFacts
from extproc.protocols.schemas import (
    ANTHROPIC_MESSAGES,
    DEFAULT_MAX_REQUEST_BYTES,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES,
    SCHEMAS,
    Schema,
    schema_by_name,
)
from extproc.protocols.sse import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    SSEEvent,
    SSEParser,
)
from extproc.protocols.stream import StreamReader
from extproc.protocols.usage import Usage

__all__ = [
    "ANTHROPIC_MESSAGES",
    "Assembler",
    "assembler_for",
    "ContentDecoder",
    "DecodeError",
    "DecodedTooLarge",
    "MediaPart",
    "UnsupportedEncoding",
    "content_decoder",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_OUTPUT_TOKENS_LIMIT",
    "OPENAI_CHAT",
    "OPENAI_COMPLETIONS",
    "OPENAI_EMBEDDINGS",
    "OPENAI_RESPONSES",
    "SCHEMAS",
    "EventTooLarge",
    "RequestFacts",
    "SSEEvent",
    "SSEParser",
    "Schema",
    "StreamReader",
    "Usage",
    "schema_by_name",
    "normalize",
    "RequestPath",
    "BadPath",
]
