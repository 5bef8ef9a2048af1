"""`records.fast_init`: the same constructor as the dataclass's own, only faster."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from extproc.records import fast_init
from extproc.rules import Kind, Line


@dataclasses.dataclass(frozen=True, slots=True)
class Plain:
    a: int
    b: str = "b"
    c: list[int] = dataclasses.field(default_factory=list)
    d: int = dataclasses.field(default=4, kw_only=True)


@fast_init
@dataclasses.dataclass(frozen=True, slots=True)
class Fast:  # Plain's fields, built by fast_init
    a: int
    b: str = "b"
    c: list[int] = dataclasses.field(default_factory=list)
    d: int = dataclasses.field(default=4, kw_only=True)


def test_same_signature_defaults_and_factories_as_the_generated_init() -> None:
    ours, theirs = inspect.signature(Fast.__init__).parameters, inspect.signature(Plain.__init__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
    for args, kw in [((1,), {}), ((1, "x"), {}), ((1, "x", [2]), {"d": 5}), ((), {"a": 1, "c": [3]})]:
        assert dataclasses.astuple(Fast(*args, **kw)) == dataclasses.astuple(Plain(*args, **kw))
    assert Fast(1).c is not Fast(1).c, "a default factory makes a fresh value per instance"
    with pytest.raises(TypeError):
        Fast(1, "x", [], 4)  # d is keyword-only
    with pytest.raises(TypeError):
        Fast()


def test_still_frozen_hashable_and_replaceable() -> None:
    line = Line("key:a|cost", Kind.COUNTER, "cost", 100, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        line.amount = 6  # type: ignore[misc]
    assert hash(line) == hash(Line("key:a|cost", Kind.COUNTER, "cost", 100, 5))
    assert dataclasses.replace(line, amount=7).amount == 7 and line.amount == 5


def test_refuses_what_it_cannot_build() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Post:
        a: int

        def __post_init__(self) -> None: ...

    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    for cls in (Post, Mutable):
        with pytest.raises(TypeError):
            fast_init(cls)
