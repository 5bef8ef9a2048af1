"""Worst-case token estimates for a request, before it reaches the model.

Input: tiktoken counts of the request's segments (one per message, system
prompt, tool definitions) with the model's encoding, plus a fixed overhead per
segment, plus what the non-text parts cost (`media_tokens`: images by the
provider's published formula when their pixel size is known, else the
policy's worst case; audio, files and documents per KiB of inline data; a
part of unknown size, or a stored conversation the request continues, by a
per-part worst case the policy must set, else the request is refused), times
the model's safety factor, and never more than the model's context window
(the provider refuses a longer prompt).

Output: the explicit max output, else the model's output limit, else the
policy fallback; times `n`.

Bounded work per caller (issue 10). Counting never raises (see
`tokenizers.count_text`). `TokenCounter.count_async` counts small uncached
work inline and sends large work to a small thread pool (tiktoken releases
the GIL), at most one large count per owner at a time, so one principal's
8 MB prompt never blocks the event loop nor takes the whole pool. Counts are
cached per segment, so an agent resending its growing context only tokenizes
the new messages; but counting does not fill the cache: `remember(counts)`
does, once the call was allowed, and the cache is bounded in entries and bytes.
`lower_bound_tokens` / `upper_bound_tokens` bound a request from byte lengths
alone, before any tokenizing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol, TypeVar

from .errors import ClientError, InputNotBounded
from .protocols.media import MediaPart
from .records import fast_init
from .tokenizers import count_text, get_encoding, lower_bound, utf8_len

T = TypeVar("T")

PER_SEGMENT_OVERHEAD = 4  # role/name/separators per message (OpenAI's documented 3, rounded up)
PER_REQUEST_OVERHEAD = 3  # the assistant reply primer
MANY_SEGMENTS = 2048  # past this many uncached segments in one request, tiny ones are bounded by bytes
ENTRY_OVERHEAD = 160  # bytes per cache entry besides the text: dict slot, LRU links, key tuple


class Facts(Protocol):
    """What an estimate reads of a request (read-only: `RequestFacts` is frozen)."""

    @property
    def segments(self) -> Sequence[str]: ...
    @property
    def max_output(self) -> int | None: ...
    @property
    def n(self) -> int: ...


@fast_init
@dataclass(frozen=True, slots=True)
class Estimate:
    input_tokens: int
    output_tokens: int  # all choices together


class CountingBusy(ClientError):
    """This caller already has large token counts running and queued (429; retry later)."""

    status = 429
    type = "rate_limit_error"
    code = "tokenizer_busy"


@fast_init
@dataclass(frozen=True, slots=True)
class Counts:
    """The text tokens of one request's segments in one encoding."""

    encoding: str
    tokens: int
    """Sum over segments: tiktoken's exact count, or an upper bound where `exact` is False."""
    exact: bool
    fresh: tuple[tuple[str, int], ...] = ()
    """Segments counted now that the cache may keep; `TokenCounter.remember` stores them."""


def lower_bound_tokens(segments: Sequence[str], encoding: str) -> int:
    """Fewest text tokens these segments can have (no token is longer than 128 bytes)."""
    texts = [s for s in segments if s]
    return lower_bound(_bytes(texts), len(texts), encoding) if texts else 0


def upper_bound_tokens(segments: Sequence[str], encoding: str) -> int:
    """Most text tokens these segments can have (every token is at least one byte)."""
    return _bytes(segments)


def _bytes(segments: Sequence[str]) -> int:
    chars = sum(map(len, segments))
    if all(s.isascii() for s in segments):
        return chars
    return utf8_len("".join(segments))


