"""The YAML configuration: read, check, and turn into frozen dataclasses.

The people who read our errors are SREs at a terminal, so a bad file gives
one line per problem, ``<file>:<line>: <key.path>: <expected, found>``, all
problems at once, and never a traceback.

We walk the node tree from ``yaml.compose`` instead of using ``safe_load``:
the nodes keep their line numbers, and duplicate mapping keys (which YAML
silently resolves to the last one) are still visible so we can refuse them.
Scalars keep PyYAML's YAML 1.1 typing (``yes`` is a boolean, ``1_000`` an
integer); we only look at the resolved tag and convert the value ourselves.
"""

from __future__ import annotations

import difflib
import importlib.resources
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from aiod.aio import MAX_NR_EVENTS
from aiod.opkind import JobOp

DEFAULT_PATH = Path("/etc/aiod/aiod.yaml")
EMBEDDED_SOURCE = "<embedded default>"

LOG_LEVELS = ("debug", "info", "warning", "error")
JOB_TYPES = ("probe", "load")
# poll: IOCB_CMD_POLL on a FIFO (aiod.targets.open_fifo); it holds a context
# slot until data arrives, which the daemon's tests use for I/O that stays
# in flight. Not in the original schema; aiod.jobs implements it.
JOB_OPS = tuple(m.value for m in JobOp)

# A real configuration is a few KiB (50 pools and 50 jobs: about 10 KiB).
MAX_CONFIG_BYTES = 1 << 20

DEFAULT_LOG_LEVEL = "info"
DEFAULT_METRICS_HOST = "127.0.0.1"  # loopback: exposing metrics is an opt-in
DEFAULT_METRICS_PORT = 9740
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_DESTROY_TIMEOUT = 30.0
DEFAULT_SIZE = 64 * 1024**2
DEFAULT_OP = "randread"
DEFAULT_BLOCK_SIZE = 4096
DEFAULT_DIRECT = True
DEFAULT_RATE = 10.0
DEFAULT_IODEPTH = 1
DEFAULT_TIMEOUT = 5.0
DEFAULT_ALLOW_WRITE = False
DEFAULT_HOST_SCAN_INTERVAL = 30.0
DEFAULT_HOST_SCAN_TOP = 10
MIN_HOST_SCAN_INTERVAL = 1.0
MAX_HOST_SCAN_TOP = 100  # each holder is two series: keep the bound small

# O_DIRECT needs buffers, offsets and lengths aligned to the logical block
# size of the device; 512 is the smallest there is, so anything else can
# never work and is better refused at load time than at the first io_submit.
DIRECT_ALIGNMENT = 512

# Names end up in metric labels, log lines and file names.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

_TOP_KEYS = ("log_level", "state_directory", "metrics", "shutdown", "headroom_reserve",
             "host_scan", "pools", "jobs")
_HOST_SCAN_KEYS = ("interval", "top")
_METRICS_KEYS = ("listen",)
_SHUTDOWN_KEYS = ("drain_timeout", "destroy_timeout")
_POOL_KEYS = ("name", "contexts", "min_contexts", "nr_events")
_JOB_KEYS = ("name", "pool", "type", "target", "size", "op", "block_size",
             "direct", "rate", "iodepth", "timeout", "allow_write")

_TAG = "tag:yaml.org,2002:"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class PoolConfig:
    name: str
    contexts: int
    nr_events: int
    # The pool may shrink to this many contexts to give other processes AIO
    # headroom (see headroom_reserve); equal to contexts: a fixed pool.
    min_contexts: int = -1

    def __post_init__(self) -> None:
        if self.min_contexts < 0:
            object.__setattr__(self, "min_contexts", self.contexts)

    @property
    def elastic(self) -> bool:
        return self.min_contexts < self.contexts


