"""A sweep's search space: dotted paths of a job spec mapped to distributions, their
grammar, and the finite sets of points a space is enumerated or checked at.

Each distribution is written as a JSON object or as a short string that parses to the
same thing:

    {"uniform": [0, 0.5]}                      uniform(0, 0.5)
    {"loguniform": [1e-4, 0.1]}                loguniform(1e-4, 0.1)
    {"int": [1, 4]}                            int(1, 4)
    {"int": [16, 256], "log": true}            int(16, 256, log)
    {"int": [0, 100], "step": 10}              int(0, 100, step=10)
    {"choice": ["relu", "gelu"]}               choice([relu, gelu])

A choice option may open a sub-space that applies only when it is chosen:
{"choice": ["mlp", {"value": "cnn", "space": {"model.params.channels": "int(8, 64, log)"}}]}.
A grid's explicit list of numbers is a choice, `choice([0.001, 0.01, 0.1])`.

shared/sweep_spec.py holds the sweep around a space; shared/sweep_search.py samples it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field

from shared.spec import SpecError

# An int parameter with at most this many values has every one checked; a wider one
# (a layer width of 16..1024) only its ends and middle: the catalogue's rules that are
# not intervals (odd kernels, ResNet depths, heads dividing d_model) are on small ranges.
INT_VALUES_CHECKED = 64

Scalar = Union[str, int, float, bool, None]  # noqa: UP007


class SweepSpecError(SpecError):
    """`fields` maps dotted names ("space.optimizer.lr", "base.epochs", "max_trials") to
    a message; the API answers 422 with them."""


class _Bad(ValueError):
    """One parameter's problem, before it is known which field to name."""


# ---------------------------------------------------------------- distributions


