"""How a setting is declared, converted and checked: the pieces the schema's
tables (aiod.config_schema) are made of.

A Setting names a key, its Kind (which converts what YAML gave, or raises
ValueError with the problem), its default and, when it has none, what to say
when it is missing. A Table lists a mapping's Settings and Checks in the
order they run; reading a mapping with it gives an Item, the values read so
far, which each Check looks at and reports problems on.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from yaml.nodes import MappingNode, Node, SequenceNode

from aiod.units import show
from aiod.yamltree import Section, describe, join

C = TypeVar("C")


# ---------------------------------------------------------------------------
# Types: each converts what YAML gave, or raises ValueError with the problem.

class Kind(Protocol):
    def convert(self, node: Node, value: object) -> Any: ...


@dataclass(frozen=True)
class Text:
    """A string; with choices, one of them; with a pattern, matching it."""

    choices: Sequence[str] = ()
    pattern: re.Pattern[str] | None = None
    then: Callable[[str], object] | None = None  # a parser for text with a structure

    def convert(self, node: Node, value: object) -> Any:
        if not isinstance(value, str):
            quote = "" if isinstance(node, (MappingNode, SequenceNode)) else \
                "; put it in quotes if you meant the text"
            want = f"one of {', '.join(self.choices)}" if self.choices else "a string"
            raise ValueError(f"expected {want}, found {describe(node)}{quote}")
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(value.lower(), self.choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"expected one of {', '.join(self.choices)}, "
                             f"found {show(value)}{hint}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ValueError(f"expected letters, digits, '_', '.' or '-', found {show(value)}")
        return value if self.then is None else self.then(value)


@dataclass(frozen=True)
class Integer:
    """A whole number (not a boolean, not 4.0) from minimum, up to maximum when set."""

    minimum: int
    maximum: tuple[int, str] | None = None  # the largest value, and why: a phrase after it

    def convert(self, node: Node, value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number >= {self.minimum}, found {describe(node)}")
        if value < self.minimum:
            raise ValueError(f"expected a whole number >= {self.minimum}, found {value}")
        if self.maximum is not None and value > self.maximum[0]:
            raise ValueError(f"expected at most {self.maximum[0]}, {self.maximum[1]}, "
                             f"found {value}")
        return value


@dataclass(frozen=True)
class Boolean:
    """true or false (YAML 1.1: yes/no and on/off too)."""

    def convert(self, node: Node, value: object) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, found {describe(node)}")
        return value


@dataclass(frozen=True)
class Quantity:
    """A number with a unit, parsed by one of aiod.units' parsers."""

    parse: Callable[[object], object]
    expected: str  # what the unit looks like

    def convert(self, node: Node, value: object) -> Any:
        if value is None or isinstance(value, Node):  # null, lists, dates...
            raise ValueError(f"expected {self.expected}, found {describe(node)}")
        return self.parse(value)


@dataclass(frozen=True)
class Nested:
    """A mapping of settings, read by its own table."""

    table: Table[Any]

    def convert(self, node: Node, value: object) -> Any:
        raise TypeError("a nested section is read with its own table, not converted")


@dataclass(frozen=True)
class Each(Nested):
    """A list of mappings, each read by the table."""


# ---------------------------------------------------------------------------
# Settings, items and tables.

@dataclass(frozen=True)
class Setting:
    """One key of a mapping: its type, and its default or what to say when it is missing."""

    key: str
    kind: Kind
    default: Any = None  # when the key is absent; None: no value (see required)
    required: str | None = None  # when set, a missing key is a problem saying this

    def read(self, section: Section) -> Any:
        return section.get(self.key, self.default, self.kind.convert, self.required)


class Item(Generic[C]):
    """One mapping as read so far: each setting's value, None when missing or reported.

    ``context`` is what its checks need from the rest of the file.
    """

    def __init__(self, section: Section, context: C) -> None:
        self.section = section
        self.context = context
        self.values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def given(self, key: str) -> bool:
        return key in self.section.values

    def bad(self, key: str, message: str) -> None:
        node = self.section.values.get(key, self.section.node)
        self.section.problems.add(node, join(self.section.path, key), message)

    def drop(self, key: str) -> None:
        """Forget a reported value, so nothing is built from it."""
        self.values[key] = None

    def complete(self) -> dict[str, Any] | None:
        """Every value, or None when one is missing or was reported."""
        return None if any(v is None for v in self.values.values()) else dict(self.values)


Check = Callable[[Item[C]], None]


class Table(Generic[C]):
    """A mapping's settings and checks, in the order they are read and run."""

    def __init__(self, *steps: Setting | Check[C]) -> None:
        self.steps = steps
        self.settings = {s.key: s for s in steps if isinstance(s, Setting)}
        self.keys = tuple(self.settings)
        if len(self.keys) != sum(isinstance(s, Setting) for s in steps):
            raise ValueError(f"a key is stated twice in the table of {', '.join(self.keys)}")

    def __getitem__(self, key: str) -> Setting:
        return self.settings[key]

    def read(self, section: Section, context: C) -> Item[C]:
        item = Item(section, context)
        for step in self.steps:
            if isinstance(step, Setting):
                item.values[step.key] = step.read(section)
            else:
                step(item)
        return item
