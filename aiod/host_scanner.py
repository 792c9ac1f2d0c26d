"""The daemon's periodic host scan: started on a worker, polled by the I/O loop, exported.

A host scan (:func:`aiod.hostscan.scan`) reads every process's
/proc/PID/maps, and such a read waits for that process's mmap lock, which a
process stuck in a page fault holds indefinitely. So the scan runs on a
worker thread with a deadline; the loop starts it every interval and polls
for its result, says once (clearly) why a scan sees less than the whole
host, and the latest result is exported as a bounded set of series.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from aiod import hostscan
from aiod.worker import Worker

log = logging.getLogger("aiod.budget")

SCAN_DEADLINE = 10.0       # a host scan stops reading maps files after this long
SCAN_STUCK = 60.0          # a scan still running after this long is reported, once

HIDDEN_HINT = ("install the host-scan drop-in (/usr/share/aiod/host-scan/host-scan.conf from "
               "the Debian package, systemd/aiod.service.d-host-scan/host-scan.conf in the "
               "source) as /etc/systemd/system/aiod.service.d/host-scan.conf and restart aiod")


class HostScanner:
    """Host scans on a worker. tick() runs on the I/O loop; latest() from any thread."""

    def __init__(self, procfs_root: str | os.PathLike[str], sys_root: str | os.PathLike[str],
                 clock: Callable[[], float]) -> None:
        self.procfs_root = procfs_root
        self.sys_root = sys_root
        self.clock = clock
        self._lock = threading.Lock()   # guards what latest() reads
        self._scan: hostscan.HostScan | None = None
        self._worker = Worker("aiod-host-scan")
        self._next_scan = 0.0
        self._said: set[str] = set()    # one-time messages already logged

    @property
    def busy(self) -> bool:
        """A scan is running on the worker."""
        return self._worker.busy

    def latest(self) -> hostscan.HostScan | None:
        with self._lock:
            return self._scan

    def set_latest(self, scan: hostscan.HostScan | None) -> None:
        with self._lock:
            self._scan = scan

    def tick(self, now: float, interval: float) -> None:
        """Take a finished scan's result; start the next one when it is due. Never blocks."""
        done, result, error = self._worker.poll()
        if done:
            if error is not None:
                self._say_once("scan-error", "host scan failed: %s; retrying every %gs",
                               error, interval)
            elif isinstance(result, hostscan.HostScan):
                self.set_latest(result)
                self._explain(result)
        if self._worker.busy:
            if now - self._worker.started_at > SCAN_STUCK:
                self._say_once("scan-stuck", "host scan: still running after %.0fs: reading "
                               "some process's /proc/PID/maps is stuck in the kernel (a process "
                               "hung in a page fault?); no new scan starts until it returns",
                               now - self._worker.started_at)
            return
        if now < self._next_scan:
            return
        proc, sysr, clock = self.procfs_root, self.sys_root, self.clock
        deadline = now + min(SCAN_DEADLINE, interval)
        self._worker.start(lambda: hostscan.scan(proc, sysr, deadline=deadline, clock=clock),
                           now)
        self._next_scan = now + interval

    def _explain(self, s: hostscan.HostScan) -> None:
        """Say once, clearly, why the scan sees less than the whole host."""
        if s.hidepid:
            self._say_once("hidepid", "host scan: /proc is mounted with hidepid=%s (systemd's "
                           "ProtectProc=invisible), so the scan sees only aiod's own "
                           "processes, not the host's; to scan the host, %s",
                           s.hidepid, HIDDEN_HINT)
        if s.unreadable:
            perm = s.errors.get("EACCES", 0) + s.errors.get("EPERM", 0)
            if perm and not hostscan.has_cap_sys_ptrace(self.procfs_root):
                self._say_once("ptrace", "host scan: cannot read /proc/PID/maps of %d "
                               "processes of other users: aiod lacks CAP_SYS_PTRACE, so their "
                               "AIO events count as unattributed; to scan them, %s",
                               perm, HIDDEN_HINT)
            elif perm:
                self._say_once("refused", "host scan: the kernel refused /proc/PID/maps of %d "
                               "processes even with CAP_SYS_PTRACE (another user namespace or "
                               "a security module); their AIO events count as unattributed",
                               perm)
        if s.unscanned:
            self._say_once("deadline", "host scan: stopped after %gs with %d processes not "
                           "scanned; their events count as unattributed", SCAN_DEADLINE,
                           s.unscanned)

    def _say_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(msg, *args)


def host_metrics(scan: hostscan.HostScan, top: int) -> Iterator[Metric]:
    """At most 2 * (top + 1) + 5 series, whatever the host runs: no pid label."""
    groups: dict[tuple[str, str], list[int]] = {}
    for h in scan.processes:
        sums = groups.setdefault((h.comm, h.unit or ""), [0, 0])
        sums[0] += h.events_lo
        sums[1] += h.events_hi
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))
    ev = GaugeMetricFamily("aiod_host_aio_events", "AIO events charged to fs.aio-nr by the "
                           "largest holders on the host, as bounds from their ring sizes; "
                           "the rest summed as comm=\"other\".", labels=["comm", "unit", "bound"])
    for (comm, unit), (lo, hi) in ranked[:top]:
        ev.add_metric([comm, unit, "lo"], lo)
        ev.add_metric([comm, unit, "hi"], hi)
    rest = ranked[top:]
    ev.add_metric(["other", "", "lo"], sum(v[0] for _, v in rest))
    ev.add_metric(["other", "", "hi"], sum(v[1] for _, v in rest))
    yield ev
    un = GaugeMetricFamily("aiod_host_aio_unattributed_events", "Part of fs.aio-nr that no "
                           "scanned process accounts for (hidden or unreadable processes, "
                           "rings being set up), as bounds.", labels=["bound"])
    un.add_metric(["lo"], scan.unattributed_lo)
    un.add_metric(["hi"], scan.unattributed_hi)
    yield un
    g = GaugeMetricFamily("aiod_host_aio_processes", "Processes holding AIO contexts, by the "
                          "last host scan.")
    g.add_metric([], len(scan.processes))
    yield g
    g = GaugeMetricFamily("aiod_host_scan_unreadable_processes", "Processes whose "
                          "/proc/PID/maps the last host scan could not read.")
    g.add_metric([], scan.unreadable)
    yield g
    g = GaugeMetricFamily("aiod_host_scan_duration_seconds", "Wall time of the last host scan.")
    g.add_metric([], scan.seconds)
    yield g
