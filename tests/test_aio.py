"""The kernel AIO layer against the real kernel: every behaviour of issue 2."""

from __future__ import annotations

import errno
import os
import select
import time
from pathlib import Path

import pytest

from aiod import aio, aio_context
from tests.conftest import live_contexts


def reap_all(ctx: aio.Context, n: int, timeout: float = 5.0) -> list[aio.Op]:
    done: list[aio.Op] = []
    deadline = time.monotonic() + timeout
    while len(done) < n and time.monotonic() < deadline:
        done += ctx.reap(1, timeout=deadline - time.monotonic())
    return done


def test_struct_layout_matches_aio_abi() -> None:
    import ctypes
    assert ctypes.sizeof(aio.IOCB) == 64
    assert ctypes.sizeof(aio.IoEvent) == 32
    assert aio.IOCB.aio_offset.offset == 40
    assert aio.IOCB.aio_resfd.offset == 60


@pytest.mark.parametrize("bad_id", [0, 0x7FFFFFFFFFFFFFFF, 2**64 - 1])
def test_io_destroy_of_invalid_id_raises_einval(bad_id: int) -> None:
    with pytest.raises(aio.AioError) as ei:
        aio.io_destroy(bad_id)
    assert ei.value.errno == errno.EINVAL
    assert isinstance(ei.value, OSError)
    assert "io_destroy" in str(ei.value)


def test_destroying_the_same_id_twice() -> None:
    ctx_id = aio.io_setup(1)
    aio.io_destroy(ctx_id)
    with pytest.raises(aio.AioError) as ei:
        aio.io_destroy(ctx_id)
    assert ei.value.errno == errno.EINVAL


def test_context_destroy_is_idempotent_and_calls_io_destroy_once(
        monkeypatch: pytest.MonkeyPatch, aio_neighbour: None) -> None:
    calls: list[int] = []
    real = aio.io_destroy

    def counted(ctx_id: int) -> None:
        calls.append(ctx_id)
        real(ctx_id)

    # Context calls the io_destroy of its own module (aio re-exports it).
    monkeypatch.setattr(aio_context, "io_destroy", counted)
    before = live_contexts()
    ctx = aio.Context(8)
    assert live_contexts() == before + 1
    ctx.destroy()
    ctx.destroy()
    assert calls == [ctx.id]
    assert live_contexts() == before


def test_io_setup_zero_is_einval() -> None:
    with pytest.raises(aio.AioError) as ei:
        aio.io_setup(0)
    assert ei.value.errno == errno.EINVAL
    assert "io_setup" in str(ei.value)


def test_io_setup_above_aio_max_nr_is_eagain() -> None:
    _, max_nr = aio.system_aio_usage()
    with pytest.raises(aio.AioError) as ei:
        aio.io_setup(max_nr + 1)
    assert ei.value.errno == errno.EAGAIN


