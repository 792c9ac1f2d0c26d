"""aiod.config_schema: each setting stated once, and the config built from it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from aiod import config, config_schema
from aiod.config import ConfigError, parse
from aiod.settings import Boolean, Each, Integer, Nested, Setting, Table, Text

ENV = {"STATE_DIRECTORY": "/var/lib/aiod"}
POOL = "pools:\n  - {name: default, contexts: 4, nr_events: 128}\n"

# Each table and the dataclass built from what it reads.
BUILT: list[tuple[str, Table[Any], type]] = [
    ("jobs", config_schema.JOB, config.JobConfig),
    ("pools", config_schema.POOL, config.PoolConfig),
    ("shutdown", config_schema.SHUTDOWN, config.ShutdownConfig),
    ("host_scan", config_schema.HOST_SCAN, config.HostScanConfig),
]
TABLES = [("top", config_schema.TOP), ("metrics", config_schema.METRICS)] + \
    [(name, table) for name, table, _ in BUILT]


def _settings(table: Table[Any]) -> list[Setting]:
    return list(table.settings.values())


@pytest.mark.parametrize("name, table", TABLES, ids=[n for n, _ in TABLES])
def test_every_setting_has_a_type_and_either_a_default_or_a_reason_it_is_required(
        name: str, table: Table[Any]) -> None:
    for s in _settings(table):
        assert callable(getattr(s.kind, "convert", None)), s.key
        if s.required is not None:
            assert s.default is None and s.required.strip(), s.key
        if isinstance(s.kind, Text) and s.kind.choices and s.default is not None:
            assert s.default in s.kind.choices, s.key
        if isinstance(s.kind, Integer) and s.default is not None:
            assert s.default >= s.kind.minimum, s.key


@pytest.mark.parametrize("name, table, cls", BUILT, ids=[n for n, _, _ in BUILT])
def test_each_table_holds_exactly_the_fields_of_its_dataclass(
        name: str, table: Table[Any], cls: type) -> None:
    assert table.keys == tuple(table.settings)
    assert set(table.keys) == {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for s in _settings(table):
        if s.default is not None:  # it fills the field as it is
            assert isinstance(s.default, hints[s.key]), s.key


def test_the_top_table_names_the_sections_and_the_config_fields() -> None:
    top = config_schema.TOP
    nested = {k: s.kind.table for k, s in top.settings.items() if isinstance(s.kind, Nested)}
    assert nested == {"metrics": config_schema.METRICS, "shutdown": config_schema.SHUTDOWN,
                      "host_scan": config_schema.HOST_SCAN, "pools": config_schema.POOL,
                      "jobs": config_schema.JOB}
    assert isinstance(top["pools"].kind, Each) and isinstance(top["jobs"].kind, Each)
    assert set(top.keys) == {f.name for f in dataclasses.fields(config.Config)} - {"source"}


def test_a_key_is_stated_once() -> None:
    with pytest.raises(ValueError, match="stated twice"):
        Table(Setting("a", Boolean()), Setting("b", Boolean()), Setting("a", Boolean()))
    assert config._JOB_KEYS == config_schema.JOB.keys == (
        "name", "pool", "type", "target", "size", "op", "block_size", "direct", "rate",
        "iodepth", "timeout", "allow_write")


def test_a_file_without_a_setting_gets_the_tables_default() -> None:
    c = parse(POOL + "host_scan:\njobs:\n  - {name: j, pool: default, type: load, target: t}\n",
              "t.yaml", env=ENV)
    assert (c.metrics.host, c.metrics.port) == config_schema.METRICS["listen"].default
    assert (config.DEFAULT_METRICS_HOST, config.DEFAULT_METRICS_PORT) == ("127.0.0.1", 9740)
    for name, table, _ in BUILT:
        built = {"jobs": c.jobs[0], "pools": c.pools[0], "shutdown": c.shutdown,
                 "host_scan": c.host_scan}[name]
        for s in _settings(table):
            if s.default is not None:
                assert getattr(built, s.key) == s.default, (name, s.key)
    assert c.log_level == config_schema.TOP["log_level"].default
    assert c.headroom_reserve == config_schema.TOP["headroom_reserve"].default
    assert c.pools[0].min_contexts == c.pools[0].contexts  # min_contexts' "no default"


# Recorded from the code before the schema was a table: on one line, problems
# come in the order the table reads and checks.
@pytest.mark.parametrize("text, expected", [
    (POOL + "jobs:\n  - {name: a, pool: default, type: probe, target: x}\n"
            "  - {name: a, pool: defalt, type: load, target: '', rate: 0, iodepth: 9000, "
            "timeout: 0, size: 1, block_size: 1000, bogus: 1}\n", [
        "t.yaml:5: jobs[1].bogus: unknown key; known keys: name, pool, type, target, size, op, "
        "block_size, direct, rate, iodepth, timeout, allow_write",
        "t.yaml:5: jobs[1].name: job 'a' is already defined on line 4",
        "t.yaml:5: jobs[1].pool: no pool named 'defalt'; did you mean 'default'?",
        "t.yaml:5: jobs[1].target: expected a file path, found ''",
        "t.yaml:5: jobs[1].rate: applies only to probe jobs; a load job is paced by 'iodepth'",
        "t.yaml:5: jobs[1].rate: expected more than 0 operations per second, found 0",
        "t.yaml:5: jobs[1].timeout: expected a per-operation timeout above 0, such as 5s, "
        "found 0",
        "t.yaml:5: jobs[1].block_size: expected a multiple of 512 bytes with 'direct: true' "
        "(O_DIRECT), found 1000",
        "t.yaml:5: jobs[1].size: expected at least block_size (1000 bytes), found 1"]),
    ("pools:\n  - {name: p, contexts: 2, min_contexts: 3, nr_events: 0}\n"
     "  - {name: p, contexts: 0, nr_events: 1}\n", [
        "t.yaml:2: pools[0].min_contexts: expected at most contexts (2), found 3",
        "t.yaml:2: pools[0].nr_events: expected a whole number >= 1, found 0",
        "t.yaml:3: pools[1].contexts: expected a whole number >= 1, found 0",
        "t.yaml:3: pools[1].name: pool 'p' is already defined on line 2"]),
    ("host_scan: {interval: 100ms, top: 500}\n" + POOL, [
        "t.yaml:1: host_scan.interval: expected at least 1s between scans of /proc, found 0.1s",
        "t.yaml:1: host_scan.top: expected at most 100 (each holder is two metric series), "
        "found 500"]),
    ("{log_level: loud, state_directory: rel, metrics: {listen: x}, "
     "shutdown: {drain_timeout: -1}, headroom_reserve: 100%, pools: 3}\n", [
        "t.yaml:1: log_level: expected one of debug, info, warning, error, found 'loud'",
        "t.yaml:1: state_directory: expected an absolute path, found 'rel'",
        "t.yaml:1: metrics.listen: expected host:port such as 127.0.0.1:9740 or [::1]:9740, "
        "found 'x' (no port)",
        "t.yaml:1: shutdown.drain_timeout: must not be negative, found -1",
        "t.yaml:1: headroom_reserve: a reserve of 100% of fs.aio-max-nr leaves the pools no "
        "room at all; expected less than 100%",
        "t.yaml:1: pools: expected a list, found the integer 3"]),
])
def test_problems_on_one_line_come_in_the_tables_order(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "t.yaml", env=ENV, home=Path("/h"))
    assert info.value.problems == expected
