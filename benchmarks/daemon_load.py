"""What the daemon's own load job reaches: ops/s and CPU per op of `aiod run`.

`aiod bench` measures the engine with a loop of its own; this runs the
daemon itself (its main loop, pools, jobs, metrics) with one load job
(4 KiB randread) on a 64 MiB file, and reads ops from its metrics and CPU
(user + system) from /proc over a window once it is warm. Given several
source trees (``name=path``, e.g. a checkout of an older commit), it
alternates them round by round and prints medians, so they compare on the
same machine in the same minutes.

    .venv/bin/python benchmarks/daemon_load.py [--rounds 3] [--runtime 5] [name=tree ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CASES = ((False, 32), (True, 32), (True, 1))  # (O_DIRECT, iodepth)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _completed(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("aiod_ops_completed_total{") and 'job="load"' in line)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(tree: Path, work: Path, direct: bool, iodepth: int,
             runtime: float) -> tuple[float, float]:
    """(ops/s, CPU us per op) of one daemon from tree over runtime seconds."""
    port = _free_port()
    (work / "state").mkdir(parents=True, exist_ok=True)
    cfg = {"state_directory": str(work / "state"), "log_level": "warning",
           "metrics": {"listen": f"127.0.0.1:{port}"},
           "pools": [{"name": "p", "contexts": 1, "nr_events": 64}],
           "jobs": [{"name": "load", "pool": "p", "type": "load",
                     "target": str(work / "load.dat"), "size": "64MiB", "op": "randread",
                     "block_size": "4KiB", "direct": direct, "iodepth": iodepth,
                     "timeout": "5s"}]}
    conf = work / "aiod.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "aiod.cli", "run", "--config", str(conf)],
                            env=dict(os.environ, PYTHONPATH=str(tree)), cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # the first start fills the file
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"aiod from {tree} exited with {proc.returncode}")
            try:
                if _completed(port) > 1000:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"aiod from {tree} did not get going in 120 s")
            time.sleep(0.2)
        n0, c0, t0 = _completed(port), _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(runtime)
        n1, c1, t1 = _completed(port), _cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(60)
    return (n1 - n0) / (t1 - t0), (c1 - c0) / max(1.0, n1 - n0) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", help="name=path of an aiod source tree (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/aiod-daemon-load"))
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees) if args.trees else {"this": str(ROOT)}
    print("| case | " + " | ".join(f"{n}: ops/s | {n}: CPU us/op" for n in trees) + " |")
    for direct, depth in CASES:
        got: dict[str, list[tuple[float, float]]] = {n: [] for n in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                got[name].append(run_once(Path(tree), args.dir / name, direct, depth,
                                          args.runtime))
        cells = []
        for name in trees:
            cells.append(f"{statistics.median(x[0] for x in got[name]):,.0f}")
            cells.append(f"{statistics.median(x[1] for x in got[name]):.1f}")
        case = f"randread, {'O_DIRECT' if direct else 'page cache'}, iodepth {depth}"
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
