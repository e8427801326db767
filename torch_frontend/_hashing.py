"""torch ``hash_blocks``: prefixkv-v1 block hashes (BLAKE3 keyed chain) on the tensors' device.

Spec (docs/hashing.md, reference ``prefixkv.paged.reference.hashing``)::

    key  = BLAKE3.derive_key("prefixkv v1 block hash", salt)      # on the host, 8 u32 words
           (context "prefixkv v1 block hash with extra words" for calls with extra)
    h_-1 = parent (32 zero bytes by default)
    h_i  = BLAKE3.keyed_hash(key, h_{i-1} || le_u32(tokens[i*B:(i+1)*B]) || extra_i)

Backends (registry ``HASH_BLOCKS_BACKENDS``, highest priority first):

* ``triton`` (cuda): ``prefixkv.kernels.triton.hashing``, one lane per sequence.
* ``cuda`` (cuda, needs cupy): ``prefixkv.kernels.cuda.hashing``, one thread per sequence.
* ``host`` (cpu): the host fast path ``prefixkv.paged.hashing.hash_blocks_words`` (compiled C).
* ``torch`` (cpu, cuda): vectorized torch ops (int64 masked to 32 bits), all sequences' chains
  side by side as lanes; any block size (chunk tree). Correct everywhere, slow on long chains
  (one torch op per step of the compression).

The kernels hash messages of one BLAKE3 chunk: block_size <= 248 (244 with ``extra``).
The op is ``torch.ops.prefixkv.hash_blocks_v1`` (a ``torch.library.custom_op`` with a fake
implementation, usable under ``torch.compile``); :func:`hash_blocks` wraps it.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from ..paged.hashing import kernel_supports, keyed_chain_digests
from ..paged.reference.hashing import (
    BLOCK_LEN,
    CHUNK_END,
    CHUNK_LEN,
    CHUNK_START,
    IV,
    KEYED_HASH,
    MSG_PERMUTATION,
    PARENT,
    ROOT,
    block_key,
    parent_words,
)
from ..paged.registry import Backend, Registry
from ..paged.validate import (
    check_cumulative_lens,
    check_hash_blocks,
    check_hash_blocks_values,
    value_checks_enabled,
)
from ._native import traced
from ._ops import _has_data

MASK = 0xFFFFFFFF


# ----------------------------------------------- lane-parallel BLAKE3 in torch (int64 lanes)
#
# Words are int64 tensors holding values in [0, 2**32). The state is four rows of four words
# (a = v0..3, b = v4..7, c = v8..11, d = v12..15), each [4, lanes], so a round is two vector
# G's with the rows b, c, d rotated by 1, 2, 3 words in between.

_PERM = list(MSG_PERMUTATION)


def _rotr(x, n: int):
    return ((x >> n) | (x << (32 - n))) & MASK


def _g4(a, b, c, d, mx, my):
    a = (a + b + mx) & MASK
    d = _rotr(d ^ a, 16)
    c = (c + d) & MASK
    b = _rotr(b ^ c, 12)
    a = (a + b + my) & MASK
    d = _rotr(d ^ a, 8)
    c = (c + d) & MASK
    b = _rotr(b ^ c, 7)
    return a, b, c, d


def compress_rows(cv: torch.Tensor, m: torch.Tensor, counter: int, block_len: int,
                  flags: int) -> torch.Tensor:
    """BLAKE3 compression lane by lane: cv int64[8, lanes], m int64[16, lanes] -> the new
    chaining value int64[8, lanes]."""
    lanes = cv.shape[1]
    a, b = cv[0:4], cv[4:8]
    c = torch.tensor(IV[:4], dtype=torch.int64, device=cv.device)[:, None].expand(4, lanes)
    d = torch.tensor([counter & MASK, counter >> 32, block_len, flags], dtype=torch.int64,
                     device=cv.device)[:, None].expand(4, lanes)
    for r in range(7):
        a, b, c, d = _g4(a, b, c, d, m[0:8:2], m[1:8:2])
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        a, b, c, d = _g4(a, b, c, d, m[8:16:2], m[9:16:2])
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
        if r < 6:
            m = m[_PERM]
    return torch.cat([a ^ c, b ^ d])


def _chunk_last(key, words, chunk_index: int, flags: int):
    n, lanes = words.shape
    nblocks = max(1, -(-n // 16))
    last_len = 4 * (n - 16 * (nblocks - 1))
    pad = words.new_zeros((16 * nblocks - n, lanes))
    blocks = torch.cat([words, pad]).reshape(nblocks, 16, lanes)
    cv = key[:, None].expand(8, lanes)
    for j in range(nblocks - 1):
        cv = compress_rows(cv, blocks[j], chunk_index, BLOCK_LEN,
                           flags | (CHUNK_START if j == 0 else 0))
    f = flags | CHUNK_END | (CHUNK_START if nblocks == 1 else 0)
    return cv, blocks[nblocks - 1], chunk_index, last_len, f


def _subtree_last(key, words, first_chunk: int, flags: int):
    chunk_words = CHUNK_LEN // 4
    n, lanes = words.shape
    if n <= chunk_words:
        return _chunk_last(key, words, first_chunk, flags)
    num_chunks = -(-n // chunk_words)
    left_chunks = 1 << ((num_chunks - 1).bit_length() - 1)
    split = left_chunks * chunk_words
    left = compress_rows(*_subtree_last(key, words[:split], first_chunk, flags))
    right = compress_rows(*_subtree_last(key, words[split:], first_chunk + left_chunks, flags))
    return key[:, None].expand(8, lanes), torch.cat([left, right]), 0, BLOCK_LEN, flags | PARENT


def keyed_hash_rows(key: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """BLAKE3 keyed_hash lane by lane: key int64[8], words int64[n, lanes] -> int64[8, lanes]."""
    cv, blk, counter, blen, f = _subtree_last(key, words, 0, KEYED_HASH)
    return compress_rows(cv, blk, counter, blen, f | ROOT)


def _to_u32_int64(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns -> int64 values in [0, 2**32)."""
    return x.to(torch.int64) & MASK


