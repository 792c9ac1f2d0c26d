"""What `aiod status` shows: the daemon's state as one JSON document.

The document is built on the metrics listener's thread from the same copies
a scrape uses (pool snapshots taken under the pools' locks, job views), so
asking for it never waits on the I/O loop.

"Recent" latency percentiles come from the difference between the current
cumulative histogram and one kept from about ``WINDOW`` seconds earlier.
Every reader of pool snapshots (scrapes and /status requests) records a
sample; with none old enough yet, the window is the job's whole life, and the
document says how long the window really is.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiod import __version__
from aiod.accounting import LATENCY_BUCKETS
from aiod.metrics import JobView, errno_name
from aiod.pool import PoolSnapshot

WINDOW = 60.0          # seconds the "recent" percentiles aim to cover
SAMPLE_SPACING = 5.0   # keep at most one sample per this many seconds
KEEP = 600.0           # drop samples older than this


@dataclass(frozen=True)
class DaemonInfo:
    """The daemon-wide facts /status reports beside the pools and jobs."""

    phase: str
    serving: bool
    healthy: bool
    started_at: float
    config_source: str
    reload_successful: bool
    reload_success_at: float
    reload_attempted_at: float
    reload_error: str | None
    job_kinds: dict[str, dict[str, object]] = field(default_factory=dict)


class StatusSource(Protocol):
    """What the daemon exposes to /status (all thread-safe, all copies)."""

    def pool_snapshots(self) -> list[PoolSnapshot]: ...
    def job_views(self) -> list[JobView]: ...
    def aio_usage(self) -> tuple[int, int]: ...
    def daemon_info(self) -> DaemonInfo: ...


def _job_histograms(pools: list[PoolSnapshot]) -> dict[str, list[int]]:
    """Per-job bucket counts (non-cumulative, last = +Inf), summed over pools and ops."""
    out: dict[str, list[int]] = {}
    for p in pools:
        for st in p.stats:
            acc = out.setdefault(st.job, [0] * len(st.buckets))
            for i, n in enumerate(st.buckets):
                acc[i] += n
    return out


class RecentLatency:
    """Keeps a few timestamped copies of each job's latency histogram.

    Thread-safe: scrapes and /status requests run on concurrent HTTP threads.
    """

    def __init__(self, window: float = WINDOW, spacing: float = SAMPLE_SPACING,
                 keep: float = KEEP) -> None:
        self._window, self._spacing, self._keep = window, spacing, keep
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, dict[str, list[int]]]] = deque()

    def observe(self, now: float, pools: list[PoolSnapshot]) -> None:
        hist = _job_histograms(pools)
        with self._lock:
            if self._samples and now - self._samples[-1][0] < self._spacing:
                return
            self._samples.append((now, hist))
            while self._samples and now - self._samples[0][0] > self._keep:
                self._samples.popleft()

    def baseline(self, now: float) -> tuple[float | None, dict[str, list[int]]]:
        """The newest sample at least ``window`` old, else the oldest that is at
        least ``spacing`` old; (None, {}) when there is none."""
        with self._lock:
            chosen: tuple[float, dict[str, list[int]]] | None = None
            for ts, hist in self._samples:
                age = now - ts
                if age >= self._window or (chosen is None and age >= self._spacing):
                    chosen = (ts, hist)
                if age < self._window:
                    break
            return chosen if chosen is not None else (None, {})


def quantile(q: float, buckets: list[int]) -> float | None:
    """The q-quantile of a histogram of counts per bucket (LATENCY_BUCKETS, then +Inf).

    Interpolates linearly inside the bucket, as PromQL's histogram_quantile()
    does, so `aiod status` and the dashboard agree. None when empty; the top
    finite bound when the quantile falls in +Inf.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(buckets):
        upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else math.inf
        if n and seen + n >= rank:
            if math.isinf(upper):
                return LATENCY_BUCKETS[-1]
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
        if not math.isinf(upper):
            lower = upper
    return LATENCY_BUCKETS[-1]


@dataclass
class _JobTotals:
    """What a job's (pool, op) series add up to."""

    last_completion: dict[str, float] = field(default_factory=dict)
    failed: dict[str, dict[str, int]] = field(default_factory=dict)  # job -> errno name -> n
    ops: dict[str, dict[str, int]] = field(default_factory=dict)


