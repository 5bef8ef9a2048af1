"""TokenCounter: counting does not cache, remember does, within caps; large counts
go to the pool with one lane per owner."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from decimal import Decimal

import pytest

from extproc.estimate import (
    PER_REQUEST_OVERHEAD,
    PER_SEGMENT_OVERHEAD,
    CountingBusy,
    TokenCounter,
    _Lanes,
    estimate,
    lower_bound_tokens,
    upper_bound_tokens,
)
from extproc.protocols.schemas import schema_by_name
from extproc.tokenizers import count_text

ENC = "o200k_base"
CONTEXT = [f"message {i}: the agent reads the ledger and reserves budget for step {i}." * 3 for i in range(200)]


@pytest.fixture
def counter():
    c = TokenCounter()
    yield c
    c.close()


def test_counting_does_not_fill_the_cache_remember_does(counter):
    counts = counter.count_segments(CONTEXT, ENC)
    assert counts.tokens == sum(count_text(s, ENC)[0] for s in CONTEXT) and counts.exact
    assert counter.entries == 0  # a refused call leaves nothing behind
    counter.remember(counts)
    assert counter.entries == len(CONTEXT)
    again = counter.count_segments(CONTEXT + ["and one new message from the user, please go on"], ENC)
    assert again.tokens == counts.tokens + count_text("and one new message from the user, please go on", ENC)[0]
    assert [s for s, _ in again.fresh] == ["and one new message from the user, please go on"]
    assert counter.hits == len(CONTEXT)


def test_short_and_huge_segments_are_never_cached():
    c = TokenCounter(min_segment_chars=8, max_segment_chars=1000)
    counts = c.count_segments(["hi", "x" * 1001, "a normal message"], ENC)
    assert [s for s, _ in counts.fresh] == ["a normal message"]
    c.remember(counts)
    assert c.entries == 1


def test_cache_stays_within_entries_and_bytes():
    c = TokenCounter(max_entries=50, max_bytes=20_000)
    for i in range(20):
        c.remember(c.count_segments([f"segment {i}-{j} with enough text to be cached" for j in range(30)], ENC))
        assert c.entries <= 50 and c.bytes <= 20_000
    c.clear()
    assert c.entries == 0 and c.bytes == 0


async def test_small_counts_run_inline_large_ones_on_the_pool(counter):
    small = await counter.count_async(CONTEXT[:10], ENC, owner="alice")
    assert counter.offloaded == 0
    big = ["word " * 20_000]
    counts = await counter.count_async(big, ENC, owner="alice")
    assert counter.offloaded == 1
    assert counts.tokens == count_text(big[0], ENC)[0] and small.exact


async def test_a_growing_context_only_counts_the_new_message_inline(counter):
    counter.remember(await counter.count_async(CONTEXT, ENC, owner="agent"))
    before = counter.offloaded
    counts = await counter.count_async(CONTEXT + ["next step please, and keep it short"], ENC, owner="agent")
    assert counter.offloaded == before  # cached context + one message: no thread hop
    assert len(counts.fresh) == 1


async def test_pathological_segments_are_bounded_not_raised(counter):
    counts = await counter.count_async([" " * 1_000_000, "a" * 2_000_000, "hi"], ENC, owner="mallory")
    assert not counts.exact
    segs = [" " * 1_000_000, "a" * 2_000_000, "hi"]
    assert lower_bound_tokens(segs, ENC) <= counts.tokens <= upper_bound_tokens(segs, ENC)


def test_byte_bounds():
    segs = ["héllo", "", "x" * 1000]
    assert upper_bound_tokens(segs, ENC) == 6 + 1000
    assert lower_bound_tokens(segs, ENC) == 8  # ceil(1006 / 128) and at least one per segment
    assert lower_bound_tokens(["a"] * 300, ENC) == 300
    assert lower_bound_tokens([], ENC) == 0


class Gate:
    """A pool task that runs until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started = threading.Semaphore(0)

    def __call__(self, value: int) -> int:
        self.started.release()
        self.open.wait(10)
        return value


async def _started(gate: Gate) -> None:
    await asyncio.to_thread(gate.started.acquire, True, 5)


async def test_one_large_count_per_owner_others_wait_then_are_refused():
    lanes = _Lanes(workers=2, max_queued=1, max_wait_s=5)
    gate = Gate()
    try:
        first = asyncio.create_task(lanes.run("mallory", gate, 1))
        await _started(gate)
        queued = asyncio.create_task(lanes.run("mallory", gate, 2))
        await asyncio.sleep(0.05)
        assert lanes.busy("mallory") == 2 and not queued.done()
        with pytest.raises(CountingBusy) as e:
            await lanes.run("mallory", gate, 3)
        assert e.value.status == 429 and e.value.code == "tokenizer_busy"
        # another principal gets the second worker while mallory's lane is full
        other = asyncio.create_task(lanes.run("alice", gate, 4))
        await _started(gate)
        gate.open.set()
        assert await asyncio.gather(first, queued, other) == [1, 2, 4]
        assert lanes.busy("mallory") == 0 and lanes.busy("alice") == 0
    finally:
        gate.open.set()
        lanes.close()


