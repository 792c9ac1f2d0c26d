"""Run `aiod run` as a subprocess and talk to it the way systemd and Prometheus do."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

AIOD = [sys.executable, "-m", "aiod.cli"]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """A NOTIFY_SOCKET of the test's own: receives sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def collect(self, timeout: float = 0.0) -> list[str]:
        self.sock.settimeout(timeout if timeout > 0 else 0.001)
        try:
            while True:
                data = self.sock.recv(65536).decode()
                self.messages.append(data)
                self.sock.settimeout(0.001)
        except (TimeoutError, BlockingIOError):
            pass
        return self.messages

    def wait_for(self, needle: str, timeout: float = 15.0, start: int = 0) -> int:
        """Index of the first message (from start) holding needle as a line."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.messages[start:], start):
                if needle in m.split("\n"):
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} in {self.messages}")
            self.collect(min(left, 0.2))

    def close(self) -> None:
        self.sock.close()


class Aiod:
    """One aiod daemon under test."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 notify: bool = True) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.state.mkdir(exist_ok=True)
        self.port = free_port()
        config.setdefault("state_directory", str(self.state))
        config.setdefault("metrics", {"listen": f"127.0.0.1:{self.port}"})
        self.config = config
        self.config_path = tmp / "aiod.yaml"
        self.write_config(config)
        self.notify = NotifySocket(tmp / "notify.sock") if notify else None
        self.stderr_path = tmp / "aiod.stderr"
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        full_env["PYTHONPATH"] = str(ROOT)
        if self.notify:
            full_env["NOTIFY_SOCKET"] = str(self.notify.path)
        full_env.update(env or {})
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(AIOD + ["run", "--config", str(self.config_path)],
                                     stdout=self._stderr, stderr=self._stderr, env=full_env,
                                     cwd=str(tmp))

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def log(self) -> str:
        return self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.notify is not None
        try:
            self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"aiod never became ready; exit={self.proc.poll()} "
                                 f"log:\n{self.log}") from None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """Samples as {'name{labels}': value}; labels sorted as exposed."""
        code, text = self.get("/metrics")
        assert code == 200
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        total = 0.0
        for key, v in self.metrics().items():
            m = re.fullmatch(r"([a-zA-Z_:]+)(\{.*\})?", key)
            if not m or m.group(1) != name:
                continue
            lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(lab.get(k) == v2 for k, v2 in labels.items()):
                total += v
        return total

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def report(self) -> dict[str, Any]:
        return json.loads((self.state / "shutdown-report.json").read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._stderr.close()
        if self.notify and self.notify.sock.fileno() >= 0:
            self.notify.collect(0.05)  # keep what arrived until exit in .messages
            self.notify.close()
        return rc

    def wait_until(self, predicate: Any, timeout: float = 15.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or predicate}; log:\n{self.log}")
