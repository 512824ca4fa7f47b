"""Frames: byte-in/byte-out round trips, every corruption, the `auto` rule with injected rates."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import zstandard

from agents import frames
from agents.frames import (
    HEADER_SIZE,
    MIN_CHUNK_SIZE,
    Codec,
    Compression,
    CompressionPolicy,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameKind,
)

CHUNK = MIN_CHUNK_SIZE  # 64 KiB keeps the tests fast; the rules do not depend on the size
MiB = 1024 * 1024


def compressible(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [b"usr", b"lib", b"python3", b"site-packages", b"\0" * 40, b"0000644", b"root"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def stream(
    data: bytes,
    *,
    start: int = 0,
    compression: Compression = Compression.NONE,
    chunk: int = CHUNK,
    trailer: dict[str, Any] | None = None,
    stream_id: str = "s1",
) -> bytes:
    """A complete body serving `data` (the whole tar stream) from `start`, cut as the source
    cuts it."""
    enc = FrameEncoder(chunk_size=chunk, compression=compression)
    out = [enc.hello(stream_id=stream_id, start_offset=start, total_size=len(data))]
    offset = start
    while offset < len(data):
        n = min(frames.next_chunk_length(offset, chunk), len(data) - offset)
        out.append(enc.data(data[offset : offset + n], offset))
        offset += n
    out.append(enc.trailer(trailer if trailer is not None else {"ok": True}, offset))
    return b"".join(out)


def decode_all(body: bytes, splits: list[int] | None = None, **kw: Any) -> list[Frame]:
    """Decode `body` both ways a reader can — `feed` in arbitrary splits, and frame by frame
    (`read_header` + `read_frame`, as the pull does) — and check that they agree, on the
    frames or on the error."""
    fed = _outcome(lambda: _decode_fed(body, splits, **kw))
    by_frame = _outcome(lambda: _decode_by_frame(body, **kw))
    if isinstance(fed, frames.FrameError):
        assert type(by_frame) is type(fed), (fed, by_frame)
        raise fed
    assert isinstance(by_frame, list), by_frame
    assert [(f.kind, f.raw_offset, f.raw, f.json) for f in by_frame] == [
        (f.kind, f.raw_offset, f.raw, f.json) for f in fed
    ]
    return fed


def _outcome(decode: Callable[[], list[Frame]]) -> list[Frame] | frames.FrameError:
    try:
        return decode()
    except frames.FrameError as e:
        return e


def _decode_fed(body: bytes, splits: list[int] | None, **kw: Any) -> list[Frame]:
    dec = FrameDecoder(**kw)
    got: list[Frame] = []
    if splits is None:
        got += dec.feed(body)
    else:
        pos = 0
        for n in splits:
            got += dec.feed(body[pos : pos + n])
            pos += n
        got += dec.feed(body[pos:])
    dec.finish()
    return got


def _decode_by_frame(body: bytes, **kw: Any) -> list[Frame]:
    dec = FrameDecoder(**kw)
    got: list[Frame] = []
    pos = 0
    while pos < len(body) or not dec.done:
        head_bytes = body[pos : pos + HEADER_SIZE]
        if not head_bytes:
            dec.finish()
        head = dec.read_header(head_bytes)
        pos += HEADER_SIZE
        got.append(dec.read_frame(head, body[pos : pos + head.payload_length]))
        pos += head.payload_length
    return got


def data_of(got: list[Frame]) -> bytes:
    return b"".join(f.raw for f in got if f.kind is FrameKind.DATA)


def hello(start: int = 0, total: int | None = None, chunk: int = CHUNK, **extra: Any) -> bytes:
    doc = {
        "protocol": 1,
        "stream_id": "s1",
        "chunk_size": chunk,
        "start_offset": start,
        "total_size": total,
        "compression": "none",
        **extra,
    }
    return frames.encode_json_frame(FrameKind.HELLO, doc, start)


def data_frame(raw: bytes, offset: int) -> bytes:
    return frames.encode_data_frame(raw, offset)


def trailer(offset: int) -> bytes:
    return frames.encode_json_frame(FrameKind.TRAILER, {}, offset)


# --- layout -----------------------------------------------------------------------------------


def test_header_layout_is_byte_exact() -> None:
    raw = b"x" * 1024
    frame = frames.encode_data_frame(raw, 0x0102030405060708)
    head = frame[:HEADER_SIZE]
    assert head[0:4] == b"VMF1"
    assert head[4] == 1 and head[5] == 0
    assert head[6:8] == b"\0\0"
    assert head[8:16] == bytes.fromhex("0102030405060708")
    assert struct.unpack(">II", head[16:24]) == (1024, 1024)
    assert head[24:56] == hashlib.sha256(raw).digest()
    assert head[56:60] == b"\0\0\0\0"
    assert struct.unpack(">I", head[60:64])[0] == zlib.crc32(head[:60])
    assert frame[HEADER_SIZE:] == raw


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_round_trip(compression: Compression) -> None:
    data = compressible(5 * CHUNK + 1536)
    got = decode_all(stream(data, compression=compression, trailer={"dirty": ["a"]}))
    assert [f.kind for f in got] == [FrameKind.HELLO] + [FrameKind.DATA] * 6 + [FrameKind.TRAILER]
    assert data_of(got) == data
    assert got[-1].json == {"dirty": ["a"]}
    assert got[0].json is not None and got[0].json["compression"] == compression.value
    codecs = {f.codec for f in got if f.kind is FrameKind.DATA}
    assert codecs == ({Codec.NONE} if compression is Compression.NONE else {Codec.ZSTD})


def test_zstd_payload_is_smaller_on_compressible_data() -> None:
    raw = compressible(CHUNK)
    frame = frames.encode_data_frame(raw, 0, Codec.ZSTD)
    assert frame[5] == Codec.ZSTD
    assert len(frame) - HEADER_SIZE < len(raw) // 2


def test_incompressible_data_goes_uncompressed() -> None:
    data = os.urandom(2 * CHUNK)
    body = stream(data, compression=Compression.ZSTD)
    got = decode_all(body)
    assert data_of(got) == data
    assert {f.codec for f in got if f.kind is FrameKind.DATA} == {Codec.NONE}
    assert frames.compress_chunk(data) is None


def test_resumed_stream_first_frame_ends_at_chunk_boundary() -> None:
    data = compressible(4 * CHUNK + 700)
    start = CHUNK + 3 * 512
    got = decode_all(stream(data, start=start), expect_offset=start, expect_stream_id="s1")
    spans = [(f.raw_offset, f.end_offset) for f in got if f.kind is FrameKind.DATA]
    assert spans == [
        (start, 2 * CHUNK),
        (2 * CHUNK, 3 * CHUNK),
        (3 * CHUNK, 4 * CHUNK),
        (4 * CHUNK, 4 * CHUNK + 700),
    ]
    assert data_of(got) == data[start:]
    assert got[-1].raw_offset == len(data)


def test_resume_at_the_end_has_no_data_frames() -> None:
    data = compressible(CHUNK)
    got = decode_all(stream(data, start=CHUNK))
    assert [f.kind for f in got] == [FrameKind.HELLO, FrameKind.TRAILER]


def test_decoder_fed_byte_by_byte() -> None:
    data = compressible(CHUNK + 2048, seed=7)
    body = stream(data, compression=Compression.ZSTD)
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(body)):
        got += dec.feed(body[i : i + 1])
    dec.finish()
    assert data_of(got) == data


@pytest.mark.parametrize("seed", range(5))
def test_decoder_fed_in_odd_splits(seed: int) -> None:
    data = compressible(3 * CHUNK + 4096, seed=seed)
    body = stream(data, compression=Compression.AUTO)
    rng = random.Random(seed)
    splits = [rng.choice([1, 3, 63, 64, 65, 511, 4097, CHUNK + 1]) for _ in range(400)]
    assert data_of(decode_all(body, splits)) == data


def test_frame_by_frame_inflates_one_frame_at_a_time() -> None:
    """A body of frames that compress ~100:1 decodes with one raw chunk in memory at a time:
    the reader asks for each frame's payload after the last one was used."""
    data = b"\0" * (8 * CHUNK)
    body = stream(data, compression=Compression.ZSTD)
    assert len(body) < len(data) // 20
    dec = FrameDecoder()
    pos, out = 0, bytearray()
    while not dec.done:
        head = dec.read_header(body[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        frame = dec.read_frame(head, body[pos : pos + head.payload_length])
        pos += head.payload_length
        if frame.kind is FrameKind.DATA:
            assert len(frame.raw) <= CHUNK
            out += frame.raw
    assert bytes(out) == data and pos == len(body)
    with pytest.raises(frames.ProtocolViolation):
        dec.read_header(b"\0" * HEADER_SIZE)


def test_decoder_state_after_hello() -> None:
    dec = FrameDecoder()
    dec.feed(hello(start=1024, total=9000))
    assert (dec.chunk_size, dec.total_size, dec.next_offset) == (CHUNK, 9000, 1024)


# --- corruption and lies ----------------------------------------------------------------------


def flip(body: bytes, index: int) -> bytes:
    return body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]


def rewrite_header(body: bytes, at: int, **fields: int) -> bytes:
    """Change header fields of the frame at byte `at` and recompute its CRC (a lying frame)."""
    names = ["magic", "kind", "codec", "flags", "raw_offset", "raw_length", "payload_length"]
    names += ["sha256", "reserved"]
    values = dict(zip(names, struct.unpack(">4sBBHQII32sI", body[at : at + 60]), strict=True))
    values.update(fields)
    head = struct.pack(">4sBBHQII32sI", *values.values())
    return body[:at] + head + struct.pack(">I", zlib.crc32(head)) + body[at + 64 :]


def expect(body: bytes, error: type[frames.FrameError], **kw: Any) -> frames.FrameError:
    with pytest.raises(error) as info:
        decode_all(body, **kw)
    return info.value


HELLO_LEN = len(hello())
RAW = compressible(CHUNK)


def plain_body() -> bytes:
    return hello() + data_frame(RAW, 0) + trailer(CHUNK)


def test_flipped_payload_byte_is_a_checksum_mismatch() -> None:
    err = expect(flip(plain_body(), HELLO_LEN + HEADER_SIZE + 100), frames.ChecksumMismatch)
    assert err.retryable and err.code == "checksum_mismatch" and err.offset == 0


@pytest.mark.parametrize("index", [4, 5, 9, 17, 21, 30, 57, 61])
def test_flipped_header_byte_is_header_corrupt(index: int) -> None:
    err = expect(flip(plain_body(), HELLO_LEN + index), frames.HeaderCorrupt)
    assert err.retryable


def test_flipped_magic_is_bad_magic() -> None:
    err = expect(flip(plain_body(), 0), frames.BadMagic)
    assert not err.retryable


def test_not_a_frame_stream_is_bad_magic() -> None:
    expect(b"<html>502 Bad Gateway</html>" + b" " * 64, frames.BadMagic)


@pytest.mark.parametrize(
    "cut", [1, HELLO_LEN - 1, HELLO_LEN, HELLO_LEN + 10, HELLO_LEN + HEADER_SIZE + 5, -1]
)
def test_truncated_stream(cut: int) -> None:
    err = expect(plain_body()[:cut], frames.Truncated)
    assert err.retryable and err.code == "truncated"


def test_stream_without_trailer_is_truncated() -> None:
    expect(hello() + data_frame(RAW, 0), frames.Truncated)


def lying_zstd(declared: int, header_raw_length: int) -> bytes:
    """A zstd data frame whose payload declares `declared` bytes of content."""
    raw = b"\0" * declared
    payload = zstandard.ZstdCompressor().compress(raw)
    sha = hashlib.sha256(raw[:header_raw_length]).digest()
    return frames.encode_frame(FrameKind.DATA, Codec.ZSTD, 0, header_raw_length, sha, payload)


def test_zstd_declaring_more_than_raw_length_is_refused_before_decompressing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decompress(*args: object, **kw: object) -> bytes:
        raise AssertionError("decompressed an untrusted frame")

    monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress", no_decompress)
    # A 1 GiB bomb in a few dozen bytes, claiming to be 4 KiB.
    bomb = lying_zstd(1 << 30, 4096)
    assert len(bomb) < 64 * 1024
    err = expect(hello() + bomb, frames.SizeMismatch)
    assert not err.retryable


def test_zstd_without_content_size_is_refused() -> None:
    raw = compressible(4096)
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    frame = frames.encode_frame(
        FrameKind.DATA, Codec.ZSTD, 0, len(raw), hashlib.sha256(raw).digest(), payload
    )
    expect(hello() + frame, frames.SizeMismatch)


def test_zstd_with_extra_data_after_the_frame_is_refused() -> None:
    raw = compressible(4096)
    comp = zstandard.ZstdCompressor()
    payload = comp.compress(raw) + comp.compress(raw)
    frame = frames.encode_frame(
        FrameKind.DATA, Codec.ZSTD, 0, len(raw), hashlib.sha256(raw).digest(), payload
    )
    expect(hello() + frame, frames.ChecksumMismatch)


def test_oversized_data_frame_is_refused_from_the_header() -> None:
    # Claims 1 GiB of payload; refused before it is buffered.
    frame = frames.encode_frame(FrameKind.DATA, Codec.NONE, 0, CHUNK + 512, b"\0" * 32, b"")
    frame = rewrite_header(frame, 0, payload_length=1 << 30, raw_length=1 << 30)
    dec = FrameDecoder()
    dec.feed(hello())
    with pytest.raises(frames.FrameTooLarge):
        dec.feed(frame)


def test_oversized_json_frame_is_refused_from_the_header() -> None:
    frame = rewrite_header(hello(), 0, payload_length=1 << 31, raw_length=1 << 31)
    with pytest.raises(frames.FrameTooLarge):
        FrameDecoder().feed(frame[:HEADER_SIZE])


def test_hello_chunk_size_above_decoder_limit_is_refused() -> None:
    expect(hello(chunk=4 * MiB), frames.FrameTooLarge, max_raw_length=MiB)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"kind": 7}, frames.BadKind),
        ({"codec": 2}, frames.BadCodec),
        ({"flags": 1}, frames.ProtocolViolation),
        ({"reserved": 1}, frames.ProtocolViolation),
        ({"payload_length": CHUNK - 1}, frames.SizeMismatch),
        ({"codec": 1, "payload_length": CHUNK + 1}, frames.SizeMismatch),
        ({"raw_offset": 512}, frames.OutOfOrder),
        ({"raw_length": 0, "payload_length": 0}, frames.ProtocolViolation),
    ],
)
def test_lying_data_frame_header(fields: dict[str, int], error: type[frames.FrameError]) -> None:
    body = hello() + rewrite_header(data_frame(RAW, 0), 0, **fields)
    dec = FrameDecoder()
    # The hello is handed over; the lie is raised by the next call.
    assert [f.kind for f in dec.feed(body)] == [FrameKind.HELLO]
    with pytest.raises(error):
        dec.finish()


