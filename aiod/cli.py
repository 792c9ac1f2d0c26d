"""The `aiod` command line: run, check-config, aio-usage, bench, smoke."""

from __future__ import annotations

# `aiod run` catches its signals before anything slow (see main), so this
# module imports only what that needs at the top; the rest comes later.
import argparse
import errno
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiod import __version__
from aiod.exit_codes import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from aiod.signals import SignalInbox

if TYPE_CHECKING:
    from aiod.config import Config

EPILOG = """\
exit codes:
  0   clean exit (after SIGTERM/SIGINT: drained, cancelled, destroyed, reported)
  1   any other failure (e.g. the metrics address is in use, or the compiled
      engine aiod._engine was not built)
  2   bad command-line usage
  75  the kernel refused the AIO resources the configuration asks for;
      the message says how large fs.aio-max-nr must be
  78  invalid configuration; one line per problem on stderr

exit codes of `aiod status`:
  0   the daemon answered and is serving
  1   something answered at the URL, but not with an aiod /status document
  3   the daemon answered but is not serving (starting, draining, I/O loop stalled)
  69  nothing answered at the URL (not running, wrong address, firewalled)
  78  the configuration it would read metrics.listen from is invalid

signals (aiod run):
  SIGTERM, SIGINT  drain in-flight I/O (shutdown.drain_timeout), cancel the rest,
                   io_destroy every context, write shutdown-report.json, exit 0;
                   a second one during the drain skips straight to cancel,
                   any later one is logged and ignored
  SIGHUP           reload the configuration; a bad one keeps the running one
"""


def smoke() -> int:
    """Write and read back one block through a real kernel context."""
    from aiod import aio
    before, max_nr = aio.system_aio_usage()
    with tempfile.TemporaryDirectory(prefix="aiod-smoke-", dir="/var/tmp") as d:
        path = os.path.join(d, "smoke.dat")
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
        try:
            payload = os.urandom(4096)
            with aio.Context(8) as ctx:
                t0 = time.perf_counter()
                ctx.submit([aio.write(fd, payload, 0)])
                (w,) = ctx.reap(1, timeout=5)
                ctx.submit([aio.read(fd, 4096, 0)])
                (r,) = ctx.reap(1, timeout=5)
                took = time.perf_counter() - t0
            ok = w.res == 4096 and r.res == 4096 and r.buffers[0].bytes() == payload
        finally:
            os.close(fd)
    after, _ = aio.system_aio_usage()
    print(f"aiod smoke: O_DIRECT write+read of 4 KiB {'ok' if ok else 'FAILED'} "
          f"in {took * 1e6:.0f} us; aio-nr {before} -> {after} (max {max_nr})")
    return EXIT_OK if ok else EXIT_FAILURE


