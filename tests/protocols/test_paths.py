"""The service's own reading of `:path`: what it normalises, what it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import BadRequest
from extproc.protocols.paths import BadPath, normalize


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", ""),
        ("/v1/chat/completion%73", "/v1/chat/completions", ""),  # starlette serves this as chat
        ("/v1/chat/completion%73?x=1", "/v1/chat/completions", "x=1"),
        ("/v1//chat///completions", "/v1/chat/completions", ""),
        ("/v1/./chat/completions", "/v1/chat/completions", ""),
        ("/v1/x/../chat/completions", "/v1/chat/completions", ""),
        ("/v1/x/%2e%2e/chat/completions", "/v1/chat/completions", ""),
        ("/v1/chat/completions;a=b", "/v1/chat/completions", ""),
        ("/v1;x/chat;y/completions", "/v1/chat/completions", ""),
        ("/v1/chat/completions/", "/v1/chat/completions", ""),
        ("/V1/Chat/Completions", "/V1/Chat/Completions", ""),  # case folds at route matching
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
         "/openai/deployments/gpt-4o/chat/completions", "api-version=2024-10-21"),
        ("/", "/", ""),
    ],
)
def test_normalises(raw: str, path: str, query: str) -> None:
    p = normalize(raw)
    assert (p.path, p.query, p.raw) == (path, query, raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/chat%5Ccompletions",
        "/v1\\chat\\completions",
        "/v1/chat%252Fcompletions",  # double encoding: decodes to %2F
        "/v1/chat%25completions",
        "/v1/chat/completions%",
        "/v1/chat/completions%zz",
        "/v1/chat/completions%00",
        "/v1/chat/completions%0a",
        "/v1/chat/complétions",
        "/v1/chat/compl%C3%A9tions",
        "/v1/chat completions",
        "/v1/chat/completions#frag",
        "/v1/chat%3Fx/completions",
        "/v1/chat%23x/completions",
        "/..",
        "/v1/../../chat/completions",
        "v1/chat/completions",
        "http://evil/v1/chat/completions",
        "",
        "/" + "a" * 5000,
    ],
)
def test_refuses(raw: str) -> None:
    with pytest.raises(BadPath) as exc:
        normalize(raw)
    assert isinstance(exc.value, BadRequest) and exc.value.status == 400
    assert exc.value.message.startswith("request path refused: ")


@given(st.text(max_size=200))
def test_any_input_is_normalised_or_refused_with_400(raw: str) -> None:
    try:
        p = normalize(raw)
    except BadPath:
        return
    assert p.path.startswith("/") and "//" not in p.path and "%" not in p.path
    assert all(s not in (".", "..") and ";" not in s for s in p.segments)
    assert normalize(p.path).path == p.path, "normalising twice changes nothing"


@given(st.text(max_size=300))
def test_the_remembered_answer_is_the_computed_one_and_refusals_are_never_remembered(raw: str) -> None:
    from extproc.protocols import paths

    for _ in range(2):  # the second time from the cache, for paths short enough to be kept
        try:
            got = normalize(raw)
        except BadPath as e:
            with pytest.raises(BadPath) as again:
                paths._normalize(raw)
            assert again.value.message == e.message
            continue
        assert got == paths._normalize(raw)
    assert paths._normalize_cached.cache_info().currsize <= paths.CACHED_PATHS