def test_unknown_kind_is_refused_even_first() -> None:
    expect(rewrite_header(hello(), 0, kind=4), frames.BadKind)


def test_compressed_json_frame_is_refused() -> None:
    expect(rewrite_header(hello(), 0, codec=1), frames.SizeMismatch)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (lambda: data_frame(RAW, 0), frames.ProtocolViolation),  # data before hello
        (lambda: hello() + hello(), frames.ProtocolViolation),
        (lambda: hello() + data_frame(RAW, CHUNK), frames.OutOfOrder),  # gap
        (lambda: hello() + data_frame(RAW, 0) + data_frame(RAW, 0), frames.OutOfOrder),  # repeat
        # a short frame that is not the last
        (
            lambda: hello() + data_frame(RAW[:512], 0) + data_frame(RAW, 512),
            frames.ProtocolViolation,
        ),
        (lambda: hello(start=512) + data_frame(RAW, 512), frames.ProtocolViolation),  # crosses
        (lambda: hello(total=1024) + data_frame(RAW[:2048], 0), frames.SizeMismatch),
        (lambda: hello(total=4096) + trailer(0), frames.SizeMismatch),  # short of total_size
        (lambda: hello() + trailer(512), frames.OutOfOrder),
        (lambda: plain_body() + hello(), frames.ProtocolViolation),  # after the trailer
        (lambda: plain_body() + b"\0", frames.ProtocolViolation),
    ],
)
def test_sequence_violations(body: Callable[[], bytes], error: type[frames.FrameError]) -> None:
    expect(body(), error)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"protocol": 2}, frames.UnsupportedProtocol),
        ({"protocol": True}, frames.UnsupportedProtocol),
        ({"stream_id": ""}, frames.ProtocolViolation),
        ({"chunk_size": 1000}, frames.ProtocolViolation),
        ({"chunk_size": "8"}, frames.ProtocolViolation),
        ({"start_offset": 512}, frames.ProtocolViolation),  # differs from the frame's offset
        ({"total_size": -1}, frames.ProtocolViolation),
        ({"compression": "lz4"}, frames.ProtocolViolation),
    ],
)
def test_bad_hello(change: dict[str, Any], error: type[frames.FrameError]) -> None:
    expect(hello(**change) if "start_offset" not in change else _hello_at(0, change), error)


