"""Small helpers the system tests share: tools, ports, bounded waits, scrapes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tests.system.nspawn import Container

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/etc/aiod/aiod.yaml"
STATE = "/var/lib/aiod"
REPORT = f"{STATE}/shutdown-report.json"

_apt_updated = False


def ensure_tools(tools: dict[str, str]) -> str | None:
    """Make each command in ``tools`` (command -> Debian package) available.

    Installs the missing packages with apt-get. Returns None when all are
    there afterwards, else a reason to skip that names what is missing.
    """
    global _apt_updated
    missing = {cmd: pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None}
    if not missing:
        return None
    pkgs = sorted(set(missing.values()))
    if shutil.which("apt-get") is None:
        return f"missing {', '.join(sorted(missing))} and no apt-get to install {' '.join(pkgs)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True,
                           capture_output=True, timeout=300)
            _apt_updated = True
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                       env=env, check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        return (f"cannot install {' '.join(pkgs)} with apt-get: {e}; "
                f"{err.decode(errors='replace').strip()[-300:]}")
    still = sorted(cmd for cmd in missing if shutil.which(cmd) is None)
    if still:
        return f"apt-get installed {' '.join(pkgs)} but {', '.join(still)} still missing"
    return None


# Non-interactive, and a config already in /etc/aiod/aiod.yaml is kept (as
# when configuration management put it there before the package came).
APT_GET = ("DEBIAN_FRONTEND=noninteractive apt-get -q -y "
           "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold")


def install_deb(c: Container, deb: Path) -> subprocess.CompletedProcess[str]:
    """`apt-get install ./aiod_*.deb` in the container, as an operator types it."""
    c.put(deb, "/root")
    return c.sh(f"cd /root && {APT_GET} install ./{deb.name}", timeout=600, check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 0.2) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str] | None:
    """(status, body), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return int(e.code), e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None


Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition as (name, labels, value)."""
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_sum(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


def has_metric(samples: Iterable[Sample], name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def aiod_yaml(port: int, *, contexts: int = 2, nr_events: int = 64, iodepth: int = 8,
              state_directory: str | None = None, extra: str = "") -> str:
    """An aiod config: one pool, a probe job and a load job on 16 MiB files."""
    state = f"state_directory: {state_directory}\n" if state_directory else ""
    return f"""\
log_level: info
{state}metrics: {{listen: "127.0.0.1:{port}"}}
shutdown: {{drain_timeout: 10s, destroy_timeout: 30s}}
pools: [{{name: default, contexts: {contexts}, nr_events: {nr_events}}}]
jobs:
  - {{name: root-latency, pool: default, type: probe, target: probe.dat, size: 16MiB,
     op: randread, block_size: 4KiB, direct: true, rate: 50/s, timeout: 5s}}
  - {{name: load, pool: default, type: load, target: load.dat, size: 16MiB,
     op: randread, block_size: 4KiB, direct: true, iodepth: {iodepth}, timeout: 5s}}
{extra}"""


_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def systemd_seconds(span: str) -> float:
    """A systemd time span as `systemctl show` prints it ("1min 30s", "500ms")."""
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*(us|ms|min|s|h|d)", span):
        total += float(num) * _SPAN_UNITS[unit]
    if total == 0.0 and span.strip() not in ("0", "0s"):
        raise ValueError(f"not a systemd time span: {span!r}")
    return total


@dataclass
class AiodService:
    """aiod running as aiod.service in a booted container."""

    c: Container
    port: int
    unit: str = "aiod"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def scrape(self) -> list[Sample]:
        got = http_get(self.url("/metrics"))
        assert got is not None and got[0] == 200, f"/metrics: {got}"
        return parse_metrics(got[1])

    def scrape_when_up(self, timeout: float = 30) -> list[Sample]:
        def up() -> list[Sample] | None:
            got = http_get(self.url("/metrics"))
            return parse_metrics(got[1]) if got and got[0] == 200 else None
        return wait_for("aiod's /metrics", up, timeout)

    def prop(self, name: str) -> str:
        return self.c.show(self.unit, name)[name]

    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def systemctl(self, verb: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.c.sh(f"systemctl {verb} {self.unit}", timeout=timeout)

    def write_config(self, text: str) -> None:
        self.c.write_file(CONFIG, text)

    def cursor(self) -> str:
        """A journal position; pass it to ``journal`` for what came after."""
        out = self.c.sh("journalctl -n 0 --show-cursor --no-pager", check=True).stdout
        return out.strip().rsplit("-- cursor: ", 1)[-1]

    def journal(self, after: str | None = None, args: str = "") -> list[dict[str, object]]:
        where = f"--after-cursor='{after}'" if after else ""
        return self.c.journal_json(f"-u {self.unit} {where} {args}")
