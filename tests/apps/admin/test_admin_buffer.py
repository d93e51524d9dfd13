"""A job's output file as the agent reads it: absolute offsets, the end followed as the
supervisor appends, discarded bytes (holes) refused by offset, not shifted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from korinet_admin.jobs import OutputDiscarded, OutputFile


def read_all(output: OutputFile, offset: int, step: int = 7) -> bytes:
    parts = []
    while offset < output.end:
        data = output.read(offset, step)
        assert data, "read returned nothing before the end"
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


def append(path: Path, data: bytes) -> None:
    """As the supervisor writes: O_APPEND, byte N of the stream at file offset N."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_reads_any_offset_and_follows_the_end(tmp_path: Path) -> None:
    path = tmp_path / "stdout"
    output = OutputFile(path)
    assert not output.refresh() and output.end == 0  # no file yet: nothing written
    expected = b"".join(bytes([i]) * (i * 3 + 1) for i in range(40))
    append(path, expected[:100])
    assert output.refresh() and output.end == 100
    append(path, expected[100:])
    assert output.read(0, 1000) == expected[:100], "read past the end it knows of"
    assert output.refresh() and not output.refresh()
    for offset in (0, 1, 17, 500, len(expected) - 1):
        assert read_all(output, offset) == expected[offset:]
    assert output.read(len(expected), 10) == b""
    with pytest.raises(ValueError):
        output.read(len(expected) + 1, 10)
    output.close()


def test_discarded_bytes_are_refused_and_offsets_stay(tmp_path: Path) -> None:
    path = tmp_path / "stdout"
    data = b"".join(i.to_bytes(4, "big") for i in range(300_000))  # 1.2 MB
    append(path, data)
    output = OutputFile(path)
    output.refresh()
    assert output.discard(1000) == 1000 and output.start == 1000
    assert output.retained == len(data) - 1000
    with pytest.raises(OutputDiscarded) as info:
        output.read(999, 10)
    assert info.value.start == 1000
    assert read_all(output, 1000, 99_999) == data[1000:]
    assert output.discard(500) == 0, "start never moves down"
    # a large discard frees disk blocks (a hole) where the file system can, offsets unchanged
    blocks = os.stat(path).st_blocks
    output.discard(1_000_000)
    assert os.stat(path).st_size == len(data)
    assert os.stat(path).st_blocks <= blocks
    assert read_all(output, 1_000_000, 50_000) == data[1_000_000:]
    output.close()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 3000)),
            st.tuples(st.just("discard"), st.integers(0, 4000)),
            st.tuples(st.just("read"), st.integers(0, 5000)),
        ),
        max_size=60,
    )
)
def test_matches_a_plain_bytes_model(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:
    path = tmp_path_factory.mktemp("model") / "stdout"
    output = OutputFile(path)
    model = bytearray()
    start = 0
    counter = 0
    for op, n in ops:
        if op == "append":
            chunk = bytes((counter + i) % 251 for i in range(n))
            counter += n
            append(path, chunk)
            model += chunk
            output.refresh()
        elif op == "discard":
            target = min(start + n, len(model))
            assert output.discard(target) == max(0, target - start)
            start = max(start, target)
        else:
            offset = start + n % (len(model) - start + 1)
            assert read_all(output, offset, 777) == bytes(model[offset:])
        assert output.end == len(model) and output.start == start
    output.close()
