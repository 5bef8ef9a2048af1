"""Token files: parsing, the placeholder, change detection (no process, a fake clock)."""

from __future__ import annotations

import os

import pytest

from extproc.errors import ConfigError
from extproc.server.tokens import PLACEHOLDER, Tokens, parse_tokens


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_token_per_line_comments_blanks_and_the_placeholder_skipped():
    text = f"# rotation 2026-12\n  alpha  \n\nbeta\n{PLACEHOLDER}\n"
    assert parse_tokens(text) == (b"alpha", b"beta")


def test_any_listed_token_is_accepted_and_nothing_else():
    t = Tokens((b"alpha", b"beta"))
    assert t.accepts("alpha") and t.accepts(b"beta")
    for given in ("", None, "alph", "alpha ", "gamma", PLACEHOLDER):
        assert not t.accepts(given)


def test_a_changed_file_is_re_read_at_most_once_per_interval(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("old\n")
    clock = Clock()
    t = Tokens.from_file(path, "test token", check_every=1.0, clock=clock)
    new = tmp_path / "tokens.new"
    new.write_text("old\nnew\n")
    os.replace(new, path)
    assert not t.accepts("new")  # not yet looked at
    clock.now += 1.0
    assert t.accepts("new") and t.accepts("old")
    path.unlink()  # mid-rotation: keep what we have rather than lock every caller out
    clock.now += 1.0
    assert t.accepts("new")
    path.write_text("")  # emptied on purpose: nobody is accepted (fail closed), the service keeps running
    clock.now += 1.0
    assert not t.accepts("old") and not t.accepts("new") and not t


@pytest.mark.parametrize(("text", "words"), [(f"{PLACEHOLDER}\n", "placeholder"), ("# none\n", "lists no token")])
def test_a_file_without_a_usable_token_is_refused_at_start(tmp_path, text, words):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        Tokens.from_file(path, "caller token")
    with pytest.raises(ConfigError, match="cannot read"):
        Tokens.from_file(tmp_path / "missing", "caller token")
