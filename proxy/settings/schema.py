"""How settings are declared and validated: typed fields with a default, bounds and a description, validators per
field, and models that validate on construction and stay frozen.

    class Listener(Model):
        port: int = field(INT, default=8080, ge=1, description="TCP port")

        @validates("port")
        @classmethod
        def _not_privileged(cls, value: int) -> int: ...

A model's fields are validated in the order they are declared (a base class's first). For each: a value that was
not given takes the default (validated only with ``validate_default``; a field without a default is reported
missing); ``before`` validators see the raw value; the field's kind turns it into its type (as loosely as a value
from the environment needs: ``"1"`` is a bool, ``"5"`` an int); the bounds are checked; then the other validators
run. A validator taking ``info`` sees the fields validated so far (``info.data``, failed ones left out) and the
caller's ``context``. Every problem is collected, and ``Invalid`` lists them all, each with where it is (``("routes",
0, "prefix")``) and a message. A kind's message never quotes the value (it may be a secret); a validator's says what
its field's values may show.

The messages use the wording of pydantic, which validated the settings before this module did, so that what a user
reads did not change. It is small on purpose: pydantic cost a serving process about 9 MiB of RSS and a fifth of its
start-up instructions, for a dozen kinds of values validated once (docs/lab/notebook.md, 2026-12-07).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Self

Kind = Callable[[Any], Any]
Loc = tuple[int | str, ...]


class Problem(NamedTuple):
    """One thing wrong: where (field names and item indexes), a short type name, and a message for a person."""

    loc: Loc
    type: str
    msg: str


class Invalid(ValueError):
    """What is wrong with the values a model was given: every problem, none holding a value."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc))}: {p.msg}" for p in problems))


class KindError(ValueError):
    """A value a kind cannot take: ``type`` and ``msg`` as a ``Problem`` has them, at ``loc`` within the value."""

    def __init__(self, type: str, msg: str, loc: Loc = ()) -> None:
        self.type, self.msg, self.loc = type, msg, loc
        super().__init__(msg)


class SecretStr:
    """A string kept out of reprs and ``str``: read it with ``get_secret_value()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretStr('**********')" if self._value else "SecretStr('')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --- kinds: how a raw value becomes a field's type --------------------------------------------------------------

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_INTEGRAL = re.compile(r"\s*[+-]?\d[\d_]*\.0*\s*")


def STR(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    raise KindError("string_type", "Input should be a valid string")


def BOOL(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    elif isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    elif not isinstance(value, int):
        raise KindError("bool_type", "Input should be a valid boolean")
    raise KindError("bool_parsing", "Input should be a valid boolean, unable to interpret input")


def INT(value: Any) -> int:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise KindError("finite_number", "Input should be a finite number")
        if not value.is_integer():
            raise KindError("int_from_float", "Input should be a valid integer, got a number with a fractional part")
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            if _INTEGRAL.fullmatch(value):
                return int(value.strip().partition(".")[0])
            raise KindError(
                "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
            ) from None
    raise KindError("int_type", "Input should be a valid integer")


def FLOAT(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise KindError(
                "float_parsing", "Input should be a valid number, unable to parse string as a number"
            ) from None
    raise KindError("float_type", "Input should be a valid number")


def PATH(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str):
        return Path(value)
    raise KindError("path_type", "Input is not a valid path for <class 'pathlib.Path'>")


def SECRET(value: Any) -> SecretStr:
    if isinstance(value, SecretStr):
        return value
    reveal = getattr(value, "get_secret_value", None)  # another library's secret string
    return SecretStr(STR(reveal() if callable(reveal) else value))


def literal(*choices: str) -> Kind:
    """One of ``choices``, exactly."""
    quoted = [f"'{choice}'" for choice in choices]
    expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise KindError("literal_error", f"Input should be {expected}")

    return check


def optional(kind: Kind) -> Kind:
    """``None``, or what ``kind`` takes."""

    def check(value: Any) -> Any:
        return None if value is None else kind(value)

    return check


def tuple_of(kind: Kind) -> Kind:
    """A tuple of what ``kind`` takes, from a list, tuple or set (a string is not a list of its characters)."""

    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple | set | frozenset):
            raise KindError("tuple_type", "Input should be a valid tuple")
        items = []
        for index, item in enumerate(value):
            try:
                items.append(kind(item))
            except KindError as exc:
                raise KindError(exc.type, exc.msg, (index, *exc.loc)) from None
        return tuple(items)

    return check


def instance_of(*types: type) -> Kind:
    """An instance of one of ``types``, as it is."""
    names = " or ".join(t.__name__ for t in types)

    def check(value: Any) -> Any:
        if isinstance(value, types):
            return value
        raise KindError("is_instance_of", f"Input should be an instance of {names}")

    return check


# --- fields and validators ------------------------------------------------------------------------------------

_REQUIRED: Any = object()


@dataclass(frozen=True, slots=True)
class Field:
    """One setting of a model: its kind, default, bounds and what it means (``serve --help`` and the docs show
    ``description``)."""

    kind: Kind
    default: Any = _REQUIRED
    description: str | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    repr: bool = True
    validate_default: bool = False

    def is_required(self) -> bool:
        return self.default is _REQUIRED

    def bounded(self, value: Any) -> Any:
        """``value`` when it is within the field's bounds."""
        if self.min_length is not None and len(value) < self.min_length:
            unit = "character" if self.min_length == 1 else "characters"
            raise KindError("string_too_short", f"String should have at least {self.min_length} {unit}")
        if self.gt is not None and not value > self.gt:
            raise KindError("greater_than", f"Input should be greater than {self.gt}")
        if self.ge is not None and not value >= self.ge:
            raise KindError("greater_than_equal", f"Input should be greater than or equal to {self.ge}")
        if self.le is not None and not value <= self.le:
            raise KindError("less_than_equal", f"Input should be less than or equal to {self.le}")
        return value


