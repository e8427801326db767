"""Tier bandwidth: host-tier offload/onboard against a plain memory copy of the same bytes,
disk / Redis / NIXL put and get.

Run: .venv/bin/pytest bench/bench_tiers.py --benchmark-only
Model-shaped block: 4 layers x (K, V) = 8 caches of [num_blocks, 16, 8, 128] float16, i.e.
one stored block = 8 x 32 KiB = 256 KiB; a batch = 128 blocks = 32 MiB (host) or 32 blocks
= 8 MiB (disk, Redis, NIXL). Bytes follow bench.conftest.record: every op copies its blocks
(memory to tier, tier to memory), so each counts its blocks' bytes as read and as written
(``bytes`` = 2 x the blocks' bytes, as the machine's ``copy_gbps`` counts np.copyto);
``roofline_fraction`` and ``fraction_of_memcpy`` are the fraction of memcpy speed. np.copyto
of the same bytes is the host tier's baseline (``baseline: true``); the disk, Redis and NIXL
groups have none. Before timing, each test checks the blocks themselves once, not only the
success flags: what an offload stored, a put stored and a get returned is bit-identical to the
blocks put (``_assert_rows``).
"""

from __future__ import annotations

import itertools
import shutil
import time

import numpy as np
import pytest
from prefixkv.paged.reference import gather_blocks_reference
from prefixkv.paged.tiers import BlockKey, BlockOffloader, DiskTier, HostTier, Namespace

from bench.conftest import record, seconds

NUM_CACHES, NUM_BLOCKS, BLOCK_SHAPE, DTYPE = 8, 384, (16, 8, 128), np.float16
HOST_BATCH, REMOTE_BATCH = 128, 32
NS = Namespace("bench-model", dtype="float16")
_counter = itertools.count()


@pytest.fixture(scope="module")
def caches():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((NUM_BLOCKS, *BLOCK_SHAPE)).astype(DTYPE)
            for _ in range(NUM_CACHES)]


def _row_bytes():
    return NUM_CACHES * int(np.prod(BLOCK_SHAPE)) * np.dtype(DTYPE).itemsize


def _fresh_hashes(n):
    """New hashes per call so every put really stores (the tiers skip known keys)."""
    base = next(_counter) * n
    return [(base + i).to_bytes(8, "big") for i in range(n)]


def _copied(num_blocks: int) -> dict:
    """record()'s byte counts of ``num_blocks`` stored blocks copied once."""
    n = num_blocks * _row_bytes()
    return {"bytes_read": n, "bytes_written": n}


def _ids(n, seed=1):
    return np.random.default_rng(seed).permutation(NUM_BLOCKS)[:n].astype(np.int32)


def _assert_rows(got, want) -> None:
    """Blocks a tier returned (``batch_get``) against the blocks put, key by key, bit for bit."""
    got = list(got)
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None, f"block {i}: missing"
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, g.dtype, w.shape, w.dtype)
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), f"block {i}: other contents"


def _check_offload(host, off, caches, ids) -> None:
    """One offload of blocks ``ids`` under fresh hashes: the host tier holds exactly them."""
    hashes = _fresh_hashes(len(ids))
    assert all(off.offload(caches, ids, hashes))
    _assert_rows(host.batch_get(off.keys(hashes)), list(gather_blocks_reference(caches, ids)))


def _check_put(tier, rows) -> None:
    """One put of ``rows`` under fresh keys, read back: the tier holds exactly them."""
    keys = [BlockKey(h, NS) for h in _fresh_hashes(len(rows))]
    assert all(tier.batch_put(keys, rows))
    _assert_rows(tier.batch_get(keys), rows)
    tier.batch_remove(keys)


# -- host tier vs memcpy ---------------------------------------------------------------------

@pytest.mark.benchmark(group="host-tier")
def test_memcpy_baseline(benchmark, machine_limits):
    nbytes = HOST_BATCH * _row_bytes()
    src = np.ones(nbytes // 2, DTYPE)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    assert np.array_equal(dst.view(np.uint16), src.view(np.uint16))
    benchmark(np.copyto, dst, src)
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes, baseline=True,
           op="np.copyto (same bytes)")


