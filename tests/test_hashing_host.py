"""prefixkv.paged.hash_blocks (prefixkv-v1): every host path bit-identical to the reference,
chain continuation, salts, partial tails, empty input, and one pytest.raises per input check."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prefixkv.kernels.cpu import hashing as cpu
from prefixkv.paged import hash_blocks
from prefixkv.paged.hashing import (
    HASH_ALGOS,
    digests_to_words,
    hash_blocks_words,
    host_backend,
    words_to_digests,
)
from prefixkv.paged.reference import hash_blocks_reference
from prefixkv.paged.reference.hashing import block_key, parent_words

blake3 = pytest.importorskip("blake3")


def test_extension_is_built():
    """CI installs from scratch: the C kernel must have been compiled (setup.py ext_modules)."""
    assert cpu.load_extension() is not None, "prefixkv.kernels.cpu._blake3 was not built"
    assert host_backend() == "c"
    assert cpu.simd() in ("avx2 x 8 lanes", "vector x 8 lanes", "scalar")


def test_c_derive_key_matches_reference():
    for salt in (b"", b"tenant-a", bytes(range(256)) * 9):  # the last one spans 3 chunks
        assert cpu.derive_key("prefixkv v1 block hash", salt) == block_key(salt)


def _random_batch(rng, num_seqs, max_len, block_size, *, with_extra, with_parent):
    lens = rng.integers(0, max_len + 1, num_seqs)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tokens = rng.integers(0, 2**31 - 1, int(cu[-1]), dtype=np.int64).astype(np.int32)
    nfb = int((lens // block_size).sum())
    extra = (rng.integers(0, 2**32, (nfb, 4), dtype=np.uint64).astype(np.uint32)
             if with_extra else None)
    parent = (rng.integers(0, 2**32, (num_seqs, 8), dtype=np.uint64).astype(np.uint32)
              if with_parent else None)
    return tokens, cu, extra, parent


def _c(tokens, block_size, cu, salt, extra, parent, use_lanes):
    nfb = int((np.diff(cu) // block_size).sum())
    out = cpu.chain_digests(tokens, block_size, cu, block_key(salt, extra is not None), extra,
                            parent_words(parent, len(cu) - 1), nfb, use_lanes=use_lanes)
    return out.view("<u4").astype(np.uint32).reshape(nfb, 8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_seqs=st.integers(1, 11),
       block_size=st.sampled_from([1, 2, 3, 7, 16, 33]), with_extra=st.booleans(),
       with_parent=st.booleans(), salt=st.sampled_from([None, "", "a", "tenant-b", b"\x00\xff"]))
def test_fast_paths_match_reference(seed, num_seqs, block_size, with_extra, with_parent, salt):
    rng = np.random.default_rng(seed)
    tokens, cu, extra, parent = _random_batch(rng, num_seqs, 3 * block_size + 2, block_size,
                                              with_extra=with_extra, with_parent=with_parent)
    want = hash_blocks_reference(tokens, block_size, cu_lens=cu, salt=salt, extra=extra,
                                 parent=parent)
    for lanes in (True, False):
        np.testing.assert_array_equal(_c(tokens, block_size, cu, salt, extra, parent, lanes),
                                      want)
    for backend in ("c", "blake3"):
        got = hash_blocks_words(tokens, block_size, cu_lens=cu, salt=salt, extra=extra,
                                parent=parent, backend=backend)
        np.testing.assert_array_equal(got, want)
    digests = hash_blocks(tokens, block_size, cu_lens=cu, salt=salt, extra=extra, parent=parent)
    assert all(type(d) is bytes and len(d) == 32 for d in digests)
    np.testing.assert_array_equal(digests_to_words(digests).reshape(-1, 8), want)


@pytest.mark.parametrize("block_size", [1, 16, 247, 248, 249, 256, 600, 1100])
def test_c_matches_blake3_package_large(block_size):
    """Many sequences (lanes refilled mid-batch), ragged, and messages past one chunk
    (block_size > 248 tokens -> more than 1024 bytes -> BLAKE3 tree)."""
    rng = np.random.default_rng(block_size)
    tokens, cu, extra, parent = _random_batch(rng, 19, 6 * block_size, block_size,
                                              with_extra=True, with_parent=True)
    want = hash_blocks_words(tokens, block_size, cu_lens=cu, salt="x", extra=extra,
                             parent=parent, backend="blake3")
    for lanes in (True, False):
        np.testing.assert_array_equal(_c(tokens, block_size, cu, "x", extra, parent, lanes),
                                      want)


def test_parent_continues_the_chain():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, 16 * 9 + 5).astype(np.int32)
    whole = hash_blocks(tokens, 16, salt="t")
    first = hash_blocks(tokens[:64], 16, salt="t")
    rest = hash_blocks(tokens[64:], 16, salt="t", parent=first[-1])
    assert first + rest == whole
    # the same continuation given as u32[8], as u32[num_seqs, 8] and as a list
    w = digests_to_words([first[-1]])
    assert hash_blocks(tokens[64:], 16, salt="t", parent=w[0]) == rest
    both = hash_blocks(np.concatenate([tokens[:64], tokens[64:]]), 16, salt="t",
                       cu_lens=np.array([0, 64, len(tokens)], np.int32),
                       parent=[None, first[-1]])
    assert both == first + rest
    per_seq = np.concatenate([np.zeros((1, 8), np.uint32), w])
    assert hash_blocks(tokens, 16, salt="t", cu_lens=np.array([0, 64, len(tokens)], np.int32),
                       parent=per_seq) == first + rest


def test_salts_isolate_and_share():
    tokens = np.arange(16 * 8, dtype=np.int32)
    by_salt = {s: hash_blocks(tokens, 16, salt=s) for s in (None, "a", "b", "A", "a ")}
    seen = {}
    for s, digests in by_salt.items():
        for d in digests:
            assert d not in seen, f"salt {s!r} shares a hash with salt {seen[d]!r}"
            seen[d] = s
    assert hash_blocks(tokens, 16, salt="a") == by_salt["a"]          # same salt shares
    assert hash_blocks(tokens, 16, salt=b"a") == by_salt["a"]         # str = its UTF-8
    assert hash_blocks(tokens, 16, salt="") == by_salt[None]          # "" = shared namespace
    assert hash_blocks(tokens, 16, salt="é") == hash_blocks(tokens, 16, salt="é".encode())


def test_prefix_property_and_partial_tail():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1000, 16 * 3 + 7).astype(np.int32)
    b = a.copy()
    b[-3:] += 1                                   # change only the partial tail
    assert len(hash_blocks(a, 16)) == 3
    assert hash_blocks(a, 16) == hash_blocks(b, 16) == hash_blocks(a[:48], 16)
    c = a.copy()
    c[20] += 1                                    # change block 1: blocks 1.. differ, 0 same
    ha, hc = hash_blocks(a, 16), hash_blocks(c, 16)
    assert ha[0] == hc[0] and ha[1] != hc[1] and ha[2] != hc[2]


def test_extra_changes_only_its_block_onward():
    tokens = np.arange(48, dtype=np.int32)
    e0 = np.zeros((3, 4), np.uint32)
    e1 = e0.copy()
    e1[1, 3] = 1
    h0, h1 = hash_blocks(tokens, 16, extra=e0), hash_blocks(tokens, 16, extra=e1)
    assert h0[0] == h1[0] and h0[1] != h1[1] and h0[2] != h1[2]
    assert hash_blocks(tokens, 16) != h0          # extra of zeros still differs from none


def test_empty_inputs():
    empty = np.zeros(0, np.int32)
    assert hash_blocks(empty, 16) == []
    assert hash_blocks(np.arange(15, dtype=np.int32), 16) == []
    assert hash_blocks_words(empty, 16).shape == (0, 8)
    assert hash_blocks(empty, 4, cu_lens=np.zeros(1, np.int32)) == []
    assert hash_blocks(empty, 4, cu_lens=np.zeros(3, np.int32)) == []
    assert hash_blocks(empty, 4, extra=np.zeros((0, 4), np.uint32)) == []
    # empty sequences between full ones are skipped, order kept
    tok = np.arange(8, dtype=np.int32)
    got = hash_blocks(tok, 4, cu_lens=np.array([0, 0, 4, 4, 8, 8], np.int32))
    assert got == hash_blocks(tok[:4], 4) + hash_blocks(tok[4:], 4)


def test_lists_and_noncontiguous_inputs():
    tok = np.arange(64, dtype=np.int32)
    assert hash_blocks(list(range(0, 64, 2)), 8) == hash_blocks(tok[::2], 8)
    assert hash_blocks(tok[::2].copy(), 8, cu_lens=[0, 16, 32]) == hash_blocks(
        tok[::2], 8, cu_lens=np.array([0, 16, 32], np.int32))


def test_words_digests_helpers():
    d = hash_blocks(np.arange(32, dtype=np.int32), 16)
    w = digests_to_words(d)
    assert w.dtype == np.uint32 and w.shape == (2, 8)
    assert words_to_digests(w) == d
    np.testing.assert_array_equal(hash_blocks_words(np.arange(32, dtype=np.int32), 16), w)
    assert "prefixkv-v1" in HASH_ALGOS
    with pytest.raises(ValueError, match="backend: expected 'c', 'blake3', 'reference' or "
                                         "None, got 'C'"):
        hash_blocks_words(np.arange(32, dtype=np.int32), 16, backend="C")


TOK = np.arange(32, dtype=np.int32)
CU = np.array([0, 16, 32], np.int32)
BAD = [
    ({"tokens": TOK.astype(np.int64)}, TypeError, "tokens: expected int32, got int64"),
    ({"tokens": TOK.reshape(2, 16)}, ValueError, "tokens: expected 1 dimensions"),
    ({"tokens": np.array([1, -5, 2], np.int32)}, ValueError, "tokens: expected token ids >= 0"),
    ({"tokens": [1, 2**31]}, ValueError, "tokens: expected values that fit int32"),
    ({"tokens": "abc"}, TypeError, "tokens: expected an int32 array"),
    ({"block_size": 0}, ValueError, "block_size: expected >= 1, got 0"),
    ({"block_size": 16.0}, TypeError, "block_size: expected an int, got float"),
    ({"block_size": True}, TypeError, "block_size: expected an int, got bool"),
    ({"cu_lens": CU.astype(np.int64)}, TypeError, "cu_lens: expected int32, got int64"),
    ({"cu_lens": np.zeros(0, np.int32)}, ValueError, "cu_lens: expected shape"),
    ({"cu_lens": np.array([1, 16, 32], np.int32)}, ValueError, r"cu_lens: expected cu_lens\[0\]"),
    ({"cu_lens": np.array([0, 20, 16, 32], np.int32)}, ValueError,
     "cu_lens: expected non-decreasing values, got 20 then 16 at index 1"),
    ({"cu_lens": np.array([0, 16, 31], np.int32)}, ValueError,
     r"cu_lens: expected cu_lens\[-1\] == num_tokens \(32\), got 31"),
    ({"salt": 7}, TypeError, "salt: expected str, bytes or None, got int"),
    ({"salt": "a\ud800"}, ValueError, "salt: expected a str UTF-8 can encode"),
    ({"extra": np.zeros((2, 4), np.int32)}, TypeError, "extra: expected uint32, got int32"),
    ({"extra": np.zeros((2, 3), np.uint32)}, ValueError, r"extra: expected shape \(num_full_b"),
    ({"extra": np.zeros((3, 4), np.uint32)}, ValueError, "extra: expected 2 rows"),
    ({"extra": np.zeros((3, 4), np.uint32), "cu_lens": CU}, ValueError,
     r"extra: expected 2 rows \(the full blocks of all sequences\), got 3"),
    ({"parent": b"\x00" * 31}, ValueError, "parent: expected 32 bytes, got 31"),
    ({"parent": "00" * 32}, TypeError, "parent: expected an array, got str"),
    ({"parent": np.zeros(8, np.int32)}, TypeError, "parent: expected uint32, got int32"),
    ({"parent": np.zeros((3, 8), np.uint32), "cu_lens": CU}, ValueError,
     r"parent: expected 32 bytes, u32\[8\] or u32\[num_seqs, 8\] \(num_seqs=2\)"),
    ({"parent": [None], "cu_lens": CU}, ValueError,
     r"parent: expected a list of num_seqs \(2\) entries, got 1"),
    ({"parent": [None, b"x"], "cu_lens": CU}, ValueError, r"parent\[1\]: expected 32 bytes"),
    ({"algo": "md5"}, ValueError, "algo: expected one of"),
    ({"seed": 1}, ValueError, "seed: prefixkv-v1 takes no seed"),
    ({"lora": ("a", "b")}, ValueError, "lora: prefixkv-v1 takes no lora"),
    # Python sequences: ints only (no float truncation, digit strings or nesting)
    ({"tokens": [0.5, 1.7, 2.2, 3.9]}, TypeError,
     r"tokens: expected a sequence of ints, got an item of type float \(0.5\)"),
    ({"tokens": ["0", "1", "2", "3"]}, TypeError, "tokens: expected a sequence of ints"),
    ({"tokens": [[0, 1], [2, 3]]}, TypeError, "tokens: expected a sequence of ints"),
    ({"tokens": [True, 1]}, TypeError, "tokens: expected a sequence of ints"),
    ({"tokens": list(range(32)), "cu_lens": [0, 8.9, 32]}, TypeError,
     "cu_lens: expected a sequence of ints"),
    # past 64 bits: the range error, not numpy's OverflowError naming nothing
    ({"tokens": [2**63, 1]}, ValueError, "tokens: expected values that fit int32"),
    ({"tokens": [np.uint64(2**64 - 1)]}, ValueError, "tokens: expected values that fit int32"),
    ({"tokens": list(range(32)), "cu_lens": [0, 2**63]}, ValueError,
     "cu_lens: expected values that fit int32"),
    # multimodal items that could not be hashed: named when checked
    ({"mm_items": [(0, 4, "\ud800")]}, ValueError,
     r"mm_items\[0\]: identifier: expected a str UTF-8 can encode"),
    ({"mm_items": [(0, 2**64, "a")]}, ValueError,
     r"mm_items\[0\]: offset and length: expected 64-bit values"),
    ({"mm_items": [(-2**63 - 1, 4, "a")]}, ValueError,
     r"mm_items\[0\]: offset and length: expected 64-bit values"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input(kwargs, exc, match):
    args = {"tokens": TOK, "block_size": 16, **kwargs}
    tokens, block_size = args.pop("tokens"), args.pop("block_size")
    with pytest.raises(exc, match=match):
        hash_blocks(tokens, block_size, **args)


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD[:3] + BAD[5:8] + BAD[8:25],
                         ids=[m[:40] for _, _, m in BAD[:3] + BAD[5:8] + BAD[8:25]])
def test_reference_bad_input(kwargs, exc, match):
    """The reference runs the same checks (it is what the device helper tests against)."""
    args = {"tokens": TOK, "block_size": 16, **kwargs}
    tokens, block_size = args.pop("tokens"), args.pop("block_size")
    with pytest.raises(exc, match=match):
        hash_blocks_reference(tokens, block_size, **args)


def test_fallbacks_without_the_extension(monkeypatch):
    """Without the compiled kernel: the blake3 package; without that too: the reference."""
    tokens = np.arange(16 * 5 + 3, dtype=np.int32)
    cu = np.array([0, 40, len(tokens)], np.int32)
    want = hash_blocks(tokens, 16, cu_lens=cu, salt="f")
    monkeypatch.setattr(cpu, "load_extension", lambda: None)
    assert host_backend() == "blake3"
    assert cpu.simd() == "missing"
    assert hash_blocks(tokens, 16, cu_lens=cu, salt="f") == want
    monkeypatch.setitem(__import__("sys").modules, "blake3", None)
    assert host_backend() == "reference"
    assert hash_blocks(tokens, 16, cu_lens=cu, salt="f") == want
    # asked for by name without the package: the extra named (was a bare ModuleNotFoundError)
    with pytest.raises(ImportError, match=r"backend: 'blake3' needs .*prefixkv\[hash\]"):
        hash_blocks_words(tokens, 16, cu_lens=cu, salt="f", backend="blake3")


def test_the_prefix_caches_unchecked_chain_is_hash_blocks():
    """v1_hashes_trusted (PrefixCache's calls, with no public checks) gives hash_blocks'
    digests for every salt, parent, block size and partial tail."""
    from prefixkv.paged.hashing import v1_hashes_trusted
    from prefixkv.paged.spec import salt_bytes

    rng = np.random.default_rng(11)
    for i in range(300):
        bs, n = int(rng.integers(1, 40)), int(rng.integers(0, 300))
        toks = rng.integers(0, 2**31, n).astype(np.int32)
        salt = [None, "a", b"\xff\x00", "tenant"][i % 4]
        parent = None if i % 3 else bytes(rng.integers(0, 256, 32, dtype=np.uint8))
        want = list(hash_blocks(toks, bs, salt=salt, parent=parent))
        assert v1_hashes_trusted(toks, bs, salt_bytes(salt), parent) == want, (bs, n, salt)
