"""What a search may return: conditions on a document's metadata, source and valid_from, all of which must hold.

- `equals`: metadata key = value (the `filter` map of the proto, as before);
- `any_of`: metadata key IN values;
- `sources`: the document's `source` matches one of these globs (`fnmatch`: `*`, `?`, `[...]`, case-sensitive);
- `valid_from_min` (inclusive) / `valid_from_max` (exclusive): a range of the document's valid_from (unix s).

The search plans a Filter on the metadata index (metaindex.py) and checks every hit against it again.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kfresh.core.errors import InvalidInput
from kfresh.indexer.validation import check_metadata

MAX_VALUES = 1024  # values in one IN list, globs in `sources`


@dataclass(frozen=True)
class Filter:
    equals: Mapping[str, str] = field(default_factory=dict)
    any_of: Mapping[str, frozenset[str]] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    valid_from_min: float | None = None
    valid_from_max: float | None = None

    def __bool__(self) -> bool:
        return bool(self.equals or self.any_of or self.sources) or self.has_range

    @property
    def has_range(self) -> bool:
        return self.valid_from_min is not None or self.valid_from_max is not None

    def matches(self, metadata: Mapping[str, str], source: str, valid_from: float) -> bool:
        if any(metadata.get(k) != v for k, v in self.equals.items()):
            return False
        if any(metadata.get(k) not in values for k, values in self.any_of.items()):
            return False
        if self.sources and not any(fnmatch.fnmatchcase(source, glob) for glob in self.sources):
            return False
        return self.in_range(valid_from)

    def in_range(self, valid_from: float) -> bool:
        if self.valid_from_min is not None and valid_from < self.valid_from_min:
            return False
        return self.valid_from_max is None or valid_from < self.valid_from_max

    def with_equals(self, extra: Mapping[str, str]) -> Filter:
        """This filter and `extra` equalities both (InvalidInput when one key is asked two different values)."""
        for key, value in extra.items():
            if key in self.equals and self.equals[key] != value:
                raise InvalidInput(f"filter asks {key}={self.equals[key]} and {key}={value} at once")
        return Filter({**self.equals, **extra}, self.any_of, self.sources, self.valid_from_min, self.valid_from_max)


def as_filter(value: Filter | Mapping[str, str] | None) -> Filter:
    """A Filter from a Filter, an equality map (validated) or None."""
    if value is None:
        return Filter()
    if isinstance(value, Filter):
        return check_filter(value)
    return Filter(equals=check_metadata(value, "filters"))


def check_filter(f: Filter) -> Filter:
    """InvalidInput naming the part of `f` that cannot be used."""
    for key, values in f.any_of.items():
        if not values:
            raise InvalidInput(f"filter any_of[{key!r}] is empty: it would match nothing")
        if len(values) > MAX_VALUES:
            raise InvalidInput(f"filter any_of[{key!r}] has {len(values)} values; at most {MAX_VALUES} are allowed")
    if len(f.sources) > MAX_VALUES:
        raise InvalidInput(f"filter source has {len(f.sources)} globs; at most {MAX_VALUES} are allowed")
    if any(not glob for glob in f.sources):
        raise InvalidInput("filter source: a glob is empty")
    for name in ("valid_from_min", "valid_from_max"):
        bound = getattr(f, name)
        if bound is not None and not math.isfinite(bound):
            raise InvalidInput(f"filter {name} must be a finite time")
    if f.valid_from_min is not None and f.valid_from_max is not None and f.valid_from_min >= f.valid_from_max:
        raise InvalidInput("filter valid_from_min must be before valid_from_max")
    return f
