"""Every input check of every prefixkv op, shared by the numpy reference and both frontends.

Two kinds of check:

* static checks (``check_<op>``) read only shapes, dtypes and Python scalars, so they run on
  numpy arrays, torch tensors and JAX tracers alike, inside ``jax.jit`` and ``torch.compile``;
* value checks (``check_<op>_values``) read index arrays on the host (ids in range, lengths
  consistent, no duplicate destinations). The reference always runs them. Frontends run them
  when :func:`value_checks_enabled` says so: always for host-resident concrete inputs, and for
  device inputs only in checked mode (``PREFIXKV_VALUE_CHECKS=1`` or ``with value_checks():``),
  because they need a host sync. Traced inputs (inside ``jax.jit``, or while ``torch.compile``
  traces) are never value-checked: their values do not exist yet.

Every error is a ``TypeError`` (wrong dtype or type) or ``ValueError`` (wrong shape or value) whose
message names the argument, what was expected and what came.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .spec import CACHE_DTYPES, FLOAT_DTYPES, FP8_DTYPES, INDEX_DTYPE, dtype_name

ENV_VALUE_CHECKS = "PREFIXKV_VALUE_CHECKS"
_value_checks_override: list[bool] = []


def value_checks_enabled(host_inputs: bool = False) -> bool:
    """Whether a frontend should run the host-side value checks.

    ``host_inputs``: the index arrays are concrete and already on the host (numpy, CPU torch),
    so checking costs no device sync; then checks run unless explicitly disabled.
    """
    if _value_checks_override:
        return _value_checks_override[-1]
    env = os.environ.get(ENV_VALUE_CHECKS, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return host_inputs


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Turn the host-side value checks on (or off) inside the block (checked mode)."""
    _value_checks_override.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks_override.pop()


def to_host(x) -> np.ndarray:
    """A numpy view/copy of an index array from numpy, JAX or torch (CPU or device)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------- primitives


def _shape(x) -> tuple[int, ...]:
    """x's shape as ints, a torch.SymInt kept: int() of one pins it, so torch.export (its
    default, non-strict mode) of a model calling the torch wrappers had every dynamic size
    fixed to the example's (dynamo's own tracing keeps it symbolic either way)."""
    return tuple(d if type(d) is int or type(d).__name__ == "SymInt" else int(d)
                 for d in x.shape)


def check_array(name: str, x, *, ndim: int | None = None, dtypes: Sequence[str] | None = None):
    """x has ``.shape``/``.dtype``, the given rank and one of the given dtypes. A class (an
    array type such as ``np.float32``, whose ``shape`` is a descriptor) is no array."""
    if (x is None or isinstance(x, type) or not hasattr(x, "shape")
            or not hasattr(x, "dtype")):
        what = f"the type {x.__name__}" if isinstance(x, type) else type(x).__name__
        raise TypeError(f"{name}: expected an array, got {what}")
    if dtypes is not None and dtype_name(x) not in dtypes:
        want = dtypes[0] if len(dtypes) == 1 else " or ".join(dtypes)
        hint = ""
        if tuple(dtypes) == (INDEX_DTYPE,) and dtype_name(x).startswith(("int", "uint")):
            # SGLang's int64 seq_lens, torch's default integer dtype, JAX with x64
            hint = (" (indices are int32 in prefixkv: cast with .astype(np.int32) or, in "
                    "torch, .to(torch.int32); the plans take int64 and cast once)")
        raise TypeError(f"{name}: expected {want}, got {dtype_name(x)}{hint}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {_shape(x)}")
    return _shape(x)


#: dtypes of the arguments that name slots or blocks of a cache: write_kv's slot_mapping
#: (vLLM's reshape_and_cache and SGLang's out_cache_loc hand int64) and the block ids of
#: copy_blocks, gather_blocks, scatter_blocks and swap_blocks (torch's default integer dtype;
#: the columns of vLLM's int64 [n, 2] block_mapping). Attention metadata stays INDEX_DTYPE.
ID_DTYPES = (INDEX_DTYPE, "int64")


def check_index(name: str, x, ndim: int = 1) -> tuple[int, ...]:
    return check_array(name, x, ndim=ndim, dtypes=(INDEX_DTYPE,))


def check_ids(name: str, x) -> tuple[int, ...]:
    """A 1-D array of slots or block ids: int32 or int64 (:data:`ID_DTYPES`)."""
    return check_array(name, x, ndim=1, dtypes=ID_DTYPES)


def check_same_shape(name: str, x, ref_name: str, ref) -> None:
    if _shape(x) != _shape(ref):
        raise ValueError(f"{name}: expected the shape of {ref_name} {_shape(ref)}, got {_shape(x)}")


def check_same_dtype(name: str, x, ref_name: str, ref) -> None:
    if dtype_name(x) != dtype_name(ref):
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({dtype_name(ref)}), "
                        f"got {dtype_name(x)}")


def check_int(name: str, value, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int: an int or numpy integer (anything with ``__index__``: sizes
    computed with numpy arrive as np.int64), not a bool; TypeError otherwise, ValueError below
    ``minimum`` (``hint`` follows the bound in the message)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}"
                        ) from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{hint}, got {value}")
    return int(value)


def check_int32(name: str, value: int, use: str = "int32 positions") -> None:
    """A ValueError naming ``name`` for an int past int32 (``use``: what needs it to fit)."""
    if value > 0x7FFFFFFF:
        raise ValueError(f"{name}: expected at most 2**31 - 1 ({use}), got {value}")


_F32_MAX = float(np.finfo(np.float32).max)
_F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # 2**-126
#: The largest logits_soft_cap: x / cap of a logit x above 2**-26 stays a float32 normal.
#: Past it kernels that flush subnormals to zero (XLA:CPU, TPUs, GPUs) read small logits as 0
#: (a cap of 3e38 flattened attention to uniform); a cap that large caps nothing anyway.
SOFT_CAP_MAX = 2.0**100


def check_optional_positive(name: str, value, *, integer: bool = False, none_is=None):
    """None, or a finite number > 0 and at most float32's largest (the kernels compute in
    float32: a larger soft cap rounds to inf, and inf * tanh(0) is NaN), or an int in
    [1, 2**31) when ``integer`` (positions are int32). ``none_is``: the value other libraries
    use for "off" (FlashAttention's window -1, FlashInfer's soft cap 0), named in the
    error."""
    if value is None:
        return None
    off = "" if none_is is None else f" (None turns it off, where others pass {none_is})"
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}{off}")
        check_int32(name, value)
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a float or None, got {type(value).__name__}")
    if not (value > 0 and value < math.inf):  # comparisons: a SymFloat stays symbolic
        raise ValueError(f"{name}: expected a finite value > 0, got {value}{off}")
    if value > _F32_MAX:
        raise ValueError(f"{name}: expected at most {_F32_MAX:.8g} (float32's largest: the "
                         f"kernels compute in float32), got {value}")
    return float(value)


#: Most entries of the index arrays that the value checks of a small batch read as Python
#: lists first (_small_ragged_ok, check_cumulative_lens): numpy costs about 1 us an operation
#: whatever the size, a list about 15 ns an entry. A list that fails runs the numpy checks,
#: which name the first bad entry.
SMALL_BATCH_ENTRIES = 1024


def cumulative_ok(ends: list[int], total: int) -> bool:
    """Whether host cumulative lengths (a list) start at 0, never decrease and end at
    ``total``: what check_cumulative_lens asks, as a verdict (also the torch CPU path's test
    of unchecked cu_q_lens before a route sized by them)."""
    return bool(ends) and ends[0] == 0 and ends[-1] == total and all(
        a <= b for a, b in itertools.pairwise(ends))


def _ids_ok(ids: list[int], num_blocks: int) -> bool:
    """Block ids (a list, maybe empty) all in [0, num_blocks)."""
    return not ids or (min(ids) >= 0 and max(ids) < num_blocks)


#: check_cumulative_lens's hint for q rows past cu_q_lens[-1]
_PADDED_ROWS_HINT = ("; rows padded past the batch (vLLM's num_actual_tokens): pass "
                     "q[:cu_q_lens[-1]], or give the padding rows to an extra last sequence "
                     "(docs/host.md, padded batches)")


def check_cumulative_lens(name: str, cu, num_tokens: int, short_hint: str = "") -> np.ndarray:
    """Host check of cumulative lengths (cu_q_lens, cu_lens): starts at 0, never decreases,
    ends at num_tokens (``short_hint`` follows the error of one that ends short of it).
    Returns them as int64 numpy."""
    cu = to_host(cu).astype(np.int64)
    # the verdict from a list (numpy: ~1 us an operation)
    if 0 < cu.size <= SMALL_BATCH_ENTRIES and cumulative_ok(cu.tolist(), num_tokens):
        return cu
    if cu[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if (steps < 0).any():
        s = int(np.argmax(steps < 0))
        raise ValueError(f"{name}: expected non-decreasing values, got {int(cu[s])} then "
                         f"{int(cu[s + 1])} at index {s}")
    if cu[-1] != num_tokens:
        hint = short_hint if 0 <= cu[-1] < num_tokens else ""
        raise ValueError(f"{name}: expected {name}[-1] == num_tokens ({num_tokens}), "
                         f"got {int(cu[-1])}{hint}")
    return cu


def _check_ids_in_range(name: str, ids: np.ndarray, upper: int, *, lower: int = 0) -> None:
    if ids.size == 0:
        return
    bad = (ids < lower) | (ids >= upper)
    if bad.any():
        i = np.argwhere(bad)[0]
        where = tuple(int(v) for v in i) if ids.ndim > 1 else int(i[0])
        raise ValueError(f"{name}: expected values in [{lower}, {upper}), "
                         f"got {int(ids[tuple(i)])} at index {where}")


def _check_no_duplicates(name: str, ids: np.ndarray) -> None:
    if ids.size <= 64 and len(set(ids.tolist())) == ids.size:
        return  # a decode step's few distinct ids: a set, not np.unique's sort (~20 us)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        hint = " (give padding tokens slot -1: they are skipped)" if name == "slot_mapping" else ""
        raise ValueError(f"{name}: expected distinct destinations, got {int(uniq[counts > 1][0])} "
                         f"{int(counts[counts > 1][0])} times{hint}")


# ---------------------------------------------------------------------------- attention checks


@dataclass(frozen=True)
class AttentionDims:
    """Sizes read off a paged-attention call's arguments."""

    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    num_seqs: int
    max_blocks_per_seq: int
    dtype: str
    scale: float
    decode: bool  # cu_q_lens is None: one query token per sequence
    kv_layout: str = "NHD"  # the caches' layout (KV_LAYOUTS)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_q_heads = MQA)."""
        return self.num_q_heads // self.num_kv_heads


