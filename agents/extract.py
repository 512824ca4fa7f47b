"""Extract the verified PAX tar stream straight into a volume directory, resumable mid-entry.

Owns parsing the tar stream incrementally (any split points) and applying each entry to the
target root with exact metadata. Stdlib only (SQLite through `agents.content`), blocking I/O
(callers run it in a thread); no asyncio, Docker or sockets; must not import `migrator`. It
does not use `tarfile`: its extraction filters drop ownership and rewrite modes, and it cannot
resume mid-file.

Accepted stream (what `agents/tarstream.py` writes; anything else is refused):

* POSIX ustar headers (magic "ustar\\0", version "00"), each optionally preceded by one or more
  'x' extended headers; data padded to 512; two zero blocks; only zero bytes after them.
* PAX keys used: path, linkpath, size, uid, gid, mtime ("sec[.frac]", nanoseconds kept),
  SCHILY.xattr.<name> (raw value), GNU.sparse.major=1/minor=0/name/realsize (sparse 1.0: the
  data area starts with the decimal map, padded to 512, then the data runs). Names are raw
  bytes whatever hdrcharset says. Other keys are ignored but count against `max_pax_bytes`.
* Types '0' (and NUL) file, '1' hard link, '2' symlink, '3'/'4' device, '5' dir, '6' FIFO.
  Refused: 'g' global headers, GNU 'L'/'K' long names, old GNU sparse ('S', sparse 0.x),
  base-256 numbers. The generator never writes them, and each would be one more parser path
  that hostile bytes could reach.

Safety: every name is checked (no absolute path, no "", "." or ".." component, no NUL) and
reached by walking from a root directory fd with O_NOFOLLOW|O_DIRECTORY, one component at a
time; an existing symlink is never followed (it is replaced). Entries are created exclusively
(O_EXCL) and only what is in the way is looked at and removed, so a fresh volume costs no
`stat` per entry. A hard link must name an earlier regular file of this stream. Devices need
`allow_devices`. Errors are typed (tree below) and carry the entry's name; after one, the
extractor refuses more input (resume from a checkpoint).

    AgentError (agents.errors)
    └── ExtractError              422 extract_failed
        ├── MalformedArchive      422 malformed_tar
        ├── UnsafeEntry           422 unsafe_path
        │   ├── UnsafeLink        422 unsafe_link
        │   └── DeviceRefused     422 device_refused
        ├── LimitExceeded         422 limit_exceeded
        ├── BadCheckpoint         422 bad_checkpoint
        └── WriteFailed           500 write_failed

Resume: `commit()` makes what was written durable and returns a JSON checkpoint; the stream is
re-sent from its "offset" (= bytes fed so far). Unparsed header bytes travel in the checkpoint;
an entry in progress is reopened without truncation and its hash re-read from disk. Directory
metadata (applied by `finish()`, after the children) and the paths of the regular files (for
hard-link checks) live in append-only journals in `state_dir`, cut back to their committed
length on resume. The files journal is looked up through an index on disk, built only when a
hard link asks: memory does not grow with the number of entries.

Speed (small files are mostly headers): a header sequence is parsed straight from the fed
buffer, each block once, with numeric fields memoized; a plain file whose data is in the same
buffer is created, written and closed in one step (open, pwrite, fchown, fchmod, utime,
close: what GNU tar does); xattrs are only listed when the entry was not created here or its
directory could have passed some on.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from agents.content import PathIndex
from agents.errors import AgentError
from agents.manifest import EntryType
from agents.tarstream import PATCH_KEY

BLOCK = 512
CHECKPOINT_VERSION = 2
_ZERO_BLOCK = bytes(BLOCK)
_SHA256_HEX = re.compile(rb"[0-9a-f]{64}")
_ZEROS = bytes(1 << 20)  # holes are hashed from this buffer, 1 MiB per update call
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRS_LOG = b"extract-dirs.jsonl"
_FILES_LOG = b"extract-paths.bin"  # the regular files written: (4-byte length, path) records
_FILES_INDEX = b"extract-paths.db"  # a lookup index over it, built when a hard link asks
_READ_SIZE = 1 << 20
_RECENT_BYTES = 4 << 20  # memory for the paths kept for hard links to recent files
_RECENT_OVERHEAD = 100  # bytes a set entry costs besides its path
# Stream phases; compared by identity (a restored phase is mapped back through _PHASES).
_HEADER, _DATA, _PAD, _END = "header", "data", "pad", "end"
_PHASES = {p: p for p in (_HEADER, _DATA, _PAD, _END)}

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


class ExtractError(AgentError):
    status, code, title = 422, "extract_failed", "Extraction failed"

    def __init__(self, detail: str, path: bytes | None = None) -> None:
        name = None if path is None else path.decode("utf-8", "backslashreplace")
        super().__init__(detail if name is None else f"{name}: {detail}", entry=name)
        self.path = path


class MalformedArchive(ExtractError):
    code, title = "malformed_tar", "Malformed tar stream"


class UnsafeEntry(ExtractError):
    code, title = "unsafe_path", "Unsafe entry refused"


class UnsafeLink(UnsafeEntry):
    code, title = "unsafe_link", "Unsafe hard link refused"


class DeviceRefused(UnsafeEntry):
    code, title = "device_refused", "Device node refused"


class LimitExceeded(ExtractError):
    code, title = "limit_exceeded", "Tar stream exceeds a limit"


class BadCheckpoint(ExtractError):
    code, title = "bad_checkpoint", "Checkpoint cannot be resumed"


class WriteFailed(ExtractError):
    status, code, title = 500, "write_failed", "Writing to the volume failed"


@dataclass(frozen=True, slots=True)
class Limits:
    max_pax_bytes: int = 1 << 20
    """Extended header bytes per entry: a path, a link target and the xattrs (Linux caps one
    xattr value at 64 KiB), so 1 MiB leaves room while bounding what one header can buffer."""
    max_sparse_runs: int = 1 << 16
    """Data runs per sparse file; the map (<= ~2.7 MiB at this count) is buffered whole."""
    max_path_bytes: int = 4096
    """PATH_MAX on Linux."""


class FileDigest(NamedTuple):
    """SHA-256 of a regular file's logical content (holes read as zeros), as written.

    A named tuple (one per file, so cheap to make), in the content manifest's column order."""

    path: bytes
    sha256: str
    size: int


