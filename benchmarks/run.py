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
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)


BATCH = ["--iodepth_batch_submit=32", "--iodepth_batch_complete_min=1", "--userspace_reap=1"]


def scenarios() -> list[Scenario]:
    return [
        Scenario("1", "4k randread O_DIRECT qd32", "randread", 32, True, {"fio": []}, caio=True),
        Scenario("2", "4k randread O_DIRECT qd1", "randread", 1, True, {"fio": []}),
        Scenario("3", "4k randread page cache qd32", "randread", 32, False,
                 {"fio": ["--invalidate=0"], "fio-batch": ["--invalidate=0", *BATCH]}, caio=True),
        Scenario("4", "4k randwrite O_DIRECT qd32", "randwrite", 32, True, {"fio": []}),
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
    return {"iops": side["iops"], "p50": pct.get("50.000000", 0.0),
            "p99": pct.get("99.000000", 0.0),
            "cpu": (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime}


def run_aiod(path: Path, sc: Scenario, runtime: int, size: int) -> dict[str, float]:
    cmd = [PY, "-m", "aiod.cli", "bench", f"--target={path}", f"--rw={sc.rw}", "--bs=4k",
           f"--iodepth={sc.iodepth}", f"--runtime={runtime}s", f"--size={size}",
           "--direct" if sc.direct else "--buffered", "--json"]
    if "write" in sc.rw:
        cmd.append("--allow-overwrite")
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)
    assert r["accounting"]["balanced"] and r["errors"] == 0, r
    return {"iops": r["iops"], "p50": r["latency_ns"]["p50"], "p99": r["latency_ns"]["p99"],
            "cpu": r["cpu_seconds"]}


def run_caio(path: Path, sc: Scenario, runtime: int, size: int) -> dict[str, float] | str:
    cmd = [PY, str(Path(__file__).with_name("caio_peer.py")), str(path), "4096",
           str(sc.iodepth), str(runtime), str(size), "direct" if sc.direct else "buffered"]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if r["errors"]:
        return (f"every read failed ({r['errors']} of {r['ios']}): caio allocates its own "
                "buffers without O_DIRECT alignment, so the kernel answers EINVAL")
    return {"iops": r["iops"], "p50": 0.0, "p99": 0.0, "cpu": r["cpu_seconds"]}


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
    from aiod.targets import create_filled
    path.unlink(missing_ok=True)
    create_filled(path, size)


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
    ap.add_argument("--only", default="", help="comma-separated scenario numbers")
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
    for rnd in range(args.rounds):
        for sc in chosen:
            path = wfile if "write" in sc.rw else rfile
            if not sc.direct:
                warm(path)
            engines: list[tuple[str, Any]] = [("aiod", lambda: run_aiod(path, sc, args.runtime, args.size))]
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
                print(f"round {rnd + 1} [{sc.key}] {name:9s} {r['iops']:10.0f} IOPS "
                      f"p50 {r['p50'] / 1000:7.1f}us p99 {r['p99'] / 1000:7.1f}us "
                      f"cpu {r['cpu']:.2f}s", file=sys.stderr)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"files in {args.dir}; {args.rounds} rounds x {args.runtime}s; medians\n")
    print("| scenario | engine | IOPS | p50 us | p99 us | CPU s | aiod/engine IOPS | aiod/engine p50 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for sc in chosen:
        a = sc.results.get("aiod", [])
        for name, rs in sc.results.items():
            iops, p50 = med(rs, "iops"), med(rs, "p50")
            ratio = f"{med(a, 'iops') / iops:.2f}" if name != "aiod" and iops else ""
            lat = (f"{med(a, 'p50') / p50:.2f}" if name != "aiod" and p50 else "")
            print(f"| {sc.key}. {sc.title} | {name} | {iops:.0f} | {p50 / 1000:.1f} | "
                  f"{med(rs, 'p99') / 1000:.1f} | {med(rs, 'cpu'):.2f} | {ratio} | {lat} |")
    for k, v in notes.items():
        print(f"\nnote {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