@dataclass(frozen=True)
class HeadroomReserve:
    """AIO events to keep free for other processes: a count, or a share of fs.aio-max-nr."""

    events: int = 0
    percent: float | None = None

    def resolve(self, aio_max_nr: int) -> int:
        if self.percent is not None:
            return int(aio_max_nr * self.percent / 100)
        return self.events

    @property
    def enabled(self) -> bool:
        return bool(self.events or self.percent)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.events)


@dataclass(frozen=True)
class HostScanConfig:
    interval: float  # seconds between scans of /proc/*/maps
    top: int  # holders exported by name; the rest are summed as comm="other"


@dataclass(frozen=True)
class JobConfig:
    name: str
    pool: str
    type: str
    target: Path  # absolute: relative targets are resolved against state_directory
    size: int  # bytes
    op: str
    block_size: int  # bytes
    direct: bool
    rate: float  # operations per second (probe jobs)
    iodepth: int  # operations kept in flight (load jobs)
    timeout: float  # seconds, per operation
    allow_write: bool


@dataclass(frozen=True)
class MetricsConfig:
    host: str
    port: int


@dataclass(frozen=True)
class ShutdownConfig:
    drain_timeout: float  # seconds
    destroy_timeout: float  # seconds


@dataclass(frozen=True)
class Config:
    log_level: str
    state_directory: Path
    metrics: MetricsConfig
    shutdown: ShutdownConfig
    pools: tuple[PoolConfig, ...]
    jobs: tuple[JobConfig, ...]
    source: str  # the file path, or "<embedded default>"
    headroom_reserve: HeadroomReserve = HeadroomReserve()
    host_scan: HostScanConfig | None = None  # None: off


# ---------------------------------------------------------------------------
# Units. Each parser takes what YAML gives (int, float or str) and raises
# ValueError with a sentence that can follow "<key.path>: ".

_NUMBER = r"(\d[\d_]*(?:\.\d*)?|\.\d+)"

# What each unit looks like, for "expected ..., found ..." messages.
_SIZE = "a size such as 4096, 4KiB or 64MiB"
_DURATION = "a duration such as 500ms, 10s or 2m"
_RATE = "a rate such as 10/s, 5/m or 0.5 (per second)"
_RESERVE = "a number of AIO events such as 4096, or a share of fs.aio-max-nr such as 10%"

# Binary multiples only: K, KB and KiB all mean 1024. Storage people argue
# about KB; for block sizes and file sizes 1000 is never what anyone means
# here, and one meaning per letter is easier to read in a config review.
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(_NUMBER + r"\s*(?:([kmgt])(?:i?b)?|(b))?", re.IGNORECASE)

_DURATION_UNITS = {"us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
                   "ms": Fraction(1, 1000), "s": Fraction(1), "": Fraction(1),
                   "m": Fraction(60), "h": Fraction(3600)}
_DURATION_RE = re.compile(_NUMBER + r"\s*(us|µs|ms|s|m|h)?")

_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE_RE = re.compile(_NUMBER + r"\s*(?:/\s*(s|m|h))?")


