"""Incremental passes: what to send again, and what to delete, to make a target equal a source.

Used when the source changed between attempts of a pull, when files changed while they were
read, and to sync an existing target. The target fetches the source's current manifest, walks
its own volume, and joins the two in manifest order (both are sorted the same way, so the join
needs no index of either side):

* a source entry missing on the target, of another type, or with other metadata is selected;
* a regular file whose source mtime is not safely before the previous pass started is selected
  even if its metadata matches: mtime granularity and in-place writes can hide a change;
* every directory is selected (a header only), so directory metadata is re-applied last;
* a hard link is selected whenever its first path is;
* a target entry the source no longer has is deleted (never following symlinks).

The selection (paths in manifest order, one JSON string per line) is the body of the source's
filtered stream (`POST /v1/volumes/{name}/stream`), where `select` joins it with the walk. A
selected large file the target already has carries the target's block digests (a `Base`, see
agents/delta.py), so the source sends only the blocks that differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import aiohttp

from agents.delta import (
    Base,
    BaseCache,
    BaseError,
    ForeignBase,
    SourceKey,
    block_size_for,
    describe,
    file_key,
    source_key,
    worth_a_patch,
)
from agents.manifest import ROOT, Entry, EntryType, decode_path, encode_path, entry_from_json, walk
from agents.tarstream import VolumeFiles

log = logging.getLogger("migrator_agent.pulls")

# Timestamps of a change can lag the change by a clock tick (4 ms at HZ=250) and the two hosts'
# clocks are not compared at all (the window uses the source's own clock from the hello); two
# seconds of margin costs a few re-sent files and buys safety against coarse filesystems.
WINDOW_MARGIN_NS = 2_000_000_000


def order_key(path: bytes) -> tuple[bytes, ...]:
    """Manifest order: depth first, children by raw name bytes, the root first."""
    return () if path == ROOT else tuple(path.split(b"/"))


class PlanError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _differs(src: Entry, dst: Entry, window_start_ns: int | None) -> bool:
    if src.type is not dst.type:
        return True
    if src.type is EntryType.DIR:
        return True
    if src.hardlink_of is not None:
        return True
    if (src.mode, src.uid, src.gid, src.mtime_ns, src.xattrs) != (
        dst.mode,
        dst.uid,
        dst.gid,
        dst.mtime_ns,
        dst.xattrs,
    ):
        return True
    if src.type is EntryType.FILE:
        if src.size != dst.size:
            return True
        # Without a previous pass (syncing a target of unknown history), equal size and
        # nanosecond mtime count as equal, as rsync's default does.
        return window_start_ns is not None and src.mtime_ns >= window_start_ns - WINDOW_MARGIN_NS
    if src.type is EntryType.SYMLINK:
        return src.link_target != dst.link_target
    if src.type in (EntryType.CHAR, EntryType.BLOCK):
        return (src.rdev_major, src.rdev_minor) != (dst.rdev_major, dst.rdev_minor)
    return False


OnDelete = Callable[[bytes], None]
OnRename = Callable[[bytes, bytes], None]


def _remove(root: bytes, path: bytes, on_delete: OnDelete | None) -> None:
    full = os.path.join(root, path)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(full)  # fd-based: never follows a symlink inside the tree
    else:
        os.unlink(full)
    if on_delete is not None:
        on_delete(path)


def plan(
    source: Iterable[Entry],
    target_root: str | bytes,
    *,
    window_start_ns: int | None,
    on_delete: OnDelete | None = None,
) -> Iterator[bytes]:
    """Join the source manifest with the target's tree; delete target extras as they are met,
    and yield the paths to send, in manifest order. Blocking."""
    for path, _ in plan_with_bases(
        source, target_root, window_start_ns=window_start_ns, on_delete=on_delete, deltas=False
    ):
        yield path


def _patchable(src: Entry, dst: Entry) -> bool:
    """A file the source can send as a block delta against the target's copy."""
    return (
        src.single_file
        and dst.type is EntryType.FILE
        and dst.nlink == 1
        and worth_a_patch(src.size, dst.size)
    )


@dataclasses.dataclass
class Bases:
    """Where a plan gets the bases of the target's files: `cache` (of the volume `volume`)
    when it still describes a file, else by describing it, kept in the cache with `keep`."""

    cache: BaseCache
    volume: str
    keep: bool = False
    described: int = 0
    cached: int = 0

    def base(self, files: VolumeFiles, src: Entry, dst: Entry) -> Base | None:
        fd = files.open(dst.path)
        if fd is None:
            return None
        try:
            block = block_size_for(max(src.size, dst.size))
            st = os.fstat(fd)
            if st.st_size == dst.size:
                kept = self.cache.get(self.volume, dst.path, st, block)
                if kept is not None:
                    self.cached += 1
                    return kept
            base = describe(fd, dst.size, block)
            self.described += 1
            if self.keep and st.st_size == dst.size and file_key(os.fstat(fd)) == file_key(st):
                self.cache.put(self.volume, dst.path, st, base)
            return base
        finally:
            os.close(fd)