class TokenCounter:
    """Token counts with an LRU cache bounded in entries and bytes, and bounded work per owner.

    - `count_async` (the service): small uncached work inline, large work on the pool.
    - `count_segments` (sync, blocking): tests, benches, tools.
    - `count(text, encoding)`: one text, e.g. a stream's output delta; reads the cache only.
    - `remember(counts)`: store what an allowed call counted.

    Segments shorter than `min_segment_chars` (cheaper to recount than to keep) or
    longer than `max_segment_chars` are never cached. Cache bytes are accounted as
    `sys.getsizeof(text) + ENTRY_OVERHEAD` per entry.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        min_segment_chars: int = 32,
        max_segment_chars: int = 1024 * 1024,
        remember_per_call: int = 2048,
        inline_chars: int = 32 * 1024,
        inline_segments: int = 512,
        workers: int = 2,
        max_queued_per_owner: int = 2,
        max_wait_s: float = 1.0,
    ) -> None:
        self._cache: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.min_segment_chars = min_segment_chars
        self.max_segment_chars = max_segment_chars
        self.remember_per_call = remember_per_call
        self.inline_chars = inline_chars
        self.inline_segments = inline_segments
        self.hits = 0
        self.misses = 0
        self.offloaded = 0  # counts sent to the pool
        self._lanes = _Lanes(workers, max_queued_per_owner, max_wait_s)

    # -- cache -----------------------------------------------------------------

    @property
    def entries(self) -> int:
        return len(self._cache)

    def _cacheable(self, text: str) -> bool:
        return self.min_segment_chars <= len(text) <= self.max_segment_chars

    def _lookup(self, text: str, encoding: str) -> int | None:
        if not self._cacheable(text):
            return None
        key = (encoding, text)
        n = self._cache.get(key)
        if n is not None:
            self.hits += 1
            self._cache.move_to_end(key)
        return n

    def remember(self, counts: Counts) -> None:
        """Cache the segments of `counts` (call once the request was allowed).

        Keeps the last `remember_per_call` of them (an agent's new messages come
        last), so this stays a few milliseconds on the event loop."""
        cache = self._cache
        for text, n in counts.fresh[-min(self.max_entries, self.remember_per_call) :]:
            key = (counts.encoding, text)
            if key in cache:
                continue
            cache[key] = n
            self.bytes += sys.getsizeof(text) + ENTRY_OVERHEAD
            # evict as we go: the table never grows past the caps, even for one huge request
            while len(cache) > self.max_entries or self.bytes > self.max_bytes:
                (_, old), _ = cache.popitem(last=False)
                self.bytes -= sys.getsizeof(old) + ENTRY_OVERHEAD

    def clear(self) -> None:
        self._cache.clear()
        self.bytes = 0

    # -- counting --------------------------------------------------------------

    def count(self, text: str, encoding: str) -> int:
        """Tokens of one text (cache read, never written): for small texts such as stream deltas."""
        n = self._lookup(text, encoding)
        return n if n is not None else count_text(text, encoding)[0]

    def count_segments(self, segments: Sequence[str], encoding: str) -> Counts:
        """Count inline (blocking). Nothing is cached until `remember`."""
        known, missing = self._split(segments, encoding)
        return self._finish(encoding, known, missing, _count_all(missing, encoding))

    async def count_async(self, segments: Sequence[str], encoding: str, *, owner: str) -> Counts:
        """Count without blocking the event loop for long. Raises `CountingBusy` (429)
        when `owner` already has a large count running and `max_queued_per_owner`
        waiting, or when its turn does not come within `max_wait_s`. Nothing is
        cached until `remember`."""
        get_encoding(encoding)  # unknown encodings fail here, on the caller's side
        if len(segments) > self.inline_segments:
            known, missing = await self._split_yielding(segments, encoding)
        else:
            known, missing = self._split(segments, encoding)
        if len(missing) > MANY_SEGMENTS:  # e.g. 150k one-word messages: bound the tiny ones by their bytes
            missing.sort(key=len)  # order does not matter for a sum; tiny ones first
            # shorter than what the cache keeps: each costs at most its UTF-8 length (every token >= 1 byte)
            tiny = next((i for i, m in enumerate(missing) if len(m) >= self.min_segment_chars), len(missing))
            bounded = [(utf8_len(m), False) for m in missing[:tiny]]
            rest = await self._count(missing[tiny:], encoding, owner)
            return self._finish(encoding, known, missing, bounded + rest)
        return self._finish(encoding, known, missing, await self._count(missing, encoding, owner))

    async def _count(self, missing: list[str], encoding: str, owner: str) -> list[tuple[int, bool]]:
        if len(missing) <= self.inline_segments and sum(map(len, missing)) <= self.inline_chars:
            return _count_all(missing, encoding)
        self.offloaded += 1
        result: list[tuple[int, bool]] = await self._lanes.run(owner, _count_all, missing, encoding)
        return result

    def _split(self, segments: Sequence[str], encoding: str) -> tuple[int, list[str]]:
        known, missing = 0, []
        for s in segments:
            n = self._lookup(s, encoding)
            if n is None:
                missing.append(s)
            else:
                known += n
        return known, missing

    async def _split_yielding(self, segments: Sequence[str], encoding: str) -> tuple[int, list[str]]:
        """`_split` in slices, letting other requests run between them."""
        known, missing = 0, []
        step = self.inline_segments
        for i in range(0, len(segments), step):
            k, m = self._split(segments[i : i + step], encoding)
            known += k
            missing += m
            await asyncio.sleep(0)
        return known, missing

    def _finish(self, encoding: str, known: int, missing: list[str], results: list[tuple[int, bool]]) -> Counts:
        self.misses += len(missing)
        fresh = tuple((s, n) for s, (n, exact) in zip(missing, results, strict=True) if exact and self._cacheable(s))
        return Counts(encoding, known + sum(n for n, _ in results), all(ok for _, ok in results), fresh)

    async def run_large(self, owner: str, fn: Callable[..., T], *args: Any) -> T:
        """Other large per-request work (parsing a multi-megabyte body) in the same lanes as large
        counts: off the event loop, one at a time per owner. Raises `CountingBusy` likewise."""
        result: T = await self._lanes.run(owner, fn, *args)
        return result

    def close(self) -> None:
        self._lanes.close()


def _count_all(texts: Sequence[str], encoding: str) -> list[tuple[int, bool]]:
    return [count_text(t, encoding) for t in texts]


class _Lanes:
    """A thread pool where each owner has one lane: at most one task per owner runs,
    at most `max_queued` more wait (FIFO), none waits longer than `max_wait_s`.

    A task keeps its lane and its worker until its thread finishes, even when the
    awaiting request is cancelled (Envoy timed out), so cancelling and resending
    cannot pile up work."""

    def __init__(self, workers: int, max_queued: int, max_wait_s: float) -> None:
        self.workers = workers
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._owners: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): fresh primitives
            self._loop, self._slots, self._owners = loop, asyncio.Semaphore(self.workers), {}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="extproc-tokens")
        return loop

    def busy(self, owner: str) -> int:
        """Tasks of `owner` running or waiting."""
        entry = self._owners.get(owner)
        return entry[1][0] if entry else 0

    async def run(self, owner: str, fn: Callable[..., Any], *args: Any) -> Any:
        loop = self._bind()
        assert self._slots is not None and self._pool is not None
        lock, pending = self._owners.setdefault(owner, (asyncio.Lock(), [0]))
        if pending[0] > self.max_queued:
            raise CountingBusy(
                f"{pending[0]} large requests of this caller are already being counted; retry when they finish"
            )
        pending[0] += 1
        slots = self._slots
        got_lane = got_slot = False
        try:
            async with asyncio.timeout(self.max_wait_s):
                await lock.acquire()
                got_lane = True
                await slots.acquire()
                got_slot = True
        except TimeoutError:
            raise CountingBusy("token counting is busy; retry shortly") from None
        finally:
            if not got_slot:
                if got_lane:
                    lock.release()
                self._done(owner, pending)

        def finish(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown): nothing left to release
                loop.call_soon_threadsafe(release)

        def release() -> None:
            slots.release()
            lock.release()
            self._done(owner, pending)

        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            release()
            raise
        future.add_done_callback(finish)
        return await asyncio.wrap_future(future)

    def _done(self, owner: str, pending: list[int]) -> None:
        pending[0] -= 1
        if pending[0] == 0 and self._owners.get(owner, (None, None))[1] is pending:
            del self._owners[owner]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def estimate(
    facts: Facts,
    *,
    encoding: str,
    safety_factor: Decimal,
    output_limit: int | None,
    fallback_output: int,
    media_tokens: int = 0,
    context_window: int | None = None,
    max_output_override: int | None = None,
    text_tokens: int | None = None,
    counter: TokenCounter | None = None,
) -> Estimate:
    """Worst-case tokens of this request. `max_output_override` is a clamp already decided.

    `text_tokens` is `Counts.tokens` of `facts.segments` in `encoding` (or a bound:
    `lower_bound_tokens` gives the least this request can cost). Without it, the
    segments are counted here, inline, and cached at once (the old synchronous path).
    `media_tokens` is `media_tokens(facts, ...)`: what the non-text input costs.
    The input estimate never exceeds `context_window`: the provider refuses a
    longer prompt (and such a call is released, not charged)."""
    if text_tokens is None:
        assert counter is not None, "estimate needs text_tokens or a counter"
        counts = counter.count_segments(facts.segments, encoding)
        counter.remember(counts)
        text_tokens = counts.tokens
    raw = text_tokens + PER_SEGMENT_OVERHEAD * len(facts.segments) + PER_REQUEST_OVERHEAD
    raw += media_tokens + getattr(facts, "pretokenized", 0)
    input_tokens = raw if safety_factor == 1 else math.ceil(raw * safety_factor)
    if context_window is not None:
        input_tokens = min(input_tokens, context_window)
    per_choice = max_output_override or facts.max_output
    if per_choice is None:
        per_choice = output_limit or fallback_output
    return Estimate(input_tokens, per_choice * max(1, facts.n))


# -- non-text input ----------------------------------------------------------------


class InputCosts(Protocol):
    """The policy's numbers for input that is not text (`policy.model.InputsSpec`)."""

    @property
    def image_tokens(self) -> int: ...
    @property
    def audio_tokens_per_kib(self) -> int: ...
    @property
    def file_tokens_per_kib(self) -> int: ...
    @property
    def document_tokens_per_kib(self) -> int: ...
    @property
    def unsized_part_tokens(self) -> int | None: ...
    @property
    def previous_response_tokens(self) -> int | None: ...