def _number(value: object, expected: str) -> Fraction | None:
    """A YAML int/float as an exact, finite, non-negative Fraction; None for text."""
    if isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # bool is an int subclass, but "size: true" is never a quantity.
        raise ValueError(f"expected {expected}, found {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"expected {expected}, found {value}")
    if value < 0:
        raise ValueError(f"must not be negative, found {value}")
    return Fraction(value)


def _match(pattern: re.Pattern[str], text: str, expected: str) -> re.Match[str]:
    m = pattern.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected {expected}, found {_show(text)}")
    return m


def _digits(m: re.Match[str]) -> Fraction:
    return Fraction(m.group(1).replace("_", ""))


def parse_size(s: object) -> int:
    """Bytes from ``4096``, ``"512"``, ``"4KiB"``, ``"64M"``, ``"1g"``; K/KB/KiB are all 1024."""
    n = _number(s, _SIZE)
    if n is None:
        m = _match(_SIZE_RE, str(s), _SIZE)
        n = _digits(m) * _SIZE_UNITS[(m.group(2) or m.group(3) or "").lower()]
    if n.denominator != 1:
        raise ValueError(f"expected a whole number of bytes, found {_show(s)}")
    return int(n)


def parse_duration(s: object) -> float:
    """Seconds from ``"500ms"``, ``"10s"``, ``"2m"``, ``"100us"``, or a bare number of seconds."""
    n = _number(s, _DURATION)
    if n is None:
        m = _match(_DURATION_RE, str(s), _DURATION)
        n = _digits(m) * _DURATION_UNITS[m.group(2) or ""]
    return float(n)


def parse_rate(s: object) -> float:
    """Operations per second from ``"100/s"``, ``"5/m"``, ``"0.5/s"``, or a bare number per second."""
    n = _number(s, _RATE)
    if n is None:
        m = _match(_RATE_RE, str(s), _RATE)
        n = _digits(m) / _RATE_UNITS[m.group(2) or "s"]
    return float(n)


def parse_reserve(s: object) -> HeadroomReserve:
    """``4096`` (events) or ``"10%"`` (of fs.aio-max-nr) into a HeadroomReserve."""
    if isinstance(s, str) and s.strip().endswith("%"):
        text = s.strip()[:-1].strip()
        m = re.fullmatch(_NUMBER, text)
        if not m:
            raise ValueError(f"expected {_RESERVE}, found {_show(s)}")
        pct = float(_digits(m))
        if pct >= 100:
            raise ValueError(f"a reserve of {pct:g}% of fs.aio-max-nr leaves the pools no "
                             f"room at all; expected less than 100%")
        return HeadroomReserve(percent=pct)
    n = _number(s, _RESERVE)
    if n is None:
        text = str(s).strip().replace("_", "")
        if not text.isdigit():
            raise ValueError(f"expected {_RESERVE}, found {_show(s)}")
        n = Fraction(int(text))
    if n.denominator != 1:
        raise ValueError(f"expected a whole number of events, found {_show(s)}")
    return HeadroomReserve(events=int(n))


def parse_listen(s: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); port 0 means ephemeral."""
    example = "127.0.0.1:9740 or [::1]:9740"
    s = s.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected host:port such as {example}, found {s!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} inside [] is not an IPv6 address") from None
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port such as {example}, found {s!r} (no port)")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, as [::1]:9740, found {s!r}")
        if not host:
            raise ValueError(f"expected host:port with a host (0.0.0.0 for every "
                             f"interface), found {s!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, found {port!r} in {s!r}")
    return host, int(port)


# ---------------------------------------------------------------------------
# Reading the node tree.

def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(node: Node) -> str:
    """What the user wrote, in words, for "expected X, found Y"."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = {"str": "the text", "int": "the integer", "float": "the number",
            "bool": "the boolean", "timestamp": "the date",
            "binary": "binary data"}.get(node.tag.removeprefix(_TAG))
    if node.tag == _TAG + "null":
        return "nothing (null)"
    if kind is None:
        return f"a value tagged {node.tag}"
    value = node.value if kind != "the text" else _show(node.value)
    return f"{kind} {value}"