def hash_chain_torch(tok, cu_host: np.ndarray, boff: np.ndarray, parents, extra, key, out, *,
                     block_size: int) -> torch.Tensor:
    """The vectorized torch chain. tok int32[num_tokens]; cu_host/boff int64 numpy; parents
    int32[num_seqs, 8]; extra int32[num_out, 4] | None; key int32[8]; out int32[num_out, 8]."""
    device = tok.device
    nb = np.diff(cu_host) // block_size
    if out.shape[0] == 0 or nb.size == 0 or nb.max() == 0:
        return out
    tok64 = _to_u32_int64(tok)
    ext64 = None if extra is None else _to_u32_int64(extra)
    key64 = _to_u32_int64(key)
    h = _to_u32_int64(parents).T.contiguous()  # [8, num_seqs]
    start = torch.as_tensor(cu_host[:-1], device=device)
    nb_t = torch.as_tensor(nb, device=device)
    boff_t = torch.as_tensor(boff, device=device)
    offs = torch.arange(block_size, device=device)
    for i in range(int(nb.max())):
        # the lanes still in their chain: sequences with more than i full blocks
        lanes = torch.nonzero(nb_t > i).flatten() if (nb <= i).any() else None
        st = start if lanes is None else start[lanes]
        rows = boff_t + i if lanes is None else boff_t[lanes] + i
        idx = st[None, :] + i * block_size + offs[:, None]  # [block_size, lanes]
        hh = h if lanes is None else h[:, lanes]
        parts = [hh, tok64[idx]]
        if ext64 is not None:
            parts.append(ext64[rows].T)
        new = keyed_hash_rows(key64, torch.cat(parts))
        if lanes is None:
            h = new
        else:
            h[:, lanes] = new
        out[rows] = new.T.to(torch.int32)  # int64 [0, 2**32) -> int32 bit pattern
    return out


