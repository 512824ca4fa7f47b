"""Parsing the PAX tar stream the target extracts: header sequences, checked to the byte.

Owns what a stream may say (docs/tar-format.md) and every refusal of what it may not: the
accepted header types and pax keys, name checks, numeric fields, sparse maps, patches, and the
typed errors of extraction. Pure: no file system, no I/O; `agents.extract` applies what this
parses. Must not import `migrator`.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agents.delta import parse_blocks_digest
from agents.errors import AgentError
from agents.manifest import EntryType
from agents.tarstream import PATCH_KEY

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


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
    patch_digest: str | None = None
    """A patch (docs/tar-format.md): the runs go into the target's existing copy, the bytes
    between them are kept, and this is the digest of the whole file as the source read it
    (`delta.blocks_digest`)."""

    @property
    def data_size(self) -> int:
        return sum(length for _, length in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": b64(self.path),
            "type": self.type.value,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
            "size": self.size,
            "runs": [list(r) for r in self.runs],
            "link_target": None if self.link_target is None else b64(self.link_target),
            "hardlink_of": None if self.hardlink_of is None else b64(self.hardlink_of),
            "xattrs": [[k, b64(v)] for k, v in self.xattrs],
            "rdev": list(self.rdev),
            "patch_digest": self.patch_digest,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Header:
        lt, hl = doc["link_target"], doc["hardlink_of"]
        return cls(
            path=unb64(doc["path"]),
            type=EntryType(doc["type"]),
            mode=int(doc["mode"]),
            uid=int(doc["uid"]),
            gid=int(doc["gid"]),
            mtime_ns=int(doc["mtime_ns"]),
            size=int(doc["size"]),
            runs=tuple((int(o), int(n)) for o, n in doc["runs"]),
            link_target=None if lt is None else unb64(lt),
            hardlink_of=None if hl is None else unb64(hl),
            xattrs=tuple((str(k), unb64(v)) for k, v in doc["xattrs"]),
            rdev=(int(doc["rdev"][0]), int(doc["rdev"][1])),
            patch_digest=doc.get("patch_digest"),
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def padded(n: int) -> int:
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


def clean_path(raw: bytes, limits: Limits, what: str = "name") -> bytes:
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
    usable = min(len(data) // BLOCK * BLOCK, padded(declared))
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
        return usable + padded(missing)
    numbers = [_decimal(n, "sparse map entry", path) for n in lines[: 2 * count]]
    runs = tuple(zip(numbers[0::2], numbers[1::2], strict=True))
    map_bytes = padded(first + 1 + sum(len(n) + 1 for n in lines[: 2 * count]))
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
    path = clean_path(raw_path, limits)
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
    if patch is not None and not (
        sparse and parse_blocks_digest(patch.decode("ascii", "replace")) is not None
    ):
        raise MalformedArchive("a patch is a sparse entry with a blocks digest", path)
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
                patch_digest=None if patch is None else patch.decode("ascii"),
            ),
            size,
            realsize,
            sparse,
        )
    header = Header(path, kind, mode, uid, gid, mtime_ns, 0, (), None, None, tuple(xattrs))
    if link is None:
        link = _cstr(block[157:257])
    if flag == _HARDLINK_FLAG:
        header.hardlink_of = clean_path(link, limits, "hard link target")
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


def parse_headers(
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
        data_end = pos + BLOCK + padded(size)
        if data_end > end:
            return data_end - start
        if pax is _NO_PAX:
            pax = {}
        _parse_pax(buf[pos + BLOCK : pos + BLOCK + size], pax)
        pos = data_end
    header, declared, realsize, sparse = _build_header(block, pax, limits)
    pos += BLOCK
    if sparse and header.hardlink_of is None:
        window = min(end - pos, padded(declared), _sparse_map_cap(limits) + BLOCK)
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
    return parse_headers(buf, 0, len(buf), limits)


# --- applying entries ------------------------------------------------------------------------


def is_plain(h: Header) -> bool:
    """A regular file whose data is all of it, from offset 0 (not a hard link, no holes; a
    patch that changes every byte is a plain file too)."""
    runs = h.runs
    return len(runs) == 1 and runs[0][0] == 0 and runs[0][1] == h.size