def _line(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Problems:
    """Collects problems as "<source>:<line>: <path>: <message>" lines."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._found: list[tuple[int, str]] = []

    def add(self, where: Node | int | None, path: str, message: str) -> None:
        line = _line(where) if isinstance(where, Node) else where
        prefix = self.source if line is None else f"{self.source}:{line}"
        text = f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}"
        # A problem never spans lines: each line of stderr is one problem.
        self._found.append((line if line is not None else 1 << 30, " ".join(text.splitlines())))

    def __bool__(self) -> bool:
        return bool(self._found)

    def lines(self) -> list[str]:
        # Sorted by line so the output reads top to bottom like the file.
        return [text for _, text in sorted(self._found, key=lambda p: p[0])]


T = TypeVar("T")


class _Section:
    """One YAML mapping checked against the keys it may hold.

    Each getter returns the converted value, the default when the key is
    absent, or None after recording a problem; callers skip the checks that
    need a value they did not get.
    """

    def __init__(self, node: Node | None, path: str, known: Sequence[str],
                 problems: _Problems, constructor: SafeConstructor) -> None:
        self.node = node
        self.path = path
        self.problems = problems
        self._constructor = constructor
        self.values: dict[str, Node] = {}
        if node is None:
            return
        if not isinstance(node, MappingNode):
            problems.add(node, path, f"expected a mapping of settings, found {_describe(node)}")
            return
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                problems.add(key_node, path, "merge keys ('<<') are not supported; "
                                             "write the settings out")
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag != _TAG + "str":
                problems.add(key_node, path, f"expected a setting name, found {_describe(key_node)}")
                continue
            key = key_node.value
            if key in seen:
                problems.add(key_node, _join(path, key),
                              f"duplicate key (first set on line {_line(seen[key])})")
                continue
            seen[key] = key_node
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else \
                    f"; known keys: {', '.join(known)}"
                problems.add(key_node, _join(path, key), f"unknown key{hint}")
                continue
            self.values[key] = value_node

    @property
    def ok(self) -> bool:
        """False when the node was not a mapping at all."""
        return self.node is None or isinstance(self.node, MappingNode)

    def line(self) -> int | None:
        return _line(self.node)

    def _scalar(self, node: Node) -> object:
        if not isinstance(node, ScalarNode):
            return node  # the caller's type check reports it
        tag = node.tag.removeprefix(_TAG)
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

    def _get(self, key: str, default: T | None, convert: Callable[[Node, object], T],
             required: str | None = None) -> T | None:
        node = self.values.get(key)
        if node is None:
            if required is not None and self.ok:
                self.problems.add(self.node, _join(self.path, key), f"missing; {required}")
            return default
        try:
            value = self._scalar(node)
        except (ValueError, TypeError, yaml.YAMLError):
            value = node  # an explicit tag the value does not match, like !!int x
        try:
            return convert(node, value)
        except ValueError as e:
            self.problems.add(node, _join(self.path, key), str(e))
            return None

    def text(self, key: str, default: str | None = None, *, required: str | None = None,
             choices: Sequence[str] = (), pattern: re.Pattern[str] | None = None) -> str | None:
        def convert(node: Node, value: object) -> str:
            if not isinstance(value, str):
                found = _describe(node)
                quote = "" if isinstance(node, (MappingNode, SequenceNode)) else \
                    "; put it in quotes if you meant the text"
                want = f"one of {', '.join(choices)}" if choices else "a string"
                raise ValueError(f"expected {want}, found {found}{quote}")
            if choices and value not in choices:
                close = difflib.get_close_matches(value.lower(), choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"expected one of {', '.join(choices)}, found {_show(value)}{hint}")
            if pattern is not None and not pattern.fullmatch(value):
                raise ValueError(f"expected letters, digits, '_', '.' or '-', found {_show(value)}")
            return value
        return self._get(key, default, convert, required)

    def integer(self, key: str, default: int | None = None, *, minimum: int,
                maximum: tuple[int, str] | None = None,
                required: str | None = None) -> int | None:
        """maximum: (the largest value, why: a phrase that follows the number)."""
        def convert(node: Node, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected a whole number >= {minimum}, found {_describe(node)}")
            if value < minimum:
                raise ValueError(f"expected a whole number >= {minimum}, found {value}")
            if maximum is not None and value > maximum[0]:
                raise ValueError(f"expected at most {maximum[0]}, {maximum[1]}, found {value}")
            return value
        return self._get(key, default, convert, required)

    def boolean(self, key: str, default: bool) -> bool | None:
        def convert(node: Node, value: object) -> bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, found {_describe(node)}")
            return value
        return self._get(key, default, convert)

    def quantity(self, key: str, default: T, parse: Callable[[object], T],
                 expected: str) -> T | None:
        def convert(node: Node, value: object) -> T:
            if value is None or isinstance(value, Node):  # null, lists, dates...
                raise ValueError(f"expected {expected}, found {_describe(node)}")
            return parse(value)
        return self._get(key, default, convert)


def _sequence(node: Node | None, path: str, problems: _Problems) -> list[Node]:
    if node is None:
        return []
    if isinstance(node, ScalarNode) and node.tag == _TAG + "null":
        return []  # "jobs:" with nothing after it: an empty list
    if not isinstance(node, SequenceNode):
        problems.add(node, path, f"expected a list, found {_describe(node)}")
        return []
    return list(node.value)


# ---------------------------------------------------------------------------
# The state directory, as systemd and the XDG spec define it.

def default_state_directory(env: Mapping[str, str], home: Path | None = None) -> Path:
    """$STATE_DIRECTORY (its first entry), else $XDG_STATE_HOME/aiod, else ~/.local/state/aiod.

    systemd sets STATE_DIRECTORY from StateDirectory=, colon-separated when
    several are listed. The XDG spec says a relative XDG_STATE_HOME is
    invalid and must be ignored. Raises RuntimeError when no home is known.
    """
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    if first:
        return Path(first)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "aiod"
    if home is None:
        home = Path.home()  # raises RuntimeError when there is none
    return home / ".local" / "state" / "aiod"


# ---------------------------------------------------------------------------
# parse() and load().

def _compose(text: str, source: str) -> Node | None:
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


def physical_memory() -> int:
    """Bytes of RAM on this machine (the I/O buffers of every job must fit in it)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def buffer_bytes(op: str, iodepth: int, block_size: int) -> int:
    """The I/O buffers a job maps: one per op in flight, per kind of op it issues."""
    return len(JobOp(op).buffered_kinds) * iodepth * block_size


def parse(text: str, source: str, env: Mapping[str, str] | None = None,
          home: Path | None = None, memory: int | None = None) -> Config:
    """Check ``text`` and build a Config, or raise ConfigError with every problem.

    ``env`` (default: os.environ) and ``home`` (default: the user's home)
    only matter when the file has no ``state_directory``. ``memory``
    (default: this machine's RAM) bounds the jobs' I/O buffers.
    """
    env = os.environ if env is None else env
    root = _compose(text, source)
    problems = _Problems(source)
    if root is None or (isinstance(root, ScalarNode) and root.tag == _TAG + "null"):
        problems.add(None, "", "the file is empty; expected settings such as 'pools:'")
        raise ConfigError(problems.lines())
    if not isinstance(root, MappingNode):
        problems.add(root, "", f"expected a mapping of settings at the top level "
                               f"(like 'pools:'), found {_describe(root)}")
        raise ConfigError(problems.lines())

    constructor = SafeConstructor()

    def section(node: Node | None, path: str, known: Sequence[str]) -> _Section:
        return _Section(node, path, known, problems, constructor)

    top = section(root, "", _TOP_KEYS)
    log_level = top.text("log_level", DEFAULT_LOG_LEVEL, choices=LOG_LEVELS)
    state_directory = _state_directory(top, env, home, problems)

    metrics_sec = section(top.values.get("metrics"), "metrics", _METRICS_KEYS)
    metrics: MetricsConfig | None = MetricsConfig(DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT)
    listen = metrics_sec.text("listen")
    if listen is not None:
        try:
            metrics = MetricsConfig(*parse_listen(listen))
        except ValueError as e:
            problems.add(metrics_sec.values["listen"], "metrics.listen", str(e))
            metrics = None

    shutdown_sec = section(top.values.get("shutdown"), "shutdown", _SHUTDOWN_KEYS)
    drain = shutdown_sec.quantity("drain_timeout", DEFAULT_DRAIN_TIMEOUT, parse_duration,
                                  _DURATION)
    destroy = shutdown_sec.quantity("destroy_timeout", DEFAULT_DESTROY_TIMEOUT,
                                    parse_duration, _DURATION)

    reserve = top.quantity("headroom_reserve", HeadroomReserve(), parse_reserve, _RESERVE)
    host_scan = _host_scan(top, section, problems)
    pools, pool_names = _pools(top, section, problems)
    jobs = _jobs(top, section, problems, pools, pool_names, state_directory,
                 physical_memory() if memory is None else memory)

    if problems:
        raise ConfigError(problems.lines())
    assert log_level is not None and state_directory is not None and metrics is not None
    assert drain is not None and destroy is not None and reserve is not None
    return Config(log_level=log_level, state_directory=state_directory, metrics=metrics,
                  shutdown=ShutdownConfig(drain, destroy), pools=tuple(pools.values()),
                  jobs=tuple(jobs), source=source, headroom_reserve=reserve,
                  host_scan=host_scan)


def _host_scan(top: _Section, section: _SectionFactory,
               problems: _Problems) -> HostScanConfig | None:
    node = top.values.get("host_scan")
    if node is None:
        return None
    if isinstance(node, ScalarNode) and node.tag == _TAG + "null":
        return HostScanConfig(DEFAULT_HOST_SCAN_INTERVAL, DEFAULT_HOST_SCAN_TOP)
    sec = section(node, "host_scan", _HOST_SCAN_KEYS)
    if not sec.ok:
        return None
    interval = sec.quantity("interval", DEFAULT_HOST_SCAN_INTERVAL, parse_duration, _DURATION)
    top_n = sec.integer("top", DEFAULT_HOST_SCAN_TOP, minimum=1)
    if interval is not None and interval < MIN_HOST_SCAN_INTERVAL:
        problems.add(sec.values.get("interval"), "host_scan.interval",
                     f"expected at least {MIN_HOST_SCAN_INTERVAL:g}s between scans of "
                     f"/proc, found {interval:g}s")
        interval = None
    if top_n is not None and top_n > MAX_HOST_SCAN_TOP:
        problems.add(sec.values.get("top"), "host_scan.top",
                     f"expected at most {MAX_HOST_SCAN_TOP} (each holder is two metric "
                     f"series), found {top_n}")
        top_n = None
    if interval is None or top_n is None:
        return None
    return HostScanConfig(interval, top_n)


def _state_directory(top: _Section, env: Mapping[str, str], home: Path | None,
                     problems: _Problems) -> Path | None:
    node = top.values.get("state_directory")
    if node is None:
        try:
            return default_state_directory(env, home)
        except RuntimeError:
            problems.add(None, "state_directory", "not set, and neither $STATE_DIRECTORY, "
                         "$XDG_STATE_HOME nor a home directory is available")
            return None
    text = top.text("state_directory")
    if text is None:
        return None
    if not os.path.isabs(text):
        # Relative to what? The daemon's working directory is an accident.
        problems.add(node, "state_directory", f"expected an absolute path, found {_show(text)}")
        return None
    return Path(os.path.normpath(text))


_SectionFactory = Callable[[Node | None, str, Sequence[str]], _Section]


def _pools(top: _Section, section: _SectionFactory,
           problems: _Problems) -> tuple[dict[str, PoolConfig], set[str]]:
    """The valid pools by name, and every name declared (valid or not)."""
    pools: dict[str, PoolConfig] = {}
    declared: dict[str, int | None] = {}
    node = top.values.get("pools")
    items = _sequence(node, "pools", problems)
    empty = node is None or node.tag == _TAG + "null" or (
        isinstance(node, SequenceNode) and not node.value)
    if empty:  # not a list at all was reported by _sequence
        problems.add(node, "pools", "at least one pool is required, e.g. "
                                    "'- {name: default, contexts: 4, nr_events: 128}'")
    for i, item in enumerate(items):
        path = f"pools[{i}]"
        sec = section(item, path, _POOL_KEYS)
        if not sec.ok:
            continue
        name = sec.text("name", required="every pool needs a name", pattern=NAME_RE)
        contexts = sec.integer("contexts", minimum=1, required="how many kernel AIO "
                               "contexts the pool owns, e.g. 'contexts: 4'")
        min_contexts = sec.integer("min_contexts", None, minimum=1)
        if min_contexts is not None and contexts is not None and min_contexts > contexts:
            problems.add(sec.values["min_contexts"], f"{path}.min_contexts",
                         f"expected at most contexts ({contexts}), found {min_contexts}")
            contexts = None  # reported; the name below is still declared for the jobs
        nr_events = sec.integer("nr_events", minimum=1, required="how many operations "
                                "each context holds, e.g. 'nr_events: 128'",
                                maximum=(MAX_NR_EVENTS, "the kernel's limit per context "
                                         "(io_setup refuses more with EINVAL, whatever "
                                         "fs.aio-max-nr is)"))
        if name is None:
            continue
        if name in declared:
            problems.add(sec.values["name"], f"{path}.name",
                         f"pool {name!r} is already defined on line {declared[name]}")
            continue
        declared[name] = _line(sec.values["name"])
        if contexts is not None and nr_events is not None:
            pools[name] = PoolConfig(name, contexts, nr_events,
                                     contexts if min_contexts is None else min_contexts)
    return pools, set(declared)


def _jobs(top: _Section, section: _SectionFactory, problems: _Problems,
          pools: dict[str, PoolConfig], pool_names: set[str],
          state_directory: Path | None, memory: int) -> list[JobConfig]:
    jobs: list[JobConfig] = []
    declared: dict[str, int | None] = {}
    buffers_total = 0
    for i, item in enumerate(_sequence(top.values.get("jobs"), "jobs", problems)):
        path = f"jobs[{i}]"
        sec = section(item, path, _JOB_KEYS)
        if not sec.ok:
            continue
        vals = sec.values
        name = sec.text("name", required="every job needs a name", pattern=NAME_RE)
        pool = sec.text("pool", required="the name of the pool the job runs on")
        type_ = sec.text("type", required="'probe' or 'load'", choices=JOB_TYPES)
        target = sec.text("target", required="the file or block device to do I/O on")
        size = sec.quantity("size", DEFAULT_SIZE, parse_size, _SIZE)
        op = sec.text("op", DEFAULT_OP, choices=JOB_OPS)
        block_size = sec.quantity("block_size", DEFAULT_BLOCK_SIZE, parse_size, _SIZE)
        direct = sec.boolean("direct", DEFAULT_DIRECT)
        rate = sec.quantity("rate", DEFAULT_RATE, parse_rate, _RATE)
        iodepth = sec.integer("iodepth", DEFAULT_IODEPTH, minimum=1)
        timeout = sec.quantity("timeout", DEFAULT_TIMEOUT, parse_duration, _DURATION)
        allow_write = sec.boolean("allow_write", DEFAULT_ALLOW_WRITE)

        def bad(key: str, message: str) -> None:
            problems.add(vals.get(key, sec.node), f"{path}.{key}", message)

        if name is not None:
            if name in declared:
                bad("name", f"job {name!r} is already defined on line {declared[name]}")
            else:
                declared[name] = _line(vals["name"])
        if pool is not None and pool not in pool_names:
            close = difflib.get_close_matches(pool, sorted(pool_names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                (f"; defined pools: {', '.join(sorted(pool_names))}" if pool_names else "")
            bad("pool", f"no pool named {_show(pool)}{hint}")
        if target is not None and (not target.strip() or "\0" in target):
            bad("target", f"expected a file path, found {_show(target)}")
            target = None
        # Each type has its own pacing knob; the other one would be ignored,
        # and an ignored setting is a typo waiting to be believed.
        if type_ == "load" and "rate" in vals:
            bad("rate", "applies only to probe jobs; a load job is paced by 'iodepth'")
        if type_ == "probe" and "iodepth" in vals:
            bad("iodepth", "applies only to load jobs; a probe job is paced by 'rate'")
        if rate is not None and rate <= 0:
            bad("rate", f"expected more than 0 operations per second, found {rate:g}")
        if timeout is not None and timeout <= 0:
            bad("timeout", "expected a per-operation timeout above 0, such as 5s, found 0")
        if block_size == 0:
            bad("block_size", "expected at least 1 byte, found 0")
            block_size = None
        if block_size is not None and direct and block_size % DIRECT_ALIGNMENT:
            bad("block_size", f"expected a multiple of {DIRECT_ALIGNMENT} bytes with "
                              f"'direct: true' (O_DIRECT), found {block_size}")
        if size is not None and block_size is not None and size < block_size:
            bad("size", f"expected at least block_size ({block_size} bytes), found {size}")
        pool_config = pools.get(pool) if pool is not None else None
        if type_ == "load" and iodepth is not None and pool_config is not None:
            capacity = pool_config.contexts * pool_config.nr_events
            if iodepth > capacity:
                bad("iodepth", f"expected at most {capacity}, the operations pool {pool!r} "
                               f"can hold (contexts x nr_events), found {iodepth}")

        if op is not None and iodepth is not None and block_size is not None:
            # Refused here rather than failing at start (or in a reload) with
            # an allocation error: no setting of the kernel's makes RAM appear.
            need = buffer_bytes(op, iodepth, block_size)
            buffers_total += need
            if need > memory:
                bad("block_size" if "block_size" in vals else "iodepth",
                    f"{op} at iodepth {iodepth} with block_size {block_size} needs {need} "
                    f"bytes of I/O buffers, more than this machine's {memory} bytes of memory")
            elif buffers_total > memory:
                bad("name", f"the jobs up to this one need {buffers_total} bytes of I/O "
                            f"buffers, more than this machine's {memory} bytes of memory")
        if (name is None or pool is None or type_ is None or target is None or size is None
                or op is None or block_size is None or direct is None or rate is None
                or iodepth is None or timeout is None or allow_write is None
                or state_directory is None):
            continue
        jobs.append(JobConfig(
            name=name, pool=pool, type=type_,
            target=Path(os.path.normpath(state_directory / target)),
            size=size, op=op, block_size=block_size, direct=direct, rate=rate,
            iodepth=iodepth, timeout=timeout, allow_write=allow_write))
    return jobs


def embedded_default_text() -> str:
    """The default configuration shipped inside the package."""
    return importlib.resources.files("aiod").joinpath("default.yaml").read_text("utf-8")


def read_text(path: Path) -> str:
    """A file's text, or ConfigError with one line saying why it cannot be read.

    Bounded by MAX_CONFIG_BYTES: parsing YAML costs about 9 s and 100 MB of
    memory per MB, and a reload must not stall the daemon on a runaway file.
    """
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        size = st.st_size  # 0 for a pipe (check-config /dev/stdin): the read bounds it
        if size <= MAX_CONFIG_BYTES:
            with path.open("rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)  # it may have grown since the stat
            size = len(data)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, expected a YAML file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: cannot read the file: permission denied"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the file: {e.strerror or e}"]) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: the file is {size} bytes; a configuration may be at most "
                           f"{MAX_CONFIG_BYTES} bytes (1 MiB)"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} "
                           f"at offset {e.start})"]) from None


def load(path: str | Path | None, env: Mapping[str, str] | None = None, *,
         home: Path | None = None, default_path: Path | None = None) -> Config:
    """Load ``path``; with None, DEFAULT_PATH when it exists, else the embedded default.

    ``default_path`` stands in for DEFAULT_PATH (tests); ``env`` and ``home``
    are passed to :func:`parse`.
    """
    if path is None:
        candidate = DEFAULT_PATH if default_path is None else default_path
        if not candidate.exists():
            return parse(embedded_default_text(), EMBEDDED_SOURCE, env, home)
        path = candidate
    path = Path(path)
    return parse(read_text(path), str(path), env, home)