def is_fp8(x) -> bool:
    """Whether x (an array or a dtype) is a quantized cache dtype (float8_e4m3fn)."""
    return dtype_name(x) in FP8_DTYPES


#: Cache layouts a frontend without strides (JAX) takes: "NHD" [num_blocks, block_size,
#: num_kv_heads, head_dim] (vLLM's, the default) and "HND" [num_blocks, num_kv_heads,
#: block_size, head_dim] (FlashInfer's other layout: a block's tokens of one head contiguous,
#: so a TPU's (8 x 128) tiling of the two minor dims pads nothing whatever the head count).
#: numpy and torch take an HND cache as its strided NHD view, cache.transpose(0, 2, 1, 3).
KV_LAYOUTS = ("NHD", "HND")


def check_kv_layout(kv_layout) -> str:
    if not isinstance(kv_layout, str) or kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout: expected one of {', '.join(map(repr, KV_LAYOUTS))}, got "
                         f"{kv_layout!r}")
    return kv_layout


def cache_dims(cache, kv_layout: str = "NHD") -> tuple[int, int, int, int]:
    """(num_blocks, block_size, num_kv_heads, head_dim) of a 4-D cache (an array or its shape)
    in ``kv_layout``."""
    num_blocks, a, b, head_dim = (int(d) for d in getattr(cache, "shape", cache))
    return (num_blocks, b, a, head_dim) if kv_layout == "HND" else (num_blocks, a, b, head_dim)


def layout_dims(kv_layout: str) -> str:
    """The cache's dims in words, for errors."""
    return ("[num_blocks, num_kv_heads, block_size, head_dim]" if kv_layout == "HND"
            else "[num_blocks, block_size, num_kv_heads, head_dim]")


