"""The SSE parser against the WHATWG rules, chunk boundaries and its size cap."""

from __future__ import annotations

import pytest

from extproc.errors import UpstreamError
from extproc.protocols import EventTooLarge, SSEEvent, SSEParser
from tests.protocols.fixtures import KeepAll


def parse(stream: bytes, **kw: object) -> list[SSEEvent]:
    p = SSEParser(**kw)  # type: ignore[arg-type]
    return p.feed(stream) + p.finish()


def fields(events: list[SSEEvent]) -> list[tuple[str | None, str]]:
    return [(e.event, e.data) for e in events]


def test_spec_examples() -> None:
    # the stream examples of the HTML standard, 9.2.4-9.2.6
    assert fields(parse(b"data: YHOO\ndata: +2\ndata: 10\n\n")) == [(None, "YHOO\n+2\n10")]
    stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n"
    events = parse(stream)
    assert fields(events) == [(None, "first event"), (None, "second event"), (None, " third event")]
    assert [e.id for e in events] == ["1", "", ""]
    assert fields(parse(b"data\n\ndata\ndata\n\ndata:\n")) == [(None, ""), (None, "\n"), (None, "")]
    assert fields(parse(b"data:test\n\ndata: test\n\n")) == [(None, "test"), (None, "test")]


def test_event_names_comments_and_unknown_fields() -> None:
    stream = b"event: add\nretry: 10\nfoo: bar\n: comment\ndata: 73857293\n\nevent:\ndata: x\n\n"
    assert fields(parse(stream)) == [("add", "73857293"), (None, "x")]


def test_block_without_data_is_not_dispatched_unless_asked() -> None:
    stream = b": ping\n\nevent: lonely\n\n\ndata: x\n\n"
    assert fields(parse(stream)) == [(None, "x")]
    blocks = parse(stream, include_empty=True)
    assert [(b.dispatch, b.raw) for b in blocks] == [
        (False, b": ping\n\n"),
        (False, b"event: lonely\n\n"),
        (False, b"\n"),
        (True, b"data: x\n\n"),
    ]


def test_raw_is_the_exact_event_bytes() -> None:
    stream = b"event: a\r\ndata: 1\r\n\r\ndata: 2\r\rdata: 3\n\n"
    events = parse(stream)
    assert [e.raw for e in events] == [b"event: a\r\ndata: 1\r\n\r\n", b"data: 2\r\r", b"data: 3\n\n"]
    assert b"".join(e.raw for e in events) == stream


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol
    assert fields(parse(stream)) == [("e", "a\nb")]


def test_cr_then_lf_in_the_next_chunk_is_one_line_ending() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n") == []  # not a blank line
    assert p.feed(b"\r") == []  # may still be "\r\n"
    [ev] = p.feed(b"\ndata: b")
    assert ev.raw == b"data: a\r\n\r\n"
    assert p.finish()[0].data == "b"


def test_lone_cr_dispatches_once_the_next_byte_arrives() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r\r") == []
    assert fields(p.feed(b"d")) == [(None, "a")]


def test_utf8_split_across_chunks_and_invalid_bytes() -> None:
    text = "é😀你".encode()
    stream = b"data: " + text + b"\xff\xfe\n\n"
    expected = [(None, "é😀你\ufffd\ufffd")]
    for i in range(len(stream) + 1):
        p = SSEParser()
        assert fields(p.feed(stream[:i]) + p.feed(stream[i:]) + p.finish()) == expected


def test_bom_is_stripped_once_at_the_start() -> None:
    bom = b"\xef\xbb\xbf"
    assert fields(parse(bom + b"data: a\n\n" + bom + b"data: b\n\n")) == [(None, "a")]
    assert fields(parse(bom + b"\ndata: a\n\n")) == [(None, "a")]


def test_finish_dispatches_an_unterminated_event() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\n\nevent: last\ndata: {\"usage\": 1}") == [SSEEvent(None, "a", b"data: a\n\n")]
    [ev] = p.finish()
    assert (ev.event, ev.data, ev.raw) == ("last", '{"usage": 1}', b'event: last\ndata: {"usage": 1}')
    assert p.finish() == []  # reset
    assert fields(p.feed(b"data: again\n\n")) == [(None, "again")]


def test_finish_drops_a_trailing_block_without_data_unless_asked() -> None:
    assert parse(b"data: a\n\n: trailing comment") == [SSEEvent(None, "a", b"data: a\n\n")]
    blocks = parse(b"data: a\n\n: trailing", include_empty=True)
    assert blocks[-1] == SSEEvent(None, "", b": trailing", dispatch=False)


def test_pending_event_over_the_cap_raises() -> None:
    p = SSEParser(max_event_bytes=16)
    p.feed(b"data: 0123456789")  # 16 bytes: at the cap is fine
    assert p.pending == 16
    with pytest.raises(UpstreamError):
        p.feed(b"x")
    assert p.pending == 0


def test_complete_event_over_the_cap_raises_whatever_the_chunking() -> None:
    stream = b"data: ok\n\n" + b"data: " + b"y" * 20 + b"\n\n"
    with pytest.raises(EventTooLarge) as info:
        SSEParser(max_event_bytes=16).feed(stream)
    assert fields(info.value.events) == [(None, "ok")]


