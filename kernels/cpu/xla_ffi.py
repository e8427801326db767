"""Build, load and register the XLA:CPU FFI handlers: the cache ops of ``xla_cache_ops.cc``
and the decode attention of ``xla_attention.cc``, compiled into one library.

XLA:CPU scatters a bfloat16 cache by converting the whole cache to float32 and back (hundreds
of ms for a 1 GiB cache, where float16 takes 0.3 ms); these handlers copy rows / blocks as
bytes into the aliased (donated) cache instead, for every dtype.

The handlers are compiled on first use with the system C++ compiler against the FFI headers
shipped with jaxlib (``jax.ffi.include_dir()``), into a per-user cache directory keyed by a
hash of the sources, the jaxlib version and the compiler command (no -march: the attention
kernel picks its AVX2 loops at run time); a file lock guards the build
against concurrent processes. When the build is disabled (``PREFIXKV_DISABLE_CPU_FFI=1``), no
compiler is found or the build fails, :func:`available` is False and the JAX frontend keeps
its XLA path; :func:`cpu_cache_ops_path` says which path runs and why.

:func:`gather_blocks` copies whole blocks of every cache into a new (not aliased) buffer, one
memcpy per block, after advising huge pages for a large output: XLA's take + stack ran at
~0.13 of the copy bandwidth, most of it faulting the fresh 32 MiB output in 4 KiB pages.

:func:`paged_attention_decode` (``xla_attention.cc``, built into the same library) runs decode
paged attention in one pass over each sequence's blocks (AVX2/FMA/F16C inner loops chosen at
run time, a portable fallback otherwise): XLA's composite spent most of its time gathering,
converting and transposing the blocks.

Only the JAX frontend calls :func:`write_kv`, :func:`copy_blocks`, :func:`gather_blocks`,
:func:`scatter_blocks` and :func:`paged_attention_decode`, with validated arguments, inside the
CPU branch of ``jax.lax.platform_dependent``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("xla_cache_ops.cc")
#: every source built into the one library (cache ops, decode attention).
SOURCES = (SOURCE, Path(__file__).with_name("xla_attention.cc"))
#: headers the sources include (hashed into the build's key, not compiled by themselves).
HEADERS = (Path(__file__).with_name("host_memory.h"),)
DISABLE_ENV = "PREFIXKV_DISABLE_CPU_FFI"
CACHE_ENV = "PREFIXKV_CACHE_DIR"
#: name of the registered FFI target -> exported handler symbol.
TARGETS = {
    "prefixkv_cpu_write_kv": "PrefixkvWriteKv",
    "prefixkv_cpu_write_kv_hnd": "PrefixkvWriteKvHnd",
    "prefixkv_cpu_copy_blocks": "PrefixkvCopyBlocks",
    "prefixkv_cpu_scatter_blocks": "PrefixkvScatterBlocks",
    "prefixkv_cpu_gather_blocks": "PrefixkvGatherBlocks",
    "prefixkv_cpu_paged_attention_decode": "PrefixkvPagedAttentionDecode",
    "prefixkv_cpu_paged_attention_decode_fp8": "PrefixkvPagedAttentionDecodeFp8",
}

_lock = threading.Lock()
_state: dict = {}  # "lib": loaded CDLL, or "error": why the FFI path is off
_registered: list = []  # the library whose handlers are registered (once per process)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """Where built libraries live: $PREFIXKV_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache,
    under prefixkv/xla_ffi."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "xla_ffi"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prefixkv" / "xla_ffi"


def _build_command(cxx: str, include_dir: str, out: str) -> list[str]:
    return [cxx, "-O3", "-shared", "-fPIC", "-std=c++17", "-pthread", "-isystem", include_dir,
            *(str(s) for s in SOURCES), "-o", out]


def build_library(stem: str, command, sources, key_extra: str = "", force: bool = False,
                  depends=()) -> Path:
    """Compile ``sources`` with ``command(cxx, out_path)`` into the cache directory as
    ``<stem>_<hash>.so`` (hash of the sources, the headers they include (``depends``),
    ``key_extra`` and the command), or reuse that build; a file lock guards it against
    concurrent processes. Raises RuntimeError with the compiler output when it cannot be
    built."""
    import fcntl

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    key = hashlib.sha256()
    for source in (*sources, *depends):
        key.update(source.read_bytes())
    key.update(key_extra.encode())
    key.update(" ".join(command(cxx, "")).encode())
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / f"{stem}_{key.hexdigest()[:16]}.so"
    if lib.exists() and not force:
        return lib
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if lib.exists() and not force:  # built by another process while we waited
                return lib
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            try:
                proc = subprocess.run(command(cxx, tmp), capture_output=True, text=True)
                if proc.returncode != 0:
                    others = "".join(f", with {s.name}" for s in sources[1:])
                    raise RuntimeError(f"building {sources[0].name} failed (exit "
                                       f"{proc.returncode}{others}):\n{proc.stderr[-4000:]}")
                os.replace(tmp, lib)  # atomic: readers never see a partial library
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lib


