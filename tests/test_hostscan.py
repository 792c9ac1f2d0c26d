"""Who holds the host's AIO events: the ring formula against the kernel, the scan
against real processes holding known contexts, and `aiod aio-usage`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiod import aio, hostscan
from tests.daemon_harness import AIOD, ROOT

CPUS = hostscan.possible_cpus()


def own_ring(ctx_id: int) -> hostscan.Ring:
    with open("/proc/self/maps", "rb") as f:
        (ring,) = [r for r in hostscan.parse_rings(f.read()) if r.start == ctx_id]
    return ring


# ------------------------------------------------------- the kernel's facts
@pytest.mark.parametrize("n", [1, 2, 4 * CPUS, 4 * CPUS + 1, 62, 63, 64, 126, 127, 128,
                               190, 191, 500, 1000, 1022, 1023, 1024, 4096, 12345])
def test_ring_size_follows_the_formula_and_bounds_hold(n: int) -> None:
    ctx = aio.io_setup(n)
    try:
        ring = own_ring(ctx)
    finally:
        aio.io_destroy(ctx)
    pages = ring.size // hostscan.PAGE
    assert pages == hostscan.ring_pages(n, CPUS)
    lo, hi = hostscan.request_bounds(pages, CPUS)
    assert lo <= n <= hi, (n, pages, lo, hi)


def test_bounds_are_tight_at_every_page_boundary() -> None:
    """For rings of 1 to 20 pages, the bounds' ends and the n just past them:
    hi still fits P pages and hi + 1 needs P + 1; lo needs P pages, lo - 1 fewer."""
    def pages_of(n: int) -> int:
        ctx = aio.io_setup(n)   # each io_setup/io_destroy pair takes tens of ms
        try:
            return own_ring(ctx).size // hostscan.PAGE
        finally:
            aio.io_destroy(ctx)

    for pages in range(1, 21):
        lo, hi = hostscan.request_bounds(pages, CPUS)
        assert pages_of(hi) == pages and pages_of(hi + 1) == pages + 1, pages
        assert pages_of(lo) == pages, pages
        if lo > 1:
            assert pages_of(lo - 1) == pages - 1, pages


def test_io_setup_charges_exactly_n_to_aio_nr() -> None:
    """fs.aio-nr is system-wide and other processes move it, so look for one
    clean reading: +n at setup and back at destroy. A kernel that charged
    anything else (2*max(n, 4*CPUs) on old ones) would never show +n."""
    if hostscan.legacy_charge(Path("/proc/sys/kernel/osrelease").read_text()):
        pytest.skip("kernel older than 4.12 charges 2*max(n, 4*CPUs)")
    for n in (1, 777, 12345):
        seen = []
        for _ in range(100):
            before = aio.system_aio_usage()[0]
            ctx = aio.io_setup(n)
            during = aio.system_aio_usage()[0]
            aio.io_destroy(ctx)
            after = aio.system_aio_usage()[0]
            seen.append((before, during, after))
            if during - before == n and after == before:
                break
        else:
            raise AssertionError(f"io_setup({n}) never charged exactly {n}: {seen[:10]}")


def test_legacy_charge_model() -> None:
    assert hostscan.legacy_charge("4.4.0-210-generic")
    assert hostscan.legacy_charge("3.10.0-1160.el7.x86_64")
    assert not hostscan.legacy_charge("4.19.0")
    assert not hostscan.legacy_charge("6.18.44-fc-v595")
    # 1 page, 2 CPUs: n in 1..62 was charged 2*max(n, 8), so 16..124
    assert hostscan.charge_bounds(1, 2, legacy=True, page=4096) == (16, 124)
    assert hostscan.charge_bounds(1, 2, legacy=False, page=4096) == (1, 62)
    assert hostscan.charge_bounds(3, 2, legacy=False, page=4096) == (127, 190)


def test_possible_cpus_counts_ranges(tmp_path: Path) -> None:
    d = tmp_path / "devices/system/cpu"
    d.mkdir(parents=True)
    (d / "possible").write_text("0-3,8-11,15\n")
    assert hostscan.possible_cpus(tmp_path) == 9


# ---------------------------------------------------- real processes, real scan
class Holder:
    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.aio_holder", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"holder {args} died: {self.proc.wait()}"
        info = json.loads(line)
        self.pid: int = info["pid"]
        self.child: int = info["child"]
        self.ids: list[int] = info["ids"]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.stdout.close()
        assert self.proc.wait(30) == 0


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.close()


def by_pid(s: hostscan.HostScan) -> dict[int, hostscan.Holder]:
    return {h.pid: h for h in s.processes}


def query_supported() -> bool:
    q = hostscan.Querier()
    with open("/proc/self/maps", "rb") as f:
        return q.rings(f.fileno()) is not None


# Both ways of reading a process's mappings: PROCMAP_QUERY (Linux 6.11+) and the text.
WAYS = [pytest.param(True, id="procmap_query", marks=pytest.mark.skipif(
    not query_supported(), reason="no PROCMAP_QUERY on this kernel")),
        pytest.param(False, id="maps_text")]


@pytest.mark.parametrize("use_query", WAYS)
def test_processes_are_attributed_within_their_bounds(holders: list[Holder],
                                                      use_query: bool) -> None:
    sizes = [1, 63, 128, 1000, 4096]
    for n in sizes:
        holders.append(Holder(str(n)))
    many = Holder(*["1"] * 40)          # many small contexts in one process
    mixed = Holder("8", "300", "2000")
    holders += [many, mixed]
    s = hostscan.scan(use_query=use_query)
    found = by_pid(s)
    for h, n in zip(holders, sizes):
        got = found[h.pid]
        assert got.rings == 1 and got.comm.startswith("python")
        assert got.events_lo <= n <= got.events_hi, (n, got)
        assert got.bytes == hostscan.ring_pages(n, CPUS) * hostscan.PAGE
    m = found[many.pid]
    assert m.rings == 40 and m.events_lo <= 40 <= m.events_hi
    x = found[mixed.pid]
    assert x.rings == 3 and x.events_lo <= 2308 <= x.events_hi
    # largest first
    his = [h.events_hi for h in s.processes]
    assert his == sorted(his, reverse=True)
    assert s.unattributed_lo <= s.unattributed_hi


@pytest.mark.parametrize("use_query", WAYS)
def test_forked_child_is_not_counted_twice(holders: list[Holder], use_query: bool) -> None:
    h = Holder("128", "500", "--fork")
    holders.append(h)
    # The fact the dedup rests on: the child maps the same rings (same device, inode).
    parent = {r.key for r in hostscan.parse_rings(Path(f"/proc/{h.pid}/maps").read_bytes())}
    child = {r.key for r in hostscan.parse_rings(Path(f"/proc/{h.child}/maps").read_bytes())}
    assert len(parent) == 2 and child == parent
    found = by_pid(hostscan.scan(use_query=use_query))
    assert h.child not in found
    got = found[h.pid]
    assert got.rings == 2 and got.events_lo <= 628 <= got.events_hi


def test_a_process_exiting_mid_scan_does_not_break_it(holders: list[Holder]) -> None:
    """Children come and go as fast as they can while scans run."""
    h = Holder("256")
    holders.append(h)
    stop = threading.Event()
    use_query = query_supported()

    def churn() -> None:
        while not stop.is_set():
            subprocess.run(["true"])

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            s = hostscan.scan(use_query=use_query and i % 2 == 0)
            assert by_pid(s)[h.pid].rings == 1
    finally:
        stop.set()
        for t in threads:
            t.join()


# --------------------------------------------------------- a fixture /proc tree
def fake_proc(tmp: Path, procs: dict[int, dict[str, Any]], aio_nr: int = 700,
              osrelease: str = "6.1.0", hidepid: str | None = None) -> tuple[Path, Path]:
    proc, sysr = tmp / "proc", tmp / "sys"
    (proc / "sys/fs").mkdir(parents=True)
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/fs/aio-nr").write_text(f"{aio_nr}\n")
    (proc / "sys/fs/aio-max-nr").write_text("65536\n")
    (proc / "sys/kernel/osrelease").write_text(osrelease + "\n")
    (sysr / "devices/system/cpu").mkdir(parents=True)
    (sysr / "devices/system/cpu/possible").write_text("0-1\n")
    (proc / "self").mkdir()
    opts = "rw" + (f",hidepid={hidepid}" if hidepid else "")
    (proc / "self/mountinfo").write_text(
        f"22 1 0:5 / {os.path.realpath(proc)} rw,nosuid - proc proc {opts}\n")
    for pid, p in procs.items():
        d = proc / str(pid)
        d.mkdir()
        if "maps" in p:
            lines = []
            for i, (pages, inode) in enumerate(p["maps"]):
                start = 0x7f0000000000 + i * 0x100000
                lines.append(f"{start:x}-{start + pages * 4096:x} rw-s 00000000 00:10 "
                             f"{inode}                      /[aio] (deleted)")
            lines.insert(0, "55d0c0000000-55d0c0001000 r--p 00000000 08:01 1234  /usr/bin/x")
            (d / "maps").write_text("\n".join(lines) + "\n")
        (d / "comm").write_text(p.get("comm", "x") + "\n")
        (d / "cgroup").write_text(p.get("cgroup", "0::/system.slice/x.service") + "\n")
        (d / "stat").write_text(f"{pid} ({p.get('comm', 'x')}) S 1 " + " ".join(
            ["0"] * 15) + f" {p.get('start', 100)} 0 0\n")
    return proc, sysr


@pytest.mark.skipif(hostscan.PAGE != 4096, reason="the fixture tree is written for 4 KiB pages")
def test_scan_of_a_fixture_tree(tmp_path: Path) -> None:
    proc, sysr = fake_proc(tmp_path, {
        10: {"comm": "mysqld", "cgroup": "0::/system.slice/mysql.service",
             "maps": [(17, 1), (17, 2)], "start": 50},
        11: {"comm": "mysqld", "cgroup": "0::/system.slice/mysql.service",
             "maps": [(17, 1), (17, 2)], "start": 60},            # its forked child
        20: {"comm": "qemu", "maps": [(1, 3)],
             "cgroup": "0::/machine.slice/machine-vm1.scope/payload"},
        30: {"comm": "bash", "cgroup": "0::/user.slice/user-1000.slice/session-2.scope"},
        40: {"comm": "gone"},                                       # exited: no maps
    })
    s = hostscan.scan(proc, sysr)
    assert [(h.pid, h.comm, h.unit, h.rings) for h in s.processes] == [
        (10, "mysqld", "mysql.service", 2), (20, "qemu", "machine-vm1.scope", 1)]
    mysql = s.processes[0]
    assert (mysql.events_lo, mysql.events_hi, mysql.bytes) == (2 * 1023, 2 * 1086, 34 * 4096)
    assert (s.processes[1].events_lo, s.processes[1].events_hi) == (1, 62)
    # 700 charged; attributed 2047..2234 is more than that: nothing unattributed
    assert (s.unattributed_lo, s.unattributed_hi) == (0, 0)
    assert s.unreadable == 0 and s.hidepid is None
    out = s.as_json()
    assert set(out) == {"aio_nr", "aio_max_nr", "unattributed_lo", "unattributed_hi",
                        "unreadable", "processes"}
    assert set(out["processes"][0]) == {"pid", "comm", "unit", "rings", "bytes",  # type: ignore[index]
                                        "events_lo", "events_hi"}


@pytest.mark.skipif(hostscan.PAGE != 4096, reason="the fixture tree is written for 4 KiB pages")
def test_fixture_tree_unattributed_hidden_and_legacy(tmp_path: Path) -> None:
    proc, sysr = fake_proc(tmp_path, {5: {"comm": "db", "maps": [(3, 7)]}}, aio_nr=1000,
                           osrelease="4.4.0-210-generic", hidepid="invisible")
    s = hostscan.scan(proc, sysr)
    (h,) = s.processes
    assert (h.events_lo, h.events_hi) == (254, 380)  # 2 * 127 .. 2 * 190
    assert (s.unattributed_lo, s.unattributed_hi) == (620, 746)
    assert s.hidepid == "invisible"
    lines = hostscan.why_incomplete(s, ptrace=False)
    assert len(lines) == 1 and "hidepid=invisible" in lines[0]


def test_unit_of_cgroup_lines() -> None:
    assert hostscan.unit_of("0::/system.slice/mysql.service") == "mysql.service"
    assert hostscan.unit_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
                            "app-foo.scope") == "app-foo.scope"
    assert hostscan.unit_of("0::/") is None
    assert hostscan.unit_of("12:pids:/x\n1:name=systemd:/system.slice/cron.service\n") \
        == "cron.service"


# ------------------------------------------------------------- aiod aio-usage
def aiod(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = AIOD + list(args)
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd="/")


def test_both_ways_see_the_same_rings(holders: list[Holder]) -> None:
    if not query_supported():
        pytest.skip("no PROCMAP_QUERY on this kernel")
    for n in ("1", "200", "3000"):
        holders.append(Holder(n, n, "--fork"))
    pids = {h.pid for h in holders}

    def mine(use_query: bool) -> list[tuple[int, int, int, int, int]]:
        return sorted((h.pid, h.rings, h.bytes, h.events_lo, h.events_hi)
                      for h in hostscan.scan(use_query=use_query).processes if h.pid in pids)
    assert mine(True) == mine(False) and len(mine(True)) == 3


def test_aio_usage_table_and_json(holders: list[Holder]) -> None:
    h = Holder("1000", "1000")
    holders.append(h)
    r = aiod("aio-usage")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["PID", "COMMAND", "UNIT", "RINGS", "BYTES", "EVENTS"]
    (row,) = [ln for ln in lines if ln.split()[0] == str(h.pid)]
    assert row.split()[3] == "2" and row.split()[-1] == "1918..2044"
    assert lines[-1].startswith("fs.aio-nr ") and "fs.aio-max-nr" in lines[-1] \
        and "unattributed" in lines[-1] and "unreadable" in lines[-1]
    r = aiod("aio-usage", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"aio_nr", "aio_max_nr", "unattributed_lo", "unattributed_hi",
                         "unreadable", "processes"}
    (p,) = [p for p in data["processes"] if p["pid"] == h.pid]
    assert set(p) == {"pid", "comm", "unit", "rings", "bytes", "events_lo", "events_hi"}
    assert (p["rings"], p["events_lo"], p["events_hi"]) == (2, 1918, 2044)
    assert isinstance(data["unreadable"], int)


def test_aio_usage_as_non_root_says_what_it_could_not_read(holders: list[Holder]) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user")
    h = Holder("64")             # root's: nobody cannot read its maps
    holders.append(h)
    r = aiod("aio-usage", "--json", user=65534)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    data = json.loads(r.stdout)
    assert data["unreadable"] >= 1
    assert h.pid not in [p["pid"] for p in data["processes"]]
    assert data["unattributed_hi"] >= 64
    (line,) = [ln for ln in r.stderr.splitlines() if "could not read" in ln]
    assert "run it as root" in line
    r = aiod("aio-usage", user=65534)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "unreadable" in r.stdout.splitlines()[-1]


def test_scan_deadline_stops_early(tmp_path: Path) -> None:
    proc, sysr = fake_proc(tmp_path, {i: {"comm": "x", "maps": []} for i in range(100, 200)})
    ticks = iter(range(10**6))      # the clock reads 0 at the start, then 1, 2, 3 ...
    s = hostscan.scan(proc, sysr, deadline=2.5, clock=lambda: float(next(ticks)))
    # the clock is read every 32 processes: at 0 (1), 32 (2), 64 (3 > 2.5: stop)
    assert (s.scanned, s.unscanned) == (64, 36)
