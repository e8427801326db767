"""The CUDA C kernels of kernels/cuda/ run on the host: their source compiled as C++ against
tests/cuda_host_shim.h (blockIdx, threadIdx, int4, __funnelshift_r emulated; every thread run
in turn), so the kernels' indexing and arithmetic are checked on a machine with no GPU. CuPy
needs a GPU; test_cuda_compile.py and test_hashing_kernels.py only compile these sources.

- swap_blocks_kernel: bit-exact against numpy indexing over caches with block strides larger
  than a block (a view of a stacked [num_blocks, 2, ...] cache), 16-byte and byte paths, the
  launcher's thread count and an odd one; blocks not named, the other half of a stacked cache
  and guard bytes around every buffer come back unchanged.
- prefixkv_hash_blocks_v1: exact against the BLAKE3 package (tests/hashing_cases.py) over the
  ragged cases the Triton and Pallas kernels run, and the message sizes at the edges of the
  one-chunk kernel (16k words, 256 words).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prefixkv.paged.reference.hashing import block_key, parent_words

sys.path.insert(0, str(Path(__file__).parent))
from hashing_cases import make_case, oracle  # noqa: E402
from test_hashing_kernels import KERNEL_CASES  # noqa: E402

TESTS = Path(__file__).resolve().parent
CUDA_DIR = TESTS.parent / "kernels" / "cuda"
CXX = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)),
           None)

_LAUNCHERS = r"""
#include "cuda_host_shim.h"
#include "swap_blocks.cu"
#include "blake3_hash.cu"

extern "C" void launch_swap_blocks(unsigned num_ids, unsigned num_caches, unsigned threads,
                                   const unsigned long long* src_ptrs,
                                   const unsigned long long* dst_ptrs,
                                   const long long* src_strides, const long long* dst_strides,
                                   const long long* block_bytes, const long long* src_blocks,
                                   const long long* dst_blocks, const long long* src_ids,
                                   const long long* dst_ids) {
    pkv_launch(swap_blocks_kernel, {num_ids, num_caches, 1}, {threads, 1, 1}, src_ptrs,
               dst_ptrs, src_strides, dst_strides, block_bytes, src_blocks, dst_blocks, src_ids,
               dst_ids);
}

extern "C" void launch_hash_blocks(unsigned blocks, unsigned threads, const unsigned* tokens,
                                   const int* cu_lens, const int* boff, const unsigned* parents,
                                   const unsigned* extra, const unsigned* key, unsigned* out,
                                   int num_seqs, int block_size, int has_extra) {
    pkv_launch(prefixkv_hash_blocks_v1, {blocks, 1, 1}, {threads, 1, 1}, tokens, cu_lens, boff,
               parents, extra, key, out, num_seqs, block_size, has_extra);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (tried $CXX, c++, g++, clang++)")
    tmp = tmp_path_factory.mktemp("cuda_on_host")
    src = tmp / "launchers.cpp"
    src.write_text(_LAUNCHERS)
    so = tmp / "cuda_on_host.so"
    proc = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall",
                           "-Wno-unknown-pragmas", f"-I{TESTS}", f"-I{CUDA_DIR}", str(src),
                           "-o", str(so)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    return ctypes.CDLL(str(so))


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _shared(nbytes: int) -> np.ndarray:
    """uint8[nbytes] in shared anonymous memory: what a forked kernel writes, the test sees."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes]


def _launch_isolated(launch) -> None:
    """Run launch() in a forked child, so an out-of-bounds access kills the child, and fails
    this test, instead of the test run. Outputs must live in _shared memory."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            launch()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the kernel crashed: {signal.Signals(os.WTERMSIG(status)).name}")
    assert os.WEXITSTATUS(status) == 0


# ----------------------------------------------------------------------------- swap_blocks

GUARD = 64  # bytes of 0xA5 around every cache buffer