def _hello_at(offset: int, change: dict[str, Any]) -> bytes:
    doc = {"protocol": 1, "stream_id": "s", "chunk_size": CHUNK, "start_offset": 0}
    doc |= {"total_size": None, "compression": "none"} | change
    return frames.encode_json_frame(FrameKind.HELLO, doc, offset)


def test_unaligned_hello_offset_is_refused() -> None:
    expect(hello(start=100), frames.ProtocolViolation)


def test_hello_for_another_offset_or_stream_is_refused() -> None:
    expect(hello(start=512), frames.ProtocolViolation, expect_offset=1024)
    expect(hello(), frames.ProtocolViolation, expect_stream_id="other")


def test_json_frame_that_is_not_an_object() -> None:
    payload = b"[1, 2]"
    frame = frames.encode_frame(
        FrameKind.HELLO, Codec.NONE, 0, len(payload), hashlib.sha256(payload).digest(), payload
    )
    expect(frame, frames.ProtocolViolation)


def test_error_frame_ends_the_stream() -> None:
    enc = FrameEncoder(chunk_size=CHUNK, compression=Compression.NONE)
    body = enc.hello(stream_id="s", start_offset=0, total_size=None) + enc.data(RAW, 0)
    body += enc.error("volume_not_readable", "gone", CHUNK)
    got = decode_all(body)
    assert got[-1].kind is FrameKind.ERROR
    assert got[-1].json == {"code": "volume_not_readable", "message": "gone"}


