"""Lifecycle benchmarks: what starting and stopping costs.

- ``pool256``: set up, then destroy, a Pool of 256 contexts. io_destroy waits
  for an RCU grace period (about 30 ms each on this kernel); Pool.destroy runs
  them on threads in parallel, so the whole destroy should cost a few grace
  periods, not 256 of them. The serial cost (one io_destroy after another) is
  measured beside it for scale.
- ``sigterm``: the daemon with 64 contexts and 4,096 IOCB_CMD_POLL operations
  in flight (they never complete on their own) and drain_timeout 0: time from
  SIGTERM to the process's exit, with the phases from shutdown-report.json.
- ``sigterm-pools``: the same 200 contexts (8 POLLs in flight on each) as one
  pool of 200, then as 50 pools of 4 (a poll job per pool), 3 runs each,
  alternating: shutdown must destroy every context of every pool in
  parallel, so the second costs about what the first does.

Each prints one JSON object; run.py calls them in a subprocess, so a
benchmark never shares an interpreter with the previous one.

    python benchmarks/lifecycle.py pool256
    python benchmarks/lifecycle.py sigterm
    python benchmarks/lifecycle.py sigterm-pools
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiod import aio  # noqa: E402
from aiod.pool import Pool  # noqa: E402


def pool256(contexts: int = 256, nr_events: int = 32) -> dict[str, float]:
    t0 = time.perf_counter()
    pool = Pool("bench-lifecycle", contexts, nr_events, use_eventfd=True)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    rep = pool.close(drain_timeout=0.0, destroy_timeout=60.0)
    destroy = time.perf_counter() - t1
    assert rep.destroyed == contexts and not rep.failed, rep
    # For scale: the same number of io_destroy calls one after another.
    ids = [aio.io_setup(nr_events) for _ in range(16)]
    t2 = time.perf_counter()
    for i in ids:
        aio.io_destroy(i)
    serial_each = (time.perf_counter() - t2) / len(ids)
    return {"setup_seconds": setup, "destroy_seconds": destroy,
            "serial_io_destroy_seconds_each": serial_each,
            "serial_estimate_seconds": serial_each * contexts}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _in_flight(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return -1.0
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("aiod_ops_in_flight{"))


def sigterm(contexts: int = 64, polls: int = 4096, pools: int = 1) -> dict[str, object]:
    """SIGTERM to exit with ``polls`` POLLs in flight on ``contexts`` contexts,
    split evenly over ``pools`` pools (one poll job each)."""
    import yaml
    with tempfile.TemporaryDirectory(prefix="aiod-bench-sigterm-", dir="/var/tmp") as d:
        tmp = Path(d)
        port = _free_port()
        (tmp / "state").mkdir()
        cfg = {
            "state_directory": str(tmp / "state"),
            "log_level": "warning",
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "shutdown": {"drain_timeout": "0s", "destroy_timeout": "60s"},
            "pools": [{"name": f"hold{i}", "contexts": contexts // pools,
                       "nr_events": -(-polls // contexts)} for i in range(pools)],
            "jobs": [{"name": f"hold{i}", "pool": f"hold{i}", "type": "load",
                      "target": str(tmp / f"hold{i}.fifo"), "op": "poll",
                      "iodepth": polls // pools} for i in range(pools)],
        }
        (tmp / "aiod.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        env["PYTHONPATH"] = str(ROOT)
        with open(tmp / "aiod.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "aiod.cli", "run", "--config",
                                     str(tmp / "aiod.yaml")], stdout=log, stderr=log,
                                    env=env, cwd=tmp)
        try:
            deadline = time.monotonic() + 60
            while _in_flight(port) < polls:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon never had its POLLs in flight:\n"
                                       + (tmp / "aiod.log").read_text()[-2000:])
                time.sleep(0.05)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(120)
            took = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        rep = json.loads((tmp / "state" / "shutdown-report.json").read_text())
        t = rep["totals"]
        assert rc == 0 and rep["invariant_holds"], (rc, t)
        return {"sigterm_to_exit_seconds": took, "exit_code": rc, "pools": pools,
                "contexts": contexts,
                "drain_seconds": rep["drain_seconds"], "cancel_seconds": rep["cancel_seconds"],
                "destroy_seconds": rep["destroy_seconds"], "cancelled": t["cancelled"],
                "submitted": t["submitted"], "in_flight_after": t["in_flight"]}


def sigterm_pools(runs: int = 3) -> dict[str, object]:
    one: list[float] = []
    many: list[float] = []
    for _ in range(runs):
        one.append(float(sigterm(contexts=200, polls=1600, pools=1)["sigterm_to_exit_seconds"]))
        many.append(float(sigterm(contexts=200, polls=1600, pools=50)["sigterm_to_exit_seconds"]))
    one.sort()
    many.sort()
    return {"one_pool_of_200_seconds": one, "fifty_pools_of_4_seconds": many,
            "median_ratio": many[len(many) // 2] / one[len(one) // 2]}


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "pool256":
        print(json.dumps(pool256()))
    elif what == "sigterm":
        print(json.dumps(sigterm()))
    elif what == "sigterm-pools":
        print(json.dumps(sigterm_pools()))
    else:
        print("usage: lifecycle.py {pool256|sigterm|sigterm-pools}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
