"""The output buffer: absolute offsets, memory bound, spill to disk, acknowledgement."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from korinet_admin.jobs import OutputBuffer, OutputDiscarded


def read_all(buffer: OutputBuffer, offset: int, step: int = 7) -> bytes:
    parts = []
    while offset < buffer.end:
        data = buffer.read(offset, step)
        assert data, "read returned nothing before the end"
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


def test_reads_across_chunks_at_any_offset(tmp_path: Path) -> None:
    buffer = OutputBuffer(tmp_path / "spill", memory_limit=1 << 20)
    expected = b"".join(bytes([i]) * (i * 3 + 1) for i in range(40))
    for i in range(40):
        buffer.append(bytes([i]) * (i * 3 + 1))
    assert buffer.end == len(expected)
    for offset in (0, 1, 17, 500, len(expected) - 1):
        assert read_all(buffer, offset) == expected[offset:]
    assert buffer.read(len(expected), 10) == b""
    with pytest.raises(ValueError):
        buffer.read(len(expected) + 1, 10)


def test_past_the_memory_bound_older_bytes_spill_to_disk(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    buffer = OutputBuffer(spill, memory_limit=64 * 1024)
    data = bytes(range(256)) * 4096  # 1 MiB
    for i in range(0, len(data), 10_000):
        buffer.append(data[i : i + 10_000])
    assert buffer.in_memory <= 64 * 1024 + 64 * 1024  # the bound, plus one coalesced chunk
    assert buffer.spilled > 0 and spill.exists() and spill.stat().st_size == buffer.spilled
    assert read_all(buffer, 0, 50_000) == data
    assert read_all(buffer, 123_457, 3_333) == data[123_457:]


def test_acknowledged_bytes_are_forgotten_and_the_disk_given_back(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    buffer = OutputBuffer(spill, memory_limit=32 * 1024)
    data = b"".join(i.to_bytes(4, "big") for i in range(50_000))  # 200 KB
    for i in range(0, len(data), 4096):
        buffer.append(data[i : i + 4096])
    assert buffer.on_disk > 0
    buffer.acknowledge(1000)
    assert buffer.start == 1000 and buffer.retained == len(data) - 1000
    with pytest.raises(OutputDiscarded) as info:
        buffer.read(999, 10)
    assert info.value.start == 1000
    assert read_all(buffer, 1000, 9999) == data[1000:]
    buffer.acknowledge(len(data) - 10)  # past the spilled part: the file is emptied
    assert spill.stat().st_size == 0 and buffer.on_disk == 0
    assert buffer.read(len(data) - 10, 100) == data[-10:]
    # spilling again after the file was emptied keeps offsets right
    more = bytes(range(256)) * 1000
    buffer.append(more)
    assert buffer.on_disk > 0
    assert read_all(buffer, len(data) - 10, 5000) == data[-10:] + more


def test_acknowledged_bytes_never_reach_the_disk(tmp_path: Path) -> None:
    buffer = OutputBuffer(tmp_path / "spill", memory_limit=100)
    buffer.append(b"a" * 60)
    buffer.acknowledge(60)
    buffer.append(b"b" * 60)  # over the bound: the chunk spills, minus what was acknowledged
    assert buffer.spilled <= 60
    assert buffer.read(60, 100) == b"b" * 60


def test_close_deletes_the_spill_file(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    buffer = OutputBuffer(spill, memory_limit=10)
    buffer.append(b"x" * 100)
    buffer.append(b"y" * 100)
    assert spill.exists()
    buffer.close()
    assert not spill.exists()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 3000)),
            st.tuples(st.just("ack"), st.integers(0, 4000)),
            st.tuples(st.just("read"), st.integers(0, 5000)),
        ),
        max_size=60,
    ),
    limit=st.sampled_from([16, 1000, 5000, 1 << 20]),
)
def test_matches_a_plain_bytes_model(tmp_path_factory: pytest.TempPathFactory, ops: list, limit: int) -> None:
    buffer = OutputBuffer(tmp_path_factory.mktemp("model") / "spill", memory_limit=limit)
    model = bytearray()
    start = 0
    counter = 0
    for op, n in ops:
        if op == "append":
            chunk = bytes((counter + i) % 251 for i in range(n))
            counter += n
            buffer.append(chunk)
            model += chunk
        elif op == "ack":
            start = max(start, min(start + n, len(model)))
            buffer.acknowledge(start)
        else:
            offset = start + n % (len(model) - start + 1)
            assert read_all(buffer, offset, 777) == bytes(model[offset:])
        assert buffer.end == len(model) and buffer.start == start
    buffer.close()
