"""The configuration aiod runs with: its frozen dataclasses, and parse() and
load() that build them from YAML.

The people who read our errors are SREs at a terminal, so a bad file gives
one line per problem, ``<file>:<line>: <key.path>: <expected, found>``, all
problems at once, and never a traceback.

What each setting is (type, default, checks) is stated once, in the tables
of aiod.config_schema; YAML with line numbers is aiod.yamltree; sizes,
durations and rates are aiod.units. The names other modules use from those
are importable from here too.
"""

from __future__ import annotations

import importlib.resources
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from aiod.config_schema import (
    DIRECT_ALIGNMENT,
    HOST_SCAN,
    JOB,
    JOB_OPS,
    JOB_TYPES,
    LOG_LEVELS,
    MAX_HOST_SCAN_TOP,
    METRICS,
    MIN_HOST_SCAN_INTERVAL,
    NAME_RE,
    POOL,
    SHUTDOWN,
    TOP,
    Context,
    buffer_bytes,
)
from aiod.settings import Item, Table
from aiod.units import HeadroomReserve, parse_duration, parse_listen, parse_rate, parse_reserve, parse_size, show
from aiod.yamltree import ConfigError, Problems, Section, compose, describe, is_null, sequence

__all__ = [
    "DEFAULT_METRICS_HOST", "DEFAULT_METRICS_PORT", "DEFAULT_PATH", "DIRECT_ALIGNMENT",
    "EMBEDDED_SOURCE", "JOB_OPS", "JOB_TYPES", "LOG_LEVELS", "MAX_CONFIG_BYTES",
    "MAX_HOST_SCAN_TOP", "MIN_HOST_SCAN_INTERVAL", "NAME_RE", "Config", "ConfigError",
    "HeadroomReserve", "HostScanConfig", "JobConfig", "MetricsConfig", "PoolConfig",
    "ShutdownConfig", "buffer_bytes", "default_state_directory", "embedded_default_text",
    "load", "parse", "parse_duration", "parse_listen", "parse_rate", "parse_reserve",
    "parse_size", "physical_memory", "read_text",
]

DEFAULT_PATH = Path("/etc/aiod/aiod.yaml")
EMBEDDED_SOURCE = "<embedded default>"

# A real configuration is a few KiB (50 pools and 50 jobs: about 10 KiB).
MAX_CONFIG_BYTES = 1 << 20

DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT = METRICS["listen"].default

# The keys each section may hold, from the schema's tables.
_TOP_KEYS = TOP.keys
_METRICS_KEYS = METRICS.keys
_SHUTDOWN_KEYS = SHUTDOWN.keys
_HOST_SCAN_KEYS = HOST_SCAN.keys
_POOL_KEYS = POOL.keys
_JOB_KEYS = JOB.keys


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
    headroom_reserve: HeadroomReserve = TOP["headroom_reserve"].default  # no reserve
    host_scan: HostScanConfig | None = None  # None: off


# ---------------------------------------------------------------------------
# parse(): the top level, then each section through its table.

T = TypeVar("T")
_SectionFactory = Callable[[Node | None, str, Table[Context]], Section]


def _build(cls: Callable[..., T], item: Item[Context]) -> T | None:
    """The dataclass of an item's values, or None when one is missing or was reported."""
    values = item.complete()
    return None if values is None else cls(**values)


