"""The source's stream identity: generated from one snapshot of the manifest, so a live volume
cannot make the stream disagree with its own hello."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agents import tarstream
from agents.frames import FrameDecoder, FrameEncoder, FrameKind
from agents.source import FrameProducer, Snapshots, StreamIdentity


def produce(root: Path, identity: StreamIdentity, offset: int = 0) -> tuple[bytes, dict[str, Any]]:
    encoder = FrameEncoder(chunk_size=1 << 16)
    producer = FrameProducer(str(root), identity, offset, encoder)
    body = [
        encoder.hello(
            stream_id=identity.stream_id, start_offset=offset, total_size=identity.total_size
        )
    ]
    producer.start()
    while (frame := producer.next_frame()) is not None:
        body += frame
    assert producer.error is None
    body.append(encoder.trailer(producer.trailer(), producer.result.end_offset))
    decoder = FrameDecoder()
    frames = decoder.feed(b"".join(body))
    decoder.finish()
    raw = b"".join(f.raw for f in frames if f.kind is FrameKind.DATA)
    trailer = next(f.json for f in frames if f.kind is FrameKind.TRAILER)
    assert trailer is not None
    return raw, trailer


def test_a_file_growing_after_the_walk_keeps_the_announced_size(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    (root / "wal").write_bytes(b"x" * 100_000)
    (root / "other").write_bytes(b"o" * 10)
    identity = Snapshots(tmp_path / "snap").take(root, None)
    with open(root / "wal", "ab") as f:  # a database keeps writing
        f.write(b"y" * 50_000)
    raw, trailer = produce(root, identity)
    assert len(raw) == identity.total_size  # the decoder checked it against the hello too
    assert trailer["dirty"] == ["wal"]


def test_a_resume_meets_the_same_bytes_whatever_changed(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(bytes([i]) * 40_000)
    snapshots = Snapshots(tmp_path / "snap")
    first = snapshots.take(root, None)
    full, _ = produce(root, first)
    (root / "f0").write_bytes(b"changed and longer" * 10_000)  # before the resume point
    (root / "new").write_bytes(b"n")
    again = snapshots.find(first.stream_id)
    assert again is not None
    assert again.total_size == first.total_size
    offset = tarstream.entry_span(next(again.entries())) + 512 * 200
    rest, trailer = produce(root, again, offset - offset % 512)
    assert rest == full[offset - offset % 512 :]
    assert trailer["dirty"] == []  # f0 lies before the resume point: not read again


def test_snapshots_are_bounded_and_lookups_are_safe(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    snapshots = Snapshots(tmp_path / "snap", keep=3)
    for i in range(6):
        (root / f"f{i}").write_bytes(b"x")
        snapshots.take(root, None)
    assert len(list((tmp_path / "snap").glob("*.snap"))) == 3
    assert snapshots.find("../../etc/passwd") is None
    assert snapshots.find("m1-" + "0" * 32) is None


def _threads_end(producer: FrameProducer) -> bool:
    for thread in (producer._thread, producer._encoder):
        thread.join(timeout=10)
    return not producer._thread.is_alive() and not producer._encoder.is_alive()


def test_a_stream_stopped_early_ends_both_its_threads(tmp_path: Path) -> None:
    """A client that goes away stops the producer; neither the thread reading files nor the
    one encoding frames may stay blocked on a queue (each would hold frames in memory)."""
    root = tmp_path / "vol"
    root.mkdir()
    for i in range(40):
        (root / f"f{i}").write_bytes(os.urandom(64 << 10))
    identity = Snapshots(tmp_path / "snap").take(root, None)
    for taken in (0, 1, 3):
        producer = FrameProducer(str(root), identity, 0, FrameEncoder(chunk_size=1 << 16))
        producer.start()
        for _ in range(taken):
            assert producer.next_frame() is not None
        producer.stop()
        assert _threads_end(producer), taken


def test_an_encoder_failure_ends_the_stream_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    for i in range(40):
        (root / f"f{i}").write_bytes(os.urandom(64 << 10))
    identity = Snapshots(tmp_path / "snap").take(root, None)
    encoder = FrameEncoder(chunk_size=1 << 16)
    real = encoder.data_parts
    calls = []

    def failing(raw: bytes, offset: int) -> tuple[bytes, bytes]:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(raw, offset)

    monkeypatch.setattr(encoder, "data_parts", failing)
    producer = FrameProducer(str(root), identity, 0, encoder)
    producer.start()
    frames = 0
    while producer.next_frame() is not None:
        frames += 1
    assert frames == 2 and isinstance(producer.error, OSError)
    assert producer.result.end_offset == 2 * (1 << 16)  # where the error frame goes
    producer.stop()  # as the stream view does once it sent the error frame
    assert _threads_end(producer)
