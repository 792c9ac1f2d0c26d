"""aiod.config: units, defaults, the state directory, and one clear line per problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiod import config
from aiod.config import ConfigError, parse, parse_duration, parse_rate, parse_size

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.yaml"))
GOOD = sorted((CONFIGS / "good").glob("*.yaml"))

ENV = {"STATE_DIRECTORY": "/var/lib/aiod"}
POOL = "pools:\n  - {name: default, contexts: 4, nr_events: 128}\n"


def problems_of(text: str, source: str = "t.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, source, env=ENV)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- units -----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (0, 0), (4096, 4096), ("512", 512), ("512B", 512), ("4KiB", 4096), ("4k", 4096),
    ("4K", 4096), ("4KB", 4096), ("4kib", 4096), ("64MiB", 64 << 20), ("1M", 1 << 20),
    ("1G", 1 << 30), ("1GiB", 1 << 30), ("2T", 2 << 40), ("1.5K", 1536), (" 8 MiB ", 8 << 20),
    ("1_000", 1000),
])
def test_parse_size_accepts_bytes_and_binary_suffixes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "4 kilobytes", "64XB", "-1", -1, "0.1K", 1.5, True, None, "1e6", "k", [1]])
def test_parse_size_rejects_with_a_readable_message(text: object) -> None:
    with pytest.raises(ValueError, match=r"expected|negative"):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1.5s", 1.5), ("0s", 0.0),
    ("100us", 1e-4), ("1h", 3600.0), (3, 3.0), (0.25, 0.25), ("7", 7.0),
])
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["5 seconds", "-1s", -1, "1d", "s", True, float("inf"), "1m30s"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"expected|negative"):
        parse_duration(text)


@pytest.mark.parametrize("text, expected", [
    ("100/s", 100.0), ("5/m", 5 / 60), ("0.5/s", 0.5), ("60/h", 1 / 60), (10, 10.0),
    ("2", 2.0), ("3 / s", 3.0),
])
def test_parse_rate(text: object, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["ten", "10/d", "/s", -1, False, float("nan")])
def test_parse_rate_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"expected|negative"):
        parse_rate(text)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9740", ("127.0.0.1", 9740)), ("[::1]:9740", ("::1", 9740)),
    ("localhost:0", ("localhost", 0)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_listen(text) == expected


@pytest.mark.parametrize("text", [":9740", "[::1]9740", "[nope]:1", "host:-1", "host:http"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_listen(text)


# --- defaults and resolution -------------------------------------------------

def test_a_minimal_file_gets_every_default() -> None:
    c = parse(POOL + "jobs:\n  - {name: j, pool: default, type: probe, target: t}\n",
              "t.yaml", env=ENV)
    assert c.log_level == "info"
    assert c.state_directory == Path("/var/lib/aiod")
    assert c.metrics == config.MetricsConfig("127.0.0.1", 9740)
    assert c.shutdown == config.ShutdownConfig(10.0, 30.0)
    assert c.pools == (config.PoolConfig("default", 4, 128),)
    assert c.source == "t.yaml"
    (job,) = c.jobs
    assert job == config.JobConfig(
        name="j", pool="default", type="probe", target=Path("/var/lib/aiod/t"),
        size=64 << 20, op="randread", block_size=4096, direct=True, rate=10.0,
        iodepth=1, timeout=5.0, allow_write=False)


def test_jobs_may_be_absent_or_empty() -> None:
    assert parse(POOL, "t", env=ENV).jobs == ()
    assert parse(POOL + "jobs: []\n", "t", env=ENV).jobs == ()
    assert parse(POOL + "jobs:\n", "t", env=ENV).jobs == ()


@pytest.mark.parametrize("target, expected", [
    ("probe.dat", "/srv/aiod/probe.dat"),
    ("sub/dir/x", "/srv/aiod/sub/dir/x"),
    ("./a/../b", "/srv/aiod/b"),
    ("/dev/nvme0n1", "/dev/nvme0n1"),
])
def test_relative_targets_resolve_against_the_state_directory(target: str, expected: str) -> None:
    text = f"state_directory: /srv/aiod\n{POOL}jobs:\n" \
           f"  - {{name: j, pool: default, type: probe, target: '{target}'}}\n"
    (job,) = parse(text, "t", env={}).jobs
    assert job.target == Path(expected)
    assert job.target.is_absolute()


@pytest.mark.parametrize("env, home, expected", [
    ({"STATE_DIRECTORY": "/var/lib/aiod"}, None, "/var/lib/aiod"),
    ({"STATE_DIRECTORY": "/var/lib/aiod:/var/lib/other", "XDG_STATE_HOME": "/x"}, None,
     "/var/lib/aiod"),
    ({"STATE_DIRECTORY": "", "XDG_STATE_HOME": "/home/u/.state"}, None, "/home/u/.state/aiod"),
    ({"XDG_STATE_HOME": "relative/is/ignored"}, Path("/home/u"), "/home/u/.local/state/aiod"),
    ({}, Path("/home/u"), "/home/u/.local/state/aiod"),
])
def test_state_directory_default_follows_systemd_then_xdg_then_home(
        env: dict[str, str], home: Path | None, expected: str) -> None:
    c = parse(POOL + "jobs:\n  - {name: j, pool: default, type: probe, target: p}\n",
              "t", env=env, home=home)
    assert c.state_directory == Path(expected)
    assert c.jobs[0].target == Path(expected) / "p"


def test_an_explicit_state_directory_wins_over_the_environment() -> None:
    c = parse("state_directory: /data/aiod\n" + POOL, "t", env=ENV)
    assert c.state_directory == Path("/data/aiod")


def test_a_file_with_several_problems_reports_them_all_in_file_order() -> None:
    text = (
        "log_level: loud\n"                                   # 1
        "metrics: {listen: 'localhost'}\n"                    # 2
        "pools:\n"                                            # 3
        "  - {name: a, contexts: 0, nr_events: 8}\n"          # 4
        "jobs:\n"                                             # 5
        "  - name: j\n"                                       # 6
        "    pool: b\n"                                       # 7
        "    type: probe\n"                                   # 8
        "    target: t\n"                                     # 9
        "    rte: 5/s\n"                                      # 10
        "    direct: maybe\n"                                 # 11
    )
    problems = problems_of(text)
    assert [p.split(": ")[0:2] for p in problems] == [
        ["t.yaml:1", "log_level"],
        ["t.yaml:2", "metrics.listen"],
        ["t.yaml:4", "pools[0].contexts"],
        ["t.yaml:7", "jobs[0].pool"],
        ["t.yaml:10", "jobs[0].rte"],
        ["t.yaml:11", "jobs[0].direct"],
    ]
    assert "did you mean 'rate'?" in problems[4]


def test_iodepth_is_checked_against_its_own_pools_capacity() -> None:
    text = ("pools:\n  - {name: small, contexts: 2, nr_events: 4}\n"
            "  - {name: big, contexts: 4, nr_events: 128}\n"
            "jobs:\n  - {name: a, pool: small, type: load, target: t, iodepth: 8}\n"
            "  - {name: b, pool: big, type: load, target: t, iodepth: 9}\n"
            "  - {name: c, pool: small, type: load, target: t, iodepth: 9}\n")
    (problem,) = problems_of(text)
    assert problem.startswith("t.yaml:7: jobs[2].iodepth: expected at most 8")


def test_fsync_and_poll_ops_are_accepted_for_both_job_types() -> None:
    jobs = "".join(f"  - {{name: {op}-{t}, pool: default, type: {t}, target: x, op: {op}}}\n"
                   for op in ("fsync", "poll") for t in ("probe", "load"))
    c = parse(POOL + "jobs:\n" + jobs, "t", env=ENV)
    assert [(j.op, j.type) for j in c.jobs] == [
        ("fsync", "probe"), ("fsync", "load"), ("poll", "probe"), ("poll", "load")]


def test_block_size_alignment_only_matters_with_o_direct() -> None:
    job = "jobs:\n  - {name: j, pool: default, type: probe, target: t, block_size: 1000%s}\n"
    assert parse(POOL + job % ", direct: false", "t", env=ENV).jobs[0].block_size == 1000
    (problem,) = problems_of(POOL + job % "")
    assert "jobs[0].block_size: expected a multiple of 512" in problem


@pytest.mark.parametrize("text, expected", [
    ("jobs: {a: 1}\n" + POOL, "t.yaml:1: jobs: expected a list, found a mapping"),
    ("pools: 3\n", "t.yaml:1: pools: expected a list, found the integer 3"),
    ("metrics: on\n" + POOL, "t.yaml:1: metrics: expected a mapping of settings, found the "
                             "boolean on"),
    ("log_level: [info]\n" + POOL, "t.yaml:1: log_level: expected one of debug, info, warning, "
                                   "error, found a list"),
    ("1: x\n" + POOL, "t.yaml:1: expected a setting name, found the integer 1"),
    ("shutdown: {drain_timeout: null}\n" + POOL,
     "t.yaml:1: shutdown.drain_timeout: expected a duration such as 500ms, 10s or 2m, "
     "found nothing (null)"),
    ("shutdown: {destroy_timeout: 2024-01-01}\n" + POOL,
     "t.yaml:1: shutdown.destroy_timeout: expected a duration such as 500ms, 10s or 2m, "
     "found the date 2024-01-01"),
    ("pools:\n  - {name: a, contexts: !!int four, nr_events: 1}\n",
     "t.yaml:2: pools[0].contexts: expected a whole number >= 1, found the integer four"),
    ("pools:\n  - {name: a, contexts: 4.0, nr_events: 1}\n",
     "t.yaml:2: pools[0].contexts: expected a whole number >= 1, found the number 4.0"),
    ("'a': 1\n'a': 2\n" + POOL, "t.yaml:2: a: duplicate key (first set on line 1)"),
    ("---\na: 1\n---\nb: 2\n", "t.yaml:3: YAML syntax error, column 1: expected a single "
                              "document in the stream (line 2), but found another document"),
])
def test_wrong_shapes_give_one_line_each(text: str, expected: str) -> None:
    assert expected in problems_of(text)


def test_every_problem_is_a_single_line() -> None:
    text = 'log_level: "multi\\nline"\n' + POOL
    (problem,) = problems_of(text)
    assert "\n" not in problem and "multi\\nline" in problem


# --- the corpus of broken files ------------------------------------------------

def _header(path: Path) -> tuple[str, str]:
    first, second = path.read_text(encoding="utf-8").split("\n")[:2]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    assert second.startswith("# line: "), f"{path.name}: second line must be '# line: N|none'"
    return first.removeprefix("# expect: "), second.removeprefix("# line: ")


def test_the_bad_corpus_is_big_enough() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_each_broken_file_is_reported_with_file_line_and_key(path: Path) -> None:
    expect, line = _header(path)
    with pytest.raises(ConfigError) as info:
        config.load(path, env=ENV)
    matching = [p for p in info.value.problems if expect in p]
    assert matching, f"no problem contains {expect!r}: {info.value.problems}"
    prefix = f"{path}: " if line == "none" else f"{path}:{line}: "
    assert matching[0].startswith(prefix), matching[0]
    for problem in info.value.problems:
        assert "\n" not in problem and problem.startswith(str(path))
        assert "Traceback" not in problem


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_files_parse(path: Path) -> None:
    c = config.load(path, env=ENV)
    assert c.source == str(path) and c.pools


def test_the_good_mixed_file_means_what_it_says() -> None:
    c = config.load(CONFIGS / "good" / "mixed_jobs.yaml", env=ENV)
    nvme, fsync, bulk = c.jobs
    assert nvme.target == Path("/dev/nvme0n1") and nvme.rate == pytest.approx(5 / 60)
    assert nvme.timeout == 0.5 and nvme.block_size == 512
    assert fsync.target == Path("/srv/aiod/sync/fsync.dat") and fsync.op == "fsync"
    assert (bulk.type, bulk.iodepth, bulk.size, bulk.direct) == ("load", 64, 1 << 30, False)
    assert bulk.allow_write and bulk.timeout == pytest.approx(1e-4)
    assert c.shutdown == config.ShutdownConfig(1.5, 0.0)


# --- shipped files and load() ------------------------------------------------

def test_the_shipped_config_parses_and_equals_the_embedded_default() -> None:
    shipped = config.load(ROOT / "config" / "aiod.yaml", env=ENV)
    embedded = config.load(None, env=ENV, default_path=ROOT / "does-not-exist.yaml")
    assert embedded.source == "<embedded default>"
    assert shipped == config.Config(**{**embedded.__dict__, "source": shipped.source})


def test_the_embedded_default_is_one_pool_and_one_probe() -> None:
    c = parse(config.embedded_default_text(), config.EMBEDDED_SOURCE, env=ENV)
    assert c.pools == (config.PoolConfig("default", 4, 128),)
    assert c.jobs == (config.JobConfig(
        name="state-latency", pool="default", type="probe",
        target=Path("/var/lib/aiod/probe.dat"), size=64 << 20, op="randread",
        block_size=4096, direct=True, rate=10.0, iodepth=1, timeout=5.0,
        allow_write=False),)
    assert "state_directory" not in config.embedded_default_text().split("#")[-1]


def test_the_shipped_config_mentions_every_key() -> None:
    text = (ROOT / "config" / "aiod.yaml").read_text(encoding="utf-8")
    for key in config._TOP_KEYS + config._METRICS_KEYS + config._SHUTDOWN_KEYS + \
            config._POOL_KEYS + config._JOB_KEYS + config._HOST_SCAN_KEYS:
        assert re.search(rf"^\s*#?\s*-?\s*{key}:", text, re.MULTILINE), key


def test_load_without_a_path_prefers_the_default_path(tmp_path: Path) -> None:
    etc = tmp_path / "aiod.yaml"
    etc.write_text("log_level: debug\n" + POOL)
    c = config.load(None, env=ENV, default_path=etc)
    assert (c.log_level, c.source) == ("debug", str(etc))


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b"log_level: info\n# caf\xe9\n"), ":2: not UTF-8 text (byte 0xe9"),
    (lambda p: p.write_text("pools:\n  - name: a\x07\n"), ":2: YAML cannot hold the character"),
    (lambda p: p.write_text("pools: [\n"), ": YAML syntax error"),
])
def test_unreadable_files_give_one_clear_line(tmp_path: Path, make: object,
                                              expected: str) -> None:
    path = tmp_path / "aiod.yaml"
    make(path)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        config.load(path, env=ENV)
    (problem,) = info.value.problems
    assert problem.startswith(str(path)) and expected in problem


def test_an_unreadable_file_says_permission_denied(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: chmod 0 does not stop root, and tests may run as root.
    def refuse(self: Path, *args: object, **kw: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))
    (tmp_path / "aiod.yaml").write_text(POOL)
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "aiod.yaml", env=ENV)
    assert info.value.problems == [f"{tmp_path / 'aiod.yaml'}: cannot read the file: "
                                   "permission denied"]


# --- nothing escapes as a traceback -------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6),
                     st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.sampled_from(list(config._JOB_KEYS + config._TOP_KEYS + ("x", "ratee")))
_trees = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=6)), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _trees, max_size=8))
def test_any_yaml_gives_a_config_or_a_config_error(tree: dict[str, object]) -> None:
    import yaml
    text = yaml.safe_dump(tree)
    try:
        parse(text, "fuzz.yaml", env=ENV, home=Path("/h"))
    except ConfigError as e:
        assert e.problems and all("\n" not in p for p in e.problems)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    try:
        parse(text, "fuzz.yaml", env=ENV, home=Path("/h"))
    except ConfigError as e:
        assert e.problems


# --- size bound -------------------------------------------------------------------

def test_a_config_over_1_mib_is_refused_in_one_line_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    # Valid YAML all the way: only the size is wrong.
    path.write_text(POOL + "# " + "x" * config.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, env=ENV)
    (problem,) = info.value.problems
    size = path.stat().st_size
    assert problem == (f"{path}: the file is {size} bytes; a configuration may be at most "
                       f"1048576 bytes (1 MiB)")


def test_a_config_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    head = POOL + "# "
    path.write_text(head + "x" * (config.MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == config.MAX_CONFIG_BYTES
    assert config.load(path, env=ENV).pools[0].name == "default"


def test_an_endless_stream_as_config_is_cut_at_1_mib() -> None:
    with pytest.raises(ConfigError) as info:
        config.load("/dev/zero", env=ENV)
    (problem,) = info.value.problems
    assert problem.startswith("/dev/zero: the file is 1048577 bytes")


# --- I/O buffers must fit in memory ------------------------------------------------

def test_jobs_whose_buffers_cannot_fit_in_memory_are_refused_in_one_line() -> None:
    job = ("jobs:\n  - {name: big, pool: default, type: load, target: /var/tmp/x, "
           "op: randrw, iodepth: 33000, block_size: 1MiB}\n")
    with pytest.raises(ConfigError) as info:
        parse(POOL.replace("128", "40000") + job, "t.yaml", env=ENV, memory=16 << 30)
    (problem,) = info.value.problems
    assert problem == ("t.yaml:4: jobs[0].block_size: randrw at iodepth 33000 with block_size "
                       f"1048576 needs {2 * 33000 << 20} bytes of I/O buffers, more than this "
                       f"machine's {16 << 30} bytes of memory")
    # The same job fits a machine with more memory.
    parse(POOL.replace("128", "40000") + job, "t.yaml", env=ENV, memory=128 << 30)


def test_jobs_that_fit_one_by_one_but_not_together_are_refused() -> None:
    jobs = "jobs:\n" + "".join(
        f"  - {{name: j{i}, pool: default, type: load, target: /var/tmp/x{i}, "
        f"iodepth: 100, block_size: 1MiB}}\n" for i in range(3))
    with pytest.raises(ConfigError) as info:
        parse(POOL + jobs, "t.yaml", env=ENV, memory=250 << 20)
    (problem,) = info.value.problems
    assert "jobs[2].name: the jobs up to this one need" in problem


# ------------------------------------------------ the host's AIO budget
def test_headroom_reserve_min_contexts_and_host_scan_parse() -> None:
    c = parse("headroom_reserve: 10%\nhost_scan: {interval: 5s, top: 3}\n"
              "pools:\n  - {name: a, contexts: 4, min_contexts: 1, nr_events: 64}\n"
              "  - {name: b, contexts: 2, nr_events: 8}\n", "t.yaml", env=ENV)
    assert c.headroom_reserve.resolve(65536) == 6553 and c.headroom_reserve.enabled
    assert c.host_scan == config.HostScanConfig(5.0, 3)
    assert [(p.min_contexts, p.elastic) for p in c.pools] == [(1, True), (2, False)]
    c = parse("headroom_reserve: 4_096\nhost_scan:\n" + POOL, "t.yaml", env=ENV)
    assert c.headroom_reserve.resolve(65536) == 4096
    assert c.host_scan == config.HostScanConfig(30.0, 10)
    c = parse(POOL, "t.yaml", env=ENV)
    assert not c.headroom_reserve.enabled and c.host_scan is None


@pytest.mark.parametrize("text, expected", [
    ("headroom_reserve: 100%\n", "t.yaml:1: headroom_reserve: a reserve of 100% of "
     "fs.aio-max-nr leaves the pools no room at all; expected less than 100%"),
    ("headroom_reserve: -5\n", "t.yaml:1: headroom_reserve: must not be negative, found -5"),
    ("headroom_reserve: plenty\n", "t.yaml:1: headroom_reserve: expected a number of AIO "
     "events such as 4096, or a share of fs.aio-max-nr such as 10%, found 'plenty'"),
    ("host_scan: {interval: 100ms}\n", "t.yaml:1: host_scan.interval: expected at least 1s "
     "between scans of /proc, found 0.1s"),
    ("host_scan: {top: 500}\n", "t.yaml:1: host_scan.top: expected at most 100 (each "
     "holder is two metric series), found 500"),
    ("host_scan: {intervall: 5s}\n", "t.yaml:1: host_scan.intervall: unknown key; did you "
     "mean 'interval'?"),
])
def test_budget_settings_reject_with_one_line(text: str, expected: str) -> None:
    assert problems_of(text + POOL) == [expected]


def test_min_contexts_above_contexts_is_refused_and_jobs_still_find_the_pool() -> None:
    text = ("pools:\n  - {name: a, contexts: 2, min_contexts: 3, nr_events: 8}\n"
            "jobs:\n  - {name: j, pool: a, type: probe, target: x.dat}\n")
    assert problems_of(text) == [
        "t.yaml:2: pools[0].min_contexts: expected at most contexts (2), found 3"]
