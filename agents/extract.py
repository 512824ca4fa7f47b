"""Extract the verified PAX tar stream straight into a volume directory, resumable mid-entry.

Owns parsing the tar stream incrementally (any split points) and applying each entry to the
target root with exact metadata. Pure stdlib, blocking I/O (callers run it in a thread); no
asyncio, Docker or sockets; must not import `migrator`. It does not use `tarfile`: its
extraction filters drop ownership and rewrite modes, and it cannot resume mid-file.

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
time; an existing symlink is never followed (it is replaced). A hard link must name an earlier
regular file of this stream. Devices need `allow_devices`. Errors are typed (tree below) and
carry the entry's name; after one, the extractor refuses more input (resume from a checkpoint).

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
metadata (applied by `finish()`, after the children) and the identities of the regular files
(for hard-link checks) live in append-only journals in `state_dir`, cut back to their committed
length on resume.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agents.errors import AgentError
from agents.manifest import EntryType

BLOCK = 512
CHECKPOINT_VERSION = 1
_ZERO_BLOCK = bytes(BLOCK)
_ZEROS = bytes(1 << 20)  # holes are hashed from this buffer, 1 MiB per update call
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRS_LOG = b"extract-dirs.jsonl"
_FILES_LOG = b"extract-files.bin"
_FILE_ID = 16  # bytes of blake2b per regular file in the files journal

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


@dataclass(frozen=True, slots=True)
class FileDigest:
    """SHA-256 of a regular file's logical content (holes read as zeros), as written."""

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
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# --- parsing: pure functions over bytes ------------------------------------------------------


def _decimal(raw: bytes, what: str, path: bytes | None = None) -> int:
    if not raw or not raw.isdigit() or len(raw) > 20:
        raise MalformedArchive(f"{what} is not a decimal number: {raw[:32]!r}", path)
    return int(raw)


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise MalformedArchive(f"base-256 {what} field is not supported")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if digits.strip(b"01234567"):
        raise MalformedArchive(f"{what} field is not octal: {field!r}")
    return int(digits, 8)


def _check_block(block: bytes) -> None:
    stored = _octal(block[148:156], "checksum")
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20  # the checksum field counts as spaces
    # Some old tars summed signed chars; both are valid per the historical format.
    if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in rest):
        raise MalformedArchive(f"header checksum mismatch (stored {stored}, computed {unsigned})")
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise MalformedArchive(f"not a POSIX ustar header (magic {block[257:265]!r})")


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise MalformedArchive("PAX record without a length")
        length = _decimal(data[pos:space], "PAX record length")
        end = pos + length
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise MalformedArchive("PAX record length does not match its content")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise MalformedArchive(f"PAX record without a key: {data[pos:end][:64]!r}")
        records[key] = value
        pos = end
    return records


def _parse_mtime(raw: bytes, path: bytes) -> int:
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
    if path in (b"", b"."):
        return b"."
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise UnsafeEntry(f"{what} has an empty, '.' or '..' component", raw)
    return path


_TYPEFLAGS = {
    b"0": EntryType.FILE,
    b"\0": EntryType.FILE,
    b"1": EntryType.FILE,  # hard link
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"6": EntryType.FIFO,
}


