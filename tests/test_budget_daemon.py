"""`aiod run` yielding AIO headroom to another process, and taking it back.

fs.aio-nr is shared with everything else on the machine (other test sessions
too), so every amount here is computed from the current reading, and the
events the test takes are held for a few seconds only.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from aiod import aio
from aiod.daemon import MAX_WAIT
from aiod.headroom import CHECK_INTERVAL
from tests.daemon_harness import AIOD, ROOT, Aiod
from tests.test_hostscan import Holder

NR_EVENTS = 256
CONTEXTS = 8
MIN_CONTEXTS = 2
SLACK = 4 * NR_EVENTS      # free headroom above the reserve with aiod at full size


def config(reserve: int) -> dict[str, Any]:
    return {
        "log_level": "info",
        "headroom_reserve": reserve,
        "shutdown": {"drain_timeout": "5s", "destroy_timeout": "10s"},
        "pools": [{"name": "elastic", "contexts": CONTEXTS, "min_contexts": MIN_CONTEXTS,
                   "nr_events": NR_EVENTS}],
        "jobs": [{"name": "load", "pool": "elastic", "type": "load", "target": "load.dat",
                  "size": "8MiB", "op": "randread", "block_size": "4KiB", "direct": True,
                  "iodepth": 16}],
    }


def target(d: Aiod) -> float:
    return d.metric_sum("aiod_pool_contexts_target", pool="elastic")


def active(d: Aiod) -> float:
    return d.metric_sum("aiod_contexts", pool="elastic", state="active")


def test_pool_yields_headroom_and_takes_it_back_without_losing_an_op(
        daemons: list[Aiod], tmp_path: Path) -> None:
    nr, max_nr = aio.system_aio_usage()
    reserve = max_nr - nr - CONTEXTS * NR_EVENTS - SLACK
    assert reserve > 0, f"fs.aio-nr {nr} of {max_nr}: no room for this test"
    d = Aiod(tmp_path, config(reserve))
    daemons.append(d)
    d.wait_ready()
    d.wait_until(lambda: target(d) == CONTEXTS and active(d) == CONTEXTS, what="full size")
    d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="load") > 500,
                 what="the load job to run")
    assert d.metric_sum("aiod_headroom_reserve_events") == reserve

    # Another process takes events until the free headroom is 600 below the reserve.
    nr, max_nr = aio.system_aio_usage()
    take = (max_nr - nr) - (reserve - 600)
    taker = Holder(str(take))
    t0 = time.monotonic()
    try:
        while target(d) >= CONTEXTS:
            # one check interval, plus the loop's longest sleep before it polls the
            # check's result, plus this scrape
            assert time.monotonic() - t0 <= CHECK_INTERVAL + MAX_WAIT + 1.0, \
                f"no yield within one check interval; log:\n{d.log}"
            time.sleep(0.05)
        shrunk = target(d)
        # 600 events short: three contexts of 256 (more if others took events too)
        assert MIN_CONTEXTS <= shrunk <= CONTEXTS - 3
        d.wait_until(lambda: active(d) == shrunk and
                     d.metric_sum("aiod_contexts", pool="elastic", state="destroyed")
                     == CONTEXTS - shrunk, what="the surplus contexts retired")
        assert d.metric_sum("aiod_pool_yields_total", pool="elastic") >= 1
        line = next(ln for ln in d.log.splitlines() if "yielding" in ln)
        assert re.search(r"pool elastic: yielding \d+ contexts \(\d+ AIO events\) to other "
                         r"processes: free headroom -?\d+ .* is below headroom_reserve "
                         rf"{reserve}", line), line
        assert d.notify is not None
        deadline = time.monotonic() + 15
        while not any("yielding" in ln for m in d.notify.collect(0.2)
                      for ln in m.split("\n") if ln.startswith("STATUS=")):
            assert time.monotonic() < deadline, d.notify.messages[-3:]
        before = d.metric_sum("aiod_ops_completed_total", job="load")
        d.wait_until(lambda: d.metric_sum("aiod_ops_completed_total", job="load") > before + 100,
                     what="the load job to go on in the smaller pool")
        # A reload while yielding keeps the yield: no grow-then-shrink-again cycle.
        yields = d.metric_sum("aiod_pool_yields_total", pool="elastic")
        setups = d.metric_sum("aiod_context_setups_total", pool="elastic")
        n = len(d.notify.collect())
        d.signal(signal.SIGHUP)
        i = d.notify.wait_for("RELOADING=1", start=n)
        d.notify.wait_for("READY=1", start=i)
        assert "configuration reloaded" in d.log
        assert (target(d), active(d)) == (shrunk, shrunk)
        assert d.metric_sum("aiod_context_setups_total", pool="elastic") == setups
        assert d.metric_sum("aiod_pool_yields_total", pool="elastic") == yields
    finally:
        taker.close()

    # Freed: the pool grows back, after the hysteresis delay.
    d.wait_until(lambda: target(d) == CONTEXTS and active(d) == CONTEXTS, timeout=30,
                 what="the pool to grow back")
    assert "AIO headroom is back" in d.log
    assert d.stop() == 0
    rep = d.report()
    t = rep["totals"]
    assert rep["invariant_holds"] and t["in_flight"] == 0
    assert t["submitted"] == t["completed"] > 0 and t["failed"] == 0 and t["cancelled"] == 0
    (pool,) = rep["pools"]
    assert len(pool["contexts"]) == 2 * CONTEXTS - shrunk
    for ctx in pool["contexts"]:
        assert ctx["state"] == "destroyed" and ctx["in_flight"] == 0
        assert ctx["submitted"] == ctx["completed"], ctx
    assert rep["context_leaks"] == 0 and rep["aio_rings_left"] == 0


def test_run_refuses_a_reserve_that_leaves_the_pools_no_room(tmp_path: Path) -> None:
    _, max_nr = aio.system_aio_usage()
    path = tmp_path / "aiod.yaml"
    path.write_text(f"headroom_reserve: {max_nr - 100}\nstate_directory: {tmp_path}\n"
                    "pools:\n  - {name: a, contexts: 4, min_contexts: 1, nr_events: 128}\n")
    r = subprocess.run(AIOD + ["run", "--config", str(path)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 78, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "no room at all" in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr
