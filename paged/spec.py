"""The KV-cache layout and ragged-batch conventions every prefixkv op shares.

Framework-free: works on numpy arrays, JAX arrays/tracers and torch tensors alike, reading only
``.shape`` and ``.dtype``.

Layout (per layer, vLLM flash layout, "NHD")::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset          # negative slot = padding, skipped

Ragged batch::

    q:            [num_tokens, num_q_heads, head_dim]
    cu_q_lens:    i32[num_seqs + 1]   (None = decode: one query token per sequence)
    kv_lens:      i32[num_seqs]       cached prefix + this step's tokens
    block_tables: i32[num_seqs, max_blocks_per_seq]

Query token ``j`` of sequence ``s`` (``q_len = cu_q_lens[s+1] - cu_q_lens[s]``) sits at absolute
position ``p = kv_lens[s] - q_len + j`` and, when causal, sees key positions ``t <= p``; with a
sliding window also only ``t > p - sliding_window``.
"""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes gives numpy a bfloat16; it is a declared dependency.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    BFLOAT16 = None

#: Floating dtypes every attention/copy op accepts, by canonical name.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: Quantized KV-cache dtypes (vLLM's ``kv_cache_dtype="fp8"``): caches only, read and written
#: through a per-tensor scale (``k_scale``/``v_scale``); q, key and value stay float.
FP8_DTYPES = ("float8_e4m3fn",)
#: Every dtype a KV cache may hold.
CACHE_DTYPES = FLOAT_DTYPES + FP8_DTYPES
#: Largest finite float8_e4m3fn: writes saturate to +-FP8_MAX (CUDA's __NV_SATFINITE).
FP8_MAX = 448.0
#: Index dtype of every index argument.
INDEX_DTYPE = "int32"
#: head_dim values the contract promises on every backend.
HEAD_DIMS = (64, 80, 96, 128, 256)
#: block_size values the contract promises on every backend (others where a backend allows).
BLOCK_SIZES = (8, 16, 32, 64)

#: Byte alignment of an attention op's ``workspace=`` and of each buffer carved from it.
WORKSPACE_ALIGN = 256

#: Tolerances for attention outputs against the float64 reference, per dtype (atol, rtol),
#: for logits of magnitude up to ~30 (unit-variance q and k at the default scale are far
#: below). A float32 logit s itself carries an error near |s| 2^-24 sqrt(head_dim) (3.3e-5
#: at |s| = 77, head_dim 128: a random review at scale 2.0 saw the torch padded path reach
#: 3.6e-5), which becomes a relative error of the softmax weights: float32 results drift past
#: 2e-5 beyond that range on any backend that computes its dots in float32.
#: Copies, writes and hashes are exact: no tolerance applies to them.
ATTENTION_TOLERANCE = {
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.5e-2, 1e-2),
}


_NUMPY_DTYPE_NAMES: dict = {}  # np.dtype -> canonical name (every op call asks several times)
#: Other frameworks' dtype objects -> canonical name, filled once by a frontend at import
#: (register_dtype_names) and only read by dtype_name.
_OTHER_DTYPE_NAMES: dict = {}
_OTHER_DTYPE_TYPES: set = set()  # their types (torch.dtype): nothing unhashable is looked up


def register_dtype_names(dtypes) -> None:
    """Name these (non-numpy) dtype objects from a cache in dtype_name: torch's, filled by the
    torch frontend at import. Never written while an op runs: a dict written during tracing
    would be a side effect for torch.compile."""
    for dtype in dtypes:
        name = str(dtype)
        _OTHER_DTYPE_TYPES.add(type(dtype))
        _OTHER_DTYPE_NAMES[dtype] = name[len("torch."):] if name.startswith("torch.") else name


def dtype_name(x) -> str:
    """Canonical dtype name of a numpy/JAX/torch array or dtype: 'float32', 'bfloat16', 'int32'.

    numpy (and JAX) dtypes are looked up in one cache (str() of one costs ~1 us), the dtypes of
    register_dtype_names (torch's) in another; other dtypes are named from str() each time. Two
    caches: the numpy one holds ml_dtypes' bfloat16, which torch 2.11's dynamo cannot hash, so
    a torch dtype looked up there breaks ``torch.compile(fullgraph=True)``."""
    dtype = getattr(x, "dtype", x)
    name = _OTHER_DTYPE_NAMES.get(dtype) if type(dtype) in _OTHER_DTYPE_TYPES else None
    if name is not None:
        return name
    if isinstance(x, type):  # a numpy scalar type such as np.float16 (its .dtype is a descriptor)
        return np.dtype(x).name
    if isinstance(dtype, np.dtype):
        name = _NUMPY_DTYPE_NAMES.get(dtype)
        if name is None:
            name = _NUMPY_DTYPE_NAMES[dtype] = str(dtype)
        return name
    name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a canonical name (bfloat16 and float8_e4m3fn through ml_dtypes)."""
    if name == "bfloat16":
        if BFLOAT16 is None:  # pragma: no cover
            raise TypeError("bfloat16 needs the ml_dtypes package")
        return BFLOAT16
    if name == "float8_e4m3fn":
        return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(name)


def default_scale(head_dim: int) -> float:
    """Softmax scale used when ``scale=None``: ``head_dim ** -0.5``."""
    return float(head_dim) ** -0.5


def decode_cu_q_lens(num_seqs: int) -> np.ndarray:
    """cu_q_lens meaning one query token per sequence: ``[0, 1, ..., num_seqs]``."""
    return np.arange(num_seqs + 1, dtype=np.int32)


def slots_for_positions(block_table: np.ndarray, positions: np.ndarray,
                        block_size: int) -> np.ndarray:
    """Slot of each absolute position of one sequence: ``block_table[p // B] * B + p % B``."""
    positions = np.asarray(positions, dtype=np.int64)
    return (np.asarray(block_table, dtype=np.int64)[positions // block_size] * block_size
            + positions % block_size).astype(np.int32)


def query_positions(kv_lens: np.ndarray, cu_q_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query token: (sequence index, absolute position). Host-side numpy helper."""
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    cu = np.asarray(cu_q_lens, dtype=np.int64)
    q_lens = np.diff(cu)
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    j = np.arange(cu[-1]) - cu[seq]
    pos = kv_lens[seq] - q_lens[seq] + j
    return seq.astype(np.int32), pos.astype(np.int32)


def salt_bytes(salt: str | bytes | bytearray | None) -> bytes:
    """The namespace bytes of a salt (tenant isolation everywhere: hashes, index, tiers, events):
     UTF-8 of a str, the bytes themselves, b"" for None."""
    if salt is None:
        return b""
    if isinstance(salt, str):
        try:
            return salt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (a bad decode upstream)
            raise ValueError(f"salt: expected a str UTF-8 can encode ({e.reason} at index "
                             f"{e.start}); pass bytes for arbitrary salts") from None
    if isinstance(salt, (bytes, bytearray, memoryview)):
        return bytes(salt)
    raise TypeError(f"salt: expected str, bytes or None, got {type(salt).__name__}")