def test_error_frame_needs_code_and_message() -> None:
    bad = frames.encode_json_frame(FrameKind.ERROR, {"code": 1}, 0)
    expect(hello() + bad, frames.ProtocolViolation)


def test_unknown_json_fields_are_ignored() -> None:
    got = decode_all(hello(future_field={"x": 1}) + trailer(0))
    assert got[0].json is not None and got[0].json["future_field"] == {"x": 1}


# --- encoder guards ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 512, MIN_CHUNK_SIZE - 512, MIN_CHUNK_SIZE + 1, 128 * MiB])
def test_invalid_chunk_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        FrameEncoder(chunk_size=size)


def test_encoder_refuses_a_frame_crossing_a_chunk_boundary() -> None:
    enc = FrameEncoder(chunk_size=CHUNK, compression=Compression.NONE)
    with pytest.raises(ValueError, match="do not fit"):
        enc.data(b"x" * 1024, CHUNK - 512)
    with pytest.raises(ValueError, match="do not fit"):
        enc.data(b"", 0)


def test_encoder_refuses_an_unaligned_start() -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        FrameEncoder().hello(stream_id="s", start_offset=100, total_size=None)


# --- digests ----------------------------------------------------------------------------------


def test_composite_digest_is_stable() -> None:
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    expected = "sha256:" + hashlib.sha256(b"".join(digests)).hexdigest()
    assert frames.composite_digest(digests) == expected
    assert frames.composite_digest(reversed(digests)) != expected
    assert frames.composite_digest([]) == "sha256:" + hashlib.sha256(b"").hexdigest()
    # Pinned: a change of definition breaks every recorded transfer digest.
    assert frames.composite_digest([b"\0" * 32]) == (
        "sha256:66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
    )