def field(
    kind: Kind,
    default: Any = _REQUIRED,
    *,
    description: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    min_length: int | None = None,
    repr: bool = True,
    validate_default: bool = False,
) -> Any:
    """A field, declared as ``name: type = field(KIND, ...)`` (typed ``Any`` so that the annotation says the type)."""
    return Field(kind, default, description, ge, gt, le, min_length, repr, validate_default)


@dataclass(frozen=True, slots=True)
class Info:
    """What a validator may look at besides its value: the fields validated before it, and the caller's context."""

    data: Mapping[str, Any]
    context: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Validator:
    """A model's check of one or more fields, run before the kind (``mode="before"``) or after the bounds."""

    fields: tuple[str, ...]
    mode: Literal["before", "after"]
    function: Callable[..., Any]
    takes_info: bool

    def __call__(self, model: type, value: Any, info: Info) -> Any:
        return self.function(model, value, info) if self.takes_info else self.function(model, value)


def validates(*fields: str, mode: Literal["before", "after"] = "after") -> Callable[[Any], Validator]:
    """Marks a classmethod ``(cls, value)`` or ``(cls, value, info)`` as a validator of ``fields``: it returns the
    value to keep, or raises ``ValueError`` with the message a user reads."""

    def mark(method: Any) -> Validator:
        function = method.__func__  # a classmethod
        return Validator(fields, mode, function, function.__code__.co_argcount == 3)

    return mark


# --- models ---------------------------------------------------------------------------------------------------