def format_value(value: Any) -> str:
    """A value as a person writes it in a space: 100 not 100.0, relu not 'relu'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value) else json.dumps(value)
    return str(value)


def _fractional_between(low: float, high: float) -> float:
    """A value strictly inside (low, high) that is not a whole number where one exists,
    so a float range over an integer field is caught."""
    middle = (low + high) / 2
    if middle.is_integer() and middle + 0.5 < high and not (middle + 0.5).is_integer():
        return middle + 0.5
    return middle


class _Dist(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str]

    def describe(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


class Uniform(_Dist):
    kind: ClassVar[str] = "uniform"
    low: float
    high: float

    def describe(self) -> str:
        return f"uniform({format_value(self.low)}, {format_value(self.high)})"

    def to_json(self) -> dict[str, Any]:
        return {"uniform": [self.low, self.high]}

    def ends(self) -> tuple[float, float]:
        return self.low, self.high

    def interior(self) -> list[float]:
        return [_fractional_between(self.low, self.high)]


class LogUniform(Uniform):
    kind: ClassVar[str] = "loguniform"

    def describe(self) -> str:
        return f"loguniform({format_value(self.low)}, {format_value(self.high)})"

    def to_json(self) -> dict[str, Any]:
        return {"loguniform": [self.low, self.high]}

    def interior(self) -> list[float]:
        middle = math.exp((math.log(self.low) + math.log(self.high)) / 2)
        return [middle if not middle.is_integer() else _fractional_between(self.low, self.high)]


class IntRange(_Dist):
    """Whole numbers low..high (both included) in steps of `step`; `log`: sampled
    uniformly in log space (a search method's concern; the values are the same)."""

    kind: ClassVar[str] = "int"
    low: int
    high: int
    log: bool = False
    step: int = 1

    def describe(self) -> str:
        extra = ", log" if self.log else f", step={self.step}" if self.step != 1 else ""
        return f"int({self.low}, {self.high}{extra})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"int": [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step != 1:
            out["step"] = self.step
        return out

    @property
    def count(self) -> int:
        return (self.high - self.low) // self.step + 1

    def values(self) -> range:
        return range(self.low, self.high + 1, self.step)

    def ends(self) -> tuple[int, int]:
        return self.low, self.high

    def interior(self) -> list[int]:
        inside = self.values()[1:-1]
        if len(inside) <= INT_VALUES_CHECKED:
            return list(inside)
        return [inside[len(inside) // 2]]


class ChoiceOption(_Dist):
    value: Any
    # Parameters that apply only when this value is chosen.
    space: dict[str, Distribution] = Field(default_factory=dict)

    def to_json(self) -> Any:
        if not self.space:
            return self.value
        return {"value": self.value, "space": space_to_json(self.space)}


class Choice(_Dist):
    kind: ClassVar[str] = "choice"
    options: tuple[ChoiceOption, ...]

    def describe(self) -> str:
        return f"choice([{', '.join(format_value(o.value) for o in self.options)}])"

    def to_json(self) -> dict[str, Any]:
        return {"choice": [o.to_json() for o in self.options]}

    @property
    def values(self) -> list[Any]:
        return [o.value for o in self.options]

    def option(self, value: Any) -> ChoiceOption:
        key = _value_key(value)
        return next(o for o in self.options if _value_key(o.value) == key)


Distribution = Union[Uniform, LogUniform, IntRange, Choice]  # noqa: UP007
ChoiceOption.model_rebuild()


def space_to_json(space: Mapping[str, Distribution]) -> dict[str, Any]:
    """The canonical JSON object form: what a stored sweep keeps and parses back."""
    return {path: dist.to_json() for path, dist in space.items()}


def axes(space: Mapping[str, Distribution]) -> list[dict[str, Any]]:
    """One axis per parameter, sub-spaces flattened in space order, for a chart of the
    trials: {"path", "type": "number" | "choice", "log", "low", "high", "values"}. A path
    that several sub-spaces set (layers for two models) gets one axis spanning them."""
    found: dict[str, dict[str, Any]] = {}

    def add(path: str, dist: Distribution) -> None:
        if isinstance(dist, Choice):
            axis = found.setdefault(path, {"path": path, "type": "choice", "values": []})
            for option in dist.options:
                if axis["type"] == "choice" and option.value not in axis["values"]:
                    axis["values"].append(option.value)
                for sub_path, sub in option.space.items():
                    add(sub_path, sub)
            return
        log = isinstance(dist, LogUniform) or (isinstance(dist, IntRange) and dist.log)
        low, high = dist.ends()
        axis = found.setdefault(path, {"path": path, "type": "number", "log": log,
                                       "low": low, "high": high})  # fmt: skip
        if axis["type"] == "number":
            axis["low"], axis["high"] = min(axis["low"], low), max(axis["high"], high)
            axis["log"] = axis["log"] and log

    for path, dist in space.items():
        add(path, dist)
    return list(found.values())


# ---------------------------------------------------------------- parsing the space

_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_CALL = re.compile(r"\s*([A-Za-z_]+)\s*\((.*)\)\s*", re.DOTALL)
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_BARE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
FORMS = (
    "uniform(lo, hi), loguniform(lo, hi), int(lo, hi), int(lo, hi, log), "
    "int(lo, hi, step=N) or choice([a, b, ...]), or the JSON objects "
    '{"uniform": [lo, hi]}, {"loguniform": [lo, hi]}, {"int": [lo, hi], "log": false, '
    '"step": 1}, {"choice": [a, b, ...]}'
)


def _value_key(value: Any) -> tuple[str, Any]:
    """Equality of choice values as the job spec sees them: 1 and 1.0 are the same
    number, true is not 1."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    return ("str", value)


def _split_args(text: str) -> list[str]:
    """Split on top-level commas, keeping quoted strings whole."""
    parts, current, quote, depth = [], [], "", 0
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
            current.append(char)
        elif char in "[(":
            depth += 1
            current.append(char)
        elif char in "])":
            depth -= 1
            current.append(char)
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if quote:
        raise _Bad(f"an unclosed {quote} quote in {text!r}")
    tail = "".join(current).strip()
    if tail or parts:
        parts.append(tail)
    return parts


def _number_token(token: str, what: str) -> int | float:
    if _INT.fullmatch(token):
        return int(token)
    if _FLOAT.fullmatch(token):
        return float(token)
    raise _Bad(f"{what} must be a number, not {token!r}")


def _choice_token(token: str) -> Scalar:
    if not token:
        raise _Bad("choice has an empty value (two commas in a row?)")
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    lowered = token.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    if _INT.fullmatch(token) or _FLOAT.fullmatch(token):
        return _number_token(token, "a value")
    if _BARE.fullmatch(token):
        return token
    raise _Bad(f"choice value {token!r} needs quotes")


def _from_string(text: str) -> dict[str, Any]:
    """A string form as its JSON object form."""
    match = _CALL.fullmatch(text)
    if not match:
        raise _Bad(f"{text!r} is not a distribution; write {FORMS}")
    name, inner = match.group(1), match.group(2).strip()
    if name == "choice":
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        return {"choice": [_choice_token(t) for t in _split_args(inner)]}
    args = _split_args(inner)
    if name in ("uniform", "loguniform"):
        if len(args) != 2:
            raise _Bad(f"{name}(lo, hi) takes two numbers; got {text.strip()!r}")
        return {name: [_number_token(a, f"{name}'s bounds") for a in args]}
    if name == "int":
        if len(args) < 2:
            raise _Bad(f"int(lo, hi) takes two whole numbers; got {text.strip()!r}")
        out: dict[str, Any] = {"int": [_number_token(a, "int's bounds") for a in args[:2]]}
        for option in args[2:]:
            key, _, value = (p.strip() for p in option.partition("="))
            if key == "log" and value in ("", "true", "false"):
                out["log"] = value != "false"
            elif key == "step" and _INT.fullmatch(value):
                out["step"] = int(value)
            else:
                raise _Bad(f"int takes `log` or `step=N` after its bounds, not {option!r}")
        return out
    raise _Bad(f"unknown distribution {name!r}; write {FORMS}")


def _bounds(raw: Any, name: str, whole: bool) -> tuple[Any, Any]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise _Bad(f"{name} takes [low, high]; got {json.dumps(raw, default=str)}")
    for bound in raw:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise _Bad(f"{name}'s bounds must be numbers; got {json.dumps(bound, default=str)}")
        if not math.isfinite(bound):
            raise _Bad(f"{name}'s bounds must be finite; got {bound}")
        if whole and not isinstance(bound, int):
            raise _Bad(f"int's bounds must be whole numbers; got {format_value(bound)}")
    low, high = raw
    if low >= high:
        raise _Bad(f"{name}({format_value(low)}, {format_value(high)}): low must be less than high")
    return low, high


def _parse_int(raw: Mapping[str, Any]) -> IntRange:
    low, high = _bounds(raw["int"], "int", whole=True)
    log, step = raw.get("log", False), raw.get("step", 1)
    if not isinstance(log, bool):
        raise _Bad(f"int's log must be true or false; got {json.dumps(log, default=str)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise _Bad(f"int's step must be a whole number of at least 1; got {format_value(step)}")
    dist = IntRange(low=low, high=high, log=log, step=step)
    if log and step != 1:
        raise _Bad(f"{dist.describe()}: a log scale takes no step")
    if log and low < 1:
        raise _Bad(f"{dist.describe()}: low must be at least 1 on a log scale")
    if (high - low) % step:
        raise _Bad(
            f"int({low}, {high}, step={step}): high - low must be a multiple of the step, "
            f"so that high is one of the values"
        )
    return dist


def _check_scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad(f"choice values must be finite numbers; got {value}")
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise _Bad(
            "choice values must be strings, numbers, true, false or null; an option with "
            'a sub-space is written {"value": ..., "space": {...}}; got '
            + json.dumps(value, default=str)
        )
    return value


def _parse_choice(raw: Any, path: str, errors: dict[str, str], taken: Sequence[str]) -> Choice:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _Bad("choice needs a non-empty list of values")
    options, seen = [], set()
    for item in raw:
        if isinstance(item, ChoiceOption):
            value, sub = item.value, item.space
        elif isinstance(item, Mapping):
            unknown = set(item) - {"value", "space"}
            if unknown or "value" not in item:
                raise _Bad(
                    'a choice option that is an object is {"value": ..., "space": {...}}'
                    + (f"; unknown key {sorted(unknown)[0]!r}" if unknown else "")
                )
            value = item["value"]
            sub = _parse_space(item.get("space") or {}, errors, [*taken, path], top=False)
        else:
            value, sub = item, {}
        _check_scalar(value)
        key = _value_key(value)
        if key in seen:
            raise _Bad(f"choice lists {format_value(value)} twice")
        seen.add(key)
        options.append(ChoiceOption(value=value, space=sub))
    return Choice(options=tuple(options))


def _parse_dist(raw: Any, path: str, errors: dict[str, str], taken: Sequence[str]) -> Distribution:
    if isinstance(raw, (Uniform, IntRange)):
        return raw
    if isinstance(raw, Choice):
        return _parse_choice(list(raw.options), path, errors, taken)
    if isinstance(raw, str):
        raw = _from_string(raw)
    if not isinstance(raw, Mapping):
        raise _Bad(
            f"must be a distribution, not {json.dumps(raw, default=str)} (fixed values go "
            f"in base); write {FORMS}"
        )
    kinds = [k for k in ("uniform", "loguniform", "int", "choice") if k in raw]
    if len(kinds) != 1:
        raise _Bad(f"must name exactly one distribution; write {FORMS}")
    allowed = {kinds[0], "log", "step"} if kinds[0] == "int" else {kinds[0]}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _Bad(f"{kinds[0]} does not take {unknown[0]!r}")
    if kinds[0] == "int":
        return _parse_int(raw)
    if kinds[0] == "choice":
        return _parse_choice(raw["choice"], path, errors, taken)
    low, high = _bounds(raw[kinds[0]], kinds[0], whole=False)
    if kinds[0] == "loguniform":
        if low <= 0:
            raise _Bad(
                f"loguniform({format_value(low)}, {format_value(high)}): low must be above 0 (a log scale "
                "has no 0 or negative numbers)"
            )
        return LogUniform(low=low, high=high)
    return Uniform(low=low, high=high)


def overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _parse_space(
    raw: Any, errors: dict[str, str], taken: Sequence[str], *, top: bool
) -> dict[str, Distribution]:
    """Parse one level of a space into `errors` (all of them, not the first); `taken`:
    the paths of the levels around it, which a sub-space may not set again."""
    if not isinstance(raw, Mapping):
        errors.setdefault("space", "must be an object of dotted paths to distributions")
        return {}
    if top and not raw:
        errors.setdefault("space", "needs at least one parameter to search")
    keys = [str(k) for k in raw]
    space: dict[str, Distribution] = {}
    for index, (key, value) in enumerate(zip(keys, raw.values(), strict=True)):
        field = f"space.{key}"
        if not _PATH.fullmatch(key):
            errors.setdefault(
                field,
                "must be a dotted path of field names, like optimizer.lr or model.params.layers",
            )
            continue
        if key == "kind" or key.startswith("kind."):
            errors.setdefault(
                field, "a sweep's trials are all the base's kind; it cannot be searched"
            )
            continue
        clash = next((o for o in [*taken, *keys[:index]] if overlaps(key, o)), None)
        if clash is not None:
            errors.setdefault(
                field,
                "is already in the space"
                if clash == key
                else f"overlaps {clash}: a field and a field inside it cannot both be searched",
            )
            continue
        try:
            space[key] = _parse_dist(value, key, errors, [*taken, *keys])
        except _Bad as exc:
            errors.setdefault(field, str(exc))
    return space


def parse_space(raw: Any) -> dict[str, Distribution]:
    """A space from its JSON/YAML form (strings and objects mixed); SweepSpecError names
    every bad parameter as space.<path>."""
    errors: dict[str, str] = {}
    space = _parse_space(raw, errors, (), top=True)
    if errors:
        raise SweepSpecError(errors)
    return space


# ---------------------------------------------------------------- enumeration

Slot = tuple[str, Distribution, Any]  # path, its distribution, the chosen value (or FREE)
FREE = object()


def expand(items: Sequence[tuple[str, Distribution]], *, ints: bool) -> Iterator[list[Slot]]:
    """Every combination of the choices (and, with `ints`, of every int's values), in
    space order with a choice's sub-space right after it, the first parameter changing
    slowest. Other parameters come out unchosen (FREE)."""
    if not items:
        yield []
        return
    (path, dist), rest = items[0], items[1:]
    if isinstance(dist, Choice):
        for option in dist.options:
            for tail in expand([*option.space.items(), *rest], ints=ints):
                yield [(path, dist, option.value), *tail]
    elif ints and isinstance(dist, IntRange):
        for value in dist.values():
            for tail in expand(rest, ints=ints):
                yield [(path, dist, value), *tail]
    else:
        for tail in expand(rest, ints=ints):
            yield [(path, dist, FREE), *tail]


def grid_problems(space: Mapping[str, Distribution]) -> dict[str, str]:
    """What keeps a space from being a grid, by space.<path>: continuous ranges and log
    ints have no finite list of values to walk through."""
    problems: dict[str, str] = {}
    for path, dist in space.items():
        if isinstance(dist, Choice):
            for option in dist.options:
                problems.update(grid_problems(option.space))
        elif isinstance(dist, Uniform):
            problems[f"space.{path}"] = (
                f"a grid needs a finite list of values; {dist.describe()} has infinitely "
                "many: list them with choice([...]) or search with method random or tpe"
            )
        elif isinstance(dist, IntRange) and dist.log:
            problems[f"space.{path}"] = (
                f"a grid has no log scale; list the values, like choice([{dist.low}, "
                f"{dist.low * 2}, ...]), or search with method random or tpe"
            )
    return problems


def grid_count(space: Mapping[str, Distribution]) -> int:
    """How many points the grid of `space` has: a choice counts each option with its
    sub-space's grid; the space must have no grid_problems."""
    total = 1
    for dist in space.values():
        if isinstance(dist, Choice):
            total *= sum(grid_count(o.space) for o in dist.options)
        elif isinstance(dist, IntRange):
            total *= dist.count
        else:
            raise ValueError("a continuous distribution has no grid")
    return total


def corners_and_interiors(slots: list[Slot]) -> Iterator[dict[str, Any]]:
    """The points checked for one combination of choices (`slots` from expand): every
    combination of the free numerics' ends, then each one's interior values with the
    others at all their lows and at all their highs; no point twice."""
    free = [(i, d) for i, (_, d, v) in enumerate(slots) if v is FREE]
    fixed = [v for _, _, v in slots]
    paths = [p for p, _, _ in slots]
    seen: set[tuple[Any, ...]] = set()

    def point(values: dict[int, Any]) -> dict[str, Any] | None:
        key = tuple(values[i] for i, _ in free)  # the choices are the same for every point
        if key in seen:
            return None
        seen.add(key)
        return dict(zip(paths, (values.get(i, v) for i, v in enumerate(fixed)), strict=True))

    ends = [d.ends() for _, d in free]  # type: ignore[union-attr]
    for corner in itertools.product(*ends):
        found = point({i: v for (i, _), v in zip(free, corner, strict=True)})
        if found is not None:
            yield found
    for index, dist in free:
        for value in dist.interior():  # type: ignore[union-attr]
            for side in (0, 1):
                others = {i: e[side] for (i, _), e in zip(free, ends, strict=True)}
                found = point({**others, index: value})
                if found is not None:
                    yield found