def load_ctypes(state: dict, stem: str, command, sources, bind, depends=()) -> None:
    """Fill ``state`` for a host library called through ctypes (the PyTorch frontend's CPU
    kernels): build it as :func:`build_library` does and ``state.update(bind(lib))`` (bind
    sets the functions' argtypes and names them), or set ``state["error"]`` to why it is
    off (:data:`DISABLE_ENV`, no compiler, a failed build or a missing symbol)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        state["error"] = f"disabled by {DISABLE_ENV}"
        return
    try:
        state.update(bind(ctypes.CDLL(str(build_library(stem, command, sources,
                                                        depends=depends)))))
    except (RuntimeError, OSError, AttributeError) as e:
        state["error"] = str(e)


def build(force: bool = False) -> Path:
    """Compile the handlers (or reuse the cached build); returns the library path. Raises
    RuntimeError with the compiler output when it cannot be built."""
    import jax
    import jaxlib

    include_dir = jax.ffi.include_dir()
    return build_library("xla_cache_ops", lambda cxx, out: _build_command(cxx, include_dir, out),
                         SOURCES, key_extra=jaxlib.__version__, force=force,
                         depends=HEADERS)


def _load() -> None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _state["error"] = f"disabled by {DISABLE_ENV}"
        return
    try:
        import jax

        if not _registered:
            lib = ctypes.CDLL(str(build()))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _registered.append(lib)
        lib = _registered[0]
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the XLA path
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return
    _state["lib"] = lib


def available() -> bool:
    """Build and register the handlers on first call; True when the FFI path can be used."""
    with _lock:
        if not _state:
            _load()
        return "lib" in _state


def cpu_cache_ops_path() -> str:
    """Which path write_kv / copy_blocks / gather_blocks / scatter_blocks take on CPU: "ffi"
    (byte copies, in place for the updates), or "xla (<why the FFI path is off>)"."""
    return "ffi" if available() else f"xla ({_state['error']})"


def _reset_for_tests() -> None:
    with _lock:
        _state.clear()


#: dtypes whose elements the handlers copy as whole bytes.
SUPPORTED_DTYPES = frozenset(np.dtype(d).name for d in (
    np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.uint16, np.int32,
    np.uint32, np.int64, np.uint64)) | {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


def supports(*arrays) -> bool:
    """Every array has a dtype the handlers copy."""
    return all(np.dtype(a.dtype).name in SUPPORTED_DTYPES for a in arrays)


def use_for(*arrays) -> bool:
    """Whether the JAX frontend's CPU branch should call the handlers for these arrays: the
    dtypes are supported and the handlers are built and registered (built on first call)."""
    return supports(*arrays) and available()


def _aliased_call(target: str, cache, *operands, **attrs):
    import jax

    from .._vma import match_varying  # inside shard_map: vary like the inputs

    if not available():
        raise RuntimeError(f"the CPU FFI cache ops are not available: {cpu_cache_ops_path()}")

    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={len(operands): 0}, vmap_method="sequential")
    return match_varying(call(*operands, cache, **attrs), *operands, cache)


def write_kv(rows, slots, cache, kv_layout: str = "NHD"):
    """cache with cache.row(slots[i]) = rows[i] (negative / out-of-range slots skipped);
    ``kv_layout`` "HND": cache [num_blocks, heads, block_size, head_dim], rows [n, heads,
    head_dim], each head's row to its place."""
    import jax.numpy as jnp

    target = "prefixkv_cpu_write_kv_hnd" if kv_layout == "HND" else "prefixkv_cpu_write_kv"
    return _aliased_call(target, cache, rows, slots.astype(jnp.int32))


def copy_blocks(cache, src, dst):
    """cache with cache[dst[i]] = old cache[src[i]]."""
    import jax.numpy as jnp

    return _aliased_call("prefixkv_cpu_copy_blocks", cache, src.astype(jnp.int32),
                         dst.astype(jnp.int32))


def gather_blocks(caches, block_ids):
    """buffer [n, len(caches), *block_shape] with buffer[i, c] = caches[c][block_ids[i]]
    (ids clamped into [0, num_blocks)); a new buffer, nothing aliased."""
    import jax
    import jax.numpy as jnp

    from .._vma import match_varying  # inside shard_map: vary like the inputs

    if not available():
        raise RuntimeError(f"the CPU FFI cache ops are not available: {cpu_cache_ops_path()}")
    first = caches[0]
    shape = (block_ids.shape[0], len(caches), *first.shape[1:])
    call = jax.ffi.ffi_call("prefixkv_cpu_gather_blocks",
                            jax.ShapeDtypeStruct(shape, first.dtype), vmap_method="sequential")
    return match_varying(call(block_ids.astype(jnp.int32), *caches), block_ids, *caches)


