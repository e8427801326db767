"""Compatibility modes of hash_blocks, bit-exact with the vectors in shared/ANCHORS.md (taken
from vLLM, SGLang and Dynamo) and with their formulas written out independently here."""

import hashlib

import numpy as np
import pytest
from prefixkv.paged import hash_blocks
from prefixkv.paged.hashing import HASH_ALGOS, dynamo_salt_hash, vllm_none_hash

cbor2 = pytest.importorskip("cbor2")
xxhash = pytest.importorskip("xxhash")


def _sha256_cbor(obj) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _u64(d: bytes) -> int:
    assert len(d) == 8
    return int.from_bytes(d, "little")


# ------------------------------------------------------------------------------------- vLLM


def test_vllm_default_none_hash_vector():
    assert vllm_none_hash().hex() == (
        "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0")


def test_vllm_seed0_vector():
    assert vllm_none_hash("0").hex() == (
        "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e")
    got = hash_blocks(np.arange(16, dtype=np.int32), 16, algo="vllm-sha256-cbor", seed="0")
    assert [d.hex() for d in got] == [
        "d830de3d42c00f25a2949b5d12d98642664a44872c1614c5b0147556276afc9c"]


def test_vllm_chain_salt_and_lora():
    tokens = np.arange(40, dtype=np.int32)
    none = vllm_none_hash()
    lora = ("ad", "/adapters/ad")
    b0 = _sha256_cbor((none, tuple(range(16)), (("lora", "ad", "/adapters/ad"),
                                                ("cache_salt", "s1"))))
    b1 = _sha256_cbor((b0, tuple(range(16, 32)), (("lora", "ad", "/adapters/ad"),)))
    got = hash_blocks(tokens, 16, algo="vllm-sha256-cbor", salt="s1", lora=lora)
    assert got == [b0, b1]
    # salt only on block 0; no extra keys -> None
    c0 = _sha256_cbor((none, tuple(range(16)), (("cache_salt", "s1"),)))
    c1 = _sha256_cbor((c0, tuple(range(16, 32)), None))
    assert hash_blocks(tokens, 16, algo="vllm-sha256-cbor", salt="s1") == [c0, c1]
    # an empty cache_salt is no salt (vLLM tests `request.cache_salt` for truth)
    assert (hash_blocks(tokens, 16, algo="vllm-sha256-cbor", salt="")
            == hash_blocks(tokens, 16, algo="vllm-sha256-cbor"))


def _sha256_pickle(obj) -> bytes:
    import pickle

    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()


def test_vllm_sha256_pickle_chain():
    """vLLM's default hash (sha256: SHA-256 of pickle, protocol 5 = HIGHEST_PROTOCOL of every
    CPython it runs on): NONE_HASH of the seed, then the same (parent, tokens, extra_keys)
    chain as sha256_cbor; numpy token ids hash as the Python ints vLLM pickles."""
    assert vllm_none_hash(algo="vllm-sha256") == _sha256_pickle("vllm-none-hash")
    assert vllm_none_hash("0", algo="vllm-sha256") == _sha256_pickle("0")
    assert vllm_none_hash(algo="vllm-sha256") != vllm_none_hash()
    # the pickle written out by hand (PROTO 5, FRAME, SHORT_BINUNICODE, MEMOIZE, STOP): the
    # encoding of a str does not depend on the Python release
    seed = b"vllm-none-hash"
    body = b"\x8c" + bytes([len(seed)]) + seed + b"\x94."
    manual = b"\x80\x05\x95" + len(body).to_bytes(8, "little") + body
    assert vllm_none_hash(algo="vllm-sha256") == hashlib.sha256(manual).digest()
    assert vllm_none_hash(algo="vllm-sha256").hex() == (
        "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198")
    tokens = np.arange(40, dtype=np.int32)
    none = vllm_none_hash(algo="vllm-sha256")
    lora = ("ad", "/adapters/ad")
    b0 = _sha256_pickle((none, tuple(range(16)), (("lora", "ad", "/adapters/ad"),
                                                  ("cache_salt", "s1"))))
    b1 = _sha256_pickle((b0, tuple(range(16, 32)), (("lora", "ad", "/adapters/ad"),)))
    assert hash_blocks(tokens, 16, algo="vllm-sha256", salt="s1", lora=lora) == [b0, b1]
    c0 = _sha256_pickle((none, tuple(range(16)), None))
    assert hash_blocks(tokens, 16, algo="vllm-sha256") == [
        c0, _sha256_pickle((c0, tuple(range(16, 32)), None))]
    assert hash_blocks(tokens[16:], 16, algo="vllm-sha256", parent=c0) == hash_blocks(
        tokens, 16, algo="vllm-sha256")[1:]
    mm = hash_blocks(tokens, 16, algo="vllm-sha256", mm_items=[(20, 8, "img")])
    assert mm[1] == _sha256_pickle((c0, tuple(range(16, 32)), (("img", 4),)))
    assert hash_blocks(tokens, 16, algo="vllm-sha256") == hash_blocks(
        list(range(40)), 16, algo="vllm-sha256")