def _no_kept_bases() -> Bases:
    """A plan that keeps nothing: every base is read (an empty cache nobody fills)."""
    return Bases(BaseCache(), "")


def plan_with_bases(
    source: Iterable[Entry],
    target_root: str | bytes,
    *,
    window_start_ns: int | None,
    on_delete: OnDelete | None = None,
    deltas: bool = True,
    renamed: dict[bytes, Base | None] | None = None,
    bases: Bases | None = None,
    on_rename: OnRename | None = None,
) -> Iterator[tuple[bytes, Base | None]]:
    """`plan`, and for each selected large file the target already has, the base of the
    target's copy (agents/delta.py), so the source sends only the blocks that differ.

    With `deltas`, a large file the source no longer has is not deleted at once: it may have
    been renamed (PostgreSQL recycles its WAL segments by renaming old ones to future names,
    log rotation renames too). When the join is done, each new large file on the source takes
    over a leftover of the same size (the same mtime first) by a rename on the target, and its
    base goes into `renamed` (the caller adds it to the path's selection line); leftovers
    nobody takes are deleted then. Bases come from `bases` when given (see `Bases`); with
    them, a leftover that is the very source file now at a new path, unchanged, is renamed
    and its path maps to None in `renamed` (the caller drops it from the selection;
    `on_rename` moves its content digest)."""
    root = os.fsencode(target_root)
    with VolumeFiles(root) as files:
        planner = _Planner(root, files, window_start_ns, on_delete, deltas, bases, on_rename)
        yield from planner.join(source)
        paired = planner.reuse_leftovers()
    if renamed is not None:
        renamed.update(paired)


class _Planner:
    def __init__(
        self,
        root: bytes,
        files: VolumeFiles,
        window_start_ns: int | None,
        on_delete: OnDelete | None,
        deltas: bool,
        bases: Bases | None = None,
        on_rename: OnRename | None = None,
    ) -> None:
        self.root = root
        self.bases = bases if bases is not None else _no_kept_bases()
        self.on_rename = on_rename
        self.files = files
        self.window_start_ns = window_start_ns
        self.on_delete = on_delete
        self.deltas = deltas
        self.new_large: list[Entry] = []
        """Selected large files the target does not have: they may take over a leftover."""
        self.leftovers: list[Entry] = []
        """Large files the source no longer has, kept until the join is done."""

    def join(self, source: Iterable[Entry]) -> Iterator[tuple[bytes, Base | None]]:
        target = walk(self.root)
        dst = next(target, None)
        selected_inodes: set[bytes] = set()
        for src in source:
            key = order_key(src.path)
            while dst is not None and order_key(dst.path) < key:
                self._extra(dst)
                dst = next(target, None)
            same = dst if dst is not None and dst.path == src.path else None
            if same is not None:
                dst = next(target, None)
            if src.type is EntryType.SOCKET:
                continue
            if self.bases.keep and _patchable(src, src):
                # Which source file the target's copy of this path is: the next plan
                # recognises it when it has been renamed.
                self.bases.cache.note_source(self.bases.volume, src.path, source_key(src))
            if src.hardlink_of is not None and src.hardlink_of in selected_inodes:
                chosen = True
            else:
                chosen = same is None or _differs(src, same, self.window_start_ns)
            if not chosen:
                continue
            if src.type is EntryType.FILE and src.nlink > 1 and src.hardlink_of is None:
                selected_inodes.add(src.path)
            base = None
            if self.deltas and same is not None and _patchable(src, same):
                base = self.bases.base(self.files, src, same)
            elif self.deltas and same is None and _patchable(src, src):
                self.new_large.append(src)
            yield src.path, base
        while dst is not None:
            if dst.path != ROOT:
                self._extra(dst)
            dst = next(target, None)

    def _extra(self, dst: Entry) -> None:
        if self.deltas and _patchable(dst, dst):
            self.leftovers.append(dst)
        else:
            _remove(self.root, dst.path, self.on_delete)

    def reuse_leftovers(self) -> dict[bytes, Base | None]:
        """Rename leftovers to the new paths that can take them over; delete the rest. A new
        path maps to the base of the leftover it took over, or to None when that leftover is
        the same source file, renamed and unchanged (`_same_file`): nothing to send."""
        by_stamp: dict[tuple[int, int], list[Entry]] = {}
        by_size: dict[int, list[Entry]] = {}
        by_source: dict[SourceKey, Entry] = {}
        for left in reversed(self.leftovers):  # popped from the end: in manifest order
            by_stamp.setdefault((left.size, left.mtime_ns), []).append(left)
            by_size.setdefault(left.size, []).append(left)
            was = self.bases.cache.source_of(self.bases.volume, left.path)
            if was is not None:
                by_source[was] = left
        taken: set[bytes] = set()
        paired: dict[bytes, Base | None] = {}
        for new in self.new_large:
            same = by_source.get(source_key(new))
            if (
                same is not None
                and same.path not in taken
                and self._same_file(new, same)
                and _rename(self.files, same.path, new.path, self.bases)
            ):
                taken.add(same.path)
                if self.on_rename is not None:
                    self.on_rename(same.path, new.path)
                paired[new.path] = None
                continue
            spare = _pop_free(by_stamp.get((new.size, new.mtime_ns)), taken)
            spare = spare or _pop_free(by_size.get(new.size), taken)
            if spare is None or not _rename(self.files, spare.path, new.path, self.bases):
                continue
            taken.add(spare.path)
            if self.on_delete is not None:
                self.on_delete(spare.path)
            base = self.bases.base(self.files, new, dataclasses.replace(spare, path=new.path))
            if base is not None:
                paired[new.path] = base
        for old in self.leftovers:
            if old.path not in taken:
                _remove(self.root, old.path, self.on_delete)
        return paired

    def _same_file(self, new: Entry, left: Entry) -> bool:
        """`left` is the target's copy of the source file that is now `new`, renamed since the
        last plan and not written since: the source has the same inode, size and mtime as
        then, the mtime lies before the window of passes that may have missed a write, and
        the copy's metadata is what an unchanged file's is (the rule every pass applies to
        files that kept their name)."""
        if self.window_start_ns is None:
            return False
        return not _differs(new, dataclasses.replace(left, path=new.path), self.window_start_ns)


