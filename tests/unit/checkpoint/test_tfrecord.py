"""TFRecord framing: known CRC values, hand-framed files, atomic writes, damage reports.

The framing used as the expectation is built here with ``struct`` and
``google_crc32c`` directly (docs/semantics.md §6.2), not with the module under test.
"""

from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from ps_server.checkpoint.tfrecord import (
    TFRecordWriter,
    crc32c,
    frame_record,
    frame_records,
    masked_crc32c,
    read_framed,
    read_records,
)
from ps_server.errors import CheckpointCorruptError


def hand_mask(data: bytes) -> int:
    c = int(google_crc32c.value(data))
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def hand_frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", hand_mask(length)) + record + struct.pack(
        "<I", hand_mask(record)
    )


def hand_read(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        assert struct.unpack_from("<I", data, pos + 8)[0] == hand_mask(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        assert struct.unpack_from("<I", data, pos + 12 + length)[0] == hand_mask(payload)
        out.append(payload)
        pos += 16 + length
    return out


RECORDS = [b"", b"a", b"hello world", bytes(range(256)) * 3, b"\x00" * 17]


def test_known_crc_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert masked_crc32c(bytes(8)) == 0x07980329
    # mask(0xE3069283) = ((c >> 15) | (c << 17)) + 0xA282EAD8 mod 2^32
    c = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % (
        1 << 32
    )


def test_empty_record_framing() -> None:
    # 8 zero length bytes, their masked CRC 0x07980329, no data, masked CRC of b"" (crc 0).
    assert frame_record(b"") == bytes(8) + struct.pack("<II", 0x07980329, 0xA282EAD8)


def test_hand_framed_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "hand"
    path.write_bytes(b"".join(hand_frame(r) for r in RECORDS))
    assert list(read_records(path)) == RECORDS
    chunks = list(read_framed(path))
    got = [buf[a:b].tobytes() for buf, offs in chunks for a, b in itertools.pairwise(offs)]
    assert got == RECORDS
    assert all(offs[0] == 0 and offs.dtype == np.int64 for _, offs in chunks)


def test_our_file_is_read_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "ours"
    with TFRecordWriter(path) as w:
        w.write(RECORDS[0])
        w.write_many(RECORDS[1:3])
        data = np.frombuffer(b"".join(RECORDS[3:]), dtype=np.uint8)
        w.write_buffer(data, [0, len(RECORDS[3]), len(RECORDS[3]) + len(RECORDS[4])])
    assert hand_read(path) == RECORDS
    assert path.read_bytes() == b"".join(hand_frame(r) for r in RECORDS)
    assert w.records_written == len(RECORDS)


def test_frame_records_matches_hand_framing() -> None:
    payload = b"".join(RECORDS)
    bounds = np.cumsum([0] + [len(r) for r in RECORDS])
    assert frame_records(np.frombuffer(payload, dtype=np.uint8), bounds) == b"".join(
        hand_frame(r) for r in RECORDS
    )
    # Offsets need not start at 0: the records are buffer[offsets[i]:offsets[i+1]].
    shifted = np.frombuffer(b"xyz" + payload, dtype=np.uint8)
    assert frame_records(shifted, bounds[2:] + 3) == b"".join(hand_frame(r) for r in RECORDS[2:])
    assert frame_records(np.zeros(0, dtype=np.uint8), [0]) == b""
    with pytest.raises(ValueError):
        frame_records(np.zeros(4, dtype=np.uint8), [0, 5])


def test_chunked_reading_returns_every_record(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 300, 200)]
    path = tmp_path / "many"
    path.write_bytes(b"".join(hand_frame(r) for r in records))
    for chunk in (12, 64, 1000, 1 << 20):
        chunks = list(read_framed(path, chunk_bytes=chunk))
        got = [buf[a:b].tobytes() for buf, offs in chunks for a, b in itertools.pairwise(offs)]
        assert got == records, chunk
    assert [offs.size for _, offs in read_framed(path, 1 << 20)] == [201]  # one chunk


def test_writer_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "dir" / "file"
    w = TFRecordWriter(final)  # parent directories are created
    w.write(b"abc")
    assert not final.exists()
    tmp = Path(w.tmp_path)
    assert tmp.parent == final.parent and tmp.name.startswith("file-tmp-")
    assert len(tmp.name) == len("file-tmp-") + 16 and int(tmp.name[-16:], 16) >= 0
    w.close()
    assert final.exists() and not tmp.exists()
    assert hand_read(final) == [b"abc"]
    assert os.listdir(final.parent) == ["file"]


def test_writer_failure_keeps_the_old_file(tmp_path: Path) -> None:
    final = tmp_path / "file"
    final.write_bytes(hand_frame(b"old"))
    with pytest.raises(RuntimeError), TFRecordWriter(final) as w:
        w.write(b"new")
        raise RuntimeError("boom")
    assert hand_read(final) == [b"old"]
    assert os.listdir(tmp_path) == ["file"]  # temporary file removed


def damaged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "damaged"
    path.write_bytes(data)
    return path


def read_all(path: Path) -> list[bytes]:
    return list(read_records(path))


def test_damage_is_reported_with_file_offset_and_problem(tmp_path: Path) -> None:
    first, second = b"first record", b"second"
    good = hand_frame(first) + hand_frame(second)
    at = 16 + len(first)  # byte offset of the second record

    def flip(pos: int) -> bytes:
        b = bytearray(good)
        b[pos] ^= 0x01
        return bytes(b)

    cases = [
        (flip(at + 2), f"byte offset {at}: bad length CRC"),  # length field
        (flip(at + 9), f"byte offset {at}: bad length CRC"),  # length CRC
        (flip(at + 13), f"byte offset {at}: bad data CRC"),  # payload
        (flip(len(good) - 1), f"byte offset {at}: bad data CRC"),  # data CRC
        (flip(3), "byte offset 0: bad length CRC"),
        (good[: at + 5], f"byte offset {at}: truncated header"),
        (good[: at + 14], f"byte offset {at}: truncated data"),
        (good[:-1], f"byte offset {at}: truncated data"),
    ]
    for data, message in cases:
        path = damaged(tmp_path, data)
        with pytest.raises(CheckpointCorruptError, match=message) as err:
            read_all(path)
        assert str(path) in str(err.value)
        with pytest.raises(CheckpointCorruptError, match=message):
            list(read_framed(path, chunk_bytes=16))


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert read_all(path) == []
    with TFRecordWriter(tmp_path / "none"):
        pass
    assert (tmp_path / "none").read_bytes() == b""