def _job_totals(pools: list[PoolSnapshot]) -> _JobTotals:
    t = _JobTotals()
    for p in pools:
        for st in p.stats:
            if st.last_completion is not None:
                t.last_completion[st.job] = max(t.last_completion.get(st.job, 0.0),
                                                st.last_completion)
            f = t.failed.setdefault(st.job, {})
            for err, n in st.failed.items():
                f[errno_name(err)] = f.get(errno_name(err), 0) + n
            o = t.ops.setdefault(st.job, {"submitted": 0, "completed": 0, "cancelled": 0})
            o["submitted"] += st.submitted
            o["completed"] += st.completed
            o["cancelled"] += st.cancelled
    return t


def _recent_latency(cur: list[int], old: list[int] | None,
                    window: float | None) -> dict[str, object]:
    """A job's latency over the window since the baseline sample, or over its whole
    life when there is no sample yet or its counters restarted."""
    if old is None or len(old) != len(cur) or any(c < o for c, o in zip(cur, old)):
        delta, window = cur, None
    else:
        delta = [c - o for c, o in zip(cur, old)]
    return {"window_seconds": window, "ops": sum(delta),
            "p50_seconds": quantile(0.5, delta), "p99_seconds": quantile(0.99, delta)}


def _job_doc(j: JobView, info: DaemonInfo, t: _JobTotals, latency: dict[str, object],
             now: float) -> dict[str, object]:
    last = t.last_completion.get(j.name)
    failed = t.failed.get(j.name, {})
    return {
        "name": j.name, "pool": j.pool, "state": j.state,
        **info.job_kinds.get(j.name, {}),
        "seconds_since_last_completion": None if last is None else max(0.0, now - last),
        "latency": latency,
        "ops": {**t.ops.get(j.name, {"submitted": 0, "completed": 0, "cancelled": 0}),
                "failed": sum(failed.values())},
        "failed_by_errno": dict(sorted(failed.items())),
        "errors": dict(sorted(j.errors.items())),
        "op_timeouts": j.timeouts,
        "skipped_ops": j.skipped,
    }


def _pool_doc(p: PoolSnapshot, now: float) -> dict[str, object]:
    return {
        "name": p.name, "state": p.state, "nr_events": p.nr_events,
        "contexts_by_state": {k: v for k, v in p.contexts_by_state().items()},
        "in_flight": p.in_flight,
        "oldest_in_flight_seconds": p.oldest_in_flight_seconds,
        "totals": p.totals(),
        "destroy_failures": p.destroy_failures,
        "contexts": [{
            "index": r.index, "kernel_id": r.kernel_id, "state": r.state.value,
            "age_seconds": max(0.0, (r.destroyed_at or now) - r.created_at),
            "submitted": r.submitted, "completed": r.completed,
            "cancelled": r.cancelled, "failed": r.failed, "in_flight": r.in_flight,
            "last_error": r.last_error,
        } for r in p.records],
    }


def build(source: StatusSource, recent: RecentLatency,
          wall: Callable[[], float]) -> dict[str, object]:
    """The /status document."""
    pools = source.pool_snapshots()
    jobs = source.job_views()
    info = source.daemon_info()
    nr, max_nr = source.aio_usage()
    now = wall()
    base_ts, base = recent.baseline(now)
    recent.observe(now, pools)

    hist = _job_histograms(pools)
    totals = _job_totals(pools)
    window = now - base_ts if base_ts is not None else None
    job_docs = [_job_doc(j, info, totals, _recent_latency(hist.get(j.name, []),
                                                          base.get(j.name), window), now)
                for j in jobs]
    pool_docs = [_pool_doc(p, now) for p in pools]
    return {
        "version": __version__,
        "phase": info.phase,
        "serving": info.serving,
        "healthy": info.healthy,
        "now": now,
        "started_at": info.started_at,
        "uptime_seconds": max(0.0, now - info.started_at),
        "config": {
            "source": info.config_source,
            "last_reload": {
                "successful": info.reload_successful,
                "attempted_at": info.reload_attempted_at,
                "succeeded_at": info.reload_success_at,
                "error": info.reload_error,
            },
        },
        "aio": {"nr": nr, "max_nr": max_nr,
                "used_ratio": (nr / max_nr) if max_nr else None},
        "pools": pool_docs,
        "jobs": job_docs,
    }


# ------------------------------------------------------------------ the client
class Unreachable(Exception):
    """Nothing answered at the status URL (refused, timed out, no route, bad host)."""


class BadAnswer(Exception):
    """Something answered, but not with an aiod /status document."""


def status_url(url: str | None, host: str, port: int) -> str:
    """--url as given (a bare base gets /status), else the config's metrics.listen."""
    if url:
        if "://" not in url:
            url = "http://" + url
        scheme, _, rest = url.partition("://")
        base, slash, path = rest.partition("/")
        return f"{scheme}://{base}/{path}" if slash and path else f"{scheme}://{base}/status"
    # a daemon listening on every address is reached on loopback
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


