"""A frozen stream's data, copied aside while the source's containers are stopped.

The copy must hold exactly what the volume held, also after a crash of the source host once
the containers run again. Instead of waiting for the copy to reach the disk (an fdatasync of a
few hundred MB, while the containers are still stopped), every `CHUNK` of it is hashed as it is
written, the digests are made durable (a few KB), and every chunk is checked when it is read
back: a copy the crash damaged fails the stream (`SpoolDamaged`), it never sends wrong bytes.

Layout: `<name>.data` (the bytes) and `<name>.sums` (SHA-256 of each CHUNK-sized piece of it,
the last one short, concatenated).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
DIGEST = 32


class SpoolDamaged(OSError):
    def __init__(self, detail: str) -> None:
        super().__init__(errno.EIO, f"the frozen copy of the stream is damaged: {detail}")


def sums_path(data_path: Path) -> Path:
    return data_path.with_suffix(".sums")


class SpoolWriter:
    """Writes the data and hashes it CHUNK by CHUNK (`close` writes the digests durably)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._pending = bytearray()
        self._sums = bytearray()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._out.write(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == CHUNK:
                self._sums += hashlib.sha256(self._pending).digest()
                self._pending.clear()

    def close(self) -> None:
        """Flush the data (to the page cache), then write the digests and sync them."""
        if self._pending:
            self._sums += hashlib.sha256(self._pending).digest()
            self._pending.clear()
        self._out.close()
        sums = sums_path(self.path)
        with open(sums, "wb") as f:
            f.write(self._sums)
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        self._out.close()
        for path in (self.path, sums_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class SpoolReader:
    """Reads a spool at any offset; each CHUNK is checked against its digest when first read
    (the last checked one is kept: a stream reads its spool front to back)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        data_path = Path(path)
        self._fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._sums = sums_path(data_path).read_bytes()
            self.size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise
        if len(self._sums) != -(-self.size // CHUNK) * DIGEST:
            self.close()
            raise SpoolDamaged(f"{len(self._sums) // DIGEST} digests for {self.size} bytes")
        self._index = -1
        self._chunk = b""

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray()
        while length > 0:
            index, at = divmod(offset, CHUNK)
            chunk = self._load(index)
            piece = chunk[at : at + length]
            if not piece:
                raise SpoolDamaged(f"offset {offset} is past its end ({self.size})")
            out += piece
            offset += len(piece)
            length -= len(piece)
        return bytes(out)

    def _load(self, index: int) -> bytes:
        if index != self._index:
            chunk = os.pread(self._fd, CHUNK, index * CHUNK)
            want = self._sums[index * DIGEST : (index + 1) * DIGEST]
            if hashlib.sha256(chunk).digest() != want:
                raise SpoolDamaged(f"bytes {index * CHUNK}..{index * CHUNK + len(chunk)}")
            self._index, self._chunk = index, chunk
        return self._chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
