"""aiod bench beside fio (libaio) and caio, on the same file, alternating.

    make bench                      # or: .venv/bin/python benchmarks/run.py
    make bench ARGS="--rounds 5 --runtime 10 --dir /mnt/nvme"

Each round runs every engine once per scenario, in turn, so drift of the
machine hits them alike; the table shows medians over the rounds and the
ratio aiod/fio. Needs fio (Debian package) and, for the Python peer, caio
(installed into the venv here if missing; it is not an aiod dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Scenario:
    key: str
    title: str
    rw: str
    iodepth: int
    direct: bool
    fio_variants: dict[str, list[str]]
    caio: bool = False
    aiod_variants: dict[str, list[str]] = field(default_factory=lambda: {"aiod": []})
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)


BATCH = ["--iodepth_batch_submit=32", "--iodepth_batch_complete_min=1", "--userspace_reap=1"]


# O_DIRECT at qd32: the engine's default (4 per io_submit) beside one
# io_submit of everything that is ready (the default before), which the
# kernel plugs, so none of its ops reaches the device until the call returns.
AIOD_SMALL_SUBMITS = {"aiod": [], "aiod-all-at-once": ["--iodepth-batch=0"]}


def scenarios() -> list[Scenario]:
    return [
        Scenario("1", "4k randread O_DIRECT qd32", "randread", 32, True, {"fio": []}, caio=True,
                 aiod_variants=AIOD_SMALL_SUBMITS),
        Scenario("2", "4k randread O_DIRECT qd1", "randread", 1, True, {"fio": []}),
        Scenario("3", "4k randread page cache qd32", "randread", 32, False,
                 {"fio": ["--invalidate=0"], "fio-batch": ["--invalidate=0", *BATCH]}, caio=True),
        Scenario("4", "4k randwrite O_DIRECT qd32", "randwrite", 32, True, {"fio": []},
                 aiod_variants=AIOD_SMALL_SUBMITS),
    ]


def run_fio(path: Path, sc: Scenario, extra: list[str], runtime: int, size: int) -> dict[str, float]:
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={sc.rw}", "--bs=4k",
           f"--iodepth={sc.iodepth}", "--ioengine=libaio", f"--direct={int(sc.direct)}",
           f"--runtime={runtime}", "--time_based", f"--size={size}", "--norandommap",
           "--randrepeat=0", "--output-format=json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in sc.rw else "read"]
    pct = side["clat_ns"].get("percentile", {})
    secs = job.get("job_runtime", runtime * 1000) / 1000
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * secs
    ios = side.get("total_ios") or side["iops"] * secs
    return {"iops": side["iops"], "p50": pct.get("50.000000", 0.0),
            "p99": pct.get("99.000000", 0.0), "cpu": cpu, "cpu_per_op": cpu / ios if ios else 0.0}


def run_aiod(path: Path, sc: Scenario, extra: list[str], runtime: int,
             size: int) -> dict[str, float]:
    cmd = [PY, "-m", "aiod.cli", "bench", f"--target={path}", f"--rw={sc.rw}", "--bs=4k",
           f"--iodepth={sc.iodepth}", f"--runtime={runtime}s", f"--size={size}",
           "--direct" if sc.direct else "--buffered", "--json", *extra]
    if "write" in sc.rw:
        cmd.append("--allow-overwrite")
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)
    assert r["accounting"]["balanced"] and r["errors"] == 0, r
    return {"iops": r["iops"], "p50": r["latency_ns"]["p50"], "p99": r["latency_ns"]["p99"],
            "cpu": r["cpu_seconds"],
            "cpu_per_op": r["cpu_seconds"] / r["ios"] if r["ios"] else 0.0}


def run_caio(path: Path, sc: Scenario, runtime: int, size: int) -> dict[str, float] | str:
    cmd = [PY, str(Path(__file__).with_name("caio_peer.py")), str(path), "4096",
           str(sc.iodepth), str(runtime), str(size), "direct" if sc.direct else "buffered"]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if r["errors"]:
        return (f"every read failed ({r['errors']} of {r['ios']}): caio allocates its own "
                "buffers without O_DIRECT alignment, so the kernel answers EINVAL")
    return {"iops": r["iops"], "p50": 0.0, "p99": 0.0, "cpu": r["cpu_seconds"],
            "cpu_per_op": r["cpu_seconds"] / r["ios"] if r["ios"] else 0.0}


def run_lifecycle(which: str) -> dict[str, float]:
    cmd = [PY, str(Path(__file__).with_name("lifecycle.py")), which]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     timeout=300).stdout)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ensure_caio() -> bool:
    try:
        import caio  # type: ignore[import-not-found]  # noqa: F401
        return True
    except ImportError:
        r = subprocess.run([PY, "-m", "pip", "install", "-q", "caio"], capture_output=True)
        return r.returncode == 0


def prepare(path: Path, size: int) -> None:
    """A file of real data (fio's own layout would do; ours is written once)."""
    if path.exists() and path.stat().st_size >= size:
        return
    sys.path.insert(0, str(ROOT))
    from aiod.targets import fill_target
    path.unlink(missing_ok=True)
    fill_target(path, size, None)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def med(xs: list[dict[str, float]], k: str) -> float:
    return statistics.median(x[k] for x in xs) if xs else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per run")
    ap.add_argument("--size", type=int, default=1 << 30, help="file size in bytes")
    ap.add_argument("--dir", default="/var/tmp", help="directory for the test files")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers "
                    "(1-4 I/O, 5 pool of 256 contexts, 6 SIGTERM with 4,096 POLLs)")
    args = ap.parse_args()
    if not shutil.which("fio"):
        print("benchmarks: fio is not installed (apt-get install fio)", file=sys.stderr)
        return 2
    have_caio = ensure_caio()
    rfile = Path(args.dir) / "aiod-bench-read.dat"
    wfile = Path(args.dir) / "aiod-bench-write.dat"
    prepare(rfile, args.size)
    prepare(wfile, args.size)
    chosen = [s for s in scenarios() if not args.only or s.key in args.only.split(",")]
    notes: dict[str, str] = {}
    want = set(args.only.split(",")) if args.only else {"1", "2", "3", "4", "5", "6", "7"}
    life: dict[str, list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for key, which in (("5", "pool256"), ("6", "sigterm"), ("7", "sigterm-pools")):
            if key in want:
                r = run_lifecycle(which)
                life.setdefault(which, []).append(r)
                print(f"round {rnd + 1} [{key}] {which}: {json.dumps(r)}", file=sys.stderr)
        for sc in chosen:
            path = wfile if "write" in sc.rw else rfile
            if not sc.direct:
                warm(path)
            engines: list[tuple[str, Any]] = []
            for name, extra in sc.aiod_variants.items():
                engines.append((name, lambda extra=extra: run_aiod(path, sc, extra, args.runtime,
                                                                   args.size)))
            for name, extra in sc.fio_variants.items():
                engines.append((name, lambda extra=extra: run_fio(path, sc, extra, args.runtime, args.size)))
            if sc.caio and have_caio:
                engines.append(("caio", lambda: run_caio(path, sc, args.runtime, args.size)))
            # Alternate the order each round so neither engine always goes first.
            for name, fn in (engines if rnd % 2 == 0 else engines[::-1]):
                r = fn()
                if isinstance(r, str):
                    notes[f"{sc.key}/{name}"] = r
                    continue
                sc.results.setdefault(name, []).append(r)
                print(f"round {rnd + 1} [{sc.key}] {name:16s} {r['iops']:10.0f} IOPS "
                      f"p50 {r['p50'] / 1000:7.1f}us p99 {r['p99'] / 1000:7.1f}us "
                      f"cpu {r['cpu']:.2f}s ({r['cpu_per_op'] * 1e6:.2f} us/op)", file=sys.stderr)
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"files in {args.dir}; {args.rounds} rounds x {args.runtime}s; medians\n")
    print("| scenario | engine | IOPS | p50 us | p99 us | CPU s | CPU us/op | aiod/engine IOPS "
          "| aiod/engine p50 | aiod/engine CPU/op |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sc in chosen:
        a = sc.results.get("aiod", [])
        for name, rs in sc.results.items():
            iops, p50, cop = med(rs, "iops"), med(rs, "p50"), med(rs, "cpu_per_op")
            mine = name.startswith("aiod")
            ratio = f"{med(a, 'iops') / iops:.2f}" if not mine and iops else ""
            lat = (f"{med(a, 'p50') / p50:.2f}" if not mine and p50 else "")
            cpu_ratio = f"{med(a, 'cpu_per_op') / cop:.2f}" if not mine and cop else ""
            print(f"| {sc.key}. {sc.title} | {name} | {iops:.0f} | {p50 / 1000:.1f} | "
                  f"{med(rs, 'p99') / 1000:.1f} | {med(rs, 'cpu'):.2f} | {cop * 1e6:.2f} | "
                  f"{ratio} | {lat} | {cpu_ratio} |")
    for k, v in notes.items():
        print(f"\nnote {k}: {v}")
    if any(sc.key in ("2", "4") for sc in chosen):
        print("\nnote caio: not run in 2 and 4 for the same reason as in 1: Operation.read "
              "allocates its own buffer and Operation.write points the kernel at the payload "
              "bytes object, neither aligned for O_DIRECT, so every O_DIRECT op completes "
              "with -EINVAL (which caio hands back as an unsigned 2**64-22).")
    if life:
        print("\n| lifecycle | median | detail |")
        print("|---|---:|---|")
    if "pool256" in life:
        rs = life["pool256"]
        print(f"| 5. Pool of 256 contexts: setup | {med(rs, 'setup_seconds') * 1000:.1f} ms | |")
        print(f"| 5. Pool of 256 contexts: destroy (threads) | "
              f"{med(rs, 'destroy_seconds') * 1000:.1f} ms | one io_destroy alone: "
              f"{med(rs, 'serial_io_destroy_seconds_each') * 1000:.1f} ms, so "
              f"{med(rs, 'serial_estimate_seconds'):.1f} s one after another |")
    if "sigterm" in life:
        rs = life["sigterm"]
        print(f"| 6. SIGTERM to exit, 64 contexts, 4,096 POLLs, drain_timeout 0 | "
              f"{med(rs, 'sigterm_to_exit_seconds') * 1000:.0f} ms | drain "
              f"{med(rs, 'drain_seconds') * 1000:.1f} ms, cancel {med(rs, 'cancel_seconds') * 1000:.1f}"
              f" ms, destroy {med(rs, 'destroy_seconds') * 1000:.1f} ms; "
              f"cancelled {med(rs, 'cancelled'):.0f} |")
    if "sigterm-pools" in life:
        rs = life["sigterm-pools"]
        print(f"| 7. SIGTERM to exit, 200 contexts: 50 pools of 4 / one pool of 200 | "
              f"{med(rs, 'median_ratio'):.2f}x | target <= 1.5x; 8 POLLs in flight per "
              f"context, drain_timeout 0 |")
    print_targets(chosen)
    return 0


def print_targets(chosen: list[Scenario]) -> None:
    """The issue's targets, side by side with what was measured."""
    by = {sc.key: sc.results for sc in chosen}
    rows: list[tuple[str, float, float]] = []  # (what, measured ratio, needed)

    def ratio(key: str, num: str, den: str, k: str = "iops") -> float | None:
        rs = by.get(key, {})
        if num not in rs or den not in rs or not med(rs[den], k):
            return None
        return med(rs[num], k) / med(rs[den], k)

    for key, what in (("1", "1. IOPS aiod/fio"), ("4", "4. IOPS aiod/fio")):
        r = ratio(key, "aiod", "fio")
        if r is not None:
            rows.append((what, r, 1.0))
    r = ratio("2", "aiod", "fio", "p50")
    if r is not None:
        rows.append(("2. clat p50 aiod/fio (lower is better)", r, 1.05))
    best = max(((ratio("3", "aiod", e) is not None and med(by["3"][e], "iops")) or 0.0)
               for e in ("fio", "fio-batch")) if "3" in by else 0.0
    if best:
        rows.append(("3. IOPS aiod/best fio", med(by["3"]["aiod"], "iops") / best, 1.0))
    for key in ("1", "2", "3", "4"):
        r = ratio(key, "aiod", "fio", "cpu_per_op")
        if r is not None:
            rows.append((f"{key}. CPU per op aiod/fio (lower is better)", r, 1.1))
    r = ratio("3", "aiod", "caio")
    if r is not None:
        rows.append(("3. IOPS aiod/caio", r, 3.0))
    if not rows:
        return
    print("\n| target | measured | needed | met |")
    print("|---|---:|---:|---|")
    for what, got, need in rows:
        ok = got <= need if "lower" in what else got >= need
        print(f"| {what} | {got:.2f} | {'<=' if 'lower' in what else '>='} {need:g} | "
              f"{'yes' if ok else 'no'} |")


if __name__ == "__main__":
    sys.exit(main())
