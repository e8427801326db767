"""Local-disk tier ("G3"): one file per block, written atomically, verified on read.

Layout: ``<root>/<namespace digest>/<hash hex>.kvb``; each file is one :func:`encode_record`
record (header with format version, key, dtype, shape and a checksum of the header fields
and payload; then the payload). A write
goes to a temporary file in the same directory and is renamed over the final name
(``os.replace``), optionally after ``fsync``, so a reader sees a whole record or none. A file
that fails verification on read (corrupt, truncated, other key) is a miss and is deleted; one
this process cannot verify (another format version, a checksum algorithm it lacks) is a miss
and stays, for the processes that can.

The blocks survive the process: a new ``DiskTier`` on the same root finds them (persistence
across model reloads). ``budget_bytes`` (optional) bounds the files this tier object knows,
evicting least-recently-used ones (mtime, refreshed on every hit) when a put needs room; a put
never evicts the files it wrote itself.

A namespace directory is removed once its last file goes (eviction, removal, ``clear()``; the
start-up scan removes those it finds empty): with per-tenant salts the directories are as many
as the tenants ever seen, and left behind they took inodes and slowed every start-up scan.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..validate import check_int
from .base import (
    BlockKey,
    RecordError,
    Tier,
    UnexpectedLayout,
    check_checksum,
    check_get_layout,
    check_keys,
    check_put_values,
    decode_record,
    encode_record,
    first_occurrences,
    readable_here,
    record_head_size,
)

SUFFIX = ".kvb"
#: Temporary files (``.tmp-*.part``) older than this are a writer killed mid-write: the start-up
#: scan deletes them (a live writer's file is seconds old).
STALE_PART_SECONDS = 3600
_HEX = frozenset("0123456789abcdef")


def _is_namespace_dir(name: str) -> bool:
    """Whether ``name`` is a namespace directory of this layout (a 32-hex-char digest): the
    only directories under root that this tier ever removes."""
    return len(name) == 32 and _HEX.issuperset(name)


def _prune(d: str) -> None:
    """Remove the namespace directory ``d`` if it is empty. Not empty (another file, another
    process's write in progress), gone already, or not removable: left as it is. A directory
    not named as a namespace (a file the scan found elsewhere under root) is never removed. A
    writer that loses its directory to this between ``makedirs`` and ``mkstemp`` makes it
    again (:meth:`DiskTier._mkstemp`)."""
    if _is_namespace_dir(os.path.basename(d)):
        with contextlib.suppress(OSError):
            os.rmdir(d)


class DiskTier(Tier):
    """Block files under ``root``.

    root: directory (created if missing). budget_bytes: optional bound on the bytes of block
    files (LRU by mtime); None = unbounded. fsync: fsync each file (and its directory) before
    it becomes visible: durable across power loss, slower. checksum: "crc32" or "xxh3_128"
    (default: xxh3_128 when xxhash is installed).
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, *, budget_bytes: int | None = None,
                 fsync: bool = False, checksum: str | None = None):
        super().__init__()
        self.budget_bytes = (None if budget_bytes is None else
                             check_int("budget_bytes", budget_bytes, 1, " (a byte count) or None"))
        self.checksum = check_checksum(checksum)
        try:
            root = os.fspath(root)
        except TypeError:
            raise TypeError(f"root: expected a str or os.PathLike directory, got "
                            f"{type(root).__name__}") from None
        # a bytes path decoded as the OS would (os.fsdecode): every call joined it with str
        # names and raised TypeError
        self.root = os.fsdecode(root)
        self.fsync = bool(fsync)
        os.makedirs(self.root, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # path -> bytes, LRU first
        self._known: dict[str, BlockKey] = {}  # path -> key, for events (files seen this run)
        self._stored: list[BlockKey] = []  # stores of the current put not yet published
        # path -> _identity of a file that failed verification and could not be deleted (a
        # read-only directory): batch_exists must not count it while that very file is there
        self._bad: dict[str, tuple[int, int, int, int]] = {}
        self.used_bytes = 0
        self._scan()

    def _scan(self) -> None:
        """Index the block files already under root, oldest mtime first, entry by entry (a
        file another process deletes meanwhile is skipped, not the rest of the scan), delete
        temporary files older than STALE_PART_SECONDS (a writer killed mid-write), and remove
        the namespace directories left empty (by an earlier run, or by those deletions)."""
        found = []
        stale = time.time() - STALE_PART_SECONDS
        for d in self._entries(self.root):
            if not d.is_dir(follow_symlinks=False):
                continue
            entries = self._entries(d.path)
            left = len(entries)  # entries still there
            for f in entries:
                try:
                    if not f.is_file(follow_symlinks=False):
                        continue
                    st = f.stat()
                    if f.name.endswith(SUFFIX):
                        found.append((st.st_mtime_ns, f.path, st.st_size))
                    elif f.name.startswith(".tmp-") and f.name.endswith(".part") and (
                            st.st_mtime < stale):
                        os.unlink(f.path)
                        left -= 1
                except FileNotFoundError:  # gone meanwhile (another process evicted it)
                    left -= 1
                    continue
                except OSError:
                    self.stats.errors += 1
            if not left:
                _prune(d.path)
        for _, path, size in sorted(found):
            self._sizes[path] = size
            self.used_bytes += size

    def _entries(self, path: str) -> list:
        """The entries of a directory, [] when it cannot be listed (gone meanwhile: quietly;
        another error: counted)."""
        try:
            with os.scandir(path) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except OSError:
            self.stats.errors += 1
            return []

    def path(self, key: BlockKey) -> str:
        return os.path.join(self.root, key.namespace.digest(), key.block_hash.hex() + SUFFIX)

    def _forget(self, path: str) -> None:
        self._known.pop(path, None)
        self._bad.pop(path, None)
        size = self._sizes.pop(path, None)
        if size is not None:
            self.used_bytes -= size

    def _drop(self, path: str, prune: bool = True) -> bool:
        """Delete a block file and stop indexing it: True once it is gone (deleted, or gone
        already). A file that cannot be deleted (a read-only directory: EACCES, EROFS) is
        counted in ``errors`` and False: it is still on disk and served, so it stays indexed
        (under the budget and ``clear()``), and no removal may be reported for it.
        ``prune``: then remove its directory if that left it empty (one rmdir, failing with
        ENOTEMPTY while other files are there: cheaper than keeping per-directory counts
        that other processes' files would make wrong anyway)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            self.stats.errors += 1
            return False
        self._forget(path)
        if prune:
            _prune(os.path.dirname(path))
        return True

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
        """Which file a path names now: another file put there since (renamed over it) differs."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _open(self, path: str) -> tuple[int, os.stat_result] | None:
        """``(fd, stat)`` of the regular file at ``path`` opened for reading; None (nothing
        open, counted in ``errors``: a storage fault) when something else is there. Opened
        with O_NONBLOCK: a FIFO at a block's path made ``open`` wait forever for a writer (a
        device could block too); on a regular file the flag changes nothing. OSError from
        ``open`` (FileNotFoundError included) propagates."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(st.st_mode):
            return fd, st
        os.close(fd)
        self.stats.errors += 1
        return None

    def batch_exists(self, keys: Sequence[BlockKey]) -> int:
        """Leading keys whose file holds a record this process can read: the fixed header is
        read and checked (magic, format version, checksum algorithm), so a file left by
        another version, or whose version field flipped, is not counted as a hit that every
        ``batch_get`` then misses. The payload is verified by ``batch_get``."""
        keys = check_keys(keys)
        n = 0
        size = record_head_size()
        for k in keys:
            p = self.path(k)
            try:  # os-level open/read: a buffered file object costs twice the read
                opened = self._open(p)
                if opened is None:  # not a regular file (a FIFO, a directory): a miss
                    break
                fd, st = opened
                try:
                    head = os.read(fd, size)
                finally:
                    os.close(fd)
            except (FileNotFoundError, NotADirectoryError):
                break
            except OSError:
                self.stats.errors += 1
                break
            if not readable_here(head):
                break
            if self._bad and self._bad.get(p) == self._identity(st):
                break  # failed verification and could not be deleted: not a hit
            n += 1
        return n

    def _read(self, path: str) -> tuple[bytes, os.stat_result] | None:
        """The file's bytes and stat; None when it is gone (then no longer indexed) or is not a
        regular file (a FIFO, a directory: counted in ``errors``; not a block file, so not
        indexed either, and left where it is). Any other OSError (EMFILE, EIO, EACCES)
        propagates: the file may well be there, so it stays indexed."""
        try:
            opened = self._open(path)
        except (FileNotFoundError, NotADirectoryError):
            self._forget(path)
            return None
        if opened is None:
            self._forget(path)
            return None
        fd, st = opened
        try:
            f = open(fd, "rb")  # noqa: SIM115 - it owns fd once made; until then we do
        except BaseException:
            os.close(fd)
            raise
        with f:
            return f.read(), st

    def batch_get(self, keys, *, shape=None, dtype=None):
        """A file that is gone is forgotten; one that fails verification is deleted (another
        shape or dtype than asked, or a record this process cannot verify: kept). A read that
        fails otherwise (too many open files, an I/O error) is a miss that keeps the file
        indexed: it is still on disk, under the budget and ``clear()``."""
        keys = check_keys(keys)
        shape, dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = []
        for k in keys:
            p = self.path(k)
            try:
                read = self._read(p)
            except OSError:
                self.stats.errors += 1
                read = None
            if read is None:
                self.stats.misses += 1
                out.append(None)
                continue
            data, st = read
            try:
                arr = decode_record(k, data, shape=shape, dtype=dtype)
            except RecordError as e:
                if isinstance(e, UnexpectedLayout):
                    self._layout_miss(e)
                else:
                    self.stats.corrupt += 1
                self.stats.misses += 1
                # A corrupt/truncated file is deleted; a shape/dtype the caller did not expect
                # (a valid record of this key), another format version or a checksum this
                # process cannot compute (another worker reads it) stays. One that cannot be
                # deleted (a read-only directory) is not reported removed; it is remembered,
                # so batch_exists stops counting it all the same.
                if not isinstance(e, UnexpectedLayout):
                    if self._drop(p):
                        self._publish("removed", [k])
                    else:
                        self._bad[p] = self._identity(st)
                out.append(None)
                continue
            self.stats.hits += 1
            self.stats.bytes_read += len(data)
            self._known[p] = k
            try:
                os.utime(p)
                if p in self._sizes:
                    self._sizes.move_to_end(p)
                else:
                    self._sizes[p] = len(data)
                    self.used_bytes += len(data)
            except OSError:
                pass
            out.append(arr)
        return out

    def _make_room(self, nbytes: int, protect: set[str] | frozenset = frozenset(),
                   replacing: str | None = None) -> bool:
        """Evict LRU files not in ``protect`` (this put's own files) until ``nbytes`` fit.
        ``replacing``: the indexed file the new one will replace (its bytes count as freed;
        never evicted: it stays indexed until its replacement is written)."""
        if self.budget_bytes is None:
            return True
        if nbytes > self.budget_bytes:
            return False
        kept = frozenset(protect)
        if replacing is not None and replacing in self._sizes:
            nbytes -= self._sizes[replacing]
            kept = kept | {replacing}
        evicted = []
        stuck: set[str] = set()  # files this call failed to delete
        if self.used_bytes + nbytes > self.budget_bytes and self._stored:
            # events stay in order: this call's earlier stores come before these evictions
            stored, self._stored = self._stored, []
            self._publish("stored", stored)
        while self.used_bytes + nbytes > self.budget_bytes:
            # ``kept`` names files this put wrote (and the one it replaces), all indexed and
            # newest: as many of them as indexed files means nothing can go (known without a
            # scan, so a put over the budget refuses each further block in O(1)); nor can the
            # files this call failed to delete (a read-only directory)
            if len(kept) + len(stuck) >= len(self._sizes):
                break
            oldest = next(p for p in self._sizes if p not in kept and p not in stuck)
            key = self._known.get(oldest)
            if not self._drop(oldest):  # still there, still indexed: no room made
                stuck.add(oldest)
                continue
            self.stats.evictions += 1
            if key is not None:  # files from an earlier run: key unknown, no event
                evicted.append(key)
        self._publish("evicted", evicted)
        return self.used_bytes + nbytes <= self.budget_bytes

    @staticmethod
    def _mkstemp(d: str, tries: int = 8) -> tuple[int, str]:
        """A new temporary file in the namespace directory ``d``, made first if missing. Again
        (up to ``tries`` times) while ``d`` goes under it: another process (or thread) removes
        it as empty (its last file evicted) between ``makedirs`` and ``mkstemp``
        (FileNotFoundError), or inside ``makedirs``, between its mkdir finding ``d`` and its
        check that ``d`` is a directory (FileExistsError); the file made in it then keeps it.
        Once was not enough: two tiers on one root failed a put in a few a second."""
        for _ in range(tries - 1):
            try:
                os.makedirs(d, exist_ok=True)
                return tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)
            except (FileNotFoundError, FileExistsError):
                pass
        # the last try raises what it meets (a file at d: FileExistsError every time)
        os.makedirs(d, exist_ok=True)
        return tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)

    def _write(self, path: str, header: bytes, payload: memoryview) -> bool:
        d = os.path.dirname(path)
        tmp = None
        try:
            fd, tmp = self._mkstemp(d)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            if self.fsync:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return True
        except OSError:
            self.stats.errors += 1
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def batch_put(self, keys, values):
        """Every value's dtype is checked against its key's namespace before anything is
        written (ValueError, as :class:`HostTier`). Making room never evicts a block this put
        wrote: a block the budget cannot hold besides them reports ``False``. A key repeated
        in the batch is written once; each of its positions reports that result.

        A key whose file exists is written again (its old bytes count as room). The old file
        stays indexed until the new one replaces it: a write that fails (no space, the budget)
        leaves it served, counted and evicted as before, and the key then reports whether that
        file holds this very value (a valid record of its shape, dtype and bytes: the usual
        case, a key naming its content)."""
        keys, values = check_put_values(keys, values)
        results = [False] * len(values)
        protect: set[str] = set()  # files written by this put
        firsts, repeats = first_occurrences(keys)
        self._stored = []
        try:
            for i in firsts:
                k, v = keys[i], values[i]
                p = self.path(k)
                header, payload = encode_record(k, v, checksum_alg=self.checksum)
                nbytes = len(header) + payload.nbytes
                if not (self._make_room(nbytes, protect, replacing=p)
                        and self._write(p, header, payload)):
                    results[i] = self._holds(p, k, v, payload)
                    if results[i]:
                        protect.add(p)  # held now: the rest of this put keeps it
                    else:
                        self.stats.rejected += 1
                    continue
                self.used_bytes += nbytes - self._sizes.pop(p, 0)
                self._sizes[p] = nbytes  # the newest
                self._bad.pop(p, None)  # renamed over whatever failed verification there
                self._known[p] = k
                self._stored.append(k)
                protect.add(p)
                self.stats.puts += 1
                self.stats.bytes_written += nbytes
                results[i] = True
        finally:
            for i, j in repeats:
                results[i] = results[j]
            stored, self._stored = self._stored, []
            self._publish("stored", stored)
        return results

    def _holds(self, path: str, key: BlockKey, value: np.ndarray, payload: memoryview) -> bool:
        """Whether the file ``path`` holds a valid record of ``key`` with ``value`` itself (its
        shape, dtype and bytes ``payload``), asked after a failed write: the file already
        there stays. Such a file is indexed and made the most recently used, as a hit is."""
        try:
            read = self._read(path)
            if read is None:
                return False
            data = read[0]
            arr = decode_record(key, data, shape=value.shape, dtype=value.dtype)
        except (OSError, RecordError):
            return False
        if not np.array_equal(arr.reshape(-1).view(np.uint8), np.frombuffer(payload, np.uint8)):
            return False
        self._known[path] = key
        if path in self._sizes:
            self._sizes.move_to_end(path)
        else:
            self._sizes[path] = len(data)
            self.used_bytes += len(data)
        with contextlib.suppress(OSError):
            os.utime(path)
        return True

    def batch_remove(self, keys):
        """Delete the keys' files; returns (and publishes "removed" for) those deleted. A file
        that cannot be deleted (a read-only directory) is counted in ``errors``, stays indexed
        and served, and is not reported removed."""
        keys = check_keys(keys)
        removed = []
        for k in keys:
            p = self.path(k)
            try:
                os.unlink(p)
            except (FileNotFoundError, NotADirectoryError):
                self._forget(p)  # not there: nothing removed
                continue
            except OSError:  # EACCES, EROFS; EISDIR: not a block file
                self.stats.errors += 1
                continue
            self._forget(p)
            _prune(os.path.dirname(p))
            removed.append(k)
        self._publish("removed", removed)
        return len(removed)

    def clear(self):
        """Delete the block files this tier indexes (those found at start and written since),
        then publish "cleared". Files that cannot be deleted (a read-only directory) stay
        indexed, in ``used_bytes``, and counted in ``errors``; then "removed" goes out for the
        deleted blocks whose keys are known, instead of a "cleared" that would be untrue.
        Each namespace directory is then removed if that left it empty (one rmdir each)."""
        gone, stuck = [], False
        dirs = set()
        for p in list(self._sizes):
            key = self._known.get(p)
            dirs.add(os.path.dirname(p))
            if not self._drop(p, prune=False):
                stuck = True
            elif key is not None:
                gone.append(key)
        for d in dirs:
            _prune(d)
        if stuck:
            self._publish("removed", gone)
        else:
            self._publish_cleared()
