"""The CUDA C launchers (kernels/cuda/swap.py ``swap_blocks``, kernels/cuda/hashing.py
``hash_blocks_cuda``) run on the host: tests/fake_cupy.py stands in for CuPy and torch's CUDA
calls, and its kernels are kernels/cuda/*.cu compiled as C++ (tests/cuda_host_shim.h).

Not collected directly (the name does not start with test_): tests/test_cuda_launchers_on_host.py
builds the kernel library and runs this file in a subprocess with PREFIXKV_CUDA_HOST_SHIM set,
so the fake cupy and the torch stubs never reach the main test process, and a kernel's
out-of-bounds access kills this process only (reported there as a failure).

swap_blocks is checked against numpy indexing (``dst[dst_ids] = src[src_ids]``, ids outside
either cache skipped; paged.reference has no swap op) on whole buffers with guard bytes: the
named blocks bit-exact, every other byte (unnamed blocks, the other half of a stacked cache, the
guards, the source) unchanged. hash_blocks_cuda is checked against the host prefixkv.paged
.hash_blocks, with a sentinel row after ``out``.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

SHIM = os.environ.get("PREFIXKV_CUDA_HOST_SHIM")
if not SHIM:  # pragma: no cover
    pytest.skip("run through tests/test_cuda_launchers_on_host.py (needs PREFIXKV_CUDA_HOST_SHIM)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import fake_cupy  # noqa: E402
from fake_cupy import LAUNCHES, pin, to_device, where  # noqa: E402

fake_cupy.install(SHIM)

import torch  # noqa: E402
from prefixkv.kernels.cuda import hashing as cuda_hashing  # noqa: E402
from prefixkv.kernels.cuda import swap as cuda_swap  # noqa: E402
from prefixkv.paged import hash_blocks  # noqa: E402
from prefixkv.paged.reference.hashing import block_key, parent_words  # noqa: E402

GUARD = 64  # random bytes before and after every cache buffer
MARK = {"cuda": to_device, "pinned": pin, "cpu": lambda t: t}


def test_fake_is_in_place():
    import cupy

    assert cupy.__fake__ and where(to_device(torch.zeros(2))) == "cuda"
    assert torch.zeros(2).device.type == "cpu" and not torch.zeros(2).is_pinned()


# ----------------------------------------------------------------------------- swap_blocks


class Side:
    """One cache of a swap: a [blocks, *shape] tensor view over a guarded byte buffer; with
    ``halves`` > 1 the first part of a stacked [blocks, halves, *shape] cache (block stride
    halves x the block's bytes); ``offset`` bytes after the guard."""

    def __init__(self, rng, blocks, shape, dtype, offset, halves, kind):
        self.blocks, self.halves, self.offset = blocks, halves, offset
        self.block_bytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        nbytes = blocks * halves * self.block_bytes
        self.np = rng.integers(0, 256, 2 * GUARD + offset + nbytes, dtype=np.uint8)
        whole = MARK[kind](torch.from_numpy(self.np))
        body = whole[GUARD + offset:GUARD + offset + nbytes]
        self.cache = body.view(dtype).reshape(blocks, halves, *shape)[:, 0]
        self.before = self.np.copy()

    def blocks_of(self, whole: np.ndarray) -> np.ndarray:
        """uint8[blocks, block_bytes]: this cache's blocks inside a copy of its buffer."""
        nbytes = self.blocks * self.halves * self.block_bytes
        body = whole[GUARD + self.offset:GUARD + self.offset + nbytes]
        return body.reshape(self.blocks, self.halves, self.block_bytes)[:, 0]


# cache -> (per-block shape, dtype, byte offset of both buffers, (src halves, dst halves))
GEOMETRIES = {
    "k_v_two_layers_fp16": [((16, 2, 64), torch.float16, 0, (1, 1))] * 2
                           + [((16, 2, 64), torch.float16, 0, (2, 2))] * 2,
    "stacked_to_flat_bf16": [((8, 3, 80), torch.bfloat16, 0, (2, 1)),
                             ((8, 3, 80), torch.bfloat16, 0, (1, 2))],
    # 105-byte, 36-byte blocks; 10-byte blocks 30 bytes apart at a 2-byte offset
    "odd_bytes": [((3, 5, 7), torch.uint8, 0, (1, 1)), ((1, 1, 9), torch.float32, 0, (1, 1)),
                  ((5,), torch.int16, 2, (3, 1))],
    "unaligned_base": [((16, 2, 64), torch.float32, 4, (1, 1)),
                       ((16, 2, 64), torch.float32, 0, (2, 1))],
}
DIRECTIONS = {"device_to_host": ("cuda", "pinned"), "host_to_device": ("pinned", "cuda"),
              "device_to_device": ("cuda", "cuda")}
SRC_BLOCKS, DST_BLOCKS = 11, 17


def make_swap(seed, geometry, kinds, src_blocks=SRC_BLOCKS, dst_blocks=DST_BLOCKS):
    rng = np.random.default_rng(seed)
    pairs = [(Side(rng, src_blocks, shape, dtype, off, h[0], kinds[0]),
              Side(rng, dst_blocks, shape, dtype, off, h[1], kinds[1]))
             for shape, dtype, off, h in geometry]
    return rng, pairs


def ids_tensor(ids, placement: str):
    """ids as the caller hands them: pageable host int64, pinned host int32, device int32 or
    device int64 ("device64")."""
    if placement == "host":
        return torch.tensor(ids, dtype=torch.int64)
    dtype = torch.int64 if placement == "device64" else torch.int32
    return MARK["pinned" if placement == "pinned" else "cuda"](torch.tensor(ids, dtype=dtype))


def run_swap(pairs, src_ids, dst_ids, placement="host"):
    """swap_blocks through the launcher; asserts its one launch and returns nothing."""
    n_before = len(LAUNCHES)
    cuda_swap.swap_blocks([s.cache for s, _ in pairs], [d.cache for _, d in pairs],
                          ids_tensor(src_ids, placement), ids_tensor(dst_ids, placement))
    assert LAUNCHES[n_before:] == [{"kernel": "swap_blocks_kernel",
                                    "grid": (len(src_ids), len(pairs), 1),
                                    "block": (cuda_swap.THREADS, 1, 1), "device": 0,
                                    "stream": fake_cupy.CURRENT_STREAM}]


def check_swapped(pairs, src_ids, dst_ids):
    """Bit-exact: dst[dst_ids] = src[src_ids] where both ids lie inside their caches, every
    other byte of every buffer unchanged."""
    for src, dst in pairs:
        s, d = np.asarray(src_ids, np.int64), np.asarray(dst_ids, np.int64)
        keep = (s >= 0) & (s < src.blocks) & (d >= 0) & (d < dst.blocks)
        want = dst.before.copy()
        dst.blocks_of(want)[d[keep]] = src.blocks_of(src.before)[s[keep]]
        np.testing.assert_array_equal(src.np, src.before)  # the source is only read
        changed = np.flatnonzero(dst.np != want)
        assert changed.size == 0, f"{changed.size} bytes differ, first at {changed[:8]}"


def swap_ids(rng, n, src_blocks, dst_blocks, outside: bool, wide: bool = False):
    src_ids = rng.choice(src_blocks, n, replace=False)
    dst_ids = rng.choice(dst_blocks, n, replace=False)
    src_ids[1] = src_ids[0]  # a source may repeat; destinations may not
    if outside:  # ids on a device are checked only on request: the kernel skips these
        src_ids[2], dst_ids[3], dst_ids[4], src_ids[5] = src_blocks, -1, dst_blocks, 2**31 - 1
    if wide:  # int64 ids past int32: block 2 and 3 if narrowed anywhere
        src_ids[6], dst_ids[7] = 2**32 + 2, 2**32 + 3
    return src_ids.tolist(), dst_ids.tolist()


@pytest.mark.parametrize("outside", [False, True], ids=["ids", "ids_outside"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_swap_blocks(geometry, direction, outside):
    rng, pairs = make_swap(len(geometry) * 101 + len(direction), GEOMETRIES[geometry],
                           DIRECTIONS[direction])
    src_ids, dst_ids = swap_ids(rng, 7, SRC_BLOCKS, DST_BLOCKS, outside)
    run_swap(pairs, src_ids, dst_ids)
    check_swapped(pairs, src_ids, dst_ids)


@pytest.mark.parametrize("placement", ["host", "pinned", "device", "device64"])
def test_swap_blocks_ids_placement(placement):
    """Ids from pageable host int64 (staged), pinned host and the device, int32 or int64 (an
    int64 id past 2**32 on the device, unchecked, is skipped, never narrowed into the cache)."""
    rng, pairs = make_swap(7, GEOMETRIES["odd_bytes"], DIRECTIONS["device_to_host"])
    src_ids, dst_ids = swap_ids(rng, 9, SRC_BLOCKS, DST_BLOCKS, outside=True,
                                wide=placement == "device64")
    run_swap(pairs, src_ids, dst_ids, placement)
    check_swapped(pairs, src_ids, dst_ids)


def test_swap_blocks_single_block_single_copy():
    rng, pairs = make_swap(3, [((1,), torch.uint8, 0, (1, 1))], DIRECTIONS["host_to_device"],
                           src_blocks=1, dst_blocks=1)
    run_swap(pairs, [0], [0])
    check_swapped(pairs, [0], [0])


def test_swap_blocks_past_the_grid_y_bound(monkeypatch):
    """More caches than a grid's y dimension holds (65535) launched once, which CUDA refuses
    (the fake too): now one launch per 65535 caches, each reading its caches' table rows. The
    bound is lowered here to 4 (with 9 caches: 4 + 4 + 1), as 65536 caches would take long."""
    monkeypatch.setattr(cuda_swap, "MAX_GRID_Y", 4)
    geometry = [((3,), torch.uint8, 0, (1, 1)), ((2, 5), torch.float16, 0, (1, 1))] * 4 + [
        ((7,), torch.uint8, 0, (1, 1))]
    rng, pairs = make_swap(13, geometry, DIRECTIONS["device_to_host"])
    src_ids, dst_ids = swap_ids(rng, 6, SRC_BLOCKS, DST_BLOCKS, outside=True)
    n_before = len(LAUNCHES)
    cuda_swap.swap_blocks([s.cache for s, _ in pairs], [d.cache for _, d in pairs],
                          ids_tensor(src_ids, "host"), ids_tensor(dst_ids, "host"))
    assert [launch["grid"] for launch in LAUNCHES[n_before:]] == [(6, 4, 1), (6, 4, 1),
                                                                   (6, 1, 1)]
    check_swapped(pairs, src_ids, dst_ids)


@pytest.mark.parametrize("empty", ["src", "dst"])
def test_swap_blocks_zero_block_cache(empty):
    """A cache with 0 blocks (e.g. a host tier not allocated yet): every copy is skipped (the
    launcher used to raise IndexError on a 0-block source)."""
    blocks = (0, 4) if empty == "src" else (4, 0)
    _, pairs = make_swap(11, GEOMETRIES["odd_bytes"], DIRECTIONS["device_to_host"], *blocks)
    run_swap(pairs, [0, 1, 3], [1, 0, 2])
    check_swapped(pairs, [0, 1, 3], [1, 0, 2])


def test_swap_blocks_zero_copies():
    """n == 0: no launch (CUDA refuses an empty grid), nothing written."""
    _, pairs = make_swap(5, GEOMETRIES["odd_bytes"], DIRECTIONS["device_to_host"])
    n_before = len(LAUNCHES)
    cuda_swap.swap_blocks([s.cache for s, _ in pairs], [d.cache for _, d in pairs],
                          torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert len(LAUNCHES) == n_before
    check_swapped(pairs, [], [])


D2H = [("cuda", "pinned")] * 2
REFUSALS = {  # name -> (memory of each (src, dst) cache pair, (side, index) made non-contiguous)
    "src_block_not_contiguous": (D2H, ("src", 1),
                                 r"src_caches\[1\]: the cuda-c backend needs each block "
                                 r"contiguous"),
    "dst_block_not_contiguous": (D2H, ("dst", 0),
                                 r"dst_caches\[0\]: the cuda-c backend needs each block "
                                 r"contiguous"),
    "dst_host_not_pinned": ([("cuda", "pinned"), ("cuda", "cpu")], None,
                            r"dst_caches\[1\]: the cuda-c backend needs pinned host memory"),
    "src_host_not_pinned": ([("cpu", "cuda"), ("pinned", "cuda")], None,
                            r"src_caches\[0\]: the cuda-c backend needs pinned host memory"),
    "no_cache_on_a_device": ([("pinned", "pinned")] * 2, None,
                             r"swap_blocks: the cuda-c backend needs a cache on a CUDA device"),
}


def test_swap_blocks_on_two_gpus_goes_to_the_torch_backend(monkeypatch):
    """Caches on two CUDA devices: the launcher (one launch on one device, raw pointers into
    the other's memory) refuses them before writing, and the frontend picks the torch backend
    instead (it had launched on cuda:0 writing cuda:1's memory)."""
    from prefixkv import torch_frontend as tf

    src = to_device(torch.arange(4 * 16, dtype=torch.float32).view(4, 16))
    dst = to_device(torch.zeros(6, 16))
    on_1 = {dst.untyped_storage().data_ptr()}
    real = torch.Tensor.device

    def device(self):
        if self.untyped_storage().data_ptr() in on_1:
            return torch.device("cuda", 1)
        return real.__get__(self)

    monkeypatch.setattr(torch.Tensor, "device", property(device))
    import importlib.machinery

    # the registry finds cuda-c's requirement by importlib.util.find_spec("cupy")
    monkeypatch.setattr(sys.modules["cupy"], "__spec__",
                        importlib.machinery.ModuleSpec("cupy", None), raising=False)
    n_before = len(LAUNCHES)
    with pytest.raises(ValueError, match=r"needs the CUDA caches on one device, got "
                                         r"cuda:\[0, 1\]"):
        cuda_swap.swap_blocks([src], [dst], ids_tensor([1, 2], "host"),
                              ids_tensor([0, 5], "host"))
    assert len(LAUNCHES) == n_before
    tf.swap_blocks([src], [dst], torch.tensor([1, 2]), torch.tensor([0, 5]))
    assert len(LAUNCHES) == n_before  # not the cuda-c launch


def test_host_block_copies_check_host_ids_for_gpu_caches():
    """gather_blocks_to_host / scatter_blocks_from_host keep host ids on the host, where the
    ops check them by default (moved to the device first, they had gone unchecked)."""
    from prefixkv import torch_frontend as tf

    caches = [to_device(torch.zeros(4, 2, 1, 4)), to_device(torch.zeros(4, 2, 1, 4))]
    buf = np.zeros((2, 2, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="block_ids: expected distinct destinations"):
        tf.scatter_blocks_from_host(caches, buf, [2, 2])
    with pytest.raises(ValueError, match=r"block_ids: expected values in \[0, 4\), got 7"):
        tf.gather_blocks_to_host(caches, [0, 7])


@pytest.mark.parametrize("name", REFUSALS)
def test_swap_blocks_refuses_before_writing(name):
    kinds, spoil, match = REFUSALS[name]
    rng = np.random.default_rng(13)
    pairs = [(Side(rng, SRC_BLOCKS, (2, 3, 8), torch.float32, 0, 1, k[0]),
              Side(rng, DST_BLOCKS, (2, 3, 8), torch.float32, 0, 1, k[1])) for k in kinds]
    caches = {"src": [s.cache for s, _ in pairs], "dst": [d.cache for _, d in pairs]}
    if spoil is not None:  # the same bytes, each block's two inner axes swapped
        side, index = spoil
        caches[side][index] = caches[side][index].transpose(1, 2)
    n_before = len(LAUNCHES)
    with pytest.raises(ValueError, match=match):
        cuda_swap.swap_blocks(caches["src"], caches["dst"], ids_tensor([0, 1], "host"),
                              ids_tensor([2, 3], "host"))
    assert len(LAUNCHES) == n_before
    check_swapped(pairs, [], [])


# ----------------------------------------------------------------------------- hash_blocks

# name -> (block_size, sequence lengths, salt, extra, parent, threads, stream)
HASH_CASES = {
    "b1": (1, [3, 0, 5], None, False, "none", 64, None),
    "b7_extra_per_seq_parent": (7, [7, 13, 0, 15, 30], "tenant", True, "per_seq", 64, 0x1234),
    "b16_70_seqs_two_thread_blocks": (16, [16 * (i % 4) + i % 3 for i in range(70)], "s", True,
                                      "shared", 64, None),
    "b16_70_seqs_5_threads": (16, [16 * (i % 3) + i % 5 for i in range(70)], None, False,
                              "per_seq", 5, 0x77),
    "b248_largest": (248, [496, 300, 247], "x", False, "per_seq", 64, None),
    "b244_largest_with_extra": (244, [244, 500, 0], None, True, "shared", 64, 0x1234),
}
SENTINEL = np.int32(-0x21524111)  # 0xDEADBEEF


def hash_inputs(rng, block_size, lens, salt, with_extra, parent):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    nb = np.diff(cu) // block_size
    tokens = rng.integers(0, 2**31 - 1, int(cu[-1]), dtype=np.int64).astype(np.int32)
    extra = (rng.integers(0, 2**32, (int(nb.sum()), 4), dtype=np.uint64).astype(np.uint32)
             if with_extra else None)
    if parent == "none":
        par = None
    elif parent == "shared":
        par = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    else:
        par = rng.integers(0, 2**32, (len(lens), 8), dtype=np.uint64).astype(np.uint32)
    return cu, nb, tokens, extra, par


def dev32(a: np.ndarray) -> torch.Tensor:
    """A device int32 tensor holding a's 4-byte words (uint32 as int32 bit patterns)."""
    return to_device(torch.from_numpy(np.ascontiguousarray(a).view(np.int32).copy()))


@pytest.mark.parametrize("name", HASH_CASES)
def test_hash_blocks_cuda(name):
    block_size, lens, salt, with_extra, parent, threads, stream = HASH_CASES[name]
    rng = np.random.default_rng(block_size * 7 + len(lens))
    cu, nb, tokens, extra, par = hash_inputs(rng, block_size, lens, salt, with_extra, parent)
    want = np.frombuffer(b"".join(hash_blocks(tokens, block_size, cu_lens=cu, salt=salt,
                                              extra=extra, parent=par)), "<u4").reshape(-1, 8)
    assert len(want) == nb.sum() > 0
    key = np.frombuffer(block_key(salt, with_extra), "<u4")
    parents = parent_words(par, len(lens))
    boff = (np.cumsum(nb) - nb).astype(np.int32)
    buf = to_device(torch.full((len(want) + 1, 8), int(SENTINEL), dtype=torch.int32))
    out = buf[:len(want)]
    n_before = len(LAUNCHES)
    got = cuda_hashing.hash_blocks_cuda(
        dev32(tokens), dev32(cu), dev32(boff), dev32(parents),
        None if extra is None else dev32(extra), dev32(key), out, block_size=block_size,
        stream=stream, device=0 if stream else None, threads=threads)
    assert got is out
    assert LAUNCHES[n_before:] == [{"kernel": "prefixkv_hash_blocks_v1",
                                    "grid": (-(-len(lens) // threads), 1, 1),
                                    "block": (threads, 1, 1), "device": 0,
                                    "stream": stream or 0}]
    np.testing.assert_array_equal(out.numpy().view(np.uint32), want)
    assert (buf[-1] == int(SENTINEL)).all()  # nothing written past out


HASH_REFUSALS = {  # (block_size, extra) -> match
    (249, False): r"block_size: 249 gives a 1028-byte message, over one BLAKE3 chunk .*"
                  r"block_size <= 248$",
    (245, True): r"block_size: 245 gives a 1028-byte message, .* block_size <= 244 with extra",
    (0, False): r"block_size: expected >= 1, got 0",
}


@pytest.mark.parametrize("case", HASH_REFUSALS, ids=lambda c: f"b{c[0]}_extra{int(c[1])}")
def test_hash_blocks_cuda_refuses_block_size(case):
    block_size, with_extra = case
    out = to_device(torch.full((2, 8), int(SENTINEL), dtype=torch.int32))
    tok = dev32(np.arange(600, dtype=np.int32))
    extra = dev32(np.zeros((2, 4), np.uint32)) if with_extra else None
    n_before = len(LAUNCHES)
    with pytest.raises(ValueError, match=HASH_REFUSALS[case]):
        cuda_hashing.hash_blocks_cuda(
            tok, dev32(np.array([0, 600], np.int32)), dev32(np.zeros(1, np.int32)),
            dev32(np.zeros((1, 8), np.int32)), extra, dev32(np.zeros(8, np.int32)), out,
            block_size=block_size)
    assert len(LAUNCHES) == n_before and (out == int(SENTINEL)).all()


@pytest.mark.parametrize("bad", ["tok", "out"])
def test_hash_blocks_cuda_refuses_views_and_wide_dtypes(bad):
    """The kernel reads raw rows of 4-byte words: a strided view (tokens[::2]) was hashed as
    the memory behind it, an int64 array would be read as pairs of words."""
    tok = dev32(np.arange(32, dtype=np.int32))
    out = to_device(torch.full((2, 8), int(SENTINEL), dtype=torch.int32))
    if bad == "tok":
        tok = tok[::2]
    else:
        out = to_device(torch.zeros((2, 8), dtype=torch.int64))
    n_before = len(LAUNCHES)
    with pytest.raises(ValueError, match=f"{bad}: expected a contiguous array of 4-byte "
                                         f"integers"):
        cuda_hashing.hash_blocks_cuda(
            tok, dev32(np.array([0, 16], np.int32)), dev32(np.zeros(1, np.int32)),
            dev32(np.zeros((1, 8), np.int32)), None, dev32(np.zeros(8, np.int32)), out,
            block_size=8)
    assert len(LAUNCHES) == n_before


@pytest.mark.parametrize("cu", [[0], [0, 3, 5]], ids=["no_sequences", "no_full_block"])
def test_hash_blocks_cuda_nothing_to_hash(cu):
    """No launch (CUDA refuses an empty grid) when there is no sequence or no output row."""
    out = to_device(torch.zeros((0, 8), dtype=torch.int32))
    n_before = len(LAUNCHES)
    cuda_hashing.hash_blocks_cuda(
        dev32(np.arange(cu[-1], dtype=np.int32)), dev32(np.array(cu, np.int32)),
        dev32(np.zeros(len(cu) - 1, np.int32)), dev32(np.zeros((len(cu) - 1, 8), np.int32)),
        None, dev32(np.zeros(8, np.int32)), out, block_size=16)
    assert len(LAUNCHES) == n_before


def test_key_words_are_little_endian():
    """The key words handed to the kernel: struct's '<8I' and numpy's '<u4' agree."""
    key = block_key("k", False)
    assert list(struct.unpack("<8I", key)) == np.frombuffer(key, "<u4").tolist()
