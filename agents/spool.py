"""A frozen stream's data, copied aside while the source's containers are stopped.

The copy must hold exactly what the volume held, also after a crash of the source host once
the containers run again. Instead of waiting for the copy to reach the disk (an fdatasync of a
few hundred MB, while the containers are still stopped), every piece of it is hashed as it is
written, and every piece is checked against its digest when it is read back: a copy a crash
damaged fails the stream (`SpoolDamaged`), it never sends wrong bytes. The digests are not
synced either: digests a crash lost or cut short make the copy damaged the same way (a crash
cannot turn them into the digest of other bytes), and the price of a damaged copy is one more
attempt, rare, against tens of milliseconds of every final pass.

Layout: `<name>.data` (the bytes) and `<name>.sums` (for each piece, in order: its length as a
little-endian u32 and its BLAKE3, which hashes these pieces 3x as fast as SHA-256 here).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from blake3 import blake3

PIECE_MIN = 256 << 10
"""Writes smaller than this are gathered into one piece: a piece is checked as a whole."""
PIECES_BEHIND = 4
_ENTRY = struct.Struct("<I32s")  # a piece in the sums file: its length, its BLAKE3


class SpoolDamaged(OSError):
    def __init__(self, detail: str) -> None:
        super().__init__(errno.EIO, f"the frozen copy of the stream is damaged: {detail}")


def sums_path(data_path: Path) -> Path:
    return data_path.with_suffix(".sums")


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3(data).digest()


class SpoolWriter:
    """Writes the data in pieces (each large write is one, small ones are gathered), hashing
    each piece in a helper thread while the next is written; `close` writes the digests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._pending = bytearray()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spool-hash")
        self._hashing: deque[tuple[int, Future[bytes]]] = deque()
        self._sums = bytearray()
        self.size = 0

    def write(self, data: bytes) -> None:
        if len(data) >= PIECE_MIN:
            self._flush_pending()
            self._piece(data)
        else:
            self._pending += data
            if len(self._pending) >= PIECE_MIN:
                self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            self._piece(bytes(self._pending))
            self._pending.clear()

    def _piece(self, data: bytes) -> None:
        self._hashing.append((len(data), self._pool.submit(_digest, data)))
        self._out.write(data)
        self.size += len(data)
        while len(self._hashing) > PIECES_BEHIND:
            self._collect()

    def _collect(self) -> None:
        length, digest = self._hashing.popleft()
        self._sums += _ENTRY.pack(length, digest.result())

    def close(self) -> None:
        """Flush the data, then write the digests (both to the page cache only)."""
        self._flush_pending()
        while self._hashing:
            self._collect()
        self._pool.shutdown()
        self._out.close()
        with open(sums_path(self.path), "wb") as f:
            f.write(self._sums)

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._out.close()
        for path in (self.path, sums_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class SpoolReader:
    """Reads a spool at any offset; each piece is checked against its digest when first read
    (the last checked one is kept: a stream reads its spool front to back)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        data_path = Path(path)
        self._fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sums = sums_path(data_path).read_bytes()
            self.size = os.fstat(self._fd).st_size
        except FileNotFoundError as e:
            os.close(self._fd)
            raise SpoolDamaged("its digests are missing") from e
        except BaseException:
            os.close(self._fd)
            raise
        self._starts: list[int] = []
        self._pieces: list[tuple[int, bytes]] = []
        at = 0
        for length, digest in _ENTRY.iter_unpack(sums[: len(sums) // _ENTRY.size * _ENTRY.size]):
            self._starts.append(at)
            self._pieces.append((length, digest))
            at += length
        if at != self.size or len(sums) % _ENTRY.size:
            self.close()
            raise SpoolDamaged(f"its digests cover {at} bytes of {self.size}")
        self._index = -1
        self._piece = b""

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray()
        while length > 0:
            if not 0 <= offset < self.size:
                raise SpoolDamaged(f"offset {offset} is past its end ({self.size})")
            index = bisect.bisect_right(self._starts, offset) - 1
            piece = self._load(index)
            at = offset - self._starts[index]
            part = piece[at : at + length]
            out += part
            offset += len(part)
            length -= len(part)
        return bytes(out)

    def _load(self, index: int) -> bytes:
        if index != self._index:
            length, want = self._pieces[index]
            piece = os.pread(self._fd, length, self._starts[index])
            if len(piece) != length or _digest(piece) != want:
                start = self._starts[index]
                raise SpoolDamaged(f"bytes {start}..{start + length}")
            self._index, self._piece = index, piece
        return self._piece

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
