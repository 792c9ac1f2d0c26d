"""The self-audit: aiod's rings in /proc/self/maps against its pools' records,
with real contexts made and destroyed behind the pools' back."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiod import aio, config, hostscan
from aiod.daemon import Daemon
from aiod.notify import Notifier
from aiod.pool import Pool
from aiod.selfaudit import Expected, Leak, SelfAudit, compare, own_rings

CPUS = hostscan.possible_cpus()


def expected(*pools: Pool) -> list[Expected]:
    return [Expected(p.name, i, kid, n) for p in pools for i, kid, n in p.live_contexts()]


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool("audit", 2, 64, use_eventfd=False)
    yield p
    p.close()


def test_a_clean_pool_has_no_leak(pool: Pool) -> None:
    assert compare(expected(pool), own_rings(), CPUS) == set()


def test_a_raw_io_setup_behind_the_pools_back_is_one_leak(pool: Pool) -> None:
    ctx = aio.io_setup(32)
    try:
        leaks = compare(expected(pool), own_rings(), CPUS)
        assert leaks == {Leak("unrecorded", ctx, hostscan.ring_pages(32, CPUS))}
        (leak,) = leaks
        assert "no pool owns it" in leak.describe()
    finally:
        aio.io_destroy(ctx)
    assert compare(expected(pool), own_rings(), CPUS) == set()


def test_a_context_destroyed_but_recorded_live_is_one_leak(pool: Pool) -> None:
    slot = pool._slots[0]
    aio.io_destroy(slot.ctx.id)       # behind the pool's back: the record still says active
    try:
        leaks = compare(expected(pool), own_rings(), CPUS)
        assert leaks == {Leak("missing", slot.ctx.id, 0, "audit", slot.record.index, 64)}
        assert "destroyed behind the pool's back" in next(iter(leaks)).describe()
    finally:
        slot.ctx.destroyed = True     # so the pool's own destroy does not try again


def test_a_ring_of_the_wrong_size_at_a_recorded_address_is_a_leak() -> None:
    e = Expected("p", 0, 0x7f0000000000, 128)
    ring = hostscan.Ring(0x7f0000000000, 1 * hostscan.PAGE, "00:13", 5)
    (leak,) = compare([e], [ring], CPUS)
    assert (leak.kind, leak.pages, leak.want_pages) == ("size", 1, hostscan.ring_pages(128, CPUS))


def test_a_leak_counts_once_two_audits_in_a_row_see_it() -> None:
    a = SelfAudit(CPUS)
    stray = hostscan.Ring(0x7f0000000000, hostscan.PAGE, "00:13", 5)
    assert a.observe([], [stray]) == [] and a.current == set()   # a context being set up?
    assert a.observe([], []) == [] and a.current == set()        # it was
    assert a.observe([], [stray]) == []
    (new,) = a.observe([], [stray])
    assert a.current == {new} and a.observe([], [stray]) == []   # logged once
    a.observe([], [])
    assert a.current == set() and a.seen == {new}


# ------------------------------------------------------------ in the daemon
def daemon(tmp_path: Path) -> Daemon:
    cfg = config.parse(
        "pools:\n  - {name: default, contexts: 2, nr_events: 64}\n"
        f"state_directory: {tmp_path}\nmetrics: {{listen: '127.0.0.1:0'}}\n",
        "t.yaml", env={})
    d = Daemon(cfg, notifier=Notifier(env={}))
    d.budget.audit_interval = 0.1
    return d


def wait_gauge(d: Daemon, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        d.budget.tick(time.monotonic())
        got = d.metrics_registry.get_sample_value("aiod_context_leaks")
        if got == value:
            return
        assert time.monotonic() < deadline, f"aiod_context_leaks stayed {got}, not {value}"
        time.sleep(0.02)


def test_daemon_gauge_log_and_shutdown_report(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    d = daemon(tmp_path)
    d.startup()
    try:
        wait_gauge(d, 0)
        ctx = aio.io_setup(16)          # behind the pools' back, in the daemon's process
        try:
            with caplog.at_level(logging.ERROR, logger="aiod.budget"):
                wait_gauge(d, 1)
        finally:
            aio.io_destroy(ctx)
        lines = [r.getMessage() for r in caplog.records if "context leak" in r.getMessage()]
        assert len(lines) == 1 and f"{ctx:#x}" in lines[0], lines
        wait_gauge(d, 0)                # gone again: the gauge says so
    finally:
        res = d.shutdown("test")
        d.signals.restore()  # in-process: give pytest its handlers back
    assert res.report["context_leaks"] == 1          # it happened, and the report says so
    assert res.report["aio_rings_left"] == 0         # nothing left after shutdown
    assert own_rings() == []
    details = res.report["context_leak_details"]
    assert isinstance(details, list) and len(details) == 1 and "no pool owns it" in details[0]


def test_daemon_sees_a_context_destroyed_behind_its_back(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    d.startup()
    try:
        slot = d.pools["default"]._slots[1]
        aio.io_destroy(slot.ctx.id)
        wait_gauge(d, 1)
    finally:
        res = d.shutdown("test")
        d.signals.restore()  # in-process: give pytest its handlers back
    assert res.report["context_leaks"] == 1 and res.report["aio_rings_left"] == 0
    # the pool's own io_destroy then fails, and is reported as such
    assert len(res.report["failed_to_destroy"]) == 1  # type: ignore[arg-type]