def _host_fraction(benchmark, machine_limits, nbytes, fn):
    """Fraction of memcpy: against the session's measured copy GB/s, and paired (the op and
    a np.copyto of the same ``nbytes`` alternated 11 times, ratio of the best and of the
    medians: robust to other load on a shared machine). GB/s count read + written bytes."""
    gbps = 2 * nbytes / seconds(benchmark) / 1e9
    info = benchmark.extra_info
    info["fraction_of_memcpy"] = round(gbps / machine_limits["copy_gbps"], 3)
    src = np.ones(nbytes // 2, DTYPE)
    dst = np.empty_like(src)
    t_op, t_cp = [], []
    for _ in range(11):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        np.copyto(dst, src)
        t2 = time.perf_counter()
        t_op.append(t1 - t0)
        t_cp.append(t2 - t1)
    info["paired_memcpy_gbps_best"] = round(2 * nbytes / min(t_cp) / 1e9, 3)
    info["paired_gbps_best"] = round(2 * nbytes / min(t_op) / 1e9, 3)
    info["paired_fraction_best"] = round(min(t_cp) / min(t_op), 3)
    info["paired_fraction_median"] = round(float(np.median(t_cp) / np.median(t_op)), 3)


@pytest.mark.benchmark(group="host-tier")
def test_host_offload(benchmark, machine_limits, caches):
    """Offload 128 blocks into a full host tier (steady state: evicted memory reused)."""
    host = HostTier(2 * HOST_BATCH * _row_bytes())
    off = BlockOffloader(host, NS)
    ids = _ids(HOST_BATCH)
    for _ in range(3):  # fill the tier: later rounds evict and reuse
        off.offload(caches, ids, _fresh_hashes(HOST_BATCH))
    _check_offload(host, off, caches, ids)

    def run():
        assert all(off.offload(caches, ids, _fresh_hashes(HOST_BATCH)))

    benchmark(run)
    nbytes = HOST_BATCH * _row_bytes()
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes,
           op="offload (numpy gather into host tier)")
    _host_fraction(benchmark, machine_limits, nbytes, run)


@pytest.mark.benchmark(group="host-tier")
def test_host_offload_gather_reference(benchmark, machine_limits, caches):
    """The same through gather_blocks_reference (a staging buffer, then a copy into the tier)."""
    host = HostTier(2 * HOST_BATCH * _row_bytes())
    off = BlockOffloader(host, NS, gather=gather_blocks_reference)
    ids = _ids(HOST_BATCH)
    _check_offload(host, off, caches, ids)

    def run():
        assert all(off.offload(caches, ids, _fresh_hashes(HOST_BATCH)))

    benchmark(run)
    nbytes = HOST_BATCH * _row_bytes()
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes,
           op="offload via gather_blocks_reference")
    _host_fraction(benchmark, machine_limits, nbytes, run)


@pytest.mark.benchmark(group="host-tier")
def test_host_onboard(benchmark, machine_limits, caches):
    """Onboard 128 blocks from the host tier into other blocks of the caches (in place)."""
    host = HostTier(2 * HOST_BATCH * _row_bytes())
    off = BlockOffloader(host, NS)
    src = _ids(HOST_BATCH, seed=1)
    hashes = _fresh_hashes(HOST_BATCH)
    off.offload(caches, src, hashes)
    dst_caches = [np.empty_like(c) for c in caches]
    dst = _ids(HOST_BATCH, seed=2)

    def run():
        assert off.onboard(dst_caches, dst, hashes)[1] == HOST_BATCH

    run()
    for c, d in zip(caches, dst_caches, strict=True):
        assert np.array_equal(c[src].view(np.uint16), d[dst].view(np.uint16))
    benchmark(run)
    nbytes = HOST_BATCH * _row_bytes()
    record(benchmark, machine_limits, bytes_read=nbytes, bytes_written=nbytes,
           op="onboard (numpy scatter from host tier)")
    _host_fraction(benchmark, machine_limits, nbytes, run)


# -- disk ------------------------------------------------------------------------------------

def _rows(caches, n):
    ids = _ids(n, seed=3)
    return list(gather_blocks_reference(caches, ids))


@pytest.mark.benchmark(group="disk")
@pytest.mark.parametrize("fsync", [False, True], ids=["page-cache", "fsync"])
def test_disk_put(benchmark, machine_limits, caches, tmp_path, fsync):
    disk = DiskTier(tmp_path, budget_bytes=4 * REMOTE_BATCH * (_row_bytes() + 4096), fsync=fsync)
    rows = _rows(caches, REMOTE_BATCH)
    _check_put(disk, rows)

    def run():
        keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
        assert all(disk.batch_put(keys, rows))

    benchmark.pedantic(run, rounds=5 if fsync else 10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op=f"disk put ({'fsync' if fsync else 'no fsync'}, xxh3 checksum)")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.benchmark(group="disk")