def _guarded(nbytes: int, offset: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(whole shared buffer with guards, the random cache bytes at `offset` into it)."""
    whole = _shared(2 * GUARD + offset + nbytes)
    whole[:] = 0xA5
    body = whole[GUARD + offset:GUARD + offset + nbytes]
    body[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
    return whole, body


def _swap_caches(rng, geometry, src_blocks, dst_blocks):
    """Per cache: (src, dst) views of shape [blocks, ...] over guarded byte buffers and the
    two buffers. A side with 2 halves is the first half of a stacked [blocks, 2, ...] cache, so
    its block stride is twice the block's bytes."""
    caches = []
    for shape, dtype, offset, halves in geometry:
        per_block = int(np.prod(shape)) * np.dtype(dtype).itemsize
        views, wholes = [], []
        for blocks, h in zip((src_blocks, dst_blocks), halves, strict=True):
            whole, body = _guarded(blocks * h * per_block, offset, rng)
            views.append(body.view(dtype).reshape(blocks, h, *shape)[:, 0])
            wholes.append(whole)
        caches.append((views[0], views[1], wholes))
    return caches


# (per-block shape, dtype, byte offset of the buffers, (src halves, dst halves))
SWAP_GEOMETRIES = {
    "k_v_two_layers_fp16": [((16, 2, 64), np.float16, 0, (1, 1))] * 2
                           + [((16, 2, 64), np.float16, 0, (2, 2))] * 2,
    "stacked_device_to_flat_host": [((8, 3, 80), np.uint16, 0, (2, 1)),
                                    ((8, 3, 80), np.uint16, 0, (1, 2))],
    "odd_bytes": [((3, 5, 7), np.uint8, 0, (1, 1)), ((1, 1, 9), np.float32, 0, (1, 1))],
    "aligned_stride_odd_size": [((1, 3, 2), np.float32, 0, (2, 2))],  # 24-byte blocks, 48 apart
    "unaligned_base": [((16, 2, 64), np.float32, 4, (1, 1)), ((16, 2, 64), np.float32, 0, (2, 1))],
}


@pytest.mark.parametrize("threads", [256, 7])
@pytest.mark.parametrize("geometry", SWAP_GEOMETRIES)
@pytest.mark.parametrize("bad_ids", [False, True], ids=["ids", "ids_outside"])
def test_swap_blocks_kernel(lib, geometry, threads, bad_ids):
    """Bit-exact swaps; with ``bad_ids`` some ids lie outside their caches (ids on a device
    are checked only on request): those copies are skipped, nothing outside is touched (the
    kernel read and wrote far outside before: the child process died)."""
    from prefixkv.kernels.cuda.swap import THREADS

    assert THREADS == 256  # the launcher's count, the first parameter above
    rng = np.random.default_rng(len(geometry) * 31 + threads)
    src_blocks, dst_blocks, n = 11, 17, 6
    caches = _swap_caches(rng, SWAP_GEOMETRIES[geometry], src_blocks, dst_blocks)
    src_ids = rng.choice(src_blocks, n, replace=False).astype(np.int64)
    dst_ids = rng.choice(dst_blocks, n, replace=False).astype(np.int64)
    src_ids[1] = src_ids[0]  # a source may repeat; destinations may not
    keep = np.ones(n, bool)
    if bad_ids:  # 2**32 + 1: block 1 if the kernel read 32-bit ids
        src_ids[2], dst_ids[3], dst_ids[4], dst_ids[5] = 10**9, -7, dst_blocks, 2**32 + 1
        keep[[2, 3, 4, 5]] = False
    expected = []
    before = [[w.copy() for w in wholes] for _, _, wholes in caches]
    for src, dst, _ in caches:
        exp = dst.copy()
        exp[dst_ids[keep]] = src[src_ids[keep]]
        expected.append(exp)

    def column(f, dtype):
        return np.array([f(s, d) for s, d, _ in caches], dtype=dtype)

    table = [column(lambda s, d: s.ctypes.data, np.uint64),
             column(lambda s, d: d.ctypes.data, np.uint64),
             column(lambda s, d: s.strides[0], np.int64),
             column(lambda s, d: d.strides[0], np.int64),
             column(lambda s, d: s[0].nbytes, np.int64),
             column(lambda s, d: s.shape[0], np.int64),
             column(lambda s, d: d.shape[0], np.int64)]
    _launch_isolated(lambda: lib.launch_swap_blocks(
        ctypes.c_uint(n), ctypes.c_uint(len(caches)), ctypes.c_uint(threads), *map(_ptr, table),
        _ptr(src_ids), _ptr(dst_ids)))

    for (_, dst, wholes), exp, old in zip(caches, expected, before, strict=True):
        np.testing.assert_array_equal(dst.view(np.uint8), exp.view(np.uint8))
        np.testing.assert_array_equal(wholes[0], old[0])  # the source is only read
        changed = np.flatnonzero(wholes[1] != old[1])
        start = dst.ctypes.data - wholes[1].ctypes.data
        rows = (changed - start) // dst.strides[0]  # every changed byte lies in a named block,
        assert np.isin(rows, dst_ids).all()
        offsets = (changed - start) % dst.strides[0]
        assert (offsets < dst[0].nbytes).all()  # not in the stacked partner half


# ----------------------------------------------------------------------------- hashing

EDGE_CASES = {  # message words 8 + B (+ 4): one 64-byte BLAKE3 block, exact multiples, a chunk
    "b8_one_full_block": (8, [8, 24, 3], "a", False, "none"),
    "b4_extra_one_full_block": (4, [12, 4], None, True, "per_seq"),
    "b24_two_full_blocks": (24, [48, 71], None, False, "shared"),
    "b248_whole_chunk": (248, [496, 300], "s", False, "none"),
    "b244_extra_whole_chunk": (244, [244, 500], None, True, "per_seq"),
    "many_sequences": (16, [16 * (i % 4) + i % 3 for i in range(150)], "t", True, "per_seq"),
}


@pytest.mark.parametrize("threads", [64, 5])
@pytest.mark.parametrize("name", [*KERNEL_CASES, *EDGE_CASES])
def test_hash_kernel(lib, name, threads):
    block_size, lens, salt, with_extra, parent = {**KERNEL_CASES, **EDGE_CASES}[name]
    case = make_case(np.random.default_rng(block_size * 1009 + len(lens)), block_size, lens,
                     salt=salt, with_extra=with_extra, parent=parent)
    cu = case["cu_lens"].astype(np.int32)
    nb = np.diff(cu) // block_size
    boff = (np.cumsum(nb) - nb).astype(np.int32)
    key = np.array(struct.unpack("<8I", block_key(salt, with_extra)), dtype=np.uint32)
    parents = np.ascontiguousarray(parent_words(case["parent"], len(lens)), dtype=np.uint32)
    tokens = np.ascontiguousarray(case["tokens"], dtype=np.uint32)
    extra = tokens if case["extra"] is None else np.ascontiguousarray(case["extra"], np.uint32)
    out = _shared(4 * 8 * (int(nb.sum()) + 1)).view(np.uint32).reshape(-1, 8)
    out[:] = 0xDEADBEEF  # unwritten rows fail; one row past the end must stay so
    blocks = -(-len(lens) // threads)
    _launch_isolated(lambda: lib.launch_hash_blocks(
        ctypes.c_uint(blocks), ctypes.c_uint(threads), *map(_ptr, (tokens, cu, boff, parents,
                                                                  extra, key, out)),
        ctypes.c_int(len(lens)), ctypes.c_int(block_size), ctypes.c_int(case["extra"] is not None)))
    exp = oracle(**case)
    np.testing.assert_array_equal(out[:len(exp)], exp)
    assert (out[len(exp):] == 0xDEADBEEF).all()
