"""aiod's Debian package on a real systemd, and the install recipes of deploy/install.md.

- A fresh bookworm server (systemd, no Python) gets a serving aiod from
  `apt-get install ./aiod_*.deb` alone: dependencies from Debian, the unit
  enabled and started, the compat drop-in because systemd is 252 (decided
  again whenever the systemd package changes); and `apt-get purge aiod`
  leaves nothing of aiod behind.
- On trixie (systemd 257) there is no drop-in: Type=notify-reload.
- A probe outside the state directory fails under the sandbox until the
  unit gets ReadWritePaths=, as install.md explains.
- The wheel route for other distributions works on a fresh server without
  a bare pip, and `pip check` passes on bookworm's own libraries.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import nspawn, packages
from tests.system.support import (
    REPO,
    AiodService,
    aiod_yaml,
    ensure_tools,
    metric_sum,
    parse_metrics,
    wait_for,
)

pytestmark = pytest.mark.system

COMPAT = "/etc/systemd/system/aiod.service.d/systemd252-compat.conf"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y"
SHIPPED_URL = "http://127.0.0.1:9740"  # metrics.listen in config/aiod.yaml


def curl(c: nspawn.Container, url: str) -> tuple[int, str]:
    """(HTTP status, body) of ``url`` fetched inside the container; status 0: no answer."""
    r = c.sh(f"curl -s -o /tmp/body -w '%{{http_code}}' {url}; cat /tmp/body", timeout=30)
    status, body = r.stdout[:3], r.stdout[3:]
    return (int(status) if status.isdigit() else 0), body


def completed(c: nspawn.Container, job: str) -> float:
    status, body = curl(c, f"{SHIPPED_URL}/metrics")
    return metric_sum(parse_metrics(body), "aiod_ops_completed_total", job=job) if status == 200 \
        else 0.0


@pytest.fixture(scope="module")
def fresh(aiod_deb: Path) -> Iterator[tuple[nspawn.Container, str]]:
    """A fresh bookworm server after `apt-get install ./aiod_*.deb` and nothing else.

    Its own network namespace: the shipped config's 127.0.0.1:9740 is the
    container's, and apt has only the cache (no network) to take from.
    Yields the container and whether python3 was there before the install.
    """
    with nspawn.booted("bookworm", private_network=True) as c:
        had_python = c.sh("command -v python3").returncode == 0
        c.put(aiod_deb, "/root")
        r = c.sh(f"cd /root && {APT} install ./{aiod_deb.name}", timeout=600)
        assert r.returncode == 0, f"apt-get install failed:\n{r.stdout[-3000:]}\n{r.stderr}"
        yield c, "python3 was installed before" if had_python else ""


def test_fresh_bookworm_serves_after_apt_get_install_alone(
        fresh: tuple[nspawn.Container, str]) -> None:
    c, had_python = fresh
    assert not had_python, "the rootfs is not a fresh server: the test would prove less"
    # enabled the Debian way (deb-systemd-helper) and started by the package
    assert c.sh("systemctl is-enabled aiod").stdout.strip() == "enabled"
    p = c.show("aiod", "ActiveState", "SubState", "ExecMainPID", "FragmentPath")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    assert p["FragmentPath"] in ("/lib/systemd/system/aiod.service",
                                 "/usr/lib/systemd/system/aiod.service"), p
    cmdline = c.read_file(f"/proc/{p['ExecMainPID']}/cmdline").split("\0")
    assert "/usr/bin/aiod" in cmdline and "/etc/aiod/aiod.yaml" in cmdline, cmdline
    assert curl(c, f"{SHIPPED_URL}/readyz")[0] == 200
    # the shipped config's probe runs: completions rise, nothing fails
    first = wait_for("state-latency completions", lambda: completed(c, "state-latency"), 30)
    wait_for("state-latency completions to rise",
             lambda: completed(c, "state-latency") > first, 30)
    status, body = curl(c, f"{SHIPPED_URL}/metrics")
    samples = parse_metrics(body)
    assert metric_sum(samples, "aiod_ops_failed_total") == 0
    assert metric_sum(samples, "aiod_build_info", version=packages.version()) == 1
    # on the minimums: what bookworm ships, which pyproject.toml and the
    # package's Depends name
    versions = c.sh("dpkg-query -W -f='${Package} ${Version}\\n' python3-prometheus-client "
                    "python3-yaml python3-systemd", check=True).stdout
    got = dict(line.split() for line in versions.splitlines())
    assert got["python3-prometheus-client"].startswith("0.16."), got
    assert got["python3-yaml"].startswith("6.0"), got
    assert got["python3-systemd"].startswith("235"), got


def test_bookworm_gets_the_compat_dropin_and_the_shipped_files(
        fresh: tuple[nspawn.Container, str]) -> None:
    c, _ = fresh
    assert c.sh("systemctl --version", check=True).stdout.startswith("systemd 252")
    p = c.show("aiod", "Type", "DropInPaths")
    assert p["Type"] == "notify", p
    assert p["DropInPaths"].split() == [COMPAT], p
    conffiles = c.sh("dpkg-query -W -f='${Conffiles}' aiod", check=True).stdout.split()
    assert "/etc/aiod/aiod.yaml" in conffiles and "/etc/sysctl.d/60-aiod.conf" in conffiles
    assert c.sh("test -s /usr/share/man/man8/aiod.8.gz").returncode == 0
    assert c.read_file("/etc/aiod/aiod.yaml") == (REPO / "config/aiod.yaml").read_text()
    assert c.sh("aiod check-config /etc/aiod/aiod.yaml").returncode == 0
    # the sysctl example is all comments: the package changed no kernel setting
    active = [ln for ln in c.read_file("/etc/sysctl.d/60-aiod.conf").splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    assert active == []


def test_the_compat_dropin_is_decided_again_when_systemd_changes(
        fresh: tuple[nspawn.Container, str]) -> None:
    # An upgrade of the systemd package fires aiod's file trigger; the
    # postinst then decides on the drop-in for the systemd now installed.
    # Here systemd stays 252, so a lost drop-in comes back.
    c, _ = fresh
    c.sh(f"rm {COMPAT} && systemctl daemon-reload", check=True)
    assert c.show("aiod", "DropInPaths")["DropInPaths"] == ""
    r = c.sh("dpkg-trigger --no-await /lib/systemd/systemd && dpkg --triggers-only --pending",
             timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.sh(f"test -L {COMPAT}").returncode == 0, "the trigger did not restore the drop-in"
    assert c.show("aiod", "DropInPaths")["DropInPaths"] == COMPAT  # and systemd has seen it
    assert c.show("aiod", "ActiveState")["ActiveState"] == "active"


def test_metrics_on_bookworms_prometheus_client_are_lint_clean(
        fresh: tuple[nspawn.Container, str]) -> None:
    reason = ensure_tools({"promtool": "prometheus"})
    if reason:
        pytest.skip(f"no promtool: {reason}")
    c, _ = fresh
    status, body = curl(c, f"{SHIPPED_URL}/metrics")
    assert status == 200
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                          text=True, timeout=60)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), lint.stdout + lint.stderr


def test_purge_removes_everything_the_package_created(
        fresh: tuple[nspawn.Container, str]) -> None:
    c, _ = fresh
    # what there is to remove: the state directory aiod.service made, the
    # enablement link, the compat drop-in, the conffiles
    for path in ("/var/lib/private/aiod/probe.dat", "/etc/aiod/aiod.yaml", COMPAT,
                 "/etc/systemd/system/multi-user.target.wants/aiod.service"):
        assert c.sh(f"test -e {path}").returncode == 0, f"{path} missing before the purge"
    pid = c.show("aiod", "MainPID")["MainPID"]
    r = c.sh(f"{APT} purge aiod", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.sh(f"test -d /proc/{pid}").returncode != 0, "aiod still runs after the purge"
    assert c.sh("systemctl list-unit-files aiod.service --no-legend").stdout.strip() == ""
    left = c.sh("find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run "
                "-o -path /var/log \\) -prune -o -name '*aiod*' -print", timeout=120).stdout
    assert [p for p in left.split() if not p.startswith("/root/aiod_")] == []


def test_no_compat_dropin_on_systemd_257(container: nspawn.Container) -> None:
    assert container.sh("systemctl --version", check=True).stdout.startswith("systemd 257")
    p = container.show("aiod", "Type", "DropInPaths", "UnitFileState")
    assert p == {"Type": "notify-reload", "DropInPaths": "", "UnitFileState": "enabled"}, p
    assert container.sh("test -e /etc/systemd/system/aiod.service.d").returncode != 0


PROBE_DIRS = ("/srv/aiod-probe", "/home/aiod-probe")
# deploy/install.md, "Probes outside /var/lib/aiod"
PROBE_DROPIN = ("[Service]\n"
                "ReadWritePaths=/srv/aiod-probe /home/aiod-probe\n"
                "ProtectHome=read-only\n")


def outside_jobs() -> str:
    return "".join(
        f"  - {{name: {Path(d).parts[1]}-latency, pool: default, type: probe, "
        f"target: {d}/probe.dat, size: 16MiB, op: randread, rate: 50/s, timeout: 5s}}\n"
        for d in PROBE_DIRS)


def test_probe_outside_the_state_directory_needs_readwritepaths(
        container: nspawn.Container, metrics_port: int) -> None:
    svc = AiodService(container, metrics_port)
    dropin = "/etc/systemd/system/aiod.service.d/probe-paths.conf"
    jobs = [f"{Path(d).parts[1]}-latency" for d in PROBE_DIRS]
    try:
        for d in PROBE_DIRS:  # as install.md says: a directory for the service's group disk
            container.sh(f"install -d -g disk -m 2770 {d}", check=True)
        svc.write_config(aiod_yaml(metrics_port, extra=outside_jobs()))

        # the unit as shipped: /srv is read-only to aiod, /home hidden
        assert svc.systemctl("start", timeout=60).returncode == 0
        for job in jobs:
            wait_for(f"a counted error for {job}", lambda: metric_sum(
                svc.scrape(), "aiod_job_errors_total", job=job) > 0, 30)
        assert metric_sum(svc.scrape(), "aiod_ops_completed_total", job="srv-latency") == 0
        assert svc.systemctl("stop").returncode == 0

        # with the drop-in: both probes create their file and run
        container.write_file(dropin, PROBE_DROPIN)
        container.sh("systemctl daemon-reload", check=True)
        assert svc.systemctl("start", timeout=60).returncode == 0
        for job in jobs:
            wait_for(f"completions of {job}", lambda: metric_sum(
                svc.scrape(), "aiod_ops_completed_total", job=job) >= 5, 30)
            assert metric_sum(svc.scrape(), "aiod_job_errors_total", job=job) == 0
        for d in PROBE_DIRS:
            assert container.sh(f"stat -c %G {d}/probe.dat", check=True).stdout.strip() == "disk"
        # the rest of the sandbox is unchanged
        p = container.show("aiod", "ProtectSystem", "DynamicUser")
        assert p == {"ProtectSystem": "strict", "DynamicUser": "yes"}, p
    finally:
        print(container.sh("journalctl -u aiod -n 30 --no-pager").stdout)
        svc.systemctl("stop", timeout=90)
        container.sh(f"rm -f {dropin}; rmdir /etc/systemd/system/aiod.service.d; "
                     f"systemctl daemon-reload; rm -rf {' '.join(PROBE_DIRS)}")
        svc.write_config(aiod_yaml(metrics_port))
        container.sh("systemctl reset-failed aiod")


@pytest.fixture(scope="module")
def wheel(container_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packages.build_wheel(tmp_path_factory.mktemp("wheel"), sys.executable)


def test_wheel_route_works_on_a_fresh_server_without_pip(wheel: Path) -> None:
    """deploy/install.md's steps for a host without the package, on fresh bookworm."""
    with nspawn.booted("bookworm", private_network=True) as c:
        assert c.sh("command -v pip pip3 python3").returncode != 0, "not a fresh server"
        whl = c.put(wheel, "/root")
        unit = c.put(REPO / "systemd" / "aiod.service", "/root")
        compat = c.put(REPO / "systemd" / "aiod.service.d-systemd252" / "compat.conf", "/root")
        config = c.put(REPO / "config" / "aiod.yaml", "/root")
        steps = [
            f"{APT} install python3-venv python3-systemd python3-prometheus-client python3-yaml",
            "python3 -m venv --system-site-packages /opt/aiod",
            f"/opt/aiod/bin/pip install --no-index --no-deps {whl}",
            # bookworm's prometheus-client 0.16 used to fail this (aiod asked for 0.17)
            "/opt/aiod/bin/pip check",
            "/opt/aiod/bin/aiod --version",
            f"install -D -m 0644 {config} /etc/aiod/aiod.yaml",
            "/opt/aiod/bin/aiod check-config /etc/aiod/aiod.yaml",
            f"install -m 0644 {unit} /etc/systemd/system/aiod.service",
            "install -d /etc/systemd/system/aiod.service.d",
            "printf '[Service]\\nExecStart=\\nExecStart=/opt/aiod/bin/aiod run --config "
            "/etc/aiod/aiod.yaml\\n' > /etc/systemd/system/aiod.service.d/venv.conf",
            f"install -m 0644 {compat} /etc/systemd/system/aiod.service.d/compat.conf",
            "systemctl daemon-reload",
            "systemctl enable --now aiod",
        ]
        for step in steps:
            r = c.sh(step, timeout=600)
            assert r.returncode == 0, f"{step!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n" \
                                      f"{r.stderr[-2000:]}"
        p = c.show("aiod", "ActiveState", "Type", "ExecMainPID")
        assert (p["ActiveState"], p["Type"]) == ("active", "notify"), p
        assert "/opt/aiod/bin/aiod" in c.read_file(f"/proc/{p['ExecMainPID']}/cmdline")
        assert curl(c, f"{SHIPPED_URL}/readyz")[0] == 200
        wait_for("state-latency completions", lambda: completed(c, "state-latency"), 30)
        assert c.sh("systemctl stop aiod", timeout=90).returncode == 0
        assert c.show("aiod", "Result")["Result"] == "success"


def test_test_setup_installs_prometheus_without_starting_or_enabling_it(
        container_tools: None) -> None:
    """`make test` needs Prometheus's programs, not a Prometheus server on :9090.

    deploy/debian-deps.sh --test on a systemd host (a bookworm container,
    on the host's network for the Debian mirror): the packages arrive, and
    no service of theirs runs or is enabled.
    """
    with nspawn.booted("bookworm") as c:
        script = c.put(REPO / "deploy" / "debian-deps.sh", "/root")
        r = c.sh(f"sh {script} --test", timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert c.sh("command -v prometheus && command -v promtool").returncode == 0
        p = c.show("prometheus", "UnitFileState", "ActiveState")
        assert p == {"UnitFileState": "disabled", "ActiveState": "inactive"}, p
        assert c.sh("pgrep -x prometheus").returncode != 0, "a Prometheus server runs"
        # the policy-rc.d was only for the install
        assert c.sh("test -e /usr/sbin/policy-rc.d").returncode != 0
        # and a second run, with everything there, changes nothing
        assert c.sh(f"sh {script} --test", timeout=300).returncode == 0
        assert c.show("prometheus", "UnitFileState")["UnitFileState"] == "disabled"