def _u32_to_i32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.uint32).view(np.int32)


# ------------------------------------------------------------------------------ backends


def _run_torch(tok, cu_host, boff, parents, extra, key, out, *, block_size, num_steps):
    del num_steps
    return hash_chain_torch(tok, cu_host, boff, parents, extra, key, out, block_size=block_size)


def _run_host(tok, cu_host, boff, parents, extra, key, out, *, block_size, num_steps):
    """The host path of prefixkv.paged.hashing (the compiled C chain, else the blake3
    package, else keyed BLAKE3 in Python: each faster than the vectorized torch ops on a CPU,
    the last ~12x at 64k tokens), writing into out."""
    del boff, num_steps
    digests = keyed_chain_digests(tok.numpy(), block_size, cu_host, key.numpy().tobytes(),
                                  None if extra is None else extra.numpy().view(np.uint32),
                                  parents.numpy().view(np.uint32), out.shape[0])
    out.copy_(torch.from_numpy(digests.view("<i4").astype(np.int32).reshape(-1, 8)))
    return out


def _run_triton(tok, cu_host, boff, parents, extra, key, out, *, block_size, num_steps):
    from ..kernels.triton.hashing import hash_blocks_triton

    dev = tok.device
    cu = torch.as_tensor(cu_host.astype(np.int32), device=dev)
    bo = torch.as_tensor(boff.astype(np.int32), device=dev)
    return hash_blocks_triton(tok, cu, bo, parents, extra, key, out, block_size=block_size,
                              num_steps=num_steps)


