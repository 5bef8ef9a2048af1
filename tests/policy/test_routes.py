"""Route tables: the shipped defaults classify what OpenAI-style backends serve; policy routes come first."""

from __future__ import annotations

import pytest

from extproc.errors import PolicyError
from extproc.policy.loader import parse_policy
from extproc.policy.routes import default_routes
from extproc.protocols.paths import normalize

BASE = """
version: 1
prices:
  models:
    gpt-4o: { input: "2.50", output: "10.00" }
"""


def find(policy, raw: str, method: str = "POST"):
    return policy.route_table.find(normalize(raw).segments, method)


@pytest.mark.parametrize(
    ("raw", "method", "action", "api", "canonical"),
    [
        ("/v1/chat/completions", "POST", "meter", "openai.chat", "/v1/chat/completions"),
        ("/V1/CHAT/Completions", "POST", "meter", "openai.chat", "/v1/chat/completions"),
        ("/chat/completions", "POST", "meter", "openai.chat", "/chat/completions"),
        ("/v1/completions", "POST", "meter", "openai.completions", "/v1/completions"),
        ("/v1/responses", "POST", "meter", "openai.responses", "/v1/responses"),
        ("/v1/embeddings", "POST", "meter", "openai.embeddings", "/v1/embeddings"),
        ("/v1/messages", "POST", "meter", "anthropic.messages", "/v1/messages"),
        ("/openai/deployments/Prod-4o/chat/completions?api-version=1", "POST", "meter", "openai.chat",
         "/openai/deployments/Prod-4o/chat/completions"),
        ("/v1/models", "GET", "unmetered", None, "/v1/models"),
        ("/v1/models/gpt-4o", "GET", "unmetered", None, "/v1/models/gpt-4o"),
        ("/v1/messages/count_tokens", "POST", "unmetered", None, "/v1/messages/count_tokens"),
        ("/health", "GET", "public", None, "/health"),
        ("/invocations", "POST", "deny", None, "/invocations"),
        ("/v1/rerank", "POST", "deny", None, "/v1/rerank"),
        ("/pooling", "POST", "deny", None, "/pooling"),
        ("/score", "POST", "deny", None, "/score"),
        ("/v1/audio/transcriptions", "POST", "deny", None, "/v1/audio/transcriptions"),
        ("/v1/load_lora_adapter", "POST", "deny", None, "/v1/load_lora_adapter"),
    ],
)
def test_default_routes_classify_what_backends_serve(raw, method, action, api, canonical):
    route, known = find(parse_policy(BASE), raw, method)
    assert known and route is not None
    assert (route.spec.action, route.spec.api, route.path) == (action, api, canonical)


def test_unknown_paths_and_wrong_methods_match_nothing():
    p = parse_policy(BASE)
    assert find(p, "/v1/chat/completions/extra") == (None, False)
    assert find(p, "/v2/chat/completions") == (None, False)
    assert find(p, "/v1/chat/completions", "GET") == (None, True)  # 405, not 404
    assert find(p, "/v1/models", "POST") == (None, True)


def test_policy_routes_come_first_and_defaults_can_be_dropped():
    p = parse_policy(BASE + """
routes:
  - { path: /v1/rerank, action: flat, price: "0.002" }
  - { path: "/custom/{model}/chat", api: openai.chat, model_param: model }
deployments: { prod: gpt-4o }
""")
    route, _ = find(p, "/v1/rerank")
    assert route is not None and (route.spec.action, route.spec.price) == ("flat", "0.002")
    route, _ = find(p, "/custom/prod/chat")
    assert route is not None and dict(route.params) == {"model": "prod"}
    closed = parse_policy(BASE + "default_routes: false\nroutes: [{ path: /v1/chat/completions, api: openai.chat }]\n")
    assert find(closed, "/v1/models", "GET") == (None, False)
    assert len(closed.route_table.specs) == 1


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ("[{ path: /x }]", "`api` is required for action meter"),
        ("[{ path: /x, action: flat }]", "`price` is required for action flat"),
        ("[{ path: /x, action: deny, api: openai.chat }]", "`api` is required for action meter and only allowed there"),
        ("[{ path: /x, action: flat, price: 0.1 }]", "floats are not exact"),
        ("[{ path: x, action: deny }]", "a route path starts with /"),
        ("[{ path: /a/*/b, action: deny }]", "* may only be the last segment"),
        ("[{ path: /a%2Fb, action: deny }]", "is not a literal"),
        ("[{ path: /x, action: deny, methods: [FETCH] }]", "methods must be a non-empty list"),
        ("[{ path: /x, api: openai.chat, model_param: deployment }]", "is not a parameter of /x"),
        ("[{ path: /x, api: openai.nope }]", "Input should be"),
    ],
)
def test_bad_routes_fail_with_a_precise_message(routes, message):
    with pytest.raises(PolicyError) as exc:
        parse_policy(BASE + f"routes: {routes}\n")
    assert message in str(exc.value)


def test_deployments_must_name_priced_models():
    with pytest.raises(PolicyError) as exc:
        parse_policy(BASE + "deployments: { prod: gpt-5 }\n")
    assert "deployment 'prod' maps to 'gpt-5', which has no price" in str(exc.value)


def test_every_default_route_is_reachable():
    """No default route is shadowed by an earlier one for all of its methods."""
    p = parse_policy(BASE)
    for spec in default_routes():
        concrete = spec.path.replace("{deployment}", "d").replace("{model}", "m").replace("{id}", "i").replace("*", "x")
        for method in spec.methods:
            route, _ = find(p, concrete, method)
            assert route is not None and route.spec is spec, (spec.path, method)


def test_the_route_table_remembers_answers_but_never_grows_past_its_bound(monkeypatch):
    from extproc.policy import routes

    table = routes.RouteTable(default_routes())
    monkeypatch.setattr(routes, "FOUND_MAX", 8)
    chat = normalize("/v1/chat/completions").segments
    first = table.find(chat, "POST")
    assert first[0] is not None and table.find(chat, "POST") == first == table._find(chat, "POST")
    for i in range(20):  # made-up paths: remembered up to the bound, then forgotten wholesale
        made_up = normalize(f"/made/up/{i}").segments
        assert table.find(made_up, "POST") == (None, False) == table._find(made_up, "POST")
        assert len(table._found) <= 8
    assert table.find(chat, "GET") == table._find(chat, "GET")  # the method is part of what is remembered