def test_composite_digest_survives_a_chunk_aligned_resume() -> None:
    data = compressible(3 * CHUNK + 100)
    whole = [f.sha256 for f in decode_all(stream(data)) if f.kind is FrameKind.DATA]
    first = [f.sha256 for f in decode_all(stream(data[: 2 * CHUNK])) if f.kind is FrameKind.DATA]
    rest = [f.sha256 for f in decode_all(stream(data, start=2 * CHUNK)) if f.kind is FrameKind.DATA]
    assert frames.composite_digest(first + rest) == frames.composite_digest(whole)


def test_encoder_keeps_the_composite_digest_of_its_frames() -> None:
    data = compressible(2 * CHUNK)
    enc = FrameEncoder(chunk_size=CHUNK, compression=Compression.ZSTD)
    enc.data(data[:CHUNK], 0)
    enc.data(data[CHUNK:], CHUNK)
    digests = [hashlib.sha256(data[:CHUNK]).digest(), hashlib.sha256(data[CHUNK:]).digest()]
    assert enc.digest.value() == frames.composite_digest(digests)
    assert enc.digest.count == 2


def test_composite_digest_refuses_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        frames.composite_digest([b"short"])


# --- the compression policy (injected numbers, no timing) -------------------------------------


def auto_policy(
    link: float | None, comp: float | None, ratio: float = 0.3, probe_every: int = 4
) -> CompressionPolicy:
    policy = CompressionPolicy(Compression.AUTO, probe_every=probe_every)
    if link is not None:
        policy.observe_send(100 * MiB, 100 * MiB / link)
    if comp is not None:
        policy.observe_compress(100 * MiB, int(100 * MiB * ratio), 100 * MiB / comp)
    return policy