def test_vllm_continuation_and_ragged():
    tokens = np.arange(64, dtype=np.int32)
    whole = hash_blocks(tokens, 16, algo="vllm-sha256-cbor", salt="s")
    rest = hash_blocks(tokens[32:], 16, algo="vllm-sha256-cbor", salt="s", parent=whole[1])
    assert whole[2:] == rest  # a continuation is not block 0: no cache_salt there
    ragged = hash_blocks(np.concatenate([tokens, tokens[:20]]), 16, algo="vllm-sha256-cbor",
                         cu_lens=np.array([0, 64, 84], np.int32), seed="0")
    assert ragged == (hash_blocks(tokens, 16, algo="vllm-sha256-cbor", seed="0")
                      + hash_blocks(tokens[:20], 16, algo="vllm-sha256-cbor", seed="0"))


# ------------------------------------------------------------------------------------ SGLang


def test_sglang_vector():
    got = hash_blocks(np.arange(64, dtype=np.int32), 64, algo="sglang-sha256")
    assert [d.hex() for d in got] == [
        "fea7b32778ecbdd7adee1941e98c89cf96bbc762f5f1beb0be24e36a456fbbc5"]


def test_sglang_chain_and_parent():
    tokens = np.arange(70, dtype=np.int32)
    p0 = hashlib.sha256(np.arange(32, dtype="<u4").tobytes()).digest()
    p1 = hashlib.sha256(p0 + np.arange(32, 64, dtype="<u4").tobytes()).digest()
    assert hash_blocks(tokens, 32, algo="sglang-sha256") == [p0, p1]
    assert hash_blocks(tokens[32:], 32, algo="sglang-sha256", parent=p0) == [p1]


# ------------------------------------------------------------------------------------ Dynamo


def test_dynamo_router_vector():
    got = hash_blocks([1, 2, 3, 4], 4, algo="dynamo-xxh3")
    assert [_u64(d) for d in got] == [14643705804678351452]


def test_dynamo_router_position_independent():
    tokens = np.array([1, 2, 3, 4, 9, 9, 9, 9, 1, 2, 3, 4], np.int32)
    got = [_u64(d) for d in hash_blocks(tokens, 4, algo="dynamo-xxh3")]
    assert got[0] == got[2] == 14643705804678351452 != got[1]
    assert _u64(hash_blocks([1, 2, 3, 4], 4, algo="dynamo-xxh3", seed=0)[0]) == (
        xxhash.xxh3_64_intdigest(np.array([1, 2, 3, 4], "<u4").tobytes(), seed=0))


@pytest.mark.parametrize("salt", [None, "model-a", b"\x01\x02"])
def test_dynamo_kvbm_chain(salt):
    tokens = np.arange(12, dtype=np.int32)
    sh = 0 if salt is None else xxhash.xxh3_64_intdigest(
        salt.encode() if isinstance(salt, str) else salt, seed=0)
    assert dynamo_salt_hash(salt) == sh
    blocks = [xxhash.xxh3_64_intdigest(tokens[i:i + 4].astype("<u4").tobytes(), seed=sh)
              for i in (0, 4, 8)]
    seq = [blocks[0]]  # first block: its sequence hash is its block hash
    for b in blocks[1:]:
        seq.append(xxhash.xxh3_64_intdigest(np.array([seq[-1], b], "<u8").tobytes(), seed=sh))
    got = [_u64(d) for d in hash_blocks(tokens, 4, algo="dynamo-kvbm", salt=salt)]
    assert got == seq
    assert [_u64(d) for d in hash_blocks(tokens, 4, algo="dynamo-kvbm", seed=sh)] == seq
    cont = hash_blocks(tokens[4:], 4, algo="dynamo-kvbm", salt=salt, parent=seq[0])
    assert [_u64(d) for d in cont] == seq[1:]


