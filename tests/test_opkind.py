"""The op-kind vocabulary: its words are the config values and metric labels
users already see, and its opcodes are the kernel's."""

from __future__ import annotations

import pytest

from aiod import aio
from aiod.config import JOB_OPS, buffer_bytes
from aiod.opkind import JobOp, OpKind


def test_metric_labels_and_opcodes_are_the_kernels() -> None:
    # linux/aio_abi.h numbers, and the op="..." label values of the metrics.
    want = {"read": 0, "write": 1, "fsync": 2, "fdsync": 3, "poll": 5, "noop": 6,
            "readv": 7, "writev": 8}
    assert {k.value: k.opcode for k in OpKind} == want
    for label, code in want.items():
        assert OpKind.of(code) is OpKind(label)
    assert OpKind.of(4) is None


def test_an_op_knows_its_kind_and_its_syscall_name() -> None:
    buf = aio.aligned_buffer(4096)
    assert aio.read(0, buf, 0).kind is OpKind.READ
    assert aio.read(0, buf, 0).name == "pread"
    assert aio.write(0, buf, 0).name == "pwrite"
    assert aio.fsync(0).kind is OpKind.FSYNC and aio.fsync(0).name == "fsync"


def test_config_values_do_not_change() -> None:
    assert JOB_OPS == ("read", "randread", "write", "randwrite", "randrw", "fsync", "poll")


@pytest.mark.parametrize(("op", "kinds", "writes", "sequential"), [
    ("read", ("read",), False, True),
    ("randread", ("read",), False, False),
    ("write", ("write",), True, True),
    ("randwrite", ("write",), True, False),
    ("randrw", ("read", "write"), True, False),
    ("fsync", ("fsync",), False, False),
    ("poll", ("poll",), False, False),
])
def test_job_ops(op: str, kinds: tuple[str, ...], writes: bool, sequential: bool) -> None:
    mode = JobOp(op)
    assert tuple(k.value for k in mode.kinds) == kinds
    assert mode.writes is writes and mode.sequential is sequential
    assert buffer_bytes(op, 4, 4096) == 4 * 4096 * sum(k in ("read", "write") for k in kinds)