def check_kv_caches(k_cache, v_cache, kv_layout: str = "NHD") -> tuple[int, int, int, int]:
    """k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (``kv_layout`` "HND":
    [num_blocks, num_kv_heads, block_size, head_dim]), same shape and dtype (float32|float16|
    bfloat16, or float8_e4m3fn read and written through k_scale/v_scale). Returns
    (num_blocks, block_size, num_kv_heads, head_dim) whatever the layout."""
    check_kv_layout(kv_layout)
    if hasattr(k_cache, "shape") and len(k_cache.shape) == 5 and 2 in tuple(k_cache.shape[:2]):
        views = {0: "kv[0], kv[1]", 1: "kv[:, 0], kv[:, 1]"}
        view = " or ".join(views[a] for a in (0, 1) if int(k_cache.shape[a]) == 2)
        raise ValueError(f"k_cache: expected 4 dimensions, got shape {_shape(k_cache)}: a "
                         f"stacked K/V cache? pass its halves, k_cache, v_cache = {view} "
                         f"(torch views: no copy)")
    shape = check_array("k_cache", k_cache, ndim=4, dtypes=CACHE_DTYPES)
    check_array("v_cache", v_cache, ndim=4, dtypes=CACHE_DTYPES)
    check_same_shape("v_cache", v_cache, "k_cache", k_cache)
    check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    num_blocks, block_size, num_kv_heads, head_dim = cache_dims(shape, kv_layout)
    if num_blocks < 1 or block_size < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"k_cache: expected non-empty {layout_dims(kv_layout)} "
                         f"(kv_layout={kv_layout!r}), got shape {shape}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_kv_scale(name: str, scale, cache) -> float | None:
    """Static check of k_scale / v_scale (vLLM's per-tensor KV-cache scales).

    None (1.0 for a float8_e4m3fn cache), or for a float8_e4m3fn ``cache`` only: a Python
    float (a weakly typed JAX scalar too), or a float32 array of one element (shape () or
    (1,); may be traced or on a device:
    :func:`check_kv_scale_values` checks its value on the host). A scale with a float cache is
    refused (it would be silently ignored). Returns the Python float when one was given.
    """
    if scale is None:
        return None
    if not is_fp8(cache):
        raise ValueError(f"{name}: only for a float8_e4m3fn cache (stored as x / {name}), got "
                         f"one with a {dtype_name(cache)} cache; pass {name}=None")
    if isinstance(scale, bool):
        raise TypeError(f"{name}: expected a float or a float32 array of one element, got bool")
    if isinstance(scale, (int, float, np.integer, np.floating)):
        if not (scale > 0 and scale < math.inf):  # comparisons: a SymFloat stays symbolic
            raise ValueError(f"{name}: expected a finite value > 0, got {scale}")
        return float(scale)
    if not hasattr(scale, "shape") or not hasattr(scale, "dtype"):
        raise TypeError(f"{name}: expected a float or a float32 array of one element, got "
                        f"{type(scale).__name__}")
    # a weakly typed float64 (JAX's Python float passed to a jitted function under x64) is a
    # Python float: taken as float32 (the frontend converts it)
    weak = getattr(scale, "weak_type", False) is True and dtype_name(scale) == "float64"
    if dtype_name(scale) != "float32" and not weak:
        raise TypeError(f"{name}: expected float32, got {dtype_name(scale)}")
    if _shape(scale) not in ((), (1,)):
        raise ValueError(f"{name}: expected one element (shape () or (1,)), got shape "
                         f"{_shape(scale)}")
    return None


def check_kv_scale_values(k_scale, v_scale) -> None:
    """Host value check of array scales: finite and > 0 (Python floats are checked statically)."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or isinstance(scale, (int, float, np.integer, np.floating)):
            continue
        value = float(to_host(scale).reshape(()))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a finite value > 0, got {value}")


def check_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *,
                          scale=None, causal=True, sliding_window=None, logits_soft_cap=None,
                          return_lse=False, sinks=None, k_scale=None,
                          v_scale=None, kv_layout: str = "NHD") -> AttentionDims:
    """Static checks of a paged_attention call; returns its sizes. The caches hold q's dtype,
    or float8_e4m3fn (then read as float32(cache) * k_scale / v_scale); ``kv_layout``: as
    :data:`KV_LAYOUTS`."""
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_caches(k_cache, v_cache,
                                                                     kv_layout)
    num_tokens, num_q_heads, q_head_dim = check_array("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    if not is_fp8(k_cache):
        check_same_dtype("k_cache", k_cache, "q", q)
    check_kv_scale("k_scale", k_scale, k_cache)
    check_kv_scale("v_scale", v_scale, v_cache)
    if q_head_dim != head_dim:
        raise ValueError(f"q: expected head_dim {head_dim} (from k_cache), got {q_head_dim}")
    if num_q_heads < 1 or num_q_heads % num_kv_heads:
        if kv_layout == "HND":
            raise ValueError(f"q: {num_q_heads=} must be divisible by {num_kv_heads=} (dim 1 of "
                             f"k_cache: kv_layout='HND' caches are {layout_dims('HND')})")
        raise ValueError(f"q: {num_q_heads=} must be divisible by {num_kv_heads=} (dim 2 of "
                         f"k_cache: caches are [num_blocks, block_size, num_kv_heads, "
                         f"head_dim], vLLM's NHD; an HND cache [num_blocks, num_kv_heads, "
                         f"block_size, head_dim] is taken as the view cache.permute(0, 2, 1, "
                         f"3) in torch, or with kv_layout='HND' in JAX)")
    num_seqs, max_blocks_per_seq = check_index("block_tables", block_tables, ndim=2)
    (n_kv,) = check_index("kv_lens", kv_lens)
    if n_kv != num_seqs:
        raise ValueError(f"kv_lens: expected shape ({num_seqs},) (num_seqs from block_tables), "
                         f"got ({n_kv},)")
    if cu_q_lens is None:
        if num_tokens != num_seqs:
            raise ValueError(f"q: with cu_q_lens=None (decode) expected one token per sequence, "
                             f"num_tokens={num_tokens} but num_seqs={num_seqs}")
    else:
        (n_cu,) = check_index("cu_q_lens", cu_q_lens)
        if n_cu != num_seqs + 1:
            raise ValueError(f"cu_q_lens: expected shape ({num_seqs + 1},) (num_seqs + 1), "
                             f"got ({n_cu},)")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    scale_value = check_attention_options(scale=scale, causal=causal,
                                          sliding_window=sliding_window,
                                          logits_soft_cap=logits_soft_cap)
    check_sinks(sinks, num_q_heads)
    return AttentionDims(
        num_tokens=num_tokens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, num_blocks=num_blocks, block_size=block_size, num_seqs=num_seqs,
        max_blocks_per_seq=max_blocks_per_seq, dtype=dtype_name(q),
        scale=scale_value if scale_value is not None else float(head_dim) ** -0.5,
        decode=cu_q_lens is None, kv_layout=kv_layout)


def check_attention_options(*, scale=None, causal=True, sliding_window=None,
                            logits_soft_cap=None) -> float | None:
    """The attention options alone (also before the shapes are known: the tensor-parallel
    helpers check theirs when made); returns scale as a float, None for the default."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window: only defined for causal=True, got causal=False")
    scale_value = check_optional_positive("scale", scale)
    check_optional_positive("sliding_window", sliding_window, integer=True, none_is=-1)
    cap = check_optional_positive("logits_soft_cap", logits_soft_cap, none_is=0)
    if cap is not None and cap < _F32_MIN_NORMAL:
        # XLA:CPU runs kernels with subnormals flushed to zero: such a cap compared as 0 there
        # and the CPU decode kernel applied none
        raise ValueError(f"logits_soft_cap: expected at least {_F32_MIN_NORMAL:.8g} (float32's "
                         f"smallest normal: kernels may flush subnormals to zero), got "
                         f"{logits_soft_cap}")
    if cap is not None and cap > SOFT_CAP_MAX:
        raise ValueError(f"logits_soft_cap: expected at most 2**100 ({SOFT_CAP_MAX:.8g}: logits "
                         f"divided by a larger cap become float32 subnormals, which kernels may "
                         f"flush to zero), got {logits_soft_cap}; a cap that large caps "
                         f"nothing, pass None")
    return scale_value


