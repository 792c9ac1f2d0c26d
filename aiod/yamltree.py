"""YAML read as a node tree with line numbers, and problems collected as one
``<file>:<line>: <key.path>: <message>`` line each.

We walk the node tree from ``yaml.compose`` instead of using ``safe_load``:
the nodes keep their line numbers, and duplicate mapping keys (which YAML
silently resolves to the last one) are still visible so we can refuse them.
Scalars keep PyYAML's YAML 1.1 typing (``yes`` is a boolean, ``1_000`` an
integer); we only look at the resolved tag and convert the value ourselves.

This module knows the shape of YAML, not the settings: which keys a mapping
may hold and how each value converts come from aiod.config_schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from aiod.units import show

TAG = "tag:yaml.org,2002:"

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def describe(node: Node) -> str:
    """What the user wrote, in words, for "expected X, found Y"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = {"str": "the text", "int": "the integer", "float": "the number",
            "bool": "the boolean", "timestamp": "the date",
            "binary": "binary data"}.get(node.tag.removeprefix(TAG))
    if node.tag == TAG + "null":
        return "nothing (null)"
    if kind is None:
        return f"a value tagged {node.tag}"
    value = node.value if kind != "the text" else show(node.value)
    return f"{kind} {value}"


def line_of(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def is_null(node: Node | None) -> bool:
    """``key:`` with nothing after it (absent keys are None, not null)."""
    return isinstance(node, ScalarNode) and node.tag == TAG + "null"


class Problems:
    """Collects problems as "<source>:<line>: <path>: <message>" lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._found: list[tuple[int, str]] = []

    def add(self, where: Node | int | None, path: str, message: str) -> None:
        line = line_of(where) if isinstance(where, Node) else where
        prefix = self.source if line is None else f"{self.source}:{line}"
        text = f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}"
        # A problem never spans lines: each line of stderr is one problem.
        self._found.append((line if line is not None else 1 << 30, " ".join(text.splitlines())))

    def __bool__(self) -> bool:
        return bool(self._found)

    def lines(self) -> list[str]:
        # Sorted by line so the output reads top to bottom like the file; a
        # stable sort, so problems on one line keep the order they were found.
        return [text for _, text in sorted(self._found, key=lambda p: p[0])]


class Section:
    """One YAML mapping checked against the keys it may hold.

    :meth:`get` returns the converted value, the default when the key is
    absent, or None after recording a problem; callers skip the checks that
    need a value they did not get.
    """

    def __init__(self, node: Node | None, path: str, known: Sequence[str],
                 problems: Problems, constructor: SafeConstructor) -> None:
        self.node = node
        self.path = path
        self.problems = problems
        self._constructor = constructor
        self.values: dict[str, Node] = {}
        if node is None:
            return
        if not isinstance(node, MappingNode):
            problems.add(node, path, f"expected a mapping of settings, found {describe(node)}")
            return
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, seen, known)
            if key is not None:
                self.values[key] = value_node

    def _key(self, node: Node, seen: dict[str, Node], known: Sequence[str]) -> str | None:
        """The setting a key node names, or None after recording why it names none."""
        if node.tag == TAG + "merge":
            self.problems.add(node, self.path, "merge keys ('<<') are not supported; "
                                               "write the settings out")
            return None
        if not isinstance(node, ScalarNode) or node.tag != TAG + "str":
            self.problems.add(node, self.path, f"expected a setting name, found {describe(node)}")
            return None
        key: str = node.value
        if key in seen:
            self.problems.add(node, join(self.path, key),
                              f"duplicate key (first set on line {line_of(seen[key])})")
            return None
        seen[key] = node  # known or not: a second one is a duplicate
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; known keys: {', '.join(known)}"
            self.problems.add(node, join(self.path, key), f"unknown key{hint}")
            return None
        return key

    @property
    def ok(self) -> bool:
        """False when the node was not a mapping at all."""
        return self.node is None or isinstance(self.node, MappingNode)

    def _scalar(self, node: Node) -> object:
        if not isinstance(node, ScalarNode):
            return node  # the caller's type check reports it
        tag = node.tag.removeprefix(TAG)
        if tag == "str":
            return node.value
        if tag == "int":
            return self._constructor.construct_yaml_int(node)
        if tag == "float":
            return self._constructor.construct_yaml_float(node)
        if tag == "bool":
            return self._constructor.construct_yaml_bool(node)
        if tag == "null":
            return None
        return node  # dates, binary, custom tags: none of our settings

    def get(self, key: str, default: T | None, convert: Callable[[Node, object], T],
            required: str | None = None) -> T | None:
        """``key`` converted by ``convert``, which raises ValueError with the problem.

        ``required``: what to say when the key is missing (None: it may be).
        """
        node = self.values.get(key)
        if node is None:
            if required is not None and self.ok:
                self.problems.add(self.node, join(self.path, key), f"missing; {required}")
            return default
        try:
            value = self._scalar(node)
        except (ValueError, TypeError, yaml.YAMLError):
            value = node  # an explicit tag the value does not match, like !!int x
        try:
            return convert(node, value)
        except ValueError as e:
            self.problems.add(node, join(self.path, key), str(e))
            return None


def sequence(node: Node | None, path: str, problems: Problems) -> list[Node]:
    """The items of a list setting; absent or null is an empty list."""
    if node is None or is_null(node):
        return []  # "jobs:" with nothing after it: an empty list
    if not isinstance(node, SequenceNode):
        problems.add(node, path, f"expected a list, found {describe(node)}")
        return []
    return list(node.value)


def compose(text: str, source: str) -> Node | None:
    """The node tree of one YAML document, or ConfigError with one line saying why not."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark is not None:
            at = f"line {e.context_mark.line + 1}"
            # PyYAML splits one sentence in two: "expected a single document
            # in the stream" / "but found another document". Put it back.
            what = f"{e.context} ({at}), {e.problem}" if e.problem.startswith("but ") \
                else f"{e.problem} ({e.context} at {at})"
        column = f", column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"{where}: YAML syntax error{column}: {what}"]) from None
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        raise ConfigError([f"{source}:{line}: YAML cannot hold the character "
                           f"{e.character!r} (control characters are not allowed)"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: YAML error: {' '.join(str(e).split())}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: YAML nested too deeply to be a configuration"]) from None