class Model:
    """Values validated on construction (``Model(**values)``, or ``validate`` with a context), then frozen.

    ``fields`` maps each field's name to its ``Field``, in declaration order. Equal models have equal fields;
    the repr leaves out fields declared with ``repr=False`` and shows secrets as stars.
    """

    fields: ClassVar[Mapping[str, Field]] = {}
    _validators: ClassVar[Mapping[str, tuple[tuple[Validator, ...], tuple[Validator, ...]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = dict(cls.fields)
        checks: dict[str, Validator] = {}
        for base in reversed(cls.__mro__):
            checks.update({name: v for name, v in vars(base).items() if isinstance(v, Validator)})
        for name, value in vars(cls).items():
            if isinstance(value, Field):
                fields[name] = value
        cls.fields = fields
        for check in checks.values():
            unknown = set(check.fields) - set(fields)
            if unknown:
                raise TypeError(f"{cls.__name__}: a validator names no field: {', '.join(sorted(unknown))}")
        cls._validators = {
            name: (
                tuple(c for c in checks.values() if name in c.fields and c.mode == "before"),
                tuple(c for c in checks.values() if name in c.fields and c.mode == "after"),
            )
            for name in fields
        }

    def __init__(self, **values: Any) -> None:
        self._fill(values, None)

    @classmethod
    def validate(cls, values: Mapping[str, Any], *, context: Mapping[str, Any] | None = None) -> Self:
        """A model from ``values`` (a field left out takes its default), validators seeing ``context``; raises
        ``Invalid`` listing every problem."""
        model = cls.__new__(cls)
        model._fill(values, context)
        return model

    def _fill(self, values: Mapping[str, Any], context: Mapping[str, Any] | None) -> None:
        cls = type(self)
        data: dict[str, Any] = {}
        problems: list[Problem] = []
        for name, spec in cls.fields.items():
            if name in values:
                value = values[name]
            elif spec.is_required():
                problems.append(Problem((name,), "missing", "Field required"))
                continue
            elif not spec.validate_default:
                data[name] = spec.default
                continue
            else:
                value = spec.default
            try:
                data[name] = cls._check(name, spec, value, Info(data, context))
            except Invalid as exc:  # a nested model's
                problems.extend(Problem((name, *p.loc), p.type, p.msg) for p in exc.problems)
            except KindError as exc:
                problems.append(Problem((name, *exc.loc), exc.type, exc.msg))
            except ValueError as exc:
                problems.append(Problem((name,), "value_error", str(exc)))
        extra = (name for name in values if name not in cls.fields)
        problems += [Problem((name,), "extra_forbidden", "Extra inputs are not permitted") for name in extra]
        if problems:
            raise Invalid(problems)
        self.__dict__.update(data)

    @classmethod
    def _check(cls, name: str, spec: Field, value: Any, info: Info) -> Any:
        before, after = cls._validators[name]
        for check in before:
            value = check(cls, value, info)
        kind = spec.kind
        value = spec.bounded(kind(value, info.context) if isinstance(kind, Models) else kind(value))
        for check in after:
            value = check(cls, value, info)
        return value

    def copy_with(self, **values: Any) -> Self:
        """A copy with ``values`` replaced, not validated again: for values taken from another valid model. What
        was worked out from the old values (a ``cached_property``) is worked out again when asked for."""
        cls = type(self)
        worked_out = {name for base in cls.__mro__ for name, v in vars(base).items() if isinstance(v, cached_property)}
        copy = cls.__new__(cls)
        copy.__dict__.update((name, value) for name, value in self.__dict__.items() if name not in worked_out)
        copy.__dict__.update(values)
        return copy

    def values(self) -> dict[str, Any]:
        """Every field's value, by name."""
        return {name: getattr(self, name) for name in type(self).fields}

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: build another (copy_with) instead of setting {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Model) or type(other) is not type(self):
            return NotImplemented
        return self.values() == other.values()

    def __hash__(self) -> int:
        return hash((type(self), *self.values().values()))

    def __repr__(self) -> str:
        shown = (f"{name}={getattr(self, name)!r}" for name, spec in type(self).fields.items() if spec.repr)
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, slots=True)
class Models:
    """A kind: a tuple of ``model``s, each item a model already or a mapping validated into one, with the context
    of the model that holds them."""

    model: type[Model]

    def __call__(self, value: Any, context: Mapping[str, Any] | None = None) -> tuple[Model, ...]:
        if not isinstance(value, list | tuple):
            raise KindError("tuple_type", "Input should be a valid tuple")
        items: list[Model] = []
        problems: list[Problem] = []
        for index, item in enumerate(value):
            if isinstance(item, self.model):
                items.append(item)
            elif isinstance(item, Mapping):
                try:
                    items.append(self.model.validate(item, context=context))
                except Invalid as exc:
                    problems.extend(Problem((index, *p.loc), p.type, p.msg) for p in exc.problems)
            else:
                message = f"Input should be a valid dictionary or instance of {self.model.__name__}"
                problems.append(Problem((index,), "model_type", message))
        if problems:
            raise Invalid(problems)
        return tuple(items)