def test_odirect_write_then_read_round_trip(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    payload = os.urandom(8192)
    with aio.Context(4) as ctx:
        w = aio.write(fd, payload, 4096)
        assert ctx.submit([w]).submitted == [w]
        assert reap_all(ctx, 1) == [w]
        assert w.res == 8192
        r = aio.read(fd, 8192, 4096)
        ctx.submit([r])
        assert reap_all(ctx, 1) == [r]
        assert r.res == 8192
        assert r.buffers[0].bytes() == payload


def test_vectored_write_then_read(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    a, b = aio.aligned_buffer(4096), aio.aligned_buffer(4096)
    a.view[:] = b"A" * 4096
    b.view[:] = b"B" * 4096
    with aio.Context(4) as ctx:
        ctx.submit([aio.writev(fd, [a, b], 0)])
        (w,) = reap_all(ctx, 1)
        assert w.res == 8192
        x, y = aio.aligned_buffer(4096), aio.aligned_buffer(4096)
        ctx.submit([aio.readv(fd, [x, y], 0)])
        (r,) = reap_all(ctx, 1)
        assert r.res == 8192
        assert x.bytes() == b"A" * 4096 and y.bytes() == b"B" * 4096


@pytest.mark.parametrize("make", [aio.fsync, aio.fdsync])
def test_fsync_and_fdsync_complete(direct_file: tuple[int, Path], make) -> None:  # type: ignore[no-untyped-def]
    fd, _ = direct_file
    with aio.Context(2) as ctx:
        op = make(fd)
        ctx.submit([op])
        assert reap_all(ctx, 1) == [op]
        assert op.res == 0


def test_poll_on_pipe_completes_once_data_arrives(pipe: tuple[int, int]) -> None:
    r, w = pipe
    with aio.Context(2) as ctx:
        op = aio.poll(r, select.POLLIN)
        ctx.submit([op])
        assert ctx.reap(0, timeout=0.05) == []
        assert ctx.in_flight == 1
        os.write(w, b"x")
        assert reap_all(ctx, 1) == [op]
        assert op.res is not None and op.res & select.POLLIN


def test_cancel_of_poll_is_einprogress_and_completion_arrives(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with aio.Context(2) as ctx:
        op = aio.poll(r)
        ctx.submit([op])
        assert ctx.cancel(op) is True
        assert reap_all(ctx, 1) == [op]
        assert ctx.in_flight == 0


def test_raw_io_cancel_of_poll_reports_einprogress(pipe: tuple[int, int]) -> None:
    import ctypes
    r, _ = pipe
    with aio.Context(2) as ctx:
        op = aio.poll(r)
        ctx.submit([op])
        ev = aio.IoEvent()
        with pytest.raises(aio.AioError) as ei:
            aio.io_cancel(ctx.id, op.address, ctypes.addressof(ev))
        assert ei.value.errno == errno.EINPROGRESS
        assert reap_all(ctx, 1) == [op]


def test_cancel_of_inflight_odirect_read_is_einval_and_it_completes(direct_file: tuple[int, Path]) -> None:
    import ctypes
    fd, _ = direct_file
    with aio.Context(64) as ctx:
        # Many large reads so that at least some are still in flight at cancel time.
        ops = [aio.read(fd, 65536, (i % 16) * 65536) for i in range(32)]
        ctx.submit(ops)
        in_flight = ctx.inflight_ops()
        if not in_flight:
            pytest.skip("every read completed inside io_submit; nothing left to cancel")
        target = in_flight[-1]
        ev = aio.IoEvent()
        with pytest.raises(aio.AioError) as ei:
            aio.io_cancel(ctx.id, target.address, ctypes.addressof(ev))
        assert ei.value.errno == errno.EINVAL
        # Through the Context the same refusal is a plain False, never an exception.
        assert ctx.cancel(target) is False
        done = reap_all(ctx, len(in_flight))
        assert target in done
        assert all(op.res == 65536 for op in done)


def test_destroy_with_poll_in_flight_returns_and_releases_the_context(
        pipe: tuple[int, int], aio_neighbour: None) -> None:
    r, _ = pipe
    before = live_contexts()
    ctx = aio.Context(16)
    assert live_contexts() == before + 1
    op = aio.poll(r)
    ctx.submit([op])
    t0 = time.monotonic()
    lost = ctx.destroy()
    assert time.monotonic() - t0 < 5
    assert lost == [op]
    assert live_contexts() == before


def test_misaligned_odirect_buffer_completes_with_einval(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    base = aio.aligned_buffer(8192)
    with aio.Context(2) as ctx:
        op = aio.read(fd, base.slice(1, 4096), 0)
        res = ctx.submit([op])
        assert res.submitted == [op]
        assert reap_all(ctx, 1) == [op]
        assert op.res == -errno.EINVAL


def test_bad_fd_in_the_middle_of_a_batch(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    with aio.Context(8) as ctx:
        good1 = aio.read(fd, 4096, 0)
        bad = aio.read(9999, 4096, 0)
        good2 = aio.read(fd, 4096, 4096)
        good3 = aio.fsync(fd)
        res = ctx.submit([good1, bad, good2, good3])
        assert res.submitted == [good1, good2, good3]
        assert res.failed == [(bad, errno.EBADF)]
        assert res.unsubmitted == []
        done = reap_all(ctx, 3)
        assert sorted(map(id, done)) == sorted(map(id, [good1, good2, good3]))


def test_bad_fd_first_in_batch_is_reported(direct_file: tuple[int, Path]) -> None:
    with aio.Context(4) as ctx:
        bad = aio.fsync(9999)
        res = ctx.submit([bad])
        assert res.failed == [(bad, errno.EBADF)] and not res.submitted


def test_full_ring_hands_ops_back_unsubmitted(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with aio.Context(1) as ctx:
        # The kernel rounds the ring up; keep submitting until it says EAGAIN.
        ops = [aio.poll(r) for _ in range(4096)]
        res = ctx.submit(ops)
        assert res.unsubmitted, "the kernel accepted more than its ring can hold"
        assert len(res.submitted) + len(res.unsubmitted) == len(ops)
        assert not res.failed


def test_eventfd_readable_on_completion(pipe: tuple[int, int]) -> None:
    r, w = pipe
    with aio.Context(2, eventfd=True) as ctx:
        assert ctx.eventfd is not None
        op = aio.poll(r)
        ctx.submit([op])
        readable, _, _ = select.select([ctx.eventfd], [], [], 0.05)
        assert readable == []
        os.write(w, b"x")
        readable, _, _ = select.select([ctx.eventfd], [], [], 5)
        assert readable == [ctx.eventfd]
        assert ctx.drain_eventfd() == 1
        assert ctx.reap(0, timeout=0) == [op]


def test_rwf_nowait_flag_is_passed_through(direct_file: tuple[int, Path]) -> None:
    fd, _ = direct_file
    with aio.Context(2) as ctx:
        op = aio.read(fd, 4096, 0, rw_flags=aio.RWF_NOWAIT)
        ctx.submit([op])
        (done,) = reap_all(ctx, 1)
        assert done.res in (4096, -errno.EAGAIN)


def test_system_aio_usage_reads_a_fixture_procfs(tmp_path: Path) -> None:
    fs = tmp_path / "sys" / "fs"
    fs.mkdir(parents=True)
    (fs / "aio-nr").write_text("123\n")
    (fs / "aio-max-nr").write_text("65536\n")
    assert aio.system_aio_usage(tmp_path) == (123, 65536)


def test_context_reports_in_flight_count_on_real_usage(pipe: tuple[int, int],
                                                      aio_neighbour: None) -> None:
    r, w = pipe
    before = live_contexts()
    with aio.Context(32) as ctx:
        assert live_contexts() == before + 1
        ops = [aio.poll(r) for _ in range(5)]
        ctx.submit(ops)
        assert ctx.in_flight == 5
        os.write(w, b"x")
        assert len(reap_all(ctx, 5)) == 5
        assert ctx.in_flight == 0
    assert live_contexts() == before


def _setup_errno(n: int) -> int:
    """io_setup(n)'s errno, or 0 when it worked (the context is destroyed at once)."""
    try:
        ctx_id = aio.io_setup(n)
    except aio.AioError as e:
        return e.errno or 0
    aio.io_destroy(ctx_id)
    return 0


def test_the_per_context_event_cap_is_exactly_max_nr_events() -> None:
    # The kernel checks the cap (EINVAL) before fs.aio-max-nr (EAGAIN), so with
    # aio-max-nr below 1<<20 every probe here fails without allocating a ring.
    # Above that, probing would allocate rings of up to 256 MiB and hold a large
    # share of a system-wide limit: skip instead.
    max_nr = aio.system_aio_usage()[1]
    if max_nr >= 1 << 20:
        pytest.skip(f"fs.aio-max-nr is {max_nr}: probing would really allocate huge rings")
    lo, hi = 1 << 20, 1 << 24     # EAGAIN at lo, EINVAL at hi (measured on this machine)
    assert _setup_errno(lo) == errno.EAGAIN
    assert _setup_errno(hi) == errno.EINVAL
    while hi - lo > 1:            # the smallest n that gives EINVAL is hi
        mid = (lo + hi) // 2
        if _setup_errno(mid) == errno.EINVAL:
            hi = mid
        else:
            lo = mid
    assert lo == aio.MAX_NR_EVENTS, f"this kernel's cap is {lo}, aiod assumes {aio.MAX_NR_EVENTS}"