async def test_waiting_longer_than_max_wait_is_refused():
    lanes = _Lanes(workers=1, max_queued=4, max_wait_s=0.1)
    gate = Gate()
    try:
        first = asyncio.create_task(lanes.run("alice", gate, 1))
        await _started(gate)
        with pytest.raises(CountingBusy):
            await lanes.run("bob", gate, 2)  # the only worker stays busy past max_wait
        gate.open.set()
        assert await first == 1
    finally:
        gate.open.set()
        lanes.close()


async def test_a_cancelled_request_keeps_its_lane_until_its_thread_ends():
    lanes = _Lanes(workers=2, max_queued=0, max_wait_s=5)
    gate = Gate()
    try:
        task = asyncio.create_task(lanes.run("mallory", gate, 1))
        await _started(gate)
        task.cancel()  # Envoy gave up on the stream
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(CountingBusy):  # the thread still runs: no second one for mallory
            await lanes.run("mallory", gate, 2)
        gate.open.set()
        for _ in range(100):
            if lanes.busy("mallory") == 0:
                break
            await asyncio.sleep(0.01)
        assert lanes.busy("mallory") == 0
        assert await lanes.run("mallory", gate, 3) == 3
    finally:
        gate.open.set()
        lanes.close()


def test_estimate_from_counts_and_from_bounds(counter):
    schema = schema_by_name("openai.chat")
    assert schema is not None
    body = json.dumps({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": c} for c in CONTEXT]})
    facts = schema.parse_request(body.encode(), max_bytes=1 << 20)
    kw = dict(encoding=ENC, safety_factor=Decimal(1), output_limit=None, fallback_output=4096)
    counts = counter.count_segments(facts.segments, ENC)
    exact = estimate(facts, text_tokens=counts.tokens, **kw)
    assert exact == estimate(facts, counter=counter, **kw)  # the synchronous path agrees
    overhead = PER_SEGMENT_OVERHEAD * len(facts.segments) + PER_REQUEST_OVERHEAD
    assert exact.input_tokens == counts.tokens + overhead and exact.output_tokens == 100
    low = estimate(facts, text_tokens=lower_bound_tokens(facts.segments, ENC), **kw)
    high = estimate(facts, text_tokens=upper_bound_tokens(facts.segments, ENC), **kw)
    assert low.input_tokens <= exact.input_tokens <= high.input_tokens


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


async def test_many_tiny_messages_leave_memory_bounded():
    """5 bodies of ~6 MB, 150k tiny messages each, parsed and counted as the
    service does, each remembered as if allowed (the worst case for the cache).
    Before issue 10 each such call kept about 40 MB for good: 3 calls past the
    second would add ~120 MB, far past the 64 MB allowed for allocator noise
    (and the entries and bytes caps are checked after every call)."""
    schema = schema_by_name("openai.chat")
    assert schema is not None
    counter = TokenCounter(max_entries=100_000, max_bytes=16 * 1024 * 1024, remember_per_call=200_000)
    rss = []
    try:
        for call in range(5):
            msgs = ",".join('{"role":"user","content":"m%02d-%06d tiny but cacheable text"}' % (call, i) for i in range(150_000))
            body = ('{"model":"gpt-4o","messages":[' + msgs + "]}").encode()
            assert len(body) > 6_000_000
            facts = schema.parse_request(body, max_bytes=16 << 20)
            counts = await counter.count_async(facts.segments, ENC, owner="mallory")
            assert len(counts.fresh) == 150_000
            counter.remember(counts)
            del msgs, body, facts, counts
            gc.collect()
            assert counter.entries <= 100_000 and counter.bytes <= 16 * 1024 * 1024
            rss.append(_rss_mib())
        # once the cache is full, RSS stops growing (allocator noise aside): not +40 MB a call
        assert max(rss[2:]) - rss[1] < 64, rss
    finally:
        counter.close()


async def test_many_tiny_segments_are_bounded_by_their_bytes_not_tokenized(monkeypatch):
    """150k one-word messages would be 150k tiktoken calls holding the GIL between them:
    past MANY_SEGMENTS uncached segments, those too short to be cached count as their UTF-8
    length (an upper bound: every token is at least one byte)."""
    import extproc.estimate as est

    seen: list[int] = []
    real = est._count_all
    monkeypatch.setattr(est, "_count_all", lambda texts, enc: seen.append(len(texts)) or real(texts, enc))
    counter = TokenCounter()
    try:
        tiny = [f"w{i}" for i in range(est.MANY_SEGMENTS + 10)]
        long = ["a message long enough to be cached, so it is tokenized as usual"]
        counts = await counter.count_async(tiny + long, ENC, owner="mallory")
        assert seen == [1], "only the one long segment reaches tiktoken"
        assert counts.tokens == sum(len(t) for t in tiny) + counter.count(long[0], ENC)
        assert not counts.exact and [s for s, _ in counts.fresh] == long
        few = await counter.count_async(tiny[:100], ENC, owner="alice")  # below the threshold: exact
        assert few.exact
    finally:
        counter.close()


def test_remember_keeps_the_last_segments_of_a_call():
    c = TokenCounter(remember_per_call=10)
    counts = c.count_segments([f"segment number {i} long enough to cache" for i in range(100)], ENC)
    c.remember(counts)
    assert c.entries == 10
    assert c.count_segments(["segment number 99 long enough to cache"], ENC).fresh == ()