def test_salted_modes_isolate():
    tokens = np.arange(64, dtype=np.int32)
    for algo in ("vllm-sha256-cbor", "dynamo-kvbm"):
        a = hash_blocks(tokens, 16, algo=algo, salt="a")
        b = hash_blocks(tokens, 16, algo=algo, salt="b")
        assert not set(a) & set(b), algo
        assert hash_blocks(tokens, 16, algo=algo, salt="a") == a


def test_every_algo_handles_ragged_and_empty():
    tokens = np.arange(50, dtype=np.int32)
    cu = np.array([0, 0, 17, 50], np.int32)
    for algo in HASH_ALGOS:
        got = hash_blocks(tokens, 8, cu_lens=cu, algo=algo)
        assert len(got) == 2 + 4
        assert got == (hash_blocks(tokens[:17], 8, algo=algo)
                       + hash_blocks(tokens[17:], 8, algo=algo))
        assert hash_blocks(np.zeros(0, np.int32), 8, algo=algo) == []


BAD = [
    ("vllm-sha256-cbor", {"extra": np.zeros((2, 4), np.uint32)}, ValueError,
     "extra: only prefixkv-v1 takes extra"),
    ("vllm-sha256-cbor", {"salt": b"x"}, TypeError, "salt: vllm-sha256-cbor takes a str"),
    ("vllm-sha256-cbor", {"seed": 1.5}, TypeError, "seed: expected a str"),
    ("vllm-sha256-cbor", {"seed": 0}, TypeError, r"seed: expected a str \(vLLM's seed is the"),
    ("vllm-sha256-cbor", {"seed": b"0"}, TypeError, "seed: expected a str"),
    ("vllm-sha256-cbor", {"lora": "name"}, TypeError, r"lora: expected a \(name, path\) pair"),
    ("vllm-sha256-cbor", {"parent": b"x" * 8}, ValueError, "parent: expected 32 bytes, got 8"),
    ("sglang-sha256", {"salt": "x"}, ValueError, "salt: sglang-sha256 has no salt"),
    ("sglang-sha256", {"seed": 3}, ValueError, "seed: sglang-sha256 has no seed"),
    ("sglang-sha256", {"lora": ("a", "b")}, ValueError, "lora: only vllm-sha256-cbor"),
    ("vllm-sha256", {"salt": b"x"}, TypeError, "salt: vllm-sha256 takes a str"),
    ("vllm-sha256", {"seed": 0}, TypeError, r"seed: expected a str \(vLLM's seed is the"),
    ("vllm-sha256", {"parent": b"x" * 8}, ValueError, "parent: expected 32 bytes, got 8"),
    ("dynamo-xxh3", {"parent": 5}, ValueError, "parent: dynamo-xxh3 hashes each block alone"),
    ("dynamo-xxh3", {"seed": -1}, ValueError, r"seed: expected an int in \[0, 2\*\*64\)"),
    ("dynamo-kvbm", {"seed": 1, "salt": "a"}, ValueError, "salt: dynamo-kvbm takes salt or seed"),
    ("dynamo-kvbm", {"salt": 3}, TypeError, "salt: expected str, bytes or None, got int"),
    ("vllm-sha256-cbor", {"parent": "ab" * 16}, TypeError, "parent: expected 32 bytes, got str"),
    ("dynamo-kvbm", {"parent": b"x" * 8}, TypeError, "parent: expected an int in"),
    ("dynamo-kvbm", {"parent": [1, 2]}, ValueError, r"parent: expected a list of num_seqs \(1\)"),
    ("dynamo-kvbm", {"tokens": np.array([-1, 2], np.int32)}, ValueError,
     "tokens: expected token ids >= 0"),
    # CBOR text is UTF-8: a lone surrogate had failed inside cbor2, naming nothing
    ("vllm-sha256-cbor", {"lora": ("a\ud800", "p")}, ValueError,
     r"lora\[0\]: expected a str UTF-8 can encode"),
    ("vllm-sha256-cbor", {"salt": "s\udfff"}, ValueError, "salt: expected a str UTF-8 can"),
    ("vllm-sha256-cbor", {"mm_items": [(0, 4, "\ud800")]}, ValueError,
     r"mm_items\[0\]: identifier: expected a str UTF-8 can encode"),
]


@pytest.mark.parametrize(("algo", "kwargs", "exc", "match"), BAD,
                         ids=[f"{a}-{m[:30]}" for a, _, _, m in BAD])
def test_bad_input(algo, kwargs, exc, match):
    kwargs = dict(kwargs)
    tokens = kwargs.pop("tokens", np.arange(32, dtype=np.int32))
    with pytest.raises(exc, match=match):
        hash_blocks(tokens, 16, algo=algo, **kwargs)