def check_fits_int32(name: str, x) -> None:
    """Host value check of int64 metadata about to be cast to int32 (prefixkv's index dtype):
    a ValueError naming the first value outside int32 and its index."""
    host = to_host(x)
    bad = (host < -(2**31)) | (host > 2**31 - 1)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected values that fit int32 (prefixkv's index dtype), "
                         f"got {int(host[i])} at index {i}")


def check_plan_heads_and_dtype(k_cache, num_q_heads, dtype, kv_layout: str = "NHD"):
    """Static checks of an attention plan's ``num_q_heads`` (an int >= 1) and ``dtype`` (q's:
    a float dtype; default k_cache's, which a float8_e4m3fn cache cannot give). Returns the
    dtype (the frontend checks its type)."""
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, (int, np.integer)):
        raise TypeError(f"num_q_heads: expected an int, got {type(num_q_heads).__name__}")
    if num_q_heads < 1:
        raise ValueError(f"num_q_heads: expected an int >= 1, got {num_q_heads}")
    shape = getattr(k_cache, "shape", ())
    heads = cache_dims(shape, check_kv_layout(kv_layout))[2] if len(shape) == 4 else 0
    if heads > 0 and num_q_heads % heads:
        raise ValueError(f"num_q_heads: expected a multiple of k_cache's {heads} kv heads "
                         f"(each kv head serves num_q_heads / num_kv_heads q heads), got "
                         f"{num_q_heads}")
    if dtype is None:
        if is_fp8(k_cache):
            raise ValueError(f"dtype: required with float8_e4m3fn caches (q's dtype: "
                             f"{', '.join(FLOAT_DTYPES)})")
        return k_cache.dtype
    try:
        name = dtype_name(dtype)
    except TypeError:
        name = None
    if name not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected q's dtype, one of {', '.join(FLOAT_DTYPES)}, got "
                        f"{dtype!r}")
    return dtype


def check_plan_num_tokens(num_tokens, decode: bool, num_seqs: int) -> int:
    """A plan's ``num_tokens`` (q's token count, given instead of read from cu_q_lens) as an
    int; a decode plan's is its sequence count."""
    num_tokens = check_int("num_tokens", num_tokens, 0)
    if decode and num_tokens != num_seqs:
        raise ValueError(f"num_tokens: a decode plan (cu_q_lens None) has one query token per "
                         f"sequence ({num_seqs}), got {num_tokens}")
    return num_tokens


def check_sinks(sinks, num_q_heads: int) -> None:
    """sinks: None, or one logit per q head, float[num_q_heads] (gpt-oss's attention sinks)."""
    if sinks is None:
        return
    (n,) = check_array("sinks", sinks, ndim=1, dtypes=FLOAT_DTYPES)
    if n != num_q_heads:
        raise ValueError(f"sinks: expected shape ({num_q_heads},), one logit per q head "
                         f"(num_q_heads from q), got ({n},)")


def check_ragged_values(dims: AttentionDims, block_tables, kv_lens, cu_q_lens=None,
                        *, kv_name: str = "kv_lens") -> tuple[np.ndarray, np.ndarray]:
    """Host value checks of a ragged batch; returns (kv_lens, cu_q_lens) as int64 numpy."""
    kv = to_host(kv_lens).astype(np.int64)
    table = to_host(block_tables)
    if cu_q_lens is None:
        cu = np.arange(dims.num_seqs + 1, dtype=np.int64)
    else:
        cu = check_cumulative_lens("cu_q_lens", cu_q_lens, dims.num_tokens, _PADDED_ROWS_HINT)
    if _small_ragged_ok(kv, cu, table, dims):
        return kv, cu
    if (kv < 0).any():
        s = int(np.argmax(kv < 0))
        raise ValueError(f"{kv_name}: expected values >= 0, got {int(kv[s])} at index {s}")
    q_lens = np.diff(cu)
    short = kv < q_lens
    if short.any():
        s = int(np.argmax(short))
        raise ValueError(f"{kv_name}: expected {kv_name}[s] >= q_len (this step's tokens are in "
                         f"the cache), got {int(kv[s])} < {int(q_lens[s])} for sequence {s}")
    capacity = dims.max_blocks_per_seq * dims.block_size
    over = kv > capacity
    if over.any():
        s = int(np.argmax(over))
        raise ValueError(f"{kv_name}: expected values <= max_blocks_per_seq * block_size "
                         f"({capacity}), got {int(kv[s])} for sequence {s}")
    _check_used_blocks("block_tables", table, kv, dims.block_size, dims.num_blocks)
    return kv, cu