def _run_cuda(tok, cu_host, boff, parents, extra, key, out, *, block_size, num_steps):
    from ..kernels.cuda.hashing import hash_blocks_cuda

    del num_steps
    dev = tok.device
    cu = torch.as_tensor(cu_host.astype(np.int32), device=dev)
    bo = torch.as_tensor(boff.astype(np.int32), device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    return hash_blocks_cuda(tok, cu, bo, parents, extra, key, out, block_size=block_size,
                            stream=stream, device=dev.index)


HASH_BLOCKS_BACKENDS = Registry("hash_blocks")
HASH_BLOCKS_BACKENDS.register(Backend(
    "triton", ("cuda",), _run_triton, priority=20, requires=("triton",),
    supports=kernel_supports, doc="Triton BLAKE3 chain kernel, one lane per sequence"))
HASH_BLOCKS_BACKENDS.register(Backend(
    "cuda", ("cuda",), _run_cuda, priority=15, requires=("cupy",), supports=kernel_supports,
    doc="CUDA C BLAKE3 chain kernel (CuPy RawModule), one thread per sequence"))
HASH_BLOCKS_BACKENDS.register(Backend(
    "host", ("cpu",), _run_host, priority=10,
    doc="the host path of prefixkv.paged.hashing (compiled C, else blake3, else Python)"))
HASH_BLOCKS_BACKENDS.register(Backend(
    "torch", ("cpu", "cuda"), _run_torch, priority=0,
    doc="vectorized torch ops (int64 lanes), any block size"))


def _constant_to_compile(fn):
    """``torch.compiler.assume_constant_result(fn)``: dynamo runs ``fn`` on the host while
    tracing and keeps its result as a constant. That decorator imports torch._dynamo (about
    as long as importing torch itself) only to set one attribute of ``fn``; this sets the
    same one (as torch 2.11 to 2.13 do: tests/test_hashing_torch.py compares it with the
    decorator's and compiles each marked function), so a program that imports this frontend
    and never compiles does not pay for dynamo."""
    fn._dynamo_marked_constant = True
    return fn


def _key_tensor(salt: bytes, extra: bool) -> torch.Tensor:
    """The salt's prefixkv-v1 key (of calls with extra words when ``extra``) as int32[8]
    (uint32 bit patterns, little-endian words)."""
    return torch.tensor(_key_words(salt, extra), dtype=torch.int32)


@_constant_to_compile
def _key_words(salt: bytes, extra: bool) -> tuple[int, ...]:
    """The key's 8 words as int32 values (uint32 bit patterns). A constant to torch.compile:
    run on the host when tracing (BLAKE3 in Python is not traceable); a call with another salt
    traces again (the salt is a guarded Python constant)."""
    return struct.unpack("<8i", block_key(salt, extra))


@_constant_to_compile
def _checked_salt(salt, parent, num_seqs: int) -> bytes:
    """check_hash_blocks' checks of salt and a host parent (bytes or a list) of a call of
    ``num_seqs`` sequences; returns the salt's bytes. A constant to torch.compile, which
    cannot trace those checks (``bytes(...)``): run on the host when tracing."""
    cu = np.zeros(num_seqs + 1, dtype=np.int32)
    return check_hash_blocks(cu[:0], 1, cu_lens=cu, salt=salt, parent=parent).salt


@_constant_to_compile
def _parent_rows(parent, num_seqs: int) -> tuple[tuple[int, ...], ...]:
    """parent_words of a host parent (bytes or a list; validated) as int32 values, a constant
    to torch.compile as :func:`_key_words` is."""
    return tuple(map(tuple, _u32_to_i32(parent_words(parent, num_seqs)).tolist()))


def _geometry(cu_host: np.ndarray, block_size: int) -> tuple[np.ndarray, int, int]:
    nb = np.diff(cu_host) // block_size
    boff = np.cumsum(nb) - nb
    return boff, int(nb.sum()), int(nb.max()) if nb.size else 0


# ---------------------------------------------------------------------------- custom op


@torch.library.custom_op("prefixkv::hash_blocks_v1", mutates_args=())
def hash_blocks_v1(tokens: torch.Tensor, block_size: int, cu_lens: torch.Tensor,
                   key: torch.Tensor, parents: torch.Tensor, extra: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """prefixkv-v1 chains. tokens i32[num_tokens]; cu_lens i32[num_seqs + 1] (validated);
    key i32[8] (the salt's key words as int32 bit patterns); parents i32[num_seqs, 8];
    extra i32[num_out, 4] | None. Returns i32[num_out, 8] (uint32 bit patterns).

    cu_lens (read on the host here anyway: it sizes the output) and the rows of extra are
    checked on every call, whoever called (a ValueError naming them): the wrapper checks no
    values while torch.compile traces, and a kernel must never read past the tokens."""
    cu_host = check_cumulative_lens("cu_lens", cu_lens.detach().cpu().numpy(),
                                    tokens.shape[0])
    boff, num_out, num_steps = _geometry(cu_host, block_size)
    if extra is not None and extra.shape[0] != num_out:
        raise ValueError(f"extra: expected {num_out} rows (the full blocks of all sequences), "
                         f"got {extra.shape[0]}")
    platform = "cuda" if tokens.device.type == "cuda" else tokens.device.type
    impl = HASH_BLOCKS_BACKENDS.select(platform, backend, block_size=block_size,
                                       has_extra=extra is not None).load()
    dev = tokens.device
    out = torch.zeros((num_out, 8), dtype=torch.int32, device=dev)
    return impl(tokens.contiguous(), cu_host, boff, parents.to(dev).contiguous(),
                None if extra is None else extra.to(dev).contiguous(), key.to(dev), out,
                block_size=block_size, num_steps=num_steps)


@hash_blocks_v1.register_fake
def _(tokens, block_size, cu_lens, key, parents, extra=None, backend=None):
    n = extra.shape[0] if extra is not None else torch.library.get_ctx().new_dynamic_size()
    return tokens.new_empty((n, 8))


def hash_blocks(tokens: torch.Tensor, block_size: int, *, cu_lens: torch.Tensor | None = None,
                salt: str | bytes | None = None, extra: torch.Tensor | None = None,
                parent=None, backend: str | None = None) -> torch.Tensor:
    """prefixkv-v1 hashes of the full blocks of each sequence, on the tokens' device.

    tokens: int32[num_tokens], ids >= 0.
    block_size: int >= 1.
    cu_lens: int32[num_seqs + 1] or None (one sequence): 0, non-decreasing, num_tokens.
    salt: str | bytes | None, the namespace.
    extra: uint32[num_full_blocks, 4] or None; row j joins the message of output block j.
    parent: None (32 zero bytes) | 32 bytes | uint32[8] | uint32[num_seqs, 8] | list of
        num_seqs entries (32 bytes or None).
    backend: "triton" | "cuda" | "host" | "torch" | None (env, then priority).

    Returns uint32[num_full_blocks, 8] on the tokens' device, sequence by sequence; word k =
    digest bytes 4k..4k+3 little-endian. cu_lens is read on the host (a sync on CUDA) and
    checked there on every call; token ids are value-checked as the other ops' values are
    (host tensors by default, device ones in checked mode), never while torch.compile traces.
    Under ``torch.compile(fullgraph=True)`` the salt's key and a bytes/list parent are traced
    as constants (computed on the host; another salt or parent traces again).
    """
    for name, t in (("tokens", tokens), ("cu_lens", cu_lens), ("extra", extra)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t is not None:
            _has_data(name, t)
    if not (parent is None or isinstance(parent, (bytes, bytearray, memoryview, list, tuple,
                                                  torch.Tensor))):
        raise TypeError(f"parent: expected None, 32 bytes, a list or a torch.Tensor, got "
                        f"{type(parent).__name__}")
    host_parent = parent is not None and not isinstance(parent, torch.Tensor)
    if not host_parent and parent is not None:
        _has_data("parent", parent)
    is_traced = traced(tokens, cu_lens, extra, None if host_parent else parent)
    if is_traced:  # the host arguments' checks as a traced constant
        dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens, extra=extra,
                                 parent=None if host_parent else parent)
        # the salt's checks need no sequence count: 1 unless a host parent is checked against
        # it (a symbolic count, from dynamic shapes, is no constant)
        salt_b = (_checked_salt(salt, parent, dims.num_seqs) if host_parent
                  else _checked_salt(salt, None, 1))
    else:
        dims = check_hash_blocks(tokens, block_size, cu_lens=cu_lens, salt=salt, extra=extra,
                                 parent=parent)
        salt_b = dims.salt
    dev = tokens.device
    # Traced inputs have no values: nothing is value-checked while torch.compile traces (the
    # op checks cu_lens and extra's rows itself when it runs); token ids in checked mode only
    if not is_traced and value_checks_enabled(
            host_inputs=dev.type == "cpu"):
        check_hash_blocks_values(dims, tokens, cu_lens=cu_lens, extra=extra)
    cu = torch.tensor([0, dims.num_tokens], dtype=torch.int32) if cu_lens is None else cu_lens
    if parent is None:
        parents = torch.zeros((dims.num_seqs, 8), dtype=torch.int32)
    elif not host_parent:
        parents = parent.reshape(-1, 8).view(torch.int32).expand(dims.num_seqs, 8)
    elif is_traced:
        parents = torch.tensor(_parent_rows(parent, dims.num_seqs), dtype=torch.int32)
    else:
        parents = torch.from_numpy(_u32_to_i32(parent_words(parent, dims.num_seqs)))
    ext = None if extra is None else extra.view(torch.int32)
    key = _key_tensor(salt_b, extra is not None)
    out = torch.ops.prefixkv.hash_blocks_v1(tokens, dims.block_size, cu, key,
                                            parents.contiguous(), ext, backend)
    return out.view(torch.uint32)