@dataclass(slots=True)
class Header:
    """One parsed entry. `path` is "." for the root, else relative without "./"."""

    path: bytes
    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    """Logical size of a regular file (the sparse realsize)."""
    runs: tuple[tuple[int, int], ...] = ()
    """(offset, length) data runs that follow in the stream; ((0, size),) for a plain file."""
    link_target: bytes | None = None
    hardlink_of: bytes | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    rdev: tuple[int, int] = (0, 0)
    patch_sha256: str | None = None
    """A patch (docs/tar-format.md): the runs go into the target's existing copy, the bytes
    between them are kept, and this is the SHA-256 of the whole file as the source read it."""

    @property
    def data_size(self) -> int:
        return sum(length for _, length in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": _b64(self.path),
            "type": self.type.value,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
            "size": self.size,
            "runs": [list(r) for r in self.runs],
            "link_target": None if self.link_target is None else _b64(self.link_target),
            "hardlink_of": None if self.hardlink_of is None else _b64(self.hardlink_of),
            "xattrs": [[k, _b64(v)] for k, v in self.xattrs],
            "rdev": list(self.rdev),
            "patch_sha256": self.patch_sha256,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Header:
        lt, hl = doc["link_target"], doc["hardlink_of"]
        return cls(
            path=_unb64(doc["path"]),
            type=EntryType(doc["type"]),
            mode=int(doc["mode"]),
            uid=int(doc["uid"]),
            gid=int(doc["gid"]),
            mtime_ns=int(doc["mtime_ns"]),
            size=int(doc["size"]),
            runs=tuple((int(o), int(n)) for o, n in doc["runs"]),
            link_target=None if lt is None else _unb64(lt),
            hardlink_of=None if hl is None else _unb64(hl),
            xattrs=tuple((str(k), _unb64(v)) for k, v in doc["xattrs"]),
            rdev=(int(doc["rdev"][0]), int(doc["rdev"][1])),
            patch_sha256=doc.get("patch_sha256"),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# --- parsing: pure functions over bytes ------------------------------------------------------

# Numeric fields repeat from header to header (modes, owners, sizes, close mtimes): a bounded
# memo of raw field -> value skips re-validating them. Only successes are stored.
_OCTALS: dict[bytes, int] = {}
_OCTALS_MAX = 4096


def _decimal(raw: bytes, what: str, path: bytes | None = None) -> int:
    if not raw or not raw.isdigit() or len(raw) > 20:
        raise MalformedArchive(f"{what} is not a decimal number: {raw[:32]!r}", path)
    return int(raw)


def _octal(field: bytes, what: str) -> int:
    value = _OCTALS.get(field)
    if value is not None:
        return value
    if field[:1] and field[0] & 0x80:
        raise MalformedArchive(f"base-256 {what} field is not supported")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        value = 0
    elif digits.strip(b"01234567"):
        raise MalformedArchive(f"{what} field is not octal: {field!r}")
    else:
        value = int(digits, 8)
    if len(_OCTALS) >= _OCTALS_MAX:
        _OCTALS.clear()
    _OCTALS[field] = value
    return value


def _check_block(block: bytes) -> None:
    stored = _octal(block[148:156], "checksum")
    # The byte sum of each 256-byte half is at most 65280, below adler32's modulus 65521, so
    # the low half of adler32 (1 + sum) gives it exactly, without a Python-level loop.
    unsigned = (
        (zlib.adler32(block[:256]) & 0xFFFF)
        + (zlib.adler32(block[256:]) & 0xFFFF)
        - 2
        - sum(block[148:156])
        + 8 * 0x20  # the checksum field counts as spaces
    )
    if stored != unsigned:
        # Some old tars summed signed chars; both are valid per the historical format.
        rest = block[:148] + block[156:]
        if stored != unsigned - 256 * sum(b > 127 for b in rest):
            raise MalformedArchive(
                f"header checksum mismatch (stored {stored}, computed {unsigned})"
            )
    if block[257:265] != b"ustar\x0000":
        raise MalformedArchive(f"not a POSIX ustar header (magic {block[257:265]!r})")


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes, records: dict[bytes, bytes]) -> None:
    """Add the records of one extended header to `records` (later ones win)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise MalformedArchive("PAX record without a length")
        digits = data[pos:space]
        if not digits.isdigit() or len(digits) > 20:
            raise MalformedArchive(f"PAX record length is not a decimal number: {digits!r}")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise MalformedArchive("PAX record length does not match its content")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise MalformedArchive(f"PAX record without a key: {data[pos:end][:64]!r}")
        records[key] = value
        pos = end


def _parse_mtime(raw: bytes, path: bytes) -> int:
    sec, dot, frac = raw.partition(b".")
    if len(frac) == 9 and len(sec) <= 20 and sec.isdigit() and frac.isdigit():
        return int(sec) * 1_000_000_000 + int(frac)  # what tarstream writes
    negative = raw.startswith(b"-")
    sec, dot, frac = (raw[1:] if negative else raw).partition(b".")
    ns = _decimal(sec, "mtime", path) * 1_000_000_000
    if dot:
        _decimal(frac, "mtime fraction", path)  # validates
        # Digits past the ninth are below a nanosecond: dropped, as the filesystem would.
        ns += int(frac[:9].ljust(9, b"0"))
    return -ns if negative else ns


def _clean_path(raw: bytes, limits: Limits, what: str = "name") -> bytes:
    """The checked relative form of a name: "." for the root, else without "./" and "/"."""
    if (
        raw
        and raw[0] != 0x2F  # "/"
        and raw[0] != 0x2E  # ".": no "./" prefix, no leading "." or ".." component
        and raw[-1] != 0x2F
        and len(raw) <= limits.max_path_bytes
        and b"\0" not in raw
        and b"//" not in raw
        and b"/." not in raw  # no later component starts with "."
    ):
        return raw  # already in clean form: no empty, "." or ".." component
    if len(raw) > limits.max_path_bytes:
        raise LimitExceeded(f"{what} longer than {limits.max_path_bytes} bytes", raw[:256])
    if not raw:
        raise UnsafeEntry(f"empty {what}", raw)
    if b"\0" in raw:
        raise UnsafeEntry(f"NUL byte in {what}", raw)
    if raw.startswith(b"/"):
        raise UnsafeEntry(f"absolute {what}", raw)
    path = raw[2:] if raw.startswith(b"./") else raw
    path = path.rstrip(b"/")
    if path == b"" or path == b".":
        return b"."
    # Empty components: a leading "/" (after "./") or "//" (trailing ones were stripped).
    if path.startswith(b"/") or b"//" in path:
        raise UnsafeEntry(f"{what} has an empty, '.' or '..' component", raw)
    if b"." in path:
        for part in path.split(b"/"):
            if part == b"." or part == b"..":
                raise UnsafeEntry(f"{what} has an empty, '.' or '..' component", raw)
    return path


_TYPEFLAGS = {
    0x30: EntryType.FILE,  # "0"
    0x00: EntryType.FILE,  # NUL
    0x31: EntryType.FILE,  # "1": hard link
    0x32: EntryType.SYMLINK,
    0x33: EntryType.CHAR,
    0x34: EntryType.BLOCK,
    0x35: EntryType.DIR,
    0x36: EntryType.FIFO,
}
_REFUSED_FLAGS = frozenset(b"gLKS")
_PAX_FLAG = 0x78  # "x"
_HARDLINK_FLAG = 0x31
_NO_PAX: dict[bytes, bytes] = {}


def _sparse_map_cap(limits: Limits) -> int:
    # The most bytes a map of `max_sparse_runs` runs can take: 21 bytes per number, padded.
    return (1 + 2 * limits.max_sparse_runs) * 21 + BLOCK


def _parse_sparse_map(
    data: bytes, declared: int, realsize: int, limits: Limits, path: bytes
) -> tuple[int, tuple[tuple[int, int], ...]] | int:
    """(bytes the padded map takes, runs), or the byte count needed before it can be parsed.

    `data` starts at the map; only its first `min(padded(declared), map cap)` bytes are read."""
    usable = min(len(data) // BLOCK * BLOCK, _padded(declared))
    first = data.find(b"\n", 0, usable)
    count = _decimal(data[:first], "sparse map count", path) if first >= 0 else None
    if count is not None and count > limits.max_sparse_runs:
        raise LimitExceeded(f"sparse map of {count} runs (limit {limits.max_sparse_runs})", path)
    lines: list[bytes] = []
    if count is not None:
        lines = data[first + 1 : usable].split(b"\n", 2 * count)
    if count is None or len(lines) <= 2 * count:
        if usable >= declared:
            raise MalformedArchive("sparse map longer than the entry's declared size", path)
        if usable > _sparse_map_cap(limits):
            raise LimitExceeded("sparse map too long", path)
        # Each missing line takes at least its newline: ask for that much at once (a block at
        # a time re-parses a large map thousands of times). Never more than the map needs, so
        # a buffered header ends exactly where the map does.
        missing = 1 if count is None else 2 * count + 1 - len(lines)
        return usable + _padded(missing)
    numbers = [_decimal(n, "sparse map entry", path) for n in lines[: 2 * count]]
    runs = tuple(zip(numbers[0::2], numbers[1::2], strict=True))
    map_bytes = _padded(first + 1 + sum(len(n) + 1 for n in lines[: 2 * count]))
    end = 0
    for offset, length in runs:
        if offset < end or offset + length > realsize:
            raise MalformedArchive(
                f"sparse run ({offset}, {length}) overlaps, is unsorted or exceeds the "
                f"real size {realsize}",
                path,
            )
        end = offset + length
    if map_bytes + sum(n for _, n in runs) != declared:
        raise MalformedArchive("sparse map and runs do not add up to the declared size", path)
    return map_bytes, runs


def _ustar_numbers(block: bytes) -> tuple[int, int, int, int]:
    """(mode, uid, gid, size) of a ustar block. Files of one tree mostly share these fields
    byte for byte: the 36 raw bytes are memoized as a whole (bounded, successes only)."""
    raw = block[100:136]
    numbers = _NUMBERS.get(raw)
    if numbers is None:
        numbers = (
            _octal(block[100:108], "mode") & 0o7777,
            _octal(block[108:116], "uid"),
            _octal(block[116:124], "gid"),
            _octal(block[124:136], "size"),
        )
        if len(_NUMBERS) >= _OCTALS_MAX:
            _NUMBERS.clear()
        _NUMBERS[raw] = numbers
    return numbers


_NUMBERS: dict[bytes, tuple[int, int, int, int]] = {}


def _build_header(
    block: bytes, pax: dict[bytes, bytes], limits: Limits
) -> tuple[Header, int, int, bool]:
    """The entry of a ustar block and its extended records:
    (header, declared size, realsize, sparse)."""
    flag = block[156]
    sparse = False
    mode, uid, gid, size = _ustar_numbers(block)
    mtime = link = None
    if pax:
        raw_path = pax.get(b"path")
        # Records other than these two are rare: look for sparse, number and xattr records
        # only when there are some.
        mtime = pax.get(b"mtime")
        others = len(pax) - (raw_path is not None) - (mtime is not None)
        if raw_path is None:
            raw_path = _ustar_name(block)
        if others:
            sparse = b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax
            if sparse:
                if pax.get(b"GNU.sparse.major") != b"1" or pax.get(b"GNU.sparse.minor") != b"0":
                    raise MalformedArchive("only GNU sparse format 1.0 is supported", raw_path)
                if b"GNU.sparse.name" not in pax or b"GNU.sparse.realsize" not in pax:
                    raise MalformedArchive("sparse entry without name or realsize", raw_path)
                raw_path = pax[b"GNU.sparse.name"]
    else:
        raw_path = _ustar_name(block)
        others = 0
    path = _clean_path(raw_path, limits)
    kind = _TYPEFLAGS.get(flag)
    if kind is None:
        raise MalformedArchive(f"unsupported entry type {bytes([flag])!r}", path)
    xattrs: list[tuple[str, bytes]] = []
    if others:
        if b"size" in pax:
            size = _decimal(pax[b"size"], "size", path)
        if b"uid" in pax:
            uid = _decimal(pax[b"uid"], "uid", path)
        if b"gid" in pax:
            gid = _decimal(pax[b"gid"], "gid", path)
        link = pax.get(b"linkpath")
        for key, value in pax.items():
            if key.startswith(b"SCHILY.xattr."):
                xname = key[len(b"SCHILY.xattr.") :]
                if not xname or b"\0" in xname:
                    raise MalformedArchive(f"bad xattr name {xname!r}", path)
                xattrs.append((xname.decode("utf-8", "surrogateescape"), value))
        xattrs.sort()
    mtime_ns = (
        _octal(block[136:148], "mtime") * 1_000_000_000
        if mtime is None
        else _parse_mtime(mtime, path)
    )
    realsize = size
    if sparse:
        if flag != 0x30 and flag != 0:
            raise MalformedArchive("sparse entry is not a regular file", path)
        realsize = _decimal(pax[b"GNU.sparse.realsize"], "sparse realsize", path)
    elif size and (kind is not EntryType.FILE or flag == _HARDLINK_FLAG):
        raise MalformedArchive(f"{kind.value} entry declares {size} data bytes", path)
    if path == b"." and kind is not EntryType.DIR:
        raise UnsafeEntry(f"the root entry is a {kind.value}, not a directory", path)
    patch = pax.get(PATCH_KEY) if others else None
    if patch is not None and not (sparse and _SHA256_HEX.fullmatch(patch)):
        raise MalformedArchive("a patch is a sparse entry with a SHA-256 in hex", path)
    if kind is EntryType.FILE and flag != _HARDLINK_FLAG:
        return (
            Header(
                path,
                kind,
                mode,
                uid,
                gid,
                mtime_ns,
                realsize,
                () if sparse else ((0, size),),
                None,
                None,
                tuple(xattrs),
                patch_sha256=None if patch is None else patch.decode("ascii"),
            ),
            size,
            realsize,
            sparse,
        )
    header = Header(path, kind, mode, uid, gid, mtime_ns, 0, (), None, None, tuple(xattrs))
    if link is None:
        link = _cstr(block[157:257])
    if flag == _HARDLINK_FLAG:
        header.hardlink_of = _clean_path(link, limits, "hard link target")
    elif kind is EntryType.SYMLINK:
        if not link or b"\0" in link:
            raise UnsafeEntry("symlink with an empty target or a NUL byte", path)
        header.link_target = link
    elif kind is EntryType.CHAR or kind is EntryType.BLOCK:
        header.rdev = (_octal(block[329:337], "devmajor"), _octal(block[337:345], "devminor"))
    return header, size, realsize, sparse


def _ustar_name(block: bytes) -> bytes:
    nul = block.find(0, 0, 100)
    name = block[: 100 if nul < 0 else nul]
    if block[345]:
        return _cstr(block[345:500]) + b"/" + name
    return name


def _parse_headers(
    buf: bytes, pos: int, end: int, limits: Limits
) -> tuple[int, Header | None] | int:
    """Parse the header sequence at `buf[pos:end]` (extended headers, ustar header, sparse
    map). Returns (position after it, header) — header None for a zero block — or, if the
    bytes end too early, the count of bytes from `pos` that parsing needs before it can go on.
    Each block is parsed once; nothing past the headers is copied."""
    start = pos
    pax_bytes = 0
    pax = _NO_PAX
    while True:
        if end - pos < BLOCK:
            return pos - start + BLOCK
        block = buf[pos : pos + BLOCK]
        if block == _ZERO_BLOCK:
            if pos != start:
                raise MalformedArchive("zero block after an extended header")
            return pos + BLOCK, None
        _check_block(block)
        flag = block[156]
        if flag != _PAX_FLAG:
            if flag in _REFUSED_FLAGS:
                raise MalformedArchive(
                    f"unsupported header type {bytes([flag])!r} (global/GNU extension)"
                )
            break
        size = _octal(block[124:136], "size")
        pax_bytes += size
        if pax_bytes > limits.max_pax_bytes:
            raise LimitExceeded(
                f"extended header of {pax_bytes} bytes (limit {limits.max_pax_bytes})",
                _cstr(block[0:100]),
            )
        data_end = pos + BLOCK + _padded(size)
        if data_end > end:
            return data_end - start
        if pax is _NO_PAX:
            pax = {}
        _parse_pax(buf[pos + BLOCK : pos + BLOCK + size], pax)
        pos = data_end
    header, declared, realsize, sparse = _build_header(block, pax, limits)
    pos += BLOCK
    if sparse and header.hardlink_of is None:
        window = min(end - pos, _padded(declared), _sparse_map_cap(limits) + BLOCK)
        parsed = _parse_sparse_map(buf[pos : pos + window], declared, realsize, limits, header.path)
        if isinstance(parsed, int):
            return pos - start + parsed
        map_bytes, header.runs = parsed
        pos += map_bytes
    return pos, header


def parse_entry(buf: bytes, limits: Limits) -> tuple[int, Header | None] | int:
    """Parse the header sequence at the start of `buf` (extended headers, ustar header, sparse
    map). Returns (bytes consumed, header) — header None for a zero block — or, if `buf` is
    too short, the total length it must reach before parsing can go on."""
    return _parse_headers(buf, 0, len(buf), limits)


# --- applying entries ------------------------------------------------------------------------


def _plain(h: Header) -> bool:
    """A regular file whose data is all of it, from offset 0 (not a hard link, no holes; a
    patch that changes every byte is a plain file too)."""
    runs = h.runs
    return len(runs) == 1 and runs[0][0] == 0 and runs[0][1] == h.size


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Known:
    """The digest of a patched file: given by the source, not computed from the runs."""

    def __init__(self, hexdigest: str) -> None:
        self._hexdigest = hexdigest

    def update(self, _data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hexdigest


def _journal_paths(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The paths in bytes [start, end) of a files journal, read a block at a time."""
    buf = b""
    while start < end:
        chunk = os.pread(fd, min(end - start, _READ_SIZE), start)
        if not chunk:
            raise OSError(errno.EIO, "the files journal is shorter than written")
        start += len(chunk)
        buf += chunk
        pos = 0
        while len(buf) - pos >= 4:
            stop = pos + 4 + int.from_bytes(buf[pos : pos + 4], "little")
            if stop > len(buf):
                break
            yield buf[pos + 4 : stop]
            pos = stop
        buf = buf[pos:]
    if buf:
        raise OSError(errno.EIO, "the files journal ends inside a record")


def _syncfs(fd: int) -> None:
    # One syncfs per commit flushes every file closed since the last one in a single journal
    # commit; an fsync per small file would cost a journal commit each.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _proc_path(dir_fd: int, name: bytes) -> bytes:
    # Names an entry through the pinned directory fd: nothing before `name` is resolved again.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _set_xattrs(
    target: int | bytes, xattrs: tuple[tuple[str, bytes], ...], *, fresh: bool = False
) -> None:
    """Make the xattrs exactly these (never following a symlink). Stale names outside the
    "security." namespace are removed; labels there belong to the target host's policy.
    `fresh`: the entry was just created where nothing can be inherited (see `_inherits`), so
    it has none to remove."""
    wanted = dict(xattrs)
    follow = isinstance(target, int)  # an fd is the entry itself; Python refuses False there
    if not fresh:
        try:
            present = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) or wanted:
                raise
            present = []
        for name in present:
            if name not in wanted and not name.startswith("security."):
                os.removexattr(target, name, follow_symlinks=follow)
    for name, value in xattrs:
        os.setxattr(target, name, value, follow_symlinks=follow)


