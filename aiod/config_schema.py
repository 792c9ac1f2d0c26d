"""The configuration's schema, stated once: one table per section holding
each setting's type, default and checks.

A table (aiod.settings.Table) lists a mapping's settings and the checks that
relate them, in the order they are read and run. The order is part of the
interface: problems found on one line (a flow-style job, ``- {name: a,
...}``) are reported in it. From the tables come the known keys (and the
"did you mean" hints), the defaults, the conversions and every check;
aiod.config turns what they read into its frozen dataclasses.

A new setting is a Setting in its table and a field of the same name in the
dataclass (tests/test_config_schema.py holds them to each other), and a line
in config/aiod.yaml, which documents every key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiod.aio import MAX_NR_EVENTS
from aiod.opkind import JobOp
from aiod.settings import Boolean, Each, Integer, Nested, Quantity, Setting, Table, Text
from aiod.settings import Item as _Item
from aiod.units import (
    DURATION,
    RATE,
    RESERVE,
    SIZE,
    HeadroomReserve,
    parse_duration,
    parse_listen,
    parse_rate,
    parse_reserve,
    parse_size,
    show,
)
from aiod.yamltree import line_of

if TYPE_CHECKING:
    from aiod.config import PoolConfig

LOG_LEVELS = ("debug", "info", "warning", "error")
JOB_TYPES = ("probe", "load")
# poll: IOCB_CMD_POLL on a FIFO (aiod.targets.open_fifo); it holds a context
# slot until data arrives, which the daemon's tests use for I/O that stays
# in flight. Not in the original schema; aiod.jobs implements it.
JOB_OPS = tuple(m.value for m in JobOp)

# O_DIRECT needs buffers, offsets and lengths aligned to the logical block
# size of the device; 512 is the smallest there is, so anything else can
# never work and is better refused at load time than at the first io_submit.
DIRECT_ALIGNMENT = 512

MIN_HOST_SCAN_INTERVAL = 1.0
MAX_HOST_SCAN_TOP = 100  # each holder is two series: keep the bound small

# Names end up in metric labels, log lines and file names.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Context:
    """What the checks of one item need from the rest of the file."""

    memory: int  # bytes of RAM: the I/O buffers of every job must fit in it
    names: dict[str, int | None] = field(default_factory=dict)  # this list's names: line
    pools: dict[str, PoolConfig] = field(default_factory=dict)  # the valid pools
    pool_names: set[str] = field(default_factory=set)  # every pool declared, valid or not
    buffers: int = 0  # bytes of I/O buffers of the jobs so far


Item = _Item[Context]


def buffer_bytes(op: str, iodepth: int, block_size: int) -> int:
    """The I/O buffers a job maps: one per op in flight, per kind of op it issues."""
    return len(JobOp(op).buffered_kinds) * iodepth * block_size


# ---------------------------------------------------------------------------
# Checks that need more than one value (or run after those, to keep the order).

def _shrinks_within_contexts(p: Item) -> None:
    low, high = p["min_contexts"], p["contexts"]
    if low is not None and high is not None and low > high:
        p.bad("min_contexts", f"expected at most contexts ({high}), found {low}")
        p.drop("contexts")  # reported; the name is still declared for the jobs


def _unique_pool_name(p: Item) -> None:
    name, names = p["name"], p.context.names
    if name is None:
        return
    if name in names:
        p.bad("name", f"pool {name!r} is already defined on line {names[name]}")
        p.drop("name")  # neither declared nor built: the first definition stands
        return
    names[name] = line_of(p.section.values["name"])


def _unique_job_name(j: Item) -> None:
    name, names = j["name"], j.context.names
    if name is None:
        return
    if name in names:
        j.bad("name", f"job {name!r} is already defined on line {names[name]}")
    else:
        names[name] = line_of(j.section.values["name"])


def _known_pool(j: Item) -> None:
    pool, names = j["pool"], sorted(j.context.pool_names)
    if pool is None or pool in names:
        return
    close = difflib.get_close_matches(pool, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else \
        (f"; defined pools: {', '.join(names)}" if names else "")
    j.bad("pool", f"no pool named {show(pool)}{hint}")


def _target_is_a_path(j: Item) -> None:
    target = j["target"]
    if target is not None and (not target.strip() or "\0" in target):
        j.bad("target", f"expected a file path, found {show(target)}")
        j.drop("target")


def _one_pacing_knob(j: Item) -> None:
    # Each type has its own pacing knob; the other one would be ignored,
    # and an ignored setting is a typo waiting to be believed.
    if j["type"] == "load" and j.given("rate"):
        j.bad("rate", "applies only to probe jobs; a load job is paced by 'iodepth'")
    if j["type"] == "probe" and j.given("iodepth"):
        j.bad("iodepth", "applies only to load jobs; a probe job is paced by 'rate'")


def _above_zero(j: Item) -> None:
    rate, timeout = j["rate"], j["timeout"]
    if rate is not None and rate <= 0:
        j.bad("rate", f"expected more than 0 operations per second, found {rate:g}")
    if timeout is not None and timeout <= 0:
        j.bad("timeout", "expected a per-operation timeout above 0, such as 5s, found 0")
    if j["block_size"] == 0:
        j.bad("block_size", "expected at least 1 byte, found 0")
        j.drop("block_size")


def _block_size_fits(j: Item) -> None:
    size, block_size = j["size"], j["block_size"]
    if block_size is not None and j["direct"] and block_size % DIRECT_ALIGNMENT:
        j.bad("block_size", f"expected a multiple of {DIRECT_ALIGNMENT} bytes with "
                            f"'direct: true' (O_DIRECT), found {block_size}")
    if size is not None and block_size is not None and size < block_size:
        j.bad("size", f"expected at least block_size ({block_size} bytes), found {size}")


def _iodepth_fits_pool(j: Item) -> None:
    pool, iodepth = j["pool"], j["iodepth"]
    pool_config = j.context.pools.get(pool) if pool is not None else None
    if j["type"] == "load" and iodepth is not None and pool_config is not None:
        capacity = pool_config.contexts * pool_config.nr_events
        if iodepth > capacity:
            j.bad("iodepth", f"expected at most {capacity}, the operations pool {pool!r} "
                             f"can hold (contexts x nr_events), found {iodepth}")


def _buffers_fit_memory(j: Item) -> None:
    # Refused here rather than failing at start (or in a reload) with an
    # allocation error: no setting of the kernel's makes RAM appear.
    op, iodepth, block_size = j["op"], j["iodepth"], j["block_size"]
    if op is None or iodepth is None or block_size is None:
        return
    memory = j.context.memory
    need = buffer_bytes(op, iodepth, block_size)
    j.context.buffers += need
    if need > memory:
        j.bad("block_size" if j.given("block_size") else "iodepth",
              f"{op} at iodepth {iodepth} with block_size {block_size} needs {need} "
              f"bytes of I/O buffers, more than this machine's {memory} bytes of memory")
    elif j.context.buffers > memory:
        j.bad("name", f"the jobs up to this one need {j.context.buffers} bytes of I/O "
                      f"buffers, more than this machine's {memory} bytes of memory")


def _scan_interval_floor(h: Item) -> None:
    interval = h["interval"]
    if interval is not None and interval < MIN_HOST_SCAN_INTERVAL:
        h.bad("interval", f"expected at least {MIN_HOST_SCAN_INTERVAL:g}s between scans of "
                          f"/proc, found {interval:g}s")
        h.drop("interval")


def _scan_top_ceiling(h: Item) -> None:
    top = h["top"]
    if top is not None and top > MAX_HOST_SCAN_TOP:
        h.bad("top", f"expected at most {MAX_HOST_SCAN_TOP} (each holder is two metric "
                     f"series), found {top}")
        h.drop("top")


# ---------------------------------------------------------------------------
# The tables. Keys in the order the shipped config/aiod.yaml documents them.

METRICS: Table[Context] = Table(
    # loopback: exposing metrics is an opt-in
    Setting("listen", Text(then=parse_listen), default=("127.0.0.1", 9740)),
)

SHUTDOWN: Table[Context] = Table(
    Setting("drain_timeout", Quantity(parse_duration, DURATION), default=10.0),
    Setting("destroy_timeout", Quantity(parse_duration, DURATION), default=30.0),
)

HOST_SCAN: Table[Context] = Table(
    Setting("interval", Quantity(parse_duration, DURATION), default=30.0),
    Setting("top", Integer(minimum=1), default=10),
    _scan_interval_floor,
    _scan_top_ceiling,
)

POOL: Table[Context] = Table(
    Setting("name", Text(pattern=NAME_RE), required="every pool needs a name"),
    Setting("contexts", Integer(minimum=1),
            required="how many kernel AIO contexts the pool owns, e.g. 'contexts: 4'"),
    Setting("min_contexts", Integer(minimum=1)),  # None: as many as contexts (a fixed pool)
    _shrinks_within_contexts,
    Setting("nr_events", Integer(minimum=1, maximum=(
        MAX_NR_EVENTS, "the kernel's limit per context (io_setup refuses more with EINVAL, "
                       "whatever fs.aio-max-nr is)")),
            required="how many operations each context holds, e.g. 'nr_events: 128'"),
    _unique_pool_name,
)

JOB: Table[Context] = Table(
    Setting("name", Text(pattern=NAME_RE), required="every job needs a name"),
    Setting("pool", Text(), required="the name of the pool the job runs on"),
    Setting("type", Text(choices=JOB_TYPES), required="'probe' or 'load'"),
    Setting("target", Text(), required="the file or block device to do I/O on"),
    Setting("size", Quantity(parse_size, SIZE), default=64 * 1024**2),
    Setting("op", Text(choices=JOB_OPS), default="randread"),
    Setting("block_size", Quantity(parse_size, SIZE), default=4096),
    Setting("direct", Boolean(), default=True),
    Setting("rate", Quantity(parse_rate, RATE), default=10.0),
    Setting("iodepth", Integer(minimum=1), default=1),
    Setting("timeout", Quantity(parse_duration, DURATION), default=5.0),
    Setting("allow_write", Boolean(), default=False),
    _unique_job_name,
    _known_pool,
    _target_is_a_path,
    _one_pacing_knob,
    _above_zero,
    _block_size_fits,
    _iodepth_fits_pool,
    _buffers_fit_memory,
)

# The top level is read by aiod.config.parse, section by section in this
# order; state_directory's default comes from the environment.
TOP: Table[Context] = Table(
    Setting("log_level", Text(choices=LOG_LEVELS), default="info"),
    Setting("state_directory", Text()),
    Setting("metrics", Nested(METRICS)),
    Setting("shutdown", Nested(SHUTDOWN)),
    Setting("headroom_reserve", Quantity(parse_reserve, RESERVE), default=HeadroomReserve()),
    Setting("host_scan", Nested(HOST_SCAN)),  # absent: off; empty: on with the defaults
    Setting("pools", Each(POOL)),
    Setting("jobs", Each(JOB)),
)
