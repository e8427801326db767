"""Documented disk-tier and record contracts no other test pins: a write is atomic (a reader
sees a whole record or none, even when the write fails part-way), fsync=True syncs the file
before it is visible and then its directory, a failed write leaves no temporary file and no
drift in used_bytes, the index follows files deleted or written behind the tier's back,
TieredStore counts refused puts, and a checksummed record whose shape disagrees with its
payload length is a counted miss, never a ValueError. tmp_path only: no servers."""

from __future__ import annotations

import errno
import os
import stat
import struct

import numpy as np
import pytest
from prefixkv.paged.tiers import DiskTier, HostTier, TieredStore, decode_record
from prefixkv.paged.tiers import base as tier_base
from prefixkv.paged.tiers.base import RecordError, Tier, record_bytes
from tier_helpers import ROW, keys, rows, same

try:
    import resource
    import signal
except ImportError:  # not POSIX
    resource = None


def _files(root) -> list[str]:
    """Every file under root, relative, sorted (block files and temporary files alike)."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(out)


def _on_disk_bytes(root) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for f in _files(root))


class _FileSizeLimit:
    """RLIMIT_FSIZE = ``limit`` bytes: a write past it fails with EFBIG after writing up to
    it, whichever call the writer uses (open, os.fdopen, os.write), so a write fails part-way.
    SIGXFSZ is ignored meanwhile (it would kill the process)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old_limit[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old_limit)
        signal.signal(signal.SIGXFSZ, self.old_handler)


# -- atomic writes ---------------------------------------------------------------------------

