"""The pure-Python BLAKE3 and the prefixkv-v1 reference, against the `blake3` package, known
BLAKE3 vectors and the prefixkv-v1 vectors of docs/hashing.md."""

import numpy as np
import pytest
from prefixkv.paged.reference import hash_blocks_reference
from prefixkv.paged.reference import hashing as R

blake3 = pytest.importorskip("blake3")

# Every length up to 3 blocks, then the block/chunk/tree boundaries up to 8 chunks + 1 byte.
LENGTHS = [*range(0, 200), 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1500, 2047, 2048,
           2049, 3000, 3072, 3073, 4096, 4097, 5121, 7169, 8192, 8193]
KEY = b"whats the Elvish word for friend"  # 32 bytes, the official BLAKE3 test-vector key
CONTEXT = "BLAKE3 2019-12-27 16:29:52 test vectors context"


def _input(n: int) -> bytes:
    """The official BLAKE3 test-vector input: byte i is i % 251."""
    return bytes(i % 251 for i in range(n))


@pytest.mark.parametrize("n", LENGTHS)
def test_blake3_modes_match_package(n):
    data = _input(n)
    assert R.blake3(data) == blake3.blake3(data).digest()
    assert R.keyed_hash(KEY, data) == blake3.blake3(data, key=KEY).digest()
    assert R.derive_key(CONTEXT, data) == blake3.blake3(
        data, derive_key_context=CONTEXT).digest()


@pytest.mark.parametrize("n", [0, 1, 64, 1025])
@pytest.mark.parametrize("out_len", [1, 31, 33, 64, 65, 131])
def test_blake3_extendable_output(n, out_len):
    data = _input(n)
    assert R.blake3(data, out_len) == blake3.blake3(data).digest(out_len)
    assert R.keyed_hash(KEY, data, out_len) == blake3.blake3(data, key=KEY).digest(out_len)


