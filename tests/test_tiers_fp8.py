"""float8_e4m3fn KV caches in the host-side tiers: the namespace carries the scales the bytes
were quantized with (required, part of the key, never part of a float namespace's key), and
blocks move through host, disk and the tiered chain as their bytes (NaN patterns included)."""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest
from prefixkv.paged.spec import numpy_dtype
from prefixkv.paged.tiers import (
    BlockKey,
    BlockOffloader,
    DiskTier,
    HostTier,
    Namespace,
    RecordError,
    TieredStore,
    decode_record,
)
from prefixkv.paged.tiers.base import record_bytes

FP8 = numpy_dtype("float8_e4m3fn")
SCALES_A = (0.5, 0.25)
SCALES_B = (0.5, 0.125)
# 4 caches (K and V of two layers) of 6 blocks [block_size 4, 2 heads, head_dim 8]: one block
# row [4, 4, 2, 8] is 256 bytes, so a row can hold every byte value once.
NUM_CACHES, CACHE_SHAPE = 4, (6, 4, 2, 8)
HASHES = [b"h-one", b"h-two", b"h-three"]
SRC, DST = [1, 2, 3], [5, 4, 3]


def _ns(scales=SCALES_A, **kw):
    return Namespace("fp8-model", dtype="float8_e4m3fn", kv_scales=scales, **kw)


def _bytes(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def _caches(pattern: str, seed: int = 0) -> list[np.ndarray]:
    """fp8 caches whose blocks each hold (across the caches) every byte value once
    ("all_bytes": 0x7f and 0xff are NaN, 0x80 is -0) or only bytes of finite values
    ("finite")."""
    rng = np.random.default_rng(seed)
    n_blocks = CACHE_SHAPE[0]
    per_block = NUM_CACHES * math.prod(CACHE_SHAPE[1:])
    assert per_block == 256
    if pattern == "all_bytes":
        blocks = [rng.permutation(256).astype(np.uint8) for _ in range(n_blocks)]
    else:
        finite = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)
        blocks = [rng.choice(finite, per_block) for _ in range(n_blocks)]
    rows = np.stack(blocks).reshape(n_blocks, NUM_CACHES, *CACHE_SHAPE[1:])
    caches = [np.ascontiguousarray(rows[:, c]).view(FP8) for c in range(NUM_CACHES)]
    values = np.stack([c.astype(np.float32) for c in caches])
    if pattern == "all_bytes":
        assert np.isnan(values).any()
    else:
        assert np.isfinite(values).all()
    return caches


def _store(kind: str, root) -> object:
    if kind == "host":
        return HostTier(1 << 20)
    if kind == "disk":
        return DiskTier(str(root))
    return TieredStore([HostTier(1 << 20), DiskTier(str(root))])


def _loaded(dst, src) -> bool:
    """Blocks DST of ``dst`` hold blocks SRC of ``src``, byte for byte."""
    return all((_bytes(d[DST]) == _bytes(s[SRC])).all() for d, s in zip(dst, src, strict=True))


# -- the namespace ------------------------------------------------------------------------

def test_fp8_namespace_requires_kv_scales():
    with pytest.raises(ValueError, match="kv_scales: .*quantized.*wrong values"):
        Namespace("m", dtype="float8_e4m3fn")


@pytest.mark.parametrize("scales", [
    (), [], (0.0,), (0.5, -0.25), (math.nan,), (0.5, math.inf), (True,), ("0.5",), (None,),
    "0.5", b"\x01", 0.5, np.float32(0.5), np.array(0.5), object()])
def test_fp8_namespace_refuses_bad_kv_scales(scales):
    with pytest.raises(ValueError, match="kv_scales: expected a non-empty tuple of finite "
                                         "positive floats"):
        Namespace("m", dtype="float8_e4m3fn", kv_scales=scales)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scales", [(1.0,), ()])
def test_float_namespace_refuses_kv_scales(dtype, scales):
    with pytest.raises(ValueError, match=f"kv_scales: .*{dtype}"):
        Namespace("m", dtype=dtype, kv_scales=scales)