def load_config(path: str | None) -> Config | None:
    """The configuration, or None after printing one line per problem."""
    from aiod.config import ConfigError, load
    try:
        return load(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return None


def check_config(path: str) -> int:
    cfg = load_config(path)
    if cfg is None:
        return EXIT_CONFIG
    from aiod import aio
    from aiod.headroom import room_problem
    try:
        _, max_nr = aio.system_aio_usage()
    except (OSError, ValueError):
        max_nr = 0
    problem = room_problem(cfg, max_nr) if max_nr else None
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok ({len(cfg.pools)} pools, {len(cfg.jobs)} jobs)")
    return EXIT_OK


def aio_usage(as_json: bool, procfs_root: str) -> int:
    """Who holds the host's AIO events; needs no daemon. Exit 0 whenever it can read
    fs.aio-nr, saying on stderr what it could not see."""
    import json

    from aiod import hostscan
    try:
        s = hostscan.scan(procfs_root)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"aiod aio-usage: cannot read {procfs_root}/sys/fs/aio-nr: {why}",
              file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print(json.dumps(s.as_json(), indent=2))
    else:
        print(hostscan.format_table(s))
    for line in hostscan.why_incomplete(s):
        print(f"aiod aio-usage: {line}", file=sys.stderr)
    return EXIT_OK


def run(config_path: str | None, signals: SignalInbox) -> int:
    from aiod import logs
    from aiod.daemon import Daemon
    try:
        cfg = load_config(config_path)
        if cfg is None:
            return EXIT_CONFIG
        logs.setup(cfg.log_level)
        return Daemon(cfg, config_path=config_path, signals=signals).run()
    finally:
        signals.finish()


def status(url: str | None, config_path: str | None, as_json: bool, timeout: float) -> int:
    import json

    from aiod.status import BadAnswer, Unreachable, fetch, render, status_url
    if url is None:
        cfg = load_config(config_path)
        if cfg is None:
            return EXIT_CONFIG
        target = status_url(None, cfg.metrics.host, cfg.metrics.port)
    else:
        target = status_url(url, "", 0)
    try:
        doc = fetch(target, timeout)
    except Unreachable as e:
        print(f"aiod status: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BadAnswer as e:
        print(f"aiod status: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(doc))
    return EXIT_OK if doc.get("serving") else EXIT_NOT_SERVING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiod",
        description="Own pools of Linux kernel AIO contexts and measure the host's I/O "
                    "through them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"aiod {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run the daemon in the foreground",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    r.add_argument("--config", metavar="PATH",
                   help="configuration file (default: /etc/aiod/aiod.yaml when it exists, "
                        "else the embedded default)")
    c = sub.add_parser("check-config", help="validate a configuration file (exit 0 or 78; "
                       "1 without the compiled engine)")
    c.add_argument("path")
    sub.add_parser("smoke", help="one O_DIRECT write and read through a kernel context")
    st = sub.add_parser("status", help="ask the running daemon what it is doing",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                        description="Ask the running aiod, through /status on its metrics "
                                    "listener, for its pools, contexts, jobs, fs.aio-nr and "
                                    "last reload.")
    st.add_argument("--url", metavar="URL",
                    help="the daemon's metrics listener, e.g. http://127.0.0.1:9740 "
                         "(default: metrics.listen from the configuration)")
    st.add_argument("--config", metavar="PATH",
                    help="read metrics.listen from this file (default: /etc/aiod/aiod.yaml "
                         "when it exists, else the embedded default)")
    st.add_argument("--json", action="store_true", help="print the /status JSON document")
    st.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                    help="how long to wait for an answer (default: 5)")
    u = sub.add_parser("aio-usage", help="who holds the host's AIO events (fs.aio-nr), "
                       "largest first; needs no running daemon")
    u.add_argument("--json", action="store_true", help="machine-readable output")
    u.add_argument("--proc", default="/proc", metavar="PATH", help=argparse.SUPPRESS)
    try:
        from aiod import bench
    except ImportError:  # pragma: no cover - bench ships with aiod
        bench = None  # type: ignore[assignment]
    if bench is not None:
        bench.add_parser(sub)
    return p


# A configuration that passes check-config must be one aiod can run: without
# the engine it cannot, so check-config says so too.
NEEDS_ENGINE = ("run", "check-config", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    signals = SignalInbox()
    if args_in[:1] == ["run"]:
        # First thing, before the imports and the configuration: from here a
        # SIGTERM is recorded and acted on once aiod can, never the default
        # action that would kill it without a report.
        signals.install()
    args = build_parser().parse_args(args_in)
    from aiod import aio
    if args.command in NEEDS_ENGINE:
        from aiod.engine import MISSING
        if MISSING is not None:  # no silent slow path: say what is missing and stop
            print(f"aiod: {MISSING}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        if args.command == "run":
            return run(args.config, signals)
        if args.command == "check-config":
            return check_config(args.path)
        if args.command == "smoke":
            return smoke()
        if args.command == "status":
            return status(args.url, args.config, args.json, args.timeout)
        if args.command == "aio-usage":
            return aio_usage(args.json, args.proc)
        if args.command == "bench":
            from aiod import bench
            return bench.run(args)
    except aio.AioError as e:
        print(f"aiod: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL if e.errno == errno.EAGAIN else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