def scatter_blocks(cache, buffer, block_ids, index: int):
    """cache with cache[block_ids[i]] = buffer[i, index]."""
    import jax.numpy as jnp

    return _aliased_call("prefixkv_cpu_scatter_blocks", cache, buffer,
                         block_ids.astype(jnp.int32), index=np.int64(index))


#: dtypes of q and the caches that the decode attention handler computes with.
ATTENTION_DTYPES = frozenset({"float32", "bfloat16", "float16"})


def use_for_attention(q, k_cache, v_cache) -> bool:
    """Whether the JAX frontend's CPU branch should run decode attention through
    :func:`paged_attention_decode`: float32 / bfloat16 / float16 inputs of one dtype and the
    handlers built and registered (built on first call)."""
    names = {np.dtype(a.dtype).name for a in (q, k_cache, v_cache)}
    return len(names) == 1 and names <= ATTENTION_DTYPES and available()


def use_for_attention_fp8(q, k_cache, v_cache) -> bool:
    """Whether :func:`paged_attention_decode` takes these float8_e4m3fn caches: q float32,
    bfloat16 or float16, both caches float8_e4m3fn, the handlers available."""
    return (np.dtype(q.dtype).name in ATTENTION_DTYPES
            and all(np.dtype(c.dtype).name == "float8_e4m3fn" for c in (k_cache, v_cache))
            and available())


def paged_attention_decode(q, k_cache, v_cache, block_tables, kv_lens, *, scale: float,
                           sliding_window: int | None = None,
                           logits_soft_cap: float | None = None, portable: bool = False,
                           k_scale=None, v_scale=None, kv_layout: str = "NHD", out_dtype=None):
    """Decode paged attention by the compiled handler of ``xla_attention.cc``; (out, lse).

    q: [num_seqs, num_q_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim] (``kv_layout`` "HND": [num_blocks, num_kv_heads, block_size, head_dim]), q's
    dtype (float32, bfloat16, float16); block_tables i32[num_seqs, max_blocks];
    kv_lens i32[num_seqs]. One query per sequence at position kv_len - 1 (causal, optional
    sliding window and soft cap). Returns out in q's dtype (``out_dtype`` float32: unrounded,
    for a merge) and lse f32[num_seqs, num_q_heads]
    (natural log; -inf and out 0 where no key is seen). ``portable``: the handler's portable
    inner loops instead of the AVX2 ones (tests). float8_e4m3fn caches (vLLM's fp8 KV cache)
    are read as value * k_scale and value * v_scale: scales None (1.0), floats or float32
    scalars, traced or not (the fp8 handler takes them as an f32[2] operand).
    """
    import jax
    import jax.numpy as jnp

    from .._vma import match_varying  # inside shard_map: vary like the inputs

    if not available():
        raise RuntimeError(f"the CPU FFI kernels are not available: {cpu_cache_ops_path()}")
    num_seqs, num_q_heads, _ = q.shape
    fp8 = np.dtype(k_cache.dtype).name == "float8_e4m3fn"
    if not fp8 and (k_scale is not None or v_scale is not None):
        raise ValueError("paged_attention_decode: k_scale / v_scale are for float8_e4m3fn "
                         f"caches only, got {np.dtype(k_cache.dtype).name}")
    call = jax.ffi.ffi_call(
        "prefixkv_cpu_paged_attention_decode" + ("_fp8" if fp8 else ""),
        (jax.ShapeDtypeStruct(q.shape, q.dtype if out_dtype is None else out_dtype),
         jax.ShapeDtypeStruct((num_seqs, num_q_heads), jnp.float32)),
        vmap_method="sequential")
    scales = ()
    if fp8:
        scales = (jnp.stack([jnp.asarray(1.0 if x is None else x, jnp.float32).reshape(())
                             for x in (k_scale, v_scale)]),)
    out = call(q, k_cache, v_cache, block_tables.astype(jnp.int32), kv_lens.astype(jnp.int32),
               *scales, scale=np.float32(scale), sliding_window=np.int64(sliding_window or 0),
               logits_soft_cap=np.float32(logits_soft_cap or 0.0),
               portable=np.int64(bool(portable)), hnd=np.int64(kv_layout == "HND"))
    return match_varying(out, q, k_cache, v_cache, block_tables, kv_lens)


__all__ = ["available", "build", "cache_dir", "cpu_cache_ops_path", "write_kv", "copy_blocks",
           "gather_blocks", "scatter_blocks", "supports", "use_for", "SUPPORTED_DTYPES",
           "DISABLE_ENV", "ATTENTION_DTYPES", "use_for_attention", "use_for_attention_fp8",
           "paged_attention_decode"]