def _small_ragged_ok(kv: np.ndarray, cu: np.ndarray, table: np.ndarray,
                     dims: AttentionDims) -> bool:
    """True when a small batch passes check_ragged_values' checks (a decode step's few
    sequences: the numpy checks cost ~15 us of a ~100 us call); False when it is not small or
    fails one, and the numpy checks that name the first bad entry run. Same verdict."""
    if table.size > SMALL_BATCH_ENTRIES or kv.size != table.shape[0]:
        return False
    bs, num_blocks = dims.block_size, dims.num_blocks
    capacity = dims.max_blocks_per_seq * bs
    q_lens = [b - a for a, b in itertools.pairwise(cu.tolist())]
    for n, q_len, row in zip(kv.tolist(), q_lens, table.tolist(), strict=True):
        if not q_len <= n <= capacity:
            return False
        if not _ids_ok(row[:(n + bs - 1) // bs], num_blocks):
            return False
    return True


def _check_used_blocks(name: str, table: np.ndarray, lens: np.ndarray, block_size: int,
                       num_blocks: int) -> None:
    """Entries of ``table`` that hold tokens (the first ceil(len / block_size)) are valid ids."""
    if table.size == 0:
        return
    used = np.arange(table.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        s, b = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected block ids in [0, {num_blocks}) for the blocks in use, "
                         f"got {int(table[s, b])} at [{s}, {b}]")


def check_paged_attention_values(dims: AttentionDims, block_tables, kv_lens, cu_q_lens=None):
    """Host value checks of a paged_attention call."""
    return check_ragged_values(dims, block_tables, kv_lens, cu_q_lens)


@dataclass(frozen=True)
class SharedPrefixDims:
    attention: AttentionDims
    num_prefixes: int
    max_prefix_blocks: int


def check_shared_prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens,
                                  prefix_ids, block_tables, kv_lens, cu_q_lens=None, *,
                                  scale=None, logits_soft_cap=None,
                                  return_lse=False, sinks=None,
                                  sliding_window=None, k_scale=None,
                                  v_scale=None, kv_layout: str = "NHD") -> SharedPrefixDims:
    """Static checks of a shared_prefix_attention call."""
    dims = check_paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens,
                                 scale=scale, logits_soft_cap=logits_soft_cap,
                                 return_lse=return_lse, sinks=sinks,
                                 sliding_window=sliding_window, k_scale=k_scale,
                                 v_scale=v_scale, kv_layout=kv_layout)
    num_prefixes, max_prefix_blocks = check_index("prefix_block_tables", prefix_block_tables,
                                                  ndim=2)
    (n_lens,) = check_index("prefix_lens", prefix_lens)
    if n_lens != num_prefixes:
        raise ValueError(f"prefix_lens: expected shape ({num_prefixes},) (num_prefixes from "
                         f"prefix_block_tables), got ({n_lens},)")
    (n_ids,) = check_index("prefix_ids", prefix_ids)
    if n_ids != dims.num_seqs:
        raise ValueError(f"prefix_ids: expected shape ({dims.num_seqs},) (num_seqs), "
                         f"got ({n_ids},)")
    return SharedPrefixDims(dims, num_prefixes, max_prefix_blocks)


def check_shared_prefix_attention_values(sdims: SharedPrefixDims, prefix_block_tables,
                                         prefix_lens, prefix_ids, block_tables, kv_lens,
                                         cu_q_lens=None):
    """Host value checks; returns (prefix_lens, prefix_ids, kv_lens, cu_q_lens) as numpy."""
    dims = sdims.attention
    kv, cu = check_ragged_values(dims, block_tables, kv_lens, cu_q_lens)
    plens = to_host(prefix_lens).astype(np.int64)
    pids = to_host(prefix_ids).astype(np.int64)
    table = to_host(prefix_block_tables)
    if _small_prefixes_ok(plens, pids, table, sdims):
        return plens, pids, kv, cu
    bs = dims.block_size
    if (plens < 0).any() or (plens % bs).any():
        s = int(np.argmax((plens < 0) | (plens % bs != 0)))
        raise ValueError(f"prefix_lens: expected non-negative multiples of block_size ({bs}), "
                         f"got {int(plens[s])} at index {s}")
    capacity = sdims.max_prefix_blocks * bs
    if (plens > capacity).any():
        s = int(np.argmax(plens > capacity))
        raise ValueError(f"prefix_lens: expected values <= max_prefix_blocks * block_size "
                         f"({capacity}), got {int(plens[s])} at index {s}")
    _check_ids_in_range("prefix_ids", pids, sdims.num_prefixes, lower=-1)
    _check_used_blocks("prefix_block_tables", table, plens, bs, dims.num_blocks)
    return plens, pids, kv, cu


