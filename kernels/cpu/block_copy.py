"""One-pass whole-block copies between host buffers for the PyTorch frontend's CPU cache ops:
``block_copy.cc`` called through ctypes on raw addresses (see the source's header for the
semantics).

Built on first use with the system C++ compiler into the cache directory of
:mod:`.xla_ffi` (no jax needed); ``PREFIXKV_DISABLE_CPU_FFI=1``, no compiler or a failed build
turn it off, and :func:`available` says so (:func:`status` says why): the frontend then keeps
its torch path (index_select into a staging buffer, index_copy_ out of it).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path

from . import xla_ffi

SOURCE = Path(__file__).with_name("block_copy.cc")

_lock = threading.Lock()
_state: dict = {}
_I64P = ctypes.POINTER(ctypes.c_int64)


def _command(cxx: str, out: str) -> list[str]:
    return [cxx, "-O3", "-shared", "-fPIC", "-std=c++17", "-pthread", str(SOURCE), "-o", out]


def _bind(lib) -> dict:
    fn = lib.PrefixkvCopyBlocksRaw
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [_I64P] * 5 + [ctypes.c_int64, ctypes.c_void_p,
                                                     ctypes.c_void_p, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    advise = lib.PrefixkvAdviseHugePages
    advise.restype = None
    advise.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return {"fn": fn, "advise": advise}


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call)."""
    with _lock:
        if not _state:
            xla_ffi.load_ctypes(_state, "block_copy", _command, (SOURCE,), _bind,
                                depends=xla_ffi.HEADERS)
    return "fn" in _state


def status() -> str:
    """'compiled block copy' or why it is off."""
    return "compiled block copy" if available() else f"off: {_state['error']}"


def advise_new_output(address: int, nbytes: int) -> None:
    """Ask for transparent huge pages over a new (not yet written) output of ``nbytes`` bytes
    at ``address`` when it is large (advice only; see host_memory.h)."""
    if available():
        _state["advise"](address, int(nbytes))


def _array(values: Sequence[int]):
    return (ctypes.c_int64 * len(values))(*map(int, values))


def copy_blocks(src_base: Sequence[int], dst_base: Sequence[int], src_stride: Sequence[int],
                dst_stride: Sequence[int], block_bytes: Sequence[int], n: int,
                src_ids: int | None, dst_ids: int | None, src_blocks: int, dst_blocks: int, *,
                streaming: bool = False, threads: int = 1) -> None:
    """For every cache c and i < n: block dst_ids[i] of dst c = block src_ids[i] of src c.

    src_base, dst_base: per cache, the address of block 0; src_stride, dst_stride: bytes from
    one block to the next; block_bytes: bytes of a block (contiguous). src_ids, dst_ids: the
    address of an i64[n] array, or None for 0..n-1. src_blocks, dst_blocks: blocks in each
    src / dst cache (a source id is clamped into range, a destination id out of range is
    skipped). No destination block may share bytes with a source block or another destination
    block. streaming: write with non-temporal stores (large copies whose destination is not
    read soon). threads: split the copies over up to this many threads. The caller keeps the
    buffers alive.
    """
    fn = _state.get("fn")  # loaded: no lock
    if fn is None:
        if not available():
            raise RuntimeError(f"the CPU block copy is not available: {status()}")
        fn = _state["fn"]
    num = len(src_base)
    if not (len(dst_base) == len(src_stride) == len(dst_stride) == len(block_bytes) == num):
        raise ValueError(f"copy_blocks: src_base, dst_base, src_stride, dst_stride and "
                         f"block_bytes must have one entry per cache, got lengths {num}, "
                         f"{len(dst_base)}, {len(src_stride)}, {len(dst_stride)}, "
                         f"{len(block_bytes)}")
    rc = fn(num, _array(src_base), _array(dst_base), _array(src_stride), _array(dst_stride),
            _array(block_bytes), int(n), src_ids, dst_ids, int(src_blocks), int(dst_blocks),
            int(bool(streaming)), max(1, int(threads)))
    if rc != 0:
        raise ValueError(f"copy_blocks: arguments out of range: n={n}, src_blocks={src_blocks},"
                         f" dst_blocks={dst_blocks}, block_bytes={list(block_bytes)}")


__all__ = ["advise_new_output", "available", "copy_blocks", "status"]