def parse(text: str, source: str, env: Mapping[str, str] | None = None,
          home: Path | None = None, memory: int | None = None) -> Config:
    """Check ``text`` and build a Config, or raise ConfigError with every problem.

    ``env`` (default: os.environ) and ``home`` (default: the user's home)
    only matter when the file has no ``state_directory``. ``memory``
    (default: this machine's RAM) bounds the jobs' I/O buffers.
    """
    env = os.environ if env is None else env
    root = compose(text, source)
    problems = Problems(source)
    if root is None or is_null(root):
        problems.add(None, "", "the file is empty; expected settings such as 'pools:'")
        raise ConfigError(problems.lines())
    if not isinstance(root, MappingNode):
        problems.add(root, "", f"expected a mapping of settings at the top level "
                               f"(like 'pools:'), found {describe(root)}")
        raise ConfigError(problems.lines())

    constructor = SafeConstructor()
    context = Context(physical_memory() if memory is None else memory)

    def section(node: Node | None, path: str, table: Table[Context]) -> Section:
        return Section(node, path, table.keys, problems, constructor)

    # Read in the order of TOP: problems on one line are reported in it.
    top = section(root, "", TOP)
    log_level = TOP["log_level"].read(top)
    state_directory = _state_directory(top, env, home)
    metrics = METRICS.read(section(top.values.get("metrics"), "metrics", METRICS), context)
    shutdown = _build(ShutdownConfig, SHUTDOWN.read(
        section(top.values.get("shutdown"), "shutdown", SHUTDOWN), context))
    reserve = TOP["headroom_reserve"].read(top)
    host_scan = _host_scan(top, section, context)
    pools = _pools(top, section, context)
    jobs = _jobs(top, section, context, state_directory)

    if problems:
        raise ConfigError(problems.lines())
    return Config(log_level=log_level, state_directory=_present(state_directory),
                  metrics=MetricsConfig(*metrics["listen"]), shutdown=_present(shutdown),
                  pools=tuple(pools.values()), jobs=tuple(jobs), source=source,
                  headroom_reserve=reserve, host_scan=host_scan)


def _present(value: T | None) -> T:
    """A value that is there whenever no problem was found."""
    if value is None:
        raise RuntimeError("a configuration value is missing, yet no problem was reported")
    return value


def _state_directory(top: Section, env: Mapping[str, str], home: Path | None) -> Path | None:
    node = top.values.get("state_directory")
    if node is None:
        try:
            return default_state_directory(env, home)
        except RuntimeError:
            top.problems.add(None, "state_directory", "not set, and neither $STATE_DIRECTORY, "
                             "$XDG_STATE_HOME nor a home directory is available")
            return None
    text: str | None = TOP["state_directory"].read(top)
    if text is None:
        return None
    if not os.path.isabs(text):
        # Relative to what? The daemon's working directory is an accident.
        top.problems.add(node, "state_directory",
                         f"expected an absolute path, found {show(text)}")
        return None
    return Path(os.path.normpath(text))


def _host_scan(top: Section, section: _SectionFactory,
               context: Context) -> HostScanConfig | None:
    node = top.values.get("host_scan")
    if node is None:
        return None  # off
    # "host_scan:" with nothing after it: on, with every default.
    sec = section(None if is_null(node) else node, "host_scan", HOST_SCAN)
    if not sec.ok:
        return None
    return _build(HostScanConfig, HOST_SCAN.read(sec, context))


def _pools(top: Section, section: _SectionFactory, context: Context) -> dict[str, PoolConfig]:
    """The valid pools by name; ``context.pool_names`` gets every name declared."""
    node = top.values.get("pools")
    items = sequence(node, "pools", top.problems)
    empty = node is None or is_null(node) or (isinstance(node, SequenceNode) and not node.value)
    if empty:  # not a list at all was reported by sequence()
        top.problems.add(node, "pools", "at least one pool is required, e.g. "
                                        "'- {name: default, contexts: 4, nr_events: 128}'")
    context.names = {}
    for i, item_node in enumerate(items):
        sec = section(item_node, f"pools[{i}]", POOL)
        if not sec.ok:
            continue
        item = POOL.read(sec, context)
        if item["min_contexts"] is None:  # absent (or reported): a fixed pool
            item.values["min_contexts"] = item["contexts"]
        pool = _build(PoolConfig, item)
        if pool is not None:
            context.pools[pool.name] = pool
    context.pool_names = set(context.names)
    return context.pools


def _jobs(top: Section, section: _SectionFactory, context: Context,
          state_directory: Path | None) -> list[JobConfig]:
    jobs: list[JobConfig] = []
    context.names = {}
    for i, item_node in enumerate(sequence(top.values.get("jobs"), "jobs", top.problems)):
        sec = section(item_node, f"jobs[{i}]", JOB)
        if not sec.ok:
            continue
        values: dict[str, Any] | None = JOB.read(sec, context).complete()
        if values is None or state_directory is None:
            continue
        target = Path(os.path.normpath(state_directory / values.pop("target")))
        jobs.append(JobConfig(target=target, **values))
    return jobs


# ---------------------------------------------------------------------------
# Where the configuration and the state live.

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


def physical_memory() -> int:
    """Bytes of RAM on this machine (the I/O buffers of every job must fit in it)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
