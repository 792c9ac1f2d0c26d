"""What scrapes cost the I/O loop: a load job's IOPS while /metrics is scraped.

    .venv/bin/python benchmarks/scrape.py
    .venv/bin/python benchmarks/scrape.py --rounds 5 --phase 10 --dir /mnt/nvme

1. One `aiod run` with a load job (4 KiB randread, O_DIRECT, iodepth 32) on a
   256 MiB file. Phases alternate, round after round: no scraper, one client
   scraping back to back, twenty clients scraping back to back (each on its own
   keep-alive connection, as Prometheus does, from another process). The IOPS
   of each phase comes from aiod's own counters, read once at each end. The
   table gives medians over the rounds and the ratio to no scraping.
2. One `aiod run` with 50 pools and 50 probe jobs (about 2,600 series): the
   time of a scrape that renders (1.2 s apart, so no rendering is shared) and
   of one answered from a shared rendering (right after).

--aiod-root runs another checkout (say, a `git worktree` of an older commit)
for a before/after comparison.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, root: Path, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        config["metrics"] = {"listen": f"127.0.0.1:{self.port}"}
        path = workdir / "aiod.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = str(root)
        self.log = open(workdir / "aiod.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "aiod.cli", "run", "--config",
                                      str(path)], stdout=self.log, stderr=self.log, env=env,
                                     cwd=str(workdir))
        deadline = time.monotonic() + 300
        while True:
            try:
                if get(self.port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"aiod did not start; see {workdir / 'aiod.log'}")
            time.sleep(0.2)

    def completed(self) -> float:
        text = get(self.port, "/metrics")[1].decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("aiod_ops_completed_total{"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ------------------------------------------------------------------- scrapers
def scrapers_main(port: int, clients: int, seconds: float) -> None:
    """Run in a child process: `clients` threads scrape back to back; print JSON."""
    stop = time.monotonic() + seconds
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise OSError(r.status)
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                conn.close()
                with lock:
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"times": times, "errors": errors[0]}))


def scrape_for(port: int, clients: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--scrapers", str(port), str(clients),
                             str(seconds)], stdout=subprocess.PIPE, text=True)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --------------------------------------------------------------------- part 1
def load_config(workdir: Path) -> dict[str, Any]:
    return {
        "log_level": "warning",
        "state_directory": str(workdir / "state"),
        "shutdown": {"drain_timeout": "2s", "destroy_timeout": "10s"},
        "pools": [{"name": "load", "contexts": 1, "nr_events": 64}],
        "jobs": [{"name": "load", "pool": "load", "type": "load", "target": "load.dat",
                  "size": "256MiB", "op": "randread", "block_size": "4KiB", "direct": True,
                  "iodepth": 32}],
    }


def iops_phases(d: Daemon, rounds: int, phase: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {k: {"iops": [], "times": [], "errors": 0}
                                      for k in ("none", "1", "20")}
    time.sleep(2)  # past the start
    for r in range(rounds):
        for key, clients in (("none", 0), ("1", 1), ("20", 20)):
            child = scrape_for(d.port, clients, phase + 1.0) if clients else None
            time.sleep(0.5)  # clients connected and scraping
            c0, t0 = d.completed(), time.monotonic()
            time.sleep(phase)
            c1, t1 = d.completed(), time.monotonic()
            out[key]["iops"].append((c1 - c0) / (t1 - t0))
            if child is not None:
                res = json.loads(child.communicate(timeout=120)[0])
                out[key]["times"].extend(res["times"])
                out[key]["errors"] += res["errors"]
            print(f"  round {r + 1}, {key:>4} scrapers: {out[key]['iops'][-1]:9.0f} IOPS",
                  flush=True)
    return out


# --------------------------------------------------------------------- part 2
def wide_config(workdir: Path, n: int) -> dict[str, Any]:
    return {
        "log_level": "warning",
        "state_directory": str(workdir / "state"),
        "shutdown": {"drain_timeout": "2s", "destroy_timeout": "10s"},
        "pools": [{"name": f"p{i}", "contexts": 1, "nr_events": 4} for i in range(n)],
        "jobs": [{"name": f"j{i}", "pool": f"p{i}", "type": "probe", "target": f"j{i}.dat",
                  "size": "1MiB", "op": "randread", "block_size": "4KiB", "direct": True,
                  "rate": "10/s"} for i in range(n)],
    }


def wide_scrapes(d: Daemon, samples: int) -> dict[str, Any]:
    fresh: list[float] = []
    shared: list[float] = []
    series = 0
    for _ in range(samples):
        time.sleep(1.2)  # past any shared rendering's window (at most 1 s)
        t0 = time.perf_counter()
        body = get(d.port, "/metrics")[1]
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        get(d.port, "/metrics")
        shared.append(time.perf_counter() - t0)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {"series": series, "fresh": fresh, "shared": shared}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--scrapers":
        scrapers_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phase", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--samples", type=int, default=15, help="scrapes of the 50-pool daemon")
    ap.add_argument("--dir", default="/var/tmp", help="where the load job's file goes")
    ap.add_argument("--aiod-root", default=str(ROOT), help="the aiod checkout to run")
    args = ap.parse_args()
    root = Path(args.aiod_root).resolve()
    with tempfile.TemporaryDirectory(prefix="aiod-scrape-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        (work / "load").mkdir()
        print(f"aiod from {root}; part 1: load job, {args.rounds} rounds x 3 phases x "
              f"{args.phase:g} s", flush=True)
        d = Daemon(root, work / "load", load_config(work / "load"))
        try:
            phases = iops_phases(d, args.rounds, args.phase)
        finally:
            d.stop()
        (work / "wide").mkdir()
        print("part 2: 50 pools, 50 jobs", flush=True)
        d = Daemon(root, work / "wide", wide_config(work / "wide", 50))
        try:
            wide = wide_scrapes(d, args.samples)
        finally:
            d.stop()

    base = statistics.median(phases["none"]["iops"])
    print()
    print("| scrapers | IOPS (median) | ratio to none | scrapes/s | scrape p50 | scrape p99 | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in ("none", "1", "20"):
        p = phases[key]
        m = statistics.median(p["iops"])
        rate = len(p["times"]) / (args.rounds * (args.phase + 1.0)) if p["times"] else 0
        lat = (f"{pct(p['times'], 0.5) * 1e3:.1f} ms | {pct(p['times'], 0.99) * 1e3:.1f} ms"
               if p["times"] else "- | -")
        print(f"| {key} | {m:,.0f} | {m / base:.2f} | {rate:,.0f} | {lat} | {p['errors']} |")
    print()
    print(f"50 pools, 50 jobs ({wide['series']} series), {args.samples} scrapes: rendering "
          f"p50 {statistics.median(wide['fresh']) * 1e3:.1f} ms, "
          f"max {max(wide['fresh']) * 1e3:.1f} ms; shared p50 "
          f"{statistics.median(wide['shared']) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