def test_fp8_namespace_keeps_scales_as_python_floats():
    ns = Namespace("m", dtype=FP8, kv_scales=[np.float32(0.1), 2, np.float64(0.5)])
    assert ns.dtype == "float8_e4m3fn"
    assert ns.kv_scales == (float(np.float32(0.1)), 2.0, 0.5)
    assert all(type(s) is float for s in ns.kv_scales)
    assert ns == Namespace("m", dtype="float8_e4m3fn", kv_scales=(np.float32(0.1), 2.0, 0.5))
    assert hash(ns) == hash(Namespace("m", dtype="float8_e4m3fn",
                                      kv_scales=np.array([0.1, 2, 0.5], np.float32)))


def test_float_namespace_encodings_are_unchanged():
    """Pinned from the code before fp8 namespaces existed: stored float blocks keep their
    keys (a changed encoding would orphan every disk and remote block)."""
    ns = Namespace("m")
    assert ns.kv_scales is None
    assert ns.encode().hex() == (
        "7072656669786b762d6e732d7631010000006d030000004e484407000000666c6f61743332000000"
        "0000000000010000000000000000000000")
    assert ns.digest() == "d2ac9ad54e89d6f4ebb6477a51e08499"
    assert Namespace("llama-3-8b", "NHD", "bfloat16", 1, 2, b"salt").digest() == (
        "a68a4d2467b3c323e98fcd927ba92345")
    assert Namespace("m", dtype="float16").digest() == "0432cf61557078ca67baff85e13ddfd6"
    assert BlockKey(b"\x01\x02", ns).storage_key() == "d2ac9ad54e89d6f4ebb6477a51e08499/0102"