def fetch(url: str, timeout: float) -> dict[str, Any]:
    import json
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        raise BadAnswer(f"{url} answered HTTP {e.code} {e.reason}: not an aiod that serves "
                        f"/status (aiod older than this client, or another program)") from None
    except urllib.error.URLError as e:
        reason = e.reason
        what = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise Unreachable(f"no aiod answering at {url}: {what}") from None
    except TimeoutError:
        raise Unreachable(f"no aiod answering at {url}: no answer within {timeout:g}s") from None
    except (ConnectionError, OSError) as e:
        raise Unreachable(f"no aiod answering at {url}: {e.strerror or e}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise BadAnswer(f"{url} answered, but not with JSON: not an aiod /status") from None
    if not isinstance(doc, dict) or "phase" not in doc or "pools" not in doc:
        raise BadAnswer(f"{url} answered JSON that is not an aiod /status document")
    return doc


def _dur(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = float(seconds)
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 120:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(doc: dict[str, Any]) -> str:
    """The human-readable form of a /status document."""
    import time as _time
    g = doc.get
    lines: list[str] = []
    cfg = g("config") or {}
    reload = cfg.get("last_reload") or {}
    now = float(g("now") or 0.0)
    lines.append(f"aiod {g('version')}: {g('phase')}"
                 f"{'' if g('healthy') else ' (I/O loop stalled)'}, up {_dur(g('uptime_seconds'))}")
    when = reload.get("attempted_at") or 0.0
    stamp = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(when)) if when else "-"
    result = "ok" if reload.get("successful") else f"FAILED: {reload.get('error')}"
    lines.append(f"config: {cfg.get('source')}; last load {result} at {stamp} "
                 f"({_dur(now - when) if when else '-'} ago)")
    aio = g("aio") or {}
    ratio = aio.get("used_ratio")
    lines.append(f"fs.aio-nr {aio.get('nr')} of fs.aio-max-nr {aio.get('max_nr')}"
                 + (f" ({ratio * 100:.1f}% used)" if isinstance(ratio, (int, float)) else ""))
    for p in g("pools") or []:
        by_state = ", ".join(f"{k} {v}" for k, v in p["contexts_by_state"].items() if v)
        t = p["totals"]
        lines.append("")
        lines.append(f"pool {p['name']} ({p['state']}, nr_events {p['nr_events']}): "
                     f"contexts {by_state or 'none'}; {p['in_flight']} in flight, oldest "
                     f"{_dur(p['oldest_in_flight_seconds']) if p['in_flight'] else '-'}")
        lines.append(f"  submitted {t['submitted']} = completed {t['completed']} + cancelled "
                     f"{t['cancelled']} + failed {t['failed']} + in flight {t['in_flight']}")
        rows = [["CTX", "KERNEL-ID", "STATE", "AGE", "SUBMITTED", "COMPLETED", "CANCELLED",
                 "FAILED", "IN-FLIGHT", "LAST-ERROR"]]
        for c in p["contexts"]:
            rows.append([str(c["index"]), hex(c["kernel_id"]), c["state"],
                         _dur(c["age_seconds"]), str(c["submitted"]), str(c["completed"]),
                         str(c["cancelled"]), str(c["failed"]), str(c["in_flight"]),
                         c["last_error"] or "-"])
        lines.extend(_table(rows))
    jobs = g("jobs") or []
    if jobs:
        lines.append("")
        rows = [["JOB", "POOL", "TYPE", "STATE", "LAST-DONE", "P50", "P99", "WINDOW", "FAILED",
                 "ERRORS", "TIMEOUTS"]]
        for j in jobs:
            lat = j["latency"]
            win = lat["window_seconds"]
            failed = ", ".join(f"{k} {v}" for k, v in j["failed_by_errno"].items()) or "0"
            errors = ", ".join(f"{k} {v}" for k, v in j["errors"].items()) or "0"
            since = j["seconds_since_last_completion"]
            rows.append([j["name"], j["pool"], str(j.get("type", "-")), j["state"],
                         f"{_dur(since)} ago" if since is not None else "never",
                         _dur(lat["p50_seconds"]), _dur(lat["p99_seconds"]),
                         _dur(win) if win is not None else "lifetime", failed, errors,
                         str(j["op_timeouts"])])
        lines.extend(_table(rows, indent=""))
    return "\n".join(lines) + "\n"