def _parse_sparse_map(
    data: bytes, declared: int, realsize: int, limits: Limits, path: bytes
) -> tuple[int, tuple[tuple[int, int], ...]] | int:
    """(bytes the padded map takes, runs), or the byte count needed before it can be parsed."""
    usable = min(len(data) // BLOCK * BLOCK, _padded(declared))
    lines = data[:usable].split(b"\n")
    complete = lines[:-1]
    count = _decimal(complete[0], "sparse map count", path) if complete else None
    if count is not None and count > limits.max_sparse_runs:
        raise LimitExceeded(f"sparse map of {count} runs (limit {limits.max_sparse_runs})", path)
    if count is None or len(complete) < 1 + 2 * count:
        if usable >= declared:
            raise MalformedArchive("sparse map longer than the entry's declared size", path)
        if usable > (1 + 2 * limits.max_sparse_runs) * 21 + BLOCK:
            raise LimitExceeded("sparse map too long", path)
        return usable + BLOCK
    numbers = [_decimal(n, "sparse map entry", path) for n in complete[1 : 1 + 2 * count]]
    runs = tuple(zip(numbers[0::2], numbers[1::2], strict=True))
    map_bytes = _padded(sum(len(n) + 1 for n in complete[: 1 + 2 * count]))
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


def _build_header(block: bytes, pax: dict[bytes, bytes], limits: Limits) -> tuple[Header, int, int]:
    """The entry of a ustar block and its extended records: (header, declared size, realsize)."""
    name = _cstr(block[0:100])
    prefix = _cstr(block[345:500])
    raw_path = pax.get(b"path", prefix + b"/" + name if prefix else name)
    flag = block[156:157]
    sparse = b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax
    if sparse:
        if pax.get(b"GNU.sparse.major") != b"1" or pax.get(b"GNU.sparse.minor") != b"0":
            raise MalformedArchive("only GNU sparse format 1.0 is supported", raw_path)
        if b"GNU.sparse.name" not in pax or b"GNU.sparse.realsize" not in pax:
            raise MalformedArchive("sparse entry without name or realsize", raw_path)
        raw_path = pax[b"GNU.sparse.name"]
    path = _clean_path(raw_path, limits)
    kind = _TYPEFLAGS.get(flag)
    if kind is None:
        raise MalformedArchive(f"unsupported entry type {flag!r}", path)
    size = (
        _decimal(pax[b"size"], "size", path) if b"size" in pax else _octal(block[124:136], "size")
    )
    realsize = size
    if sparse:
        if flag not in (b"0", b"\0"):
            raise MalformedArchive("sparse entry is not a regular file", path)
        realsize = _decimal(pax[b"GNU.sparse.realsize"], "sparse realsize", path)
    elif size and (kind is not EntryType.FILE or flag == b"1"):
        raise MalformedArchive(f"{kind.value} entry declares {size} data bytes", path)
    xattrs = []
    for key, value in pax.items():
        if key.startswith(b"SCHILY.xattr."):
            xname = key[len(b"SCHILY.xattr.") :]
            if not xname or b"\0" in xname:
                raise MalformedArchive(f"bad xattr name {xname!r}", path)
            xattrs.append((xname.decode("utf-8", "surrogateescape"), value))
    link = pax.get(b"linkpath", _cstr(block[157:257]))
    header = Header(
        path=path,
        type=kind,
        mode=_octal(block[100:108], "mode") & 0o7777,
        uid=_decimal(pax[b"uid"], "uid", path) if b"uid" in pax else _octal(block[108:116], "uid"),
        gid=_decimal(pax[b"gid"], "gid", path) if b"gid" in pax else _octal(block[116:124], "gid"),
        mtime_ns=_parse_mtime(pax[b"mtime"], path)
        if b"mtime" in pax
        else _octal(block[136:148], "mtime") * 1_000_000_000,
        size=realsize if kind is EntryType.FILE else 0,
        runs=((0, size),) if kind is EntryType.FILE and not sparse else (),
        xattrs=tuple(sorted(xattrs)),
    )
    if flag == b"1":
        header.hardlink_of = _clean_path(link, limits, "hard link target")
        header.size, header.runs = 0, ()
    elif kind is EntryType.SYMLINK:
        if not link or b"\0" in link:
            raise UnsafeEntry("symlink with an empty target or a NUL byte", path)
        header.link_target = link
    elif kind in (EntryType.CHAR, EntryType.BLOCK):
        header.rdev = (_octal(block[329:337], "devmajor"), _octal(block[337:345], "devminor"))
    if path == b"." and kind is not EntryType.DIR:
        raise UnsafeEntry(f"the root entry is a {kind.value}, not a directory", path)
    return header, size, realsize


def parse_entry(buf: bytes, limits: Limits) -> tuple[int, Header | None] | int:
    """Parse the header sequence at the start of `buf` (extended headers, ustar header, sparse
    map). Returns (bytes consumed, header) — header None for a zero block — or, if `buf` is
    too short, the total length it must reach before parsing can go on."""
    pos, pax_bytes = 0, 0
    pax: dict[bytes, bytes] = {}
    while True:
        if len(buf) < pos + BLOCK:
            return pos + BLOCK
        block = buf[pos : pos + BLOCK]
        if block == _ZERO_BLOCK:
            if pos:
                raise MalformedArchive("zero block after an extended header")
            return BLOCK, None
        _check_block(block)
        flag = block[156:157]
        if flag in (b"g", b"L", b"K", b"S"):
            raise MalformedArchive(f"unsupported header type {flag!r} (global/GNU extension)")
        if flag != b"x":
            break
        size = _octal(block[124:136], "size")
        pax_bytes += size
        if pax_bytes > limits.max_pax_bytes:
            raise LimitExceeded(
                f"extended header of {pax_bytes} bytes (limit {limits.max_pax_bytes})",
                _cstr(block[0:100]),
            )
        if len(buf) < pos + BLOCK + _padded(size):
            return pos + BLOCK + _padded(size)
        pax.update(_parse_pax(buf[pos + BLOCK : pos + BLOCK + size]))
        pos += BLOCK + _padded(size)
    header, declared, realsize = _build_header(block, pax, limits)
    pos += BLOCK
    if header.type is EntryType.FILE and not header.runs and header.hardlink_of is None:
        parsed = _parse_sparse_map(buf[pos:], declared, realsize, limits, header.path)
        if isinstance(parsed, int):
            return pos + parsed
        map_bytes, header.runs = parsed
        pos += map_bytes
    return pos, header


# --- applying entries ------------------------------------------------------------------------


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


def _set_xattrs(target: int | bytes, xattrs: tuple[tuple[str, bytes], ...]) -> None:
    """Make the xattrs exactly these (never following a symlink). Stale names outside the
    "security." namespace are removed; labels there belong to the target host's policy."""
    wanted = dict(xattrs)
    follow = isinstance(target, int)  # an fd is the entry itself; Python refuses False there
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


def _apply_meta_fd(fd: int, h: Header) -> None:
    os.fchown(fd, h.uid, h.gid)
    os.fchmod(fd, h.mode)  # after chown: chown clears setuid/setgid
    _set_xattrs(fd, h.xattrs)  # after chown: chown drops security.capability
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
    Memory: 16 bytes (plus set overhead) per regular file, for the hard-link check.
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
        self._phase = "header"  # header | data | pad | end
        self._entry: Header | None = None
        self._fd: int | None = None
        self._hasher = hashlib.sha256()
        self._data_done = 0
        self._hash_pos = 0
        self._run = 0
        self._run_off = 0
        self._pad_left = 0
        self._failed: ExtractError | None = None
        self._parent: tuple[bytes, int] | None = None
        self._files: set[bytes] = set()
        state = os.fsencode(state_dir)
        os.makedirs(state, mode=0o700, exist_ok=True)
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

    def feed(self, data: bytes | memoryview) -> None:
        """Consume the next contiguous bytes of the stream, writing entries as they complete."""
        if self._failed is not None:
            raise ExtractError(f"extractor stopped after an error: {self._failed.detail}")
        try:
            self._feed(memoryview(data).cast("B"))
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
        if self._phase != "end":
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
        for fd in (self._fd, self._parent[1] if self._parent else None, self._root_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd, self._parent, self._root_fd = None, None, -1
        self._dirs_log.close()
        self._files_log.close()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stream state machine -------------------------------------------------------------

    def _feed(self, mv: memoryview) -> None:
        while mv:
            if self._phase == "data":
                n = min(len(mv), self._entry_data_left())
                self._write(mv[:n])
                self.offset += n
                mv = mv[n:]
                if self._entry_data_left() == 0:
                    self._phase = "pad"
            elif self._phase == "pad":
                n = min(len(mv), self._pad_left)
                self._pad_left -= n
                self.offset += n
                mv = mv[n:]
            elif self._phase == "header":
                n = min(len(mv), self._need - len(self._buf))
                self._buf += mv[:n]
                self.offset += n
                mv = mv[n:]
                if len(self._buf) >= self._need:
                    self._parse()
            else:
                if bytes(mv).strip(b"\0"):
                    raise MalformedArchive(f"data after end-of-archive at offset {self.offset}")
                self.offset += len(mv)
                return
            if self._phase == "pad" and self._pad_left == 0:
                self._complete_file()

    def _parse(self) -> None:
        parsed = parse_entry(bytes(self._buf), self.limits)
        if isinstance(parsed, int):
            self._need = parsed
            return
        consumed, header = parsed
        assert consumed == len(self._buf), "parser consumed a partial buffer"
        self._buf.clear()
        self._need = BLOCK
        if header is None:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._phase = "end"
            return
        if self._zero_blocks:
            raise MalformedArchive(f"lone zero block before offset {self.offset - consumed}")
        self._start_entry(header)

    def _entry_data_left(self) -> int:
        assert self._entry is not None
        return self._entry.data_size - self._data_done

    # -- entries ----------------------------------------------------------------------------

    def _start_entry(self, h: Header) -> None:
        self._entry = h
        self.entries_done += 1
        if h.type is EntryType.DIR:
            if h.path != b".":
                d, name = self._parent_of(h.path)
                if not self._clear(d, name, keep_dir=True):
                    os.mkdir(name, 0o700, dir_fd=d)
            line = json.dumps(h.to_json(), separators=(",", ":")).encode() + b"\n"
            self._dirs_log.write(line)
        elif h.hardlink_of is not None:
            self._link(h)
        elif h.type is EntryType.FILE:
            d, name = self._parent_of(h.path)
            self._clear(d, name, keep_dir=False)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(name, flags, 0o600, dir_fd=d)
            self._hasher = hashlib.sha256()
            self._data_done = self._hash_pos = self._run = self._run_off = 0
            self._pad_left = _padded(h.data_size) - h.data_size
            self._phase = "data" if h.data_size else "pad"  # _feed completes an empty one
            return
        else:
            self._make_special(h)
        self._entry = None

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
        os.ftruncate(fd, h.size)  # the trailing hole of a sparse file stays a hole
        _apply_meta_fd(fd, h)
        os.close(fd)
        self._fd = None
        self._files.add(self._file_id(h.path))
        self._files_log.write(self._file_id(h.path))
        digest = FileDigest(h.path, self._hasher.hexdigest(), h.size)
        if self._on_file is not None:
            self._on_file(digest)
        else:
            self._digests.append(digest)
        self.files_done += 1
        self._entry = None
        self._data_done = self._hash_pos = self._run = self._run_off = self._pad_left = 0
        self._phase = "header"

    def _link(self, h: Header) -> None:
        target = h.hardlink_of
        assert target is not None
        known = self._file_id(target) in self._files
        if target == b"." or target == h.path or not (known or self.allow_existing_links):
            raise UnsafeLink(f"hard link target {target!r} is not an earlier file", h.path)
        parts = target.split(b"/")
        src = self._walk(parts[:-1], create=False, path=target)
        try:
            st = os.stat(parts[-1], dir_fd=src, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeLink(f"hard link target {target!r} is no longer a file", h.path)
            d, name = self._parent_of(h.path)
            self._clear(d, name, keep_dir=False)
            os.link(parts[-1], name, src_dir_fd=src, dst_dir_fd=d, follow_symlinks=False)
        finally:
            os.close(src)

    def _make_special(self, h: Header) -> None:
        if h.type in (EntryType.CHAR, EntryType.BLOCK) and not self.allow_devices:
            raise DeviceRefused("device nodes are not allowed for this transfer", h.path)
        d, name = self._parent_of(h.path)
        self._clear(d, name, keep_dir=False)
        if h.type is EntryType.SYMLINK:
            assert h.link_target is not None
            os.symlink(h.link_target, name, dir_fd=d)
        elif h.type is EntryType.FIFO:
            os.mkfifo(name, 0o600, dir_fd=d)
        else:
            kind = stat.S_IFCHR if h.type is EntryType.CHAR else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(*h.rdev), dir_fd=d)
        os.chown(name, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
        if h.type is not EntryType.SYMLINK:  # Linux has no symlink modes
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
            try:
                os.chmod(b"/proc/self/fd/%d" % fd, h.mode)
            finally:
                os.close(fd)
        _set_xattrs(_proc_path(d, name), h.xattrs)
        os.utime(name, ns=(h.mtime_ns, h.mtime_ns), dir_fd=d, follow_symlinks=False)

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

    # -- safe paths -------------------------------------------------------------------------

    @staticmethod
    def _file_id(path: bytes) -> bytes:
        return hashlib.blake2b(path, digest_size=_FILE_ID).digest()

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
        if self._parent is None or self._parent[0] != parent:
            self._drop_parent()
            fd = self._walk(parent.split(b"/") if parent else [], create=True, path=path)
            self._parent = (parent, fd)
        return self._parent[1], name

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

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
            self._phase = str(cp["phase"])
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
        if self._phase not in ("header", "data", "pad", "end") or (
            self._phase in ("data", "pad") and self._entry is None
        ):
            raise BadCheckpoint(f"inconsistent checkpoint phase {self._phase!r}")
        for log, length in ((self._dirs_log, dirs_len), (self._files_log, files_len)):
            if os.fstat(log.fileno()).st_size < length:
                raise BadCheckpoint(f"journal {log.name!r} is shorter than its checkpoint")
            log.truncate(length)
            log.seek(0, os.SEEK_END)
        with open(self._files_log.name, "rb") as f:
            while ident := f.read(_FILE_ID):
                self._files.add(ident)
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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadCheckpoint("the entry in progress is no longer a regular file", h.path)
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
        run, left = 0, self._data_done
        while run < len(h.runs) and left >= h.runs[run][1]:
            left -= h.runs[run][1]
            run += 1
        self._run, self._run_off = run, left  # run == len(runs) once all data is written
