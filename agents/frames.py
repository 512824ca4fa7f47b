"""Frames: the wire format of the agent-to-agent stream (docs/protocol.md, sections 4-8).

Owns encoding tar bytes into frames (hashing, per-frame zstd and the `auto` compression policy),
decoding and verifying frames from untrusted bytes, and the composite transfer digest. Pure:
stdlib and `zstandard` only; no sockets, no event loop, no Docker; must not import `migrator`.

Hashing and compressing an 8 MiB chunk takes milliseconds, so callers run `FrameEncoder.data`
and `FrameDecoder.feed` in a worker thread (hashlib and zstandard release the GIL). An encoder
or decoder belongs to one stream and is used by one thread at a time; `CompressionPolicy` may
be fed from another thread (the event loop reports send times) and locks its own state.

Errors, all raised by the decoder (`retryable` ones mean "damaged in transit, reconnect from
the committed offset"; the rest mean "protocol violation, fail the transfer"):

    FrameError                     frame_error
    ├── BadMagic                   bad_magic
    ├── HeaderCorrupt              header_corrupt      retryable
    ├── BadKind                    unknown_kind
    ├── BadCodec                   unknown_codec
    ├── FrameTooLarge              frame_too_large
    ├── SizeMismatch               size_mismatch
    ├── ChecksumMismatch           checksum_mismatch   retryable
    ├── OutOfOrder                 out_of_order
    ├── Truncated                  truncated           retryable
    └── ProtocolViolation          protocol_violation
        └── UnsupportedProtocol    unsupported_protocol
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard

import zstandard

MAGIC = b"VMF1"
PROTOCOL_VERSION = 1
HEADER_SIZE = 64
TAR_BLOCK_SIZE = 512
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_JSON_LENGTH = 16 * 1024 * 1024
"""Bound on a hello/trailer/error payload; a trailer lists dirty paths, which can be many."""

# Measured on 64 MiB of a tar of /usr (8 MiB chunks, one core of the dev box, zstandard 0.25):
# level 1 → ratio 0.314 at 544 MB/s, level 3 → ratio 0.263 at 403 MB/s; random data passes
# through either at >2 GB/s. Level 3 sends 16 % fewer bytes but costs 35 % more CPU on a
# source host that is also reading the disk, building tar and hashing files; level 1 keeps
# `auto` compressing on links up to ~4 Gbit/s.
ZSTD_LEVEL = 1
# Keep a compressed payload only if it saves at least 3 %: below that the target's
# decompression costs more than the bytes saved, and tar of already-compressed files lands
# at 0.99-1.01.
MIN_SAVING = 0.03
# `auto` keeps measuring the compressor while compression is off: every 16th frame (128 MiB
# at the default chunk) is compressed anyway, about 6 % of the CPU compressing everything costs.
PROBE_EVERY = 16
# Half-life of the rate averages, in bytes: 4 default chunks, so `auto` reacts within ~32 MiB.
RATE_HALF_LIFE_BYTES = 32 * 1024 * 1024

# magic, kind, codec, flags, raw_offset, raw_length, payload_length, sha256, reserved
_HEADER = struct.Struct(">4sBBHQII32sI")
_CRC = struct.Struct(">I")
assert _HEADER.size + _CRC.size == HEADER_SIZE


class FrameKind(enum.IntEnum):
    """What a frame carries; the values are the wire values (header byte 4)."""

    HELLO = 0
    """First frame: JSON stream parameters (protocol, stream_id, chunk_size, offsets)."""
    DATA = 1
    """Raw tar bytes, possibly zstd-compressed."""
    TRAILER = 2
    """Last frame of a complete stream: a JSON object of digests and dirty paths."""
    ERROR = 3
    """Last frame of a failed stream: JSON {"code", "message"}."""


class Codec(enum.IntEnum):
    """How a payload is encoded; the values are the wire values (header byte 5)."""

    NONE = 0
    """The payload is the raw bytes."""
    ZSTD = 1
    """The payload is one zstd frame declaring its content size."""


class Compression(enum.StrEnum):
    """The `compression` parameter of a stream; the values are the wire values."""

    NONE = "none"
    """Never compress."""
    ZSTD = "zstd"
    """Compress every frame where it saves at least `MIN_SAVING`."""
    AUTO = "auto"
    """Compress only while the link, not the compressor, limits the rate."""


# ---------------------------------------------------------------------------------------------
# Errors


class FrameError(Exception):
    code: ClassVar[str] = "frame_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        """The raw offset of the frame concerned, when the header was trusted that far."""


class BadMagic(FrameError):
    code = "bad_magic"


class HeaderCorrupt(FrameError):
    code, retryable = "header_corrupt", True


class BadKind(FrameError):
    code = "unknown_kind"


class BadCodec(FrameError):
    code = "unknown_codec"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


class SizeMismatch(FrameError):
    code = "size_mismatch"


class ChecksumMismatch(FrameError):
    code, retryable = "checksum_mismatch", True


class OutOfOrder(FrameError):
    code = "out_of_order"


class Truncated(FrameError):
    code, retryable = "truncated", True


class ProtocolViolation(FrameError):
    code = "protocol_violation"


class UnsupportedProtocol(ProtocolViolation):
    code = "unsupported_protocol"


# ---------------------------------------------------------------------------------------------
# Frames, chunks, digests


@dataclass(frozen=True, slots=True)
class Frame:
    """One verified frame. Data frames carry `raw`; the others carry `json`."""

    kind: FrameKind
    codec: Codec
    raw_offset: int
    sha256: bytes
    raw: bytes = b""
    json: dict[str, Any] | None = None

    @property
    def end_offset(self) -> int:
        return self.raw_offset + len(self.raw)


def check_chunk_size(chunk_size: int) -> int:
    """Return `chunk_size` if it is a valid data frame size, else raise ValueError."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size % TAR_BLOCK_SIZE:
        raise ValueError(
            f"chunk size must be a multiple of {TAR_BLOCK_SIZE} "
            f"in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], not {chunk_size}"
        )
    return chunk_size