def _small_prefixes_ok(plens: np.ndarray, pids: np.ndarray, table: np.ndarray,
                       sdims: SharedPrefixDims) -> bool:
    """True when a small cascade's prefix metadata passes the checks of
    check_shared_prefix_attention_values (as _small_ragged_ok for the sequences: the numpy
    checks cost ~35 us of a small call); False when it is not small or fails one, and the
    numpy checks that name the first bad entry run. Same verdict."""
    if (table.size > SMALL_BATCH_ENTRIES or pids.size > SMALL_BATCH_ENTRIES
            or plens.size != table.shape[0]):
        return False
    bs, num_blocks = sdims.attention.block_size, sdims.attention.num_blocks
    capacity = sdims.max_prefix_blocks * bs
    if not all(-1 <= p < sdims.num_prefixes for p in pids.tolist()):
        return False
    for n, row in zip(plens.tolist(), table.tolist(), strict=True):
        if n < 0 or n % bs or n > capacity:
            return False
        if not _ids_ok(row[:n // bs], num_blocks):
            return False
    return True


def check_merge_attention_states(out_a, lse_a, out_b, lse_b) -> tuple[int, int, int]:
    """out_*: [num_tokens, num_heads, head_dim] float; lse_*: f32[num_tokens, num_heads]."""
    shape = check_array("out_a", out_a, ndim=3, dtypes=FLOAT_DTYPES)
    check_array("out_b", out_b, ndim=3, dtypes=FLOAT_DTYPES)
    check_same_shape("out_b", out_b, "out_a", out_a)
    check_same_dtype("out_b", out_b, "out_a", out_a)
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        lse_shape = check_array(name, lse, ndim=2, dtypes=("float32",))
        if lse_shape != shape[:2]:
            raise ValueError(f"{name}: expected shape {shape[:2]} (num_tokens, num_heads of "
                             f"out_a), got {lse_shape}")
    return shape


# --------------------------------------------------------------------------------- cache checks


def check_write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None,
                   v_scale=None, kv_layout: str = "NHD") -> int:
    """Static checks of write_kv; returns the number of tokens written (len(slot_mapping)).

    key/value may hold more rows than slot_mapping (CUDA-graph padding); the extra rows are
    ignored, as in vLLM's reshape_and_cache_flash. key/value hold the caches' dtype, or any
    float dtype (both the same) for float8_e4m3fn caches, which store them through
    k_scale/v_scale. ``kv_layout``: as :data:`KV_LAYOUTS`.
    """
    _, _, num_kv_heads, head_dim = check_kv_caches(k_cache, v_cache, kv_layout)
    shape = check_array("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    check_array("value", value, ndim=3, dtypes=FLOAT_DTYPES)
    check_same_shape("value", value, "key", key)
    if is_fp8(k_cache):
        check_same_dtype("value", value, "key", key)
    else:
        check_same_dtype("key", key, "k_cache", k_cache)
        check_same_dtype("value", value, "v_cache", v_cache)
    check_kv_scale("k_scale", k_scale, k_cache)
    check_kv_scale("v_scale", v_scale, v_cache)
    if shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"key: expected [num_tokens, {num_kv_heads}, {head_dim}] "
                         f"(num_kv_heads, head_dim of k_cache), got {shape}")
    (n,) = check_ids("slot_mapping", slot_mapping)
    if n > shape[0]:
        raise ValueError(f"slot_mapping: expected at most num_tokens ({shape[0]}) entries, "
                         f"got {n}")
    return n


def check_write_kv_values(k_cache, slot_mapping, kv_layout: str = "NHD") -> np.ndarray:
    num_blocks, block_size = cache_dims(k_cache, kv_layout)[:2]
    num_slots = num_blocks * block_size
    if getattr(slot_mapping, "ndim", None) == 1 and len(slot_mapping) <= SMALL_BATCH_ENTRIES:
        # a decode step's few slots: the verdict from a list (read straight from a torch or
        # jax array: 3.1 -> 2.3 us a call, its numpy copy gone)
        vals = slot_mapping.tolist()
        live = [s for s in vals if s >= 0]
        if (not live or max(live) < num_slots) and len(set(live)) == len(live):
            return np.asarray(vals, dtype=np.int64).reshape(len(vals))
    slots = to_host(slot_mapping).astype(np.int64)
    live = slots[slots >= 0]
    if live.size and live.max() >= num_slots:
        i = int(np.argmax(slots >= num_slots))
        raise ValueError(f"slot_mapping: expected slots < num_blocks * block_size ({num_slots}) "
                         f"or negative (skip), got {int(slots[i])} at index {i}")
    _check_no_duplicates("slot_mapping", live)
    return slots


def check_caches(caches, name: str = "caches") -> list:
    """A non-empty sequence of arrays sharing the block axis (axis 0)."""
    if isinstance(caches, (str, bytes)) or not isinstance(caches, Sequence):
        raise TypeError(f"{name}: expected a list or tuple of arrays, got {type(caches).__name__}")
    if len(caches) == 0:
        raise ValueError(f"{name}: expected at least one cache, got an empty sequence")
    num_blocks = None
    for i, c in enumerate(caches):
        shape = check_array(f"{name}[{i}]", c)
        if len(shape) < 1:
            raise ValueError(f"{name}[{i}]: expected the block axis first, got a scalar")
        if num_blocks is None:
            num_blocks = shape[0]
        elif shape[0] != num_blocks:
            raise ValueError(f"{name}[{i}]: expected {num_blocks} blocks (from {name}[0]), "
                             f"got {shape[0]}")
    return list(caches)


def _no_ids_over_no_blocks(name: str, n: int, num_blocks: int, caches: str = "caches") -> None:
    """Ids over caches of no block are out of range whatever their values: refused statically
    (traced ids too; the XLA path's take from an empty axis raised an IndexError naming
    nothing)."""
    if n and not num_blocks:
        raise ValueError(f"{name}: expected values in [0, 0) ({caches} hold no block), got "
                         f"{n} ids")


def check_copy_blocks(caches, src, dst) -> int:
    caches = check_caches(caches)
    (n,) = check_ids("src", src)
    (n_dst,) = check_ids("dst", dst)
    if n_dst != n:
        raise ValueError(f"dst: expected shape ({n},) (the shape of src), got ({n_dst},)")
    _no_ids_over_no_blocks("src", n, _shape(caches[0])[0])
    return int(caches[0].shape[0])


def check_copy_blocks_values(num_blocks: int, src, dst) -> tuple[np.ndarray, np.ndarray]:
    s, d = to_host(src).astype(np.int64), to_host(dst).astype(np.int64)
    _check_ids_in_range("src", s, num_blocks)
    _check_ids_in_range("dst", d, num_blocks)
    _check_no_duplicates("dst", d)
    return s, d


def _check_uniform_caches(caches) -> tuple[tuple[int, ...], str]:
    caches = check_caches(caches)
    block_shape = _shape(caches[0])[1:]
    for i, c in enumerate(caches[1:], 1):
        if _shape(c)[1:] != block_shape:
            raise ValueError(f"caches[{i}]: expected block shape {block_shape} (from caches[0]) "
                             f"to stack into one buffer, got {_shape(c)[1:]}")
        check_same_dtype(f"caches[{i}]", c, "caches[0]", caches[0])
    return block_shape, dtype_name(caches[0])


def check_gather_blocks(caches, block_ids) -> tuple[int, ...]:
    """Returns the buffer shape [n, len(caches), *block_shape]."""
    block_shape, _ = _check_uniform_caches(caches)
    (n,) = check_ids("block_ids", block_ids)
    _no_ids_over_no_blocks("block_ids", n, _shape(caches[0])[0])
    return (n, len(caches), *block_shape)


def check_scatter_blocks(caches, buffer, block_ids) -> tuple[int, ...]:
    block_shape, _ = _check_uniform_caches(caches)
    (n,) = check_ids("block_ids", block_ids)
    _no_ids_over_no_blocks("block_ids", n, _shape(caches[0])[0])
    want = (n, len(caches), *block_shape)
    check_array("buffer", buffer)
    if _shape(buffer) != want:
        raise ValueError(f"buffer: expected shape {want} ([len(block_ids), len(caches), "
                         f"*block_shape]), got {_shape(buffer)}")
    check_same_dtype("buffer", buffer, "caches[0]", caches[0])
    return want


def check_block_ids_values(num_blocks: int, block_ids, *, distinct: bool) -> np.ndarray:
    ids = to_host(block_ids).astype(np.int64)
    _check_ids_in_range("block_ids", ids, num_blocks)
    if distinct:
        _check_no_duplicates("block_ids", ids)
    return ids


def check_swap_blocks(src_caches, dst_caches, src_ids, dst_ids) -> int:
    """Static checks of swap_blocks (device <-> host copies); returns the number of blocks.

    src_caches, dst_caches: sequences of arrays with the block axis first, pairwise of the same
    block shape and dtype (their block counts may differ: a device cache and its host twin).
    """
    src = check_caches(src_caches, "src_caches")
    dst = check_caches(dst_caches, "dst_caches")
    if len(src) != len(dst):
        raise ValueError(f"dst_caches: expected {len(src)} caches (as src_caches), got {len(dst)}")
    for i, (a, b) in enumerate(zip(src, dst, strict=True)):
        if _shape(a)[1:] != _shape(b)[1:]:
            raise ValueError(f"dst_caches[{i}]: expected block shape {_shape(a)[1:]} "
                             f"(from src_caches[{i}]), got {_shape(b)[1:]}")
        check_same_dtype(f"dst_caches[{i}]", b, f"src_caches[{i}]", a)
    (n,) = check_ids("src_ids", src_ids)
    (n_dst,) = check_ids("dst_ids", dst_ids)
    if n_dst != n:
        raise ValueError(f"dst_ids: expected shape ({n},) (the shape of src_ids), got ({n_dst},)")
    _no_ids_over_no_blocks("src_ids", n, _shape(src[0])[0], "src_caches")
    _no_ids_over_no_blocks("dst_ids", n, _shape(dst[0])[0], "dst_caches")
    return n


def check_swap_blocks_values(src_caches, dst_caches, src_ids,
                             dst_ids) -> tuple[np.ndarray, np.ndarray]:
    s = to_host(src_ids).astype(np.int64)
    d = to_host(dst_ids).astype(np.int64)
    _check_ids_in_range("src_ids", s, int(src_caches[0].shape[0]))
    _check_ids_in_range("dst_ids", d, int(dst_caches[0].shape[0]))
    _check_no_duplicates("dst_ids", d)
    return s, d


# ---- hashing checks
# (owned by the hashing helper; prefixkv-v1 and compatibility block hashes, docs/hashing.md)


@dataclass(frozen=True)
class HashBlocksDims:
    """Sizes read off a hash_blocks call's arguments (static: shapes, dtypes, Python scalars).

    parent_kind: "none" (32 zero bytes), "shared" (one parent for every sequence: 32 bytes or
    u32[8]) or "per_seq" (u32[num_seqs, 8] or a list of num_seqs entries, 32 bytes or None).
    num_full_blocks is None when it depends on cu_lens values (ragged); the value check
    returns it.
    """

    num_tokens: int
    num_seqs: int
    block_size: int
    salt: bytes
    has_extra: bool
    parent_kind: str
    num_full_blocks: int | None


def _check_digest_bytes(name: str, value) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected 32 bytes, got {type(value).__name__}")
    if len(bytes(value)) != 32:
        raise ValueError(f"{name}: expected 32 bytes, got {len(bytes(value))}")


def check_hash_blocks(tokens, block_size, *, cu_lens=None, salt=None, extra=None,
                      parent=None) -> HashBlocksDims:
    """Static checks of a hash_blocks call.

    tokens: i32[num_tokens]. block_size: int >= 1. cu_lens: i32[num_seqs + 1] or None (one
    sequence). salt: str | bytes | None. extra: u32[num_full_blocks, 4] or None.
    parent: None | 32 bytes | u32[8] | u32[num_seqs, 8] | list of num_seqs (32 bytes or None).
    """
    (num_tokens,) = check_array("tokens", tokens, ndim=1, dtypes=(INDEX_DTYPE,))
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    check_int32("block_size", block_size)
    block_size = int(block_size)
    if cu_lens is None:
        num_seqs = 1
    else:
        (n_cu,) = check_index("cu_lens", cu_lens)
        if n_cu < 1:
            raise ValueError("cu_lens: expected shape (num_seqs + 1,) with at least one entry, "
                             "got (0,)")
        num_seqs = n_cu - 1
    if salt is None:
        salt_b = b""
    elif isinstance(salt, str):
        try:
            salt_b = salt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"salt: expected a str UTF-8 can encode, got {salt!r:.60} "
                             f"({e.reason} at index {e.start})") from None
    elif isinstance(salt, (bytes, bytearray, memoryview)):
        salt_b = bytes(salt)
    else:
        raise TypeError(f"salt: expected str, bytes or None, got {type(salt).__name__}")
    num_full_blocks = num_tokens // block_size if cu_lens is None else None
    if extra is not None:
        rows, width = check_array("extra", extra, ndim=2, dtypes=("uint32",))
        if width != 4:
            raise ValueError(f"extra: expected shape (num_full_blocks, 4), got {(rows, width)}")
        if num_full_blocks is not None and rows != num_full_blocks:
            raise ValueError(f"extra: expected {num_full_blocks} rows (num_tokens // "
                             f"block_size = {num_tokens} // {block_size}), got {rows}")
    if parent is None:
        parent_kind = "none"
    elif isinstance(parent, (bytes, bytearray, memoryview)):
        _check_digest_bytes("parent", parent)
        parent_kind = "shared"
    elif isinstance(parent, (list, tuple)):
        if len(parent) != num_seqs:
            raise ValueError(f"parent: expected a list of num_seqs ({num_seqs}) entries, "
                             f"got {len(parent)}")
        for s, p in enumerate(parent):
            if p is not None:
                _check_digest_bytes(f"parent[{s}]", p)
        parent_kind = "per_seq"
    else:
        shape = check_array("parent", parent, dtypes=("uint32",))
        if shape == (8,):
            parent_kind = "shared"
        elif shape == (num_seqs, 8):
            parent_kind = "per_seq"
        else:
            raise ValueError(f"parent: expected 32 bytes, u32[8] or u32[num_seqs, 8] "
                             f"(num_seqs={num_seqs}), got shape {shape}")
    return HashBlocksDims(num_tokens=num_tokens, num_seqs=num_seqs, block_size=block_size,
                          salt=salt_b, has_extra=extra is not None, parent_kind=parent_kind,
                          num_full_blocks=num_full_blocks)