def test_blake3_known_vectors():
    # Published BLAKE3 digests (BLAKE3 README / spec): the empty input and "abc".
    assert R.blake3(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
    assert R.blake3(b"abc").hex() == (
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85")


def test_compress_rotations_by_hand():
    # G on a zero state with message words (1, 0): a = 1; d = rotr(1, 16) = 0x10000;
    # c = 0x10000; b = rotr(0x10000, 12) = 0x10; a = 1 + 0x10 = 0x11; d = rotr(0x10011, 8)
    # = 0x11000100; c = 0x10000 + 0x11000100 = 0x11010100; b = rotr(0x10 ^ 0x11010100, 7).
    s = [0] * 16
    R._g(s, 0, 4, 8, 12, 1, 0)
    assert s[0] == 0x11
    assert s[12] == 0x11000100
    assert s[8] == 0x11010100
    assert s[4] == R._rotr(0x10 ^ 0x11010100, 7)


# prefixkv-v1 vectors (docs/hashing.md), computed with the blake3 package
KEY_NONE = "778643ddc6f121469c6a09c2995b28458e0c41b41accbde019de6cca28020caa"
KEY_TENANT_A = "dbcaf8db30ef78abfc519c4387724675216133648b4b3b5a135142a7ea8efafe"
KEY_NONE_EXTRA = "d4b4d058c3f8c3c34b50967bf5d8dbfff82448547995f11488b249967e295bc8"
KEY_TENANT_A_EXTRA = "1e69cb1a6034ba63e40ed3eba29773becf719fbf5d4f6504b3e8143de0ee5391"
V1 = ["0ae9a6e2bdeffd163a424745a6947aac211cbe7f4aba58856861e85674230fed"]
V2 = ["c4273153c00d8997ef70174fe296932660e6ceb87fadcc868f90518818eaec47",
      "1a7b9071307e26aa58eb7b3d18b060e5b8c7e9fdf8b6356410bce45e36a1441d"]
V3 = ["2176fe749c22cd977aafe4863d9cb76f2645b7f3b13defed5c4e99617d7c86d6"]
V4 = ["0f7b3e9758ae4af5f058badccbcf10f21f8de5eed11caac3522eab6c6d127ea8",
      "74e02a5921735ee3b0eaac986f4d86146c451fec4be267896ddc93bc0a202129",
      "23304875092c33dce1d0437b6430371ce8bf988e025b0213986ac19b4293bada"]
V5 = ["ab36e2dcf624cc644f57497f31a34f1f87047421ca3d0918451b6c3c9edc61c6"]


def _hex(words: np.ndarray) -> list[str]:
    return [d.hex() for d in R.words_to_digests(words)]


def test_block_keys():
    assert R.block_key(None).hex() == KEY_NONE
    assert R.block_key("").hex() == KEY_NONE
    assert R.block_key("tenant-a").hex() == KEY_TENANT_A
    assert R.block_key(b"tenant-a").hex() == KEY_TENANT_A
    assert R.block_key(None, extra=True).hex() == KEY_NONE_EXTRA
    assert R.block_key("tenant-a", extra=True).hex() == KEY_TENANT_A_EXTRA
    context = "prefixkv v1 block hash with extra words"
    assert blake3.blake3(b"", derive_key_context=context).hexdigest() == KEY_NONE_EXTRA


def test_extra_words_never_frame_as_tokens():
    """B tokens plus 4 extra words are the bytes of B + 4 tokens: the extra context's key
    keeps the two digests apart (they were equal under one key), here and along a chain."""
    tok = np.arange(40, dtype=np.int32)
    extra = np.array([[16, 17, 18, 19], [36, 37, 38, 39]], np.uint32)
    with_extra = hash_blocks_reference(np.concatenate([tok[:16], tok[20:36]]), 16,
                                       extra=extra)
    plain = hash_blocks_reference(tok, 20)
    assert not set(_hex(with_extra)) & set(_hex(plain))
    key = blake3.blake3(b"", derive_key_context="prefixkv v1 block hash").digest()
    assert _hex(plain)[0] == blake3.blake3(bytes(32) + tok[:20].astype("<u4").tobytes(),
                                           key=key).hexdigest()


@pytest.mark.parametrize(("tokens", "block_size", "kwargs", "want"), [
    (np.arange(16), 16, {}, V1),
    (np.arange(32), 16, {"salt": "tenant-a"}, V2),
    (np.arange(16), 16, {"extra": np.array([[1, 2, 3, 4]], np.uint32)}, V3),
    (np.array([5, 6, 7]), 1, {}, V4),
    (np.arange(300), 300, {}, V5),  # 1232-byte message: two chunks and a parent node
], ids=["V1", "V2-salt", "V3-extra", "V4-block1", "V5-multichunk"])
def test_prefixkv_v1_vectors(tokens, block_size, kwargs, want):
    got = hash_blocks_reference(tokens.astype(np.int32), block_size, **kwargs)
    assert got.dtype == np.uint32 and got.shape == (len(want), 8)
    assert _hex(got) == want


def test_reference_is_the_spec_by_hand():
    # h_0 = keyed_hash(key, 32 zero bytes || le_u32(7, 9)); h_1 = keyed_hash(key, h_0 || le(11, 13))
    key = blake3.blake3(b"ns", derive_key_context="prefixkv v1 block hash").digest()
    h0 = blake3.blake3(bytes(32) + bytes([7, 0, 0, 0, 9, 0, 0, 0]), key=key).digest()
    h1 = blake3.blake3(h0 + bytes([11, 0, 0, 0, 13, 0, 0, 0]), key=key).digest()
    got = hash_blocks_reference(np.array([7, 9, 11, 13, 15], np.int32), 2, salt="ns")
    assert _hex(got) == [h0.hex(), h1.hex()]  # the partial tail [15] is not hashed
    # word k is digest bytes 4k..4k+3 little-endian
    assert int(got[0, 0]) == int.from_bytes(h0[:4], "little")


def test_reference_ragged_extra_parent():
    tok = np.arange(40, dtype=np.int32)
    cu = np.array([0, 10, 10, 40], np.int32)
    parent = np.arange(24, dtype=np.uint32).reshape(3, 8)
    extra = np.arange(4 * 9, dtype=np.uint32).reshape(9, 4)  # 2 + 0 + 7 full blocks of 4
    got = hash_blocks_reference(tok, 4, cu_lens=cu, extra=extra, parent=parent, salt=b"s")
    for s, rows in ((0, slice(0, 2)), (2, slice(2, 9))):
        one = hash_blocks_reference(tok[cu[s]:cu[s + 1]], 4, extra=extra[rows],
                                    parent=parent[s], salt=b"s")
        np.testing.assert_array_equal(got[rows], one)


def test_digest_words_roundtrip():
    digests = [bytes(range(32)), bytes(32), b"\xff" * 32]
    w = R.digests_to_words(digests)
    assert w.dtype == np.uint32 and w.shape == (3, 8)
    assert int(w[0, 0]) == 0x03020100
    assert R.words_to_digests(w) == digests
    assert R.digests_to_words([]).shape == (0, 8)
    with pytest.raises(ValueError, match=r"digests\[0\]: expected 32 bytes"):
        R.digests_to_words([b"short"])
    with pytest.raises(ValueError, match="words: expected uint32"):
        R.words_to_digests(np.zeros((2, 8), np.int64))