def next_chunk_length(offset: int, chunk_size: int) -> int:
    """Bytes from `offset` to the next chunk boundary: the longest data frame starting there."""
    return chunk_size - offset % chunk_size


def composite_digest(chunk_digests: Iterable[bytes]) -> str:
    """The transfer digest: "sha256:<hex>" of SHA-256 over the ordered 32-byte frame digests."""
    acc = CompositeDigest()
    for digest in chunk_digests:
        acc.update(digest)
    return acc.value()


class CompositeDigest:
    """Incremental `composite_digest`."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, chunk_digest: bytes) -> None:
        if len(chunk_digest) != 32:
            raise ValueError("a chunk digest is 32 bytes")
        self._hash.update(chunk_digest)
        self.count += 1

    def value(self) -> str:
        return "sha256:" + self._hash.hexdigest()


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_frame(
    kind: int,
    codec: int,
    raw_offset: int,
    raw_length: int,
    sha256: bytes,
    payload: bytes,
    *,
    flags: int = 0,
) -> bytes:
    """Header + payload, exactly as given: no checks of the payload against the header.

    The building block of the other encoders, and of tests that need frames that lie.
    """
    head = frame_header(kind, codec, raw_offset, raw_length, sha256, len(payload), flags=flags)
    return head + payload


def frame_header(
    kind: int,
    codec: int,
    raw_offset: int,
    raw_length: int,
    sha256: bytes,
    payload_length: int,
    *,
    flags: int = 0,
) -> bytes:
    """The 64-byte header of a frame, CRC included."""
    head = _HEADER.pack(
        MAGIC, kind, codec, flags, raw_offset, raw_length, payload_length, sha256, 0
    )
    return head + _CRC.pack(zlib.crc32(head))


def compress_chunk(raw: bytes, compressor: zstandard.ZstdCompressor | None = None) -> bytes | None:
    """zstd payload of `raw`, or None if it saves less than `MIN_SAVING`."""
    comp = (compressor or zstandard.ZstdCompressor(level=ZSTD_LEVEL)).compress(raw)
    return comp if _pays(len(raw), len(comp)) else None


def _pays(raw_length: int, payload_length: int) -> bool:
    return payload_length <= math.floor(raw_length * (1 - MIN_SAVING))


def encode_data_frame(raw: bytes, raw_offset: int, codec: Codec = Codec.NONE) -> bytes:
    """A data frame for `raw` at `raw_offset`. With `Codec.ZSTD` the payload is compressed if
    that saves at least `MIN_SAVING`, else the frame goes with `Codec.NONE`."""
    payload = compress_chunk(raw) if codec is Codec.ZSTD else None
    if payload is None:
        codec, payload = Codec.NONE, raw
    sha = hashlib.sha256(raw).digest()
    return encode_frame(FrameKind.DATA, codec, raw_offset, len(raw), sha, payload)


def encode_json_frame(kind: FrameKind, obj: dict[str, Any], offset: int) -> bytes:
    """A hello, trailer or error frame carrying `obj` as compact UTF-8 JSON."""
    if kind is FrameKind.DATA:
        raise ValueError("data frames carry raw bytes, not JSON")
    payload = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    if len(payload) > MAX_JSON_LENGTH:
        raise ValueError(f"JSON frame of {len(payload)} bytes exceeds {MAX_JSON_LENGTH}")
    sha = hashlib.sha256(payload).digest()
    return encode_frame(kind, Codec.NONE, offset, len(payload), sha, payload)


class _Rate:
    """Bytes per second over an exponentially decaying window of `RATE_HALF_LIFE_BYTES`."""

    def __init__(self) -> None:
        self.nbytes = 0.0
        self.seconds = 0.0
        self.out = 0.0  # compressed bytes, for the ratio

    def add(self, nbytes: int, seconds: float, out: int = 0) -> None:
        keep = 0.5 ** (nbytes / RATE_HALF_LIFE_BYTES)
        self.nbytes = self.nbytes * keep + nbytes
        self.seconds = self.seconds * keep + max(seconds, 0.0)
        self.out = self.out * keep + out

    @property
    def known(self) -> bool:
        return self.nbytes > 0

    def rate(self) -> float:
        return math.inf if self.seconds <= 0 else self.nbytes / self.seconds

    def ratio(self) -> float:
        return self.out / self.nbytes if self.nbytes else 1.0


class CompressionPolicy:
    """Decides, frame by frame, whether to try zstd (docs/protocol.md, section 6).

    `auto` rule: compress iff compress_rate > link_rate and ratio <= 1 - MIN_SAVING, where
    link_rate is wire bytes per second spent blocked sending (`observe_send`) and
    compress_rate, ratio come from `observe_compress`. Without compression the stream moves at
    link_rate, with it at min(link_rate / ratio, compress_rate): larger exactly then. Before
    both are measured it compresses; while off, every `probe_every`-th frame is a probe.
    """

    def __init__(self, mode: Compression, *, probe_every: int = PROBE_EVERY) -> None:
        self.mode = Compression(mode)
        self._probe_every = probe_every
        self._link = _Rate()
        self._comp = _Rate()
        self._since_probe = 0
        self._lock = threading.Lock()

    def observe_send(self, nbytes: int, seconds: float) -> None:
        """Report `nbytes` of body written in `seconds` of blocking (write + drain + throttle)."""
        with self._lock:
            self._link.add(nbytes, seconds)

    def observe_compress(self, raw_bytes: int, out_bytes: int, seconds: float) -> None:
        """Report that compressing `raw_bytes` to `out_bytes` took `seconds`."""
        with self._lock:
            self._comp.add(raw_bytes, seconds, out_bytes)

    @property
    def link_rate(self) -> float | None:
        with self._lock:
            return self._link.rate() if self._link.known else None

    @property
    def compress_rate(self) -> float | None:
        with self._lock:
            return self._comp.rate() if self._comp.known else None

    @property
    def ratio(self) -> float | None:
        with self._lock:
            return self._comp.ratio() if self._comp.known else None

    def should_compress(self) -> bool:
        """Whether to try compressing the next frame. Counts probes: call once per frame."""
        if self.mode is Compression.NONE:
            return False
        if self.mode is Compression.ZSTD:
            return True
        with self._lock:
            if not (self._link.known and self._comp.known):
                return True
            if self._comp.rate() > self._link.rate() and self._comp.ratio() <= 1 - MIN_SAVING:
                self._since_probe = 0
                return True
            self._since_probe += 1
            if self._since_probe >= self._probe_every:
                self._since_probe = 0
                return True
            return False


class FrameEncoder:
    """Encodes one stream: hello, data frames (compressed per policy), trailer or error.

    Keeps the composite digest of the data frames it encoded (`digest`), for the trailer.
    """

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression: Compression = Compression.AUTO,
        level: int = ZSTD_LEVEL,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.policy = CompressionPolicy(compression)
        self.digest = CompositeDigest()
        self._zstd = zstandard.ZstdCompressor(level=level)
        self._clock = clock

    def hello(
        self,
        *,
        stream_id: str,
        start_offset: int,
        total_size: int | None,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """The hello frame; `extra` adds fields (additive, protocol 1 readers ignore them)."""
        if start_offset < 0 or start_offset % TAR_BLOCK_SIZE:
            raise ValueError(f"start offset {start_offset} is not a multiple of {TAR_BLOCK_SIZE}")
        doc = {
            "protocol": PROTOCOL_VERSION,
            "stream_id": stream_id,
            "chunk_size": self.chunk_size,
            "start_offset": start_offset,
            "total_size": total_size,
            "compression": self.policy.mode.value,
            **(extra or {}),
        }
        return encode_json_frame(FrameKind.HELLO, doc, start_offset)

    def data(self, raw: bytes, raw_offset: int) -> bytes:
        """One data frame. `raw` must not cross a chunk boundary (ValueError otherwise)."""
        return b"".join(self.data_parts(raw, raw_offset))

    def data_parts(self, raw: bytes, raw_offset: int) -> tuple[bytes, bytes]:
        """`data` as (header, payload), so a sender can write the payload without copying it
        behind the header."""
        if not 0 < len(raw) <= next_chunk_length(raw_offset, self.chunk_size):
            raise ValueError(
                f"{len(raw)} bytes at {raw_offset} do not fit the chunk of size {self.chunk_size}"
            )
        codec, payload = Codec.NONE, raw
        if self.policy.should_compress():
            started = self._clock()
            comp = self._zstd.compress(raw)
            self.policy.observe_compress(len(raw), len(comp), self._clock() - started)
            if _pays(len(raw), len(comp)):
                codec, payload = Codec.ZSTD, comp
        sha = hashlib.sha256(raw).digest()
        self.digest.update(sha)
        head = frame_header(FrameKind.DATA, codec, raw_offset, len(raw), sha, len(payload))
        return head, payload

    def trailer(self, obj: dict[str, Any], offset: int) -> bytes:
        return encode_json_frame(FrameKind.TRAILER, obj, offset)

    def error(self, code: str, message: str, offset: int) -> bytes:
        return encode_json_frame(FrameKind.ERROR, {"code": code, "message": message}, offset)


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class Header:
    """A frame header whose magic, CRC, kind, codec and reserved bits have been checked."""

    kind: FrameKind
    codec: Codec
    raw_offset: int
    raw_length: int
    payload_length: int
    sha256: bytes


def decode_header(head: bytes) -> Header:
    """Parse and check one 64-byte header on its own: magic, CRC, kind, codec, reserved bits."""
    if len(head) != HEADER_SIZE:
        raise Truncated(f"a header is {HEADER_SIZE} bytes, got {len(head)}")
    magic, kind, codec, flags, raw_offset, raw_length, payload_length, sha, reserved = (
        _HEADER.unpack_from(head)
    )
    if magic != MAGIC:
        raise BadMagic(f"bad frame magic {bytes(magic)!r}")
    (crc,) = _CRC.unpack_from(head, _HEADER.size)
    if zlib.crc32(head[: _HEADER.size]) != crc:
        raise HeaderCorrupt("frame header CRC mismatch")
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise BadKind(f"unknown frame kind {kind}", offset=raw_offset) from None
    try:
        frame_codec = Codec(codec)
    except ValueError:
        raise BadCodec(f"unknown codec {codec}", offset=raw_offset) from None
    if flags or reserved:
        raise ProtocolViolation("reserved header bits are set", offset=raw_offset)
    return Header(frame_kind, frame_codec, raw_offset, raw_length, payload_length, sha)


class FrameDecoder:
    """Incremental, verifying decoder of one stream's body (docs/protocol.md, section 5).

    `feed` bytes as they arrive, in any split; it returns the frames completed by them, each
    fully verified. `finish` at the end of the body raises `Truncated` unless a trailer or error
    frame ended the stream. After any FrameError the decoder is unusable.
    """

    def __init__(
        self,
        *,
        max_raw_length: int = MAX_CHUNK_SIZE,
        expect_offset: int | None = None,
        expect_stream_id: str | None = None,
    ) -> None:
        self.max_raw_length = max_raw_length
        self.expect_offset = expect_offset
        self.expect_stream_id = expect_stream_id
        self.hello: dict[str, Any] | None = None
        self.chunk_size: int | None = None
        self.total_size: int | None = None
        self.next_offset: int | None = None
        """Where the next data frame must start (the end of the last one)."""
        self.done = False
        self._seen_data = False
        self._buf = bytearray()
        self._head: Header | None = None
        self._zstd = zstandard.ZstdDecompressor()
        self._pending_error: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by `data`, each verified. A frame that fails verification raises —
        but only after the good frames before it were returned: they are handed over first and
        the error is raised by the next `feed` or `finish`, so none of them is fetched twice."""
        if self._pending_error is not None:
            raise self._pending_error
        self._buf += data
        frames: list[Frame] = []
        try:
            self._decode_into(frames)
        except FrameError as e:
            if not frames:
                raise
            self._pending_error = e
        return frames

    def _decode_into(self, frames: list[Frame]) -> None:
        while not self.done:
            if self._head is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                self._head = self._check_header(decode_header(bytes(self._buf[:HEADER_SIZE])))
                del self._buf[:HEADER_SIZE]
            if len(self._buf) < self._head.payload_length:
                break
            with memoryview(self._buf) as view:  # one copy of up to 64 MiB, not two
                payload = bytes(view[: self._head.payload_length])
            del self._buf[: self._head.payload_length]
            head, self._head = self._head, None
            frames.append(self._accept(head, payload))
        if self.done and self._buf:
            raise ProtocolViolation("bytes after the last frame")

    def read_header(self, head: bytes) -> Header:
        """Frame by frame instead of `feed`: the next frame's header (exactly HEADER_SIZE bytes),
        checked against the stream so far. The reader then reads `payload_length` bytes and
        hands them to `read_frame`. Never mix with `feed` on one decoder."""
        if self.done:
            raise ProtocolViolation("bytes after the last frame")
        if len(head) != HEADER_SIZE:
            raise Truncated("the stream ended inside a frame header", offset=self.next_offset)
        return self._check_header(decode_header(head))

    def read_frame(self, head: Header, payload: bytes) -> Frame:
        """The frame `head` announced, from exactly its payload, verified (see `read_header`).
        At most one frame is decompressed at a time, however well the stream compresses."""
        if len(payload) != head.payload_length:
            raise Truncated("the stream ended inside a frame", offset=head.raw_offset)
        return self._accept(head, payload)

    def raise_pending(self) -> None:
        """Raise the error the last `feed` held back behind good frames, if any: a reader that
        has used those frames should stop here rather than wait for more bytes."""
        if self._pending_error is not None:
            raise self._pending_error

    def finish(self) -> None:
        """The body ended: raise `Truncated` unless the stream ended with a trailer or error."""
        self.raise_pending()
        if self._buf or self._head is not None:
            raise Truncated("the stream ended inside a frame", offset=self.next_offset)
        if not self.done:
            raise Truncated("the stream ended without a trailer", offset=self.next_offset)

    def _check_header(self, head: Header) -> Header:
        """Bounds and order, from the header alone, before the payload is buffered."""
        at = head.raw_offset
        if head.kind is not FrameKind.DATA:
            if head.payload_length > MAX_JSON_LENGTH:
                raise FrameTooLarge(f"JSON frame of {head.payload_length} bytes", offset=at)
            if head.codec is not Codec.NONE or head.raw_length != head.payload_length:
                raise SizeMismatch("a JSON frame is uncompressed", offset=at)
            if (head.kind is FrameKind.HELLO) != (self.hello is None):
                raise ProtocolViolation("the hello must come first, exactly once", offset=at)
            if self.hello is not None and at != self.next_offset:
                raise OutOfOrder(
                    f"{head.kind.name.lower()} at {at}, expected {self.next_offset}", offset=at
                )
            return head
        if self.hello is None or self.chunk_size is None or self.next_offset is None:
            raise ProtocolViolation("a data frame before the hello", offset=at)
        if head.raw_length > self.chunk_size:
            raise FrameTooLarge(f"data frame of {head.raw_length} bytes", offset=at)
        if head.codec is Codec.NONE and head.payload_length != head.raw_length:
            raise SizeMismatch("uncompressed payload length differs from raw length", offset=at)
        if head.codec is Codec.ZSTD and head.payload_length > head.raw_length:
            raise SizeMismatch("compressed payload longer than its raw bytes", offset=at)
        if at != self.next_offset:
            raise OutOfOrder(f"data frame at {at}, expected {self.next_offset}", offset=at)
        if self._seen_data and at % self.chunk_size:
            raise ProtocolViolation("a short data frame was not the last", offset=at)
        if not 0 < head.raw_length <= next_chunk_length(at, self.chunk_size):
            raise ProtocolViolation("data frame crosses a chunk boundary", offset=at)
        if self.total_size is not None and at + head.raw_length > self.total_size:
            raise SizeMismatch("data beyond the stream's total size", offset=at)
        return head

    def _accept(self, head: Header, payload: bytes) -> Frame:
        at = head.raw_offset
        raw = self._decode_payload(head, payload)
        if hashlib.sha256(raw).digest() != head.sha256:
            raise ChecksumMismatch("SHA-256 of the raw bytes differs", offset=at)
        if head.kind is FrameKind.DATA:
            self._seen_data = True
            self.next_offset = at + len(raw)
            return Frame(head.kind, head.codec, at, head.sha256, raw=raw)
        doc = _parse_json(raw, at)
        if head.kind is FrameKind.HELLO:
            self._accept_hello(doc, at)
        elif head.kind is FrameKind.ERROR:
            if not (isinstance(doc.get("code"), str) and isinstance(doc.get("message"), str)):
                raise ProtocolViolation("an error frame needs string code and message", offset=at)
            self.done = True
        else:
            if self.total_size is not None and at != self.total_size:
                raise SizeMismatch(f"trailer at {at}, total size {self.total_size}", offset=at)
            self.done = True
        return Frame(head.kind, head.codec, at, head.sha256, json=doc)

    def _decode_payload(self, head: Header, payload: bytes) -> bytes:
        if head.codec is Codec.NONE:
            return payload
        at = head.raw_offset
        try:
            declared = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as e:
            raise ChecksumMismatch(f"unreadable zstd frame header: {e}", offset=at) from e
        # Checked before decompressing: python-zstandard allocates what the frame declares and
        # ignores max_output_size when a content size is present.
        if declared != head.raw_length:
            raise SizeMismatch(
                f"zstd frame declares {declared} bytes, header says {head.raw_length}", offset=at
            )
        try:
            raw = self._zstd.decompress(
                payload, max_output_size=head.raw_length, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            raise ChecksumMismatch(f"damaged zstd payload: {e}", offset=at) from e
        if len(raw) != head.raw_length:
            raise SizeMismatch(f"zstd frame gave {len(raw)} bytes", offset=at)
        return raw

    def _accept_hello(self, doc: dict[str, Any], at: int) -> None:
        if doc.get("protocol") != PROTOCOL_VERSION or isinstance(doc.get("protocol"), bool):
            raise UnsupportedProtocol(f"protocol {doc.get('protocol')!r}", offset=at)
        stream_id = doc.get("stream_id")
        chunk_size = doc.get("chunk_size")
        start = doc.get("start_offset")
        total = doc.get("total_size")
        if not (isinstance(stream_id, str) and stream_id):
            raise ProtocolViolation("hello: stream_id must be a non-empty string", offset=at)
        if not _is_int(chunk_size):
            raise ProtocolViolation("hello: chunk_size must be an integer", offset=at)
        try:
            check_chunk_size(chunk_size)
        except ValueError as e:
            raise ProtocolViolation(f"hello: {e}", offset=at) from e
        if chunk_size > self.max_raw_length:
            raise FrameTooLarge(f"hello: chunk size {chunk_size}", offset=at)
        if not (_is_int(start) and start == at and start % TAR_BLOCK_SIZE == 0):
            raise ProtocolViolation("hello: start_offset must equal the frame offset", offset=at)
        if not (total is None or (_is_int(total) and total >= start)):
            raise ProtocolViolation("hello: total_size must be null or >= start", offset=at)
        if doc.get("compression") not in {c.value for c in Compression}:
            raise ProtocolViolation("hello: unknown compression mode", offset=at)
        if self.expect_offset is not None and start != self.expect_offset:
            raise ProtocolViolation(f"hello at {start}, asked for {self.expect_offset}", offset=at)
        if self.expect_stream_id is not None and stream_id != self.expect_stream_id:
            raise ProtocolViolation("hello names another stream_id", offset=at)
        self.hello = doc
        self.chunk_size = chunk_size
        self.total_size = total
        self.next_offset = start


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_json(payload: bytes, at: int) -> dict[str, Any]:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolViolation(f"JSON frame does not parse: {e}", offset=at) from e
    if not isinstance(doc, dict):
        raise ProtocolViolation("a JSON frame holds an object", offset=at)
    return doc
