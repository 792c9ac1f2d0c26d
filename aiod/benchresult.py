"""What an `aiod bench` run came to: its fine latency histogram and
percentiles, the result document (`--json`) and the lines a person reads.

The histogram is log-linear, exact below 128 ns and then 64 buckets per
octave (about 1.6 %), the same indexes the engine keeps its fine rows in, so
percentiles can be put beside fio's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiod.engine import Ledger
from aiod.snapshot import PoolSnapshot

if TYPE_CHECKING:  # bench imports this module; only its Settings type is needed here
    from aiod.bench import Settings


def hist_index(ns: int) -> int:
    """Log-linear bucket of a latency in ns: exact below 128, then 64 per octave."""
    if ns < 128:
        return max(ns, 0)
    shift = ns.bit_length() - 7
    return (shift << 6) + (ns >> shift)


def hist_value(idx: int) -> float:
    """The middle of a bucket, in ns."""
    if idx < 128:
        return float(idx)
    shift = (idx >> 6) - 1
    m = idx - (shift << 6)
    return ((m << shift) + ((m + 1) << shift) - 1) / 2


def percentiles(hist: dict[int, int], points: tuple[float, ...]) -> dict[float, float]:
    total = sum(hist.values())
    out: dict[float, float] = {}
    if total == 0:
        return {p: 0.0 for p in points}
    items = sorted(hist.items())
    for p in points:
        want = p / 100 * total
        acc = 0
        for idx, n in items:
            acc += n
            if acc >= want:
                out[p] = hist_value(idx)
                break
    return out


def fine_histograms(ledger: Ledger, rows: dict[str, int]) -> tuple[dict[int, int], dict[int, int]]:
    """(clat, lat): the engine's fine histograms of every row, added up."""
    hist: dict[int, int] = {}
    lhist: dict[int, int] = {}
    for k in rows:
        clat, lat = ledger.fine("bench", k)
        for idx, n in clat.items():
            hist[idx] = hist.get(idx, 0) + n
        for idx, n in lat.items():
            lhist[idx] = lhist.get(idx, 0) + n
    return hist, lhist


def result(s: Settings, elapsed: float, cpu: float, nbytes: int, hist: dict[int, int],
            lhist: dict[int, int], snap: PoolSnapshot, ledger: Ledger) -> dict[str, Any]:
    errors = sum(st.failed_total for st in snap.stats)
    pct = percentiles(hist, (50.0, 90.0, 99.0, 99.9))
    lpct = percentiles(lhist, (50.0, 90.0, 99.0, 99.9))
    ok = sum(hist.values())
    by_stats = sum(st.submitted for st in snap.stats)
    return {
        "target": str(s.target), "rw": s.rw, "bs": s.bs, "iodepth": s.iodepth,
        "direct": s.direct, "runtime_seconds": round(elapsed, 6),
        "ios": ok, "errors": errors,
        "iops": ok / elapsed if elapsed > 0 else 0.0,
        "bw_bytes": nbytes / elapsed if elapsed > 0 else 0.0,
        "cpu_seconds": round(cpu, 6),
        "latency_ns": {"p50": pct[50.0], "p90": pct[90.0], "p99": pct[99.0],
                       "p99_9": pct[99.9]},
        "total_latency_ns": {"p50": lpct[50.0], "p90": lpct[90.0], "p99": lpct[99.0],
                             "p99_9": lpct[99.9]},
        "accounting": {**snap.totals(),
                       "balanced": snap.balanced and by_stats == snap.submitted},
        "latency_histogram": {"bounds_seconds": list(ledger.bounds),
                              "buckets": [sum(st.buckets[i] for st in snap.stats)
                                          for i in range(len(ledger.bounds) + 1)]},
    }


def human(r: dict[str, Any]) -> str:
    lat = r["latency_ns"]

    def us(ns: float) -> str:
        return f"{ns / 1000:.1f}us" if ns < 1e7 else f"{ns / 1e6:.2f}ms"

    acct = r["accounting"]
    return (f"aiod bench: {r['rw']} bs={r['bs']} iodepth={r['iodepth']} "
            f"{'direct' if r['direct'] else 'buffered'} on {r['target']}\n"
            f"  IOPS={r['iops']:.0f}, BW={r['bw_bytes'] / 2**20:.1f}MiB/s "
            f"({r['ios']} ios in {r['runtime_seconds']:.2f}s, {r['errors']} errors)\n"
            f"  clat percentiles: p50={us(lat['p50'])} p90={us(lat['p90'])} "
            f"p99={us(lat['p99'])} p99.9={us(lat['p99_9'])}\n"
            f"  lat (incl. io_submit): p50={us(r['total_latency_ns']['p50'])} "
            f"p99={us(r['total_latency_ns']['p99'])}\n"
            f"  cpu={r['cpu_seconds']:.2f}s "
            f"({100 * r['cpu_seconds'] / max(r['runtime_seconds'], 1e-9):.0f}% of one core)\n"
            f"  accounting: submitted {acct['submitted']} = completed {acct['completed']} + "
            f"cancelled {acct['cancelled']} + failed {acct['failed']} + in flight "
            f"{acct['in_flight']}")