def check_hash_blocks_values(dims: HashBlocksDims, tokens, *, cu_lens=None,
                             extra=None) -> tuple[np.ndarray, int]:
    """Host value checks of a hash_blocks call; returns (cu_lens as int64, num_full_blocks)."""
    if cu_lens is None:
        cu = np.array([0, dims.num_tokens], dtype=np.int64)
    else:
        cu = check_cumulative_lens("cu_lens", cu_lens, dims.num_tokens)
    tok = to_host(tokens)
    if tok.size and int(tok.min()) < 0:
        i = int(np.argmax(tok < 0))
        raise ValueError(f"tokens: expected token ids >= 0, got {int(tok[i])} at index {i}")
    num_full_blocks = int((np.diff(cu) // dims.block_size).sum())
    if extra is not None and int(extra.shape[0]) != num_full_blocks:
        raise ValueError(f"extra: expected {num_full_blocks} rows (the full blocks of all "
                         f"sequences), got {int(extra.shape[0])}")
    return cu, num_full_blocks


#: Block-hash algorithms of prefixkv.paged.hashing.hash_blocks (docs/hashing.md).
HASH_ALGOS = ("prefixkv-v1", "vllm-sha256-cbor", "vllm-sha256", "sglang-sha256", "dynamo-xxh3",
              "dynamo-kvbm")
#: vLLM's SHA-256 block hashes: of canonical CBOR (sha256_cbor) and of pickle (sha256).
VLLM_ALGOS = ("vllm-sha256-cbor", "vllm-sha256")


def _check_u64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int in [0, 2**64), got {type(value).__name__}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{name}: expected an int in [0, 2**64), got {value}")
    return int(value)


def check_hash_algo(algo, *, num_seqs: int, salt=None, extra=None, parent=None, seed=None,
                    lora=None) -> None:
    """The arguments each algorithm accepts (static). prefixkv-v1: salt, extra, parent (as in
    check_hash_blocks), no seed/lora. vllm-sha256-cbor and vllm-sha256: seed str, salt str
    (its cache_salt), lora (name, path), parent 32 bytes or a list of num_seqs (32 bytes or
    None).
    sglang-sha256: parent as for vllm. dynamo-xxh3: seed u64 only. dynamo-kvbm: seed u64 (its
    salt_hash) or salt str|bytes (not both), parent u64 or a list of num_seqs (u64 or None).
    """
    if not isinstance(algo, str) or algo not in HASH_ALGOS:
        raise ValueError(f"algo: expected one of {HASH_ALGOS}, got {algo!r}")
    if algo == "prefixkv-v1":
        if seed is not None:
            raise ValueError("seed: prefixkv-v1 takes no seed (use salt for a namespace)")
        if lora is not None:
            raise ValueError("lora: prefixkv-v1 takes no lora (pass the adapter identity in "
                             "extra)")
        return
    if extra is not None:
        raise ValueError(f"extra: only prefixkv-v1 takes extra, got it with algo={algo!r}")
    if lora is not None and algo not in VLLM_ALGOS:
        raise ValueError(f"lora: only {' and '.join(VLLM_ALGOS)} take lora, got it with "
                         f"algo={algo!r}")
    if salt is not None and algo in ("sglang-sha256", "dynamo-xxh3"):
        raise ValueError(f"salt: {algo} has no salt, got {salt!r}")
    if parent is not None and algo == "dynamo-xxh3":
        raise ValueError("parent: dynamo-xxh3 hashes each block alone (no chain), got a parent")
    if algo in VLLM_ALGOS:
        if seed is not None and not isinstance(seed, str):
            raise TypeError(f"seed: expected a str (vLLM's seed is the string value of "
                            f"PYTHONHASHSEED, e.g. '0') or None, got {type(seed).__name__}")
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"salt: {algo} takes a str cache_salt, got "
                            f"{type(salt).__name__}")
        if lora is not None and (not isinstance(lora, (tuple, list)) or len(lora) != 2
                                 or not all(isinstance(x, str) for x in lora)):
            raise TypeError(f"lora: expected a (name, path) pair of str, got {lora!r}")
        if algo == "vllm-sha256-cbor":  # CBOR text strings are UTF-8 (pickle takes any str)
            for name, text in (("seed", seed), ("salt", salt), *(
                    (f"lora[{i}]", x) for i, x in enumerate(lora or ()))):
                try:
                    if text is not None:
                        text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{name}: expected a str UTF-8 can encode (CBOR text), "
                                     f"got {text!r:.40}") from None
    elif algo == "dynamo-xxh3" or algo == "dynamo-kvbm":
        if seed is not None:
            _check_u64("seed", seed)
        if algo == "dynamo-kvbm" and salt is not None:
            if seed is not None:
                raise ValueError("salt: dynamo-kvbm takes salt or seed (its salt_hash), not both")
            if not isinstance(salt, (str, bytes, bytearray)):
                raise TypeError(f"salt: expected str, bytes or None, got {type(salt).__name__}")
    if seed is not None and algo == "sglang-sha256":
        raise ValueError("seed: sglang-sha256 has no seed")
    if parent is None or algo == "prefixkv-v1":
        return
    items = list(parent) if isinstance(parent, (list, tuple)) else None
    if items is not None and len(items) != num_seqs:
        raise ValueError(f"parent: expected a list of num_seqs ({num_seqs}) entries, "
                         f"got {len(items)}")
    for i, p in enumerate(items if items is not None else [parent]):
        name = f"parent[{i}]" if items is not None else "parent"
        if p is None and items is not None:
            continue
        if algo == "dynamo-kvbm":
            _check_u64(name, p)
        else:
            _check_digest_bytes(name, p)