def test_many_small_events_in_one_chunk_do_not_trip_the_cap() -> None:
    stream = b"data: x\n\n" * 10_000
    assert len(parse(stream, max_event_bytes=16)) == 10_000


def test_invalid_cap() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


# --- oversize events streamed to a sink ------------------------------------------------


def dispatched(events: list[SSEEvent]) -> list[tuple[str | None, str, str | None]]:
    return [(e.event, e.data, e.id) for e in events if e.dispatch]


OVERSIZE = (
    b"\xef\xbb\xbfdata: a\n\n"
    b"event: big\r\nid: 7\r\ndata: " + b"x" * 50 + b"\r\n: comment\r\ndata\r\nretry: 1\r\ndata: yy\r\n\r\n"
    b"data: small\r\r"
    b"data:" + "é".encode() * 20 + b"\nevent: late\n\n"
    b"id: " + b"9" * 10 + b"\ndata: z" + b"!" * 20 + b"\n\n"
    b"data: tail"
)


def test_oversize_event_streams_to_the_sink_at_every_split() -> None:
    whole = parse(OVERSIZE, max_event_bytes=16, include_empty=True, oversize=KeepAll)
    uncapped = parse(OVERSIZE)
    assert dispatched(whole) == dispatched(uncapped)
    assert [e.oversize for e in whole if e.dispatch] == [False, True, False, True, True, False]
    assert all(e.raw == b"" for e in whole if e.oversize)
    for i in range(len(OVERSIZE) + 1):
        for j in range(i, len(OVERSIZE) + 1, 5):
            p = SSEParser(16, include_empty=True, oversize=KeepAll)
            events = []
            for chunk in (OVERSIZE[:i], OVERSIZE[i:j], OVERSIZE[j:]):
                events += p.feed(chunk)
                assert p.pending <= 16
            events += p.finish()
            assert dispatched(events) == dispatched(uncapped), (i, j)
            assert b"".join(e.raw for e in events) == OVERSIZE


def test_oversize_event_byte_at_a_time_holds_nothing() -> None:
    p = SSEParser(16, oversize=KeepAll)
    events = []
    for i in range(len(OVERSIZE)):
        events += p.feed(OVERSIZE[i : i + 1])
        assert p.pending <= 16
    events += p.finish()
    assert dispatched(events) == dispatched(parse(OVERSIZE))


def test_unterminated_oversize_event_is_dispatched_at_finish() -> None:
    p = SSEParser(8, oversize=KeepAll)
    assert p.feed(b"event: e\ndata: " + b"q" * 30) == []
    [ev] = p.finish()
    assert (ev.event, ev.data, ev.oversize) == ("e", "q" * 30, True)


def test_oversize_block_without_data_dispatches_nothing() -> None:
    stream = b": " + b"c" * 40 + b"\nevent: " + b"e" * 40 + b"\n\ndata: ok\n\n"
    assert dispatched(parse(stream, max_event_bytes=8, oversize=KeepAll)) == [(None, "ok", None)]


class ScanCounted(bytes):
    """Bytes that add up how far each `find` scanned."""

    scanned = 0

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:  # type: ignore[override]
        stop = len(self) if end is None else end
        at = super().find(sub, start, stop)
        self.scanned += (at + 1 if at >= 0 else stop) - start
        return at


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_breaks_of_a_piece_are_found_in_linear_time(eol: bytes) -> None:
    # one fresh search per line went to the end of the piece for the absent "\n" of a
    # "\r"-only stream: 20k lines scanned 20k times the piece
    from extproc.protocols.sse import _LineBreaks

    data = ScanCounted((b"data: x" + eol) * 20_000)
    breaks = _LineBreaks(data, len(data))
    i, found = 0, []
    while (j := breaks.next(i)) < len(data):
        found.append(j)
        i = j + len(eol) if data[j : j + len(eol)] == eol else j + 1
    assert found == [k * (7 + len(eol)) + 7 for k in range(20_000)]
    assert data.scanned <= 2 * len(data) + 20_000


def test_cr_only_oversize_event_in_one_big_chunk_streams_every_line() -> None:
    body = b"data: " + b"y" * 40 + b"\r" + b"data: x\r" * 2_000 + b"\r"
    want = "\n".join(["y" * 40, *["x"] * 2_000])
    for first in (10, 30, 47, 48, 49):  # the oversize stream starts before, at and after the first line
        p = SSEParser(16, oversize=KeepAll)
        events = p.feed(body[:first]) + p.feed(body[first:]) + p.finish()
        assert [(e.data, e.oversize) for e in events] == [(want, True)], first


def test_a_line_arriving_in_many_chunks_is_searched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # each feed used to search the partial line from its start again: chunks x line bytes
    from extproc.protocols import sse

    scanned = []

    class Counted(sse._LineBreaks):
        def __init__(self, data: bytes | bytearray, n: int) -> None:
            self.piece = ScanCounted(data)
            scanned.append(self.piece)
            super().__init__(self.piece, n)

    monkeypatch.setattr(sse, "_LineBreaks", Counted)
    line = b"data: " + b"z" * (256 << 10) + b"\r\n\r\n"
    p = SSEParser()
    events = []
    for i in range(0, len(line), 1024):
        events += p.feed(line[i : i + 1024])
    assert [e.data for e in events] == ["z" * (256 << 10)]
    assert sum(piece.scanned for piece in scanned) <= 3 * len(line)