def _inherits(dir_fd: int) -> bool:
    """Whether entries created in this directory may get xattrs from it: a default ACL, or
    any other name outside "security." (btrfs properties, NFSv4 ACLs...). Without one, a new
    entry starts with no xattrs beyond the host's security labels."""
    try:
        names = os.listxattr(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return any(not name.startswith("security.") for name in names)


def _apply_meta_fd(fd: int, h: Header, *, fresh: bool = False) -> None:
    os.fchown(fd, h.uid, h.gid)
    os.fchmod(fd, h.mode)  # after chown: chown clears setuid/setgid
    if h.xattrs or not fresh:
        _set_xattrs(fd, h.xattrs, fresh=fresh)  # after chown: chown drops security.capability
    os.utime(fd, ns=(h.mtime_ns, h.mtime_ns))


def _remove_tree(dir_fd: int, name: bytes) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in map(os.fsencode, os.listdir(fd)):
            st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


class Extractor:
    """Writes one tar stream into `root`. Not thread-safe, except that the progress counters
    (`offset`, `bytes_written`, `files_done`, `entries_done`) may be read from any thread.

    Digests of finished regular files go to `on_file`, or are queued for `drain_digests()`.
    After a resume, files finished after the checkpoint are reported again: keep the last
    digest per path. Hard links are not reported (their content is the first path's).
    Memory does not grow with the number of entries: the paths of the regular files written
    (for the hard-link check) are kept on disk in `state_dir`.

    Entries are created with O_EXCL first: in a fresh volume nothing is in the way, and only
    when something is (an incremental pass, a resume, a re-sent path) is it looked at and
    removed, never followed.
    """

    def __init__(
        self,
        root: StrPath,
        state_dir: StrPath,
        *,
        allow_devices: bool = False,
        allow_existing_links: bool = False,
        limits: Limits = Limits(),
        on_file: Callable[[FileDigest], None] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Start a fresh extraction, or continue one from `checkpoint` (see `resume`).

        `allow_existing_links`: an incremental pass re-sends a hard link without its unchanged
        first path, so its target may be a regular file already in the volume (still reached
        only through the volume, never outside it)."""
        self.allow_devices = allow_devices
        self.allow_existing_links = allow_existing_links
        self.limits = limits
        self._on_file = on_file
        self._digests: list[FileDigest] = []
        self.offset = 0
        self.bytes_written = 0
        self.files_done = 0
        self.entries_done = 0
        self._buf = bytearray()
        self._need = BLOCK
        self._zero_blocks = 0
        self._phase = _HEADER
        self._entry: Header | None = None
        self._fd: int | None = None
        self._created = False
        """The open file was created empty by this object (not reopened after a resume)."""
        self._fresh = False
        """... and in a directory that passes no xattrs on (see `_inherits`)."""
        self._hasher: _Hasher = hashlib.sha256()
        self._data_size = 0
        self._data_done = 0
        self._hash_pos = 0
        self._run = 0
        self._run_off = 0
        self._pad_left = 0
        self._failed: ExtractError | None = None
        self._parent: tuple[bytes, int] | None = None
        self._parent_inherits = True
        self._index: PathIndex | None = None
        self._indexed = 0  # bytes of the files journal in the index
        self._journal_fd = -1  # for reading the files journal back into the index
        self._recent: set[bytes] | None = None
        """Paths journaled since the first hard link (and link targets found in the index), up
        to `_RECENT_BYTES` (then restarted): a link to a recent file is answered from memory."""
        self._recent_bytes = 0
        state = os.fsencode(state_dir)
        os.makedirs(state, mode=0o700, exist_ok=True)
        self._index_path = os.path.join(state, _FILES_INDEX)
        self._root_fd = os.open(os.fsencode(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs_log = open(os.path.join(state, _DIRS_LOG), "ab")  # noqa: SIM115 - closed by close()
        self._files_log = open(os.path.join(state, _FILES_LOG), "ab")  # noqa: SIM115
        try:
            if checkpoint is None:
                for log in (self._dirs_log, self._files_log):
                    log.truncate(0)
                    log.seek(0, os.SEEK_END)  # truncate() leaves tell() where it was
            else:
                self._restore(checkpoint)
        except BaseException:
            self.close()
            raise

    @classmethod
    def resume(
        cls,
        root: StrPath,
        state_dir: StrPath,
        checkpoint: Mapping[str, Any],
        *,
        allow_devices: bool = False,
        allow_existing_links: bool = False,
        limits: Limits = Limits(),
        on_file: Callable[[FileDigest], None] | None = None,
    ) -> Extractor:
        """Continue from a `commit()` checkpoint; feed the stream from checkpoint["offset"]."""
        return cls(
            root,
            state_dir,
            allow_devices=allow_devices,
            allow_existing_links=allow_existing_links,
            limits=limits,
            on_file=on_file,
            checkpoint=checkpoint,
        )

    # -- public operations ----------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next contiguous bytes of the stream, writing entries as they complete."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        try:
            self._feed(data if type(data) is bytes else bytes(data))
        except ExtractError as e:
            self._failed = e
            raise
        except OSError as e:
            path = None if self._entry is None else self._entry.path
            self._failed = WriteFailed(
                f"{e.strerror or e} ({errno.errorcode.get(e.errno or 0)})", path
            )
            raise self._failed from e

    def commit(self) -> dict[str, Any]:
        """Make everything written so far durable and return the checkpoint to resume from."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        if self._fd is not None:
            os.fsync(self._fd)
        for log in (self._dirs_log, self._files_log):
            log.flush()
            os.fsync(log.fileno())
        _syncfs(self._root_fd)
        return {
            "version": CHECKPOINT_VERSION,
            "offset": self.offset,
            "pending": _b64(bytes(self._buf)),
            "zero_blocks": self._zero_blocks,
            "phase": self._phase,
            "entry": None if self._entry is None else self._entry.to_json(),
            "data_done": self._data_done,
            "hash_pos": self._hash_pos,
            "pad_left": self._pad_left,
            "dirs_log_bytes": self._dirs_log.tell(),
            "files_log_bytes": self._files_log.tell(),
            "progress": self.progress(),
        }

    def finish(self) -> dict[str, int]:
        """After the end-of-archive blocks: apply directory metadata, sync, return a summary."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        if self._phase != _END:
            raise MalformedArchive(f"stream ended at offset {self.offset} before end-of-archive")
        self._dirs_log.flush()
        dirs = 0
        try:
            with open(self._dirs_log.name, "rb") as log:
                # Journal order (parents first) is fine: setting a child's mode, owner or
                # times never changes its parent's mtime; only adding entries does.
                for line in log:
                    self._apply_dir(Header.from_json(json.loads(line)))
                    dirs += 1
            _syncfs(self._root_fd)
        except OSError as e:
            raise WriteFailed(f"applying directory metadata: {e}") from e
        return {**self.progress(), "dirs": dirs}

    def progress(self) -> dict[str, int]:
        return {
            "offset": self.offset,
            "bytes_written": self.bytes_written,
            "files_done": self.files_done,
            "entries_done": self.entries_done,
        }

    def drain_digests(self) -> list[FileDigest]:
        out, self._digests = self._digests, []
        return out

    def close(self) -> None:
        """Release file descriptors; uncommitted work is simply redone after a resume."""
        try:
            for fd in (self._fd, self._parent[1] if self._parent else None, self._root_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
        finally:
            self._fd, self._parent, self._root_fd = None, None, -1
            self._dirs_log.close()
            self._files_log.close()
            if self._journal_fd >= 0:
                os.close(self._journal_fd)
                self._journal_fd = -1
            if self._index is not None:
                self._index.close()
                self._index = None

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stream state machine -------------------------------------------------------------

    def _feed(self, buf: bytes) -> None:
        mv = memoryview(buf)
        pos, end = 0, len(buf)
        limits = self.limits
        while pos < end:
            phase = self._phase
            if phase is _HEADER:
                if self._buf:
                    # A header sequence split across calls: gather exactly what it needs.
                    n = min(end - pos, self._need - len(self._buf))
                    self._buf += mv[pos : pos + n]
                    pos += n
                    self.offset += n
                    if len(self._buf) < self._need:
                        return
                    parsed = parse_entry(bytes(self._buf), limits)
                    if isinstance(parsed, int):
                        self._need = parsed
                        continue
                    consumed, header = parsed
                    assert consumed == len(self._buf), "parser consumed a partial buffer"
                    self._buf.clear()
                    self._need = BLOCK
                    self._header(header, consumed)
                    continue
                parsed = _parse_headers(buf, pos, end, limits)
                if isinstance(parsed, int):
                    self._buf += mv[pos:end]
                    self._need = parsed
                    self.offset += end - pos
                    return
                after, header = parsed
                self.offset += after - pos
                consumed, pos = after - pos, after
                if (
                    header is not None
                    and header.type is EntryType.FILE
                    and _plain(header)
                    and end - pos >= _padded(header.size)
                    and not self._zero_blocks
                ):
                    # The common case: a whole plain file in this buffer, written in one go.
                    pos = self._whole_file(header, mv, pos)
                else:
                    self._header(header, consumed)
            elif phase is _DATA:
                n = min(end - pos, self._data_size - self._data_done)
                self._write(mv[pos : pos + n])
                pos += n
                self.offset += n
                if self._data_done == self._data_size:
                    self._phase = _PAD
                    if not self._pad_left:
                        self._complete_file()
            elif phase is _PAD:
                n = min(end - pos, self._pad_left)
                self._pad_left -= n
                pos += n
                self.offset += n
                if not self._pad_left:
                    self._complete_file()
            else:
                if buf.count(0, pos, end) != end - pos:
                    raise MalformedArchive(f"data after end-of-archive at offset {self.offset}")
                self.offset += end - pos
                return

    def _header(self, header: Header | None, consumed: int) -> None:
        if header is None:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._phase = _END
            return
        if self._zero_blocks:
            raise MalformedArchive(f"lone zero block before offset {self.offset - consumed}")
        self._start_entry(header)

    # -- entries ----------------------------------------------------------------------------

    def _whole_file(self, h: Header, mv: memoryview, pos: int) -> int:
        """Create, write and complete a plain file whose data (at `pos`) is all in `mv`;
        returns the position after its padding."""
        self._entry = h
        self.entries_done += 1
        fd = self._fd = self._create(h)
        size = h.size
        if size:
            data = mv[pos : pos + size]
            done = os.pwrite(fd, data, 0)
            while done < size:
                done += os.pwrite(fd, data[done:], done)
            self._hasher = hashlib.sha256(data)
            self.bytes_written += size
        else:
            self._hasher = hashlib.sha256()
        end = pos + _padded(size)
        self.offset += end - pos
        self._close_file(h, fd, truncate=False)
        return end

    def _start_entry(self, h: Header) -> None:
        self._entry = h
        self.entries_done += 1
        if h.type is EntryType.DIR:
            if h.path != b".":
                d, name = self._parent_of(h.path)
                try:
                    os.mkdir(name, 0o700, dir_fd=d)
                except FileExistsError:
                    if not self._clear(d, name, keep_dir=True):
                        os.mkdir(name, 0o700, dir_fd=d)
            line = json.dumps(h.to_json(), separators=(",", ":")).encode() + b"\n"
            self._dirs_log.write(line)
        elif h.hardlink_of is not None:
            self._link(h)
        elif h.type is EntryType.FILE:
            if h.patch_sha256 is not None and not _plain(h):
                self._fd = self._open_patched(h)
                self._hasher = _Known(h.patch_sha256)
            else:
                self._fd = self._create(h)
                self._hasher = hashlib.sha256()
            self._data_size = h.data_size
            self._data_done = self._hash_pos = self._run = self._run_off = 0
            self._pad_left = _padded(self._data_size) - self._data_size
            self._phase = _DATA if self._data_size else _PAD
            if not self._data_size and not self._pad_left:
                self._complete_file()
            return
        else:
            self._make_special(h)
        self._entry = None

    def _create(self, h: Header) -> int:
        """A new, empty regular file at `h.path`, replacing what is there (not following it)."""
        d, name = self._parent_of(h.path)
        try:
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=d)
        except FileExistsError:
            self._clear(d, name, keep_dir=False)
            fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=d)
        self._created = True
        self._fresh = not self._parent_inherits
        return fd

    def _open_patched(self, h: Header) -> int:
        """The target's own copy of a file a patch applies to: a regular file with one link,
        opened for writing in place, never followed."""
        d, name = self._parent_of(h.path)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=d)
        except FileNotFoundError as e:
            raise UnsafeEntry("a patch for a file the target does not have", h.path) from e
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
            raise UnsafeEntry("a patch for something that is not a regular file", h.path) from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafeEntry("a patch for something that is not a single-link file", h.path)
        self._created = self._fresh = False
        return fd

    def _write(self, mv: memoryview) -> None:
        assert self._entry is not None and self._fd is not None
        runs = self._entry.runs
        while mv:
            while self._run_off >= runs[self._run][1]:
                self._run, self._run_off = self._run + 1, 0
            offset, length = runs[self._run]
            self._hash_zeros(offset)
            n = min(len(mv), length - self._run_off)
            chunk = mv[:n]
            done = 0
            while done < n:
                done += os.pwrite(self._fd, chunk[done:], offset + self._run_off + done)
            self._hasher.update(chunk)
            self._run_off += n
            self._hash_pos += n
            self._data_done += n
            self.bytes_written += n
            mv = mv[n:]

    def _hash_zeros(self, upto: int) -> None:
        while self._hash_pos < upto:
            n = min(upto - self._hash_pos, len(_ZEROS))
            self._hasher.update(_ZEROS[:n])
            self._hash_pos += n

    def _complete_file(self) -> None:
        h, fd = self._entry, self._fd
        assert h is not None and fd is not None
        self._hash_zeros(h.size)
        # A plain file created here holds exactly its bytes; a sparse one gets its trailing
        # hole only from the truncate, and a reopened one is truncated to be sure.
        self._close_file(h, fd, truncate=not (self._created and _plain(h)))
        self._data_size = self._data_done = self._hash_pos = self._run = self._run_off = 0
        self._pad_left = 0
        self._phase = _HEADER

    def _close_file(self, h: Header, fd: int, *, truncate: bool) -> None:
        if truncate:
            os.ftruncate(fd, h.size)
        _apply_meta_fd(fd, h, fresh=self._fresh)
        self._fd = None
        os.close(fd)
        path = h.path
        self._files_log.write(len(path).to_bytes(4, "little") + path)
        if self._recent is not None:
            self._remember(path)
        digest = FileDigest(h.path, self._hasher.hexdigest(), h.size)
        if self._on_file is not None:
            self._on_file(digest)
        else:
            self._digests.append(digest)
        self.files_done += 1
        self._entry = None

    def _link(self, h: Header) -> None:
        target = h.hardlink_of
        assert target is not None
        if target == b"." or target == h.path:
            raise UnsafeLink(f"hard link target {target!r} is not an earlier file", h.path)
        if not self.allow_existing_links and not self._written(target):
            raise UnsafeLink(f"hard link target {target!r} is not an earlier file", h.path)
        parts = target.split(b"/")
        src = self._walk(parts[:-1], create=False, path=target)
        try:
            st = os.stat(parts[-1], dir_fd=src, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeLink(f"hard link target {target!r} is no longer a file", h.path)
            d, name = self._parent_of(h.path)
            try:
                os.link(parts[-1], name, src_dir_fd=src, dst_dir_fd=d, follow_symlinks=False)
            except FileExistsError:
                self._clear(d, name, keep_dir=False)
                os.link(parts[-1], name, src_dir_fd=src, dst_dir_fd=d, follow_symlinks=False)
        finally:
            os.close(src)

    def _make_special(self, h: Header) -> None:
        if h.type in (EntryType.CHAR, EntryType.BLOCK) and not self.allow_devices:
            raise DeviceRefused("device nodes are not allowed for this transfer", h.path)
        d, name = self._parent_of(h.path)
        try:
            self._mknod(h, d, name)
        except FileExistsError:
            self._clear(d, name, keep_dir=False)
            self._mknod(h, d, name)
        os.chown(name, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
        if h.type is not EntryType.SYMLINK:  # Linux has no symlink modes
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            try:
                os.chmod(b"/proc/self/fd/%d" % fd, h.mode)
            finally:
                os.close(fd)
        fresh = not self._parent_inherits
        if h.xattrs or not fresh:
            _set_xattrs(_proc_path(d, name), h.xattrs, fresh=fresh)
        os.utime(name, ns=(h.mtime_ns, h.mtime_ns), dir_fd=d, follow_symlinks=False)

    @staticmethod
    def _mknod(h: Header, d: int, name: bytes) -> None:
        if h.type is EntryType.SYMLINK:
            assert h.link_target is not None
            os.symlink(h.link_target, name, dir_fd=d)
        elif h.type is EntryType.FIFO:
            os.mkfifo(name, 0o600, dir_fd=d)
        else:
            kind = stat.S_IFCHR if h.type is EntryType.CHAR else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(*h.rdev), dir_fd=d)

    def _apply_dir(self, h: Header) -> None:
        if h.path == b".":
            _apply_meta_fd(self._root_fd, h)
            return
        try:
            fd = self._walk(h.path.split(b"/"), create=False, path=h.path)
        except (UnsafeEntry, FileNotFoundError):
            return  # replaced later in the stream by a non-directory: that entry won
        try:
            _apply_meta_fd(fd, h)
        finally:
            os.close(fd)

    def _written(self, path: bytes) -> bool:
        """Whether this stream wrote a regular file at `path`: in the files journal, looked up
        through the recent paths, else an index on disk brought up to date first. Only hard
        links ask, so a stream without any never builds either."""
        if self._recent is None:
            self._recent = set()
        elif path in self._recent:
            return True
        self._files_log.flush()
        end = self._files_log.tell()
        if self._index is None:
            self._index, self._indexed = PathIndex(self._index_path), 0
            self._journal_fd = os.open(self._files_log.name, os.O_RDONLY | os.O_CLOEXEC)
        if self._indexed < end:
            self._index.add(_journal_paths(self._journal_fd, self._indexed, end))
            self._indexed = end
        if path not in self._index:
            return False
        self._remember(path)  # more links to it are likely: the next ones are answered here
        return True

    def _remember(self, path: bytes) -> None:
        assert self._recent is not None
        self._recent.add(path)
        self._recent_bytes += len(path) + _RECENT_OVERHEAD
        if self._recent_bytes > _RECENT_BYTES:
            self._recent.clear()
            self._recent_bytes = 0

    # -- safe paths -------------------------------------------------------------------------

    def _walk(self, parts: list[bytes], *, create: bool, path: bytes) -> int:
        """An fd (owned by the caller) of the directory `parts` below the root, reached one
        component at a time without following symlinks; missing ones made if `create`."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeEntry(
                            f"parent {part!r} is a symlink or not a directory", path
                        ) from e
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_of(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last component); the fd is cached, do not close it."""
        parent, _, name = path.rpartition(b"/")
        cached = self._parent
        if cached is not None and cached[0] == parent:
            return cached[1], name
        self._drop_parent()
        fd = self._walk(parent.split(b"/") if parent else [], create=True, path=path)
        self._parent = (parent, fd)
        try:
            self._parent_inherits = _inherits(fd)
        except BaseException:
            self._drop_parent()
            raise
        return fd, name

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None
            self._parent_inherits = True

    def _clear(self, dir_fd: int, name: bytes, *, keep_dir: bool) -> bool:
        """Remove what is at `name` (never following it); True if it is a directory kept."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            # `dir_fd` is the cached parent, never inside the removed tree: the cache stays.
            _remove_tree(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)
        return False

    # -- resume -----------------------------------------------------------------------------

    def _restore(self, cp: Mapping[str, Any]) -> None:
        try:
            if cp["version"] != CHECKPOINT_VERSION:
                raise BadCheckpoint(f"checkpoint version {cp['version']!r} is not supported")
            self.offset = int(cp["offset"])
            self._buf = bytearray(_unb64(cp["pending"]))
            self._zero_blocks = int(cp["zero_blocks"])
            phase = str(cp["phase"])
            self._entry = None if cp["entry"] is None else Header.from_json(cp["entry"])
            self._data_done = int(cp["data_done"])
            self._hash_pos = int(cp["hash_pos"])
            self._pad_left = int(cp["pad_left"])
            dirs_len, files_len = int(cp["dirs_log_bytes"]), int(cp["files_log_bytes"])
            prog = cp["progress"]
            self.bytes_written = int(prog["bytes_written"])
            self.files_done = int(prog["files_done"])
            self.entries_done = int(prog["entries_done"])
        except (KeyError, ValueError, TypeError) as e:
            raise BadCheckpoint(f"malformed checkpoint: {e!r}") from e
        if self._entry is not None:
            try:
                safe = _clean_path(self._entry.path, self.limits) == self._entry.path
            except ExtractError:
                safe = False
            if not safe:
                raise BadCheckpoint("checkpoint entry has an unsafe path", self._entry.path)
        self._phase = _PHASES.get(phase, "")
        if not self._phase or (self._phase in (_DATA, _PAD) and self._entry is None):
            raise BadCheckpoint(f"inconsistent checkpoint phase {phase!r}")
        if self._entry is not None:
            self._data_size = self._entry.data_size
            if self._data_done > self._data_size or self._hash_pos > self._entry.size:
                raise BadCheckpoint("checkpoint position is past the entry's data")
        for log, length in ((self._dirs_log, dirs_len), (self._files_log, files_len)):
            if os.fstat(log.fileno()).st_size < length:
                raise BadCheckpoint(f"journal {log.name!r} is shorter than its checkpoint")
            log.truncate(length)
            log.seek(0, os.SEEK_END)
        if self._buf:
            self._need = len(self._buf)
            self._parse_pending()
        if self._entry is not None:
            self._reopen(self._entry)

    def _parse_pending(self) -> None:
        parsed = parse_entry(bytes(self._buf), self.limits)
        if isinstance(parsed, int):
            self._need = parsed
        else:
            raise BadCheckpoint("checkpoint holds a complete, unapplied header")

    def _reopen(self, h: Header) -> None:
        """Reopen the file in progress without truncating and re-hash its written prefix."""
        d, name = self._parent_of(h.path)
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError as e:
            raise BadCheckpoint("the file in progress vanished from the volume", h.path) from e
        self._fd = fd
        self._created = self._fresh = False
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadCheckpoint("the entry in progress is no longer a regular file", h.path)
        if h.patch_sha256 is not None and not _plain(h):
            self._hasher = _Known(h.patch_sha256)
        else:
            self._rehash(fd)
        run, left = 0, self._data_done
        while run < len(h.runs) and left >= h.runs[run][1]:
            left -= h.runs[run][1]
            run += 1
        self._run, self._run_off = run, left  # run == len(runs) once all data is written

    def _rehash(self, fd: int) -> None:
        self._hasher = hashlib.sha256()
        done = 0
        while done < self._hash_pos:
            chunk = os.pread(fd, min(self._hash_pos - done, 1 << 20), done)
            if not chunk:  # a trailing hole not yet truncated: zeros
                self._hasher.update(_ZEROS[: min(self._hash_pos - done, len(_ZEROS))])
                done += min(self._hash_pos - done, len(_ZEROS))
                continue
            self._hasher.update(chunk)
            done += len(chunk)