@pytest.mark.skipif(resource is None, reason="needs RLIMIT_FSIZE (POSIX)")
def test_write_failing_part_way_leaves_no_record_and_no_temp_file(tmp_path):
    """"a reader sees a whole record or none": the file-size limit cuts the write after the
    header and part of the payload. The put reports False, the key's final name never exists
    (batch_exists 0, for this tier and a fresh one), the get is a plain miss (not a corrupt
    record), no ``.part`` file is left and used_bytes is unchanged."""
    disk = DiskTier(tmp_path, checksum="crc32")
    (k0, k1), (v0, v1) = keys(2), rows(2)
    assert disk.batch_put([k0], [v0]) == [True]
    before_files, before_used = _files(tmp_path), disk.used_bytes
    header_len = len(record_bytes(k1, v1, checksum_alg="crc32")) - v1.nbytes
    with _FileSizeLimit(header_len + v1.nbytes // 2):
        ok = disk.batch_put([k1], [v1])
    assert ok == [False]
    assert not os.path.exists(disk.path(k1))
    assert disk.batch_exists([k1]) == 0
    assert DiskTier(tmp_path).batch_exists([k1]) == 0
    assert _files(tmp_path) == before_files  # no partial record, no .part file
    assert disk.used_bytes == before_used == _on_disk_bytes(tmp_path)
    assert (disk.stats.rejected, disk.stats.errors) == (1, 1)
    assert disk.batch_get([k1], shape=ROW, dtype="float32") == [None]
    assert disk.stats.corrupt == 0  # a miss: nothing half-written was ever read
    got = disk.batch_get([k0], shape=ROW, dtype="float32")
    assert same(got[0], v0)


@pytest.mark.skipif(resource is None, reason="needs RLIMIT_FSIZE (POSIX)")
def test_failed_rewrite_keeps_the_old_record_whole(tmp_path):
    """A re-put of a stored key that fails part-way must not touch the file a reader sees:
    another tier object on the same root (another process) still reads the old record whole.
    (A write straight to the final name would truncate it first: a corrupt miss.)"""
    writer, reader = DiskTier(tmp_path, checksum="crc32"), DiskTier(tmp_path)
    (k,), (old,) = keys(1), rows(1, seed=1)
    new = rows(1, seed=2)[0]
    assert writer.batch_put([k], [old]) == [True]
    size = os.path.getsize(writer.path(k))
    with _FileSizeLimit(size // 2):
        assert writer.batch_put([k], [new]) == [False]
    assert os.path.getsize(writer.path(k)) == size
    got = reader.batch_get([k], shape=ROW, dtype="float32")
    assert same(got[0], old)
    assert reader.stats.corrupt == 0
    assert [f for f in _files(tmp_path) if f.endswith(".part")] == []


# -- fsync -----------------------------------------------------------------------------------

def _record_fsyncs(monkeypatch, disk, key):
    """Wrap os.fsync: per call, ("file", whether the key's final name exists yet, bytes in
    the file) or ("dir", directory inode), then the real fsync."""
    calls = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            calls.append(("dir", st.st_ino))
        else:
            calls.append(("file", os.path.exists(disk.path(key)), st.st_size))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fsync_syncs_the_whole_file_before_it_is_visible_then_its_directory(tmp_path,
                                                                             monkeypatch):
    """fsync=True: "fsync each file (and its directory) before it becomes visible". The file
    is synced holding the whole record while its final name does not exist yet; then the
    block's directory is synced."""
    disk = DiskTier(tmp_path, fsync=True)
    (k,), (v,) = keys(1), rows(1)
    calls = _record_fsyncs(monkeypatch, disk, k)
    assert disk.batch_put([k], [v]) == [True]
    size = os.path.getsize(disk.path(k))
    dir_ino = os.stat(os.path.dirname(disk.path(k))).st_ino
    assert calls == [("file", False, size), ("dir", dir_ino)]


def test_fsync_false_never_syncs(tmp_path, monkeypatch):
    """The default (fsync=False) is the fast path: no fsync at all."""
    disk = DiskTier(tmp_path)
    (k,), (v,) = keys(1), rows(1)
    calls = _record_fsyncs(monkeypatch, disk, k)
    assert disk.batch_put([k], [v]) == [True]
    assert calls == []


# -- failed writes: no temporary file left, no used_bytes drift ------------------------------

def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_enospc_leaves_no_part_file_and_used_bytes_unchanged(tmp_path, monkeypatch, fails):
    """A write that fails with ENOSPC (at fsync, as delayed allocation reports it, or at the
    rename) is a rejected put: the temporary file is deleted (no leak filling the disk further),
    used_bytes and the files on disk are as before, the earlier block is still served, and a
    re-opened tier agrees."""
    disk = DiskTier(tmp_path, fsync=fails == "fsync")
    (k0, k1), (v0, v1) = keys(2), rows(2)
    assert disk.batch_put([k0], [v0]) == [True]
    before_files, before_used = _files(tmp_path), disk.used_bytes
    monkeypatch.setattr(os, fails, _enospc)
    assert disk.batch_put([k1], [v1]) == [False]
    monkeypatch.undo()
    assert _files(tmp_path) == before_files
    assert not any(f.endswith(".part") for f in _files(tmp_path))
    assert disk.used_bytes == before_used == _on_disk_bytes(tmp_path)
    assert (disk.stats.puts, disk.stats.rejected, disk.stats.errors) == (1, 1, 1)
    assert disk.batch_get([k1]) == [None]
    assert same(disk.batch_get([k0])[0], v0)
    assert DiskTier(tmp_path).used_bytes == before_used


# -- the index follows files changed behind the tier's back ----------------------------------

def test_miss_for_a_file_deleted_behind_the_tier_forgets_it(tmp_path):
    """A file another process deleted is a miss and leaves the index: used_bytes drops by its
    size (no drift, which would make a budgeted tier evict for room it has)."""
    disk = DiskTier(tmp_path)
    ks, vs = keys(2), rows(2)
    assert disk.batch_put(ks, vs) == [True, True]
    gone = os.path.getsize(disk.path(ks[0]))
    used = disk.used_bytes
    os.unlink(disk.path(ks[0]))
    assert disk.batch_get([ks[0]], shape=ROW, dtype="float32") == [None]
    assert disk.stats.misses == 1
    assert disk.used_bytes == used - gone == _on_disk_bytes(tmp_path)


def test_miss_for_a_deleted_file_frees_budget_room(tmp_path):
    """Budget of two blocks, both stored; one deleted behind the tier's back and looked up (a
    miss). A third block then fits without evicting the remaining one."""
    ks, vs = keys(3), rows(3)
    size = len(record_bytes(ks[0], vs[0]))
    disk = DiskTier(tmp_path, budget_bytes=2 * size)
    assert disk.batch_put(ks[:2], vs[:2]) == [True, True]
    os.unlink(disk.path(ks[0]))
    assert disk.batch_get([ks[0]]) == [None]
    assert disk.batch_put([ks[2]], [vs[2]]) == [True]
    assert disk.stats.evictions == 0
    assert disk.batch_exists([ks[1], ks[2]]) == 2


def test_hit_on_a_file_another_process_wrote_is_indexed(tmp_path):
    """A file written after this tier's start-up scan (another process, here another tier
    object) is not known until read; the hit indexes it: used_bytes counts it, it takes part
    in the budget's LRU (evicted first, being older than this tier's own puts) and it is among
    the files clear() deletes."""
    ks, vs = keys(3), rows(3)
    size = len(record_bytes(ks[0], vs[0]))
    disk = DiskTier(tmp_path, budget_bytes=2 * size)
    other = DiskTier(tmp_path)
    assert other.batch_put([ks[0]], [vs[0]]) == [True]
    assert disk.used_bytes == 0
    assert same(disk.batch_get([ks[0]], shape=ROW, dtype="float32")[0], vs[0])
    assert disk.used_bytes == size == _on_disk_bytes(tmp_path)
    assert disk.batch_put(ks[1:], vs[1:]) == [True, True]  # room for two: ks[0] goes
    assert disk.stats.evictions == 1
    assert not os.path.exists(disk.path(ks[0]))
    assert disk.used_bytes == 2 * size == _on_disk_bytes(tmp_path)


def test_clear_deletes_a_file_indexed_by_a_hit(tmp_path):
    (k,), (v,) = keys(1), rows(1)
    disk = DiskTier(tmp_path)
    assert DiskTier(tmp_path).batch_put([k], [v]) == [True]
    assert disk.batch_get([k])[0] is not None
    disk.clear()
    assert _files(tmp_path) == []
    assert disk.used_bytes == 0


# -- TieredStore counts refused puts ---------------------------------------------------------

class _Raises(Tier):
    name = "raises"

    def batch_exists(self, keys):
        return 0

    def batch_get(self, keys, *, shape=None, dtype=None):
        return [None] * len(keys)

    def batch_put(self, keys, values):
        raise ConnectionError("down")


def test_tiered_store_counts_rejected_puts(tmp_path):
    """stats.rejected counts the keys no tier stored; stats.puts the ones some tier did. A
    disk budget of one block: of a two-key put, the second is refused (a put never evicts
    its own blocks); the failing tier refuses everything."""
    ks, vs = keys(3), rows(3)
    size = len(record_bytes(ks[0], vs[0]))
    store = TieredStore([_Raises(), DiskTier(tmp_path, budget_bytes=size)])
    assert store.batch_put(ks[:2], vs[:2]) == [True, False]
    assert (store.stats.puts, store.stats.rejected) == (1, 1)
    alone = TieredStore([_Raises()])
    assert alone.batch_put(ks, vs) == [False] * 3
    assert (alone.stats.puts, alone.stats.rejected) == (0, 3)


def test_tiered_store_counts_a_put_refused_by_every_budget(tmp_path):
    """A block larger than both budgets is refused by both tiers: one rejected put."""
    (k,), (v,) = keys(1), rows(1)
    store = TieredStore([HostTier(v.nbytes - 1), DiskTier(tmp_path, budget_bytes=v.nbytes)])
    assert store.batch_put([k], [v]) == [False]
    assert (store.stats.puts, store.stats.rejected) == (0, 1)


# -- a checksummed record whose shape disagrees with its payload length ----------------------

def _record_with_shape(key, value, shape) -> bytes:
    """A version-2 record of ``value``'s bytes with a valid crc32 whose header claims
    ``shape`` (the writer's bug, not corruption: the checksum passes)."""
    payload = np.ascontiguousarray(value).tobytes()
    kb, db = key.encode(), b"float32"
    fields = b"".join([
        tier_base._FIXED.pack(tier_base.RECORD_MAGIC, tier_base.FORMAT_VERSION,
                              tier_base.CHECKSUM_CRC32, len(shape), len(kb), len(db),
                              len(payload)),
        struct.pack(f"<{len(shape)}Q", *shape), kb, db])
    return fields + tier_base._record_digest("crc32", fields, payload) + payload


# payload: one ROW float32 block (120 elements); shapes that claim more, fewer, and a payload
# that is no whole number of float32s
MALFORMED = {
    "more_elements": (ROW, (4, 3, 2, 6)),
    "fewer_elements": (ROW, (4, 3, 2, 4)),
    "partial_item": ((6,), (1,)),  # 6 float32 = 24 bytes; sliced below to 6 bytes
}


def _malformed(key, case):
    value_shape, claimed = MALFORMED[case]
    value = rows(1, shape=value_shape)[0]
    if case == "partial_item":
        value = value.view(np.uint8)[:6]
    return _record_with_shape(key, value, claimed)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_decode_shape_disagreeing_with_payload_length_is_a_record_error(case):
    (k,) = keys(1)
    data = _malformed(k, case)
    with pytest.raises(RecordError, match="payload length does not match shape and dtype"):
        decode_record(k, data)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_disk_shape_disagreeing_with_payload_length_is_a_corrupt_miss(tmp_path, case):
    """Served as a counted corrupt miss (and the file dropped), never a ValueError out of
    batch_get; the next key of the batch is still served."""
    disk = DiskTier(tmp_path)
    (bad, good), (v,) = keys(2), rows(1)
    assert disk.batch_put([good], [v]) == [True]
    data = _malformed(bad, case)
    os.makedirs(os.path.dirname(disk.path(bad)), exist_ok=True)
    with open(disk.path(bad), "wb") as f:
        f.write(data)
    got = disk.batch_get([bad, good])
    assert got[0] is None and same(got[1], v)
    assert (disk.stats.corrupt, disk.stats.misses, disk.stats.hits) == (1, 1, 1)
    assert not os.path.exists(disk.path(bad))


def test_a_bytes_root_works_and_a_bad_root_is_named(tmp_path):
    """A bytes root was taken as it was: every call then joined it with str names and raised
    TypeError (a TieredStore passes that on as bad input, so a host + disk chain stopped)."""
    t = DiskTier(os.fsencode(tmp_path / "b"))
    assert t.root == str(tmp_path / "b")
    ks, vs = keys(2), rows(2)
    assert t.batch_put(ks, vs) == [True, True] and t.batch_exists(ks) == 2
    assert all(same(g, v) for g, v in zip(t.batch_get(ks, shape=ROW, dtype="float32"), vs,
                                          strict=True))
    with pytest.raises(TypeError, match="root: expected a str or os.PathLike directory"):
        DiskTier(5)
