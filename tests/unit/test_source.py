"""The source's stream identity: generated from one snapshot of the manifest, so a live volume
cannot make the stream disagree with its own hello."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