def test_disk_get(benchmark, machine_limits, caches, tmp_path):
    disk = DiskTier(tmp_path)
    keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
    rows = _rows(caches, REMOTE_BATCH)
    assert all(disk.batch_put(keys, rows))
    _assert_rows(disk.batch_get(keys), rows)

    def run():
        assert all(g is not None for g in disk.batch_get(keys))

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op="disk get (page cache, verified)")


EXISTS_KEYS = 256


@pytest.mark.benchmark(group="disk-exists")
@pytest.mark.parametrize("name", ["isfile-loop", "prefixkv"])
def test_disk_batch_exists(benchmark, caches, tmp_path, name):
    """A prefix lookup's ``batch_exists`` of 256 stored blocks: prefixkv reads each file's fixed
    header (records of another format version or checksum are not hits), against the stat per
    key a user would write (``os.path.isfile``, what DiskTier did before; baseline)."""
    import os

    disk = DiskTier(tmp_path)
    keys = [BlockKey(h, NS) for h in _fresh_hashes(EXISTS_KEYS)]
    row = _rows(caches, 1)
    assert all(disk.batch_put(keys, [row[0]] * EXISTS_KEYS))

    def isfile_loop():
        n = 0
        for k in keys:
            if not os.path.isfile(disk.path(k)):
                break
            n += 1
        return n

    run = isfile_loop if name == "isfile-loop" else (lambda: disk.batch_exists(keys))
    assert run() == EXISTS_KEYS
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    info = benchmark.extra_info
    info["keys_per_s"] = EXISTS_KEYS / seconds(benchmark, "min")
    if name == "isfile-loop":
        info["baseline"] = True
    shutil.rmtree(tmp_path, ignore_errors=True)


# -- Redis -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_tier():
    from prefixkv.paged.tiers import LocalRedisServer, RedisTier

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (bash scripts/services.sh install)")
    with LocalRedisServer() as srv:
        t = RedisTier(port=srv.port, socket_timeout=10, max_batch=REMOTE_BATCH)
        yield t
        t.close()


@pytest.mark.benchmark(group="redis")
def test_redis_put(benchmark, machine_limits, caches, redis_tier):
    rows = _rows(caches, REMOTE_BATCH)
    _check_put(redis_tier, rows)

    def run():
        keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
        assert all(redis_tier.batch_put(keys, rows))
        redis_tier.batch_remove(keys)  # keep the server's memory flat

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op="redis pipelined SET (+DEL)")


@pytest.mark.benchmark(group="redis")
def test_redis_get(benchmark, machine_limits, caches, redis_tier):
    keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
    rows = _rows(caches, REMOTE_BATCH)
    assert all(redis_tier.batch_put(keys, rows))
    _assert_rows(redis_tier.batch_get(keys), rows)

    def run():
        assert all(g is not None for g in redis_tier.batch_get(keys))

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op="redis MGET, verified")


# -- NIXL ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nixl_tier():
    pytest.importorskip("nixl", reason="nixl not installed (pip install --no-deps nixl nixl-cu12)")
    from prefixkv.paged.tiers import NixlPeer, NixlTier

    peer = NixlPeer(num_slots=4 * REMOTE_BATCH, slot_bytes=_row_bytes() + 4096)
    t = NixlTier(peer, staging_slots=REMOTE_BATCH, timeout_s=30)
    yield t
    t.close()
    peer.close()


@pytest.mark.benchmark(group="nixl")
def test_nixl_put(benchmark, machine_limits, caches, nixl_tier):
    rows = _rows(caches, REMOTE_BATCH)
    _check_put(nixl_tier, rows)

    def run():
        keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
        assert all(nixl_tier.batch_put(keys, rows))

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op="NIXL UCX WRITE (encode into staging + transfer)")


@pytest.mark.benchmark(group="nixl")
def test_nixl_get(benchmark, machine_limits, caches, nixl_tier):
    keys = [BlockKey(h, NS) for h in _fresh_hashes(REMOTE_BATCH)]
    rows = _rows(caches, REMOTE_BATCH)
    assert all(nixl_tier.batch_put(keys, rows))
    _assert_rows(nixl_tier.batch_get(keys), rows)

    def run():
        assert all(g is not None for g in nixl_tier.batch_get(keys))

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record(benchmark, machine_limits, **_copied(REMOTE_BATCH),
           op="NIXL UCX READ + verify + copy out")