def _pop_free(candidates: list[Entry] | None, taken: set[bytes]) -> Entry | None:
    while candidates:
        entry = candidates.pop()
        if entry.path not in taken:
            return entry
    return None


def _rename(files: VolumeFiles, old: bytes, new: bytes, bases: Bases) -> bool:
    """Move the target's `old` to `new` (whose directory must exist and which must not);
    False when that cannot be done safely. A base kept for `old` follows it."""
    (old_dir, old_name), (new_dir, new_name) = os.path.split(old), os.path.split(new)
    src_fd = files.directory(old_dir)
    dst_fd = files.directory(new_dir) if src_fd is not None else None
    try:
        if src_fd is None or dst_fd is None:
            return False
        try:
            os.stat(new_name, dir_fd=dst_fd, follow_symlinks=False)
            return False  # something is there (the plan saw nothing): leave it to the stream
        except FileNotFoundError:
            pass
        try:
            before = os.stat(old_name, dir_fd=src_fd, follow_symlinks=False)
            os.rename(old_name, new_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            after = os.stat(new_name, dir_fd=dst_fd, follow_symlinks=False)
            bases.cache.moved(bases.volume, old, new, before, after)
        return True
    finally:
        for fd in (src_fd, dst_fd):
            if fd is not None:
                os.close(fd)


def select(entries: Iterable[Entry], selection: list[bytes]) -> Iterator[Entry]:
    """The source side of the join: entries whose path is selected (the root always), in
    order. Paths selected but gone since are skipped."""
    i = 0
    for entry in entries:
        key = order_key(entry.path)
        while i < len(selection) and order_key(selection[i]) < key:
            i += 1
        if entry.path == ROOT or (i < len(selection) and selection[i] == entry.path):
            yield entry


def parse_selection(body: bytes) -> list[bytes]:
    """The paths of a selection body (see `parse_selection_with_bases`)."""
    return parse_selection_with_bases(body)[0]


def selection_line(path: bytes, base: Base | None) -> bytes:
    value: object = decode_path(path)
    if base is not None:
        value = {"path": value, "base": base.to_json()}
    return json.dumps(value).encode() + b"\n"


def parse_selection_with_bases(body: bytes) -> tuple[list[bytes], dict[bytes, Base]]:
    """A selection body: one line per path, in manifest order; a line is the wire path as a
    JSON string, or an object `{"path": ..., "base": ...}` for a file the target describes
    block by block (agents/delta.py). Raises ValueError."""
    paths = []
    bases: dict[bytes, Base] = {}
    previous: tuple[bytes, ...] | None = None
    foreign = 0
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        value = json.loads(line)
        base = None
        if isinstance(value, dict):
            try:
                base = Base.from_json(value.get("base"))
            except ForeignBase as e:  # a target of another version: the file goes whole
                foreign += 1
                if foreign == 1:
                    log.warning("line %d: %s; such files are sent whole", n, e)
            except BaseError as e:
                raise ValueError(f"line {n}: {e}") from e
            value = value.get("path")
        if not isinstance(value, str):
            raise ValueError(f"line {n}: not a JSON string")
        path = encode_path(value)
        if base is not None:
            bases[path] = base
        key = order_key(path)
        if previous is not None and key <= previous:
            raise ValueError(f"line {n}: paths are not in manifest order")
        previous = key
        paths.append(path)
    return paths, bases


async def fetch_manifest(session: aiohttp.ClientSession, url: str, token: str, dest: Path) -> None:
    """Stream the source's manifest (NDJSON) into `dest`; raise PlanError if incomplete."""
    async with session.get(url, headers={"Authorization": f"Transfer {token}"}) as resp:
        if resp.status != 200:
            body = await resp.read()
            try:
                problem = json.loads(body)
            except ValueError:
                problem = {}
            code = str(problem.get("code") or f"http_{resp.status}")
            if code == "volume_not_found":
                code = "source_volume_not_found"
            raise PlanError(
                code, f"source manifest refused: {problem.get('detail') or resp.reason}"
            )
        f = await asyncio.to_thread(open, dest, "wb")
        tail = b""
        try:
            while chunk := await resp.content.read(1 << 20):
                await asyncio.to_thread(f.write, chunk)
                tail = (tail + chunk)[-4096:]
        finally:
            await asyncio.to_thread(f.close)
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if not last.startswith(b'{"totals"'):
        raise PlanError("transfer_failed", "the source manifest ended before its totals line")


def read_manifest(path: Path) -> Iterator[Entry]:
    with open(path, "rb") as f:
        for line in f:
            doc = json.loads(line)
            if "path" in doc:
                yield entry_from_json(doc)


def _add_bases(selection_path: Path, bases: dict[bytes, Base | None]) -> int:
    """Rewrite the selection with the bases of `bases`' paths, line by line; a path that maps
    to None is dropped. Returns the number of lines dropped."""
    tmp = selection_path.with_name(selection_path.name + ".tmp")
    dropped = 0
    with open(selection_path, "rb") as src, open(tmp, "wb") as out:
        for line in src:
            value = json.loads(line)
            path = encode_path(value) if isinstance(value, str) else None
            if path is None or path not in bases:
                out.write(line)
                continue
            base = bases[path]
            if base is None:
                dropped += 1
            else:
                out.write(selection_line(path, base))
    os.replace(tmp, selection_path)
    return dropped


async def plan_incremental_pass(
    session: aiohttp.ClientSession,
    manifest_url: str,
    token: str,
    target_root: str,
    selection_path: Path,
    *,
    window_start_ns: int | None,
    on_delete: OnDelete | None = None,
    bases: Bases | None = None,
    on_rename: OnRename | None = None,
) -> int:
    """Fetch the source manifest, plan against the target, write the selection file.
    Returns the number of selected paths."""
    bases = bases if bases is not None else _no_kept_bases()
    manifest = selection_path.with_name("source-manifest.ndjson")
    await fetch_manifest(session, manifest_url, token, manifest)

    def run() -> int:
        count = described = 0
        renamed: dict[bytes, Base | None] = {}
        with open(selection_path, "wb") as out:
            for path, base in plan_with_bases(
                read_manifest(manifest),
                target_root,
                window_start_ns=window_start_ns,
                on_delete=on_delete,
                renamed=renamed,
                bases=bases,
                on_rename=on_rename,
            ):
                out.write(selection_line(path, base))
                count += 1
                described += base is not None
        manifest.unlink()
        unchanged = _add_bases(selection_path, renamed) if renamed else 0
        count -= unchanged
        if described or renamed:
            log.info(
                "%d of %d selected paths described block by block, %d of them renamed "
                "leftovers; %d bases kept from the last pass, %d read; %d renamed files "
                "unchanged, not sent",
                described + len(renamed) - unchanged,
                count,
                len(renamed) - unchanged,
                bases.cached,
                bases.described,
                unchanged,
            )
        return count

    return await asyncio.to_thread(run)
