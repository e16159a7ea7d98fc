"""The vocabulary of allowed values a config schema declares for its numeric keys, and the
error every config problem raises."""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, key and value."""


class Allowed(Protocol):
    """The values a key may take: `value in allowed`, and `str(allowed)` completes
    "must be ..." in error messages."""

    def __contains__(self, value: Any) -> bool: ...


@dataclass(frozen=True)
class Range:
    """Finite numbers from `low` to `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: Any) -> bool:
        if not isinstance(value, int) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.open_high and value == self.high)

    def __str__(self) -> str:
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class OneOf:
    """A number from a short list (e.g. the layer counts a probe supports)."""

    values: tuple[float, ...]

    def __contains__(self, value: Any) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return f"one of {list(self.values)}"


@dataclass(frozen=True)
class Pair:
    """A `[low, high]` range whose ends both lie in `ends` (crop scales, mask ratios)."""

    ends: Range

    def __contains__(self, value: Any) -> bool:
        return len(value) == 2 and all(v in self.ends for v in value) and value[0] <= value[1]

    def __str__(self) -> str:
        return f"[low, high] with low <= high, both {self.ends}"


@dataclass(frozen=True)
class Each:
    """A list (non-empty unless `may_be_empty`) whose every element is allowed by `element`."""

    element: Range | OneOf
    may_be_empty: bool = False

    def __contains__(self, value: Any) -> bool:
        return (self.may_be_empty or len(value) > 0) and all(v in self.element for v in value)

    def __str__(self) -> str:
        empty = "a list" if self.may_be_empty else "a non-empty list"
        return f"{empty} with every element {self.element}"


COUNT = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
UNIT = Range(0, 1)
BELOW_ONE = Range(0, 1, open_high=True)
FRACTION = Range(0, 1, open_low=True)
# torch.manual_seed takes at most 64 bits; numpy's seed sequences take no negative number.
SEED = Range(0, 2**64 - 1)


def range_problems(obj: Any, ranges: Mapping[str, Allowed]) -> list[tuple[str, Any, str]]:
    """(key, value, what is allowed) for each value of the dataclass `obj` that its entry in
    `ranges` (dotted keys from obj) does not allow. A null passes: the schema's type already
    says which keys may be null, and the message then says so."""
    out = []
    for key, allowed in ranges.items():
        parent_key, _, name = key.rpartition(".")
        parent = attrgetter(parent_key)(obj) if parent_key else obj
        value = getattr(parent, name)
        if value is None or value in allowed:
            continue
        nullable = type(None) in typing.get_args(typing.get_type_hints(type(parent))[name])
        out.append((key, value, f"must be {allowed}{' or null' if nullable else ''}"))
    return out
