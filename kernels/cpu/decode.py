"""Decode paged attention on the CPU for the PyTorch frontend: the kernel of
``xla_attention.cc`` built without XLA (``-DPREFIXKV_NO_XLA_FFI``) and called through ctypes
on raw buffers (the caches may be views with any block, token and head strides: a stacked
cache, HND caches as their NHD views).

Built on first use with the system C++ compiler into the cache directory of
:mod:`.xla_ffi` (no jax needed); ``PREFIXKV_DISABLE_CPU_FFI=1``, no compiler or a failed build
turn it off, and :func:`available` says so (:func:`status` says why). Semantics: those of the
XLA handler (see the source's header): one query per sequence at kv_len - 1, optional sliding
window and soft cap, out in q's dtype, lse f32 (natural log; -inf and out 0 where no key);
caches of q's dtype or float8_e4m3fn (read as value * k_scale, value * v_scale).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from . import xla_ffi

SOURCE = Path(__file__).with_name("xla_attention.cc")
#: dtype name -> the kernel's dtype code (q and out: the first three; caches: q's or fp8).
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "float8_e4m3fn": 3}

_lock = threading.Lock()
_state: dict = {}


def _command(cxx: str, out: str) -> list[str]:
    return [cxx, "-O3", "-shared", "-fPIC", "-std=c++17", "-pthread", "-DPREFIXKV_NO_XLA_FFI",
            str(SOURCE), "-o", out]


def _bind(lib) -> dict:
    fn = lib.PrefixkvDecodeAttentionRaw
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64)] + [ctypes.c_void_p] * 7 + [
        ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    return {"fn": fn}


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call)."""
    with _lock:
        if not _state:
            xla_ffi.load_ctypes(_state, "decode_attention", _command, (SOURCE,), _bind)
    return "fn" in _state


def status() -> str:
    """'compiled decode kernel' or why it is off."""
    return "compiled decode kernel" if available() else f"off: {_state['error']}"


def decode_attention(dtype: str, dims, q: int, k_cache: int, v_cache: int, block_tables: int,
                     kv_lens: int, out: int, lse: int, *, scale: float,
                     sliding_window: int | None = None, logits_soft_cap: float | None = None,
                     portable: bool = False, threads: int = 1, kv_dtype: str | None = None,
                     k_scale: float = 1.0, v_scale: float = 1.0, out_f32: bool = False) -> None:
    """Run the kernel on contiguous buffers given by address.

    dims: (num_seqs, num_q_heads, head_dim, num_blocks, block_size, num_kv_heads, max_blocks)
    and optionally block_stride, then token_stride and head_stride (the caches' strides in
    elements from one block to the next, one token of a block to the next, one kv head of a
    token to the next; 0 or absent: dense NHD). q, out: [num_seqs, num_q_heads, head_dim] of
    ``dtype`` (``out_f32``: out float32, unrounded, for a merge); caches [num_blocks,
    block_size, num_kv_heads, head_dim] by those strides (each head's head_dim elements
    dense: an HND cache is its NHD view) of ``kv_dtype`` (None:
    ``dtype``; or "float8_e4m3fn", read as value * k_scale, value * v_scale); block_tables
    i32[num_seqs, max_blocks]; kv_lens i32[num_seqs]; lse f32[num_seqs, num_q_heads]. The
    caller keeps the buffers alive.
    threads: the sequences are split over up to this many threads (ranges of about equal keys;
    the result is the same for any count).
    """
    fn = _state.get("fn")  # loaded: no lock (a decode step of a small batch is ~50 us)
    if fn is None:
        if not available():
            raise RuntimeError(f"the CPU decode kernel is not available: {status()}")
        fn = _state["fn"]
    dims = tuple(map(int, dims))
    if len(dims) not in (7, 8, 10):
        raise ValueError(f"decode_attention: dims must have 7, 8 or 10 entries, got {dims}")
    arr = (ctypes.c_int64 * 10)(*dims, *((0,) * (10 - len(dims))))
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if dtype not in DTYPES or kv_dtype not in DTYPES:
        raise ValueError(f"decode_attention: unsupported dtype {dtype!r} / kv_dtype "
                         f"{kv_dtype!r}")
    if kv_dtype != "float8_e4m3fn" and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError(f"decode_attention: k_scale / v_scale are for float8_e4m3fn caches "
                         f"only, got {kv_dtype!r} caches with {k_scale}, {v_scale}")
    rc = fn(DTYPES[dtype], arr, q, k_cache, v_cache, block_tables, kv_lens, out, lse,
                      float(scale), int(sliding_window or 0), float(logits_soft_cap or 0.0),
                      int(bool(portable)), max(1, int(threads)), DTYPES[kv_dtype],
                      float(k_scale), float(v_scale), int(bool(out_f32)))
    if rc != 0:
        raise ValueError(f"decode_attention: unsupported dtype {dtype!r} (caches {kv_dtype!r}) "
                         f"or shapes {dims}")


__all__ = ["DTYPES", "available", "decode_attention", "status"]