def test_scales_are_part_of_the_key_as_float64_bits():
    base = _ns((0.1, 0.25))
    assert base.encode().endswith(struct.pack("<d", 0.1) + struct.pack("<d", 0.25))
    variants = [
        _ns((0.25, 0.1)),                             # order matters (k vs v, layer)
        _ns((0.1,)),                                  # fewer scales
        _ns((0.1, 0.25, 0.1, 0.25)),                  # per layer
        _ns((float(np.float32(0.1)), 0.25)),          # equal as float32, not as float64
        _ns((float(np.nextafter(0.1, 1.0)), 0.25)),   # one float64 ulp apart
    ]
    keys = {BlockKey(b"h", v).storage_key() for v in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert len({v.encode() for v in [base, *variants]}) == 1 + len(variants)
    assert all(v != base for v in variants)


def test_with_salt_keeps_kv_scales():
    ns = _ns().with_salt("tenant")
    assert ns.kv_scales == SCALES_A and ns.salt == b"tenant"
    assert ns == _ns(salt="tenant")
    assert Namespace("m").with_salt("t").kv_scales is None


def test_record_of_other_scales_is_refused():
    """A record stored under scales A, read back under scales B (a shared store, a tier that
    filed it under the wrong name): the key check refuses it."""
    row = _caches("all_bytes")[0][:4].reshape(4, *CACHE_SHAPE[1:])
    rec = record_bytes(BlockKey(b"h", _ns(SCALES_A)), row)
    got = decode_record(BlockKey(b"h", _ns(SCALES_A)), rec, shape=row.shape,
                        dtype="float8_e4m3fn")
    assert got.dtype == FP8 and (_bytes(got) == _bytes(row)).all()
    with pytest.raises(RecordError, match="key/namespace mismatch"):
        decode_record(BlockKey(b"h", _ns(SCALES_B)), rec)


# -- offload / onboard ----------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["all_bytes", "finite"])
@pytest.mark.parametrize("kind", ["host", "disk", "tiered"])
def test_fp8_round_trip_is_bit_exact(kind, pattern, tmp_path):
    caches = _caches(pattern)
    store = _store(kind, tmp_path)
    off = BlockOffloader(store, _ns(), null_block=0)
    assert off.offload(caches, SRC, HASHES) == [True] * 3
    assert off.lookup(HASHES) == 3
    dst = [np.zeros_like(c) for c in caches]
    out, n = off.onboard(dst, DST, HASHES)
    assert n == 3 and out is dst
    assert all(d.dtype == FP8 for d in dst) and _loaded(dst, caches)
    if kind == "disk":  # another process (a restart) reads the same files
        fresh = [np.zeros_like(c) for c in caches]
        again = BlockOffloader(DiskTier(str(tmp_path)), _ns(), null_block=0)
        assert again.onboard(fresh, DST, HASHES)[1] == 3 and _loaded(fresh, caches)
    if kind == "tiered":  # from disk alone, promoted into the host tier
        host, disk = store.tiers
        keys = off.keys(HASHES)
        assert disk.batch_exists(keys) == 3
        host.clear()
        fresh = [np.zeros_like(c) for c in caches]
        assert off.onboard(fresh, DST, HASHES)[1] == 3 and _loaded(fresh, caches)
        assert host.batch_exists(keys) == 3
        assert all((_bytes(a) == _bytes(np.stack([c[b] for c in caches]))).all()
                   for a, b in zip(host.batch_get(keys), SRC, strict=True))


@pytest.mark.parametrize("kind", ["host", "disk", "tiered"])
def test_blocks_of_other_scales_are_a_miss(kind, tmp_path):
    caches = _caches("all_bytes")
    off = BlockOffloader(_store(kind, tmp_path), _ns(SCALES_A), null_block=0)
    assert off.offload(caches, SRC, HASHES) == [True] * 3
    other = _ns(SCALES_B)
    assert off.lookup(HASHES, namespace=other) == 0
    dst = [np.zeros_like(c) for c in caches]
    assert off.onboard(dst, DST, HASHES, namespace=other)[1] == 0
    assert all(not _bytes(d).any() for d in dst)
    assert off.onboard(dst, DST, HASHES)[1] == 3 and _loaded(dst, caches)


def test_corrupt_fp8_disk_record_is_a_miss(tmp_path):
    caches = _caches("all_bytes")
    disk = DiskTier(str(tmp_path))
    off = BlockOffloader(disk, _ns(), null_block=0)
    assert off.offload(caches, SRC, HASHES) == [True] * 3
    path = disk.path(off.keys(HASHES)[0])
    with open(path, "r+b") as f:  # the last payload byte, its sign bit flipped
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0x80]))
    dst = [np.zeros_like(c) for c in caches]
    assert off.onboard(dst, DST, HASHES)[1] == 0
    assert all(not _bytes(d).any() for d in dst)
    assert disk.stats.corrupt == 1 and not os.path.exists(path)
    assert off.offload(caches, SRC, HASHES) == [True] * 3  # stored again, then served
    assert off.onboard(dst, DST, HASHES)[1] == 3 and _loaded(dst, caches)


def test_fp8_caches_need_an_fp8_namespace():
    caches = _caches("finite")
    off = BlockOffloader(HostTier(1 << 20), Namespace("fp8-model", dtype="float16"))
    with pytest.raises(ValueError, match="caches: dtype float8_e4m3fn does not match"):
        off.offload(caches, SRC, HASHES)


def test_torch_fp8_round_trip():
    """torch float8_e4m3fn CPU caches through torch_frontend's gather_blocks_to_host /
    scatter_blocks_from_host (torch's .numpy() has no float8: they move the bytes): the rows
    the tier holds are ml_dtypes fp8, and the round trip is bit-exact, NaN bytes included."""
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend import gather_blocks_to_host, scatter_blocks_from_host

    caches = [torch.from_numpy(_bytes(c).copy()).view(torch.float8_e4m3fn)
              for c in _caches("all_bytes")]
    host = HostTier(1 << 20)
    off = BlockOffloader(host, _ns(), gather=gather_blocks_to_host,
                         scatter=scatter_blocks_from_host, null_block=0)
    assert off.offload(caches, SRC, HASHES) == [True] * 3
    assert all(r.dtype == FP8 for r in host.batch_get(off.keys(HASHES)))
    dst = [torch.zeros_like(c) for c in caches]
    assert off.onboard(dst, DST, HASHES)[1] == 3
    assert all(torch.equal(d[DST].view(torch.uint8), c[SRC].view(torch.uint8))
               for d, c in zip(dst, caches, strict=True))