class MediaFacts(Protocol):
    @property
    def media(self) -> Sequence[MediaPart]: ...
    @property
    def previous_response_id(self) -> str | None: ...


# OpenAI, https://platform.openai.com/docs/guides/images-vision#calculating-costs
# (GPT-4o class): `detail: low` costs 85 tokens whatever the size; otherwise the image
# is scaled to fit in 2048x2048, then so that its shortest side is 768 px (only ever
# down: the documented examples, and the "768 px (short side) x 2000 px (long side)"
# high-resolution limit), and costs 85 + 170 per 512-px tile covering it.
OPENAI_BASE_TOKENS = 85
OPENAI_TILE_TOKENS = 170

# Anthropic, https://docs.anthropic.com/en/docs/vision ("Evaluate image size",
# "Calculate image costs"): tokens = width * height / 750, after an image whose long
# edge is above 1568 px, or above ~1,600 tokens (~1.15 megapixels), is scaled down.
# The largest size its table lists as not resized is 784x1568 (1:2), 1,639 tokens:
# that bounds any image, whatever the exact area rule.
ANTHROPIC_LONG_EDGE = 1568
ANTHROPIC_MAX_TOKENS = -(-784 * 1568 // 750)


def openai_image_tokens(width: int, height: int, detail: str | None) -> int:
    """OpenAI's tile formula (exact fractions: no rounding ever lowers the count)."""
    if detail == "low":
        return OPENAI_BASE_TOKENS
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return OPENAI_BASE_TOKENS + OPENAI_TILE_TOKENS * tiles


def anthropic_image_tokens(width: int, height: int) -> int:
    """Anthropic's area formula after its resize rule (rounded up, capped at its largest image)."""
    area = Fraction(width * height)
    long_edge = max(width, height)
    if long_edge > ANTHROPIC_LONG_EDGE:
        area *= Fraction(ANTHROPIC_LONG_EDGE, long_edge) ** 2
    return min(math.ceil(area / 750), ANTHROPIC_MAX_TOKENS)


_SOURCES = {"url": "a URL", "file_id": "an uploaded file id", "unknown": "a shape this gateway does not read"}


def part_tokens(part: MediaPart, costs: InputCosts, *, anthropic: bool) -> int:
    """Worst-case input tokens of one non-text part. Raises `InputNotBounded`."""
    if part.kind == "image":
        if not anthropic and part.detail == "low":
            return OPENAI_BASE_TOKENS  # a fixed cost, whatever the size
        if part.width and part.height and part.width > 0 and part.height > 0:
            if anthropic:
                return anthropic_image_tokens(part.width, part.height)
            return openai_image_tokens(part.width, part.height, part.detail)
        return costs.image_tokens
    if part.size is not None:  # inline data: a rate per KiB of what was sent
        rate = {
            "audio": costs.audio_tokens_per_kib,
            "file": costs.file_tokens_per_kib,
            "document": costs.document_tokens_per_kib,
        }[part.kind]
        return -(-part.size * rate // 1024)
    if costs.unsized_part_tokens is None:
        where = part.where or part.kind
        raise InputNotBounded(
            f"`{where}` is {'an' if part.kind[0] in 'aeiou' else 'a'} {part.kind} given by "
            f"{_SOURCES.get(part.source, part.source)}: its size cannot be known before it is sent, and this "
            "gateway's policy reserves no worst case for such parts (inputs.unsized_part_tokens). "
            "Send it inline (base64), or ask the operator to set that worst case.",
            param=where,
        )
    return costs.unsized_part_tokens


def media_tokens(facts: MediaFacts, costs: InputCosts, *, api: str) -> int:
    """Worst-case input tokens of a request's non-text parts (`facts.media`) and of the
    stored conversation it continues (`previous_response_id`), for the API `api`
    (a schema name: `anthropic.*` uses Anthropic's image formula, others OpenAI's).

    Raises `InputNotBounded` (400) for what cannot be sized when the policy sets no
    worst case for it: the gate refuses rather than guess low."""
    anthropic = api.startswith("anthropic")
    total = sum(part_tokens(p, costs, anthropic=anthropic) for p in facts.media)
    if facts.previous_response_id is not None:
        if costs.previous_response_tokens is None:
            raise InputNotBounded(
                "`previous_response_id` continues a stored conversation whose size cannot be known before "
                "it is sent, and this gateway's policy reserves no worst case for it "
                "(inputs.previous_response_tokens). Send the conversation as `input` instead, or ask the "
                "operator to set that worst case.",
                param="previous_response_id",
            )
        total += costs.previous_response_tokens
    return total
