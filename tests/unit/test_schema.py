"""The schema settings are declared with (proxy.settings.schema): kinds, bounds, validator order, problems with their
places, frozen models. Pure logic, no server."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from proxy.settings.schema import (
    BOOL,
    FLOAT,
    INT,
    PATH,
    SECRET,
    STR,
    Info,
    Invalid,
    KindError,
    Model,
    Models,
    SecretStr,
    field,
    literal,
    optional,
    tuple_of,
    validates,
)


def _kind_error(kind: Any, value: Any) -> str:
    with pytest.raises(KindError) as info:
        kind(value)
    return info.value.msg


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("0", False), ("TRUE", True), ("off", False), ("y", True), ("no", False), (1, True), (0.0, False)],
)
def test_booleans_read_as_the_environment_writes_them(value: Any, expected: bool):
    assert BOOL(value) is expected


@pytest.mark.parametrize("value", ["2", "", " 1", "maybe", 2])
def test_a_word_that_is_not_a_boolean_is_refused(value: Any):
    assert _kind_error(BOOL, value) == "Input should be a valid boolean, unable to interpret input"


def test_numbers_from_strings_and_what_they_cannot_be():
    assert INT(" 5 ") == 5 and INT("1_000") == 1000 and INT("5.0") == 5 and INT(5.0) == 5 and INT("-5") == -5
    assert FLOAT("1e3") == 1000.0 and FLOAT(" 2.5 ") == 2.5 and FLOAT(3) == 3.0
    assert _kind_error(INT, "5.5") == "Input should be a valid integer, unable to parse string as an integer"
    assert _kind_error(INT, 5.5) == "Input should be a valid integer, got a number with a fractional part"
    assert _kind_error(INT, None) == "Input should be a valid integer"
    assert _kind_error(FLOAT, "abc") == "Input should be a valid number, unable to parse string as a number"
    assert _kind_error(FLOAT, [1]) == "Input should be a valid number"


def test_strings_paths_secrets_choices_and_tuples():
    assert STR("a") == "a" and STR(b"a") == "a"
    assert _kind_error(STR, 5) == "Input should be a valid string"
    assert PATH("/a") == Path("/a")
    assert _kind_error(PATH, 5) == "Input is not a valid path for <class 'pathlib.Path'>"
    assert SECRET("s").get_secret_value() == "s"
    assert _kind_error(literal("debug", "info", "error"), "INFO") == "Input should be 'debug', 'info' or 'error'"
    assert _kind_error(literal("text", "json"), 5) == "Input should be 'text' or 'json'"
    assert optional(STR)(None) is None
    assert tuple_of(STR)(["a", "b"]) == ("a", "b")
    assert _kind_error(tuple_of(STR), "ab") == "Input should be a valid tuple"  # not a tuple of its characters
    with pytest.raises(KindError) as info:
        tuple_of(STR)(["a", 5])
    assert info.value.loc == (1,)


def test_a_secret_never_shows_its_value():
    secret = SecretStr("hunter2")
    assert "hunter2" not in repr(secret) + str(secret) + f"{secret}"
    assert (
        secret == SecretStr("hunter2") and secret != SecretStr("other") and hash(secret) == hash(SecretStr("hunter2"))
    )

    class Foreign:  # another library's secret string
        def get_secret_value(self) -> str:
            return "x"

    assert SECRET(Foreign()) == SecretStr("x")


class Item(Model):
    name: str = field(STR, min_length=1)
    weight: float = field(FLOAT, default=1.0, gt=0, description="how heavy")


class Order(Model):
    kind: str = field(STR, default="plain")
    items: tuple[Item, ...] = field(Models(Item), ())
    # Derived from ``kind`` when not given: its validator runs on the default too.
    label: str = field(STR, default=None, validate_default=True)
    count: int = field(INT, default=1, ge=1, le=10)
    secret: SecretStr | None = field(optional(SECRET), default=None)
    hidden: str = field(STR, default="", repr=False)

    @validates("kind", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @validates("label", mode="before")
    @classmethod
    def _label(cls, value: Any, info: Info) -> Any:
        if value is None:
            if "kind" not in info.data:
                return ""  # kind failed, and said so
            return f"{info.data['kind']}-{(info.context or {}).get('suffix', 'x')}"
        return value

    @validates("count")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even")
        return value

    @cached_property
    def summary(self) -> str:
        return f"{self.kind}:{self.count}"


def _problems(values: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(Invalid) as info:
        Order.validate(values)
    return [(problem.loc, problem.type, problem.msg) for problem in info.value.problems]


def test_fields_in_order_with_defaults_before_validators_and_context():
    order = Order.validate({"kind": "RUSH", "count": "4", "items": [{"name": "a"}]}, context={"suffix": "eu"})
    assert (order.kind, order.label, order.count) == ("rush", "rush-eu", 4)
    assert order.items == (Item(name="a"),) and order.items[0].weight == 1.0
    assert list(Order.fields) == ["kind", "items", "label", "count", "secret", "hidden"]
    assert Order.fields["items"].default == () and not Order.fields["kind"].is_required()
    assert Item.fields["name"].is_required() and Item.fields["weight"].description == "how heavy"


def test_every_problem_at_once_with_its_place_and_no_value():
    problems = _problems({"count": 3, "items": [{"name": ""}, {"weight": "-1", "name": "b"}, {}, 5], "extra": "x"})
    assert problems == [
        (("items", 0, "name"), "string_too_short", "String should have at least 1 character"),
        (("items", 1, "weight"), "greater_than", "Input should be greater than 0"),
        (("items", 2, "name"), "missing", "Field required"),
        (("items", 3), "model_type", "Input should be a valid dictionary or instance of Item"),
        (("count",), "value_error", "must be even"),
        (("extra",), "extra_forbidden", "Extra inputs are not permitted"),
    ]
    assert _problems({"count": 12}) == [(("count",), "less_than_equal", "Input should be less than or equal to 10")]
    assert _problems({"count": "x"})[0][1] == "int_parsing"  # a kind error: the validator does not run


def test_a_failed_field_is_not_seen_by_the_validators_after_it():
    assert _problems({"kind": 5}) == [(("kind",), "string_type", "Input should be a valid string")]


def test_models_are_frozen_comparable_and_keep_secrets_out_of_reprs():
    order = Order(kind="a", count=2, secret=SecretStr("s3cret"), hidden="h1dden")
    assert order == Order(kind="a", count=2, secret="s3cret", hidden="h1dden") and order != Order(kind="b")
    assert hash(order) == hash(Order(kind="a", count=2, secret="s3cret", hidden="h1dden"))
    assert "s3cret" not in repr(order) and "h1dden" not in repr(order) and "count=2" in repr(order)
    with pytest.raises(AttributeError, match="frozen"):
        order.count = 4  # type: ignore[misc]


def test_a_copy_takes_new_values_and_works_out_again_what_came_from_the_old():
    order = Order(kind="a", count=2)
    assert order.summary == "a:2"
    copy = order.copy_with(count=6)
    assert (copy.count, copy.kind, copy.summary, order.summary) == (6, "a", "a:6", "a:2")