@pytest.mark.parametrize(
    ("link", "comp", "ratio", "expected"),
    [
        (None, None, 0.3, True),  # nothing measured: compress, to measure the compressor
        (100e6, None, 0.3, True),
        (None, 500e6, 0.3, True),
        (100e6, 500e6, 0.3, True),  # 1 Gbit/s link, 500 MB/s compressor: link-bound
        (1000e6, 500e6, 0.3, False),  # 10 Gbit/s link: the compressor would be the bottleneck
        (500e6, 500e6, 0.3, False),  # equal: no gain
        (100e6, 500e6, 0.98, False),  # saves under 3 %: no gain
        (100e6, 500e6, 0.97, True),
    ],
)
def test_auto_rule(link: float | None, comp: float | None, ratio: float, expected: bool) -> None:
    assert auto_policy(link, comp, ratio).should_compress() is expected


def test_auto_probes_while_off() -> None:
    policy = auto_policy(1000e6, 500e6, probe_every=4)
    assert [policy.should_compress() for _ in range(8)] == [False, False, False, True] * 2


def test_auto_follows_the_link() -> None:
    policy = auto_policy(1000e6, 500e6)
    assert not policy.should_compress()
    # The link slows down (shared with production traffic): after a few hundred MiB the
    # decaying average follows and compression turns on.
    for _ in range(10):
        policy.observe_send(32 * MiB, 32 * MiB / 50e6)
    link = policy.link_rate
    assert link is not None and link < 100e6
    assert policy.should_compress()


def test_fixed_modes_ignore_rates() -> None:
    none = CompressionPolicy(Compression.NONE)
    zstd = CompressionPolicy(Compression.ZSTD)
    for policy in (none, zstd):
        policy.observe_send(MiB, 100.0)
        policy.observe_compress(MiB, MiB, 100.0)
    assert not none.should_compress()
    assert zstd.should_compress()


def test_zero_second_sends_mean_the_link_is_not_the_bottleneck() -> None:
    policy = auto_policy(None, 500e6)
    policy.observe_send(MiB, 0.0)
    assert policy.link_rate == float("inf")
    assert not policy.should_compress()


def test_encoder_reports_compression_time_to_its_policy() -> None:
    ticks = iter([0.0, 0.01, 1.0, 1.02])
    enc = FrameEncoder(chunk_size=CHUNK, compression=Compression.ZSTD, clock=lambda: next(ticks))
    data = compressible(2 * CHUNK)
    enc.data(data[:CHUNK], 0)
    enc.data(data[CHUNK:], CHUNK)
    rate, ratio = enc.policy.compress_rate, enc.policy.ratio
    assert rate is not None and ratio is not None
    assert rate == pytest.approx(2 * CHUNK / 0.03, rel=0.01)
    assert ratio < 0.5


def test_good_frames_before_a_bad_one_are_handed_over_first() -> None:
    """One read can hold a good frame and a damaged one: the good one must not be lost (the
    target commits it and resumes after it), and the error comes with the next call."""
    good = data_frame(b"a" * CHUNK, 0)
    bad = bytearray(data_frame(b"b" * CHUNK, CHUNK))
    bad[-1] ^= 0xFF
    decoder = FrameDecoder()
    got = decoder.feed(hello(total=2 * CHUNK + 1024) + good + bytes(bad))
    assert [f.kind for f in got] == [FrameKind.HELLO, FrameKind.DATA]
    assert got[1].raw == b"a" * CHUNK
    with pytest.raises(frames.ChecksumMismatch):
        decoder.feed(b"")
    with pytest.raises(frames.ChecksumMismatch):
        decoder.finish()
